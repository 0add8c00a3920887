"""The data that flows through oomkit: scopes, events, candidates and decisions.

All of it is frozen ``msgspec.Struct``s, so a plugin cannot change what the next plugin sees,
and all of it encodes to JSON with :func:`to_json` (one line per object).  Frozen is shallow:
sequences are tuples; the ``values`` and ``scores`` mappings are plain dicts that plugins must
treat as read-only.

Units are in the field names (``_bytes``, ``_ns``, ``_pct``) so a JSON line reads without a
schema at hand.
"""

from __future__ import annotations

import time
from typing import Literal

import msgspec

__all__ = [
    "Candidate",
    "Decision",
    "Event",
    "EventKind",
    "KillResult",
    "Outcome",
    "PluginError",
    "Ranked",
    "Scope",
    "Tree",
    "Veto",
    "to_json",
]

Tree = Literal["system", "v1", "v2"]
"""Which hierarchy a scope lives in.  The same path string can exist in the v1 memory tree and
in the v2 tree at once on a hybrid machine, so a path alone never names a scope."""

EventKind = Literal[
    "oom",  # the scope is out of memory now (v1 takeover: its tasks are paused waiting for us)
    "low-memory",  # a threshold source says memory is low (meminfo, usage thresholds)
    "threshold",  # a usage threshold was crossed (either direction: see values)
    "pressure",  # pressure (PSI, v1 pressure_level) rose past a trigger
    "pressure-cleared",  # pressure fell back below a trigger
    "memory-events",  # v2 memory.events counters changed
    "kernel-kill",  # the kernel's own OOM killer killed something in the scope
]


class Scope(msgspec.Struct, frozen=True, order=True):
    """Where an event happened: a tree and a path inside it.

    ``path`` is relative to the tree's mount point (``/`` is the tree's root); for
    ``tree="system"`` it is always ``/``.
    """

    tree: Tree = "system"
    path: str = "/"

    def __str__(self) -> str:
        return "system" if self.tree == "system" else f"{self.tree}:{self.path}"


SYSTEM = Scope()


def _mono_ns() -> int:
    return time.monotonic_ns()


def _wall() -> float:
    return time.time()


class Event(msgspec.Struct, frozen=True, kw_only=True):
    """One signal from a source.

    ``values`` holds what the source measured, units in the keys (``mem_available_bytes``,
    ``some_avg10_pct``, ``oom_kill_delta``).  ``pid`` and ``pid_start_ticks`` name the task
    that triggered the event when the source knows it (the shared page does); the start time
    guards against a reused pid.  For a ``kernel-kill`` event they name the task the kernel
    killed, and ``comm`` its name (the kernel-page source knows both).
    """

    source: str
    kind: EventKind
    scope: Scope = SYSTEM
    pid: int | None = None
    pid_start_ticks: int | None = None
    comm: str | None = None
    values: dict[str, float] = msgspec.field(default_factory=dict)
    monotonic_ns: int = msgspec.field(default_factory=_mono_ns)
    wall_time: float = msgspec.field(default_factory=_wall)


class Candidate(msgspec.Struct, frozen=True, kw_only=True):
    """A process that may be killed to resolve an event.

    Sizes are what the kernel's own badness formula uses: resident memory (anon + file +
    shmem), swap entries and page tables.  ``start_ticks`` is field 22 of ``/proc/PID/stat``;
    a killer compares it again after opening a pidfd so that it never kills a reused pid.
    """

    pid: int
    name: str
    ppid: int = 0
    uid: int = 0
    rss_bytes: int = 0
    swap_bytes: int = 0
    pgtables_bytes: int = 0
    oom_score_adj: int = 0
    start_ticks: int = 0
    cgroup: str = ""
    kthread: bool = False
    cmdline: tuple[str, ...] | None = None


class Veto(msgspec.Struct, frozen=True):
    """A plugin's refusal to let one candidate be killed."""

    plugin: str
    reason: str


class Ranked(msgspec.Struct, frozen=True):
    """One candidate with its weighted total, each scorer's raw score and any vetoes."""

    candidate: Candidate
    score: float
    scores: dict[str, float]
    vetoes: tuple[Veto, ...] = ()

    @property
    def vetoed(self) -> bool:
        return bool(self.vetoes)


Outcome = Literal[
    "killed",  # the victim is dead (reaped, or at least SIGKILLed and gone)
    "exited",  # the victim was gone before the kill landed (ESRCH, or its pid was reused)
    "failed",  # every killer declined or failed
    "dry-run",  # dry-run: everything ran, no signal was sent
    "no-candidates",  # nobody to kill in the scope
    "all-vetoed",  # every candidate was protected
    "condition-cleared",  # the re-check right before killing found the condition gone
    "observed",  # an event that is reported, not acted on (kernel kills)
]


class KillResult(msgspec.Struct, frozen=True, kw_only=True):
    """What a killer did.  Times are ``time.monotonic_ns()`` readings, 0 when not reached."""

    action: str
    outcome: Outcome
    detail: str = ""
    signals: tuple[str, ...] = ()
    sent_ns: int = 0
    dead_ns: int = 0
    memory_released: bool = False


class PluginError(msgspec.Struct, frozen=True):
    """A plugin that raised or timed out; the chain went on without it."""

    plugin: str
    hook: str
    error: str


class Decision(msgspec.Struct, frozen=True, kw_only=True):
    """Everything oomkit did about one event, in the order it did it.

    ``stage_ns`` holds how long each stage took (``candidates``, ``score``, ``veto``,
    ``recheck``, ``kill``) and ``queued`` (event time to the start of the decision).
    """

    id: int
    event: Event
    ranking: tuple[Ranked, ...] = ()
    victim: Candidate | None = None
    action: str = "none"
    outcome: Outcome
    detail: str = ""
    dry_run: bool = False
    kill: KillResult | None = None
    stage_ns: dict[str, int] = msgspec.field(default_factory=dict)
    errors: tuple[PluginError, ...] = ()
    monotonic_ns: int = msgspec.field(default_factory=_mono_ns)
    wall_time: float = msgspec.field(default_factory=_wall)


_encoder = msgspec.json.Encoder()


def to_json(obj: msgspec.Struct) -> bytes:
    """Encode an event, decision or any other oomkit struct as one JSON line (no newline)."""
    return _encoder.encode(obj)
