"""Shared-page source: events that other processes write into rings in a directory.

Each producer owns one ring file (``*.ring``) in the configured directory.  The source opens
every trusted ring read-only (read with ``pread``: a ring cut short cannot crash it), waits
on the doorbell socket (registered with the loop once: :mod:`oomkit.readiness`; or the slow
poll when nobody rings),
reads what each ring committed since last time, and emits one
:class:`~oomkit.events.Event` per valid record.  A ring owned by a producer other than root
(or the daemon's own user) may report only on the scopes ``producers`` grants its uid,
and never on the whole system unless granted.  Rejected records, lost records and refused
rings are counted (:meth:`SharedPageSource.counters`) and logged at most once per
``log_interval_s`` per ring and kind of trouble, with the count since the last line.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import anyio
import msgspec
from anyio.abc import TaskStatus

from ..config import Config
from ..events import SYSTEM, Event, Scope
from ..procfs import StartTimes
from ..ratelog import RateLog
from ..readiness import Readable
from ..sharedpage import (
    DOORBELL_NAME,
    Doorbell,
    LayoutError,
    OwnerPolicy,
    Record,
    RingReader,
    UnsafeRingError,
    check_directory,
    read_pid_max,
    ring_names,
)
from ..units import Interval
from .base import Emit, Source, SourceSettings

__all__ = ["ProducerScopes", "SharedPageSource", "SharedPageSourceConfig", "SharedPageStats"]

log = logging.getLogger("oomkit.sources.shared_page")

_Mode = Annotated[int, msgspec.Meta(ge=0, le=0o7777)]
"""A file mode (TOML: ``0o755``)."""
_Id = Annotated[int, msgspec.Meta(ge=0, le=0xFFFF_FFFE)]
"""A uid or gid (``0xFFFFFFFF`` is the kernel's "no id")."""


class ProducerScopes(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """``[[sources.producers]]``: what the rings of one user may report on."""

    uid: _Id
    """The owner of the rings this applies to."""
    scopes: tuple[str, ...]
    """``"system"``, or ``"v1:/path"`` / ``"v2:/path"``: that cgroup and everything below it.
    Path components may hold ``fnmatch`` wildcards (``*`` never crosses a ``/``)."""

    def __post_init__(self) -> None:
        for scope in self.scopes:
            tree, sep, path = scope.partition(":")
            if scope != "system" and not (sep and tree in ("v1", "v2") and path.startswith("/")):
                raise ValueError(f"scope {scope!r} is not 'system', 'v1:/path' or 'v2:/path'")

    def allows(self, scope: Scope) -> bool:
        for pattern in self.scopes:
            if pattern == "system":
                if scope.tree == "system":
                    return True
                continue
            tree, _, path = pattern.partition(":")
            if scope.tree != tree:
                continue
            want = [p for p in path.split("/") if p]
            have = [p for p in scope.path.split("/") if p]
            if len(have) >= len(want) and all(fnmatch.fnmatchcase(h, w) for h, w in zip(have, want)):
                return True
        return False


class SharedPageSourceConfig(SourceSettings, frozen=True, tag="shared-page", kw_only=True):
    """Reads OOM events that other processes write into shared-page rings
    (``docs/shared-page.md``).

    ``directory`` holds one ring per producer (``*.ring``) and the doorbell socket; it is
    created with ``directory_mode`` when missing.  Rings owned by root or by the daemon's
    own user are trusted, and those owned by ``allowed_uids``; a ring writable by others,
    or by a group not in ``allowed_gids``, is refused, and so is a directory that someone
    else could write into without the sticky bit.
    """

    directory: str
    """Where producers' rings (``*.ring``) and the doorbell socket live."""
    directory_mode: _Mode = 0o755
    """Mode of the directory when the source creates it (TOML: ``0o755``; at most ``0o7777``)."""
    doorbell: bool = True
    """Bind ``DIRECTORY/doorbell`` so publishers can wake the reader at once; without it
    only the slow poll finds new records."""
    doorbell_mode: _Mode = 0o660
    """Mode of the doorbell socket: who may ring it."""
    poll_interval_s: Interval = 1.0
    """The slow poll: how often rings are read, and the directory rescanned, with no ring."""
    max_age_s: Interval = 10.0
    """Records older than this when read are skipped (counted as stale), not acted on."""
    max_ring_bytes: Annotated[int, msgspec.Meta(ge=4096, le=1 << 30)] = 16 << 20
    """A ring larger than this is refused without being read."""
    allowed_uids: tuple[_Id, ...] = ()
    """Users besides root and the daemon's own whose rings are trusted."""
    allowed_gids: tuple[_Id, ...] = ()
    """Groups that may have write access to a trusted ring."""
    producers: tuple[ProducerScopes, ...] = ()
    """Tables ``{uid = 1000, scopes = ["v1:/jobs/*", "system"]}``: the scopes an owner's rings
    may report on (a cgroup and all below it; ``*`` within one path component).  Rings of
    root and of the daemon's own user may report on anything unless listed here; any other
    owner's records for the whole system are refused unless its entry grants ``"system"``."""
    log_interval_s: Interval = 10.0
    """At most one log line per ring and kind of trouble this often; what comes in between
    is counted and said in the next line."""

    def __post_init__(self) -> None:
        if not self.directory.startswith("/"):
            raise ValueError("`directory` must be an absolute path")
        uids = [p.uid for p in self.producers]
        if len(set(uids)) != len(uids):
            raise ValueError("`producers` lists a uid twice")


@dataclass(slots=True)
class SharedPageStats:
    """Counters since the source started, summed over every ring it has read."""

    events: int = 0
    lost: int = 0
    stale: int = 0
    rejected: int = 0
    rejected_by_reason: dict[str, int] = field(default_factory=dict)
    """Rejected records by reason (``kind``, ``path``, ``scope``, ...)."""
    refused_rings: int = 0
    doorbell_wakes: int = 0
    poll_wakes: int = 0
    scan_errors: int = 0


def record_event(source: str, rec: Record, now_mono_ns: int, now_wall: float) -> Event:
    """The event for one record; its times are when the producer wrote it."""
    scope = SYSTEM if rec.tree == "system" else Scope(rec.tree, rec.path)
    return Event(
        source=source,
        kind=rec.kind,
        scope=scope,
        pid=rec.pid or None,
        pid_start_ticks=rec.start_ticks or None,
        values=dict(rec.values),
        monotonic_ns=rec.mono_ns,
        wall_time=now_wall - (now_mono_ns - rec.mono_ns) / 1e9,
    )


class SharedPageSource(Source):
    """Reads the rings of one shared-page directory."""

    settings_type = SharedPageSourceConfig

    def __init__(self, spec: SharedPageSourceConfig, config: Config) -> None:
        self.name = spec.source_name
        self.spec = spec
        self.directory = Path(spec.directory)
        self.policy = OwnerPolicy(frozenset(spec.allowed_uids), frozenset(spec.allowed_gids))
        self.pid_max = read_pid_max(config.paths.proc)
        self.proc = config.paths.proc
        # Producers' pids, each one's start time read once while it lives (shared by all rings).
        self._starts = StartTimes(self.proc)
        self._dir_fd = -1
        self.producers = {p.uid: p for p in spec.producers}
        self._trusted = (0, os.geteuid())
        """Owners whose rings may report on anything unless ``producers`` lists them."""
        self._anything = frozenset(self._trusted) - set(self.producers)
        """Owners whose rings may report on anything."""
        self._accounted: weakref.WeakKeyDictionary[RingReader, tuple[int, int, dict[str, int]]] = (
            weakref.WeakKeyDictionary())
        """Each ring's counters as last added to :attr:`stats`."""
        self.stats = SharedPageStats()
        self.readers: dict[str, RingReader] = {}
        # Rings refused once stay refused until the file changes (inode, mode, owner, size).
        self._refused: dict[str, tuple[int, ...]] = {}
        self._dir_mtime_ns = -1
        self._log = RateLog(log, spec.log_interval_s)

    def __repr__(self) -> str:
        s = self.stats
        return (
            f"<SharedPageSource {self.name!r} rings={len(self.readers)} events={s.events}"
            f" lost={s.lost} rejected={s.rejected} refused={s.refused_rings}>"
        )

    def counters(self) -> dict[str, int]:
        s = self.stats
        out = {
            "events": s.events, "lost": s.lost, "stale": s.stale, "rejected": s.rejected,
            "refused_rings": s.refused_rings, "doorbell_wakes": s.doorbell_wakes, "poll_wakes": s.poll_wakes,
            "scan_errors": s.scan_errors, "rings": len(self.readers),
        }
        out.update({f"rejected_{reason}": n for reason, n in sorted(s.rejected_by_reason.items())})
        return out

    def _prepare_directory(self) -> None:
        d = self.directory
        if not d.exists():
            d.mkdir(mode=self.spec.directory_mode, parents=True)
            os.chmod(d, self.spec.directory_mode)  # mkdir's mode passes through the umask
        try:
            check_directory(d)
        except (UnsafeRingError, OSError) as exc:
            raise UnsafeRingError(f"shared-page source {self.name!r}: {exc}") from None

    async def run(self, emit: Emit, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        self._prepare_directory()
        bell = Doorbell(self.directory / DOORBELL_NAME, self.spec.doorbell_mode) if self.spec.doorbell else None
        try:
            # A doorbell wake checks the directory's mtime through this fd: no path walk.
            self._dir_fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            self._rescan(full=True)
            task_status.started()
            log.info(
                "shared-page source %s: %d ring(s) in %s, doorbell %s",
                self.name, len(self.readers), self.directory, "on" if bell else "off (slow poll only)",
            )
            # The loop learns of a producer's exit from its pidfd (a callback drops its start
            # time), so checking a record's pid against the cache asks the kernel nothing.
            async with self._starts.watching():
                await self._hand_on(emit, rang=False)
                if bell is None:
                    await self._slow_poll(emit)
                else:
                    await self._ring_or_poll(bell, emit)
        finally:
            with anyio.CancelScope(shield=True):
                if bell is not None:
                    bell.close()
                for reader in self.readers.values():
                    reader.close()
                self.readers.clear()
                self._starts.close()
                if self._dir_fd >= 0:
                    os.close(self._dir_fd)
                    self._dir_fd = -1
                self._log.flush(force=True)

    async def _slow_poll(self, emit: Emit) -> None:
        while True:
            await anyio.sleep(self.spec.poll_interval_s)
            self.stats.poll_wakes += 1
            await self._hand_on(emit, rang=False)
            if self._rescan(full=True):
                await self._hand_on(emit, rang=False)

    async def _ring_or_poll(self, bell: Doorbell, emit: Emit) -> None:
        # The doorbell stays registered with the loop for the source's life, and what rings
        # it is drained in the loop's callback (oomkit.readiness): no registration, cancel
        # scope or timer per wake-up.
        async with Readable(bell.fileno(), bell.drain) as doorbell:
            while True:
                rang = await doorbell.wait(self.spec.poll_interval_s)
                if rang:
                    self.stats.doorbell_wakes += 1
                else:
                    self.stats.poll_wakes += 1
                # The rings known already first, the directory after: looking at it is not
                # on the way from a producer's record to its event.  A doorbell wake looks
                # only if the directory's mtime moved; the slow poll lists it in full, since
                # mtime is coarse and can hide a second change.
                await self._hand_on(emit, rang=rang)
                if self._rescan(full=not rang):
                    await self._hand_on(emit, rang=rang)

    async def _hand_on(self, emit: Emit, *, rang: bool) -> None:
        for event in self._collect(rang=rang):
            await emit(event)

    def _collect(self, *, rang: bool) -> list[Event]:
        """Every ring's new events; ``rang``: the doorbell woke us (RingReader.poll)."""
        out: list[Event] = []
        now_mono, now_wall = time.monotonic_ns(), time.time()
        for name, reader in list(self.readers.items()):
            s = reader.stats
            troubles = s.troubles
            try:
                records = reader.poll(rang=rang)
            except LayoutError as exc:
                if s.troubles != troubles:
                    self._account(name, reader)  # what this poll found before the ring broke
                self._drop(name, str(exc))
                continue
            # Rings of root and of our own user, with no producers entry, may report on
            # anything: their records skip the scope check.
            anything = reader.owner in self._anything
            for rec in records:
                event = record_event(self.name, rec, now_mono, now_wall)
                problem = None if anything else self._scope_problem(reader.owner, event.scope)
                if problem:
                    s.reject("scope")
                    s.records -= 1
                    reader.last_rejection = f"record {rec.seq}: {problem}"
                    continue
                out.append(event)
            # The common case (every record good) costs one comparison: the counting and
            # logging below only when this ring's trouble counter moved.
            if s.troubles != troubles:
                self._account(name, reader)
        self._log.flush(now_ns=now_mono)
        self.stats.events += len(out)
        return out

    def _account(self, name: str, reader: RingReader) -> None:
        """Add what ``name`` lost, skipped and rejected since it was last accounted to the
        source's counters, and log it (rate-limited)."""
        s, stats = reader.stats, self.stats
        before_lost, before_stale, seen = self._accounted.get(reader, (0, 0, {}))
        self._accounted[reader] = (s.lost, s.stale, dict(s.rejected))
        lost, stale = s.lost - before_lost, s.stale - before_stale
        rejected = {k: n - seen.get(k, 0) for k, n in s.rejected.items() if n > seen.get(k, 0)}
        stats.lost += lost
        stats.stale += stale
        for reason, n in rejected.items():
            stats.rejected += n
            stats.rejected_by_reason[reason] = stats.rejected_by_reason.get(reason, 0) + n
        self._log.note((name, "rejected"), f"shared-page {self.name}: ring {name}: %d record(s) rejected",
                       sum(rejected.values()), latest=reader.last_rejection)
        self._log.note((name, "lost"), f"shared-page {self.name}: ring {name}: the writer lapped the reader,"
                       " %d record(s) lost", lost)
        self._log.note((name, "stale"), f"shared-page {self.name}: ring {name}: skipped %d record(s) older than"
                       f" {self.spec.max_age_s:g} s", stale, level=logging.INFO)

    def _scope_problem(self, owner: int, scope: Scope) -> str | None:
        """Why a ring owned by ``owner`` may not report on ``scope``, or None."""
        grant = self.producers.get(owner)
        if grant is not None:
            return None if grant.allows(scope) else f"uid {owner} may not report on {scope} (producers.scopes)"
        if owner in self._trusted:
            return None
        if scope.tree == "system":
            return f"uid {owner} may not report on the whole system (only root, or a producers entry granting 'system')"
        return None

    def _drop(self, name: str, why: str) -> None:
        """A ring that cannot be read any more: closed, and refused until the file changes."""
        reader = self.readers.pop(name)
        reader.close()
        try:
            st = os.stat(self.directory / name)
            self._refused[name] = (st.st_dev, st.st_ino, st.st_mode, st.st_uid, st.st_gid, st.st_size)
        except OSError:
            pass
        self.stats.refused_rings += 1
        log.warning("shared-page %s: refusing ring %s: %s", self.name, name, why)

    def _rescan(self, *, full: bool) -> bool:
        """Attach rings that appeared or were replaced, drop rings that went away; True when
        a ring was attached (its records are to be read now)."""
        try:
            if not full and self._dir_fd >= 0 and os.fstat(self._dir_fd).st_mtime_ns == self._dir_mtime_ns:
                return False
            mtime = os.stat(self.directory).st_mtime_ns
            if not full and mtime == self._dir_mtime_ns:
                return False
            names = set(ring_names(self.directory))
        except OSError as exc:
            self.stats.scan_errors += 1
            self._log.note(("", "scan"), f"shared-page {self.name}: cannot list {self.directory} (%d time(s))",
                           latest=str(exc), level=logging.ERROR)
            return False
        self._dir_mtime_ns = mtime
        for gone in set(self._refused) - names:
            del self._refused[gone]
        attached = False
        for name in sorted(names):
            reader = self.readers.get(name)
            if reader is not None:
                try:
                    st = os.stat(self.directory / name)
                except OSError:
                    st = None
                if st is not None and (st.st_dev, st.st_ino) == reader.identity:
                    continue
                # Renamed over (a restarted producer) or gone: the old mapping is finished.
                self.readers.pop(name).close()
            attached = self._attach(name) or attached
        for gone in set(self.readers) - names:
            self.readers.pop(gone).close()
        return attached

    def _attach(self, name: str) -> bool:
        path = self.directory / name
        try:
            st = os.stat(path)
        except OSError:
            return False
        key = (st.st_dev, st.st_ino, st.st_mode, st.st_uid, st.st_gid, st.st_size)
        if self._refused.get(name) == key:
            return False
        try:
            reader = RingReader(
                path,
                policy=self.policy,
                max_bytes=self.spec.max_ring_bytes,
                pid_max=self.pid_max,
                max_age_s=self.spec.max_age_s,
                proc=self.proc,
                start_times=self._starts,
            )
        except (UnsafeRingError, LayoutError, OSError, ValueError) as exc:
            self._refused[name] = key
            self.stats.refused_rings += 1
            log.warning("shared-page %s: refusing ring %s: %s", self.name, name, exc)
            return False
        self.readers[name] = reader
        log.info("shared-page %s: reading ring %s (%d records of %d bytes)",
                 self.name, name, reader.capacity, reader.record_size)
        return True
