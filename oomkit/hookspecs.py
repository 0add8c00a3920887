"""The hooks a plugin can implement, in the order oomkit calls them.

Every hook below is called by oomkit's own caller (:mod:`oomkit.hookcall`), not by pluggy's,
because pluggy never awaits and stops at the first exception.  What that means for you:

* Implementations run in pluggy's order: the one registered last runs first, ``tryfirst``
  and ``trylast`` move an implementation to the front or back.  Rely on those markers, never
  on registration order.
* Each implementation is isolated.  One that raises is logged, counted in the engine's stats,
  recorded in the decision's ``errors``, and the chain goes on; each hook below says what a
  raising implementation means for the outcome.
* Every result is checked before it is used (:mod:`oomkit.hookresults`): its type, its
  length, every number finite and in range.  A malformed result **counts as raising**, for
  that implementation alone; each hook below says what it must return.
* Failures are logged at most once a minute per plugin and hook, the next line saying how
  many were not; the stats and each decision's ``errors`` always count every one.
* Whatever the plugins say, the engine never kills pid 1, a kernel thread, oomkit itself or
  its ancestors, a process a source depends on (its watchdog), or a task with
  ``oom_score_adj == -1000`` (:mod:`oomkit.safety`).  These show in the ranking as vetoes by
  ``oomkit``, a name no plugin may take, and no config can switch them off.
* ``oomkit_rescue``, ``oomkit_kill`` and ``oomkit_notify`` must be ``async def``; every
  other hook must be a plain ``def``.  This is checked when a plugin is registered.  Async implementations run
  under a deadline (``engine.hook_timeout_s``, or ``engine.kill_timeout_s`` for kills);
  passing it counts as raising.
* An implementation may accept any subset of a hook's arguments, by name.
* The per-event hooks that run before the kill (candidates, score, tier, veto, group) also
  get ``context`` (:class:`oomkit.events.HookContext`): ``context.preview`` is true for a
  ranking nobody acts on (``oomkit top``, ``Engine.rank``), so a plugin that keeps state
  "since the previous decision" updates it on real decisions only.
* The sync hooks run in hook worker threads (:mod:`oomkit.hookthreads`).  A takeover's
  decision calls them on the event loop instead when every plugin implementing one of
  should_act, candidates, score, tier, veto and group has an attribute ``loop_safe`` that is
  ``True`` (``[engine] urgent_on_loop``): say so only if no call waits for anything longer
  than :data:`oomkit.urgency.LOOP_WAIT_MAX_S`.
* Hook wrappers are not supported: the caller would have to drive pluggy's generator
  protocol across awaits.  Use ``tryfirst`` and return ``None`` to look without deciding.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from .config import Config
    from .events import Candidate, Decision, Event, HookContext, KillResult
    from .history import History
    from .records import MemorySample
    from .safety import Guard
    from .sources.base import Source

hookspec = pluggy.HookspecMarker("oomkit")

# Which hooks must be coroutines.  Every other hook must be synchronous.
ASYNC_HOOKS = frozenset({"oomkit_rescue", "oomkit_kill", "oomkit_notify"})


# --- set-up: once per engine ----------------------------------------------------------------


@hookspec
def oomkit_configure(config: Config) -> None:
    """Read this plugin's settings; called once, before any event.

    Decode your own ``[plugins.<name>]`` table with
    ``config.plugin_settings("<name>", YourStruct)``: it raises :class:`oomkit.ConfigError`
    naming the file and key path.  A section that no loaded plugin claims is an error, so a
    typo in an operator's file is caught at start-up.

    Raising here refuses to start the engine (a plugin that cannot configure itself must not
    run half-configured).
    """


@hookspec
def oomkit_sources(config: Config) -> Sequence[Source] | None:
    """Return extra event sources to run beside the ones the ``[[sources]]`` config builds.

    Every item must be a :class:`~oomkit.Source`.  Raising refuses to start the engine, and
    so does a malformed result, with a message naming the plugin.
    """


# --- per event ------------------------------------------------------------------------------


@hookspec(firstresult=True)
def oomkit_should_act(event: Event) -> bool | None:
    """Decide whether ``event`` should lead to a decision; stops at the first non-None result.

    Called for every event, before coalescing, so a plugin can keep state over time
    (duration, hysteresis).  Keep it cheap: during a pressure storm it runs thousands of
    times a second.  Return ``True``, ``False`` or ``None`` ("no opinion"); anything else (an
    int, a numpy bool) is malformed.  When every implementation returns ``None`` the engine
    acts on ``oom`` and ``low-memory`` events and only reports ``kernel-kill`` events.  A
    raising implementation, or a malformed result, counts as ``None``: the next one is asked.
    """


@hookspec
def oomkit_candidates(event: Event, context: HookContext) -> Iterable[Candidate] | None:
    """Return who may be killed to resolve ``event``; every implementation's list is joined.

    Return any iterable (a list, a generator) of :class:`~oomkit.Candidate`, each with its
    fields of their declared types: ``pid`` an int in 1..4194304 (``PID_MAX_LIMIT``);
    ``ppid``, ``uid``, the sizes and ``start_ticks`` non-negative ints; ``oom_score_adj`` an
    int in -1000..1000; ``kthread`` a bool; ``name`` and ``cgroup`` str; ``cmdline`` None or
    a tuple of str.  At most 4194304 candidates per implementation.  A pid offered twice is
    kept once (the first implementation to run wins).

    Read only cheap files here (``stat``, ``status``, ``oom_score_adj``); ``cmdline`` and
    ``environ`` take the target's mmap lock and can stall on a process that is itself in
    trouble.  Your facts rank the candidates, but they are not trusted for the kill: right
    before it, the engine re-reads the victim's ``stat``, ``status`` and ``oom_score_adj``
    itself (:mod:`oomkit.safety`).

    A raising implementation contributes nobody; so does one whose result is malformed, or
    whose iterator raises midway: not even the candidates it yielded before.

    With ``[engine] warm_up`` (the default) the engine calls this once per watched scope as
    it starts, with ``context.preview`` true and a ``low-memory`` event from source
    ``engine``: an implementation that keeps what it read makes the first real decision as
    cheap as the later ones.  A long read here may park at checkpoints (:mod:`oomkit.urgency`)
    while a takeover is decided; a lock it holds meanwhile is one the takeover may need.
    """


@hookspec
def oomkit_score(
    event: Event, candidates: Sequence[Candidate], history: History, context: HookContext
) -> Sequence[float] | Mapping[int, float] | None:
    """Score every candidate at once; every implementation is called.

    ``history`` is the engine's memory history (:class:`oomkit.history.History`): each
    candidate's resident size over the last ``[history] window_s``, sampled before the event
    (at a takeover OOM the tasks are already paused, so growth cannot be measured then).
    ``history.of(candidate, tree=event.scope.tree)`` returns its
    :class:`~oomkit.history.Samples`, or None when it was never sampled; for a unit (a cgroup
    or process group ranked whole) they are the sum of its processes' over time.
    ``history.started_of(candidate)`` says when it started on the monotonic clock (a unit:
    its oldest member).  Take the argument only if you need it.

    Return either a sequence of numbers aligned with ``candidates`` (a list, a tuple, an
    array: exactly one per candidate), or a mapping from pid to score whose keys are pids of
    ``candidates`` (pids left out score 0).  Negative scores are legal (a preference against
    a candidate).  Every score must be a real number (an int, a float, numpy's too; a bool
    is not a number), finite, and within ±1e9, so that a weighted sum never overflows; the
    engine rejects, never clamps, a score beyond that (clamping would let a broken scorer
    quietly dominate the ranking).

    **The score scale** is the kernel's ``oom_score``: 1000 means "all the memory the scope
    may use" (its limit, or the machine's RAM).  Scorers that measure memory use it as a
    share of that (``freed``: 250 = a kill frees a quarter of the limit; ``growth``: 100 =
    grew by a tenth of it over the history window); scorers of evidence give 1000 for "yes"
    (``trigger``, ``burst``); ``preference`` gives ``oom_score_adj`` itself.  The engine
    multiplies each plugin's scores by its weight (``[weights]``; absent, the plugin's own
    ``weight`` attribute; absent too, 1.0) and sums them within each tier.

    **The ranking**, in order (``[engine] policy = "default"``):

    1. the core's safety and every ``oomkit_veto``: never the victim, whatever follows;
    2. the ``expendable`` tier (``oomkit_tier``: operator- or self-declared) before anyone;
    3. everyone else, by the weighted sum, highest first;
    4. the ``critical`` tier only when nobody above is left;
    5. ties broken by the raw score of ``[engine] tiebreak`` (the kernel's formula,
       ``kernel_badness``, whose default weight is 0: it decides only ties), then by the
       larger RSS and the lower pid, so the order is total.

    ``policy = "kernel"`` reproduces the kernel's own choice: tiers and groups are ignored and
    the tiebreak scorer alone ranks (weight 1, every other weight 0).

    A raising implementation is skipped for this decision, and so is one whose result is
    malformed (one bad score, a wrong length, a key that is not a candidate's pid): its other
    scores are not used either.
    """


@hookspec
def oomkit_tier(
    event: Event, candidates: Sequence[Candidate], history: History, context: HookContext
) -> Mapping[int, tuple[str, str]] | None:
    """Put candidates in a tier; every implementation is called.

    Return a mapping from pid to ``(tier, reason)``, ``tier`` being ``"expendable"`` (chosen
    before anyone else: the operator or the process itself declared it) or ``"critical"``
    (chosen only when no other candidate is left).  Candidates left out are in the normal
    tier.  "Never while another candidate exists" cannot be a weight, which is why this is
    a hook of its own.  When plugins disagree, ``critical`` wins.  Ignored under
    ``[engine] policy = "kernel"``.  A raising implementation tiers nobody.
    """


@hookspec
def oomkit_group(
    event: Event, victim: Candidate, candidates: Sequence[Candidate], history: History, context: HookContext
) -> Sequence[int] | None:
    """Name the candidates that must die together with ``victim``; every implementation is
    called once the victim is chosen.  ``candidates`` are everyone ranked, in the order the
    score and veto hooks got them, not in rank order (putting ten thousand in order is work
    no group needs: a burst is found by parent and start time).

    Return pids, in the order they should die after the victim (a fork burst: the rest of
    the burst, newest first).  The engine kills the victim and then each of them, every one
    through ``oomkit_kill``, in this one decision (``Decision.group`` lists them and
    ``Decision.group_kills`` what each kill did), so a burst of twenty is one decision rather
    than twenty a cooldown apart.  Pids that are not candidates, are vetoed, or are the
    victim itself are dropped; at most ``[engine] max_group`` are kept, over all
    implementations, in the order they were named.  Ignored under ``policy = "kernel"``.  A
    raising implementation adds nobody.
    """


@hookspec
def oomkit_veto(event: Event, candidates: Sequence[Candidate], context: HookContext) -> Mapping[int, str] | None:
    """Protect candidates from being killed; every implementation is called.

    Return a mapping from pid (an int) to the reason it must not be killed (a str, cut to
    240 characters).  Pids that are not among ``candidates`` are ignored.  A vetoed candidate
    stays in the ranking (so ``oomkit top`` shows why) but is never the victim.  The core's
    own protections come first, as vetoes by ``oomkit``; a plugin can add vetoes, never lift
    one.

    A raising implementation protects every candidate it was asked about: a veto that could
    not judge must not let a protected process die.  So does a malformed result (not a
    mapping, or a key that is not an int: it cannot be told whom it meant).  A reason that
    is not a str still protects its pid, shown as its ``str()``, and is recorded as an error.
    """


@hookspec
async def oomkit_rescue(
    event: Event, victim: Candidate, candidates: Sequence[Candidate], context: HookContext
) -> str | tuple[str, int] | tuple[str, int, str] | None:
    """Try to end the condition behind ``event`` without a death, before ``victim`` is killed.

    Called once the victim is chosen and re-verified, in call order, one implementation at a
    time, each under ``[engine] rescue_timeout_s`` and all of them within
    ``rescue_budget_s``.  After each attempt that did not decline the engine asks the source
    again whether its condition still holds (``Source.still_holds``: a paused v1 memcg is
    still under OOM, a braked v2 cgroup still at ``memory.high``, MemAvailable still low);
    once it no longer does, the decision ends as ``rescued`` and nobody is killed.  If it
    still holds after the last rescuer, or the budget is spent, the kill goes ahead.  Every
    attempt is recorded in ``Decision.rescues``.  Not called in dry-run (a rescue changes the
    machine as a kill does) nor under ``policy = "kernel"``.

    ``victim`` is who dies if the rescue fails (a rescuer may page out its memory);
    ``candidates`` are everyone ranked, in the order the score and veto hooks got them (not
    in rank order, as for ``oomkit_group``).  Return ``None`` to decline (not for this scope: no
    attempt is recorded and the condition is not re-checked), or one of ``"freed"``,
    ``"nothing"`` (tried, found nothing to free), ``"failed"``, alone or as a tuple with the
    bytes freed (an int in 0..2**62, 0 if unknown) and a detail (a str, cut to 240
    characters).  What you return is recorded; whether the kill is off is decided by the
    re-check, never by your word.

    A raising, malformed or timed-out implementation is recorded as ``error`` or ``timeout``
    and the next one is tried: a rescuer that hangs costs its deadline, then the kill.
    """


@hookspec(firstresult=True)
async def oomkit_kill(event: Event, victim: Candidate, guard: Guard) -> KillResult | None:
    """Kill ``victim``; stops at the first implementation that returns a result.

    Return a :class:`~oomkit.KillResult` whose ``outcome`` is ``killed``, ``exited`` or
    ``failed`` (its ``action`` and ``detail`` are cut to 240 characters), or ``None`` to
    decline (another killer may claim the victim).  Never called in dry-run mode: the engine
    records what it would have killed instead.  Runs under ``engine.kill_timeout_s``.

    Before the first killer is called the engine has re-verified ``victim`` in ``/proc`` (pid
    1, kernel thread, oomkit and its ancestors by pid and start time, sources' watchdogs,
    ``oom_score_adj``, and that the pid is a process, not a thread): one that fails is vetoed
    by ``oomkit`` and the next candidate is tried; one that is gone, or whose pid now has
    another start time, ends the decision as ``exited``.  The pid can still be reused
    between that check and your signal: compare ``start_ticks`` after opening a pidfd, as the
    built-in ``killer`` does.

    A unit (``victim.unit`` is ``cgroup`` or ``process-group``) is re-verified member by
    member: a unit whose members are all gone ends as ``exited``, one whose remaining
    members are all protected is vetoed; otherwise it is yours, protected members and all.
    ``guard`` is the core's check (:class:`oomkit.safety.Guard`): ask ``guard.check(pid)``
    before signalling any pid you found yourself (a unit's members as they are now, forks
    included), and kill a unit whole (``cgroup.kill``, a signal to a process group) only
    when every one of its pids passes; list every pid you signalled in
    ``KillResult.pids`` and the protected ones you left alive in ``spared``.  A killer that
    kills one process may ignore ``guard``: the engine has checked the victim.

    A raising or timed-out implementation counts as declining, and so does a malformed
    result (not a ``KillResult``, another outcome): the next killer is tried.
    """


@hookspec
async def oomkit_notify(event: Event, decision: Decision) -> None:
    """Report a decision; every implementation is called, off the kill path.

    Decisions are queued (``engine.notify_queue``) and delivered by a task of their own, so
    a slow notifier never delays a kill; when the queue is full the newest decision is
    dropped and counted.  Also called with ``outcome="observed"`` for ``kernel-kill``
    events, so notifiers report what the kernel did too.  A raising or timed-out
    implementation is logged and counted.
    """


# --- beside events: the memory history's readings -------------------------------------------


@hookspec
def oomkit_memory_sample(sample: MemorySample) -> None:
    """Receive one reading of a scope's memory; every implementation is called.

    After each tick of the memory history (every ``[history] interval_s``), once for every
    scope it sampled on that tick: the scope's charge and limit, the tracked processes'
    resident total and the largest of them (:class:`oomkit.records.MemorySample`), all from
    the reads the sampler made anyway.  ``sample.warm`` says whether the scope is warm (near
    its limit, or named by an event lately); small cold scopes are sampled too.  Nothing is
    built while no plugin implements this hook, or while every plugin that does has an
    attribute ``memory_samples`` that is false (the ``jsonl`` notifier with
    ``sample_interval_s = 0``); it is read on every tick, so it may change at a reload.

    Called on the event loop, up to a few times a second per scope: do not block (no file or
    network I/O here: queue the work for a thread, as the ``jsonl`` notifier does) and bound
    what you keep.  A raising implementation is logged and counted; the others still get
    the sample.
    """
