"""Per-process facts kept from one ranking to the next, so a warm ranking reads what changes.

A ranking of the whole system reads every process, and most of what it reads does not
change between two rankings: uid, cgroup, start time, and for an idle process its sizes
too.  :class:`ProcessTable` keeps, for each process it has read, the open file descriptors
of its ``/proc/PID/stat`` and ``/proc/PID/oom_score_adj`` and what it read last, and on each
ranking reads only:

* ``stat`` (one ``pread`` of the held descriptor: no path walk, no open, no close), which
  says whether the process did anything to its memory since: its resident pages, address
  space size and fault counters (every page brought into its resident set, and every
  page-table page it allocates, goes through a fault counted there);
* ``oom_score_adj`` (one ``pread``), which a process may rewrite at any moment;
* ``status`` (swap, page tables, the resident split) only for a process whose ``stat``
  shows a fault, a resident-size or address-space change since ``status`` was last read.

A held descriptor of a process that has been reaped fails with ESRCH on the next read, even
when its pid now belongs to a new process (the descriptor names the old process, not the
number): a reused pid can never be read as the old process.  The start time in ``stat`` is
compared as well, which is what catches a reused pid on a fake tree (``FakeProc``
rewrites a reused pid's files in place).

What the kernel can change without a trace in ``stat`` (documented in docs/writing-plugins.md):
faults made *by another process* into this one's memory (``ptrace``, ``process_vm_writev``,
writes to ``/proc/PID/mem``) are counted to the caller; the kernel may free empty page
tables by itself (``CONFIG_PT_RECLAIM``, file THP collapse); ``mremap`` may move a mapping
without a fault; ``setuid`` and a move to another cgroup are not seen until the process's
memory changes or its table entry is rebuilt.  On a machine with swap, a page swapped out
shrinks the resident size, which ``stat`` shows.

Descriptors come from a :class:`FdBudget` shared by every table of a process: it raises the
soft ``RLIMIT_NOFILE`` to the hard limit and keeps a reserve below it for everything else;
a process for which no descriptor is left is read by path on each ranking (its facts are
still kept, keyed by pid and start time).  Nothing here ever fails a ranking for want of
descriptors.  A table holds only the processes of its scope's last ranking.
"""

from __future__ import annotations

import errno
import itertools
import os
import resource
import threading
import weakref
from collections.abc import Iterable, Iterator, Sequence
from typing import final

import msgspec

from .events import Candidate
from .procfs import PF_KTHREAD, candidate_of, cgroup_path, read_small, stat_fields, status_facts
from .urgency import checkpointed

__all__ = ["FdBudget", "ProcessTable", "TableStats"]

_GONE = (FileNotFoundError, ProcessLookupError)
_ROOM = 64
"""Descriptors a table gives back when the process runs out of them."""


