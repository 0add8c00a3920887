"""Memory history: each process's recent resident size, sampled before an OOM needs it.

At a takeover OOM the scope's tasks are already paused in the allocator, so *who was
growing* cannot be measured then: it must have been seen before.  :class:`History` samples
the scopes the engine's sources watch (and any scope an event names), keeps the last
``[history] window_s`` of each process, and hands scorers a read-only view (the ``history``
argument of ``oomkit_score``: see :mod:`oomkit.hookspecs`).

What it costs, and when:

* A sample is one read of ``/proc/PID/stat`` (resident pages and start time, so a reused
  pid is never mistaken for the process it replaced); nothing that takes the target's mmap
  lock.  The files of up to ``open_files`` processes stay open between ticks, so a sample
  is one ``pread``.  ``python -m bench history`` measures the CPU per sampled process.
* A scope is sampled only while it is *warm* (usage at or above ``warm_fraction`` of its
  limit, on v2 the lower of ``memory.max`` and ``memory.high`` as ``memory.current`` reads
  at each tick, ``system_warm_fraction`` of RAM for the system scope, or an event for it within
  ``warm_hold_s``) or small (``small_scopes``, cgroups only); a cold, big scope costs its
  usage and limit reads (and a cgroup's process list), and keeps no history.
* At most ``tick_budget`` processes are read per tick over all scopes (a bigger set is
  covered round-robin), and at most ``max_processes`` tracked per scope, each in a
  fixed-size ring: memory and one tick's work are bounded whatever the machine runs.

A *unit* (a cgroup or a process group ranked as a whole: :mod:`oomkit_plugins.units`) has a
history too, the sum of its processes': each time a pass over a cgroup scope completes, the
resident sizes just read are added up per cgroup below it (at every depth, each process
counting in its own cgroup and all of that cgroup's ancestors under the scope) into one more
ring per cgroup, at most ``max_processes`` of them per scope; no extra file is read.  The
sum is taken over the processes in the cgroup *then*, so one that has exited still counts in
the past it lived in, and a cgroup whose workers come and go at a steady total is stable,
not growing.  It is a sum of resident sizes, not the cgroup's ``memory.current``: the
unit's size now is its members' resident sum as well, and page cache, which
``memory.current`` counts, is what the kernel reclaims first and a kill does not free.  A
process-group unit's history is its members' samples added up at the times they were taken.

It runs on the event loop by default (a tick is a bounded burst of small reads); with
``thread = true`` in a worker thread of its own, under a lock scorers take only to copy one
process's samples.

After each tick, every scope it sampled is summed up in a :class:`~oomkit.records.MemorySample`
(its charge and limit, the tracked processes' resident total and the largest of them) and
handed to ``on_sample`` on the event loop (the engine passes them to the
``oomkit_memory_sample`` hook, which the ``jsonl`` notifier writes to its log), built from
the same reads and only while ``want_samples()`` says someone listens.
"""

from __future__ import annotations

import bisect
import logging
import math
import os
import threading
import heapq
import time
from array import array
from collections import deque
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import final

import anyio

from . import urgency
from .cgroupfs import mounts_for, read_procs, scope_dir
from .config import Config
from .events import Candidate, Scope
from .procfs import list_pids, read_meminfo, read_small
from .records import MemorySample, ProcessHistory, ProcessSample, ScopeHistory

__all__ = ["History", "HistoryStats", "Samples"]

log = logging.getLogger("oomkit.history")

_HZ = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")
# Kinds whose event says "memory is short here": they warm their scope.
_WARMING = frozenset({"oom", "low-memory", "threshold", "pressure", "memory-events"})
_TOP = 8
"""Processes named in a memory sample (the largest)."""
_OUTBOX = 256
"""Samples waiting for the loop (a worker thread's ticks): beyond that the oldest go."""
_CHUNK = 256
"""Candidates :meth:`History.of_all` looks up under one hold of the lock."""


