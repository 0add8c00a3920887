"""Reading ``/proc``: processes, meminfo, our own cgroups.

Every function takes the proc root as its first argument so tests run on fake trees.  The
per-process readers use ``os.open``/``os.read`` (one syscall each, no buffering layer) because
ranking ten thousand processes reads thirty thousand small files, and they read only the
cheap files: ``stat``, ``status`` and ``oom_score_adj`` never take the target's mmap lock,
while ``cmdline`` does (read it off the hot path, see :func:`read_cmdline`).
"""

from __future__ import annotations

import os
import re
import select
from collections import OrderedDict
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import final

from .events import Candidate
from .readiness import calling_back

__all__ = [
    "PF_KTHREAD",
    "Identity",
    "StartTimes",
    "candidate_of",
    "cgroup_path",
    "list_pids",
    "own_cgroup",
    "read_cmdline",
    "read_identity",
    "read_meminfo",
    "read_process",
    "read_small",
    "start_ticks",
    "status_facts",
]

PF_KTHREAD = 0x00200000
"""``task_struct.flags`` bit of kernel threads (field 9 of ``/proc/PID/stat``)."""


def read_small(path: str | os.PathLike[str], size: int = 4096) -> bytes:
    """One ``read`` of a small kernel file (procfs and cgroupfs files fit one page)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.read(fd, size)
    finally:
        os.close(fd)


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists in our pid namespace (one we may not signal does)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def running(proc: str, pid: int, ticks: int) -> bool:
    """Whether the process ``pid`` that started at ``ticks`` still runs: not gone, not a
    zombie (its memory is already freed), and its pid not taken by a newer process."""
    try:
        _, fields = stat_fields(read_small(f"{proc}/{pid}/stat", 1024))
        return fields[0] not in (b"Z", b"X", b"x") and int(fields[19]) == ticks
    except (OSError, ValueError, IndexError):
        return False


def list_pids(proc: str) -> list[int]:
    """Every process id in ``proc`` (thread-group leaders only, as ``/proc`` lists them)."""
    return [int(n) for n in os.listdir(proc) if n.isdigit()]


def stat_fields(raw: bytes) -> tuple[str, list[bytes]]:
    """A ``/proc/PID/stat``'s comm and the fields after it, split up to ``rss`` (index 21,
    field 24 of proc(5)); the rest stays unsplit in one last item.  Splitting all fifty-two
    made most of the cost of a cold ranking's parse: an object per field, ten thousand times.

    ValueError if ``raw`` is not a ``stat`` line: no "(", no ")", the last ")" before the
    first "(", or not followed by a space.  A line cut short after the comm gives fewer
    fields (an IndexError where one is read); the callers catch both."""
    # comm may hold spaces and parentheses: it runs from the first "(" to the last ")".
    lpar, rpar = raw.index(b"("), raw.rindex(b")")
    if rpar < lpar or not raw.startswith(b" ", rpar + 1):
        raise ValueError(f"not a stat line: {raw[:64]!r}")
    return raw[lpar + 1 : rpar].decode(errors="replace"), raw[rpar + 2 :].split(None, 22)


def start_ticks(proc: str, pid: int) -> int | None:
    """Field 22 of ``stat`` (start time in clock ticks since boot), or None if gone."""
    try:
        _, fields = stat_fields(read_small(f"{proc}/{pid}/stat", 1024))
    except (FileNotFoundError, ProcessLookupError, ValueError, IndexError):
        return None
    return int(fields[19])


def is_own_procfs(proc: str) -> bool:
    """Whether ``proc`` is a procfs of our own pid namespace (its ``self`` names us), so its
    pids are the ones ``pidfd_open`` opens; a fake tree's ``self`` is a plain directory."""
    try:
        return os.readlink(f"{proc}/self") == str(os.getpid())
    except OSError:
        return False


