"""``trigger``: the process that set the OOM off.

Two witnesses, each worth the full scale (1000) to the candidates it names:

* the pid an event names (``Event.pid``, with its start time when the source knows it: the
  shared page's producers say which process hit the wall);
* at a cgroup v1 takeover OOM, the tasks paused in the allocator: the kernel parks a task
  whose page fault met the limit in ``mem_cgroup_oom_synchronize`` (its ``/proc/PID/wchan``
  reads that name; checked on Linux 6.18), while the rest of the cgroup sleeps wherever it
  was.  Those are the ones whose allocations the OOM is about.  One small read per candidate
  (~3 to 11 us here, by load), only for ``oom`` events of v1 scopes, of the thread-group
  leader only (a multi-threaded process whose other thread faulted is not seen).

A unit (a cgroup or process group ranked whole) is named when any of its members is: the
event's pid, or a member paused in the allocator (read member by member until one is).

Which process allocated last is weak evidence on its own (several growers take turns hitting
the limit), so its default weight is low: it decides between otherwise equal candidates.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from oomkit import Candidate, Config, Event, hookimpl

from ._scale import SCALE
from ._settings import Settings

__all__ = ["Trigger", "TriggerSettings"]


class TriggerSettings(Settings, frozen=True):
    """``[plugins.trigger]``."""

    event_pid: bool = True
    """Score the pid the event names."""
    wchan: tuple[str, ...] = ("mem_cgroup_oom_synchronize",)
    """Kernel functions whose name in ``/proc/PID/wchan`` means "paused at the memcg limit";
    empty: do not read ``wchan``."""


class Trigger:
    """Scores the processes that triggered the event."""

    name = "trigger"
    loop_safe = True
    """An urgent decision may call its sync hooks on the event loop: it reads /proc files only."""
    weight = 0.1
    """Default weight: who allocated last decides only between otherwise close candidates."""

    def __init__(self) -> None:
        self.settings = TriggerSettings()
        self._proc = "/proc"
        self._wchan: frozenset[bytes] = frozenset()

    @hookimpl
    def oomkit_configure(self, config: Config) -> None:
        self.settings = config.plugin_settings(self.name, TriggerSettings)
        self._proc = config.paths.proc
        self._wchan = frozenset(w.encode() for w in self.settings.wchan)

    def paused(self, pid: int) -> bool:
        try:
            fd = os.open(f"{self._proc}/{pid}/wchan", os.O_RDONLY | os.O_CLOEXEC)
            try:
                return os.read(fd, 128).strip() in self._wchan
            finally:
                os.close(fd)
        except OSError:
            return False  # gone, or wchan hidden (kptr_restrict, another user's task)

    @hookimpl
    def oomkit_score(self, event: Event, candidates: Sequence[Candidate]) -> dict[int, float]:
        out: dict[int, float] = {}
        if self.settings.event_pid and event.pid is not None:
            for c in candidates:
                if any(pid == event.pid and event.pid_start_ticks in (None, start) for pid, start in _processes(c)):
                    out[c.pid] = SCALE
        if self._wchan and event.kind == "oom" and event.scope.tree == "v1":
            for c in candidates:
                if c.pid not in out and any(self.paused(pid) for pid, _ in _processes(c)):
                    out[c.pid] = SCALE
        return out


def _processes(c: Candidate) -> list[tuple[int, int]]:
    """(pid, start ticks) of the candidate's processes: a unit's members, or itself."""
    if c.is_unit:
        return [(m.pid, m.start_ticks) for m in c.members]
    return [(c.pid, c.start_ticks)]