@final
class FdBudget:
    """How many descriptors the process tables of one process may hold, all together."""

    __slots__ = ("limit", "held", "_lock")

    def __init__(self, limit: int | None = None) -> None:
        if limit is None:
            limit = _raise_nofile()
            limit -= max(1024, limit // 8)  # sources, pidfds, sockets, plugins' files
        self.limit = max(0, limit)
        self.held = 0
        self._lock = threading.Lock()  # tables of two scopes may rank in two hook threads

    @classmethod
    def shared(cls) -> FdBudget:
        """The one budget of this process (created on first use): every table of every
        engine in the process draws on the same descriptor limit."""
        global _SHARED
        with _SHARED_LOCK:
            if _SHARED is None:
                _SHARED = cls()
            return _SHARED

    def take(self) -> bool:
        with self._lock:
            if self.held >= self.limit:
                return False
            self.held += 1
            return True

    def cap(self, margin: int) -> None:
        """Hold no more than now, less ``margin``: the process ran out of descriptors, so the
        limit this budget was worked out from does not leave what the rest of it needs."""
        with self._lock:
            self.limit = max(0, min(self.limit, self.held - margin))

    def give(self, n: int) -> None:
        if n:
            with self._lock:
                self.held -= n

    def __repr__(self) -> str:
        return f"<FdBudget {self.held}/{self.limit}>"


_SHARED: FdBudget | None = None
_SHARED_LOCK = threading.Lock()


def _raise_nofile() -> int:
    """The soft ``RLIMIT_NOFILE`` after raising it to the hard limit where allowed."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20  # fs.nr_open's default: more cannot be opened anyway
    if soft != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return hard if soft == resource.RLIM_INFINITY else soft


@final
class TableStats:
    """Counters of one table, for tests and the benchmark: what the rankings read."""

    __slots__ = ("cold", "status", "unchanged", "changed", "reused", "uncached", "emfile", "unread")

    def __init__(self) -> None:
        self.cold = 0
        """Processes read in full (first sight, or a pid whose process changed)."""
        self.status = 0
        """``status`` re-read for a known process whose ``stat`` showed memory activity."""
        self.unchanged = 0
        """Known processes offered as they were (``stat`` and ``oom_score_adj`` unchanged)."""
        self.changed = 0
        """Known processes whose ``stat`` or adj changed, sizes still as last read."""
        self.reused = 0
        """Entries dropped because their process was gone though its pid was listed again."""
        self.uncached = 0
        """Reads by path because no descriptor was left in the budget."""
        self.emfile = 0
        """Times a ranking ran out of descriptors (EMFILE, ENFILE) and gave some of its own back."""
        self.unread = 0
        """Processes left out because no descriptor could be had even after giving some back."""

    def __repr__(self) -> str:
        return " ".join(f"{k}={getattr(self, k)}" for k in self.__slots__)


@final
class _Entry(msgspec.Struct, gc=False):
    """One process's row.  Not tracked by the cyclic collector (``gc=False``: it refers to
    nothing that refers back): a table of ten thousand rows lives for the daemon's life, and
    every full collection walked each one (3-5 ms here, in whichever thread allocated,
    holding the GIL a takeover waits for; ``bench loop_stall``)."""

    stat_fd: int = -1
    adj_fd: int = -1
    stat: bytes = b""
    adj: bytes = b""
    start: int = 0
    sig: tuple[bytes, ...] = ()
    """minflt, majflt, vsize, rss of the ``stat`` read together with ``facts``."""
    facts: dict[bytes, bytes] = {}
    cgroup: str = ""
    cand: Candidate | None = None
    kthread: bool = False


def _same_kthread(raw: bytes, start: int) -> bool:
    try:
        fields = stat_fields(raw)[1]
        return int(fields[19]) == start and bool(int(fields[6]) & PF_KTHREAD)
    except (ValueError, IndexError):
        return False


def _sig(fields: list[bytes]) -> tuple[bytes, ...]:
    return fields[7], fields[9], fields[20], fields[21]


@final
class ProcessTable:
    """The processes of one scope, offered as :class:`Candidate` s, each read as little as
    it can be (see the module's docstring).

    ``offer`` takes the scope's pids with each one's cgroup (None: read
    ``/proc/PID/cgroup`` for ``controller`` when first seen; ``controller`` None: leave it
    empty) and returns candidates for the live, non-kernel-thread ones.  Entries for pids not
    offered are dropped and their descriptors closed.
    """

    __slots__ = ("_proc", "_budget", "_controller", "_box", "stats", "__weakref__")

    def __init__(self, proc: str, budget: FdBudget, controller: str | None) -> None:
        self._proc = proc
        self._budget = budget
        self._controller = controller
        # The entries live in a box the finalizer shares: a table dropped with its engine
        # (never closed: no hook says an engine is done) still gives its descriptors back.
        self._box: list[dict[int, _Entry]] = [{}]
        self.stats = TableStats()
        weakref.finalize(self, _close_box, self._box, budget)

    def __len__(self) -> int:
        return len(self._box[0])

    def __repr__(self) -> str:
        return f"<ProcessTable {self._proc!r} entries={len(self)} {self._budget!r}>"

    def close(self) -> None:
        """Close every descriptor held."""
        _close_box(self._box, self._budget)

    def offer(self, pids: Iterable[int], cgroups: Sequence[str] | None = None) -> list[Candidate]:
        """Candidates for ``pids``; ``cgroups``, when given, holds each one's cgroup (a
        cgroup scope knows it from its walk), else it is read from ``/proc/PID/cgroup``
        when the process is first seen (``controller``; left empty when that is None)."""
        old = self._box[0]
        new: dict[int, _Entry] = {}
        out: list[Candidate] = []
        pread = os.pread
        unchanged = 0
        # Parks while a takeover decides (oomkit.urgency): only this scope's table is held,
        # and a takeover ranks its own scope.
        items: Iterator[tuple[int, int]] = enumerate(checkpointed(pids))
        failed = -1
        room = True
        while True:
            e: _Entry | None = None
            try:
                for i, pid in items:
                    if pid in new:
                        continue
                    cgroup = None if cgroups is None else cgroups[i]
                    e = old.pop(pid, None)
                    if e is not None:
                        try:
                            # The hot path: two preads of held descriptors and two comparisons.
                            st = pread(e.stat_fd, 1024, 0) if e.stat_fd >= 0 else self._path(pid, "stat", 1024)
                            cand = e.cand
                            if cand is None:  # a kernel thread: never offered, kept to be skipped
                                if st and (st == e.stat or _same_kthread(st, e.start)):
                                    e.stat = st
                                    new[pid] = e
                                    continue
                                st = b""
                            adj = pread(e.adj_fd, 32, 0) if e.adj_fd >= 0 else self._path(pid, "oom_score_adj", 32)
                        except _GONE:
                            st = adj = b""
                        if st == e.stat and adj == e.adj and st and (cgroup is None or cgroup == e.cgroup):
                            unchanged += 1
                            new[pid] = e
                            out.append(cand)  # type: ignore[arg-type]  # not None: not a kernel thread
                            continue
                        cand = self._warm(pid, e, st, adj, cgroup) if st else None
                        if cand is not None:
                            new[pid] = e
                            out.append(cand)
                            continue
                        # Gone, or a new process under the same pid: its pid was listed, so look again.
                        self._close(e)
                        self.stats.reused += 1
                    e = self._cold(pid, cgroup)
                    if e is not None:
                        new[pid] = e
                        if e.cand is not None:
                            out.append(e.cand)
                break
            except OSError as exc:
                if exc.errno not in (errno.EMFILE, errno.ENFILE):
                    raise
                # Out of descriptors: the budget was wrong about what the rest of the process
                # (an embedding service's sockets) holds.  Hold no more, give some back and
                # read this process again; the ranking goes on either way.
                if e is not None and new.get(pid) is not e:
                    self._close(e)
                if failed == i or not room:
                    # Nothing of ours left to give back: the rest that fail are left out at
                    # once, not each after another look through the whole table.
                    self.stats.unread += 1
                    continue
                failed = i
                room = self._make_room(new, old) > 0
                items = itertools.chain([(i, pid)], items)
        self.stats.unchanged += unchanged
        for e in old.values():
            self._close(e)
        self._box[0] = new
        return out

    def _make_room(self, *tables: dict[int, _Entry]) -> int:
        """After EMFILE/ENFILE: the budget stops at what is held now, less a margin, and that
        margin is given back by closing entries' descriptors (they are read by path from now
        on); how many were closed."""
        self.stats.emfile += 1
        self._budget.cap(_ROOM)
        freed = 0
        for e in (e for entries in tables for e in entries.values()):
            if freed >= _ROOM:
                break
            freed += _close_entry(e)
        self._budget.give(freed)
        return freed

    def _path(self, pid: int, name: str, size: int) -> bytes:
        self.stats.uncached += 1
        return read_small(f"{self._proc}/{pid}/{name}", size)

    def _close(self, e: _Entry) -> None:
        self._budget.give(_close_entry(e))

    def _hold(self, dfd: int, name: str, size: int) -> tuple[int, bytes]:
        """Open ``name`` under the process's directory, read it, and keep the descriptor if
        the budget allows (-1 when not)."""
        fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC, dir_fd=dfd)
        try:
            raw = os.read(fd, size)
        except BaseException:
            os.close(fd)
            raise
        if self._budget.take():
            return fd, raw
        os.close(fd)
        self.stats.uncached += 1
        return -1, raw

    def _cold(self, pid: int, cgroup: str | None) -> _Entry | None:
        """Everything read once, through the process's directory: every read is of this one
        process (a descriptor under a reaped process's directory fails)."""
        try:
            dfd = os.open(f"{self._proc}/{pid}", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except (FileNotFoundError, ProcessLookupError, NotADirectoryError):
            return None
        e = _Entry()
        try:
            e.stat_fd, e.stat = self._hold(dfd, "stat", 1024)
            comm, fields = stat_fields(e.stat)
            e.start = int(fields[19])
            if int(fields[6]) & PF_KTHREAD:
                e.kthread = True
                return e
            e.adj_fd, e.adj = self._hold(dfd, "oom_score_adj", 32)
            e.facts = status_facts(_read_at(dfd, "status", 8192))
            e.sig = _sig(fields)
            if cgroup is None:
                controller = self._controller
                cgroup = "" if controller is None else cgroup_path(_read_at(dfd, "cgroup", 65536), controller) or ""
            e.cgroup = cgroup
            e.cand = self._candidate(pid, e, comm, fields)
        except (*_GONE, PermissionError, ValueError, IndexError):
            self._close(e)
            return None
        except BaseException:
            self._close(e)  # EMFILE, say: what it took so far is given back
            raise
        finally:
            os.close(dfd)
        self.stats.cold += 1
        return e

    def _warm(self, pid: int, e: _Entry, st: bytes, adj: bytes, cgroup: str | None) -> Candidate | None:
        """A known process whose ``stat`` or adj changed; None if it is not the same process."""
        try:
            comm, fields = stat_fields(st)
            if int(fields[19]) != e.start or int(fields[6]) & PF_KTHREAD:
                return None
            int(adj)
        except (ValueError, IndexError):
            return None
        sig = _sig(fields)
        if sig != e.sig:
            try:
                status = read_small(f"{self._proc}/{pid}/status", 8192)
                # A process that moved to another cgroup most likely did something there:
                # read its cgroup again with its status (cheap: only active processes).
                if cgroup is None and self._controller is not None:
                    cgroup = cgroup_path(read_small(f"{self._proc}/{pid}/cgroup", 65536), self._controller) or ""
                # The pid was not reaped in between (the stat read after it still works), so
                # that status (and cgroup) was this process's.
                again = os.pread(e.stat_fd, 1024, 0) if e.stat_fd >= 0 else self._path(pid, "stat", 1024)
                if int(stat_fields(again)[1][19]) != e.start:
                    return None
            except (*_GONE, PermissionError, ValueError, IndexError):
                return None
            e.facts = status_facts(status)
            e.sig = sig
            self.stats.status += 1
        else:
            self.stats.changed += 1
        e.stat, e.adj = st, adj
        if cgroup is not None:
            e.cgroup = cgroup
        e.cand = self._candidate(pid, e, comm, fields)
        return e.cand

    def _candidate(self, pid: int, e: _Entry, comm: str, fields: list[bytes]) -> Candidate:
        return candidate_of(pid, comm, fields, e.facts, int(e.adj), e.cgroup)


def _close_entry(e: _Entry) -> int:
    n = 0
    for fd in (e.stat_fd, e.adj_fd):
        if fd >= 0:
            os.close(fd)
            n += 1
    e.stat_fd = e.adj_fd = -1
    return n


def _close_box(box: list[dict[int, _Entry]], budget: FdBudget) -> None:
    entries, box[0] = box[0], {}
    budget.give(sum(_close_entry(e) for e in entries.values()))


def _read_at(dfd: int, name: str, size: int) -> bytes:
    fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC, dir_fd=dfd)
    try:
        return os.read(fd, size)
    finally:
        os.close(fd)