@final
@dataclass(frozen=True, slots=True)
class Samples:
    """One process's history: ``times_ns`` (monotonic) and ``rss_bytes`` pairwise, oldest
    first, all within the window.  ``started_ns`` is when the process started, on the same
    clock (it may lie before the window)."""

    pid: int
    start_ticks: int
    started_ns: int
    times_ns: tuple[int, ...]
    rss_bytes: tuple[int, ...]


@dataclass(slots=True)
class HistoryStats:
    """Counters since the history started; read them, never write them."""

    ticks: int = 0
    reads: int = 0
    """Processes read (one ``stat`` each)."""
    scopes_sampled: int = 0
    """Scope-ticks that sampled (a scope sampled on 10 ticks counts 10)."""
    untracked: int = 0
    """Processes left out because their scope already tracked ``max_processes``."""
    faults: int = 0
    """Scopes whose files could not be read on a tick (gone, or not a memcg)."""
    cpu_ns: int = 0
    """CPU time spent in ticks (thread time of whichever thread ran them)."""


class _Ring:
    """The last ``cap`` (time, resident pages) pairs of one process, in one flat array."""

    __slots__ = ("start_ticks", "name", "comm", "data", "head", "n", "fd")

    def __init__(self, start_ticks: int, cap: int, fd: int = -1, comm: bytes = b"") -> None:
        self.start_ticks = start_ticks
        self.comm = comm
        self.name = comm.decode(errors="replace")
        """Its ``comm`` as last read (for samples and the live view): a process is often
        first read before its exec or its ``prctl`` names it."""
        self.fd = fd
        """Its ``stat`` file, kept open (``[history] open_files``), or -1."""
        self.data = array("q", bytes(16 * cap))
        self.head = 0
        self.n = 0

    def add(self, t_ns: int, pages: int) -> None:
        cap = len(self.data) // 2
        self.data[2 * self.head] = t_ns
        self.data[2 * self.head + 1] = pages
        self.head = (self.head + 1) % cap
        self.n = min(self.n + 1, cap)

    def last_pages(self) -> int:
        if self.n == 0:
            return 0
        cap = len(self.data) // 2
        return self.data[2 * ((self.head - 1) % cap) + 1]

    def pairs(self, since_ns: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        cap = len(self.data) // 2
        times: list[int] = []
        pages: list[int] = []
        for k in range(self.n):
            i = (self.head - self.n + k) % cap
            t = self.data[2 * i]
            if t >= since_ns:
                times.append(t)
                pages.append(self.data[2 * i + 1])
        return tuple(times), tuple(pages)


@dataclass(slots=True)
class _ScopeState:
    tracks: dict[int, _Ring]
    pids: list[int]
    cursor: int = 0
    limit_bytes: int = 0
    sampled_ns: int = 0
    usage_bytes: int = 0
    """The scope's charge as read on the last tick (0: unknown), for samples."""
    total_bytes: int = 0
    """Its limit for samples: the cgroup's, or the machine's RAM (0: unlimited)."""
    warm: bool = False
    where: dict[int, str] = field(default_factory=dict)
    """The cgroup (path in its tree) each pid of the current pass was found in."""
    units: dict[str, _Ring] = field(default_factory=dict)
    """Per cgroup below the scope: the summed resident pages of its processes, a point per
    completed pass; the ring's ``start_ticks`` holds the cgroup directory's inode, so a
    cgroup removed and made again under the same name starts a new history."""
    inodes: dict[str, int] = field(default_factory=dict)


def _thinned(n: int, points: int) -> list[int]:
    """``min(n, points)`` indices into ``n`` samples, evenly spread, the oldest and the
    newest always among them."""
    if n <= points:
        return list(range(n))
    if points == 1:
        return [n - 1]
    return sorted({round(k * (n - 1) / (points - 1)) for k in range(points)})


def _parse_stat(raw: bytes) -> tuple[int, int, bytes] | None:
    """(start ticks, resident pages, comm) from a ``stat`` line, or None if it is not one.

    Not :func:`oomkit.procfs.stat_fields`: comm stays bytes here, so that each tick compares
    it with the one it had without decoding it (every tracked process, every tick)."""
    try:
        # Fields 3 to 24 only: the start time is field 22 and the resident pages field 24.
        close = raw.rindex(b")")
        fields = raw[close + 2 :].split(None, 22)
        return int(fields[19]), int(fields[21]), raw[raw.index(b"(") + 1 : close]
    except (ValueError, IndexError):
        return None


def _stat(proc: str, pid: int) -> tuple[int, int, bytes] | None:
    """(start ticks, resident pages, comm) from one read of ``stat``, or None if gone."""
    try:
        return _parse_stat(read_small(f"{proc}/{pid}/stat", 1024))
    except OSError:
        return None


def _subtree_pids(top: str, top_path: str = "/") -> tuple[list[int], dict[int, str], dict[str, int]]:
    """Every pid in the cgroup ``top`` and below (as the memcg OOM killer considers), the
    cgroup each was found in (as a path in the tree, ``top`` being ``top_path``), and the
    inode of every cgroup below ``top``."""
    out: list[int] = []
    where: dict[int, str] = {}
    inodes: dict[str, int] = {}
    base = top_path.rstrip("/")
    stack = [(top, top_path)]
    while stack:
        d, rel = stack.pop()
        pids = read_procs(d)
        out.extend(pids)
        if rel != top_path:
            for pid in pids:
                where[pid] = rel
        try:
            with os.scandir(d) as entries:
                for e in entries:
                    if e.is_dir(follow_symlinks=False):
                        child = f"{base if rel == top_path else rel}/{e.name}"
                        inodes[child] = e.inode()
                        stack.append((e.path, child))
        except OSError:
            continue  # removed while we walk: its tasks are gone too
    return out, where, inodes


def _sum_members(
    members: list[tuple[int, tuple[tuple[int, ...], tuple[int, ...]] | None]],
) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """Members' ``(started_ns, (times, pages) or None)`` added up at every time any was
    sampled, each member at its latest sample by then; a time at which a member that had
    started was not yet sampled is left out (its share is unknown), and so is the whole
    sum when a member was never sampled at all."""
    if not members or any(pairs is None for _, pairs in members):
        return None
    times = sorted({t for _, pairs in members if pairs is not None for t in pairs[0]})
    out_t: list[int] = []
    out_p: list[int] = []
    for t in times:
        total = 0
        for started, pairs in members:
            assert pairs is not None
            ts, ps = pairs
            k = bisect.bisect_right(ts, t)
            if k:
                total += ps[k - 1]
            elif started <= t:
                break  # alive then, not yet sampled: unknown
        else:
            out_t.append(t)
            out_p.append(total)
    return tuple(out_t), tuple(out_p)


def _read_int(path: str) -> int | None:
    try:
        text = read_small(path, 64).strip()
    except OSError:
        return None
    return None if text == b"max" or not text.isdigit() else int(text)


@final
class History:
    """The memory history of one engine.  See the module docstring.

    ``scopes`` returns the scopes to consider on each tick (the engine passes its sources'
    :meth:`~oomkit.sources.Source.scopes`); :meth:`touch` adds a scope an event named.
    """

    def __init__(
        self,
        config: Config,
        scopes: Callable[[], Iterable[Scope]] = tuple,
        *,
        on_sample: Callable[[MemorySample], None] | None = None,
        want_samples: Callable[[], bool] = lambda: True,
    ) -> None:
        self.settings = config.history
        self.stats = HistoryStats()
        self._proc = config.paths.proc
        self._mounts = mounts_for(config.paths)
        self._scopes = scopes
        self._window_ns = int(self.settings.window_s * 1e9)
        self._cap = math.ceil(self.settings.window_s / self.settings.interval_s) + 2
        self._warm_until: dict[Scope, int] = {}
        self._states: dict[Scope, _ScopeState] = {}
        self._boot_offset_ns: int | None = None
        self._lock = threading.Lock()
        self._rotate = 0
        self._open = 0  # stat files kept open, at most [history] open_files
        self._on_sample = on_sample
        self._want_samples = want_samples
        self._outbox: deque[MemorySample] = deque(maxlen=_OUTBOX)

    def reconfigure(self, config: Config) -> None:
        """Take a reloaded ``[history]``; samples kept so far stay unless their window or
        spacing changed (then every history starts again).  ``thread`` and ``enabled``
        apply from the next start."""
        old = self.settings
        self.settings = config.history
        if (old.window_s, old.interval_s) != (config.history.window_s, config.history.interval_s):
            self._window_ns = int(config.history.window_s * 1e9)
            self._cap = math.ceil(config.history.window_s / config.history.interval_s) + 2
            self.close()

    def __repr__(self) -> str:
        tracked = sum(len(s.tracks) for s in self._states.values())
        return f"<History scopes={len(self._states)} processes={tracked} ticks={self.stats.ticks}>"

    # --- what scorers read --------------------------------------------------------------------

    @property
    def window_s(self) -> float:
        return self.settings.window_s

    def of(self, candidate: Candidate, now_ns: int | None = None, *, tree: str | None = None) -> Samples | None:
        """The candidate's samples in the window ending ``now_ns`` (default: now), or None
        if it was never sampled (a scope that was cold, a process started after the last
        tick, a reused pid).

        For a unit, the sum of its processes' (see the module docstring): a cgroup unit's
        own history when its cgroup lies below a sampled scope of ``tree`` (any tree when
        None: the same path can exist in v1 and v2), else its members' samples added up.
        ``started_ns`` is then its oldest member's start (:meth:`started_of`).
        """
        since = (time.monotonic_ns() if now_ns is None else now_ns) - self._window_ns
        if candidate.is_unit:
            return self._of_unit(candidate, since, tree)
        with self._lock:
            pairs = self._pairs(candidate.pid, candidate.start_ticks, since)
        return None if pairs is None else self._samples(candidate, pairs)

    def of_all(
        self, candidates: Sequence[Candidate], now_ns: int | None = None, *, tree: str | None = None
    ) -> list[Samples | None]:
        """:meth:`of` for each of ``candidates``, in their order, looked up together: a
        scorer of ten thousand candidates takes the lock once per :data:`_CHUNK` of them
        (the sampler's tick, on the event loop by default, takes it too, so it never waits
        behind a whole ranking), and while nothing is tracked (the history off, or never
        yet sampled) it costs nothing per candidate."""
        now = time.monotonic_ns() if now_ns is None else now_ns
        since = now - self._window_ns
        out: list[Samples | None] = [None] * len(candidates)
        units: list[int] = []
        with self._lock:
            if not any(state.tracks or state.units for state in self._states.values()):
                return out
        for start in range(0, len(candidates), _CHUNK):
            # Between chunks, with the lock let go: a takeover may be decided meanwhile.
            urgency.checkpoint()
            found: list[tuple[int, tuple[tuple[int, ...], tuple[int, ...]]]] = []
            with self._lock:  # only the copies of the rings' samples under it
                for i in range(start, min(start + _CHUNK, len(candidates))):
                    c = candidates[i]
                    if c.is_unit:
                        units.append(i)  # its own lookup takes the lock itself
                        continue
                    pairs = self._pairs(c.pid, c.start_ticks, since)
                    if pairs is not None:
                        found.append((i, pairs))
            for i, pairs in found:  # Samples (and the first read of /proc/uptime) outside it
                out[i] = self._samples(candidates[i], pairs)
        for i in units:
            out[i] = self.of(candidates[i], now, tree=tree)
        return out

    def _samples(self, c: Candidate, pairs: tuple[tuple[int, ...], tuple[int, ...]]) -> Samples:
        return Samples(pid=c.pid, start_ticks=c.start_ticks, started_ns=self.started_ns(c.start_ticks),
                       times_ns=pairs[0], rss_bytes=tuple(p * _PAGE for p in pairs[1]))

    def started_of(self, candidate: Candidate) -> int:
        """When ``candidate`` started on the monotonic clock; a unit, when its oldest member
        did (before that it held nothing of what its members hold now)."""
        if candidate.is_unit and candidate.members:
            return self.started_ns(min(m.start_ticks for m in candidate.members))
        return self.started_ns(candidate.start_ticks)

    def _pairs(self, pid: int, start_ticks: int, since: int) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
        for state in self._states.values():
            ring = state.tracks.get(pid)
            if ring is not None and ring.start_ticks == start_ticks:
                return ring.pairs(since)
        return None

    def _of_unit(self, unit: Candidate, since: int, tree: str | None) -> Samples | None:
        started = self.started_of(unit)
        with self._lock:
            own = None
            if unit.unit == "cgroup" and unit.cgroup:
                for scope, state in self._states.items():
                    if tree in (None, scope.tree) and (ring := state.units.get(unit.cgroup)) is not None:
                        own = ring.pairs(since)
                        break
            members = [] if own is not None else [
                (self.started_ns(m.start_ticks), self._pairs(m.pid, m.start_ticks, since)) for m in unit.members
            ]
        if own is not None:
            times, pages = own
        else:
            summed = _sum_members(members)
            if summed is None:
                return None
            times, pages = summed
        return Samples(pid=unit.pid, start_ticks=unit.start_ticks, started_ns=started, times_ns=times,
                       rss_bytes=tuple(p * _PAGE for p in pages))

    def started_ns(self, start_ticks: int) -> int:
        """When a process with this ``stat`` start time started, on the monotonic clock."""
        if self._boot_offset_ns is None:
            self._boot_offset_ns = self._read_boot_offset()
        return self._boot_offset_ns + start_ticks * 1_000_000_000 // _HZ

    def sampled(self, scope: Scope) -> bool:
        """Whether ``scope`` was sampled within the last window."""
        state = self._states.get(scope)
        return state is not None and state.sampled_ns >= time.monotonic_ns() - self._window_ns

    def limit_bytes(self, scope: Scope) -> int:
        """The scope's limit as last read (0: unknown or unlimited)."""
        state = self._states.get(scope)
        return state.limit_bytes if state is not None else 0

    def _reading(self, scope: Scope, now: int, wall: float) -> MemorySample:
        with self._lock:
            state = self._states[scope]
            rings = list(state.tracks.items())
            usage, total, warm = state.usage_bytes, state.total_bytes, state.warm
        pages = [(ring.last_pages(), pid, ring) for pid, ring in rings]
        top = heapq.nlargest(_TOP, pages, key=lambda x: x[0])
        return MemorySample(
            scope=scope,
            monotonic_ns=now,
            wall_time=wall,
            usage_bytes=usage,
            limit_bytes=total,
            rss_bytes=sum(p for p, _, _ in pages) * _PAGE,
            processes=len(rings),
            warm=warm,
            top=tuple(ProcessSample(pid=pid, name=ring.name[:64], start_ticks=ring.start_ticks, rss_bytes=p * _PAGE)
                      for p, pid, ring in top),
        )

    def scope_history(
        self, scope: Scope, *, pids: Collection[int] = (), limit: int = 20, points: int = 32, now_ns: int | None = None
    ) -> ScopeHistory:
        """Up to ``limit`` of the scope's processes over the window, ``pids`` first (those
        tracked), then the largest; each with at most ``points`` samples (evenly thinned,
        the newest always kept).  What the control socket's ``history`` op answers."""
        now = time.monotonic_ns() if now_ns is None else now_ns
        since = now - self._window_ns
        with self._lock:
            state = self._states.get(scope)
            if state is None:
                return ScopeHistory(scope=scope, sampled=False, window_s=self.settings.window_s,
                                    interval_s=self.settings.interval_s, now_ns=now)
            rings = state.tracks
            wanted = [pid for pid in dict.fromkeys(pids) if pid in rings][:limit]
            if len(wanted) < limit:
                taken = set(wanted)
                rest = heapq.nlargest(limit - len(wanted), (pid for pid in rings if pid not in taken),
                                      key=lambda pid: rings[pid].last_pages())
                wanted += rest
            chosen = [(pid, rings[pid], rings[pid].pairs(since)) for pid in wanted]
            total = sum(ring.last_pages() for ring in rings.values()) * _PAGE
            head = (state.usage_bytes, state.total_bytes, len(rings), state.sampled_ns >= since)
        out = []
        for pid, ring, (times, pages) in chosen:
            keep = _thinned(len(times), points)
            out.append(ProcessHistory(
                pid=pid, name=ring.name, start_ticks=ring.start_ticks,
                times_ns=tuple(times[i] for i in keep),
                rss_bytes=tuple(pages[i] * _PAGE for i in keep),
            ))
        usage, limit_bytes, processes, sampled = head
        return ScopeHistory(
            scope=scope, sampled=sampled, window_s=self.settings.window_s, interval_s=self.settings.interval_s,
            now_ns=now, usage_bytes=usage, limit_bytes=limit_bytes, rss_bytes=total, processes=processes,
            history=tuple(out),
        )

    # --- what the engine calls ----------------------------------------------------------------

    def touch(self, scope: Scope, kind: str, now_ns: int) -> None:
        """An event of ``kind`` named ``scope``: keep it warm for ``warm_hold_s``."""
        if kind in _WARMING:
            self._warm_until[scope] = now_ns + int(self.settings.warm_hold_s * 1e9)

    async def run(self) -> None:
        """Sample until cancelled, on the loop or in a worker thread (``[history] thread``)."""
        if not self.settings.enabled:
            return
        if self.settings.thread:
            stop = threading.Event()
            worker = threading.Thread(target=self._thread, args=(stop,), name="oomkit-history", daemon=True)
            worker.start()
            try:
                while True:
                    await anyio.sleep(self.settings.interval_s)
                    self.deliver()
            finally:
                stop.set()
                worker.join(timeout=5)
                self.close()
            return
        try:
            while True:
                await anyio.sleep(self.settings.interval_s)
                self.tick()
                self.deliver()
        finally:
            self.close()

    def deliver(self) -> int:
        """Hand the samples of the ticks so far to ``on_sample`` (on the caller's thread:
        the event loop's, in :meth:`run`); returns how many."""
        n = 0
        while self._outbox:
            try:
                sample = self._outbox.popleft()
            except IndexError:  # the worker thread's tick dropped the oldest meanwhile
                break
            if self._on_sample is not None:
                self._on_sample(sample)
            n += 1
        return n

    def take_samples(self) -> list[MemorySample]:
        """The samples of the ticks since the last :meth:`deliver` or call, oldest first,
        without handing them to ``on_sample``."""
        out: list[MemorySample] = []
        while self._outbox:
            try:
                out.append(self._outbox.popleft())
            except IndexError:
                break
        return out

    def _thread(self, stop: threading.Event) -> None:
        # It parks between scopes while a takeover is decided (oomkit.urgency).
        with urgency.parkable():
            while not stop.wait(self.settings.interval_s):
                try:
                    self.tick()
                except Exception:  # a bug here must not end sampling silently, nor the daemon
                    log.exception("history: a tick failed")

    def tick(self, now_ns: int | None = None) -> int:
        """One round of sampling; returns how many processes were read."""
        cpu0 = time.thread_time_ns()
        now = time.monotonic_ns() if now_ns is None else now_ns
        self.stats.ticks += 1
        # touch() runs on the loop while a tick may run in the worker thread: iterate over a
        # copy, and drop an expired scope only if no event warmed it again meanwhile.
        warm = list(self._warm_until.items())
        for scope, until in warm:
            if until <= now and self._warm_until.get(scope, 0) <= now:
                self._warm_until.pop(scope, None)
        scopes = list(dict.fromkeys([*self._scopes(), *(s for s, until in warm if until > now)]))
        if scopes:
            # Start with a different scope each tick, so a budget that runs out is shared.
            self._rotate = (self._rotate + 1) % len(scopes)
            scopes = scopes[self._rotate :] + scopes[: self._rotate]
        budget = self.settings.tick_budget
        read = 0
        live: set[Scope] = set()
        sampled: list[Scope] = []
        for scope in scopes:
            urgency.checkpoint()
            pids = self._pids_if_sampled(scope, now)
            if pids is None:
                continue
            live.add(scope)
            if budget > 0:
                n = self._sample(scope, pids, now, budget)
                budget -= n
                read += n
                sampled.append(scope)
        with self._lock:
            for scope in [s for s in self._states if s not in live]:
                for ring in self._states.pop(scope).tracks.values():  # cold now: keep nothing
                    self._close(ring.fd)
        if sampled and self._want_samples():
            wall = time.time()
            for scope in sampled:
                self._outbox.append(self._reading(scope, now, wall))
        self.stats.reads += read
        self.stats.cpu_ns += time.thread_time_ns() - cpu0
        return read

    # --- sampling -----------------------------------------------------------------------------

    def _pids_if_sampled(self, scope: Scope, now: int) -> list[int] | None:
        # The charge is read on every tick, warm or not: it decides warmth when cold, and a
        # memory sample reports it (one small read per scope per tick).
        held = self._warm_until.get(scope, 0) > now
        if scope.tree == "system":
            try:
                info = read_meminfo(self._proc, ("MemTotal", "MemAvailable"))
                total, used = info["MemTotal"], max(0, info["MemTotal"] - info["MemAvailable"])
            except (OSError, ValueError, KeyError):
                if not held:
                    return None
                total = used = 0
            warm = held or used >= self.settings.system_warm_fraction * max(1, total)
            if not warm:
                return None
            return self._state_for(scope, list_pids(self._proc), 0, used, total, warm)
        try:
            d = str(scope_dir(self._mounts, scope))
        except LookupError:
            return None
        limit = _read_int(f"{d}/{'memory.limit_in_bytes' if scope.tree == 'v1' else 'memory.max'}")
        if limit is not None and limit >= 1 << 60:
            limit = None  # v1's "unlimited" is a huge number
        if scope.tree == "v2":
            # Where the kernel starts throttling (the brake, or anyone's memory.high) is the
            # limit that matters on v2: warm relative to it.
            high = _read_int(f"{d}/memory.high")
            if high is not None and (limit is None or high < limit):
                limit = high
        usage = _read_int(f"{d}/{'memory.usage_in_bytes' if scope.tree == 'v1' else 'memory.current'}")
        warm = held or (limit is not None and usage is not None and usage >= self.settings.warm_fraction * limit)
        if not warm and not self.settings.small_scopes:
            return None
        if not os.path.isdir(d):
            self.stats.faults += 1
            return None
        pids, where, inodes = _subtree_pids(d, scope.path)
        if not warm and len(pids) > self.settings.small_scope_processes:
            return None
        return self._state_for(scope, pids, limit or 0, usage or 0, limit or 0, warm, where, inodes)

    def _state_for(self, scope: Scope, pids: list[int], limit: int, usage: int, total: int, warm: bool,
                   where: dict[int, str] | None = None, inodes: dict[str, int] | None = None) -> list[int]:
        state = self._states.get(scope)
        if state is None:
            state = self._states[scope] = _ScopeState(tracks={}, pids=[])
        state.limit_bytes = limit
        state.usage_bytes, state.total_bytes, state.warm = usage, total, warm
        if state.cursor >= len(state.pids):
            state.pids, state.cursor = pids, 0
            state.where, state.inodes = where or {}, inodes or {}
        return pids

    def _read(self, pid: int, ring: _Ring | None) -> tuple[tuple[int, int, bytes] | None, int]:
        """A process's (start, pages, comm) and the fd to keep for it (-1: none).

        A kept fd is read with one ``pread`` (3.6 us here, against 8 for open, read and
        close); it stays bound to the process it was opened for, so a reused pid reads as
        gone (ESRCH) instead of as the process it replaced.
        """
        if ring is not None and ring.fd >= 0:
            try:
                return _parse_stat(os.pread(ring.fd, 1024, 0)), ring.fd
            except OSError:
                return None, ring.fd
        if self._open >= self.settings.open_files:
            return _stat(self._proc, pid), -1
        try:
            fd = os.open(f"{self._proc}/{pid}/stat", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None, -1
        self._open += 1
        try:
            return _parse_stat(os.pread(fd, 1024, 0)), fd
        except OSError:
            return None, fd

    def _close(self, fd: int) -> None:
        if fd >= 0:
            os.close(fd)
            self._open -= 1

    def _drop(self, tracks: dict[int, _Ring], pid: int) -> None:
        ring = tracks.pop(pid, None)
        if ring is not None:
            self._close(ring.fd)

    def close(self) -> None:
        """Close every kept ``stat`` file and forget every history (sampling may resume)."""
        with self._lock:
            for state in self._states.values():
                for ring in state.tracks.values():
                    self._close(ring.fd)
            self._states.clear()

    def _sample(self, scope: Scope, pids: list[int], now: int, budget: int) -> int:
        state = self._states[scope]
        chunk = state.pids[state.cursor : state.cursor + budget]
        state.cursor += len(chunk)
        tracks = state.tracks  # only this thread writes it; scorers read under the lock
        results = []
        for pid in chunk:
            ring = tracks.get(pid)
            got, fd = self._read(pid, ring)
            results.append((pid, got, fd))
        self.stats.scopes_sampled += 1
        with self._lock:
            for pid, got, fd in results:
                ring = tracks.get(pid)
                if got is None:
                    if ring is not None and ring.fd == fd:
                        self._drop(tracks, pid)
                    else:
                        self._close(fd)
                    continue
                start, pages, comm = got
                if ring is None or ring.start_ticks != start:
                    if ring is None and len(tracks) >= self.settings.max_processes:
                        self.stats.untracked += 1
                        self._close(fd)
                        continue
                    if ring is not None and ring.fd != fd:
                        self._close(ring.fd)
                    ring = tracks[pid] = _Ring(start, self._cap, fd, comm)
                elif comm != ring.comm:
                    ring.comm, ring.name = comm, comm.decode(errors="replace")
                ring.add(now, pages)
            if state.cursor >= len(state.pids):
                current = set(pids)
                for pid in [p for p in tracks if p not in current]:
                    self._drop(tracks, pid)  # exited
                if state.where or state.units:
                    self._sum_units(state, scope.path, now)
            state.sampled_ns = now
        if self._boot_offset_ns is None or self.stats.ticks % 64 == 0:
            # Re-read now and then: a suspend moves the boot clock away from the monotonic one.
            self._boot_offset_ns = self._read_boot_offset()
        return len(chunk)

    def _sum_units(self, state: _ScopeState, top: str, now: int) -> None:
        """A pass over the scope is complete: one point per cgroup below it, the sum of the
        latest sizes of the processes found in it and below it on this pass."""
        totals: dict[str, int] = {}
        for pid, path in state.where.items():
            ring = state.tracks.get(pid)
            if ring is None or ring.n == 0:
                continue  # gone, or untracked (counted as such)
            cap = len(ring.data) // 2
            pages = ring.data[2 * ((ring.head - 1) % cap) + 1]
            while path and path != top:
                totals[path] = totals.get(path, 0) + pages
                path = path[: path.rindex("/")]
        units = state.units
        for path in [p for p in units if p not in totals]:
            del units[path]  # empty or removed: not a unit any more
        for path, pages in totals.items():
            inode = state.inodes.get(path, 0)
            ring = units.get(path)
            if ring is None or ring.start_ticks != inode:
                if ring is None and len(units) >= self.settings.max_processes:
                    self.stats.untracked += 1
                    continue
                ring = units[path] = _Ring(inode, self._cap)
            ring.add(now, pages)

    def _read_boot_offset(self) -> int:
        """Monotonic minus boot time, from ``/proc/uptime`` (what ``stat`` start times count)."""
        now = time.monotonic_ns()
        try:
            uptime_s = float(read_small(f"{self._proc}/uptime", 128).split()[0])
        except (OSError, ValueError, IndexError):
            return 0
        return now - int(uptime_s * 1e9)

    def processes(self) -> Iterator[tuple[Scope, int]]:
        """Every (scope, pid) tracked now: for ``oomkit top`` and tests."""
        with self._lock:
            items = [(scope, pid) for scope, state in self._states.items() for pid in state.tracks]
        yield from items
