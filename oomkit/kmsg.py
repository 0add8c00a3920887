"""``/dev/kmsg``: the kernel log as records, and the OOM killer's lines in it.

Each ``read()`` of ``/dev/kmsg`` returns one record, ``PRIO,SEQ,TS_US,FLAGS[,...];TEXT``
followed by continuation lines that start with a space (``Documentation/ABI/testing/
dev-kmsg``).  A reader that fell behind the kernel's log buffer gets ``EPIPE`` once, then
the oldest record still there: the sequence numbers say how many were lost.

The OOM killer writes, for every kill, (nohang parses the same lines)::

    oom-kill:constraint=CONSTRAINT_MEMCG,nodemask=(null),cpuset=/,mems_allowed=0,
        oom_memcg=/a,task_memcg=/a/b,task=hog,pid=123,uid=0            (one line, info)
    Memory cgroup out of memory: Killed process 123 (hog) total-vm:42672kB,
        anon-rss:32384kB, file-rss:6332kB, shmem-rss:0kB, UID:0 pgtables:124kB
        oom_score_adj:0                                                  (one line, err)

The first comes from ``dump_header``, which the kernel rate-limits to 10 per 5 s; the
second is printed for every kill.  Older kernels print fewer ``key:value`` pairs, so they
are read by name, never by position.
"""

from __future__ import annotations

import errno
import os
import re
from dataclasses import dataclass
from typing import final

__all__ = ["KillLine", "Kmsg", "KmsgRecord", "OomSummary", "parse_kill", "parse_oom_summary", "parse_record"]

MAX_RECORD = 8192
"""The kernel's longest record (``CONSOLE_EXT_LOG_MAX``)."""


@dataclass(frozen=True, slots=True)
class KmsgRecord:
    prio: int
    seq: int
    ts_us: int
    text: str


def parse_record(raw: bytes) -> KmsgRecord:
    """One record; ValueError when it is not ``PRIO,SEQ,TS,FLAGS;TEXT``."""
    head, sep, rest = raw.partition(b";")
    if not sep:
        raise ValueError("no ';' after the record prefix")
    parts = head.split(b",")
    if len(parts) < 4:
        raise ValueError(f"record prefix {head[:40]!r} has {len(parts)} fields, 4 expected")
    prio, seq, ts = int(parts[0]), int(parts[1]), int(parts[2])
    if prio < 0 or seq < 0 or ts < 0:
        raise ValueError(f"negative field in record prefix {head[:40]!r}")
    text = rest.split(b"\n", 1)[0]
    return KmsgRecord(prio & 7, seq, ts, text.decode("utf-8", errors="replace"))


@dataclass(frozen=True, slots=True)
class KillLine:
    """``Killed process PID (COMM) key:valuekB, ...``; sizes in kB, as the kernel prints."""

    pid: int
    comm: str
    fields: dict[str, int]


_KILLED = re.compile(r"Killed process (\d+) \((.*)\)(.*)$")
_PAIR = re.compile(r"([A-Za-z_][\w-]*)[:=](-?\d+)(?:kB)?")


def parse_kill(text: str) -> KillLine | None:
    """The kill in an OOM killer's line, or None when the line is something else."""
    m = _KILLED.search(text)
    if m is None:
        return None
    # The greedy group ends at the line's last ")": comm may hold parentheses, the sizes
    # after it never do.
    fields = {k.lower().replace("-", "_"): int(v) for k, v in _PAIR.findall(m[3])}
    return KillLine(int(m[1]), m[2], fields)


@dataclass(frozen=True, slots=True)
class OomSummary:
    """The ``oom-kill:`` line: which memcg ran out (``oom_memcg``), the victim's memcg."""

    pid: int
    uid: int
    task: str
    task_memcg: str
    oom_memcg: str
    constraint: str


def parse_oom_summary(text: str) -> OomSummary | None:
    """The ``oom-kill:`` summary, or None.  cgroup names and comm may contain commas, so
    the fields are cut from the end, where the kernel prints the fixed ones."""
    at = text.find("oom-kill:")
    if at < 0:
        return None
    line = text[at + len("oom-kill:") :]
    try:
        rest, _, uid = line.rpartition(",uid=")
        rest, _, pid = rest.rpartition(",pid=")
        rest, _, task = rest.rpartition(",task=")
        rest, sep, task_memcg = rest.rpartition(",task_memcg=")
        if not sep:
            return None
        _, sep, oom_memcg = rest.rpartition(",oom_memcg=")
        constraint = line.split(",", 1)[0].removeprefix("constraint=")
        return OomSummary(int(pid), int(uid), task, task_memcg, oom_memcg if sep else "", constraint)
    except ValueError:
        return None


@final
class Kmsg:
    """A non-blocking reader of ``/dev/kmsg`` from the end of the log at open."""

    __slots__ = ("path", "_fd", "_seq", "lost")

    def __init__(self, path: str = "/dev/kmsg") -> None:
        self.path = path
        self._fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            os.lseek(self._fd, 0, os.SEEK_END)  # history is not news
        except BaseException:
            os.close(self._fd)
            raise
        self._seq = -1
        self.lost = 0
        """Records the kernel dropped before we read them."""

    def fileno(self) -> int:
        return self._fd

    def read(self, limit: int = 4096) -> tuple[list[KmsgRecord], list[str]]:
        """Pending records (at most ``limit``) and the problems met (unparsable records)."""
        out: list[KmsgRecord] = []
        bad: list[str] = []
        for _ in range(limit):
            try:
                raw = os.read(self._fd, MAX_RECORD)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno == errno.EPIPE:
                    continue  # overrun: the next read returns the oldest record left
                if exc.errno == errno.EINVAL:
                    bad.append("a record longer than the read buffer")
                    continue
                raise
            if not raw:
                break
            try:
                rec = parse_record(raw)
            except ValueError as exc:
                bad.append(str(exc))
                continue
            if self._seq >= 0 and rec.seq > self._seq + 1:
                self.lost += rec.seq - self._seq - 1
            self._seq = rec.seq
            out.append(rec)
        return out, bad

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
