"""PSI: memory pressure of the system or of v2 cgroups, from kernel triggers.

Each scope runs in one of two modes, chosen when it is armed by walking a ladder:

1. a trigger on the scope's own pressure file, its window rounded up to a 2 s multiple when
   we lack CAP_SYS_RESOURCE (the kernel refuses other windows then);
2. for the system, a trigger on the v2 root's ``memory.pressure``, which carries the same
   system-wide numbers (``/proc/pressure/memory`` refuses triggers on some kernels);
3. polling the file's ``total`` every ``poll_interval_s``, judging the stall growth over the
   last window exactly as a trigger would.

Which mode a scope ended in, and why, is logged once.  Trigger fds signal POLLPRI and their
poll consumes the signal, so they are waited on in a worker thread (see
:mod:`oomkit.poller`).  A trigger ends with POLLERR when its cgroup is removed; the watch
then ends quietly.
"""

from __future__ import annotations

import logging
import os
import select
from collections import deque
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Literal

import msgspec

from ..cgroupfs import mounts_for
from ..config import Config
from ..events import SYSTEM, Event, Scope
from ..poller import Poller
from ..psi import CAP_SYS_RESOURCE, has_capability, open_trigger, read_pressure, round_window_us
from ..units import Interval
from .base import SourceSettings
from .scopes import ScopeWatcher
from .watching import Watch, WatchEnded, WatchingSource, tree_root

__all__ = ["PsiSource", "PsiSourceConfig"]

log = logging.getLogger("oomkit.sources.psi")


class PsiSourceConfig(SourceSettings, frozen=True, tag="psi", kw_only=True):
    """PSI triggers on ``/proc/pressure/memory`` or on v2 cgroups' ``memory.pressure``.

    Emits ``pressure`` each time the kernel reports more than ``stall_ms`` of ``line``
    stall within ``window_s`` (at most once per window), and ``pressure-cleared`` once two
    windows pass without a report.  ``cgroups`` are v2 paths or glob patterns followed as
    cgroups come and go; empty means the whole system.  Where the kernel refuses a trigger
    the source falls back: a window rounded up to 2 s multiples (needed without
    CAP_SYS_RESOURCE), the v2 root's ``memory.pressure`` for the system, and last polling
    the file every ``poll_interval_s``.
    """

    cgroups: tuple[str, ...] = ()
    """v2 cgroup paths or glob patterns; empty watches the whole system."""
    line: Literal["some", "full"] = "some"
    """Which PSI line: ``some`` (at least one task stalled) or ``full`` (all stalled)."""
    stall_ms: Annotated[float, msgspec.Meta(ge=0.001, le=10_000.0)] = 100.0
    """Stall time within a window that fires the trigger (at most the window; the kernel
    counts whole microseconds)."""
    window_s: Annotated[float, msgspec.Meta(ge=0.5, le=10.0)] = 2.0
    """The trigger's window (the kernel's limits; rounded up to 2 s multiples when unprivileged)."""
    poll_interval_s: Interval = 1.0
    """How often the file is read when no trigger can be armed (the last fallback)."""

    def __post_init__(self) -> None:
        # The kernel's own limit for a trigger (kernel/sched/psi.c); window_s's are its Meta.
        if self.stall_ms > self.window_s * 1000:
            raise ValueError("`stall_ms` cannot be longer than the window")


_CLEAR_WINDOWS = 2
"""Windows without a trigger report after which pressure counts as cleared.  The kernel
reports at most once per window while the stall stays above the threshold, so one quiet
window can be chance; two mean it fell."""

PollerT = Poller[tuple[Watch | ScopeWatcher, int]]


