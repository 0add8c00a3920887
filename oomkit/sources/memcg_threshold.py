"""cgroup v1 usage thresholds on ``memory.usage_in_bytes``, reported in both directions.

The kernel signals a threshold's eventfd whenever usage crosses it, up or down, checking
every few hundred page charges rather than on each one.  On a wake this source reads usage
once and reports every threshold whose side changed since the last reading, so an embedding
service sees both the rise and the clear.  A crossing that went up and back down between two
readings leaves the side unchanged and is not reported: the state it would describe is over.
"""

from __future__ import annotations

import select
from collections.abc import Iterable
from typing import Literal

from ..cgroupfs import V1Event, mounts_for, register_v1_event
from ..config import Config
from ..events import Event, Scope
from ..poller import Poller
from ..procfs import read_small
from ..units import Size, Threshold, parse_threshold
from .base import SourceSettings
from .scopes import ScopeWatcher
from .watching import Watch, WatchEnded, WatchingSource, tree_root

__all__ = ["MemcgThresholdSource", "MemcgThresholdSourceConfig"]


class MemcgThresholdSourceConfig(SourceSettings, frozen=True, tag="memcg-threshold", kw_only=True):
    """cgroup v1 usage thresholds: a ``threshold`` event each time usage crosses one,
    upwards (``direction`` 1) or back down (``direction`` -1).

    ``thresholds`` are sizes (``"900M"``) or percentages of the memcg's limit (``"90%"``).
    """

    cgroups: tuple[str, ...]
    """v1 memcg paths or glob patterns."""
    thresholds: tuple[str | Size, ...]
    """Sizes or percentages of the memcg's limit; each fires on every crossing."""
    file: Literal["memory.usage_in_bytes", "memory.memsw.usage_in_bytes"] = "memory.usage_in_bytes"
    """Memory alone, or memory plus swap."""

    def __post_init__(self) -> None:
        if not self.cgroups:
            raise ValueError("`cgroups` needs at least one cgroup")
        if not self.thresholds:
            raise ValueError("`thresholds` needs at least one threshold")
        for t in self.thresholds:
            parse_threshold(t)


PollerT = Poller[tuple[Watch | ScopeWatcher, int]]

_UNLIMITED = 1 << 62
"""v1 reports "no limit" as a page-rounded LONG_MAX; anything this large is no limit."""


class _ThresholdWatch(Watch):
    def __init__(self, src: MemcgThresholdSource, poller: PollerT, scope: Scope) -> None:
        self.scope = scope
        self._src = src
        self._poller = poller
        self._dir = src.scope_dir(scope)
        limit = int(read_small(self._dir / "memory.limit_in_bytes", 64))
        self.limit = limit
        self.bytes: list[int] = []
        for t in src.thresholds:
            if t.percent is not None and limit >= _UNLIMITED:
                raise ValueError(f"threshold {t!r} is a share of the limit, and {scope} has none")
            self.bytes.append(t.bytes_of(limit))
        self.events: list[V1Event] = []
        try:
            usage = self.usage()
            self.above = [usage >= b for b in self.bytes]
            for i, b in enumerate(self.bytes):
                ev = register_v1_event(self._dir, src.file, str(b))
                self.events.append(ev)
                poller.register(ev.efd, select.EPOLLIN, (self, i))
        except BaseException:
            self.close()
            raise

    def usage(self) -> int:
        return int(read_small(self._dir / self._src.file, 64))

    def fired(self, tag: int, events: int, now: float) -> Iterable[Event]:
        for ev in self.events:
            ev.drain()
        try:
            usage = self.usage()
        except FileNotFoundError:
            raise WatchEnded("was removed", vanished=True) from None
        out: list[Event] = []
        for i, b in enumerate(self.bytes):
            above = usage >= b
            if above == self.above[i]:
                continue
            self.above[i] = above
            values = {
                "usage_bytes": float(usage),
                "threshold_bytes": float(b),
                "limit_bytes": float(self.limit),
                "direction": 1.0 if above else -1.0,
            }
            out.append(Event(source=self._src.name, kind="threshold", scope=self.scope, values=values))
        return out

    def close(self) -> None:
        for ev in self.events:
            self._poller.unregister(ev.efd)
            ev.close()
        self.events.clear()


class MemcgThresholdSource(WatchingSource):
    """``threshold`` events when a v1 memcg's usage crosses a configured size, either way."""

    settings_type = MemcgThresholdSourceConfig

    def __init__(self, spec: MemcgThresholdSourceConfig, config: Config) -> None:
        super().__init__(
            spec.source_name,
            root=tree_root(mounts_for(config.paths), "v1", spec.source_name),
            tree="v1",
            patterns=spec.cgroups,
        )
        self.thresholds: tuple[Threshold, ...] = tuple(parse_threshold(t) for t in spec.thresholds)
        self.file = spec.file

    def open_watch(self, scope: Scope, poller: PollerT) -> Watch:
        return _ThresholdWatch(self, poller, scope)

    def still_holds(self, event: Event) -> bool:
        """An upward crossing holds while usage is still at or above that threshold."""
        if event.values.get("direction", 1.0) < 0:
            return False
        watch = self._watches.get(event.scope)
        if not isinstance(watch, _ThresholdWatch):
            return False
        return watch.usage() >= event.values.get("threshold_bytes", 0.0)
