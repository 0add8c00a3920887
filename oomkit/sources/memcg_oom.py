"""cgroup v1 memcg OOMs: take the decision over from the kernel, or watch the kernel make it.

Takeover (the default) sets ``oom_kill_disable=1`` on each configured memcg, so a task that
hits the limit is paused instead of killed, and emits an ``oom`` event for the engine to act
on.  The kernel signals the *start* of an OOM on an eventfd but never its end, so while a
memcg is under OOM the source re-reads ``under_oom`` every ``poll_interval_s``.

The deadline and the restore do not depend on this process.  A watchdog child
(:mod:`oomkit.watchdog`, started before anything is changed) holds eventfds of its own on
every memcg taken over and is the only process that writes ``oom_kill_disable`` while it
runs: it arms a memcg when the source asks, hands an OOM no kill resolved within
``deadline_s`` back to the kernel (``oom_kill_disable=0``) by itself, and restores every
memcg when this process goes, however it goes (a plugin stuck, SIGSTOP, SIGKILL).  The
source asks for the memcg again once it is out of OOM, so a hand-back lasts while the daemon
cannot act.  A watchdog that dies is noticed at once: this process restores every memcg,
says so in one line and starts a new one, up to ``watchdog_restarts`` times in ten minutes;
one more death ends the source with an error (the engine stops, unless ``[engine]
on_source_failure = "continue"``).  A watchdog that is stopped or stuck counts as dead: one
that lets an OOM run more than a second (or one more deadline) past its deadline, or leaves
three pings unanswered, is killed and replaced the same way.

Before anything is changed, each memcg's original ``oom_kill_disable`` is journalled under
``[paths] run_dir`` (:mod:`oomkit.journal`), for ``oomkit restore`` when nothing survived.

A memcg is held through its directory's fd (:mod:`oomkit.cgroupdir`): paths are resolved to
one canonical form before any check, the "never oomkit's own memcg or an ancestor" check
included, and the lock is ``flock`` on that fd, so no second oomkit can hold it under another
spelling or another ``run_dir``.  ``cgroups`` may hold glob patterns: matches are taken over
as they appear.  A memcg removed is *waiting to come back* (logged once) and taken over
again when it does, also when it is made again at once.  A child memcg made under one taken
over inherits ``oom_kill_disable=1`` (its OOM does not wake the parent's eventfd): unless the
config names it, the watchdog resets it to 0 at once (inotify here, and its own rescan every
``rescan_s``), and on exit.

Observe mode (``takeover = false``) touches nothing.  In both modes an increase of the
``oom_kill`` counter becomes a ``kernel-kill`` event, so notifiers report the kernel's own
kills, including those after a deadline handback.
"""

from __future__ import annotations

import contextlib
import logging
import select
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal, final

import anyio
import anyio.lowlevel
import msgspec

from .. import urgency, watchdog
from ..cgroupdir import LOCK_ATTEMPTS, CgroupDir
from ..cgroupfs import V1Event, canonical_path, mounts_for, register_v1_event
from ..config import Config, ConfigError
from ..errors import SourceError
from ..events import Event, Scope
from ..inotify import IN_CREATE, IN_IGNORED, IN_ISDIR, IN_MOVED_TO, IN_ONLYDIR, IN_Q_OVERFLOW, Inotify
from ..journal import Journal, JournalError
from ..poller import Poller
from ..procfs import own_cgroup
from ..status import ScopeState, ScopeStatus, SourceStatus, WatchdogStatus
from ..units import Interval
from ..watchdog_client import WatchdogError, WatchdogGone, quote
from .base import SourceSettings
from .guarded import LATE_S, GuardedSource, Held
from .scopes import has_magic, matches

__all__ = ["MemcgOomSource", "MemcgOomSourceConfig", "WatchdogError"]

log = logging.getLogger("oomkit.sources.memcg_oom")