@final
class StartTimes:
    """Start times of processes, each read once from ``stat`` and kept while it lives.

    A pid's start time is what tells it from a reused pid, so it must be the live process's;
    reading ``stat`` for it costs ~5-10 us (the kernel formats the whole line).  Where
    ``proc`` is our own procfs, each answer comes with a pidfd opened *before* the read: as
    long as that pidfd has not polled readable the process has not exited, so its pid cannot
    have been reused, and the start time read then is still its own.  The pidfds kept sit in
    one epoll set, readable when any of them is; :meth:`reap` drops the processes that
    exited.  By default every :meth:`get` reaps first (one ``epoll_wait``, under 1 us);
    inside :meth:`watching` the event loop calls :meth:`reap` whenever the set is readable,
    and :meth:`get` answers from the cache with no system call.  At most ``limit`` processes
    are kept (the least recently asked about goes first, its pidfd closed); on a fake tree,
    or without pidfds, every call reads ``stat``.
    """

    __slots__ = ("_proc", "_limit", "_live", "_exits", "_watched", "reaped")

    def __init__(self, proc: str, limit: int = 256) -> None:
        self._proc = proc
        self._limit = limit
        # pid -> (start ticks, pidfd)
        self._live: OrderedDict[int, tuple[int, int]] = OrderedDict()
        own = limit > 0 and hasattr(os, "pidfd_open") and is_own_procfs(proc)
        self._exits = select.epoll() if own else None
        """Every pidfd kept: readable once one of their processes has exited.  None where
        no pidfd is kept (a fake tree, no pidfds, or closed): every answer is then read."""
        self._watched = False
        self.reaped = 0
        """Processes dropped because their pidfd said they exited."""

    def get(self, pid: int) -> int | None:
        """``pid``'s start time (field 22 of its ``stat``), or None if there is no such process."""
        if not self._watched:
            self.reap()  # every exit until now is seen before the cache answers
        known = self._live.get(pid)
        if known is not None:
            self._live.move_to_end(pid)
            return known[0]
        if self._exits is None:
            return start_ticks(self._proc, pid)
        try:
            fd = os.pidfd_open(pid)
        except OSError:
            # Gone (ESRCH), or no pidfd here (ENOSYS, EMFILE): the read decides.
            return start_ticks(self._proc, pid)
        ticks = start_ticks(self._proc, pid)
        if ticks is None:
            os.close(fd)
            return None
        try:
            self._exits.register(fd, select.EPOLLIN)
        except OSError:  # ENOSPC: the user's epoll watch limit; answered as an uncached read
            os.close(fd)
            return ticks
        self._live[pid] = (ticks, fd)
        # Exited around the read (a zombie reads): answered as an uncached read would be, not kept.
        self.reap()
        if len(self._live) > self._limit:
            self._forget(next(iter(self._live)))
        return ticks

    def reap(self) -> int:
        """Drop every process whose pidfd says it exited; how many there were."""
        if self._exits is None or not self._live:
            return 0
        ready = self._exits.poll(0)
        if not ready:
            return 0
        dead = {fd for fd, _ in ready}
        gone = [pid for pid, (_, fd) in self._live.items() if fd in dead]
        for pid in gone:
            self._forget(pid)
        self.reaped += len(gone)
        return len(gone)

    @asynccontextmanager
    async def watching(self) -> AsyncIterator[bool]:
        """While entered, the event loop reaps as soon as a kept process exits, and
        :meth:`get` trusts the cache without asking the kernel; yields whether it could
        (asyncio's loops; not on trio, nor without pidfds: then each :meth:`get` reaps).

        An exit is handled in the turn of the loop that first sees its pidfd readable: a
        task woken by I/O in that turn (the shared-page source by its doorbell) runs after
        it, a task that was already due may run before it.  So the cache can be one turn of
        the loop late: a pid reused within that turn (its process exited, was reaped, and the
        kernel's pid counter came round to its number) would get the old start time.
        """
        if self._exits is None:
            yield False
            return
        async with calling_back(self._exits.fileno(), self.reap) as registered:
            self._watched = registered
            try:
                self.reap()  # what exited before the registration
                yield registered
            finally:
                self._watched = False

    def _forget(self, pid: int) -> None:
        _, fd = self._live.pop(pid)
        assert self._exits is not None
        # Out of the set before the close: a copy of the pidfd in a forked child would keep
        # it registered (and the set readable) until that child execs or exits.  A child
        # forked without exec shares the set, and may have taken it out already (ENOENT).
        with suppress(OSError):
            self._exits.unregister(fd)
        os.close(fd)

    def __len__(self) -> int:
        return len(self._live)

    def close(self) -> None:
        """Close every pidfd held, and the epoll set (not inside :meth:`watching`: the loop
        still watches the set's descriptor there)."""
        if self._watched:
            raise RuntimeError("StartTimes.close() inside watching(): leave it first")
        while self._live:
            self._forget(next(iter(self._live)))
        if self._exits is not None:
            self._exits.close()
            self._exits = None

    def __repr__(self) -> str:
        mode = " watched" if self._watched else "" if self._exits is not None else " no pidfds"
        return f"<StartTimes {self._proc!r} kept={len(self._live)}/{self._limit}{mode}>"


