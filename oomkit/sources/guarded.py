"""What the two sources that change a cgroup share: a watchdog child that is the only writer
while it runs, and cgroups held by their directory's fd, followed as they come and go.

``memcg-oom`` (v1: ``oom_kill_disable``) and ``memory-high`` (v2: the ``memory.high``
brake) differ in what they write, what they read and what counts as an OOM; this base holds
the rest, so a fix to how a watchdog is pinged, replaced or stopped, or to how a removed
cgroup is waited for, is made once.  A subclass supplies the per-kind parts as the methods
marked abstract below.

The watchdog protocol itself (:mod:`oomkit.watchdog`, :mod:`oomkit.watchdog_client`):
``add`` hands it a cgroup (it arms it and answers ``ok`` or ``err``); ``arm``, ``release``,
``forget`` and ``scan`` ask it things about one; it says ``handback`` when it released one
at its deadline, ``armed`` when it put one back, ``busy`` or ``idle`` to an ask that came too
early or too late, ``gone`` when it let one go, and ``pong`` to ``ping``.
"""

from __future__ import annotations

import abc
import itertools
import logging
import select
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Generic, Literal, Protocol, TypeVar

import anyio
from anyio.abc import TaskStatus

from .. import watchdog
from ..cgroupdir import CgroupDir
from ..config import Config, ConfigError
from ..errors import SourceError
from ..events import Event, Scope
from ..journal import Journal, JournalError
from ..poller import Poller
from ..watchdog_client import WATCHDOG_START_S, WatchdogError, WatchdogGone, WatchdogLink, quote
from .base import Emit, Source
from .scopes import ScopeWatcher, matches

__all__ = ["GuardedSource", "Held"]

log = logging.getLogger("oomkit.sources.guarded")

RESTART_WINDOW_S = 600.0
"""The window over which ``watchdog_restarts`` counts deaths."""
LATE_S = 1.0
"""How long past an episode's deadline (or one more deadline, if longer) the source waits
for the watchdog's hand-back before it holds the watchdog for stopped or stuck and replaces
it (the replacement restores first: the OOM goes to the kernel)."""
PING_MIN_S = 2.0
PINGS_MISSED = 3
"""A watchdog that left this many pings unanswered (one each ``max(rescan_s, PING_MIN_S)``)
is stopped or stuck: it is killed and replaced like a dead one."""


class Timing(Protocol):
    """The settings this base reads (both sources' settings have them, each with its own
    defaults and documentation)."""

    @property
    def cgroups(self) -> tuple[str, ...]: ...
    @property
    def deadline_s(self) -> float: ...
    @property
    def poll_interval_s(self) -> float: ...
    @property
    def idle_poll_s(self) -> float: ...
    @property
    def rescan_s(self) -> float: ...
    @property
    def watchdog_restarts(self) -> int: ...
    @property
    def source_name(self) -> str: ...


@dataclass(slots=True, eq=False, kw_only=True)
class Held:
    """One cgroup a source holds, as far as this base needs to know it."""

    scope: Scope
    named: str
    """What the config named (for messages): the path as written, or the pattern."""
    cg: CgroupDir
    original: str
    """The value to put back, as the journal says."""
    id: str = ""
    """The watchdog's number for it ("": not guarded by the watchdog now)."""
    entry: str = "-"
    """Its journal entry ("-": none)."""
    arm_asked: bool = False
    released: bool = False
    """The engine asked for the hand-back (logged then, not again at the watchdog's answer)."""
    back: bool = False
    """It had been removed: held again now that it is back."""
    next_poll: float = 0.0
    """When it is read next while :meth:`GuardedSource._polled`."""


H = TypeVar("H", bound=Held)


def ms(seconds: float) -> str:
    """A duration as the watchdog's protocol spells it: whole milliseconds, at least 1."""
    return str(max(1, round(seconds * 1000)))


