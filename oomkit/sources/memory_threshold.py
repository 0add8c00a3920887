"""cgroup v2 usage thresholds on ``memory.current``, reported in both directions.

cgroup v1 signals a usage threshold on an eventfd (``memcg-threshold``); cgroup v2 has no
such notification: ``memory.current`` can only be read.  So this source reads it, as
``meminfo`` reads ``/proc/meminfo``, on an interval that adapts to the distance: after each
reading it sleeps for as long as the fastest plausible allocation (``fill_rate_per_s``)
would need to reach the nearest threshold from either side, clamped to ``[interval_min_s,
interval_max_s]``.  One reading is one small ``pread`` per cgroup (about 10 us here), so a
cgroup far from its thresholds costs a read a second and one near them a read every 10 ms.

Events and their values are the v1 source's: a ``threshold`` event per threshold whose side
changed, ``direction`` 1 going up and -1 coming back down, with ``usage_bytes``,
``threshold_bytes`` and, when the cgroup has one, ``limit_bytes``.  Percentage thresholds are
shares of ``memory.max`` and follow it: the limit is read again with every reading, so a
cgroup resized in place is measured against its new limit (a cgroup with no limit cannot
have a percentage threshold and is left alone with one log line; it is looked at again when
it is made again).  A threshold usage is already past when the source starts is reported at
once, going up (v1's eventfd says nothing until the next crossing).  With ``swap = true`` the reading is ``memory.current`` plus
``memory.swap.current``, v1's ``memory.memsw.usage_in_bytes``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Annotated

import msgspec

from ..cgroupfs import mounts_for
from ..config import Config
from ..events import Event, Scope
from ..poller import Poller
from ..units import MAX_SIZE, Interval, Size, Threshold, parse_size, parse_threshold
from .base import SourceSettings
from .scopes import ScopeWatcher
from .watching import Watch, WatchEnded, WatchingSource, tree_root

__all__ = ["MemoryThresholdSource", "MemoryThresholdSourceConfig", "next_interval"]


class MemoryThresholdSourceConfig(SourceSettings, frozen=True, tag="memory-threshold", kw_only=True):
    """cgroup v2 usage thresholds: a ``threshold`` event each time a cgroup's
    ``memory.current`` crosses one, upwards (``direction`` 1) or back down (-1).

    ``thresholds`` are sizes (``"900M"``) or percentages of the cgroup's ``memory.max``
    (``"90%"``).  v2 has no threshold notification, so usage is read on an adaptive
    interval: the time the fastest plausible allocation needs to reach the nearest
    threshold, ``distance / fill_rate_per_s``, clamped to ``[interval_min_s,
    interval_max_s]``.
    """

    cgroups: tuple[str, ...]
    """v2 cgroup paths or glob patterns (relative to the v2 mount, or absolute under it)."""
    thresholds: tuple[str | Size, ...]
    """Sizes or percentages of ``memory.max``; each fires on every crossing."""
    swap: bool = False
    """Count swap too: ``memory.current`` plus ``memory.swap.current``."""
    interval_min_s: Interval = 0.01
    """The shortest wait between two readings of a cgroup (near a threshold)."""
    interval_max_s: Interval = 1.0
    """The longest wait between two readings (far from every threshold)."""
    fill_rate_per_s: str | Annotated[int, msgspec.Meta(ge=1, le=MAX_SIZE)] = "2G"
    """The fastest growth assumed, as a size per second: how soon a threshold could be
    reached from where usage is, so how long the source may sleep."""

    def __post_init__(self) -> None:
        if not self.cgroups:
            raise ValueError("`cgroups` needs at least one cgroup")
        if not self.thresholds:
            raise ValueError("`thresholds` needs at least one threshold")
        for t in self.thresholds:
            parse_threshold(t)
        if self.interval_min_s > self.interval_max_s:
            raise ValueError("`interval_min_s` cannot be longer than `interval_max_s`")
        rate = self.fill_rate_per_s
        if isinstance(rate, str) and parse_size(rate) < 1:
            raise ValueError(f"`fill_rate_per_s` {rate!r}: at least one byte a second")


def next_interval(usage: int, points: Iterable[int], rate: int, low: float, high: float) -> float:
    """How long to sleep before the next reading: the time ``rate`` bytes a second need to
    carry ``usage`` to the nearest of ``points`` (either way), within ``[low, high]``."""
    distance = min((abs(p - usage) for p in points), default=0)
    return min(high, max(low, distance / rate))


def _size(raw: bytes, name: str) -> int:
    text = raw.strip()
    if not text.isdigit() or len(text) > 20:
        raise ValueError(f"{name} reads {text[:40].decode(errors='replace')!r}, not a size")
    return int(text)


class _UsageWatch(Watch):
    def __init__(self, src: MemoryThresholdSource, scope: Scope) -> None:
        self.scope = scope
        self._src = src
        self._fd = os.open(src.scope_dir(scope), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self.limit = -1
        self.points: list[int] = []
        self.above: list[bool] | None = None
        """Each threshold's side at the last reading (None: nothing read yet)."""
        try:
            self._read()  # refused now, in one log line, if it cannot be measured
        except BaseException:
            os.close(self._fd)
            raise
        self.deadline = 0.0

    def _file(self, name: str) -> int:
        fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC, dir_fd=self._fd)
        try:
            raw = os.read(fd, 64)
        finally:
            os.close(fd)
        return -1 if raw.strip() == b"max" else _size(raw, name)

    def _read(self) -> int:
        """Usage now; the limit and the thresholds' bytes brought up to date."""
        src = self._src
        try:
            usage = self._file("memory.current")
            if src.swap:
                usage += max(0, self._file("memory.swap.current"))
            limit = self._file("memory.max") if src.relative else self.limit
        except FileNotFoundError:
            if not src.scope_dir(self.scope).is_dir():
                raise WatchEnded("was removed", vanished=True) from None
            raise
        if usage < 0:
            raise ValueError("memory.current reads 'max', not a size")
        if limit != self.limit or not self.points:
            if limit < 0 and src.relative:
                raise ValueError(f"memory.max is 'max': a percentage threshold needs a limit ({src.relative[0]!r})")
            self.limit = limit
            self.points = [t.bytes_of(limit) for t in src.thresholds]
        return usage

    def fired(self, tag: int, events: int, now: float) -> Iterable[Event]:
        return ()  # nothing registered: readings are on the timer

    def tick(self, now: float) -> Iterable[Event]:
        src = self._src
        usage = self._read()
        out: list[Event] = []
        # At the first reading every threshold counts as below: one already passed when the
        # source starts (a daemon restarted mid-episode) is reported at once, going up.
        before = self.above or [False] * len(self.points)
        for i, point in enumerate(self.points):
            above = usage >= point
            if above == before[i]:
                continue
            values = {"usage_bytes": float(usage), "threshold_bytes": float(point), "direction": 1.0 if above else -1.0}
            if self.limit >= 0:
                values["limit_bytes"] = float(self.limit)
            out.append(Event(source=src.name, kind="threshold", scope=self.scope, values=values))
        self.above = [usage >= p for p in self.points]
        self.deadline = now + next_interval(usage, self.points, src.rate, src.spec.interval_min_s, src.spec.interval_max_s)
        return out

    def usage(self) -> int:
        return self._read()

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class MemoryThresholdSource(WatchingSource):
    """``threshold`` events when a v2 cgroup's usage crosses a configured size, either way."""

    settings_type = MemoryThresholdSourceConfig

    def __init__(self, spec: MemoryThresholdSourceConfig, config: Config) -> None:
        root = tree_root(mounts_for(config.paths), "v2", spec.source_name)
        super().__init__(spec.source_name, root=root, tree="v2", patterns=spec.cgroups)
        self.spec = spec
        self.thresholds: tuple[Threshold, ...] = tuple(parse_threshold(t) for t in spec.thresholds)
        self.relative = tuple(str(t) for t, p in zip(spec.thresholds, self.thresholds, strict=True)
                              if p.percent is not None)
        """The percentage thresholds as written (they need a ``memory.max``)."""
        rate = spec.fill_rate_per_s
        self.rate = parse_size(rate) if isinstance(rate, str) else rate
        self.swap = spec.swap

    def open_watch(self, scope: Scope, poller: Poller[tuple[Watch | ScopeWatcher, int]]) -> Watch:
        return _UsageWatch(self, scope)

    def still_holds(self, event: Event) -> bool:
        """An upward crossing holds while usage is still at or above that threshold."""
        if event.values.get("direction", 1.0) < 0:
            return False
        watch = self._watches.get(event.scope)
        if not isinstance(watch, _UsageWatch):
            return False
        try:
            return watch.usage() >= event.values.get("threshold_bytes", 0.0)
        except (WatchEnded, OSError, ValueError):
            return False
