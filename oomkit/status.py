"""What a running engine says about itself: frozen snapshots, never its live state.

:meth:`Engine.snapshot() <oomkit.Engine.snapshot>` builds an :class:`EngineStatus` on the
event loop in one go (no await in between, so it is consistent); each source contributes a
:class:`SourceStatus` through :meth:`Source.status() <oomkit.Source.status>`.  The control
socket sends them as JSON (``oomkit status``), the metrics exporter turns them into
Prometheus samples, sd_notify's STATUS= line is a summary of one.  Being frozen structs of
tuples, a snapshot can be handed to another thread or kept while the engine moves on.
"""

from __future__ import annotations

from typing import Literal

import msgspec

from .events import Decision, Scope

__all__ = [
    "Counters",
    "DecisionBrief",
    "EngineStatus",
    "EventCount",
    "PluginErrorCount",
    "ScopeState",
    "ScopeStatus",
    "SourceStatus",
    "WatchdogStatus",
    "brief",
]

ScopeState = Literal[
    "taken-over",  # v1: oom_kill_disable=1 set by us; oomkit decides this memcg's OOMs
    "handed-back",  # v1: an OOM outlived its deadline; the kernel decides until it ends
    "braked",  # v2: memory.high set under memory.max by us; allocators are throttled
    "observed",  # watched only; nothing changed in the kernel
    "missing",  # the configured cgroup does not exist (now); waited for
]


class ScopeStatus(msgspec.Struct, frozen=True, kw_only=True):
    """One cgroup a source watches, and what it has changed there."""

    scope: Scope
    state: ScopeState
    detail: str = ""


class WatchdogStatus(msgspec.Struct, frozen=True, kw_only=True):
    """A source's helper process that restores the kernel's settings if oomkit dies."""

    pid: int
    alive: bool
    detail: str = ""


class SourceStatus(msgspec.Struct, frozen=True, kw_only=True):
    """One source: its kind, the mode it ended up in, its scopes and its own counters.

    ``counters`` are monotonic counts since the source started, named in lower_snake_case
    (``lost``, ``rejected``, ``handbacks``); the metrics exporter publishes each as
    ``oomkit_source_<name>_total{source=...}``.
    """

    name: str
    kind: str
    mode: str = ""
    """How it watches (``takeover``, ``observe``, ``trigger``, ``poll``...); empty when it has one way."""
    scopes: tuple[ScopeStatus, ...] = ()
    counters: dict[str, int] = msgspec.field(default_factory=dict)
    watchdog: WatchdogStatus | None = None
    detail: str = ""


class Counters(msgspec.Struct, frozen=True, kw_only=True):
    """The engine's counters since it started (a reload keeps them)."""

    events: int = 0
    """Events received from every source."""
    ignored: int = 0
    """Events no decision was made for (``should_act`` said no, or not an acting kind)."""
    coalesced: int = 0
    """Events replaced by a newer one for the same scope while a decision ran."""
    cooled: int = 0
    """Events dropped during a scope's cooldown after a kill."""
    decisions: int = 0
    kills: int = 0
    """Decisions whose outcome was ``killed``."""
    notify_dropped: int = 0
    """Decisions that did not reach the notifiers (their queue was full)."""
    source_failures: int = 0
    plugin_errors: int = 0
    refused_at_recheck: int = 0
    """Victims the core refused when it re-read them in /proc right before the kill."""
    gone_at_recheck: int = 0
    """Victims gone at that re-read while the condition held: the next candidate died instead."""
    kills_unconfirmed: int = 0
    """Kills after which a process the killer said it signalled still ran ``[engine]
    kill_confirm_s`` later (a killer that only claims its kill, or a process stuck in the kernel)."""
    held_off: int = 0
    """Events dropped during a scope's hold-off after a decision that killed nobody."""
    hooks_abandoned: int = 0
    """Sync hook calls given up past ``[engine] sync_hook_timeout_s`` (each left a thread stuck)."""
    hooks_stuck: int = 0
    """Decisions or event batches that found every hook worker thread stuck."""
    urgent_on_loop: int = 0
    """Stretches of a takeover decision's sync hooks (candidates to veto, a descent, the
    group, a should_act batch) run on the event loop, not in a hook thread (``[engine]
    urgent_on_loop``, when every plugin with such a hook is ``loop_safe``)."""
    urgent_decisions: int = 0
    """Takeover decisions (and event batches holding one) run as urgent, in this process
    (:mod:`oomkit.urgency`: the switch interval lowered, other work parked)."""
    urgent_parks: int = 0
    """Times a thread working for another decision parked while an urgent one ran."""
    urgent_parked_s: float = 0.0
    """Seconds those threads spent parked, together."""
    urgent_realtime: int = 0
    """Times a thread was made real-time for a takeover's decision (``[engine]
    urgent_realtime_priority``)."""
    urgent_realtime_refused: int = 0
    """Times the kernel refused that (no ``CAP_SYS_NICE`` or ``RLIMIT_RTPRIO``); the
    decision went on at the ordinary priority."""


