"""The engine: sources in, one decision at a time per scope, kills and notifications out.

::

    sources ──► bounded stream ──► dispatcher ──► per-scope decision task ──► kill
                                    │ should_act   candidates → score → veto →
                                    │ coalesce     re-check → kill            └─► notify queue
                                    │ cooldown,                                  (own task)
                                    │ hold-off

The dispatcher never waits on a decision: while one runs for a scope, newer events for that
scope replace each other in a one-slot pending box (an ``oom`` is never replaced by a lesser
kind), and the newest runs when the current decision ends.  After a decision the scope cools
down (a kill: ``cooldown_s``) or is held off (anything else: ``holdoff_s``, doubling to
``holdoff_max_s``), ``oom`` events excepted.  So a storm of events for one cgroup costs one
decision at a time and a few decisions in all, and a slow decision in one cgroup never
delays another cgroup.

Sync hooks (``should_act``, candidates, score, tier, veto, group) run in hook worker threads
(:mod:`oomkit.hookthreads`), not on the loop: a plugin stuck in one is given up after
``sync_hook_timeout_s`` and skipped until it returns, and the loop stays free for the other
scopes, the sources and the signals.  A takeover's decision in a small scope (its last
ranking offered at most ``urgent_on_loop_max_candidates``) is the exception when every
plugin implementing those hooks says it is ``loop_safe`` (``[engine] urgent_on_loop``): its
hooks then run on the loop, with no hand-over to a thread and back, each of which waited for
the GIL behind the ranking in another thread.

An ``oom`` event (a takeover: the scope's tasks wait, paused) is *urgent* from the dispatcher
to the end of its decision (:mod:`oomkit.urgency`): the switch interval is lowered, the cyclic
collector is off, and hook threads working for other decisions park at their next checkpoint.
A big ranking's leftovers are freed by a reaper thread, a slice at a time
(:mod:`oomkit.reaper`), not on the loop.

Every plugin result is checked before use (:mod:`oomkit.hookresults`).  The re-check before
the kill is two: the core re-reads the victim in ``/proc`` (:mod:`oomkit.safety`; a victim
that fails is vetoed and the next one tried), then the source says whether its condition
still holds.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import operator
import os
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, asynccontextmanager, nullcontext
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self, TypeVar

import anyio
import anyio.lowlevel
import msgspec
import pluggy
from anyio.abc import TaskGroup, TaskStatus
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from . import procfs, urgency
from .config import Config, ConfigError, validate
from .errors import OomkitError, SourceError, describe
from .events import (
    PREVIEW,
    Candidate,
    Decision,
    Event,
    HookContext,
    KillResult,
    PluginError,
    Ranked,
    Rescue,
    Scope,
    Tier,
    Veto,
    to_json,
)
from .history import History
from .hookcall import Busy, Caller, ErrorLog, Report
from .hookthreads import HookThreads, HooksStuck, Job
from .reaper import Reaper
from .records import MemorySample
from .hookresults import (
    BadResult,
    Note,
    check_candidates,
    check_group,
    check_kill,
    check_rescue,
    check_scores,
    check_should_act,
    check_sources,
    check_tiers,
    check_vetoes,
)
from .ranking import Ranking
from .plugins import LoadReport, PluginLoadError, autoload_enabled, load_plugins, make_manager
from .safety import CORE, Guard, Safety
from .sources import Source, build_source, build_sources
from .status import Counters, EngineStatus, EventCount, PluginErrorCount, SourceStatus, brief

__all__ = ["DecisionFeed", "Engine", "EngineNotRunning", "ReloadError", "Stats"]

log = logging.getLogger("oomkit.engine")

# Kinds the engine acts on when no should_act plugin has an opinion.
_ACT_BY_DEFAULT = frozenset({"oom", "low-memory"})
_NORMAL: tuple[Tier, str] = ("normal", "")
_WARM_SCOPES = 64
"""Scopes ``[engine] warm_up`` reads at start, at most: as many as the first-party candidates
plugin keeps tables for (warming more would close the first ones)."""
MAX_DESCENT = 16
"""How many levels of cgroup units a decision looks inside at most (``Candidate.descend``)."""
MAX_GONE = 8
"""How many victims found gone at the re-check a decision passes over while its condition
still holds (a candidates plugin offering pids nobody has must not keep it going)."""
GONE_SETTLE_S = 0.25
"""How long a decision lets a victim that exited on its own end the condition before the
next candidate dies instead (the source is asked every ``GONE_POLL_S`` meanwhile): its pages
are uncharged as it exits, and the kernel takes a moment to clear the OOM (v1
``under_oom``) once the paused task's charge succeeds; on a loaded machine more than one.
Killing a second process that was not needed is worse than a quarter second of pause."""
GONE_POLL_S = 0.01
_MAX_CONFIRMING = 64
"""Kills checked at once (``kill_confirm_s``); more in a storm go unchecked, uncounted."""
_CONFIRM_POLL_S = 0.05
# Kinds that are reported to notifiers even though nothing is decided.
_REPORT_ONLY = frozenset({"kernel-kill"})
# Outcomes after which the scope cools down (`cooldown_s`); after a rescue (it freed memory
# without a kill) the next crossing is decided at once; every other one holds the scope off.
_RESOLVED = frozenset({"killed", "exited"})
_RESCUED = "rescued"
_SYNC_HOOKS = ("oomkit_should_act", "oomkit_candidates", "oomkit_score", "oomkit_tier", "oomkit_veto", "oomkit_group")
"""The sync hooks a decision calls: the ones ``[engine] urgent_on_loop`` asks ``loop_safe`` of."""
_SIZES_KEPT = 4096
"""Scopes whose last ranking's size the engine remembers (``urgent_on_loop_max_candidates``)."""
_BATCH = 256
"""At most this many queued events go through ``should_act`` in one worker job."""
_MAX_ERRORS = 64
"""A decision record lists at most this many plugin failures (all are counted)."""
_REAP_ABOVE = 1000
"""A ranking longer than this is freed by the reaper thread, not on the loop."""

T = TypeVar("T")


class EngineNotRunning(OomkitError, RuntimeError):
    """An operation that needs the engine's tasks was called outside ``async with``."""


class ReloadError(OomkitError):
    """A new configuration could not be put in place; the old one runs on (the message says why)."""


_BEHIND_S = 10.0
"""The dispatcher this far behind its sources (the event it took last is this old while
more wait) means the engine is not keeping up: the systemd watchdog stops being fed."""


class DecisionFeed:
    """Every decision published after it was opened (:meth:`Engine.decisions`), as it is
    published.  The engine never waits for a reader: when ``buffer`` decisions wait unread,
    newer ones are counted in :attr:`dropped` instead."""

    __slots__ = ("_send", "_recv", "dropped")

    def __init__(self, buffer: int) -> None:
        self._send, self._recv = anyio.create_memory_object_stream[Decision](buffer)
        self.dropped = 0

    def _offer(self, decision: Decision) -> None:
        try:
            self._send.send_nowait(decision)
        except anyio.WouldBlock:
            self.dropped += 1

    def _close(self) -> None:
        self._send.close()
        self._recv.close()

    def __aiter__(self) -> DecisionFeed:
        return self

    async def __anext__(self) -> Decision:
        try:
            return await self._recv.receive()
        except (anyio.EndOfStream, anyio.ClosedResourceError):
            raise StopAsyncIteration from None


@dataclass(slots=True)
class Stats:
    """Counters since the engine started (``Engine.stats`` is a copy taken when asked)."""

    events: int = 0
    ignored: int = 0
    coalesced: int = 0
    cooled: int = 0
    decisions: int = 0
    kills: int = 0
    notify_dropped: int = 0
    source_failures: int = 0
    plugin_errors: int = 0
    errors_by_plugin: dict[str, int] = field(default_factory=dict)
    refused_at_recheck: int = 0
    """Victims the core's re-verification in /proc refused right before the kill (a
    candidates plugin's facts were wrong, or the process changed since)."""
    gone_at_recheck: int = 0
    """Victims found gone at the re-verification while the condition still held: the next
    candidate was the victim instead."""
    kills_unconfirmed: int = 0
    """Kills a process the killer named outlived by ``kill_confirm_s``."""
    held_off: int = 0
    """Events dropped during a scope's hold-off after a decision that killed nobody."""
    hooks_abandoned: int = 0
    """Sync hook calls given up past ``sync_hook_timeout_s`` (each left a worker thread stuck)."""
    hooks_stuck: int = 0
    """Decisions or event batches that found every hook worker thread stuck."""
    urgent_on_loop: int = 0
    """Stretches of an urgent decision's sync hooks run on the loop (``[engine] urgent_on_loop``)."""
    warmed_up: int = 0
    """Scopes whose candidates ``[engine] warm_up`` offered once at start."""