class MemcgOomSourceConfig(SourceSettings, frozen=True, tag="memcg-oom", kw_only=True):
    """Takes over the OOM decision of cgroup v1 memory cgroups (``oom_kill_disable=1``).

    ``cgroups`` are absolute cgroupfs paths or paths relative to the v1 memory mount, or glob
    patterns of either (followed as memcgs come and go).  With ``takeover = false`` the
    source only watches them and reports the kernel's kills.
    """

    cgroups: tuple[str, ...]
    """The memcgs: paths or glob patterns, absolute cgroupfs paths or relative to the v1
    memory mount."""
    takeover: bool = True
    """Set ``oom_kill_disable=1`` and decide; false only reports the kernel's own kills."""
    deadline_s: Interval = 1.0
    """If no kill resolved an OOM by then, the watchdog hands it back to the kernel's own killer."""
    poll_interval_s: Interval = 0.02
    """How often ``under_oom`` is re-read while a cgroup is out of memory: the kernel signals
    the start of an OOM but not its end."""
    idle_poll_s: Interval = 1.0
    """How often the ``oom_kill`` counter is read when nothing is signalled: a global OOM
    that kills inside the cgroup notifies nobody."""
    rescan_s: Interval = 5.0
    """How often the watchdog re-reads every memcg it guards and walks their descendants for
    an inherited ``oom_kill_disable=1`` (inotify finds new children at once; this is the
    fallback, and the longest a new child's OOM stays paused while the daemon cannot act),
    and how often the source looks for matches inotify missed.  The source also pings its
    watchdog every ``rescan_s`` (2 s at least): three pings unanswered, and it is killed and
    replaced as a dead one would be."""
    watchdog_restarts: Annotated[int, msgspec.Meta(ge=0, le=100)] = 3
    """How many dead watchdogs are replaced within ten minutes; the next death ends the
    takeover with an error (0: the first one does)."""

    def __post_init__(self) -> None:
        if not self.cgroups:
            raise ValueError("`cgroups` needs at least one cgroup")
        if self.poll_interval_s > self.deadline_s:
            raise ValueError("`poll_interval_s` cannot be longer than `deadline_s`")


OOM_CONTROL = "memory.oom_control"

State = Literal["observing", "adding", "armed", "handed-back"]


@dataclass(slots=True, eq=False, kw_only=True)
class _Held(Held):
    event: V1Event
    state: State = "observing"
    oom_kills: int = 0
    in_oom: bool = False
    recheck: bool = False
    """Read once more one poll interval after a signal (a kernel kill lands just after)."""
    woke_ns: int = 0
    """When the eventfd last woke us (0: the OOM was found by polling, not signalled)."""
    oom_since: float = 0.0
    """When this process first saw the current OOM (its own view of the deadline)."""
    watch: int = -1
    """Its inotify watch (new children), or -1."""


