"""The cgroup v2 brake: take the decision over by lowering ``memory.high`` under ``memory.max``.

cgroup v2 has no ``oom_kill_disable``: the kernel cannot be asked to pause a cgroup at its
limit and wait.  What it offers is ``memory.high``: above it, the cgroup's allocating tasks
are reclaimed from and then throttled (measured in the guest: ~63 MiB/s down to ~0.4 MiB/s
16 MiB over), and the ``high`` counter of ``memory.events`` rises, while nothing is killed.
So for each configured cgroup with a ``memory.max`` this source sets ``memory.high`` a
``margin`` under it (journalled first, as the v1 takeover journals ``oom_kill_disable``),
wakes when ``high`` rises (inotify ``IN_MODIFY`` on ``memory.events``), and emits an ``oom``
event while the cgroup is *stuck at its brake* (:func:`oomkit.watchdog.stuck`: usage at or
above ``memory.high``, and not merely page cache the kernel trims there by itself), so the
engine decides while the cgroup crawls.  The kernel's own OOM killer at ``memory.max``
stays the fallback.

The brake's limits, designed for:

* The kernel's delay is per task, on return to user space, skipped while the overage is
  small, growing with it and capped at 2 s per return: N allocating tasks climb about N
  times faster, and a task allocating in one long system call is not stopped at all.  The
  brake buys time; it does not hold a cgroup the way a v1 takeover does.  ``python -m bench
  v2brake`` measures how long it holds 1 and 20 tasks.
* ``memory.events`` notifications are rate-limited (~100/s): an episode is followed by
  reading ``memory.current`` every ``poll_interval_s``, not by counting notifications, and
  every ``idle_poll_s`` each cgroup is read anyway.
* A deadline per episode: if the cgroup is still stuck ``deadline_s`` after the episode
  began, the watchdog releases the brake (``memory.high`` back to the journalled original)
  and the kernel decides at ``memory.max``; the brake is put back once usage is under the
  brake point again.  The watchdog (:mod:`oomkit.watchdog`, kind ``v2``) is the only writer
  of ``memory.high`` while it runs, enforces the deadline without this process, and
  restores every cgroup when this process dies; ``oomkit restore`` does it when nothing
  survived.
* systemd and the kubelet write ``memory.high`` too.  A value is restored only while the
  file still holds what oomkit wrote; *following* an operator's change means: a
  ``memory.high`` oomkit did not write is theirs from then on.  oomkit never writes it
  again for that cgroup (no deadline release, no restore; its journal entry is removed),
  keeps watching it, and emits ``oom`` when the cgroup is stuck at *their* value, so the
  engine still decides at whatever brake point is in force.  The same holds at start: a
  cgroup whose ``memory.high`` is already at or under the brake point is followed, not
  written.  A later start brakes it again only if its brake point is lower than what it
  finds there.

Refused, in one line naming the cgroup: a cgroup without a ``memory.max`` (nothing to brake
under; a glob match is looked at again every ``rescan_s``, as container runtimes set the
limit after ``mkdir``), a margin not smaller than the limit, a cgroup oomkit runs in or
below (it would throttle oomkit itself), one another oomkit holds (the ``flock`` of
:mod:`oomkit.cgroupdir`).  A cgroup removed while braked is *waiting to come back*: its
journal entry goes with it and it is braked again when it reappears.  ``memory.high`` is
not inherited, so descendants need nothing.  Writing a ``memory.high`` under the current
usage makes the kernel reclaim in the writer (the watchdog) before the write returns,
bounded by its retries.  The brake follows ``memory.max``: a limit changed (a pod resized
in place, an operator's ``systemctl set-property``) is seen at the next look (every
``idle_poll_s`` at the latest), the old brake is taken off and the cgroup braked again
``margin`` under the new limit, so a raised limit is not throttled at the old point and a
lowered one is not left to the kernel's killer; a limit set to ``max`` leaves nothing to brake
under, and the cgroup waits, unbraked, for a limit again (looked at every ``rescan_s``).
An increase of ``oom_kill`` becomes a ``kernel-kill`` event, so notifiers report the
kernel's own kills (after a release, say).
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import select
import time
from dataclasses import dataclass, field
from typing import Annotated, Literal, final

import anyio
import msgspec

from .. import watchdog
from ..cgroupdir import LOCK_ATTEMPTS, CgroupDir, NotACgroup
from ..cgroupfs import canonical_path, mounts_for
from ..config import Config, ConfigError
from ..errors import SourceError
from ..events import Event, Scope
from ..inotify import IN_MODIFY, IN_Q_OVERFLOW, Inotify
from ..journal import Journal, JournalError
from ..poller import Poller
from ..procfs import own_cgroup
from ..status import ScopeState, ScopeStatus, SourceStatus, WatchdogStatus
from ..units import Interval, Size, parse_threshold
from ..watchdog_client import WATCHDOG_START_S, WatchdogGone
from .base import SourceSettings
from .guarded import LATE_S, GuardedSource, Held
from .scopes import has_magic

__all__ = ["MemoryHighSource", "MemoryHighSourceConfig", "brake_point"]

log = logging.getLogger("oomkit.sources.memory_high")

PAGE = mmap.PAGESIZE
REEMIT_FRACTION = 0.25
"""While an episode lasts, ``high`` keeps rising (up to ~100 notifications a second): the
event is emitted again at most once per this fraction of ``deadline_s``, so a decision that
left the cgroup stuck (a kill that freed too little, a dry run) gets a few more tries before
the deadline, not a storm of them."""


class MemoryHighSourceConfig(SourceSettings, frozen=True, tag="memory-high", kw_only=True):
    """The cgroup v2 brake: ``memory.high`` a ``margin`` under ``memory.max``; an ``oom``
    event while a cgroup is stuck there, for the engine to decide before the kernel kills.

    ``cgroups`` are v2 paths (relative to the v2 mount, or absolute under it) or glob
    patterns of them, followed as cgroups come and go.  Each needs a ``memory.max``.
    """

    cgroups: tuple[str, ...]
    """v2 cgroup paths or glob patterns."""
    margin: str | Size = "16M"
    """How far under ``memory.max`` the brake sits: a size (``"16M"``) or a percentage of
    each cgroup's ``memory.max`` (``"10%"``); rounded to whole pages.  It must leave room:
    a margin not smaller than a cgroup's limit refuses that cgroup."""
    deadline_s: Interval = 2.0
    """If a cgroup is still stuck at its brake this long after the episode began, the
    watchdog releases the brake and the kernel's killer decides at ``memory.max``."""
    poll_interval_s: Interval = 0.05
    """How often ``memory.current`` is read while a cgroup is stuck at its brake (its
    notifications are rate-limited, and its end is never signalled)."""
    idle_poll_s: Interval = 1.0
    """How often each cgroup is read when nothing is signalled."""
    rescan_s: Interval = 5.0
    """How often the watchdog reads every cgroup it guards, and the source retries cgroups
    refused for a reason that may pass (no ``memory.max`` yet, another oomkit's lock).  The
    source also pings its watchdog every ``rescan_s`` (2 s at least)."""
    watchdog_restarts: Annotated[int, msgspec.Meta(ge=0, le=100)] = 3
    """How many dead watchdogs are replaced within ten minutes; the next death ends the
    brake with an error."""

    def __post_init__(self) -> None:
        if not self.cgroups:
            raise ValueError("`cgroups` needs at least one cgroup")
        margin = parse_threshold(self.margin)
        if margin.percent is not None and not 0 < margin.percent < 100:
            raise ValueError(f"`margin` {self.margin!r}: a percentage must be above 0 and below 100")
        if margin.size is not None and margin.size < PAGE:
            raise ValueError(f"`margin` {self.margin!r}: at least one page ({PAGE} bytes)")
        if self.poll_interval_s > self.deadline_s:
            raise ValueError("`poll_interval_s` cannot be longer than `deadline_s`")