# Anchored on a literal newline rather than `^` with MULTILINE: the regex engine then jumps
# from newline to newline instead of trying a match at every byte, which halves the cost of
# the one `status` parse every cold candidate pays (ten thousand of them for a full ranking).
_STATUS_LINES = re.compile(rb"\n(VmRSS|VmSwap|VmPTE|RssAnon|RssFile|RssShmem|Uid):\s+(\d+)")


def status_facts(raw: bytes) -> dict[bytes, bytes]:
    """The lines of a ``/proc/PID/status`` that :func:`candidate_of` reads, name to number
    (the first number of the line: the real uid for ``Uid``, kB for the sizes)."""
    return dict(_STATUS_LINES.findall(b"\n" + raw))


def read_process(proc: str, pid: int, cgroup: str = "", *, skip_kthreads: bool = False) -> Candidate | None:
    """A :class:`Candidate` for ``pid``, or None if the process is gone or unreadable.

    Sizes come from ``status`` (VmRSS, VmSwap, VmPTE), the same counters the kernel's badness
    formula uses; a kernel thread or a zombie has none of those lines and gets zeros.  With
    ``skip_kthreads`` a kernel thread is None after one read instead of three.
    """
    base = f"{proc}/{pid}"
    try:
        comm, fields = stat_fields(read_small(f"{base}/stat", 1024))
        if skip_kthreads and int(fields[6]) & PF_KTHREAD:
            return None
        status = read_small(f"{base}/status", 8192)
        adj = int(read_small(f"{base}/oom_score_adj", 32))
    except (FileNotFoundError, ProcessLookupError, PermissionError, ValueError, IndexError):
        return None
    return candidate_of(pid, comm, fields, status_facts(status), adj, cgroup)


def candidate_of(pid: int, comm: str, fields: list[bytes], found: dict[bytes, bytes], adj: int,
                 cgroup: str) -> Candidate:
    """The :class:`Candidate` that ``stat`` (``fields`` after the comm), the ``status``
    lines :func:`status_facts` found and ``oom_score_adj`` describe."""
    anon, file, shmem = found.get(b"RssAnon"), found.get(b"RssFile"), found.get(b"RssShmem")
    return Candidate(
        pid=pid,
        name=comm,
        ppid=int(fields[1]),
        uid=int(found.get(b"Uid", 0)),
        rss_bytes=int(found.get(b"VmRSS", 0)) * 1024,
        swap_bytes=int(found.get(b"VmSwap", 0)) * 1024,
        pgtables_bytes=int(found.get(b"VmPTE", 0)) * 1024,
        oom_score_adj=adj,
        start_ticks=int(fields[19]),
        cgroup=cgroup,
        kthread=bool(int(fields[6]) & PF_KTHREAD),
        pgid=int(fields[2]),
        rss_anon_bytes=None if anon is None else int(anon) * 1024,
        rss_file_bytes=None if file is None else int(file) * 1024,
        rss_shmem_bytes=None if shmem is None else int(shmem) * 1024,
    )


@dataclass(frozen=True, slots=True)
class Identity:
    """What the kernel says about a pid now: the facts a kill must not be made on trust."""

    pid: int
    tgid: int
    """The process the pid belongs to: another pid when ``pid`` names a thread."""
    start_ticks: int
    kthread: bool
    oom_score_adj: int


_TGID = re.compile(rb"^Tgid:\s+(\d+)", re.MULTILINE)