@final
class MemcgOomSource(GuardedSource[_Held]):
    """OOM takeover (or observation) for the v1 memcgs of one ``memcg-oom`` source.

    The constructor refuses, with a :class:`~oomkit.config.ConfigError` naming the cgroup, a
    path that is not one (too long, climbing out of the mount), a memcg that does not exist
    and, in takeover mode, the memcg oomkit runs in or any of its ancestors (an OOM there
    would pause oomkit itself).  Glob patterns may match nothing yet.  It takes no lock and
    changes nothing, so ``oomkit check``, ``top`` and ``plugins`` work while a daemon holds
    the memcgs; :meth:`run` refuses, before it changes anything, a memcg another oomkit
    holds and a ``run_dir`` it cannot journal in.
    """

    settings_type = MemcgOomSourceConfig
    KIND = "v1"
    WHAT = "takeover"
    TAKING = "taking {} over"
    GAVE_BACK = "handed it back"
    ALL_BACK = "every memcg is back with the kernel"
    UNREADABLE = f"cannot read {OOM_CONTROL}; no longer watched"

    spec: MemcgOomSourceConfig

    def __init__(self, spec: MemcgOomSourceConfig, config: Config) -> None:
        root = mounts_for(config.paths).memory_v1
        if root is None:
            raise ConfigError(f"cgroup {spec.cgroups[0]!r}: the cgroup v1 memory controller is not mounted on this machine")
        super().__init__(spec, config, root)
        engine = config.engine
        self._urgency = ((engine.urgent_switch_interval_s, engine.urgent_park_s, engine.urgent_realtime_priority)
                         if spec.takeover else None)
        self._own = own_cgroup(config.paths.proc, "memory") if spec.takeover else None
        for configured in spec.cgroups:
            rel = canonical_path(root, configured)
            if rel in self._named:
                raise ConfigError(f"cgroup {configured!r}: named twice (also as {self._named[rel]!r})")
            self._named[rel] = configured
            if not has_magic(rel):
                self._check(configured, Scope("v1", rel))
        self._kids: Inotify | None = None
        self._kid_watch: dict[int, _Held] = {}

    def _check(self, configured: str, scope: Scope) -> None:
        # Checked here so a bad config fails at once; run() takes the memcg (and its lock).
        cg = self._open(configured, scope)
        try:
            if self.spec.takeover:
                self._refusal(configured, scope, cg, raise_=True, lock=False)
        finally:
            cg.close()

    def _open(self, configured: str, scope: Scope) -> CgroupDir:
        d = self._root / scope.path.lstrip("/")
        try:
            cg = CgroupDir.open(self._root, scope)
        except FileNotFoundError:
            raise ConfigError(f"cgroup {configured!r}: no such cgroup ({d} does not exist)") from None
        except OSError as exc:
            raise ConfigError(f"cgroup {configured!r}: cannot open {d}: {exc.strerror}") from None
        try:
            cg.read(OOM_CONTROL, 64)
        except OSError as exc:
            cg.close()
            raise ConfigError(f"cgroup {configured!r}: not a v1 memory cgroup ({OOM_CONTROL}: {exc.strerror})") from None
        return cg

    def _refusal(
        self, named: str, scope: Scope, cg: CgroupDir, *, raise_: bool, attempts: int = LOCK_ATTEMPTS, lock: bool = True
    ) -> tuple[str, bool] | None:
        """Why this memcg cannot be taken over, and whether that may change (another oomkit
        may let go; oomkit's own memcg stays its own); None: it can, and (with ``lock``) its
        lock is ours now."""
        own = self._own
        if own is not None and watchdog.inside(own, scope.path):
            what = "it" if own == scope.path else f"its descendant {own}"
            why, retry = f"cgroup {named!r}: oomkit runs in {what}; an OOM there would pause oomkit too", False
        elif lock and not cg.lock(attempts):
            holder = cg.holder()
            why, retry = f"cgroup {named!r}: another oomkit (pid {holder or 'unknown'}) holds it", True
        else:
            return None
        if raise_:
            raise ConfigError(why)
        return why, retry

    def __repr__(self) -> str:
        mode = "takeover" if self.spec.takeover else "observe"
        paths = ",".join(sorted(s.path for s in self._held))
        dog = f" watchdog={self._dog.pid}" if self._dog is not None else ""
        return f"<MemcgOomSource {self.name!r} {mode} {paths}{dog} faults={self.faults}>"

    @property
    def watching(self) -> list[Scope]:
        """The memcgs held (taken over or observed) now."""
        return sorted(self._held)

    def status(self) -> SourceStatus:
        scopes = []
        for h in sorted(self._held.values(), key=lambda h: h.scope):
            state: ScopeState
            if h.state == "observing":
                state = "observed"
            elif h.state == "handed-back":
                state = "handed-back"  # the kernel decides until this OOM ends
            else:
                state = "taken-over"
            scopes.append(ScopeStatus(scope=h.scope, state=state, detail=h.named))
        for scope in sorted(self._waiting - self._held.keys()):
            scopes.append(ScopeStatus(scope=scope, state="missing", detail=self._named_as(scope)))
        dog = self._dog
        return SourceStatus(
            name=self.name,
            kind="memcg-oom",
            mode="takeover" if self.spec.takeover else "observe",
            scopes=tuple(scopes),
            counters={
                "handbacks": self.handbacks, "faults": self.faults, "dropped": self.dropped,
                "watchdog_restarts": self.restarts,
            },
            watchdog=None if dog is None else WatchdogStatus(pid=dog.pid, alive=dog.alive),
        )

    # --- lifecycle ----------------------------------------------------------------------------

    @property
    def _guards(self) -> bool:
        return self.spec.takeover

    def _setup(self, poller: Poller[tuple[str, object]]) -> None:
        self._kids = Inotify()
        poller.register(self._kids.fileno(), select.EPOLLIN, ("kids", None))

    def _teardown(self) -> None:
        if self._kids is not None:
            self._kids.close()
            self._kids = None

    def _close(self, h: _Held) -> None:
        self._held.pop(h.scope, None)
        if self._poller is not None:
            self._poller.unregister(h.event.efd)
        h.event.close()
        if h.watch >= 0 and self._kids is not None:
            self._kid_watch.pop(h.watch, None)
            try:
                self._kids.rm_watch(h.watch)
            except OSError:
                pass
            h.watch = -1
        h.cg.close()

    def _restore_here(self, h: _Held, *, keep_entry: bool) -> None:
        """Restore ``h`` from this process (no watchdog is there to do it)."""
        try:
            state = h.cg.keyed(OOM_CONTROL)
            if state.get("oom_kill_disable") == 1 and h.original != "1":
                h.cg.write(OOM_CONTROL, h.original)
            if h.original == "0":
                skip = {(o.cg.dev, o.cg.ino) for o in self._held.values()}
                _, failed = watchdog.reset_descendants(h.cg.fd, ".", skip)
                for line in failed:
                    log.error("cgroup %s: cannot reset a descendant: %s", h.named, line)
        except OSError as exc:
            if h.cg.exists():
                self.faults += 1
                log.error("cgroup %s: cannot restore oom_kill_disable=%s: %s", h.named, h.original, exc.strerror)
                return
        if not keep_entry:
            self._drop_entry(h)

    # --- taking memcgs over -------------------------------------------------------------------

    def _is_named(self, scope: Scope) -> bool:
        return scope.path in self._named or any(matches(p, scope.path) for p in self._named)

    async def _take(self, scope: Scope, *, startup: bool = False, quiet: bool = False) -> None:
        # Taken over, or observed.
        named = self._named_as(scope)
        strict = startup and scope.path in self._named
        try:
            cg = self._open(named, scope)
        except ConfigError as exc:
            if strict:
                raise
            if scope not in self._refused:
                log.info("%s: %s", self.name, exc)
            self._refused[scope] = False
            return
        try:
            refused = None
            if self.spec.takeover:
                refused = self._refusal(named, scope, cg, raise_=strict, attempts=1 if quiet else LOCK_ATTEMPTS)
        except ConfigError:
            cg.close()
            raise
        if refused is not None:
            if scope not in self._refused:
                log.warning("%s: %s; leaving it alone", self.name, refused[0])
            self._refused[scope] = refused[1]
            cg.close()
            return
        original, entry = "0", "-"
        try:
            state = cg.keyed(OOM_CONTROL)
            if self.spec.takeover:
                original = self._original(scope, named, cg, state)
                entry = self._journal.write(Journal.entry("v1", scope.path, original, "1", cg.ino, self.name))
            event = register_v1_event(cg.fd, OOM_CONTROL)
        except (OSError, ValueError, JournalError) as exc:
            cg.close()
            if entry != "-":
                with contextlib.suppress(JournalError):  # nothing was changed: nothing to restore
                    self._journal.remove(entry)
            why = exc.strerror if isinstance(exc, OSError) else str(exc)
            if strict:
                raise SourceError(f"cgroup {named!r}: cannot take it over: {why}") from None
            self.faults += 1
            log.error("%s: cgroup %s: cannot %s it: %s", self.name, scope.path, "take over" if self.spec.takeover else "watch", why)
            return
        h = _Held(scope=scope, named=named, cg=cg, event=event, original=original, entry=entry,
                  oom_kills=state.get("oom_kill", 0), back=scope in self._waiting)
        self._hold(h)
        assert self._poller is not None
        self._poller.register(event.efd, select.EPOLLIN, ("oom", h))
        if not self.spec.takeover:
            log.info("%s: watching %s%s", self.name, scope.path, " again: it is back" if h.back else "")
            return
        self._watch_children(h)
        await self._add(h, wait=startup)

    def _original(self, scope: Scope, named: str, cg: CgroupDir, state: dict[str, int]) -> str:
        """The value to put back on exit, as the journal will say."""
        stale = self._journal.find("v1", scope.path, "memory.oom_control", cg.ino)
        if stale is not None:
            _, entry = stale
            log.warning(
                "cgroup %s: a journal entry left by oomkit pid %d says its original oom_kill_disable is %s; kept",
                named, entry.pid, entry.original,
            )
            return entry.original
        if not state.get("oom_kill_disable"):
            return "0"
        parent = Scope("v1", str(Path(scope.path).parent))
        while True:
            holder = self._held.get(parent)
            if holder is not None and holder.state != "observing":
                # Made under a memcg we hold: the 1 is ours, inherited, not its original.
                return holder.original
            if parent.path == "/":
                break
            parent = Scope("v1", str(Path(parent.path).parent))
        log.warning("cgroup %s already had oom_kill_disable=1; taking it over, and putting 1 back on exit", named)
        return "1"

    def _mark_adding(self, h: _Held) -> None:
        h.state = "adding"

    def _written(self, h: _Held) -> str:
        return "1"

    def _watch_children(self, h: _Held) -> None:
        if self._kids is None:
            return
        try:
            h.watch = self._kids.add_watch(h.cg.path, IN_CREATE | IN_MOVED_TO | IN_ONLYDIR)
            self._kid_watch[h.watch] = h
        except OSError as exc:
            # The watchdog's rescan still finds new children, only later.
            log.warning("cgroup %s: cannot watch for new children (%s); found every %g s instead", h.named, exc.strerror, self.spec.rescan_s)

    # --- the loop -----------------------------------------------------------------------------

    def _polled(self, h: _Held) -> bool:
        return h.in_oom or h.recheck

    def _urgent(self) -> contextlib.AbstractContextManager[None]:
        if self._urgency is None:
            return contextlib.nullcontext()
        return urgency.urgent(*self._urgency)

    async def _ready(self, kind: str, obj: object) -> None:
        if kind == "oom":
            assert isinstance(obj, _Held)
            if self._held.get(obj.scope) is obj:
                # The event's time is the wake itself, so the reads below count as latency.
                obj.woke_ns = time.monotonic_ns()
                # Urgent from the wake on (oomkit.urgency): the reads here and the hand-over
                # to the engine must not queue for the GIL behind a ranking.
                with self._urgent():
                    await self._follow(obj, signalled=obj.event.drain() > 0)
                    # The engine's dispatcher takes the urgency over before it lapses.
                    await anyio.lowlevel.checkpoint()
        elif kind == "kids":
            self._new_children()

    async def _follow(self, h: _Held, *, signalled: bool) -> None:
        """Read one memcg's state: report kills and OOMs, notice its end or its removal."""
        try:
            state = h.cg.keyed(OOM_CONTROL)
        except (OSError, ValueError):
            await self._lost(h)
            return
        await self._report_kills(h, state)
        takeover = self.spec.takeover
        now = time.monotonic()
        disable = state.get("oom_kill_disable", 0)
        if state.get("under_oom"):
            first = not h.in_oom
            h.in_oom = True
            if first:
                h.oom_since = now
            if takeover and disable == 1 and (first or signalled):
                await self._send(self._oom_event(h, state))
            elif takeover and disable == 0 and h.state == "armed":
                h.state = "handed-back"  # its message is on the way, or was dropped
            h.next_poll = now + self.spec.poll_interval_s
            late = now - h.oom_since - self.spec.deadline_s
            if takeover and disable == 1 and h.state == "armed" and late > max(self.spec.deadline_s, LATE_S):
                await self._watchdog_late(h, late)
            return
        h.in_oom = False
        h.recheck = signalled  # one more read: in observe mode the kernel's kill lands just after
        h.next_poll = now + self.spec.poll_interval_s
        if h.state == "handed-back" and not h.arm_asked:
            # Out of OOM after a hand-back: ours again.  Asked by this process, so a daemon
            # that is stopped or stuck leaves the memcg with the kernel.
            self._ask(h, "arm")

    def _oom_event(self, h: _Held, state: dict[str, int]) -> Event:
        values: dict[str, float] = {"under_oom": 1, "oom_kill_total": state.get("oom_kill", 0)}
        for key, name in (("usage_bytes", "memory.usage_in_bytes"), ("limit_bytes", "memory.limit_in_bytes")):
            try:
                values[key] = int(h.cg.read(name, 64))
            except (OSError, ValueError):
                pass  # context only: the event matters more than its decoration
        woke, h.woke_ns = h.woke_ns or time.monotonic_ns(), 0
        return Event(source=self.name, kind="oom", scope=h.scope, values=values, monotonic_ns=woke)

    async def _report_kills(self, h: _Held, state: dict[str, int]) -> None:
        total = state.get("oom_kill", 0)
        delta, h.oom_kills = total - h.oom_kills, total
        if delta > 0:
            values: dict[str, float] = {"oom_kill_delta": delta, "oom_kill_total": total}
            await self._send(Event(source=self.name, kind="kernel-kill", scope=h.scope, values=values))

    # --- children -----------------------------------------------------------------------------

    def _new_children(self) -> None:
        assert self._kids is not None
        for ev in self._kids.read():
            if ev.mask & IN_Q_OVERFLOW:
                for held in self._held.values():
                    self._ask_scan(held, ".")
                continue
            if ev.mask & IN_IGNORED:
                self._kid_watch.pop(ev.wd, None)
                continue
            h = self._kid_watch.get(ev.wd)
            if h is None or not ev.mask & IN_ISDIR or not ev.mask & (IN_CREATE | IN_MOVED_TO):
                continue
            child = Scope("v1", h.scope.path.rstrip("/") + "/" + ev.name)
            if not self._is_named(child):  # one the config names is taken over instead
                self._ask_scan(h, ev.name)

    def _ask_scan(self, h: _Held, rel: str) -> None:
        if self._dog is not None and h.state != "observing" and h.original == "0":
            try:
                self._dog.send("scan", h.id, quote(rel))
            except WatchdogGone:
                pass

    # --- the watchdog -------------------------------------------------------------------------

    def _heard(self, h: _Held, verb: str, args: list[str], strict: bool) -> None:
        if verb == "ok":
            h.state = "armed"
            if h.back:
                log.warning("cgroup %s is back; taken over again", h.scope.path)
            else:
                log.info("cgroup %s: taken over (original oom_kill_disable=%s journalled)", h.scope.path, h.original)
            h.back = False
        elif verb == "err":
            self._refused_by_watchdog(h, args, strict, lambda h: self._restore_here(h, keep_entry=False))
        elif verb == "armed":
            h.state, h.arm_asked = "armed", False
            log.info("cgroup %s: out of OOM; taken over again", h.named)
        elif verb == "handback":
            h.state = "handed-back"
            self.handbacks += 1
            if h.released:
                h.released = False  # asked for by the engine, and logged then
            else:
                log.warning(
                    "cgroup %s: OOM not resolved within %g s; the watchdog handed it back to the kernel",
                    h.named, self.spec.deadline_s,
                )
        elif verb == "reset" and len(args) > 1:
            log.warning(
                "cgroup %s: its child %s inherited oom_kill_disable=1 and the config does not name it;"
                " reset to 0 (the kernel decides its OOMs)", h.named, watchdog.unquote(args[1]),
            )

    def _orphaned(self, h: _Held) -> bool:
        if h.state == "observing":
            return False
        self._restore_here(h, keep_entry=True)
        h.state, h.id, h.arm_asked = "adding", "", False
        return True

    # --- what the engine asks -----------------------------------------------------------------

    def hand_back(self, event: Event) -> bool:
        """The engine will not kill: let the kernel's own killer resolve this OOM now.

        Asked of the watchdog, the only writer (it answers ``handback`` as at a deadline);
        taken over again once the memcg is out of OOM, as after a deadline.  True when the
        memcg is under an OOM of ours and the watchdog was asked.
        """
        h = self._held.get(event.scope)
        if h is None or event.kind != "oom" or h.state != "armed" or not h.id or self._dog is None:
            return False
        try:
            state = h.cg.keyed(OOM_CONTROL)
        except (OSError, ValueError):
            return False
        if not (state.get("under_oom") and state.get("oom_kill_disable") == 1):
            return False
        if not self._ask_release(h):
            return False
        log.warning("cgroup %s: oomkit kills nobody here; handing the OOM back to the kernel", h.named)
        return True

    # --- the engine's re-check ----------------------------------------------------------------

    def still_holds(self, event: Event) -> bool:
        """Is the memcg still paused at its limit, and still ours to decide?"""
        h = self._held.get(event.scope)
        if h is None:
            return False  # let go: removed, or never ours
        try:
            state = h.cg.keyed(OOM_CONTROL)
        except (OSError, ValueError):
            return False  # the memcg is gone, and everyone in it
        if not state.get("under_oom"):
            return False
        # Handed back (by the watchdog's deadline): the kernel decides, the engine must not.
        return not self.spec.takeover or state.get("oom_kill_disable") == 1