def brake_point(limit: int, margin: str | int) -> int:
    """``memory.high`` for a ``memory.max`` of ``limit`` bytes: ``margin`` under it, rounded
    down to a page (the kernel keeps pages, and reads back what it kept); ValueError when
    nothing is left."""
    under = parse_threshold(margin).bytes_of(limit)
    point = (limit - max(under, PAGE)) // PAGE * PAGE
    if point <= 0:
        raise ValueError(f"margin {margin} is not smaller than its memory.max {limit}: nothing left to brake at")
    return point


State = Literal["adding", "braked", "released", "theirs"]


@dataclass(slots=True, eq=False, kw_only=True)
class _Held(Held):
    limit: int
    written: str
    state: State = "adding"
    wd: int = -1
    counters: dict[str, int] = field(default_factory=dict)
    episode: bool = False
    since: float = 0.0
    last_emit: float = 0.0
    theirs: str = ""
    """The ``memory.high`` someone else wrote, once it is theirs."""

    @property
    def slack(self) -> int:
        return self.limit - int(self.written)


@final
class MemoryHighSource(GuardedSource[_Held]):
    """The v2 brake for the cgroups of one ``memory-high`` source.

    The constructor refuses, with a :class:`~oomkit.config.ConfigError` naming the cgroup,
    an exact path that is not a v2 cgroup with the memory controller, has no ``memory.max``,
    has a limit the margin does not fit under, or holds oomkit; it changes nothing and takes
    no lock (``oomkit check`` runs beside a daemon).  :meth:`run` takes the locks.
    """

    settings_type = MemoryHighSourceConfig
    KIND = "v2"
    WHAT = "brake"
    TAKING = "braking {}"
    GAVE_BACK = "released it"
    ALL_BACK = "every cgroup's memory.high is back"
    UNREADABLE = "cannot read its memory files; no longer braked"

    spec: MemoryHighSourceConfig

    def __init__(self, spec: MemoryHighSourceConfig, config: Config) -> None:
        root = mounts_for(config.paths).unified
        if root is None:
            raise ConfigError(f"cgroup {spec.cgroups[0]!r}: cgroup v2 is not mounted on this machine")
        super().__init__(spec, config, root)
        self.episodes = 0
        self.moves = 0
        """Brakes moved because ``memory.max`` changed."""
        self._own = own_cgroup(config.paths.proc, "")
        for configured in spec.cgroups:
            rel = canonical_path(root, configured.removeprefix("v2:"), "cgroup v2 hierarchy")
            if rel in self._named:
                raise ConfigError(f"cgroup {configured!r}: named twice (also as {self._named[rel]!r})")
            self._named[rel] = configured
            if not has_magic(rel):
                cg = self._open(configured, Scope("v2", rel))
                cg.close()
        self._ino: Inotify | None = None
        self._by_wd: dict[int, _Held] = {}

    # --- checks -------------------------------------------------------------------------------

    def _open(self, named: str, scope: Scope) -> CgroupDir:
        """Open ``scope`` and check it can be braked; ConfigError (one line) if not.  The
        caller closes it."""
        d = self._root / scope.path.lstrip("/")
        try:
            cg = CgroupDir.open(self._root, scope)
        except (FileNotFoundError, NotACgroup):
            raise ConfigError(f"cgroup {named!r}: no such cgroup ({d} does not exist)") from None
        except OSError as exc:
            raise ConfigError(f"cgroup {named!r}: cannot open {d}: {exc.strerror}") from None
        try:
            self._limit(named, scope, cg)
        except BaseException:
            cg.close()
            raise
        return cg

    def _limit(self, named: str, scope: Scope, cg: CgroupDir) -> tuple[int, int]:
        """``(memory.max, brake point)``; ConfigError naming the reason it cannot be braked."""
        own = self._own
        if own is not None and watchdog.inside(own, scope.path):
            what = "it" if own == scope.path else f"its descendant {own}"
            raise ConfigError(f"cgroup {named!r}: oomkit runs in {what}; a brake there would throttle oomkit too")
        try:
            raw = cg.read("memory.max", 64).strip()
        except OSError as exc:
            raise ConfigError(
                f"cgroup {named!r}: no memory.max ({exc.strerror}): not a v2 cgroup with the memory controller enabled"
                f" (see {cg.path.parent / 'cgroup.subtree_control'})"
            ) from None
        if raw == b"max":
            raise ConfigError(f"cgroup {named!r}: its memory.max is 'max': there is no limit to brake under")
        try:
            limit = int(raw)
            return limit, brake_point(limit, self.spec.margin)
        except ValueError as exc:
            raise ConfigError(f"cgroup {named!r}: {exc}") from None

    def __repr__(self) -> str:
        paths = ",".join(sorted(s.path for s in self._held))
        dog = f" watchdog={self._dog.pid}" if self._dog is not None else ""
        return f"<MemoryHighSource {self.name!r} {paths}{dog} faults={self.faults}>"

    def status(self) -> SourceStatus:
        scopes = []
        for h in sorted(self._held.values(), key=lambda h: h.scope):
            state: ScopeState
            detail = f"{h.named}: memory.high {h.written} under memory.max {h.limit}"
            if h.state == "released":
                state = "handed-back"
            elif h.state == "theirs":
                state, detail = "observed", f"{h.named}: memory.high {h.theirs} is someone else's; followed"
            else:
                state = "braked"
            scopes.append(ScopeStatus(scope=h.scope, state=state, detail=detail))
        for scope in sorted(self._waiting - self._held.keys()):
            scopes.append(ScopeStatus(scope=scope, state="missing", detail=self._named_as(scope)))
        dog = self._dog
        return SourceStatus(
            name=self.name, kind="memory-high", mode="takeover", scopes=tuple(scopes),
            counters={
                "episodes": self.episodes, "moves": self.moves, "handbacks": self.handbacks, "faults": self.faults,
                "dropped": self.dropped, "watchdog_restarts": self.restarts,
            },
            watchdog=None if dog is None else WatchdogStatus(pid=dog.pid, alive=dog.alive),
        )

    # --- lifecycle ----------------------------------------------------------------------------

    @property
    def _guards(self) -> bool:
        return True

    def _setup(self, poller: Poller[tuple[str, object]]) -> None:
        self._ino = Inotify()
        poller.register(self._ino.fileno(), select.EPOLLIN, ("events", None))

    def _teardown(self) -> None:
        if self._ino is not None:
            self._ino.close()
            self._ino = None

    def _close(self, h: _Held) -> None:
        self._held.pop(h.scope, None)
        if h.wd >= 0 and self._ino is not None:
            self._by_wd.pop(h.wd, None)
            with contextlib.suppress(OSError):
                self._ino.rm_watch(h.wd)
            h.wd = -1
        h.cg.close()

    def _restore_here(self, h: _Held, *, keep_entry: bool) -> None:
        """Compare-and-restore ``memory.high`` from this process (no watchdog to do it)."""
        if h.state in ("braked", "adding"):
            try:
                if h.cg.read("memory.high", 64).decode(errors="replace").strip() == h.written:
                    h.cg.write("memory.high", h.original, truncate=True)
            except OSError as exc:
                if h.cg.exists():
                    self.faults += 1
                    log.error("cgroup %s: cannot restore memory.high=%s: %s", h.named, h.original, exc.strerror)
                    return
        if not keep_entry:
            self._drop_entry(h)

    # --- taking cgroups -----------------------------------------------------------------------

    async def _take(self, scope: Scope, *, startup: bool = False, quiet: bool = False) -> None:
        named = self._named_as(scope)
        strict = startup and scope.path in self._named
        try:
            cg = CgroupDir.open(self._root, scope)
        except OSError as exc:
            if strict:
                raise ConfigError(f"cgroup {named!r}: cannot open it: {exc.strerror}") from None
            self._refused[scope] = False
            return
        try:
            limit, point = self._limit(named, scope, cg)
            if not cg.lock(1 if quiet else LOCK_ATTEMPTS):
                holder = cg.holder()
                raise ConfigError(f"cgroup {named!r}: another oomkit (pid {holder or 'unknown'}) holds it")
        except ConfigError as exc:
            cg.close()
            if strict:
                raise
            if scope not in self._refused:
                log.warning("%s: %s; leaving it alone (looked at again every %g s)", self.name, exc, self.spec.rescan_s)
            self._refused[scope] = True  # a limit may be set, a lock let go
            return
        try:
            current = cg.read("memory.high", 64).decode(errors="replace").strip()
            counters = cg.keyed("memory.events")
        except (OSError, ValueError) as exc:
            cg.close()
            why = exc.strerror if isinstance(exc, OSError) else str(exc)
            if strict:
                raise SourceError(f"cgroup {named!r}: cannot read it: {why}") from None
            self.faults += 1
            log.error("%s: cgroup %s: cannot read it: %s", self.name, scope.path, why)
            return
        original = self._original(scope, named, cg, current)
        if original != "max" and not original.isdigit():
            cg.close()
            if strict:
                raise SourceError(f"cgroup {named!r}: its memory.high reads {original[:40]!r}, not a size")
            self.faults += 1
            log.error("%s: cgroup %s: its memory.high reads %r, not a size; not braked", self.name, scope.path, original[:40])
            return
        h = _Held(scope=scope, named=named, cg=cg, limit=limit, written=str(point), original=original,
                  counters=counters, back=scope in self._waiting)
        self._hold(h)
        self._watch_events(h)
        if original != "max" and int(original) <= point:
            # Someone's brake is already at or under ours: theirs, followed.
            h.state, h.theirs = "theirs", original
            log.info("cgroup %s: its memory.high %s is at or under the brake point %d already; followed, not written",
                     named, original, point)
            return
        try:
            h.entry = self._journal.write(Journal.entry("v2", scope.path, original, h.written, cg.ino, self.name))
        except JournalError as exc:
            self._close(h)
            if strict:
                raise SourceError(f"cgroup {named!r}: cannot brake it: {exc}") from None
            self.faults += 1
            log.error("%s; %s not braked", exc, named)
            return
        await self._add(h, wait=startup)

    def _original(self, scope: Scope, named: str, cg: CgroupDir, current: str) -> str:
        stale = self._journal.find("v2", scope.path, "memory.high", cg.ino)
        if stale is not None and stale[1].written == current:
            log.warning("cgroup %s: a journal entry left by oomkit pid %d says its original memory.high is %s; kept",
                        named, stale[1].pid, stale[1].original)
            return stale[1].original
        return current

    def _watch_events(self, h: _Held) -> None:
        assert self._ino is not None
        try:
            h.wd = self._ino.add_watch(h.cg.path / "memory.events", IN_MODIFY)
            self._by_wd[h.wd] = h
        except OSError as exc:
            log.warning("cgroup %s: cannot watch memory.events (%s); read every %g s instead",
                        h.named, exc.strerror, self.spec.idle_poll_s)

    def _mark_adding(self, h: _Held) -> None:
        h.state = "adding"

    def _written(self, h: _Held) -> str:
        return h.written

    # --- the loop -----------------------------------------------------------------------------

    def _polled(self, h: _Held) -> bool:
        return h.episode or h.state == "released"

    async def _ready(self, kind: str, obj: object) -> None:
        if kind == "events":
            await self._notified()

    async def _notified(self) -> None:
        assert self._ino is not None
        fired: list[_Held] = []
        for ev in self._ino.read():
            if ev.mask & IN_Q_OVERFLOW:
                fired = list(self._held.values())
                break
            h = self._by_wd.get(ev.wd)
            if h is not None and h not in fired:
                fired.append(h)
        for h in fired:
            if self._held.get(h.scope) is h:
                await self._follow(h, signalled=True)

    async def _follow(self, h: _Held, *, signalled: bool) -> None:
        """Read one cgroup: report the kernel's kills, start, follow or end an episode."""
        try:
            counters = h.cg.keyed("memory.events")
            raw, high, limit, current, lru = watchdog.read_brake(h.cg.fd)
        except OSError:
            await self._lost(h)
            return
        except ValueError as exc:
            # Not a size where one must be: counted, and read again at the next look.
            self.faults += 1
            log.debug("cgroup %s: unreadable memory files: %s", h.named, exc)
            return
        old, h.counters = h.counters, counters
        kills = counters.get("oom_kill", 0) - old.get("oom_kill", 0)
        if kills > 0:
            values: dict[str, float] = {"oom_kill_delta": kills, "oom_kill": counters.get("oom_kill", 0)}
            await self._send(Event(source=self.name, kind="kernel-kill", scope=h.scope, values=values))
        # Either of our two values may be the watchdog's write whose message is on its way
        # (a release, a re-arm); any other is someone else's.  The watchdog, which knows
        # which it wrote, says ``theirs`` about the original written back by someone else.
        if h.state in ("braked", "released") and raw not in (h.original, h.written):
            self._theirs(h, raw)
        if h.state in ("braked", "released") and limit != h.limit:
            await self._move(h, limit)
            return
        now = time.monotonic()
        if h.state in ("braked", "theirs") and watchdog.stuck(high, current, lru, h.slack, held=h.episode):
            first = not h.episode
            if first:
                h.episode, h.since = True, now
                self.episodes += 1
            h.next_poll = now + self.spec.poll_interval_s
            rose = counters.get("high", 0) > old.get("high", 0)
            again = max(self.spec.poll_interval_s, REEMIT_FRACTION * self.spec.deadline_s)
            if first or (signalled and rose and now - h.last_emit >= again):
                h.last_emit = now
                await self._send(self._oom_event(h, counters, high, limit, current, lru))
            late = now - h.since - self.spec.deadline_s
            if h.state == "braked" and late > max(self.spec.deadline_s, LATE_S):
                await self._watchdog_late(h, late)
            return
        h.episode = False
        h.next_poll = now + self.spec.poll_interval_s
        if h.state == "released" and current < int(h.written) and not h.arm_asked:
            self._ask(h, "arm")

    async def _move(self, h: _Held, limit: int) -> None:
        """``memory.max`` changed: the brake comes off (the watchdog's compare-and-restore,
        its journal entry removed) and the cgroup is taken again at the new limit."""
        dog = self._dog
        if dog is None or not h.id:
            return  # a watchdog being replaced: the next one gets the cgroup, and this is seen again
        log.info("cgroup %s: memory.max is %s now, not %d; the brake moves", h.named,
                 "max" if limit < 0 else limit, h.limit)
        try:
            dog.send("drop", h.id)
            # Awaited: the new journal entry has the old one's name, which the drop removes.
            with anyio.fail_after(WATCHDOG_START_S):
                await dog.until(lambda m: m[:2] == ["dropped", h.id], self._said)
        except (WatchdogGone, TimeoutError):
            return  # the loop notices a dead or silent watchdog and replaces it
        self.moves += 1
        h.id, h.entry = "", "-"
        self._close(h)
        await self._take(h.scope)

    def _oom_event(self, h: _Held, counters: dict[str, int], high: int, limit: int, current: int, lru: int) -> Event:
        values: dict[str, float] = {
            "braked": 1, "usage_bytes": current, "high_bytes": high, "file_lru_bytes": lru,
            "high_total": counters.get("high", 0), "oom_kill_total": counters.get("oom_kill", 0),
        }
        if limit >= 0:
            values["limit_bytes"] = limit
        return Event(source=self.name, kind="oom", scope=h.scope, values=values)

    def _theirs(self, h: _Held, raw: str) -> None:
        if h.state == "theirs":
            return
        log.warning(
            "cgroup %s: memory.high is %s, written by someone else (an operator, systemd, the kubelet); kept, and"
            " followed: oomkit decides at their value and writes memory.high here no more", h.named, raw,
        )
        h.state, h.theirs, h.arm_asked = "theirs", raw, False
        if h.id and self._dog is not None:
            self._ask(h, "forget")  # it removes the journal entry and stops guarding
            h.id, h.entry = "", "-"
        else:
            self._drop_entry(h)

    # --- the watchdog -------------------------------------------------------------------------

    def _heard(self, h: _Held, verb: str, args: list[str], strict: bool) -> None:
        if verb == "ok":
            h.state = "braked"
            again = " again: it is back" if h.back else ""
            log.info("cgroup %s: braked%s: memory.high %s, %d under memory.max %d (original %s journalled)",
                     h.named, again, h.written, h.slack, h.limit, h.original)
            h.back = False
        elif verb == "err":
            self._refused_by_watchdog(h, args, strict, self._drop_entry)
        elif verb == "armed":
            h.state, h.arm_asked = "braked", False
            log.info("cgroup %s: usage is under the brake point again; braked again", h.named)
        elif verb == "handback":
            h.state, h.episode = "released", False
            self.handbacks += 1
            if h.released:
                h.released = False
            else:
                log.warning("cgroup %s: still at its brake %g s after the episode began; brake released"
                            " (memory.high %s): the kernel decides at memory.max", h.named, self.spec.deadline_s,
                            h.original)
        elif verb == "theirs" and len(args) > 1:
            self._theirs(h, watchdog.unquote(args[1]) if args[1] != "-" else "?")

    def _orphaned(self, h: _Held) -> bool:
        if h.state not in ("braked", "adding", "released"):
            return False
        self._restore_here(h, keep_entry=True)
        h.state, h.id, h.arm_asked, h.episode = "adding", "", False, False
        return True

    # --- what the engine asks -----------------------------------------------------------------

    def hand_back(self, event: Event) -> bool:
        """The engine will kill nobody: release the brake now (through the watchdog); it is
        put back once usage is under the brake point again, as after a deadline."""
        h = self._held.get(event.scope)
        if h is None or event.kind != "oom" or h.state != "braked" or not h.id or self._dog is None:
            return False
        if not self._ask_release(h):
            return False
        log.warning("cgroup %s: oomkit kills nobody here; releasing the brake so the kernel decides", h.named)
        return True

    def still_holds(self, event: Event) -> bool:
        """Is the cgroup still stuck at a brake in force (ours, or one we follow)?"""
        h = self._held.get(event.scope)
        if h is None or h.state not in ("braked", "theirs"):
            return False  # removed, or released: the kernel decides
        try:
            raw, high, _, current, lru = watchdog.read_brake(h.cg.fd)
        except (OSError, ValueError):
            return False
        if h.state == "braked" and raw != h.written:
            return False  # released meanwhile, or someone else's value now
        # Held: a cgroup stuck at its brake dips just under memory.high whenever reclaim trims
        # the page cache it has left, and a re-check that caught such a dip ended the decision
        # condition-cleared with the hog still stuck (measured in the guest).
        return watchdog.stuck(high, current, lru, h.slack, held=True)