def read_identity(proc: str, pid: int) -> Identity | None:
    """Re-read ``stat``, ``status`` and ``oom_score_adj`` of ``pid``; None if it is gone.

    Any other failure (unreadable, unparsable) raises: the caller cannot vouch for the
    process then.  ``oom_score_adj`` is read last, nearest to the kill, as a process may
    rewrite it at any moment.
    """
    base = f"{proc}/{pid}"
    try:
        _, fields = stat_fields(read_small(f"{base}/stat", 1024))
        tgid = _TGID.search(read_small(f"{base}/status", 1024))
        adj = int(read_small(f"{base}/oom_score_adj", 32))
    except (FileNotFoundError, ProcessLookupError):
        return None
    if tgid is None:
        raise ValueError(f"{base}/status has no Tgid line")
    return Identity(
        pid=pid,
        tgid=int(tgid.group(1)),
        start_ticks=int(fields[19]),
        kthread=bool(int(fields[6]) & PF_KTHREAD),
        oom_score_adj=adj,
    )


def read_cmdline(proc: str, pid: int) -> tuple[str, ...] | None:
    """The argument vector, or None if gone.  Takes the target's mmap lock: off the hot path."""
    try:
        raw = read_small(f"{proc}/{pid}/cmdline", 65536)
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return tuple(a.decode(errors="replace") for a in raw.rstrip(b"\0").split(b"\0")) if raw else ()


def _meminfo_value(key: bytes, rest: bytes) -> int:
    # "  123 kB" is kibibytes; a bare "123" is a count (HugePages_Total).  Anything else
    # (another unit, trailing text) is refused: read as bytes it would be 1024x too small.
    fields = rest.split()
    if not fields or not fields[0].isdigit() or len(fields) > 2 or (len(fields) == 2 and fields[1] != b"kB"):
        line = (key + b":" + rest).decode(errors="replace").strip()
        raise ValueError(f"not a meminfo line: {line!r}")
    return int(fields[0]) * 1024 if len(fields) == 2 else int(fields[0])


def read_meminfo(proc: str, keys: Iterable[str] | None = None) -> dict[str, int]:
    """``/proc/meminfo`` in bytes, keyed as the kernel names the lines (``MemAvailable``).

    With ``keys``, only those lines (the ones present): a poller that wants three of the ~55
    values skips parsing the rest, which was most of its cost per wake-up on an idle machine.
    A line is ``Key: N kB`` or ``Key: N``; any other shape of a line that is parsed raises
    ValueError naming it.
    """
    raw = read_small(f"{proc}/meminfo", 16384)
    if keys is None:
        out: dict[str, int] = {}
        for line in raw.split(b"\n"):
            key, sep, rest = line.partition(b":")
            if sep:
                out[key.decode(errors="replace")] = _meminfo_value(key, rest)
            elif line.strip():
                raise ValueError(f"not a meminfo line: {line.decode(errors='replace')!r}")
        return out
    text = b"\n" + raw
    found: dict[str, int] = {}
    for name in keys:
        key = name.encode()
        needle = b"\n" + key + b":"
        start = text.find(needle)
        if start < 0:
            continue
        start += len(needle)
        end = text.find(b"\n", start)
        found[name] = _meminfo_value(key, text[start : end if end >= 0 else len(text)])
    return found


def own_cgroup(proc: str, controller: str = "memory", pid: int | str = "self") -> str | None:
    """The path of ``pid``'s cgroup for a v1 ``controller``, or its v2 path when
    ``controller`` is empty; None when that hierarchy is not there.

    Read once per candidate for the system scope, so it uses the same single read as the
    other per-process files rather than a text file object.
    """
    return cgroup_path(read_small(f"{proc}/{pid}/cgroup", 65536), controller)


def cgroup_path(raw: bytes, controller: str = "memory") -> str | None:
    """From the text of a ``/proc/PID/cgroup``: the path for a v1 ``controller``, or the v2
    path when ``controller`` is empty; None when that hierarchy is not there."""
    want = controller.encode()
    for line in raw.split(b"\n"):
        _, _, rest = line.partition(b":")
        controllers, sep, path = rest.partition(b":")
        if not sep:
            continue
        if (want in controllers.split(b",")) if want else not controllers:
            return path.decode(errors="replace")
    return None
