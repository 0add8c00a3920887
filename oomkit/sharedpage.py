"""The shared page: a memory-mapped ring any process can write OOM events into.

The layout, the commit protocol and the threat model are specified in
``docs/shared-page.md``; this module is the Python side of it: the layout constants, a
:class:`Publisher` (one writer per ring), a :class:`RingReader` that validates every record,
the datagram :class:`Doorbell` and the ownership checks a reader applies before it reads a
ring.  The C side is ``examples/shared-page/oomkit_shared_page.h``.

Ordering from Python.  The protocol needs a release fence between the writer's stores and
an acquire fence between the reader's loads, and Python has neither on mapped memory.
:func:`fence` takes and releases a private :class:`threading.Lock`: in CPython that is
``sem_wait``/``sem_post`` (3.11, 3.12) or an atomic compare-and-swap (3.13's ``PyMutex``),
functions POSIX.1 (section 4.12, "Memory Synchronization") requires to synchronize memory,
so no load or store moves across it on any CPU Linux runs on, not only on x86-64.  The
publisher calls it between the sequence word, the body, the sequence word and
``write_seq``; the reader between ``write_seq`` and the copy, and between the copy and the
second load of the sequence word (or, guessing after a doorbell, between its two copies).

The reader never maps a ring: it reads with ``pread``, so a producer that truncates its
ring (by accident or on purpose) makes a read come up short, which refuses the ring, where
a mapping would have killed the reader with SIGBUS.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import math
import re
import socket
import stat
import struct
import termios
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import msgspec

from .errors import OomkitError
from .events import EventKind, Tree
from .procfs import StartTimes

__all__ = [
    "CAPACITY_MAX",
    "HEADER",
    "HEADER_SIZE",
    "KIND_CODES",
    "MAGIC",
    "RECORD",
    "RECORD_HEADER_SIZE",
    "RECORD_SIZE_MAX",
    "RECORD_SIZE_MIN",
    "VERSION",
    "Doorbell",
    "LayoutError",
    "OwnerPolicy",
    "Publisher",
    "Record",
    "RingReader",
    "UnsafeRingError",
    "check_directory",
    "fence",
    "read_pid_max",
]

MAGIC: Final = b"OOMKRING"
VERSION: Final = 1

# Header, 64 bytes: magic, version, header_size, record_size, capacity, flags, producer_pid,
# reserved, write_seq, reserved.
HEADER: Final = struct.Struct("<8sHHIIII4xQ24x")
HEADER_SIZE: Final = HEADER.size
PRODUCER_PID_OFFSET: Final = 24
WRITE_SEQ_OFFSET: Final = 32

# Record head, 40 bytes: seq, mono_ns, start_ticks, pid, kind, flags, path_len,
# value_count, reserved; the path follows, then (8-byte aligned) value_count values.
RECORD: Final = struct.Struct("<QQQIHHHH4x")
RECORD_HEADER_SIZE: Final = RECORD.size
_WORDS: Final = struct.Struct("<QQQIHHHHI")
"""A record head as the reader takes it apart: RECORD with its reserved word as a number."""
_BODY_HEAD: Final = struct.Struct("<QQIHHHH")
"""A record head after its sequence word, as the publisher packs it."""
SEQ: Final = struct.Struct("<Q")
_SEQ_TIME: Final = struct.Struct("<QQ")
"""A record's first two words: seq and mono_ns."""
VALUE: Final = struct.Struct("<24sd")
"""One value: a name (ASCII ``[a-z][a-z0-9_]*``, NUL-padded to 24 bytes) and a float64."""
VALUE_NAME: Final = re.compile(r"[a-z][a-z0-9_]{0,23}")
VALUE_LIMIT: Final = 1e18
"""The largest magnitude a value may have (bytes of a machine's memory fit many times)."""

RECORD_SIZE_MIN: Final = 64
RECORD_SIZE_MAX: Final = 8192
CAPACITY_MAX: Final = 65536
DEFAULT_RECORD_SIZE: Final = 512
DEFAULT_CAPACITY: Final = 256

PID_MAX_LIMIT: Final = 4 * 1024 * 1024
"""The kernel's ceiling for ``/proc/sys/kernel/pid_max`` on 64-bit machines."""

KIND_CODES: Final[dict[int, EventKind]] = {
    1: "oom",
    2: "kernel-kill",
    3: "low-memory",
    4: "pressure",
    5: "pressure-cleared",
    6: "threshold",
    7: "memory-events",
}
KIND_NUMBERS: Final[dict[EventKind, int]] = {v: k for k, v in KIND_CODES.items()}

