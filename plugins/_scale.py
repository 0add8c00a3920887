"""The score scale the first-party scorers share: 1000 is "all the memory the scope may use".

That is the kernel's ``oom_score`` scale (see :mod:`oomkit.hookspecs`), so a scorer's number
reads the same whatever the scope's size: a process that grew by a tenth of its memcg's
limit scores 100 in ``growth``; one whose kill frees a quarter of it scores 250 in ``freed``.
"""

from __future__ import annotations

from oomkit import Config, Event
from oomkit.cgroupfs import Mounts, mounts_for, scope_dir
from oomkit.history import History
from oomkit.procfs import read_meminfo, read_small

SCALE = 1000.0


class ScopeTotal:
    """What an event's scope may use, in bytes: the memcg's limit (capped by RAM, as the
    kernel caps it), or the machine's RAM for the system scope and an unlimited cgroup."""

    def __init__(self) -> None:
        self._proc = "/proc"
        self._mounts: Mounts | None = None
        self._ram = 0

    def configure(self, config: Config) -> None:
        self._proc = config.paths.proc
        self._mounts = mounts_for(config.paths)
        self._ram = 0

    def ram(self) -> int:
        # Read once: MemTotal moves only with memory hotplug, and this is on the OOM path.
        if not self._ram:
            try:
                self._ram = read_meminfo(self._proc, ("MemTotal",)).get("MemTotal", 0)
            except (OSError, ValueError):
                return 0
        return self._ram

    def __call__(self, event: Event, history: History | None = None) -> int:
        ram = self.ram()
        limit = int(event.values.get("limit_bytes", 0))  # a takeover OOM event carries it
        if not limit and history is not None:
            limit = history.limit_bytes(event.scope)
        if not limit and event.scope.tree != "system" and self._mounts is not None:
            try:
                d = scope_dir(self._mounts, event.scope)
                name = "memory.limit_in_bytes" if event.scope.tree == "v1" else "memory.max"
                text = read_small(d / name, 64).strip()
                limit = int(text) if text.isdigit() else 0
            except (OSError, LookupError, ValueError):
                limit = 0
        if limit and ram:
            limit = min(limit, ram)
        return max(1, limit or ram)