class Engine:
    """Runs sources and the hook chain.  Use it as ``async with Engine(config) as engine``.

    It runs inside any anyio-compatible loop (asyncio, uvloop, trio).  Construction loads and
    configures plugins (raising :class:`~oomkit.plugins.PluginLoadError` or
    :class:`~oomkit.config.ConfigError`); entering starts the sources and returns once every
    one of them is armed; leaving cancels them and waits for their clean-up.

    ``plugins`` are extra plugin objects (or ``(name, object)`` pairs) registered after the
    entry-point group and the config's ``load`` list; ``sources`` are extra sources run
    beside the configured ones.  ``autoload=None`` follows ``OOMKIT_DISABLE_PLUGIN_AUTOLOAD``.
    """

    def __init__(
        self,
        config: Config | None = None,
        *,
        plugins: Iterable[Any] = (),
        sources: Iterable[Source] = (),
        autoload: bool | None = None,
        dry_run: bool | None = None,
    ) -> None:
        plugins, sources = list(plugins), list(sources)
        # What a reload builds the next generation of plugins from.
        self._construction = (plugins, autoload, dry_run)
        # A Config built in Python has not met the decoder's bounds yet.
        self.config = validate(config) if config is not None else Config()
        self.dry_run = self.config.engine.dry_run if dry_run is None else dry_run
        self._stats = Stats()
        self._recent: deque[tuple[Decision, int]] = deque()
        self._recent_bytes = 0
        self.pm: pluggy.PluginManager = make_manager()
        self._errlog = ErrorLog()
        self._busy_calls: Busy = {}
        self._caller = Caller(self.pm, self._count_error, self._errlog, self._busy_calls)
        self._safety = Safety(self.config.paths.proc)
        self.plugins: LoadReport = load_plugins(
            self.pm,
            autoload=autoload_enabled() if autoload is None else autoload,
            load=self.config.plugins.load,
            disable=self.config.plugins.disable,
            extra=plugins,
        )
        self._configure()
        self.sources: list[Source] = build_sources(self.config)
        self._configured: dict[str, Source] = {src.name: src for src in self.sources}
        for name, extra in self._caller_strict("oomkit_sources", config=self.config):
            try:
                self.sources.extend(check_sources(extra))
            except BadResult as exc:
                raise PluginLoadError(f"plugin {name!r}, hook oomkit_sources: {exc}") from None
        self.sources.extend(sources)
        self.history = History(self.config, self._watched_scopes, on_sample=self._sampled,
                               want_samples=self._wants_samples)
        """Recent per-process memory of the watched scopes, handed to scorers."""
        self._by_name: dict[str, Source] = {}
        for src in self.sources:
            if src.name in self._by_name:
                raise ConfigError(f"{self.config.origin}: two sources are named {src.name!r}")
            self._by_name[src.name] = src

        self._next_id = 0
        self._tg: TaskGroup | None = None
        self._events: MemoryObjectSendStream[Event] | None = None
        self._notify: MemoryObjectSendStream[Decision] | None = None
        self._busy: set[Scope] = set()
        self._pending: dict[Scope, Event] = {}
        self._cool_until: dict[Scope, int] = {}
        self._sizes: dict[Scope, int] = {}  # candidates at each scope's last ranking (urgent_on_loop)
        self._confirming = 0
        self._streak: dict[Scope, int] = {}  # decisions in a row that killed nobody
        self._hooks: HookThreads | None = None
        self._reaper = Reaper()
        self._notify_overflowing = False
        self._delivered = 0  # the newest decision id every notifier was handed
        self._weights: dict[str, float] = {}
        self._feeds: set[DecisionFeed] = set()
        self._events_by: dict[tuple[str, str], int] = {}
        self._outcomes: dict[str, int] = {}
        self._errors_by: dict[tuple[str, str], int] = {}
        self._source_scopes: dict[Source, tuple[anyio.CancelScope, anyio.Event]] = {}
        self._generation = 1
        self._reload_failures = 0
        self._last_reload_error = ""
        self._started_wall = 0.0
        self._started_ns = 0
        self._dispatching = False
        self._taken_ns = 0

    # --- set-up -----------------------------------------------------------------------------

    def _caller_strict(self, hook: str, **kwargs: Any) -> list[tuple[str, Any]]:
        """Set-up hooks: a raising plugin refuses to start the engine, naming itself."""
        out: list[tuple[str, Any]] = []
        for impl in reversed(getattr(self.pm.hook, hook).get_hookimpls()):
            try:
                res = impl.function(*[kwargs[a] for a in impl.argnames])
            except ConfigError:
                raise
            except Exception as exc:
                raise PluginLoadError(
                    f"plugin {impl.plugin_name!r}, hook {hook}: {type(exc).__name__}: {exc}"
                ) from exc
            if res is not None:
                out.append((impl.plugin_name, res))
        return out

    def _configure(self) -> None:
        cfg = self.config
        self._caller_strict("oomkit_configure", config=cfg)
        names = {name for name, _ in self.pm.list_name_plugin()}
        for section in cfg.plugins.settings:
            if section not in names:
                raise ConfigError(
                    f"{cfg.origin}: section [plugins.{section}] names no loaded plugin"
                    f" (loaded: {', '.join(sorted(names)) or 'none'}; disabled: "
                    f"{', '.join(self.plugins.disabled) or 'none'})"
                )
        scorers = {impl.plugin_name for impl in self.pm.hook.oomkit_score.get_hookimpls()}
        for name in cfg.weights:
            if name not in scorers:
                raise ConfigError(
                    f"{cfg.origin}: [weights] names {name!r}, which is not a loaded scorer"
                    f" (scorers: {', '.join(sorted(scorers)) or 'none'}) - at `$.weights.{name}`"
                )

    def _count_error(self, err: PluginError) -> None:
        key = (err.plugin, err.hook)
        self._errors_by[key] = self._errors_by.get(key, 0) + 1
        self._stats.plugin_errors += 1
        self._stats.errors_by_plugin[err.plugin] = self._stats.errors_by_plugin.get(err.plugin, 0) + 1

    def __repr__(self) -> str:
        queued = self._events.statistics().current_buffer_used if self._events else 0
        state = "running" if self._tg else "stopped"
        return (
            f"<Engine {state} sources={len(self.sources)} plugins={len(self.plugins.loaded)}"
            f" queued={queued}/{self.config.engine.queue_size} decisions={self._stats.decisions}"
            f"{' dry-run' if self.dry_run else ''}>"
        )

    # --- lifecycle ----------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        if self._tg is not None:
            raise RuntimeError("this engine is already running")
        tg = anyio.create_task_group()
        await tg.__aenter__()
        try:
            send, recv = anyio.create_memory_object_stream[Event](self.config.engine.queue_size)
            nsend, nrecv = anyio.create_memory_object_stream[Decision](
                self.config.engine.notify_queue_size
            )
            self._events, self._notify, self._tg = send, nsend, tg
            self._hooks = HookThreads(self.config.engine.hook_threads, self.config.engine.sync_hook_timeout_s)
            self._started_wall, self._started_ns = time.time(), time.monotonic_ns()
            tg.start_soon(self._dispatch, recv, tg)
            tg.start_soon(self._deliver, nrecv)
            tg.start_soon(self.history.run)
            for src in self.sources:
                await tg.start(self._run_source, src)
            if self.config.engine.warm_up:
                tg.start_soon(self._warm_up)
        except BaseException as exc:
            tg.cancel_scope.cancel()
            self._tg = None
            try:
                await tg.__aexit__(type(exc), exc, exc.__traceback__)
            except BaseException:
                # The group repeats the failure that start() already raised; the caller
                # (and `oomkit serve`'s one-line error) wants the source's own exception.
                pass
            finally:
                self._close_streams()
                self._close_hooks()
            raise
        log.info("engine ready: %s", self)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        tg, self._tg = self._tg, None
        assert tg is not None
        tg.cancel_scope.cancel()
        try:
            return await tg.__aexit__(exc_type, exc, tb)
        except BaseExceptionGroup as group:
            # A source that died is one error of ours: raise it as itself, so a caller can
            # `except oomkit.SourceError` and a daemon print one line.
            mine = _single(group)
            if mine is None:
                raise
            raise mine from None
        finally:
            self._close_streams()
            self._errlog.flush()
            self._close_hooks()

    def _close_hooks(self) -> None:
        self._reaper.close()
        hooks, self._hooks = self._hooks, None
        if hooks is None:
            return
        hooks.close()
        self._stats.hooks_abandoned += hooks.abandoned
        for plugin, hook, held in hooks.busy:
            log.warning("stopping while plugin %s, hook %s is still running after %.1f s (its thread is left"
                        " behind, not waited for)", plugin, hook, held)

    def _close_streams(self) -> None:
        for stream in (self._events, self._notify):
            if stream is not None:
                stream.close()
        self._events = self._notify = None
        for feed in self._feeds:
            feed._close()

    async def _run_source(self, src: Source, *, task_status: TaskStatus[None]) -> None:
        status = _StartedFlag(task_status)
        # A scope of its own, so a reload can stop this source alone and wait for its clean-up.
        scope, done = anyio.CancelScope(), anyio.Event()
        self._source_scopes[src] = (scope, done)
        try:
            with scope:
                await src.run(self.submit, task_status=status)
        except Exception as exc:
            if not status.started_yet:
                # Fails Engine.__aenter__ with one line naming the source.  oomkit's own
                # errors already say what is wrong; anything else gets the source's name.
                if isinstance(exc, OomkitError):
                    raise
                raise SourceError(f"source {src.name!r} could not start: {describe(exc)}") from exc
            self._stats.source_failures += 1
            what = f"source {src.name!r} failed and stopped: {describe(exc)}"
            if self.config.engine.on_source_failure == "exit":
                # A daemon that runs on without one of its sources looks healthy and is not.
                raise SourceError(f"{what}; stopping (set [engine] on_source_failure = \"continue\" to run on)") from exc
            log.error("%s; running on without it (on_source_failure = \"continue\")", what)
        else:
            if not status.started_yet:
                task_status.started()
        finally:
            self._source_scopes.pop(src, None)
            done.set()

    # --- what it is doing ---------------------------------------------------------------------

    @property
    def stats(self) -> Stats:
        """The counters now, as a copy: changing it changes nothing (:meth:`snapshot` has
        everything, frozen)."""
        return dataclasses.replace(self._stats, errors_by_plugin=dict(self._stats.errors_by_plugin),
                                   hooks_abandoned=self._abandoned())

    def _abandoned(self) -> int:
        return self._stats.hooks_abandoned + (self._hooks.abandoned if self._hooks is not None else 0)

    @property
    def recent(self) -> tuple[Decision, ...]:
        """The last decisions, oldest first (a copy): at most ``engine.recent_decisions``
        of them in at most ``engine.recent_bytes``."""
        return tuple(d for d, _ in self._recent)

    def recent_decisions(self) -> tuple[Decision, ...]:
        return self.recent

    def busy_calls(self) -> list[str]:
        """Plugin calls under way now, longest first: each async one, and each sync one in a
        hook worker thread, given up as stuck or not (``plugin.hook for N s``)."""
        now = time.monotonic_ns()
        calls = [(now - t, f"{p}.{h}") for p, h, t in list(self._busy_calls.values())]
        if self._hooks is not None:
            calls += [(int(held * 1e9), f"{p}.{h} (sync)") for p, h, held in self._hooks.busy]
        return [f"{what} for {ns / 1e9:.1f} s" for ns, what in sorted(calls, reverse=True)]

    @property
    def recent_bytes(self) -> int:
        """What the decisions kept in :attr:`recent` take, counted as their JSON."""
        return self._recent_bytes

    def _keep(self, decision: Decision) -> None:
        size = len(to_json(decision))
        self._recent.append((decision, size))
        self._recent_bytes += size
        self._trim_recent()

    def _trim_recent(self) -> None:
        engine = self.config.engine
        while len(self._recent) > 1 and (len(self._recent) > engine.recent_decisions
                                         or self._recent_bytes > engine.recent_bytes):
            _, size = self._recent.popleft()
            self._recent_bytes -= size

    def health(self) -> str:
        """Why the engine is not making progress, or ``""``: what feeds the systemd watchdog.

        A blocked event loop is not seen here (nothing here runs then); the caller being
        able to ask is that half of the answer."""
        if self._tg is None:
            return "not running"
        if not self._dispatching:
            return "the dispatcher has stopped"
        queued = self._events.statistics().current_buffer_used if self._events else 0
        behind = (time.monotonic_ns() - self._taken_ns) / 1e9
        if queued and self._taken_ns and behind > _BEHIND_S:
            return f"the dispatcher is {behind:.0f} s behind its sources ({queued} events waiting)"
        return ""

    def snapshot(self, recent: int = 10) -> EngineStatus:
        """Everything the engine can say about itself now, as one frozen struct.

        Built without an await, so it is consistent; each source adds its own
        :meth:`~oomkit.Source.status` (a failing one is shown by its error)."""
        urgent = urgency.stats()
        from . import __version__

        st = self._stats
        queued = self._events.statistics().current_buffer_used if self._events else 0
        return EngineStatus(
            version=__version__,
            pid=os.getpid(),
            started=self._started_wall,
            uptime_s=(time.monotonic_ns() - self._started_ns) / 1e9 if self._started_ns else 0.0,
            dry_run=self.dry_run,
            config=self.config.origin,
            generation=self._generation,
            reload_failures=self._reload_failures,
            last_reload_error=self._last_reload_error,
            queued=queued,
            queue_size=self.config.engine.queue_size,
            deciding=tuple(sorted(self._busy)),
            health=self.health(),
            feeds=len(self._feeds),
            plugins=tuple(self.plugins.loaded),
            sources=tuple(_source_status(src) for src in self.sources),
            counters=Counters(
                events=st.events, ignored=st.ignored, coalesced=st.coalesced, cooled=st.cooled,
                decisions=st.decisions, kills=st.kills, notify_dropped=st.notify_dropped,
                source_failures=st.source_failures, plugin_errors=st.plugin_errors,
                refused_at_recheck=st.refused_at_recheck, gone_at_recheck=st.gone_at_recheck,
                kills_unconfirmed=st.kills_unconfirmed, held_off=st.held_off,
                hooks_abandoned=self._abandoned(),
                hooks_stuck=st.hooks_stuck, urgent_on_loop=st.urgent_on_loop,
                urgent_decisions=urgent.decisions, urgent_parks=urgent.parks, urgent_parked_s=urgent.parked_s,
                urgent_realtime=urgent.realtime, urgent_realtime_refused=urgent.realtime_refused,
            ),
            events=tuple(EventCount(src, kind, n) for (src, kind), n in sorted(self._events_by.items())),
            outcomes=dict(sorted(self._outcomes.items())),
            plugin_errors=tuple(PluginErrorCount(p, h, n) for (p, h), n in sorted(self._errors_by.items())),
            recent=tuple(brief(d) for d in self.recent[-recent:]) if recent > 0 else (),
        )

    @asynccontextmanager
    async def decisions(self, buffer: int = 64) -> AsyncIterator[DecisionFeed]:
        """Follow decisions as they are published (``async with engine.decisions() as feed:
        async for d in feed``).  At most ``buffer`` wait unread; newer ones are dropped
        for this feed only and counted in ``feed.dropped``.  Ends when the engine stops."""
        if self._tg is None:
            raise EngineNotRunning("decisions() needs a running engine: use `async with Engine(...)`")
        feed = DecisionFeed(buffer)
        self._feeds.add(feed)
        try:
            yield feed
        finally:
            self._feeds.discard(feed)
            feed._close()

    # --- reload ---------------------------------------------------------------------------------

    async def reload(self, config: Config | Callable[[], Config]) -> str:
        """Put ``config`` in place without stopping; return one line saying what changed.

        ``config`` may be a function that reads it (a daemon's file): its failure counts as
        a refused reload too.

        Plugins are created again from the code already imported (a changed plugin module
        needs a restart) and configured with ``config``; ``[engine]``, ``[weights]`` and
        ``[plugins]`` apply from the next decision on (a decision under way finishes with
        the plugins it started with).  ``[[sources]]`` are compared by name: an unchanged
        source keeps running (a takeover stays taken over), a removed one is stopped, a new
        one started, and a changed one stopped and then started with its new settings.
        Sources from plugins' ``oomkit_sources`` and from ``Engine(sources=...)`` keep running
        as they are.  No event is lost: the queue and the dispatcher are untouched.

        Raises :class:`~oomkit.ConfigError`, :class:`~oomkit.PluginLoadError` or
        :class:`ReloadError` (one line) with the old configuration still running.
        """
        if self._tg is None:
            raise EngineNotRunning("reload() needs a running engine: use `async with Engine(...)`")
        try:
            return await self._reload(config if isinstance(config, Config) else config())
        except OomkitError as exc:
            self._reload_failures += 1
            self._last_reload_error = str(exc)
            raise

    async def _reload(self, config: Config) -> str:
        assert self._tg is not None
        extra_plugins, autoload, dry_run = self._construction
        # A whole engine, never started: loading, configuring and building sources check
        # everything a start would, and nothing here has changed yet if that fails.
        new = Engine(config, plugins=extra_plugins, autoload=autoload, dry_run=dry_run)
        old_specs = {s.source_name: s for s in self.config.sources}
        new_specs = {s.source_name: s for s in config.sources}
        kept = [n for n in new_specs if n in old_specs and new_specs[n] == old_specs[n]]
        stopping = [self._configured[n] for n in old_specs if n not in kept and n in self._configured]
        starting = [src for src in new.sources if src.name in new_specs and src.name not in kept]
        others = [src for src in self.sources if src not in self._configured.values()]
        clash = sorted({src.name for src in starting} & {src.name for src in others})
        if clash:
            raise ReloadError(f"{config.origin}: a plugin's or the program's source is already named {clash[0]!r}")

        old = (self.config, self.pm, self._caller, self.plugins, self.dry_run, self._safety)
        self._swap_policy(config, new.pm, new.plugins, new.dry_run)
        self._safety = new._safety
        for src in stopping:
            await self._stop_source(src)
        started: list[Source] = []
        try:
            for src in starting:
                await self._tg.start(self._run_source, src)
                started.append(src)
        except Exception as exc:
            for src in started:
                await self._stop_source(src)
            self.config, self.pm, self._caller, self.plugins, self.dry_run, self._safety = old
            restored = await self._restart(old[0], stopping)
            raise ReloadError(
                f"{config.origin}: {describe(exc)}; the old configuration runs again{restored}"
            ) from exc
        by_name = {n: self._configured[n] for n in kept} | {src.name: src for src in starting}
        self._configured = {n: by_name[n] for n in new_specs}
        self.sources = [*self._configured.values(), *others]
        self._by_name = {src.name: src for src in self.sources}
        self._generation += 1
        parts = [f"plugins: {', '.join(self.plugins.loaded) or 'none'}"]
        for what, names in (("kept", kept), ("started", [s.name for s in starting if s.name not in old_specs]),
                            ("restarted", [s.name for s in starting if s.name in old_specs]),
                            ("stopped", [s.name for s in stopping if s.name not in new_specs])):
            if names:
                parts.append(f"{what}: {', '.join(names)}")
        return f"reloaded {config.origin} (generation {self._generation}); " + "; ".join(parts)

    def _swap_policy(self, config: Config, pm: pluggy.PluginManager, plugins: LoadReport, dry_run: bool) -> None:
        # Synchronous: no event or decision can see half of the old and half of the new.
        self.config, self.pm, self.plugins, self.dry_run = config, pm, plugins, dry_run
        self._caller = Caller(pm, self._count_error, self._errlog, self._busy_calls)
        self._weights.clear()  # new plugins, new [weights]
        self.history.reconfigure(config)
        self._trim_recent()
        if self._hooks is not None:
            self._hooks.max_threads = config.engine.hook_threads
            self._hooks.stall_s = config.engine.sync_hook_timeout_s

    async def _stop_source(self, src: Source) -> None:
        entry = self._source_scopes.get(src)
        if entry is None:
            return  # it has ended by itself
        scope, done = entry
        scope.cancel()
        await done.wait()

    async def _restart(self, config: Config, sources: list[Source]) -> str:
        """Start the old configuration's sources again from their settings (a rollback)."""
        assert self._tg is not None
        specs = {s.source_name: s for s in config.sources}
        failed = []
        for old in sources:
            try:
                src = build_source(specs[old.name], config)
                await self._tg.start(self._run_source, src)
            except Exception as exc:
                failed.append(f"{old.name}: {describe(exc)}")
                self._configured.pop(old.name, None)
                log.error("reload rollback: source %s could not start again: %s", old.name, describe(exc))
                continue
            self._configured[old.name] = src
        self.sources = [*self._configured.values(), *[s for s in self.sources if s not in sources]]
        self._by_name = {src.name: src for src in self.sources}
        return f" (but not {'; '.join(failed)})" if failed else ""

    # --- events -------------------------------------------------------------------------------

    async def submit(self, event: Event) -> None:
        """Hand an event to the engine (what sources call); waits while the queue is full.

        While the queue has room it returns without yielding, so it is no cancellation point.
        """
        if self._events is None:
            raise EngineNotRunning("submit() needs a running engine: use `async with Engine(...)`")
        try:
            # No checkpoint while there is room: the event reaches the dispatcher one loop
            # iteration sooner, which is a tenth of an OOM's wake-to-kill path (bench memcg_oom).
            self._events.send_nowait(event)
        except anyio.WouldBlock:
            await self._events.send(event)

    def _wants(self, event: Event, caller: Caller) -> bool:
        res = caller.first("oomkit_should_act", {"event": event}, _check_should_act)
        if res is None:
            return event.kind in _ACT_BY_DEFAULT
        return bool(res[1])

    async def _wanted(self, batch: list[Event]) -> list[bool]:
        """``should_act`` for each event of ``batch``, in one worker job (none without a
        ``should_act`` plugin: the defaults need no thread)."""
        if not self.pm.hook.oomkit_should_act.get_hookimpls():
            return [e.kind in _ACT_BY_DEFAULT for e in batch]
        asks = [e for e in batch if e.kind not in _REPORT_ONLY]
        if not asks:
            return [False] * len(batch)
        try:
            urgent = any(_is_urgent(e) for e in asks)
            answers = iter(await self._sync(self._caller, lambda c: [self._wants(e, c) for e in asks], urgent,
                                            on_loop=True))
        except HooksStuck:
            self._stats.hooks_stuck += 1
            answers = iter([e.kind in _ACT_BY_DEFAULT for e in asks])
        return [False if e.kind in _REPORT_ONLY else next(answers) for e in batch]

    async def _sync(
        self, caller: Caller, work: Callable[[Caller], T], urgent: bool = False, *, on_loop: bool = False
    ) -> T:
        """Run ``work`` (sync plugin calls through the caller it is given) in a hook worker
        thread, where a stuck plugin can be given up (:mod:`oomkit.hookthreads`), and report
        its plugins' failures here, on the loop.  An ``urgent`` decision's work never parks
        (:mod:`oomkit.urgency`), and runs on the loop itself if ``on_loop`` (its caller
        expects it to be small) and ``[engine] urgent_on_loop`` allows."""
        hooks = self._hooks
        if hooks is None:
            raise EngineNotRunning("the engine is not running")
        if urgent and on_loop and self.config.engine.urgent_on_loop and self._all_loop_safe():
            self._stats.urgent_on_loop += 1
            return work(caller)  # a caller with no job reports its plugins' failures itself

        def run(job: Job[tuple[T, list[Report]]]) -> tuple[T, list[Report]]:
            mine = caller.in_job(job)
            return work(mine), mine.reports

        out, reports = await hooks.run(run, urgent)
        caller.replay(reports)
        return out

    def _small(self, n: int | None) -> bool:
        """Whether ``n`` candidates are few enough for the loop (``urgent_on_loop_max_candidates``);
        None, a scope never ranked yet (:attr:`_sizes`), counts as big."""
        return n is not None and n <= self.config.engine.urgent_on_loop_max_candidates

    def _sized(self, scope: Scope, n: int) -> None:
        sizes = self._sizes
        sizes.pop(scope, None)
        sizes[scope] = n
        if len(sizes) > _SIZES_KEPT:
            del sizes[next(iter(sizes))]  # the scope ranked longest ago

    def _all_loop_safe(self) -> bool:
        """Whether every implementation of a sync hook comes from a plugin that says it may
        be called on the loop (``loop_safe``); read at each urgent call, so that a plugin
        registered or removed since counts."""
        pm = self.pm
        return all(
            getattr(impl.plugin, "loop_safe", False) is True
            for hook in _SYNC_HOOKS for impl in getattr(pm.hook, hook).get_hookimpls()
        )

    async def _warm_up(self) -> None:
        scopes = list(dict.fromkeys(self._watched_scopes()))[:_WARM_SCOPES]
        t0, offered = time.monotonic(), 0
        for scope in scopes:
            event = Event(source="engine", kind="low-memory", scope=scope)
            try:
                n = len(await self._sync(self._caller, lambda c: self.candidates(event, c)))
                offered += n
                self._sized(scope, n)
            except EngineNotRunning:
                return
            except HooksStuck as exc:
                # A task of the engine's group: raising would stop the engine, for a preview.
                log.warning("warm-up stopped at %s: %s", scope, exc)
                return
            except Exception:
                log.exception("warm-up stopped at %s", scope)
                return
            self._stats.warmed_up += 1
        if scopes:
            log.info("warmed up %d scope(s) in %.2f s: %d candidates offered", len(scopes), time.monotonic() - t0,
                     offered)

    def _watched_scopes(self) -> list[Scope]:
        out: list[Scope] = []
        for src in self.sources:
            try:
                out.extend(src.scopes())
            except Exception as exc:  # a source's bug must not stop the sampling of the others
                log.warning("source %s could not list its scopes: %s: %s", src.name, type(exc).__name__, exc)
        return out

    def _wants_samples(self) -> bool:
        # A plugin may say it wants none for now (memory_samples false): then none are built.
        return any(getattr(self.pm.get_plugin(impl.plugin_name), "memory_samples", True)
                   for impl in self.pm.hook.oomkit_memory_sample.get_hookimpls())

    def _sampled(self, sample: MemorySample) -> None:
        self._caller.each("oomkit_memory_sample", {"sample": sample})

    def _cooling(self, event: Event) -> bool:
        """Whether ``event`` falls in its scope's cooldown or hold-off (counted if so)."""
        # A v1 memcg under takeover is paused until someone acts: never make it wait.
        if event.kind == "oom":
            return False
        until = self._cool_until.get(event.scope)
        if until is None or time.monotonic_ns() >= until:
            return False
        if self._streak.get(event.scope):
            self._stats.held_off += 1
        else:
            self._stats.cooled += 1
        return True

    def _hold(self, scope: Scope, outcome: str) -> None:
        """After a decision: a cooldown when it killed, nothing when a rescue ended the
        condition, else a hold-off that doubles with each decision in a row that ended
        nothing (reset by a kill, a rescue or a quiet ``holdoff_max_s``)."""
        engine = self.config.engine
        now = time.monotonic_ns()
        if outcome == _RESCUED:
            self._streak.pop(scope, None)
            return
        if outcome in _RESOLVED:
            self._streak.pop(scope, None)
            self._cool_until[scope] = now + int(engine.cooldown_s * 1e9)
            return
        until = self._cool_until.get(scope, 0)
        streak = self._streak.get(scope, 0)
        if now - until > engine.holdoff_max_s * 1e9:
            streak = 0  # quiet long enough: a new shortage
        hold = min(engine.holdoff_max_s, engine.holdoff_s * 2.0 ** min(streak, 64))
        self._streak[scope] = streak + 1
        self._cool_until[scope] = now + int(hold * 1e9)
        if len(self._cool_until) > 4096:
            # Scopes come and go (glob takeovers, pods): forget those whose hold has lapsed.
            for gone in [k for k, t in self._cool_until.items() if now - t > engine.holdoff_max_s * 1e9]:
                del self._cool_until[gone]
                self._streak.pop(gone, None)

    async def _dispatch(self, recv: MemoryObjectReceiveStream[Event], tg: TaskGroup) -> None:
        # `tg`, not self._tg: __aexit__ clears that before the group has finished cancelling,
        # and an event received in between must still find where to start its decision.
        stats = self._stats
        counts = self._events_by
        self._dispatching = True
        try:
            await self._dispatch_all(recv, tg, stats, counts)
        finally:
            self._dispatching = False

    async def _dispatch_all(
        self, recv: MemoryObjectReceiveStream[Event], tg: TaskGroup, stats: Stats, counts: dict[tuple[str, str], int]
    ) -> None:
        async with recv:
            async for first in recv:
                # What is queued goes through should_act in one worker job, not one each.
                batch = [first]
                while len(batch) < _BATCH:
                    try:
                        batch.append(recv.receive_nowait())
                    except (anyio.WouldBlock, anyio.EndOfStream):
                        break
                with self._urgency(*batch):
                    await self._dispatch_batch(batch, tg, stats, counts)

    async def _dispatch_batch(
        self, batch: list[Event], tg: TaskGroup, stats: Stats, counts: dict[tuple[str, str], int]
    ) -> None:
        wanted = await self._wanted(batch)
        started_urgent = False
        for event, wants in zip(batch, wanted):
            stats.events += 1
            self._taken_ns = event.monotonic_ns
            key = (event.source, event.kind)
            counts[key] = counts.get(key, 0) + 1
            if event.kind in _REPORT_ONLY:
                self._report(event)
                continue
            self.history.touch(event.scope, event.kind, event.monotonic_ns)
            if not wants:
                stats.ignored += 1
                continue
            scope = event.scope
            if scope in self._busy:
                held = self._pending.get(scope)
                if held is not None:
                    stats.coalesced += 1
                    if held.kind == "oom" and event.kind != "oom":
                        continue  # a paused memcg waits for that one: keep it
                self._pending[scope] = event
                continue
            if self._cooling(event):
                continue
            self._busy.add(scope)
            tg.start_soon(self._decide_scope, event)
            started_urgent = started_urgent or _is_urgent(event)
        if started_urgent:
            # Let the decision take the urgency over before this batch lets it go:
            # a gap would unpark every parked thread for nothing.
            await anyio.lowlevel.checkpoint()

    async def _decide_scope(self, event: Event) -> None:
        scope = event.scope
        try:
            next_event: Event | None = event
            while next_event is not None:
                await self._run_decision(next_event)
                next_event = self._pending.pop(scope, None)
                if next_event is not None and self._cooling(next_event):
                    next_event = None
        finally:
            self._busy.discard(scope)

    def _report(self, event: Event) -> None:
        self._publish(Decision(id=self._new_id(), event=event, outcome="observed", dry_run=self.dry_run))

    def _new_id(self) -> int:
        self._next_id += 1
        return self._next_id

    def _publish(self, decision: Decision) -> None:
        self._keep(decision)
        self._outcomes[decision.outcome] = self._outcomes.get(decision.outcome, 0) + 1
        for feed in self._feeds:
            feed._offer(decision)
        if self._notify is None or not self.pm.hook.oomkit_notify.get_hookimpls():
            return
        try:
            self._notify.send_nowait(decision)
        except anyio.WouldBlock:
            # One line per overflow, not per decision: a storm must not become a log storm.
            if not self._notify_overflowing:
                log.warning("notify queue full: decisions are not reaching notifiers (counted in stats)")
            self._notify_overflowing = True
            self._stats.notify_dropped += 1
        except anyio.BrokenResourceError:
            # The engine is stopping and the notifiers have already stopped; a decision that
            # finished meanwhile is still in `recent`, and counted as not delivered.
            self._stats.notify_dropped += 1
        else:
            self._notify_overflowing = False

    async def _deliver(self, recv: MemoryObjectReceiveStream[Decision]) -> None:
        timeout = self.config.engine.hook_timeout_s
        async with recv:
            async for decision in recv:
                await self._caller.each_async(
                    "oomkit_notify", {"event": decision.event, "decision": decision}, timeout
                )
                self._delivered = max(self._delivered, decision.id)

    async def notified(self, decision: Decision, timeout: float = 10.0) -> None:
        """Wait until every notifier has been handed ``decision`` (at once if none is loaded).

        For tests and embedding programs that must see a notifier's effect: notifiers run in
        a task of their own, after the decision returned.  Raises TimeoutError when it was not
        delivered in time (the queue was full and dropped it, or a notifier hangs).
        """
        if not self.pm.hook.oomkit_notify.get_hookimpls():
            return
        with anyio.fail_after(timeout):
            while self._delivered < decision.id:
                await anyio.sleep(0.001)

    # --- the chain ----------------------------------------------------------------------------

    def candidates(
        self, event: Event, caller: Caller | None = None, context: HookContext = PREVIEW
    ) -> list[Candidate]:
        """Everyone the ``candidates`` plugins offer for ``event``, each pid once."""
        offers = (caller or self._caller).each("oomkit_candidates", {"event": event, "context": context},
                                               _check_candidates)
        return _join(offered for _, offered in offers)

    def rank(self, event: Event, candidates: Sequence[Candidate] | None = None) -> Ranking:
        """Score and veto ``candidates`` (by default, those offered for ``event``).

        Highest first; vetoed candidates sort after every killable one.  The
        :class:`~oomkit.ranking.Ranking` is a sequence of :class:`~oomkit.Ranked` built as
        they are read: read the top few of ten thousand and only those are made.  Nothing is killed,
        and nothing is re-verified in ``/proc`` (that happens only before a kill).  Given
        ``candidates`` are checked like a plugin's (:class:`ValueError` if one is malformed).
        """
        cands = self.candidates(event) if candidates is None else check_candidates(candidates)
        return self._rank(event, cands, {}, self._caller, PREVIEW)

    async def rank_async(self, event: Event) -> Ranking:
        """:meth:`rank` in a hook worker thread, for a running engine's own loop (the
        control socket's ``rank``): a stuck plugin cannot block the loop."""
        return await self._sync(self._caller, lambda c: self._rank(event, self.candidates(event, c), {}, c, PREVIEW))

    def weight(self, name: str) -> float:
        """A scorer's weight: ``[weights]``, else the plugin's own ``weight``, else 1.0;
        under ``policy = "kernel"`` 1 for the tiebreak scorer and 0 for every other.

        Worked out once per scorer: plugins and config do not change while the engine runs.
        """
        weight = self._weights.get(name)
        if weight is None:
            weight = self._weights[name] = self._find_weight(name)
        return weight

    def _find_weight(self, name: str) -> float:
        engine = self.config.engine
        if engine.policy == "kernel":
            return 1.0 if name == engine.tiebreak else 0.0
        if name in self.config.weights:
            return float(self.config.weights[name])  # a Config built in Python may hold an int
        declared = getattr(self.pm.get_plugin(name), "weight", None)
        if isinstance(declared, (int, float)) and not isinstance(declared, bool):
            if math.isfinite(declared) and 0 <= declared <= 1000:  # a [weights] entry's range
                return float(declared)
        return 1.0

    def _tiers(self, kwargs: dict[str, Any], caller: Caller) -> dict[int, tuple[Tier, str]]:
        out: dict[int, tuple[Tier, str]] = {}
        if self.config.engine.policy == "kernel":
            return out
        cands = kwargs["candidates"]

        def tiers_of(result: Any, note: Note) -> dict[int, tuple[str, str]]:
            return check_tiers(result, cands)

        # One label per plugin and answer, not per pid: a plugin gives thousands of pids the
        # same (tier, reason) (every oom_score_adj 300, say).
        labels: dict[tuple[str, tuple[str, str]], tuple[Tier, str]] = {}
        for name, result in caller.each("oomkit_tier", kwargs, tiers_of):
            for pid, entry in result.items():
                label = labels.get((name, entry))
                if label is None:
                    tier, reason = entry
                    label = labels[name, entry] = ("critical" if tier == "critical" else "expendable",
                                                   f"{name}: {reason}" if reason else name)
                if out.get(pid, _NORMAL)[0] != "critical":  # critical wins a disagreement
                    out[pid] = label
        return out

    def _protected_pids(self) -> dict[int, str]:
        """The pids sources depend on (their watchdogs), with the source's name."""
        out: dict[int, str] = {}
        for src in self.sources:
            try:
                pids = src.protected_pids()
                out.update((pid, src.name) for pid in pids if type(pid) is int)
            except Exception as exc:
                self._errlog.line(
                    (src.name, "protected_pids"),
                    f"source {src.name} could not say which pids to protect: {type(exc).__name__}: {exc}",
                )
        return out

    def _rank(
        self, event: Event, cands: list[Candidate], stage: dict[str, int], caller: Caller, context: HookContext
    ) -> Ranking:
        if not cands:
            return Ranking((), (), (), (), {}, {}, "")
        # A tuple: a plugin that sorts or trims the list it was given must not change what
        # the next plugin, the checks and the ranking see.
        kwargs = {"event": event, "candidates": tuple(cands), "history": self.history, "context": context}
        t0 = time.monotonic_ns()
        n = len(cands)
        totals = [0.0] * n
        names: list[str] = []
        columns: list[list[float]] = []

        def scores_of(result: Any, note: Note) -> list[float]:
            return check_scores(result, cands)

        # Column by column in C (map), not candidate by candidate in Python: ten thousand
        # candidates times every scorer.  The sums come out the same, scorer after scorer.
        for name, scores in caller.each("oomkit_score", kwargs, scores_of):
            w = self.weight(name)
            names.append(name)
            columns.append(scores)
            totals = list(map(operator.add, totals, scores if w == 1.0 else map(w.__mul__, scores)))
        tiers = self._tiers(kwargs, caller)
        t1 = time.monotonic_ns()
        # The core's protections come first, so they lead each candidate's list of vetoes.
        vetoes: dict[int, list[Veto]] = {
            pid: [Veto(plugin=CORE, reason=reason)]
            for pid, reason in self._safety.vetoes(cands, self._protected_pids()).items()
        }

        def vetoes_of(result: Any, note: Note) -> dict[int, str]:
            return check_vetoes(result, cands, note)

        results, failed = caller.each_with_failures("oomkit_veto", kwargs, vetoes_of)
        for name, result in results:
            for pid, reason in result.items():
                vetoes.setdefault(pid, []).append(Veto(plugin=name, reason=reason))
        for name in failed:
            # A veto that could not judge protects everyone it was asked about.
            for c in cands:
                vetoes.setdefault(c.pid, []).append(Veto(plugin=name, reason="veto plugin failed; protecting"))
        t2 = time.monotonic_ns()
        stage["score"], stage["veto"] = t1 - t0, t2 - t1
        return Ranking(cands, names, columns, totals, vetoes, tiers, self.config.engine.tiebreak)

    async def decide(self, event: Event) -> Decision:
        """Run the whole chain for ``event`` now, bypassing coalescing and cooldown.

        The decision is recorded, counted and queued for notifiers, and returned.
        """
        if self._tg is None:
            raise EngineNotRunning("decide() needs a running engine: use `async with Engine(...)`")
        return await self._run_decision(event)

    async def _run_decision(self, event: Event) -> Decision:
        start = time.monotonic_ns()
        stage: dict[str, int] = {"queued": max(0, start - event.monotonic_ns)}
        errors: list[PluginError] = []

        def sink(err: PluginError) -> None:
            if len(errors) < _MAX_ERRORS:
                errors.append(err)
            self._count_error(err)

        held: list[Ranking] = []
        try:
            with self._urgency(event):
                decision = await self._decide(event, stage, start, Caller(self.pm, sink, self._errlog, self._busy_calls),
                                              held)
        except HooksStuck as exc:
            self._stats.hooks_stuck += 1
            handed = self._hand_back(event)
            decision = Decision(id=self._new_id(), event=event, outcome="failed", stage_ns=stage,
                                dry_run=self.dry_run, detail=f"{exc}" + (f"; {handed}" if handed else ""))
        for ranking in held:
            if len(ranking) > _REAP_ABOVE:
                self._reaper.drop(ranking.parts())  # freed off the loop, a slice at a time (oomkit.reaper)
        del held
        decision = msgspec.structs.replace(decision, errors=tuple(errors))
        self._stats.decisions += 1
        if decision.outcome == "killed":
            self._stats.kills += 1
        self._hold(event.scope, decision.outcome)
        self._publish(decision)
        if decision.killed and decision.outcome == "killed" and self._tg is not None:
            if self._confirming < _MAX_CONFIRMING:
                self._confirming += 1
                self._tg.start_soon(self._confirm, decision)
        return decision

    async def _confirm(self, decision: Decision) -> None:
        """Check the killer's word: every pid it says it signalled is gone within
        ``kill_confirm_s``; one still running then is logged and counted."""
        try:
            started = dict(_named(decision))
            left = [p for p in decision.killed if p in started]
            proc = self.config.paths.proc
            stop = time.monotonic() + self.config.engine.kill_confirm_s
            while left:
                left = [p for p in left if procfs.running(proc, p, started[p])]
                if not left or time.monotonic() >= stop:
                    break
                await anyio.sleep(_CONFIRM_POLL_S)
            if left:
                self._stats.kills_unconfirmed += 1
                log.warning(
                    "decision %d: %s said it killed %s, but pid %s still runs %g s later",
                    decision.id, decision.killer or "the killer", decision.victim.describe() if decision.victim else "?",
                    ", ".join(map(str, left[:8])), self.config.engine.kill_confirm_s,
                )
        finally:
            self._confirming -= 1

    def _gather(
        self, event: Event, stage: dict[str, int], start: int, caller: Caller, context: HookContext
    ) -> Ranking | None:
        """The candidates, scored and vetoed (in a hook worker); None when nobody is offered."""
        cands = self.candidates(event, caller, context)
        stage["candidates"] = time.monotonic_ns() - start
        return self._rank(event, cands, stage, caller, context) if cands else None

    def _urgency(self, *events: Event) -> AbstractContextManager[None]:
        """Urgency (:mod:`oomkit.urgency`) for the block if one of ``events`` is urgent."""
        if not any(_is_urgent(e) for e in events):
            return nullcontext()
        engine = self.config.engine
        return urgency.urgent(engine.urgent_switch_interval_s, engine.urgent_park_s, engine.urgent_realtime_priority)

    async def _decide(
        self, event: Event, stage: dict[str, int], start: int, caller: Caller, held: list[Ranking]
    ) -> Decision:
        """The decision for ``event``; every ranking it made is appended to ``held``, for the
        caller to free off the loop."""
        new = self._new_id()
        context = HookContext(decision_id=new, dry_run=self.dry_run)
        urgent = _is_urgent(event)
        gathered = await self._sync(caller, lambda c: self._gather(event, stage, start, c, context), urgent,
                                    on_loop=self._small(self._sizes.get(event.scope)))
        self._sized(event.scope, len(gathered) if gathered is not None else 0)
        if gathered is None:
            return Decision(id=new, event=event, outcome="no-candidates", stage_ns=stage, dry_run=self.dry_run,
                            detail=self._hand_back(event))
        ranked = gathered
        held.append(ranked)
        engine = self.config.engine
        policy: dict[str, Any] = dict(
            policy=engine.policy, tiebreak=engine.tiebreak,
            # Every scorer that answered scored every candidate (check_scores): one's names are all's.
            weights={name: self.weight(name) for name in ranked.scorers},
        )
        if ranked[0].vetoes:
            return Decision(
                id=new, event=event, **self._recorded(ranked), outcome="all-vetoed", stage_ns=stage,
                dry_run=self.dry_run, detail=self._hand_back(event), **policy,
            )
        t = time.monotonic_ns()
        victim, gone = self._verified(ranked)
        if victim is None:
            stage["recheck"] = time.monotonic_ns() - t
            return Decision(
                id=new, event=event, **self._recorded(ranked), outcome="all-vetoed", stage_ns=stage,
                dry_run=self.dry_run,
                detail="every killable candidate was refused when re-verified in /proc before the kill"
                + ("; " + handed if (handed := self._hand_back(event)) else ""), **policy,
            )
        descended: list[Candidate] = []
        while victim.candidate.descend and not gone and len(descended) < MAX_DESCENT:
            unit = victim.candidate
            inner = await self._sync(caller, lambda c: self._inside(event, unit, c, context), urgent,
                                     on_loop=self._small(len(unit.members)))
            if inner is None:
                break  # nobody inside to rank: the unit itself is the victim
            inner_ranked, inner_context = inner
            held.append(inner_ranked)
            descended.append(victim.candidate)
            ranked, context = inner_ranked, inner_context
            found, gone = self._verified(ranked) if not ranked[0].vetoes else (None, "")
            if found is None:
                stage["recheck"] = time.monotonic_ns() - t
                return Decision(
                    id=new, event=event, **self._recorded(ranked), outcome="all-vetoed", stage_ns=stage,
                    dry_run=self.dry_run, descended=tuple(descended), **policy,
                    detail=f"inside {descended[-1].describe()} every candidate is protected"
                    + ("; " + handed if (handed := self._hand_back(event)) else ""),
                )
            victim = found
        common: dict[str, Any] = dict(
            id=new, event=event, **self._recorded(ranked), victim=victim.candidate, stage_ns=stage,
            descended=tuple(descended), **policy
        )
        src = self._by_name.get(event.source)
        passed = 0
        # A victim gone before the kill (it exited, or a plugin offered a pid nobody has) ends
        # the decision only if its going ended the condition; else the next candidate is the
        # victim, or the memcg would wait for its deadline with the next one killable now.
        # Without a source to ask (an event submitted by hand) the going may have been enough.
        while gone and src is not None and passed < MAX_GONE and not descended:
            if not await self._holds_after_settling(src, event):
                break
            passed += 1
            i = next(i for i, r in enumerate(ranked) if r is victim)
            ranked.refuse(i, Veto(plugin=CORE, reason=f"gone: {gone}"))
            self._errlog.line((CORE, "gone"), f"pid {victim.candidate.pid} ({victim.candidate.name}) was gone"
                              " at the re-check and the condition still holds: the next candidate is the victim")
            ranked.resort()
            found, gone = self._verified(ranked) if not ranked[0].vetoes else (None, "")
            if found is None:
                stage["recheck"] = time.monotonic_ns() - t
                self._stats.gone_at_recheck += passed
                return Decision(
                    id=new, event=event, **self._recorded(ranked), outcome="all-vetoed", stage_ns=stage,
                    dry_run=self.dry_run, **policy,
                    detail=f"{passed} victim(s) were gone at the re-check and every other candidate is protected"
                    + ("; " + handed if (handed := self._hand_back(event)) else ""),
                )
            victim = found
            common.update(self._recorded(ranked), victim=victim.candidate)
        self._stats.gone_at_recheck += passed
        if gone:
            stage["recheck"] = time.monotonic_ns() - t
            return Decision(**common, outcome="exited", dry_run=self.dry_run, detail=gone)
        holds = self._still_holds(src, event)
        stage["recheck"] = time.monotonic_ns() - t
        chosen, final = victim.candidate, ranked
        group = await self._sync(caller, lambda c: self._group(event, chosen, final, c, context), urgent,
                                 on_loop=self._small(len(final)))
        common["group"] = group
        if not holds:
            return Decision(**common, outcome="condition-cleared", dry_run=self.dry_run,
                            detail="the condition had cleared before the kill")
        if self.dry_run:
            also = f" and {len(group)} more with it" if group else ""
            return Decision(**common, outcome="dry-run", action="kill", dry_run=True,
                            detail=f"would kill {victim.candidate.describe()}{also}")
        if engine.policy != "kernel":
            t = time.monotonic_ns()
            rescues = await self._rescue(event, victim.candidate, ranked, caller, context, src)
            if rescues:
                stage["rescue"] = time.monotonic_ns() - t
                common["rescues"] = rescues
                if rescues[-1].cleared:
                    return Decision(**common, outcome="rescued",
                                    detail=f"rescued by {rescues[-1].plugin}: the condition cleared before the kill")
        guard = Guard(self._safety, self._protected_pids())
        t = time.monotonic_ns()
        res = await caller.first_async(
            "oomkit_kill", {"event": event, "victim": victim.candidate, "guard": guard},
            self.config.engine.kill_timeout_s, _check_kill,
        )
        stage["kill"] = time.monotonic_ns() - t
        if res is None:
            return Decision(**common, outcome="failed", detail="no killer claimed the victim")
        kill: KillResult = res[1]
        killed = list(_signalled(victim.candidate, kill))
        if group:
            t = time.monotonic_ns()
            kills = await self._kill_group(event, group, caller, guard)
            common["group_kills"] = tuple(kills)
            stage["group"] = time.monotonic_ns() - t
            for member, member_kill in zip(group, kills):
                killed.extend(_signalled(member, member_kill))
        return Decision(**common, action=kill.action, outcome=kill.outcome, detail=kill.detail, kill=kill,
                        killed=tuple(dict.fromkeys(killed)), killer=res[0])

    async def _rescue(
        self, event: Event, victim: Candidate, ranked: Ranking, caller: Caller, context: HookContext,
        src: Source | None,
    ) -> tuple[Rescue, ...]:
        """The rescue stage (``oomkit_rescue``): each rescuer in turn until the source's
        re-check says the condition cleared, or the stage's budget is spent."""
        impls = caller.implementations("oomkit_rescue")
        if not impls:
            return ()
        engine = self.config.engine
        kwargs = {"event": event, "victim": victim, "candidates": ranked.members, "context": context}
        out: list[Rescue] = []
        stop_ns = time.monotonic_ns() + int(engine.rescue_budget_s * 1e9)
        for impl in impls:
            left = (stop_ns - time.monotonic_ns()) / 1e9
            if left <= 0:
                break
            t0 = time.monotonic_ns()
            status, res = await caller.attempt(impl, "oomkit_rescue", kwargs, min(engine.rescue_timeout_s, left),
                                               _check_rescue)
            elapsed = time.monotonic_ns() - t0
            if status == "ok" and res is None:
                continue  # declined: not this rescuer's scope
            if status == "ok":
                word, freed, detail = res
                attempt = Rescue(plugin=impl.plugin_name, result=word, freed_bytes=freed, detail=detail,
                                 elapsed_ns=elapsed)
            else:
                attempt = Rescue(plugin=impl.plugin_name, result=status, detail=str(res)[:240], elapsed_ns=elapsed)
            if not self._still_holds(src, event, " after a rescue"):
                out.append(msgspec.structs.replace(attempt, cleared=True))
                break
            out.append(attempt)
        return tuple(out)

    def _inside(
        self, event: Event, unit: Candidate, caller: Caller, context: HookContext
    ) -> tuple[Ranking, HookContext] | None:
        """The ranking inside a chosen cgroup unit (``Candidate.descend``), or None when no
        candidate is offered there."""
        inner = msgspec.structs.replace(event, scope=Scope(tree=event.scope.tree, path=unit.cgroup))
        inner_context = msgspec.structs.replace(context, descent=(*context.descent, unit.cgroup))
        cands = self.candidates(inner, caller, inner_context)
        if not cands:
            return None
        return self._rank(inner, cands, {}, caller, inner_context), inner_context

    def _hand_back(self, event: Event) -> str:
        """Nobody will be killed: a source holding the decision gives it back to the kernel at
        once (a paused v1 memcg need not wait out its deadline with its tasks paused)."""
        src = self._by_name.get(event.source)
        if src is None:
            return ""
        try:
            handed = src.hand_back(event)
        except Exception as exc:
            log.warning("source %s could not hand back: %s: %s", src.name, type(exc).__name__, exc)
            return f"hand back to the kernel failed: {describe(exc)}"
        return "handed back to the kernel" if handed else ""

    def _group(
        self, event: Event, victim: Candidate, ranking: Ranking, caller: Caller, context: HookContext
    ) -> tuple[Candidate, ...]:
        """Who dies with ``victim`` (``oomkit_group``), killable candidates only, bounded."""
        engine = self.config.engine
        if engine.policy == "kernel" or engine.max_group == 0:
            return ()
        killable = ranking.killable()
        kwargs = {"event": event, "victim": victim, "candidates": ranking.members,
                  "history": self.history, "context": context}
        out: dict[int, Candidate] = {}
        for _, pids in caller.each("oomkit_group", kwargs, _check_group):
            for pid in pids:
                if pid in killable and pid != victim.pid and len(out) < engine.max_group:
                    out.setdefault(pid, killable[pid])
        return tuple(out.values())

    async def _kill_group(
        self, event: Event, group: Sequence[Candidate], caller: Caller, guard: Guard
    ) -> list[KillResult]:
        """Each member re-verified by the core's safety, as the victim was, then killed."""
        out: list[KillResult] = []
        protected = self._protected_pids()
        for member in group:
            verdict = self._safety.verify(member, protected)
            if verdict.status != "ok":
                out.append(KillResult(action="none", outcome="exited" if verdict.status == "gone" else "failed",
                                      detail=verdict.reason))
                continue
            res = await caller.first_async(
                "oomkit_kill", {"event": event, "victim": member, "guard": guard},
                self.config.engine.kill_timeout_s, _check_kill,
            )
            out.append(res[1] if res is not None else
                       KillResult(action="none", outcome="failed", detail="no killer claimed this group member"))
        return out

    async def _holds_after_settling(self, src: Source, event: Event) -> bool:
        settled = time.monotonic() + GONE_SETTLE_S
        while self._still_holds(src, event):
            if time.monotonic() >= settled:
                return True
            await anyio.sleep(GONE_POLL_S)
        return False

    @staticmethod
    def _still_holds(src: Source | None, event: Event, when: str = "") -> bool:
        if src is None:
            return True
        try:
            return src.still_holds(event)
        except Exception as exc:
            # Unsure is not clear: act on the condition the source reported.
            log.warning("source %s could not re-check%s: %s", src.name, when, describe(exc))
            return True

    def _verified(self, ranked: Ranking) -> tuple[Ranked | None, str]:
        """The first killable candidate that passes the core's re-verification in /proc.

        Each one refused gets the core's veto, with what /proc showed, and the next is tried;
        ``ranked`` is updated in place and stays sorted.  Returns the victim (None when all
        were refused) and, when the victim turned out to be gone, why.
        """
        protected = self._protected_pids()
        refused = 0
        victim: Ranked | None = None
        verdict_reason = ""
        for i, r in enumerate(ranked):
            if r.vetoes:
                break  # sorted: every one after is vetoed too
            verdict = self._safety.verify(r.candidate, protected)
            if verdict.status == "refused":
                refused += 1
                ranked.refuse(i, Veto(plugin=CORE, reason=verdict.reason))
                what = f"not killing pid {r.candidate.pid} ({r.candidate.name}): {verdict.reason}"
                self._errlog.line((CORE, "recheck"), what)
                continue
            victim = r
            verdict_reason = verdict.reason if verdict.status == "gone" else ""
            break
        if refused:
            self._stats.refused_at_recheck += refused
            ranked.resort()
        return victim, verdict_reason

    def _recorded(self, ranked: Ranking) -> dict[str, Any]:
        """What a decision records of its ranking: its head (``[engine] record_ranking``) and
        its length."""
        return {"ranking": ranked.head(self.config.engine.record_ranking), "ranked": len(ranked)}