TREE_MASK: Final = 0x3
TREE_CODES: Final[dict[int, Tree]] = {0: "v1", 1: "v2", 2: "system"}
TREE_NUMBERS: Final[dict[Tree, int]] = {v: k for k, v in TREE_CODES.items()}

FUTURE_SLACK_NS: Final = 1_000_000_000
"""How far ahead of the reader's clock a record's timestamp may be (clock read races)."""

RING_SUFFIX: Final = ".ring"
_CHUNK: Final = 256
"""Records a reader copies per pair of reads: bounds its memory on a large backlog."""
DOORBELL_NAME: Final = "doorbell"
_INT0: Final = bytes(4)
"""An int 0 as ioctl() takes and returns it (the bytes the kernel wrote)."""
_KEPT: Final = 256
"""Validated paths, and value names, a reader remembers per ring."""
_KEPT_PATH_MAX: Final = 512
"""The longest path a reader remembers (a bound on the table's bytes); longer ones are
checked every time."""
_ZEROS: Final = bytes(RECORD_SIZE_MAX)
"""What a record's padding must match: ``raw.endswith(_ZEROS[:k], a, b)`` compares ``k``
bytes with one memcmp, where ``raw.count(0, a, b)`` (a loop over each byte) took a sixth of
a record's validation."""


class LayoutError(OomkitError, ValueError):
    """A ring file whose header does not describe a usable ring; the message names it."""


class UnsafeRingError(OomkitError, PermissionError):
    """A ring or directory that someone other than a trusted user could have written."""


class Record(msgspec.Struct, frozen=True, kw_only=True):
    """One validated record."""

    seq: int
    """The record's number in its ring, from 1."""
    mono_ns: int
    pid: int
    """0 when the producer names no process."""
    start_ticks: int
    kind: EventKind
    tree: Tree
    path: str
    values: dict[str, float] = msgspec.field(default_factory=dict)


_FENCE = threading.Lock()
_fence_acquire, _fence_release = _FENCE.acquire, _FENCE.release


def fence() -> None:
    """A full memory barrier for loads and stores on shared memory (see the module doc)."""
    _fence_acquire()
    _fence_release()


def values_offset(path_len: int) -> int:
    """Where a record's values start: after the path, aligned to 8 bytes."""
    return RECORD_HEADER_SIZE + (path_len + 7) // 8 * 8


def values_problem(values: Mapping[str, float]) -> str | None:
    """Why these values cannot go into a record, or None."""
    for name, value in values.items():
        if not isinstance(name, str) or not VALUE_NAME.fullmatch(name):
            return f"value name {name!r} is not [a-z][a-z0-9_]* of at most 24 characters"
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"value {name} is not a number"
        if not math.isfinite(value) or abs(value) > VALUE_LIMIT:
            return f"value {name} = {value} is not finite or beyond {VALUE_LIMIT:g}"
    return None


def read_pid_max(proc: str = "/proc") -> int:
    """``/proc/sys/kernel/pid_max``, or the kernel's ceiling when it cannot be read."""
    try:
        return int(Path(f"{proc}/sys/kernel/pid_max").read_text())
    except (OSError, ValueError):
        return PID_MAX_LIMIT


def ring_bytes(record_size: int, capacity: int) -> int:
    return HEADER_SIZE + record_size * capacity


def check_geometry(record_size: int, capacity: int) -> None:
    """Raise :class:`LayoutError` unless the sizes are ones the spec allows."""
    if not RECORD_SIZE_MIN <= record_size <= RECORD_SIZE_MAX or record_size % 64:
        raise LayoutError(
            f"record size {record_size} is not a multiple of 64 in [{RECORD_SIZE_MIN}, {RECORD_SIZE_MAX}]"
        )
    if not 1 <= capacity <= CAPACITY_MAX:
        raise LayoutError(f"capacity {capacity} is not in [1, {CAPACITY_MAX}]")


def path_problem(raw: bytes) -> str | None:
    """Why ``raw`` is not a path the spec allows, or None: absolute, UTF-8, no NUL, no empty,
    ``.`` or ``..`` component, no trailing slash (except ``/`` itself)."""
    if not raw.startswith(b"/"):
        return "path is not absolute"
    if b"\0" in raw:
        return "path contains NUL"
    if raw != b"/":
        for part in raw[1:].split(b"/"):
            if part in (b"", b".", b".."):
                return "path has an empty, '.' or '..' component"
    try:
        raw.decode()
    except UnicodeDecodeError:
        return "path is not UTF-8"
    return None