class _PsiWatch(Watch):
    def __init__(
        self, src: PsiSource, poller: PollerT, scope: Scope, path: Path, fd: int | None, window_us: int
    ) -> None:
        self.scope = scope
        self._poller = poller
        self.path = path
        self.fd = fd
        self.window_us = window_us
        self._src = src
        self._active = False
        self._last_report = 0.0
        # Poll mode: (time, stall total in µs) samples covering at least one window.
        self._samples: deque[tuple[float, float]] = deque()
        if fd is None:
            self.deadline = 0.0  # first sample at once

    @property
    def active(self) -> bool:
        return self._active

    def _event(self, kind: str, values: dict[str, float]) -> Event:
        values["trigger_stall_us"] = self._src.stall_us
        values["trigger_window_us"] = self.window_us
        return Event(source=self._src.name, kind=kind, scope=self.scope, values=values)  # type: ignore[arg-type]

    def fired(self, tag: int, events: int, now: float) -> Iterable[Event]:
        if events & (select.EPOLLERR | select.EPOLLHUP):
            raise WatchEnded("was removed (the trigger reported POLLERR)", vanished=True)
        self._active = True
        self._last_report = now
        self.deadline = now + _CLEAR_WINDOWS * self.window_us / 1e6
        return [self._event("pressure", read_pressure(self.path))]

    def tick(self, now: float) -> Iterable[Event]:
        if self.fd is not None:
            # Quiet for two windows since the last report.
            self._active = False
            self.deadline = None
            return [self._event("pressure-cleared", read_pressure(self.path))]
        return self._poll(now)

    def _poll(self, now: float) -> Iterable[Event]:
        src = self._src
        self.deadline = now + src.poll_interval_s
        values = read_pressure(self.path)
        total = values.get(f"{src.line}_total_us")
        window_s = self.window_us / 1e6
        if total is not None:
            samples = self._samples
            samples.append((now, total))
            while len(samples) > 2 and now - samples[1][0] >= window_s:
                samples.popleft()
            t0, first = samples[0]
            span = now - t0
            if span <= 0:
                return ()
            # Scale to a whole window while fewer samples than a window exist.
            stall = (total - first) * window_s / span if span < window_s else total - first
        else:
            # The experimental format has no stall total, only averages: the 10 s average's
            # share of a window is the best estimate left (coarser: it lags by seconds).
            avg10 = values.get(f"{src.line}_avg10_pct")
            if avg10 is None:
                raise WatchEnded(f"{self.path} has no `{src.line}` line")
            stall = avg10 / 100 * self.window_us
        values["window_stall_us"] = stall
        if stall >= src.stall_us:
            if self._active and now - self._last_report < window_s:
                return ()  # at most one report per window, as a trigger
            self._active = True
            self._last_report = now
            return [self._event("pressure", values)]
        if self._active:
            self._active = False
            return [self._event("pressure-cleared", values)]
        return ()

    def close(self) -> None:
        if self.fd is not None:
            self._poller.unregister(self.fd)
            os.close(self.fd)
            self.fd = None


class PsiSource(WatchingSource):
    """Memory pressure from PSI triggers, with the fallback ladder in the module doc."""

    settings_type = PsiSourceConfig

    def __init__(self, spec: PsiSourceConfig, config: Config) -> None:
        mounts = mounts_for(config.paths)
        self._mounts = mounts
        self._proc = config.paths.proc
        system = not spec.cgroups
        super().__init__(
            spec.source_name,
            root=mounts.unified if system else tree_root(mounts, "v2", spec.source_name),
            tree="v2",
            patterns=spec.cgroups,
            fixed=(SYSTEM,) if system else (),
            threaded=True,
        )
        self.line = spec.line
        self.stall_us = int(spec.stall_ms * 1000)
        self.window_us = int(spec.window_s * 1_000_000)
        self.poll_interval_s = spec.poll_interval_s
        try:
            self.privileged = has_capability(self._proc, CAP_SYS_RESOURCE)
        except OSError:
            self.privileged = False

    def _ladder(self, scope: Scope) -> list[tuple[Path, int]]:
        """``(file, window)`` pairs to try a trigger on, best first."""
        rounded = round_window_us(self.window_us)
        windows = [self.window_us] if self.privileged else []
        if rounded not in windows:
            windows.append(rounded)
        if scope.tree == "system":
            files = [Path(self._proc, "pressure", "memory")]
            if self._mounts.unified is not None:
                files.append(self._mounts.unified / "memory.pressure")
        else:
            files = [self.scope_dir(scope) / "memory.pressure"]
        return [(f, w) for f in files for w in windows]

    def open_watch(self, scope: Scope, poller: PollerT) -> Watch:
        refused: list[str] = []
        for path, window in self._ladder(scope):
            try:
                fd = open_trigger(path, self.line, self.stall_us, window)
            except FileNotFoundError:
                if scope.tree != "system":
                    raise  # the cgroup is gone: nothing further down the ladder helps
                refused.append(f"{path}: missing")
                continue
            except OSError as exc:
                refused.append(f"{path} with a {window / 1e6:g} s window: {os.strerror(exc.errno or 0)}")
                continue
            watch = _PsiWatch(self, poller, scope, path, fd, window)
            try:
                # Edge-triggered: every trigger event wakes the fd's wait queue, so nothing is
                # lost, and epoll skips the re-poll a level-triggered entry gets after each
                # report.
                poller.register(fd, select.EPOLLPRI | select.EPOLLET, (watch, 0))
            except BaseException:
                os.close(fd)
                raise
            how = f"trigger {self.line} {self.stall_us / 1000:g} ms per {window / 1e6:g} s on {path}"
            if refused:
                log.info("%s: %s: %s (refused: %s)", self.name, scope, how, "; ".join(refused))
            elif window != self.window_us:
                log.info("%s: %s: %s (window rounded up: no CAP_SYS_RESOURCE)", self.name, scope, how)
            else:
                log.debug("%s: %s: %s", self.name, scope, how)
            return watch
        path = self._ladder(scope)[0][0]
        read_pressure(path)  # unreadable too: refuse the scope with that error
        log.warning(
            "%s: %s: polling %s every %g s (no trigger accepted: %s)",
            self.name, scope, path, self.poll_interval_s, "; ".join(refused),
        )
        return _PsiWatch(self, poller, scope, path, None, self.window_us)

    def still_holds(self, event: Event) -> bool:
        watch = self._watches.get(event.scope)
        return isinstance(watch, _PsiWatch) and watch.active
