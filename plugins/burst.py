"""``burst``: many young processes forked in quick succession by one long-lived parent
(principle 2: a burst is the overflow; the kernel of old sacrificed a child of the chosen
parent for this reason).

A *burst* is at least ``min_children`` candidates that share a parent, are each younger
than ``young_s`` (by default the memory history's window: their memory is part of what
filled the scope lately), and all started within ``span_s`` of each other, while the parent started
at least ``parent_lead_s`` before the oldest of them and has not grown by more than
``parent_growth_fraction`` of the scope over the memory history's window (a parent that is
itself growing is a cause of its own, and a service that has just started its workers is
not bursting).  Members score on the shared scale: the newest 1000, each older one a
little less (down to 900), so the newest dies first.

Killing one child of twenty frees a twentieth of the burst, so the plugin also names the
rest of the set through ``oomkit_group``: when a member is the victim, the engine kills the
whole burst, newest first, in that one decision (see the hook's contract).

Units (cgroups and process groups ranked whole) are neither members nor parents of a burst:
a unit's key process says nothing of when the unit began, and killing a unit already ends
every process in it.  A burst inside a cgroup unit is found once the engine looks inside it
(``[plugins.units] recursive``), where its processes are candidates of their own.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Annotated

import msgspec

from oomkit import Candidate, Config, Event, hookimpl
from oomkit.history import History
from oomkit.procfs import start_ticks
from oomkit.units import Duration
from oomkit.urgency import checkpointed

from ._scale import SCALE, ScopeTotal
from ._settings import Settings

__all__ = ["Burst", "BurstSettings"]


class BurstSettings(Settings, frozen=True):
    """``[plugins.burst]``."""

    min_children: Annotated[int, msgspec.Meta(ge=2, le=100_000)] = 5
    """Siblings it takes to make a burst."""
    young_s: Duration | None = None
    """A member started at most this long ago; None: ``[history] window_s``.  Processes
    started together long before the OOM (a job runner's batch) are not its overflow."""
    span_s: Duration = 10.0
    """All members started within this span of each other."""
    parent_lead_s: Duration = 3.0
    """The parent started at least this long before the oldest member."""
    parent_growth_fraction: Annotated[float, msgspec.Meta(ge=0.0, le=1.0)] = 0.05
    """The parent grew by at most this share of the scope over the history window."""


class Burst:
    """Finds bursts and scores their members; names the set for a whole-burst kill."""

    name = "burst"
    loop_safe = True
    """An urgent decision may call its sync hooks on the event loop: it only computes over the candidates it is given."""
    weight = 1.0
    """Default weight: a burst member outranks any grower but the fastest."""

    def __init__(self) -> None:
        self.settings = BurstSettings()
        self._proc = "/proc"
        self._total = ScopeTotal()

    @hookimpl
    def oomkit_configure(self, config: Config) -> None:
        self.settings = config.plugin_settings(self.name, BurstSettings)
        self._proc = config.paths.proc
        self._total.configure(config)

    def bursts(self, event: Event, candidates: Sequence[Candidate], history: History) -> list[list[Candidate]]:
        """Every burst among ``candidates``, each newest first."""
        s = self.settings
        now = time.monotonic_ns()
        young_ns = (s.young_s if s.young_s is not None else history.window_s) * 1e9
        by_parent: dict[int, list[tuple[int, Candidate]]] = {}
        for c in checkpointed(candidates):
            if c.is_unit:
                continue
            started = history.started_ns(c.start_ticks)
            if c.ppid > 1 and now - started <= young_ns:
                by_parent.setdefault(c.ppid, []).append((started, c))
        out: list[list[Candidate]] = []
        span = int(s.span_s * 1e9)
        for ppid, kids in by_parent.items():
            if len(kids) < s.min_children:
                continue
            kids.sort(key=lambda k: k[0])
            best: tuple[int, int] = (0, 0)  # densest run of starts within span: (first, end)
            first = 0
            for end in range(len(kids)):
                while kids[end][0] - kids[first][0] > span:
                    first += 1
                if end + 1 - first > best[1] - best[0]:
                    best = (first, end + 1)
            members = kids[best[0] : best[1]]
            if len(members) < s.min_children or not self._parent_fits(event, ppid, members[0][0], candidates, history):
                continue
            out.append([c for _, c in reversed(members)])
        return out

    def _parent_fits(
        self, event: Event, ppid: int, oldest_ns: int, candidates: Sequence[Candidate], history: History
    ) -> bool:
        parent = next((c for c in candidates if c.pid == ppid and not c.is_unit), None)
        ticks = parent.start_ticks if parent is not None else start_ticks(self._proc, ppid)
        if ticks is None:
            return False  # the parent is gone: these are orphans, not a running burst
        if oldest_ns - history.started_ns(ticks) < self.settings.parent_lead_s * 1e9:
            return False
        if parent is None:
            return True
        samples = history.of(parent)
        if samples is None or not samples.rss_bytes:
            return True  # nothing says it grows; the ages alone make the burst
        grown = parent.rss_bytes - min(samples.rss_bytes)
        return grown <= self.settings.parent_growth_fraction * self._total(event, history)

    @hookimpl
    def oomkit_score(self, event: Event, candidates: Sequence[Candidate], history: History) -> dict[int, float]:
        out: dict[int, float] = {}
        for members in self.bursts(event, candidates, history):
            n = len(members)
            for i, c in enumerate(members):
                out[c.pid] = SCALE * (1 - 0.1 * i / max(1, n - 1))
        return out

    @hookimpl
    def oomkit_group(
        self, event: Event, victim: Candidate, candidates: Sequence[Candidate], history: History
    ) -> list[int] | None:
        for members in self.bursts(event, candidates, history):
            pids = [c.pid for c in members]
            if victim.pid in pids:
                return [p for p in pids if p != victim.pid]
        return None