# --- ownership -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OwnerPolicy:
    """Whose files a reader trusts.

    Root and the reader's own effective uid are always trusted; ``uids`` adds producers.  A
    ring must never be writable by others; it may be group-writable only for a group in
    ``gids``.
    """

    uids: frozenset[int] = frozenset()
    gids: frozenset[int] = frozenset()

    @property
    def trusted_uids(self) -> frozenset[int]:
        return self.uids | {0, os.geteuid()}

    def check_ring(self, path: str | os.PathLike[str], st: os.stat_result) -> None:
        """Raise :class:`UnsafeRingError` unless a ring with status ``st`` may be trusted."""
        if not stat.S_ISREG(st.st_mode):
            raise UnsafeRingError(f"{path}: not a regular file")
        if st.st_uid not in self.trusted_uids:
            raise UnsafeRingError(f"{path}: owned by uid {st.st_uid}, which is not a trusted producer")
        if st.st_mode & stat.S_IWOTH:
            raise UnsafeRingError(f"{path}: writable by others (mode {stat.S_IMODE(st.st_mode):o})")
        if st.st_mode & stat.S_IWGRP and st.st_gid not in self.gids:
            raise UnsafeRingError(
                f"{path}: writable by group {st.st_gid}, which is not trusted (mode {stat.S_IMODE(st.st_mode):o})"
            )


def check_directory(path: str | os.PathLike[str]) -> None:
    """Raise :class:`UnsafeRingError` unless ``path`` and every directory above it are owned
    by root or by us and writable by nobody else, except with the sticky bit (as ``/tmp``):
    otherwise someone could swap a trusted ring for a file of their own."""
    trusted = {0, os.geteuid()}
    p = Path(os.path.abspath(path))
    for d in (p, *p.parents):
        st = os.stat(d)
        if not stat.S_ISDIR(st.st_mode):
            raise UnsafeRingError(f"{d}: not a directory")
        if st.st_uid not in trusted:
            raise UnsafeRingError(f"{d}: owned by uid {st.st_uid}, neither root nor us")
        if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not st.st_mode & stat.S_ISVTX:
            raise UnsafeRingError(
                f"{d}: writable by group or others without the sticky bit (mode {stat.S_IMODE(st.st_mode):o})"
            )


# --- publishing ------------------------------------------------------------------------------