class EventCount(msgspec.Struct, frozen=True, array_like=True):
    source: str
    kind: str
    count: int


class PluginErrorCount(msgspec.Struct, frozen=True, array_like=True):
    plugin: str
    hook: str
    count: int


class DecisionBrief(msgspec.Struct, frozen=True, kw_only=True):
    """One decision in a line: what happened, to whom, how long it took."""

    id: int
    wall_time: float
    source: str
    kind: str
    scope: Scope
    outcome: str
    action: str = "none"
    victim_pid: int | None = None
    victim_name: str = ""
    victim_rss_bytes: int = 0
    detail: str = ""
    decide_ns: int = 0
    """From the start of the decision to its end (``queued`` not included)."""
    errors: int = 0
    dry_run: bool = False


def brief(d: Decision) -> DecisionBrief:
    v = d.victim
    return DecisionBrief(
        id=d.id,
        wall_time=d.wall_time,
        source=d.event.source,
        kind=d.event.kind,
        scope=d.event.scope,
        outcome=d.outcome,
        action=d.action,
        victim_pid=v.pid if v is not None else None,
        victim_name=v.name if v is not None else "",
        victim_rss_bytes=v.rss_bytes if v is not None else 0,
        detail=d.detail,
        decide_ns=sum(ns for stage, ns in d.stage_ns.items() if stage != "queued"),
        errors=len(d.errors),
        dry_run=d.dry_run,
    )


class EngineStatus(msgspec.Struct, frozen=True, kw_only=True):
    """Everything ``oomkit status`` shows, at one moment."""

    version: str
    pid: int
    started: float
    """Wall-clock time the engine started (seconds since the epoch)."""
    uptime_s: float
    dry_run: bool
    config: str
    """The file the running configuration came from."""
    generation: int
    """How many configurations this engine has run: 1, plus one per successful reload."""
    reload_failures: int
    last_reload_error: str
    queued: int
    """Events waiting for the dispatcher now."""
    queue_size: int
    deciding: tuple[Scope, ...]
    """Scopes with a decision running now."""
    health: str
    """Why the engine is not making progress, or empty (what the systemd watchdog hears)."""
    feeds: int
    """Decision feeds open (``events --follow`` clients, the metrics exporter)."""
    plugins: tuple[str, ...]
    sources: tuple[SourceStatus, ...]
    counters: Counters
    events: tuple[EventCount, ...]
    """Events received, by source and kind."""
    outcomes: dict[str, int]
    """Decisions by outcome."""
    plugin_errors: tuple[PluginErrorCount, ...]
    """Plugin failures (raised, timed out or returned a malformed result), by plugin and hook."""
    recent: tuple[DecisionBrief, ...]
    """The last decisions, oldest first."""

    @property
    def taken_over(self) -> tuple[ScopeStatus, ...]:
        return tuple(s for src in self.sources for s in src.scopes if s.state == "taken-over")

    @property
    def braked(self) -> tuple[ScopeStatus, ...]:
        return tuple(s for src in self.sources for s in src.scopes if s.state == "braked")