def _is_urgent(event: Event) -> bool:
    """An ``oom`` event: its scope's tasks wait, paused, for the decision (a v1 takeover, a
    v2 brake), so the rest of the process makes way for it (:mod:`oomkit.urgency`)."""
    return event.kind == "oom"


def _join(offers: Iterable[list[Candidate]]) -> list[Candidate]:
    """Every implementation's candidates, each pid once, units before processes.

    A unit stands for its members, so a process it covers is not offered again on its own
    (a unit and a process plugin both walk the same cgroup), and of two units sharing a
    member the first offered wins.  Otherwise the first implementation to offer a pid wins.
    """
    offered = [c for batch in offers for c in batch]
    covered: set[int] = set()
    units: list[Candidate] = []
    for c in offered:
        if c.unit != "process":
            pids = [m.pid for m in c.members]
            if covered.isdisjoint(pids):
                covered.update(pids)
                units.append(c)
    out = list(units)
    for c in offered:
        if c.unit == "process" and c.pid not in covered:
            covered.add(c.pid)
            out.append(c)
    return out


# The checks, with the caller's signature (a note callback most of them do not need).
def _check_should_act(result: Any, note: Note) -> bool:
    return check_should_act(result)


def _check_candidates(result: Any, note: Note) -> list[Candidate]:
    return check_candidates(result)