class Publisher:
    """The one writer of one ring.  Use :meth:`create` or :meth:`open`, then :meth:`publish`.

    An exclusive ``flock`` on the ring file keeps a second publisher out: the protocol has
    no way to merge two writers' sequences.  Several producers each use a ring of their own
    (a directory of rings).
    """

    def __init__(self, path: Path, fd: int, mm: mmap.mmap, doorbell: str | None) -> None:
        self.path = path
        self._fd = fd
        self._mm = mm
        fields = HEADER.unpack_from(mm, 0)
        self.record_size: int = fields[3]
        self.capacity: int = fields[4]
        self.write_seq: int = fields[7]
        self.doorbell = doorbell
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) if doorbell else None

    @classmethod
    def create(
        cls,
        path: str | os.PathLike[str],
        *,
        capacity: int = DEFAULT_CAPACITY,
        record_size: int = DEFAULT_RECORD_SIZE,
        mode: int = 0o600,
        doorbell: str | os.PathLike[str] | None = None,
    ) -> Publisher:
        """Create a new ring at ``path``, replacing a ring there that no publisher holds.

        The ring is built under a temporary name, at its full size, and renamed into place,
        so a reader never sees a half-written header.  A ring at ``path`` that a live
        publisher still holds (its ``flock``) is not replaced: BlockingIOError.  The old
        ring's lock is held until the rename, so no publisher can take it in between.
        ``mode`` is the ring's mode (0600: only the producer writes it; a reader refuses
        rings that others may write).  ``doorbell`` defaults to ``doorbell`` beside the ring.
        """
        check_geometry(record_size, capacity)
        final = Path(path)
        tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
        old = _lock_existing(final)
        try:
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, mode)
            try:
                os.fchmod(fd, mode)  # the umask must not widen or narrow what the caller asked
                size = ring_bytes(record_size, capacity)
                # Full size before the rename: a reader refuses a ring shorter than its header says.
                os.ftruncate(fd, size)
                mm = mmap.mmap(fd, size)
                HEADER.pack_into(mm, 0, MAGIC, VERSION, HEADER_SIZE, record_size, capacity, 0, os.getpid(), 0)
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                os.rename(tmp, final)
            except BaseException:
                os.close(fd)
                tmp.unlink(missing_ok=True)
                raise
        finally:
            if old >= 0:
                os.close(old)
        return cls(final, fd, mm, _doorbell_for(final, doorbell))

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, doorbell: str | os.PathLike[str] | None = None) -> Publisher:
        """Take over an existing ring (a restarted producer), continuing its sequence."""
        p = Path(path)
        fd = os.open(p, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise BlockingIOError(errno.EWOULDBLOCK, f"{p}: another publisher holds this ring") from None
            size = os.fstat(fd).st_size
            record_size, capacity = parse_header(p, os.pread(fd, HEADER_SIZE, 0), size)
            mm = mmap.mmap(fd, ring_bytes(record_size, capacity))
        except BaseException:
            os.close(fd)
            raise
        mm[PRODUCER_PID_OFFSET : PRODUCER_PID_OFFSET + 4] = struct.pack("<I", os.getpid())
        return cls(p, fd, mm, _doorbell_for(p, doorbell))

    @property
    def path_max(self) -> int:
        return self.record_size - RECORD_HEADER_SIZE

    def publish(
        self,
        kind: EventKind,
        path: str,
        *,
        pid: int = 0,
        start_ticks: int = 0,
        tree: Tree = "v1",
        mono_ns: int | None = None,
        values: Mapping[str, float] | None = None,
        ring: bool = True,
    ) -> int:
        """Write one record and ring the doorbell; return its sequence number.

        ``path`` is the cgroup's path as ``/proc/PID/cgroup`` shows it (``/`` for
        ``tree="system"``).  ``pid`` is the process that triggered the event (not a
        suggested victim) and ``start_ticks`` field 22 of its ``/proc/PID/stat``, both as
        the reader's namespaces see them.  ``values`` become the event's ``values``.
        """
        raw = path.encode()
        problem = path_problem(raw)
        if problem:
            raise ValueError(f"{path!r}: {problem}")
        vals = dict(values or {})
        problem = values_problem(vals)
        if problem:
            raise ValueError(problem)
        if len(raw) > self.path_max:
            raise ValueError(f"{path!r}: longer than the {self.path_max} bytes a record holds")
        end = values_offset(len(raw)) + VALUE.size * len(vals)
        if vals and end > self.record_size:
            raise ValueError(f"{path!r} and {len(vals)} value(s) need {end} bytes, a record has {self.record_size}")
        if tree == "system" and raw != b"/":
            raise ValueError("a system-wide record has the path '/'")
        if (pid == 0) != (start_ticks == 0):
            raise ValueError("give both pid and start_ticks, or neither")
        n = self.write_seq + 1
        off = HEADER_SIZE + (n - 1) % self.capacity * self.record_size
        body = bytearray(self.record_size - 8)
        _BODY_HEAD.pack_into(
            body, 0, time.monotonic_ns() if mono_ns is None else mono_ns, start_ticks, pid,
            KIND_NUMBERS[kind], TREE_NUMBERS[tree], len(raw), len(vals),
        )
        body[RECORD_HEADER_SIZE - 8 : RECORD_HEADER_SIZE - 8 + len(raw)] = raw
        at = values_offset(len(raw)) - 8
        for name, value in vals.items():
            VALUE.pack_into(body, at, name.encode(), float(value))
            at += VALUE.size
        mm = self._mm
        # Each word is stored with one 8-byte slice assignment (one memcpy), never with
        # struct.pack_into, which zero-fills its target before writing: a concurrent reader
        # would see write_seq drop to 0 for a moment.  fence() orders the stores (module doc).
        mm[off : off + 8] = SEQ.pack(2 * n - 1)
        fence()
        mm[off + 8 : off + self.record_size] = body
        fence()
        mm[off : off + 8] = SEQ.pack(2 * n)
        fence()
        mm[WRITE_SEQ_OFFSET : WRITE_SEQ_OFFSET + 8] = SEQ.pack(n)
        self.write_seq = n
        if ring:
            self.ring()
        return n

    def ring(self) -> bool:
        """Wake the reader; False when nobody listens (the reader's slow poll will see it)."""
        sock = self._sock
        if sock is None or self.doorbell is None:
            return False
        # Connected once, not a sendto() per ring: the kernel's path lookup was a third of the
        # time from a record's timestamp to the reader's wake.  A reader that restarted has a
        # new socket (the old one refuses: ECONNREFUSED), so a failed send connects anew.
        try:
            sock.send(b"\0", socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)
        except BlockingIOError:
            return True  # the reader has wake-ups queued already
        except OSError:
            try:
                sock.connect(self.doorbell)
                sock.send(b"\0", socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)
            except BlockingIOError:
                return True
            except OSError:
                return False  # no reader (ENOENT, ECONNREFUSED) or not allowed to ring (EACCES)
        return True

    def close(self, *, unlink: bool = False) -> None:
        if unlink:
            self.path.unlink(missing_ok=True)
        self._mm.close()
        os.close(self._fd)
        if self._sock is not None:
            self._sock.close()

    def __enter__(self) -> Publisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Publisher {str(self.path)!r} seq={self.write_seq} capacity={self.capacity}>"


def _lock_existing(path: Path) -> int:
    """The fd of the ring at ``path`` with its exclusive lock held, -1 if there is none;
    BlockingIOError if a live publisher holds it."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    except (FileNotFoundError, OSError):
        return -1
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            return -1
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise BlockingIOError(errno.EWOULDBLOCK, f"{path}: a live publisher holds this ring; not replaced") from None
    except BaseException:
        os.close(fd)
        raise
    return fd


def _doorbell_for(ring: Path, doorbell: str | os.PathLike[str] | None) -> str:
    return str(doorbell) if doorbell is not None else str(ring.with_name(DOORBELL_NAME))


def parse_header(path: str | os.PathLike[str], raw: bytes, file_size: int) -> tuple[int, int]:
    """``(record_size, capacity)`` from a ring's header; :class:`LayoutError` if unusable."""
    if len(raw) < HEADER_SIZE:
        raise LayoutError(f"{path}: {len(raw)} bytes, shorter than a header")
    magic, version, header_size, record_size, capacity, flags, _, _ = HEADER.unpack_from(raw, 0)
    if magic != MAGIC:
        raise LayoutError(f"{path}: not a shared-page ring (magic {magic!r})")
    if version != VERSION:
        raise LayoutError(f"{path}: layout version {version}, this reader knows {VERSION}")
    if header_size != HEADER_SIZE:
        raise LayoutError(f"{path}: header size {header_size}, version {VERSION} has {HEADER_SIZE}")
    if flags:
        raise LayoutError(f"{path}: unknown feature flags {flags:#x} (a newer producer?)")
    try:
        check_geometry(record_size, capacity)
    except LayoutError as exc:
        raise LayoutError(f"{path}: {exc}") from None
    need = ring_bytes(record_size, capacity)
    if file_size != need:
        raise LayoutError(f"{path}: {file_size} bytes, its header describes {need}")
    return record_size, capacity


# --- reading ---------------------------------------------------------------------------------


@dataclass(slots=True)
class ReaderStats:
    """What a reader did with every record number it passed: each lands in exactly one of
    ``records``, ``lost``, ``stale`` or a ``rejected`` reason."""

    records: int = 0
    lost: int = 0
    stale: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    troubles: int = 0
    """``lost + stale`` and every rejection: one number that moves whenever any of them does,
    for a caller to compare after each poll instead of the whole table."""

    @property
    def rejected_total(self) -> int:
        return sum(self.rejected.values())

    def reject(self, reason: str) -> None:
        self.rejected[reason] = self.rejected.get(reason, 0) + 1
        self.troubles += 1

    def lose(self, n: int) -> None:
        self.lost += n
        self.troubles += n

    def skip_stale(self) -> None:
        self.stale += 1
        self.troubles += 1


class RingReader:
    """Reads one ring, validating every record.

    Opening checks ownership (``policy``) and the header; after that nothing in the ring is
    trusted: a record becomes a :class:`Record` only if its sequence word reads ``2n``
    before and after the copy and every field is in range.  Anything else is counted in
    :attr:`stats` under a reason, and :attr:`last_rejection` says what the latest one was.

    The ring is read with ``pread``, never mapped: a ring cut short while it is read makes
    :meth:`poll` raise :class:`LayoutError`, and the reader is done with it.  With ``proc``,
    a record naming a live process must carry that process's start time (a reused pid, or
    a producer in another pid or time namespace, is rejected under ``pid``); the start times
    come from ``start_times`` (shared by a source's rings) or one of the reader's own
    (:class:`oomkit.procfs.StartTimes`: each live process's ``stat`` read once, kept while a
    pidfd says it has not exited).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        policy: OwnerPolicy = OwnerPolicy(),
        max_bytes: int = 16 << 20,
        pid_max: int = PID_MAX_LIMIT,
        max_age_s: float = 10.0,
        proc: str | None = None,
        start_times: StartTimes | None = None,
    ) -> None:
        self.path = Path(path)
        self.pid_max = pid_max
        self.max_age_ns = int(max_age_s * 1e9)
        self.proc = proc
        # Shared by the rings of one source (a producer's pid is read once, not per ring).
        self._own_starts = start_times is None and proc is not None
        self._starts = start_times if start_times is not None else StartTimes(proc) if proc is not None else None
        self.stats = ReaderStats()
        self.last_rejection = ""
        # O_NONBLOCK: a FIFO planted under a ring's name must not block the open.
        fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
        try:
            st = os.fstat(fd)
            policy.check_ring(self.path, st)
            if st.st_size > max_bytes:
                raise LayoutError(f"{self.path}: {st.st_size} bytes, more than the {max_bytes} allowed")
            self.record_size, self.capacity = parse_header(self.path, os.pread(fd, HEADER_SIZE, 0), st.st_size)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self.owner = st.st_uid
        self.identity = (st.st_dev, st.st_ino)
        self._newest_ns = 0
        """The latest timestamp of a consistent record read: the writer's clock only goes on."""
        # Paths and value names that passed their checks once, by their bytes in the record:
        # a producer repeats a handful of them, and validating and decoding each again was a
        # fifth of the reader's time per record.
        self._paths: dict[bytes, str] = {}
        self._names: dict[bytes, str] = {}
        # Start at the oldest record the ring still holds; the age limit drops old news.
        self.next = max(1, self.write_seq() - self.capacity + 1)

    def _pread(self, size: int, offset: int) -> bytes:
        raw = os.pread(self._fd, size, offset)
        if len(raw) < size:
            size_now = os.fstat(self._fd).st_size
            raise LayoutError(f"{self.path}: cut to {size_now} bytes while being read (its header says"
                              f" {ring_bytes(self.record_size, self.capacity)})")
        return raw

    def write_seq(self) -> int:
        return int(SEQ.unpack(self._pread(8, WRITE_SEQ_OFFSET))[0])

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self._own_starts and self._starts is not None:
            self._starts.close()

    def _reject(self, reason: str, n: int, detail: str) -> None:
        self.stats.reject(reason)
        self.last_rejection = f"record {n}: {detail}"

    def poll(self, *, rang: bool = False) -> list[Record]:
        """Every record committed since the last call, validated.  LayoutError if the ring
        was cut short.

        ``rang``: the doorbell woke the caller.  A ring whose last such poll found exactly
        one new record is first read as if it held exactly one more (:meth:`_guess`: two
        reads, not three).  Any other ring is read as the slow poll reads it: one read when
        nothing is new.  A guess that finds nothing costs one read more, once: the ring is
        not guessed at again until a doorbell poll finds one new record in it.
        """
        if rang and self._hot:
            guessed = self._guess()
            if guessed is not None:
                return guessed
        w: int = SEQ.unpack(self._pread(8, WRITE_SEQ_OFFSET))[0]
        fence()  # acquire: the records up to w are read after w
        if rang:
            self._hot = w == self.next
        if w == self.next - 1:
            return []  # nothing new: the slow poll's case, and a doorbell rung for another ring
        stats = self.stats
        if w < self.next - 1:
            # Only a writer that started over (or scribbled on the header) goes backwards.
            # Its records 1..w are new since our last look, unless it reset write_seq
            # without writing them: those slots still hold records we already passed,
            # which their timestamps give away (checked in _read).
            self._reject("sequence", w, f"write_seq went back from {self.next - 1} to {w}: the writer started over")
            self.next = max(1, w - self.capacity + 1)
            self._floor_ns = self._newest_ns
        oldest = w - self.capacity + 1
        if self.next < oldest:
            stats.lose(oldest - self.next)
            self.next = oldest
        out: list[Record] = []
        now = time.monotonic_ns()
        rs = self.record_size
        read, unpack_seq = self._read, SEQ.unpack_from
        while self.next <= w:
            # A chunk of records in two reads, whatever its length: the copy, a fence, then
            # the same bytes again for each record's second sequence load.
            first, last = self.next, min(w, self.next + _CHUNK - 1)
            copy = self._slots(first, last)
            fence()  # acquire: each copy is complete before its sequence word is loaded again
            again = self._slots(first, last)
            at = 0
            for n in range(first, last + 1):
                self.next = n + 1
                # A one-record copy is passed as it is (a full slice of bytes is the same object).
                rec = read(n, copy[at : at + rs], unpack_seq(again, at)[0], now)
                at += rs
                if rec is not None:
                    stats.records += 1
                    out.append(rec)
        return out

    _hot = False
    """Guess at the next doorbell that it rang for one new record: the last one did."""

    def _guess(self) -> list[Record] | None:
        """Record ``next`` read without ``write_seq``, if the ring holds exactly one new
        record; None, with nothing taken, if anything says otherwise (the caller then polls
        as usual).  Why two copies of two slots that must match, and the timestamp:
        docs/shared-page.md, "One new record in two reads"."""
        n, cap, rs = self.next, self.capacity, self.record_size
        index = (n - 1) % cap
        if index == cap - 1:
            return None  # slot n + 1 is the ring's first: not one read away
        at = HEADER_SIZE + index * rs
        copy = self._pread(2 * rs, at)
        want = 2 * n
        seq, mono_ns = _SEQ_TIME.unpack_from(copy, 0)
        # Not later than a record read before: maybe one a writer that started over left in a
        # slot it has not reached again, which only write_seq tells apart.  Slot n + 1 above
        # 2n: record n + 1 begun or committed, or torn with write_seq past it; write_seq's
        # poll takes all of it in one go.
        if seq != want or mono_ns <= self._newest_ns or SEQ.unpack_from(copy, rs)[0] > want:
            return None
        fence()  # acquire: the second copy is loaded after the first
        # The whole copy again, not only the sequence word: without write_seq, nothing orders
        # the first copy's bytes after its 2n (one pread loads in no defined order).
        if self._pread(2 * rs, at) != copy:
            return None
        self.next = n + 1
        rec = self._read(n, copy[:rs], want, time.monotonic_ns())
        if rec is None:
            return []
        self.stats.records += 1
        return [rec]

    def _slots(self, first: int, last: int) -> bytes:
        """Records ``first..last`` as they are in the ring, in order (a wrap is two reads)."""
        cap, rs = self.capacity, self.record_size
        index = (first - 1) % cap
        if index + last - first < cap:
            return self._pread((last - first + 1) * rs, HEADER_SIZE + index * rs)
        parts = []
        n = first
        while n <= last:
            index = (n - 1) % cap
            run = min(last - n + 1, cap - index)
            parts.append(self._pread(run * rs, HEADER_SIZE + index * rs))
            n += run
        return b"".join(parts) if len(parts) > 1 else parts[0]

    _floor_ns = 0
    """After a restart, records at or before this time are the old writer's."""

    def _read(self, n: int, raw: bytes, s2: int, now: int) -> Record | None:
        """Record ``n`` from its copy and its sequence word loaded again after the copy."""
        s1, mono_ns, ticks, pid, kind_code, flags, path_len, value_count, reserved = _WORDS.unpack_from(raw, 0)
        want = 2 * n
        if s1 != want or s2 != want:
            if s1 > want or s2 > want:
                self.stats.lose(1)  # the writer lapped us while we read this slot
            elif s1 & 1 or s2 & 1:
                self._reject("torn", n, f"sequence word {s2} is odd: the writer never finished it")
            else:
                self._reject("sequence", n, f"sequence word {s2}, expected {want}")
            return None
        if mono_ns and mono_ns <= self._floor_ns:
            self._reject("sequence", n, "written before the writer started over")
            return None
        if mono_ns <= now + FUTURE_SLACK_NS and mono_ns > self._newest_ns:
            self._newest_ns = mono_ns
        kind = KIND_CODES.get(kind_code)
        if kind is None:
            self._reject("kind", n, f"unknown kind {kind_code}")
            return None
        tree = TREE_CODES.get(flags & TREE_MASK)
        if tree is None or flags & ~TREE_MASK:
            self._reject("flags", n, f"unknown flags {flags:#x}")
            return None
        if pid >= self.pid_max or (pid == 0) != (ticks == 0):
            self._reject("pid", n, f"pid {pid} with start time {ticks} (pid_max {self.pid_max})")
            return None
        if reserved:
            self._reject("reserved", n, "reserved bytes are not zero")
            return None
        rs = self.record_size
        if path_len > rs - RECORD_HEADER_SIZE:
            self._reject("path", n, f"path length {path_len} exceeds the record")
            return None
        end = RECORD_HEADER_SIZE + path_len
        raw_path = raw[RECORD_HEADER_SIZE:end]
        path = self._paths.get(raw_path)
        if path is None:
            problem = path_problem(raw_path)
            if problem:
                self._reject("path", n, problem)
                return None
            path = raw_path.decode()
            if path_len <= _KEPT_PATH_MAX:
                self._keep(self._paths, raw_path, path)
        values_at = values_offset(path_len) if value_count else rs
        if not raw.endswith(_ZEROS[: values_at - end], end, values_at):
            self._reject("path", n, "bytes after the path are not zero")
            return None
        if tree == "system" and path != "/":
            self._reject("path", n, "a system-wide record must have the path '/'")
            return None
        values: dict[str, float] = {}
        if value_count:
            problem = self._values(raw, values_at, value_count, values)
            if problem:
                self._reject("values", n, problem)
                return None
        if mono_ns == 0 or mono_ns > now + FUTURE_SLACK_NS:
            self._reject("time", n, f"timestamp {mono_ns} ns is zero or in the future (now {now})")
            return None
        if now - mono_ns > self.max_age_ns:
            self.stats.skip_stale()
            return None
        if pid and self._starts is not None:
            live = self._starts.get(pid)
            if live is not None and live != ticks:
                self._reject("pid", n, f"pid {pid} started at {live}, the record says {ticks}: a reused pid, or"
                             " a producer in another pid or time namespace")
                return None
        return Record(seq=n, mono_ns=mono_ns, pid=pid, start_ticks=ticks, kind=kind, tree=tree,
                      path=path, values=values)

    def _values(self, raw: bytes, at: int, count: int, values: dict[str, float]) -> str | None:
        """Fill ``values`` from a record's ``count`` values at ``at``; why they are bad, or None."""
        end = at + VALUE.size * count
        if end > self.record_size:
            return f"{count} values do not fit the record"
        names = self._names
        suspect = False
        for i in range(count):
            name_raw, value = VALUE.unpack_from(raw, at + i * VALUE.size)
            name = names.get(name_raw)
            if name is None:
                name = name_raw.rstrip(b"\0").decode("ascii", errors="replace")
                if name_raw != name.encode() + bytes(24 - len(name)):
                    return f"value {i}: name {name_raw!r} is repeated or not NUL-padded"
                if VALUE_NAME.fullmatch(name):
                    self._keep(names, name_raw, name)
                else:
                    suspect = True
            if name in values:
                return f"value {i}: name {name_raw!r} is repeated or not NUL-padded"
            # NaN fails both comparisons: this is values_problem's finiteness and range test.
            if not -VALUE_LIMIT <= value <= VALUE_LIMIT:
                suspect = True
            values[name] = value
        # values_problem() says what is wrong, in the words the publisher would use; names
        # seen valid before and values in range leave it nothing to find.
        problem = values_problem(values) if suspect else None
        if problem is None and not raw.endswith(_ZEROS[: len(raw) - end], end):
            problem = "bytes after the values are not zero"
        return problem

    @staticmethod
    def _keep(cache: dict[bytes, str], raw: bytes, text: str) -> None:
        """Remember that ``raw`` passed its checks as ``text``; a producer that sends ever
        new ones only refills a bounded table."""
        if len(cache) >= _KEPT:
            cache.clear()
        cache[raw] = text

    def __repr__(self) -> str:
        s = self.stats
        return (f"<RingReader {str(self.path)!r} next={self.next} records={s.records} lost={s.lost}"
                f" rejected={s.rejected_total}>")


# --- the doorbell ----------------------------------------------------------------------------


class Doorbell:
    """The reader's end of the doorbell: a Unix datagram socket bound at a path.

    Publishers send it an empty-ish datagram after each record; it carries nothing, so
    ringing grants nothing: the reader just looks at its rings sooner.  Bound under a
    temporary name, given its mode and the directory's group, then renamed into place, so it
    is never reachable with a wider mode than asked.
    """

    def __init__(self, path: str | os.PathLike[str], mode: int = 0o660) -> None:
        self.path = Path(path)
        _refuse_live(self.path)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        tmp.unlink(missing_ok=True)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        try:
            sock.bind(str(tmp))
            os.chmod(tmp, mode)
            gid = os.stat(tmp.parent).st_gid
            if os.stat(tmp).st_gid != gid:
                os.chown(tmp, -1, gid)
            os.rename(tmp, self.path)
            st = os.stat(self.path)
        except BaseException:
            sock.close()
            tmp.unlink(missing_ok=True)
            raise
        self.sock = sock
        self._fd = sock.fileno()
        self._identity = (st.st_dev, st.st_ino)

    def fileno(self) -> int:
        return self.sock.fileno()

    def drain(self, limit: int = 4096) -> int:
        """Read pending rings (up to ``limit``) and return how many there were."""
        recv, fd = self.sock.recv, self._fd
        n = 0
        while n < limit:
            try:
                recv(16)
            except BlockingIOError:
                break
            n += 1
            # Asking the queue (FIONREAD: the next datagram's length, 0 when there is none)
            # costs less than the exception of reading it empty.  A zero-length datagram
            # left behind keeps the socket readable: the next drain takes it.
            if fcntl.ioctl(fd, termios.FIONREAD, _INT0) == _INT0:
                break
        return n

    def close(self) -> None:
        # Only remove the path if it is still ours (another reader may have replaced it).
        try:
            st = os.stat(self.path)
            if (st.st_dev, st.st_ino) == self._identity:
                self.path.unlink()
        except OSError:
            pass
        self.sock.close()


def _refuse_live(path: Path) -> None:
    """Raise if a live reader is bound at ``path``; a stale socket is fine to replace."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise FileExistsError(f"{path}: exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    try:
        probe.sendto(b"\0", socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL, str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        return
    except OSError as exc:
        if exc.errno != errno.EAGAIN:
            raise
    finally:
        probe.close()
    raise FileExistsError(f"{path}: another reader is listening on this doorbell")


def ring_names(directory: Path) -> Iterable[str]:
    """The ring files in ``directory`` (hidden temporaries left out)."""
    return sorted(n for n in os.listdir(directory) if n.endswith(RING_SUFFIX) and not n.startswith("."))
