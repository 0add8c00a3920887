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
    "HookContext",
    "KillResult",
    "Member",
    "Outcome",
    "PluginError",
    "Ranked",
    "Rescue",
    "RescueResult",
    "Scope",
    "Tier",
    "Tree",
    "Unit",
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


Unit = Literal["process", "cgroup", "process-group"]
"""What a candidate's kill ends: one process, every process of a cgroup (and below it), or
every process of a process group."""


class Member(msgspec.Struct, frozen=True, kw_only=True):
    """One process of a unit (a cgroup or a process group), as read when it was offered."""

    pid: int
    name: str = ""
    start_ticks: int = 0
    oom_score_adj: int = 0
    kthread: bool = False
    rss_bytes: int = 0


class Candidate(msgspec.Struct, frozen=True, kw_only=True):
    """A process, or a unit of processes, that may be killed to resolve an event.

    Sizes are what the kernel's own badness formula uses: resident memory (anon + file +
    shmem), swap entries and page tables; the split of the resident part says what a kill
    would really free (shared memory and page cache stay behind).

    A *unit* (``unit`` other than ``"process"``) stands for all its ``members``: its sizes
    are their sums, so every scorer ranks it as a whole; ``pid`` is then the unit's key, the
    pid of one member (its largest), by which scores, tiers and vetoes name it.  A unit's
    members are offered by no one else: the engine drops process candidates whose pid a
    unit already covers.
    """

    pid: int
    """Process id (the thread-group leader)."""
    name: str
    """The kernel's ``comm``: the executable's name cut to 15 characters, or whatever the
    process set with ``prctl(PR_SET_NAME)``; not the command line."""
    ppid: int = 0
    """Parent's pid at the time the candidate was read."""
    uid: int = 0
    """Real user id."""
    rss_bytes: int = 0
    """Resident memory, ``VmRSS`` of ``status``: ``rss_anon + rss_file + rss_shmem``."""
    swap_bytes: int = 0
    """Swapped-out private memory, ``VmSwap``."""
    pgtables_bytes: int = 0
    """Page tables, ``VmPTE``."""
    oom_score_adj: int = 0
    """-1000 (never kill) to 1000 (kill first), as the process or its owner declared."""
    start_ticks: int
    """Field 22 of ``/proc/PID/stat``, clock ticks since boot; a killer compares it again
    after opening a pidfd so that it never kills a reused pid.  Required: without it no
    killer could tell this process from another one given its pid later."""
    cgroup: str = ""
    """Its memory cgroup's path (v1 memcg, or v2), relative to the mount."""
    kthread: bool = False
    """A kernel thread (never a victim: it frees nothing)."""
    cmdline: tuple[str, ...] | None = None
    """The argument vector when a candidates plugin read it (first-party ones never do:
    reading it takes the target's mmap lock), else None."""
    rss_anon_bytes: int | None = None
    """Private anonymous resident memory, ``RssAnon``: what a kill frees (None: unknown)."""
    rss_file_bytes: int | None = None
    """Resident file-backed pages, ``RssFile``: page cache, which a kill leaves behind."""
    rss_shmem_bytes: int | None = None
    """Resident shared memory (shmem, memfd, ``MAP_SHARED|MAP_ANONYMOUS``), ``RssShmem``:
    freed only when its last user goes."""
    unit: Unit = "process"
    """``process`` (the default), ``cgroup`` (every process of the cgroup ``cgroup`` and of
    the cgroups below it) or ``process-group`` (the processes of one process group)."""
    members: tuple[Member, ...] = ()
    """A unit's processes, the key ``pid`` among them; empty for a process."""
    pgid: int = 0
    """The process group (0: not read); a ``process-group`` unit's group."""
    descend: bool = False
    """A ``cgroup`` unit to look inside once chosen: the engine ranks its child cgroups and
    processes in turn and kills the winner there (``[plugins.units] recursive``)."""

    @property
    def is_unit(self) -> bool:
        return self.unit != "process"

    def describe(self) -> str:
        """``pid 42 (hog)``, ``cgroup /jobs/a (3 processes)``: for messages."""
        if self.unit == "cgroup":
            return f"cgroup {self.cgroup} ({len(self.members)} processes)"
        if self.unit == "process-group":
            return f"process group {self.pgid} ({len(self.members)} processes)"
        return f"pid {self.pid} ({self.name})"