def _check_kill(result: Any, note: Note) -> KillResult:
    return check_kill(result)


def _check_group(result: Any, note: Note) -> list[int]:
    return check_group(result)


def _check_rescue(result: Any, note: Note) -> tuple[str, int, str]:
    return check_rescue(result)


def _named(decision: Decision) -> Iterator[tuple[int, int]]:
    """``(pid, start_ticks)`` of the processes a decision's kills were aimed at: the victim,
    a unit's members, the group."""
    for c in (decision.victim, *decision.group):
        if c is not None:
            yield c.pid, c.start_ticks
            yield from ((m.pid, m.start_ticks) for m in c.members)


def _signalled(victim: Candidate, kill: KillResult) -> tuple[int, ...]:
    """The pids a kill signalled: what the killer listed, else the victim's own pid when a
    killer that predates ``KillResult.pids`` reports a process killed."""
    if kill.pids:
        return kill.pids
    return (victim.pid,) if kill.outcome == "killed" and victim.unit == "process" else ()


def _single(group: BaseExceptionGroup[BaseException]) -> OomkitError | None:
    """The one oomkit error a task group's failure consists of, else None."""
    leaves: list[BaseException] = []
    pending: list[BaseException] = [group]
    while pending:
        exc = pending.pop()
        if isinstance(exc, BaseExceptionGroup):
            pending.extend(exc.exceptions)
        else:
            leaves.append(exc)
    if len(leaves) == 1 and isinstance(leaves[0], OomkitError):
        return leaves[0]
    return None


class _StartedFlag(TaskStatus[None]):
    """Passes ``started()`` through and remembers it, so a failing source can be told apart:
    before it armed, the engine must not start; after, only that source ends."""

    __slots__ = ("_inner", "started_yet")

    def __init__(self, inner: TaskStatus[None]) -> None:
        self._inner = inner
        self.started_yet = False

    def started(self, value: None = None) -> None:
        self.started_yet = True
        self._inner.started(value)


def _source_status(src: Source) -> SourceStatus:
    try:
        return src.status()
    except Exception as exc:
        return SourceStatus(name=src.name, kind=type(src).__name__, detail=f"status failed: {describe(exc)}")