class GuardedSource(Source, Generic[H]):
    """The watchdog, the journal, and the cgroups held, for a source that changes cgroups."""

    KIND: ClassVar[Literal["v1", "v2"]]
    WHAT: ClassVar[str]
    """What the watchdog guards, in messages: "takeover" or "brake"."""
    TAKING: ClassVar[str]
    """How taking one is said, with ``{}`` for the cgroup: "taking {} over", "braking {}"."""
    GAVE_BACK: ClassVar[str]
    """What a late watchdog has not done: "handed it back", "released it"."""
    ALL_BACK: ClassVar[str]
    """What is true once the watchdogs are given up: "every memcg is back with the kernel"."""
    UNREADABLE: ClassVar[str]
    """A cgroup that cannot be read any more: "cannot read memory.oom_control; no longer watched"."""

    spec: Timing

    def __init__(self, spec: Timing, config: Config, root: Path) -> None:
        paths = config.paths
        self.spec = spec
        self.name = spec.source_name
        self.faults = 0
        """Runtime failures (a cgroup lost, a takeover refused), each logged once."""
        self.dropped = 0
        """Events not delivered because the engine's queue stayed full."""
        self.restarts = 0
        """Watchdogs replaced after a death."""
        self.handbacks = 0
        """Episodes given back to the kernel (the deadline, or the engine would kill nobody)."""
        self._root = root
        self._proc = paths.proc
        self._run_dir = paths.run_dir
        self._journal = Journal(paths.run_dir)
        self._named: dict[str, str] = {}
        """Canonical path or pattern -> what the config wrote."""
        self._held: dict[Scope, H] = {}
        self._refused: dict[Scope, bool] = {}
        """Matches left alone (logged once), and whether to try again at each rescan (held by
        another oomkit: it may let go) or not (oomkit's own cgroup, refused by the watchdog)."""
        self._waiting: set[Scope] = set()
        """Cgroups that were removed while held: taken again when they come back."""
        self._dog: WatchdogLink | None = None
        self._deaths: list[float] = []
        self._ids = itertools.count(1)
        self._pinged = self._ponged = 0
        self._emit: Emit | None = None
        self._poller: Poller[tuple[str, object]] | None = None
        self._full = False

    # --- what a kind supplies -----------------------------------------------------------------

    @abc.abstractmethod
    def _setup(self, poller: Poller[tuple[str, object]]) -> None:
        """Before the watchdog starts: the kind's own fds (inotify), registered with ``poller``."""

    @abc.abstractmethod
    def _teardown(self) -> None:
        """At the end, after the watchdog stopped: close what :meth:`_setup` opened."""

    @property
    @abc.abstractmethod
    def _guards(self) -> bool:
        """Whether this source changes its cgroups (and so runs a watchdog) at all."""

    @abc.abstractmethod
    async def _take(self, scope: Scope, *, startup: bool = False, quiet: bool = False) -> None:
        """Hold ``scope``.  At start (``startup``), an exact path that cannot be held fails
        the start; a glob match or a later one is logged once and tried again at each
        rescan (``quiet``: one lock attempt, no wait)."""

    @abc.abstractmethod
    async def _follow(self, h: H, *, signalled: bool) -> None:
        """Read one cgroup: report the kernel's kills, start, follow or end an episode."""

    @abc.abstractmethod
    def _polled(self, h: H) -> bool:
        """Whether ``h`` is read every ``poll_interval_s`` now (an episode under way)."""

    @abc.abstractmethod
    async def _ready(self, kind: str, obj: object) -> None:
        """One ready fd of the kind's own (registered in :meth:`_setup` or :meth:`_take`)."""

    @abc.abstractmethod
    def _heard(self, h: H, verb: str, args: list[str], strict: bool) -> None:
        """The watchdog said ``verb`` about ``h`` (one not handled here: ``ok``, ``err``,
        ``armed``, ``handback`` and the kind's own).  ``strict`` (at start): an ``err``
        raises :class:`~oomkit.errors.SourceError`."""

    @abc.abstractmethod
    def _orphaned(self, h: H) -> bool:
        """The watchdog died: restore ``h`` from here if it was guarded, and say whether it
        was (it is then added to the next watchdog)."""

    @abc.abstractmethod
    def _written(self, h: H) -> str:
        """The value the watchdog arms ``h`` with (and the journal entry names)."""

    @abc.abstractmethod
    def _restore_here(self, h: H, *, keep_entry: bool) -> None:
        """Restore ``h`` from this process (no watchdog is there to do it)."""

    @abc.abstractmethod
    def _close(self, h: H) -> None:
        """Let ``h`` go: forget it and close its fds (nothing is restored here)."""

    @abc.abstractmethod
    def _mark_adding(self, h: H) -> None:
        """``h`` is being handed to the watchdog (its state until the answer)."""

    # --- the engine's questions ---------------------------------------------------------------

    def protected_pids(self) -> tuple[int, ...]:
        """The watchdog: the engine must never kill it."""
        return () if self._dog is None else (self._dog.pid,)

    def scopes(self) -> list[Scope]:
        return list(self._held)

    # --- lifecycle ----------------------------------------------------------------------------

    async def run(self, emit: Emit, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        self._emit = emit
        self._poller = poller = Poller[tuple[str, object]]()
        scopes = ScopeWatcher(self._root, self.KIND, tuple(self._named))
        try:
            if self._guards:
                try:
                    self._journal.ensure()
                except OSError as exc:
                    raise ConfigError(f"[paths] run_dir {self._run_dir!r}: {exc.strerror}") from None
                self._setup(poller)
                # Before anything is changed: there is no moment a SIGKILL would strand.
                await self._start_watchdog()
            for scope in sorted(scopes.scan()):
                await self._take(scope, startup=True)
            for pattern in scopes.unmatched():
                log.warning("%s: %s matches no cgroup yet; waiting for one", self.name, self._named.get(pattern, pattern))
            poller.register(scopes.fileno(), select.EPOLLIN, ("scopes", scopes))
            task_status.started()
            # Look once right after arming: an episode may already be under way.
            for h in list(self._held.values()):
                await self._follow(h, signalled=True)
            await self._loop(poller, scopes)
        finally:
            with anyio.CancelScope(shield=True):
                await self._shutdown()
                scopes.close()
                self._teardown()
                poller.close()
                self._poller = None

    async def _start_watchdog(self) -> None:
        dog = await WatchdogLink.start(self._proc, self._journal.dir, self.spec.rescan_s)
        self._dog = dog
        self._pinged = self._ponged = 0
        assert self._poller is not None
        self._poller.register(dog.fileno(), select.EPOLLIN, ("dog", dog))

    async def _shutdown(self) -> None:
        dog, self._dog = self._dog, None
        # Without a watchdog (one that died and could not be replaced) this process restores.
        said: list[list[str]] | None = None
        if dog is not None:
            if self._poller is not None:
                self._poller.unregister(dog.fileno())
            said = await dog.stop()
            if said is None:
                log.error("%s: the watchdog (pid %d) did not confirm the restore; restoring here", self.name, dog.pid)
        for h in list(self._held.values()):
            if self._guards and said is None:
                self._restore_here(h, keep_entry=False)
            self._close(h)

    def _drop_entry(self, h: H) -> None:
        if h.entry != "-":
            try:
                self._journal.remove(h.entry)
            except JournalError as exc:
                log.error("%s", exc)
            h.entry = "-"

    # --- holding cgroups ----------------------------------------------------------------------

    def _named_as(self, scope: Scope) -> str:
        exact = self._named.get(scope.path)
        if exact is not None:
            return exact
        return next((c for p, c in self._named.items() if matches(p, scope.path)), scope.path)

    def _hold(self, h: H) -> None:
        """``h`` is held from now on (no longer refused, no longer waited for)."""
        self._refused.pop(h.scope, None)
        self._waiting.discard(h.scope)
        self._held[h.scope] = h

    async def _add(self, h: H, *, wait: bool) -> None:
        """Hand ``h`` to the watchdog, which arms it.  ``wait`` (at start): for its answer."""
        dog = self._dog
        assert dog is not None
        h.id = str(next(self._ids))
        self._mark_adding(h)
        spec = self.spec
        words = ("add", h.id, self.KIND, ms(spec.deadline_s), ms(spec.poll_interval_s), h.original, self._written(h), h.entry)
        try:
            dog.send(*words, quote(h.scope.path), fds=[h.cg.fd])
            if wait:
                with anyio.fail_after(WATCHDOG_START_S):
                    reply = await dog.until(lambda m: len(m) > 1 and m[1] == h.id and m[0] in ("ok", "err"), self._said)
                self._said(reply, strict=True)
        except (WatchdogGone, TimeoutError) as exc:
            if not wait:
                return  # the loop reads its end of file and starts a new one, which gets it
            raise WatchdogError(
                f"the {self.WHAT} watchdog (pid {dog.pid}) stopped answering while {self.TAKING.format(repr(h.named))}:"
                f" {exc or 'timeout'}"
            ) from None

    async def _lost(self, h: H) -> None:
        """``h`` cannot be read: removed (perhaps made again at once), or broken."""
        if self._held.get(h.scope) is not h:
            return
        gone = not h.cg.exists()
        if h.id and self._dog is not None:
            self._ask(h, "forget")  # it removes the journal entry: nothing is left to restore
            h.entry = "-"
        self._drop_entry(h)
        self._close(h)
        if not gone:
            self.faults += 1
            log.error("cgroup %s: %s", h.named, self.UNREADABLE)
            return
        if (self._root / h.scope.path.lstrip("/")).is_dir():
            log.warning("cgroup %s was removed and made again; %s", h.scope.path, self.TAKING.format("the new one"))
            await self._take(h.scope)
            return
        self._waiting.add(h.scope)
        if h.scope.path in self._named:
            log.warning("cgroup %s was removed; waiting for it to come back", h.named)
        else:
            log.info("cgroup %s (matching %s) was removed", h.scope.path, h.named)

    # --- the loop -----------------------------------------------------------------------------

    async def _loop(self, poller: Poller[tuple[str, object]], scopes: ScopeWatcher) -> None:
        spec = self.spec
        now = time.monotonic()
        next_idle, next_rescan = now + spec.idle_poll_s, now + spec.rescan_s
        next_ping = now + max(spec.rescan_s, PING_MIN_S)
        while True:
            polls = [h.next_poll for h in self._held.values() if self._polled(h)]
            timeout = max(0.0, min([next_idle, next_rescan, next_ping, *polls]) - time.monotonic())
            ready = await poller.wait(timeout)
            for (kind, obj), _ in ready:
                if kind == "dog":
                    await self._hear_watchdog()
                elif kind == "scopes":
                    appeared, vanished = scopes.changes()
                    for scope in sorted(vanished):
                        self._refused.pop(scope, None)
                        h = self._held.get(scope)
                        if h is not None and not h.cg.exists():
                            await self._lost(h)
                    for scope in sorted(appeared):
                        if scope not in self._held:
                            await self._take(scope)
                else:
                    await self._ready(kind, obj)
            now = time.monotonic()
            for h in [h for h in self._held.values() if self._polled(h) and h.next_poll <= now]:
                if self._held.get(h.scope) is h:
                    await self._follow(h, signalled=False)
            if now >= next_idle:
                next_idle = now + spec.idle_poll_s
                for h in list(self._held.values()):
                    if self._held.get(h.scope) is not h:
                        continue
                    if h.cg.replaced():
                        await self._lost(h)  # removed and made again between two looks
                    else:
                        await self._follow(h, signalled=False)
            if now >= next_rescan:
                next_rescan = now + spec.rescan_s
                # One held by another oomkit may be free now; a match inotify missed is found.
                for scope in sorted(scopes.scan()):
                    if scope not in self._held and self._refused.get(scope, True):
                        await self._take(scope, quiet=True)
            if now >= next_ping:
                next_ping = now + max(spec.rescan_s, PING_MIN_S)
                await self._ping()

    async def _send(self, event: Event) -> None:
        # A full engine queue must not stall this loop: wait one poll interval at most, then
        # drop the event (an episode still under way signals again).  The deadline is the
        # watchdog's, whatever happens here.
        assert self._emit is not None
        with anyio.move_on_after(self.spec.poll_interval_s) as waited:
            await self._emit(event)
        if waited.cancelled_caught:
            self.dropped += 1
            if not self._full:
                log.warning("engine queue full: %s events from %s are being dropped", event.kind, self.name)
            self._full = True
        else:
            self._full = False

    # --- the watchdog -------------------------------------------------------------------------

    def _ask(self, h: H, verb: str) -> None:
        if self._dog is None or not h.id:
            return
        try:
            self._dog.send(verb, h.id)
            h.arm_asked = verb == "arm"
        except WatchdogGone:
            pass  # noticed by the loop: its socket reads end of file

    def _ask_release(self, h: H) -> bool:
        """Ask the watchdog to give ``h``'s episode back to the kernel now (for the engine's
        :meth:`hand_back`; it answers ``handback`` as at a deadline)."""
        assert self._dog is not None
        try:
            self._dog.send("release", h.id)
            h.released = True
        except WatchdogGone:
            return False  # its death is noticed by the loop, which restores every cgroup
        return True

    async def _watchdog_late(self, h: H, late: float) -> None:
        dog = self._dog
        if dog is None:
            return
        log.error(
            "cgroup %s: the %s watchdog (pid %d) has not %s %.1f s after its deadline (stopped or stuck); replacing it",
            h.named, self.WHAT, dog.pid, self.GAVE_BACK, late,
        )
        await dog.kill()
        await self._watchdog_died()

    async def _ping(self) -> None:
        dog = self._dog
        if dog is None:
            return
        if self._pinged - self._ponged >= PINGS_MISSED:
            # Stopped, or stuck: a watchdog that cannot act is no watchdog.
            log.error(
                "%s: the %s watchdog (pid %d) has not answered for %g s; replacing it",
                self.name, self.WHAT, dog.pid, PINGS_MISSED * max(self.spec.rescan_s, PING_MIN_S),
            )
            await dog.kill()
            await self._watchdog_died()
            return
        self._pinged += 1
        try:
            dog.send("ping", str(self._pinged))
        except WatchdogGone:
            await self._watchdog_died()

    async def _hear_watchdog(self) -> None:
        dog = self._dog
        if dog is None:
            return
        try:
            said = dog.messages()
        except WatchdogGone:
            await self._watchdog_died()
            return
        for words in said:
            self._said(words)

    def _said(self, words: list[str], strict: bool = False) -> None:
        """One message from the watchdog."""
        if not words:
            return
        verb, args = words[0], words[1:]
        if verb == "pong" and args and args[0].isdigit():
            self._ponged = max(self._ponged, int(args[0]))
            return
        h = next((h for h in self._held.values() if args and h.id == args[0]), None)
        if verb == "err" and h is None:
            log.error("%s: the watchdog says: %s", self.name, " ".join(words))
        elif h is None:
            return  # about a cgroup let go meanwhile
        elif verb == "idle":
            h.released = False  # resolved meanwhile: nothing was handed back
        elif verb == "busy":
            h.arm_asked = False  # still in its episode: asked again at its end
        elif verb == "gone":
            h.id, h.entry = "", "-"  # the watchdog removed its entry and let it go
        else:
            self._heard(h, verb, args, strict)

    def _refused_by_watchdog(self, h: H, args: list[str], strict: bool, cleanup: Callable[[H], None]) -> None:
        """The watchdog refused ``h`` (``err``): it is let go, after ``cleanup``, for good."""
        why = watchdog.unquote(" ".join(args[1:]))
        h.id = ""  # not guarded: this process removes its entry
        cleanup(h)
        self._close(h)
        self._refused[h.scope] = False
        if strict:
            raise SourceError(f"cgroup {h.named!r}: the watchdog refused it: {why}")
        self.faults += 1
        log.error("cgroup %s: the watchdog refused it: %s", h.named, why)

    async def _watchdog_died(self) -> None:
        dog = self._dog
        assert dog is not None and self._poller is not None
        self._poller.unregister(dog.fileno())
        self._dog = None
        status = await dog.reap()
        now = time.monotonic()
        self._deaths = [t for t in self._deaths if now - t < RESTART_WINDOW_S] + [now]
        # Nothing guards the cgroups now: they go back to the kernel until a new one runs.
        orphans = [h for h in list(self._held.values()) if self._orphaned(h)]
        n, allowed = len(self._deaths), self.spec.watchdog_restarts
        if n > allowed:
            for h in list(self._held.values()):
                self._drop_entry(h)  # restored just above
                self._close(h)
            raise WatchdogError(
                f"the {self.WHAT} watchdog (pid {dog.pid}) {status}, {n} death(s) in {RESTART_WINDOW_S / 60:g} minutes"
                f" ({allowed} restart(s) allowed): the {self.WHAT} ends, {self.ALL_BACK}"
            )
        self.restarts += 1
        log.error(
            "%s: the %s watchdog (pid %d) %s; %s; starting a new one (restart %d of %d allowed in %g minutes)",
            self.name, self.WHAT, dog.pid, status, self.ALL_BACK, n, allowed, RESTART_WINDOW_S / 60,
        )
        await self._start_watchdog()
        for h in orphans:
            if self._held.get(h.scope) is not h:
                continue
            try:
                # Written again: a watchdog that exited on a signal removed the entries it restored.
                h.entry = self._journal.write(
                    Journal.entry(self.KIND, h.scope.path, h.original, self._written(h), h.cg.ino, self.name)
                )
            except JournalError as exc:
                self.faults += 1
                log.error("%s; %s stays with the kernel", exc, h.named)
                self._close(h)
                continue
            await self._add(h, wait=False)