class HookContext(msgspec.Struct, frozen=True, kw_only=True):
    """What a per-event hook is being called for: its ``context`` argument."""

    preview: bool = False
    """A ranking nobody acts on (``oomkit top``, :meth:`oomkit.Engine.rank`): a plugin that
    keeps state "since the previous decision" must not count it."""
    decision_id: int = 0
    """The id the decision will carry (0 for a preview)."""
    dry_run: bool = False
    """The engine runs in dry-run: the decision is real, the kill will not be."""
    descent: tuple[str, ...] = ()
    """The cgroup units chosen so far on the way down (``Candidate.descend``): when not
    empty, the event's scope is the last of them, ranked inside."""


PREVIEW = HookContext(preview=True)


class Veto(msgspec.Struct, frozen=True):
    """A plugin's refusal to let one candidate be killed."""

    plugin: str
    reason: str


Tier = Literal["expendable", "normal", "critical"]
"""Where a candidate ranks before any score: see the ranking in :mod:`oomkit.hookspecs`."""


class Ranked(msgspec.Struct, frozen=True, gc=False):
    """One candidate with its tier, weighted total, each scorer's raw score and any vetoes."""

    # gc=False: a system-scope ranking makes ten thousand of these, and the cyclic collector
    # would walk every one of them, holding the GIL (oomkit.urgency); none can be part of a
    # cycle (a Candidate, numbers, strings and tuples of Vetoes hold nothing that refers back).

    candidate: Candidate
    score: float
    scores: dict[str, float]
    vetoes: tuple[Veto, ...] = ()
    tier: Tier = "normal"
    tier_reason: str = ""
    """Which plugin put it in its tier, and why (empty for the normal tier)."""

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
    "rescued",  # a rescuer ended the condition before the kill: nobody died
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
    pids: tuple[int, ...] = ()
    """Every pid a killing signal was sent to (one for a process; each member of a unit)."""
    spared: tuple[int, ...] = ()
    """Members of a unit left alive because the core protects them (:mod:`oomkit.safety`)."""


RescueResult = Literal["freed", "nothing", "failed"]
"""What a rescuer says it did: freed memory, found nothing to free, or failed."""


class Rescue(msgspec.Struct, frozen=True, kw_only=True):
    """One rescue attempt before a kill (``oomkit_rescue``), as the decision records it."""

    plugin: str
    result: Literal["freed", "nothing", "failed", "timeout", "error"]
    """The rescuer's own word, or the engine's: ``timeout`` (its deadline passed), ``error``
    (it raised or returned something malformed)."""
    freed_bytes: int = 0
    """What the rescuer says it freed (0: unknown or nothing)."""
    detail: str = ""
    cleared: bool = False
    """The source's re-check after this attempt found the condition gone: the kill is off."""
    elapsed_ns: int = 0


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
    """The best ``[engine] record_ranking`` of the candidates ranked, best first."""
    ranked: int = 0
    """How many candidates were ranked in all (``ranking`` may keep fewer)."""
    victim: Candidate | None = None
    action: str = "none"
    outcome: Outcome
    detail: str = ""
    dry_run: bool = False
    kill: KillResult | None = None
    group: tuple[Candidate, ...] = ()
    """Candidates killed together with the victim, in order (``oomkit_group``)."""
    group_kills: tuple[KillResult, ...] = ()
    """What each kill of ``group`` did, aligned with it (empty in dry-run)."""
    descended: tuple[Candidate, ...] = ()
    """The cgroup units chosen on the way down to the victim (``Candidate.descend``), top
    first; ``ranking`` is then the ranking inside the last of them."""
    rescues: tuple[Rescue, ...] = ()
    """Every rescue attempt before the kill, in order (``oomkit_rescue``)."""
    killed: tuple[int, ...] = ()
    """Every pid a killing signal was sent to in this decision: the victim's (all of a
    unit's members) and each group member's."""
    killer: str = ""
    """The plugin whose ``oomkit_kill`` acted on the victim ("" when none was reached)."""
    policy: str = "default"
    """The ``[engine] policy`` that ranked this decision."""
    weights: dict[str, float] = msgspec.field(default_factory=dict)
    """Each scorer's weight in this decision, so ``oomkit explain`` can show every sum."""
    tiebreak: str = ""
    """The scorer that broke ties of the weighted sum (``[engine] tiebreak``)."""
    stage_ns: dict[str, int] = msgspec.field(default_factory=dict)
    errors: tuple[PluginError, ...] = ()
    monotonic_ns: int = msgspec.field(default_factory=_mono_ns)
    wall_time: float = msgspec.field(default_factory=_wall)


_encoder = msgspec.json.Encoder()


def to_json(obj: msgspec.Struct) -> bytes:
    """Encode an event, decision or any other oomkit struct as one JSON line (no newline)."""
    return _encoder.encode(obj)
