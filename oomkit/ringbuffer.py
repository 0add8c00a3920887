"""The tracefs ring buffer: sub-buffer pages, the events in them, and two ways to read them.

Each CPU has a ring of sub-buffers.  A sub-buffer starts with a header
(``events/header_page``): a 64-bit timestamp, a commit word holding the bytes of data in
the page (flags in its high bits: events were lost before this page, and whether their
count is stored right after the data), then the data.  The data is a run of events, each
starting with a 32-bit word (``events/header_event``): ``type_len`` in the low bits and a
``time_delta`` from the previous event in the rest.

* ``type_len`` 1 to ``data_max``: a record of ``4 × type_len`` bytes follows;
* ``type_len`` 0: the next word is the length (counting itself), then the record;
* padding: with a zero delta the rest of the page is unused; otherwise a discarded event
  whose length is in the next word;
* time extend: the delta did not fit, the next word holds its high bits;
* time stamp: an absolute timestamp (high bits in the next word).

Nothing in a page is trusted: every length is checked against the bytes that are really
there before anything is read, a bad event ends the page (counted, with a reason), and no
loop can run without advancing.

:class:`MappedCpu` reads one CPU's ring through the memory-mapped ``trace_pipe_raw``
(Linux >= 6.10, ``Documentation/trace/ring-buffer-map.rst``): a meta page, then every
sub-buffer, mapped read-only.  ``TRACE_MMAP_IOCTL_GET_READER`` hands over the *reader*
sub-buffer: the kernel swaps a full one in if the current one was read to its end, marks
everything in it up to ``meta.reader.read`` as consumed, and updates the meta page.  The
writer never touches the reader sub-buffer below that point, and the ioctl is a system
call, so what was committed before it is visible after it: the reader copies exactly the
bytes ``[where it stopped, reader.read)`` and needs no fence of its own.  Events lost to the
writer overrunning the ring are the growth of the meta page's ``overrun`` counter.

:class:`ReadCpu` is the fallback for kernels without the mapping: each ``read()`` of
``trace_pipe_raw`` returns one sub-buffer copied out of the ring, in the same format; lost
events are the count stored in the page, or the growth of ``per_cpu/cpuN/stats``'s
``overrun`` when the page has no room for it.
"""

from __future__ import annotations

import ctypes
import fcntl
import mmap
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, final

from .tracefs import EventHeader, PageHeader

__all__ = [
    "GET_READER",
    "Batch",
    "MappedCpu",
    "MappingUnavailable",
    "Meta",
    "PageParser",
    "RawEvent",
    "ReadCpu",
]

# Commit-word flags.  Not in header_page: these are the kernel's (RB_MISSED_EVENTS,
# RB_MISSED_STORED in kernel/trace/ring_buffer.c) and libtraceevent's kbuffer reads them the
# same way; the size is in the low 27 bits.
MISSED_EVENTS = 1 << 31
MISSED_STORED = 1 << 30
COMMIT_MASK = (1 << 27) - 1

GET_READER = 0x5220
"""``TRACE_MMAP_IOCTL_GET_READER``: ``_IO('R', 0x20)`` (``include/uapi/linux/trace_mmap.h``)."""

META_STRUCT_MIN = 64
"""Bytes of ``struct trace_buffer_meta`` this reader needs (through ``read``)."""
PAGE = mmap.PAGESIZE


class RawEvent(NamedTuple):
    """One record from a page and its timestamp (the instance's trace clock, in ns)."""

    ts: int
    payload: bytes


@dataclass(slots=True)
class Batch:
    """What one read of a CPU's ring produced."""

    events: list[RawEvent] = field(default_factory=list)
    lost: int = 0
    """Events the writer overwrote before we read them."""
    rejected: list[tuple[str, str]] = field(default_factory=list)
    """``(reason, detail)`` for every page or event that was not well-formed."""
    ioctls: int = 0
    pages: int = 0


@dataclass(frozen=True, slots=True)
class Meta:
    """The fields of ``struct trace_buffer_meta`` this reader uses."""

    meta_page_size: int
    meta_struct_len: int
    subbuf_size: int
    nr_subbufs: int
    lost_events: int
    reader_id: int
    reader_read: int
    flags: int
    entries: int
    overrun: int
    read: int

    @classmethod
    def unpack(cls, raw: bytes) -> Meta:
        g = int.from_bytes
        return cls(
            g(raw[0:4], "little"), g(raw[4:8], "little"), g(raw[8:12], "little"), g(raw[12:16], "little"),
            g(raw[16:24], "little"), g(raw[24:28], "little"), g(raw[28:32], "little"),
            g(raw[32:40], "little"), g(raw[40:48], "little"), g(raw[48:56], "little"), g(raw[56:64], "little"),
        )

    @property
    def unread(self) -> int:
        """Events still in the ring, not yet handed to a reader (the kernel's own count)."""
        return self.entries - self.overrun - self.read


class PageParser:
    """Parses sub-buffers laid out as ``header_page`` and ``header_event`` describe them."""

    __slots__ = ("page", "event", "_delta_mask", "_type_mask", "_ts_msb")

    def __init__(self, page: PageHeader, event: EventHeader) -> None:
        self.page = page
        self.event = event
        self._type_mask = (1 << event.type_len_bits) - 1
        self._delta_mask = (1 << event.time_delta_bits) - 1
        # An absolute time stamp has 59 bits; the top five come from the running clock.
        self._ts_msb = ((1 << 64) - 1) ^ ((1 << (32 + event.time_delta_bits)) - 1)

    def header(self, buf: bytes) -> tuple[int, int, bool, int | None]:
        """``(timestamp, data bytes, events were lost before it, their stored count or None)``.

        Raises ValueError when the page cannot be a sub-buffer of this layout.
        """
        p = self.page
        if len(buf) < p.data_offset:
            raise ValueError(f"page of {len(buf)} bytes, shorter than its {p.data_offset}-byte header")
        ts = int.from_bytes(buf[p.timestamp_offset : p.timestamp_offset + 8], "little")
        commit = int.from_bytes(buf[p.commit_offset : p.commit_offset + p.commit_size], "little")
        size = commit & COMMIT_MASK
        if p.data_offset + size > len(buf):
            raise ValueError(f"commit says {size} bytes of data, the page holds {len(buf) - p.data_offset}")
        stored: int | None = None
        if commit & MISSED_STORED:
            at = p.data_offset + size
            if at + p.commit_size <= len(buf):
                stored = int.from_bytes(buf[at : at + p.commit_size], "little")
        return ts, size, bool(commit & MISSED_EVENTS), stored

    def events(self, buf: bytes, start: int, end: int, ts: int, out: Batch) -> tuple[int, int]:
        """Append the events of data bytes ``[start, end)`` (offsets into the data) to
        ``out.events``; return ``(offset reached, running timestamp)``.

        A malformed event is appended to ``out.rejected`` and ends the run: the offset
        returned is ``end``, since nothing after it can be located.
        """
        e = self.event
        base = self.page.data_offset
        limit = base + end
        if limit > len(buf) or start < 0 or start > end:
            out.rejected.append(("page", f"data range [{start}, {end}) outside a {len(buf)}-byte page"))
            return end, ts
        pos = base + start
        type_mask, delta_mask, shift = self._type_mask, self._delta_mask, e.type_len_bits
        while pos < limit:
            if pos + 4 > limit:
                out.rejected.append(("truncated", f"event header at {pos - base} runs past {end}"))
                return end, ts
            word = int.from_bytes(buf[pos : pos + 4], "little")
            type_len, delta = word & type_mask, (word >> shift) & delta_mask
            if 0 < type_len <= e.data_max:
                length = 4 + 4 * type_len
                if pos + length > limit:
                    out.rejected.append(("truncated", f"a {length}-byte event at {pos - base} runs past {end}"))
                    return end, ts
                ts += delta
                out.events.append(RawEvent(ts, buf[pos + 4 : pos + length]))
                pos += length
                continue
            if type_len == e.padding and delta == 0:
                return end, ts  # the rest of the page is unused
            if pos + 8 > limit:
                out.rejected.append(("truncated", f"an 8-byte event at {pos - base} runs past {end}"))
                return end, ts
            array0 = int.from_bytes(buf[pos + 4 : pos + 8], "little")
            if type_len == 0:
                # The length word counts itself; records are padded to 4 bytes.
                if array0 < 4:
                    out.rejected.append(("length", f"event at {pos - base} has length word {array0}"))
                    return end, ts
                length = 8 + ((array0 - 4 + 3) & ~3)
                if pos + length > limit:
                    out.rejected.append(("truncated", f"a {length}-byte event at {pos - base} runs past {end}"))
                    return end, ts
                ts += delta
                out.events.append(RawEvent(ts, buf[pos + 8 : pos + 4 + array0]))
                pos += length
            elif type_len == e.padding:
                length = 4 + array0  # a discarded event: its length word does not count the header
                if array0 < 4 or pos + length > limit:
                    out.rejected.append(("length", f"padding of {array0} bytes at {pos - base} runs past {end}"))
                    return end, ts
                ts += delta
                pos += (length + 3) & ~3
            elif type_len == e.time_extend:
                ts += (array0 << e.time_delta_bits) + delta
                pos += 8
            elif type_len == e.time_stamp:
                ts = ((array0 << e.time_delta_bits) | delta) | (ts & self._ts_msb)
                pos += 8
            else:
                out.rejected.append(("type", f"event at {pos - base} has type_len {type_len}"))
                return end, ts
        return pos - base, ts

    def page_events(self, buf: bytes, out: Batch) -> tuple[bool, int | None]:
        """Every event of a whole page; ``(events were lost before it, stored count)``."""
        try:
            ts, size, missed, stored = self.header(buf)
        except ValueError as exc:
            out.rejected.append(("page", str(exc)))
            return False, None
        out.pages += 1
        self.events(buf, 0, size, ts, out)
        return missed, stored


# --- memory mapping --------------------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_MAP_FAILED = ctypes.c_void_p(-1).value


class MappingUnavailable(OSError):
    """The ring buffer cannot be memory-mapped here (kernel before 6.10, a snapshot in use)."""


def _map(fd: int, length: int, offset: int) -> int:
    # Python's mmap.mmap refuses: trace_pipe_raw has st_size 0.  Read-only and shared, as
    # the kernel demands (a writable or private mapping is refused with EPERM).
    addr = _libc.mmap(None, length, mmap.PROT_READ, mmap.MAP_SHARED, fd, offset)
    if addr is None or addr == _MAP_FAILED:
        err = ctypes.get_errno()
        raise MappingUnavailable(err, os.strerror(err))
    return int(addr)


@final
class MappedCpu:
    """One CPU's ring, memory-mapped; :meth:`read` follows the reader protocol."""

    __slots__ = ("cpu", "path", "parser", "_fd", "_meta_addr", "_meta_len", "_data_addr", "_data_len",
                 "subbuf_size", "nr_subbufs", "_id", "_page_ts", "_offset", "_ts", "_overrun")

    def __init__(self, path: Path, cpu: int, parser: PageParser) -> None:
        self.cpu = cpu
        self.path = path
        self.parser = parser
        self._meta_addr = self._data_addr = 0
        self._meta_len = self._data_len = 0
        self._fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            self._setup()
        except BaseException:
            self.close()
            raise

    def _setup(self) -> None:
        self._meta_addr, self._meta_len = _map(self._fd, PAGE, 0), PAGE
        meta = self._meta()
        if meta.meta_page_size < PAGE or meta.meta_page_size % PAGE or meta.meta_page_size > 64 * PAGE:
            raise MappingUnavailable(0, f"meta page size {meta.meta_page_size} is not a page multiple")
        if meta.meta_struct_len < META_STRUCT_MIN:
            raise MappingUnavailable(0, f"meta page describes {meta.meta_struct_len} bytes, {META_STRUCT_MIN} needed")
        p = self.parser.page
        if meta.subbuf_size != p.subbuf_size or meta.subbuf_size % PAGE:
            raise MappingUnavailable(
                0, f"sub-buffers of {meta.subbuf_size} bytes, header_page describes {p.subbuf_size}"
            )
        if not 2 <= meta.nr_subbufs <= 1 << 20:
            raise MappingUnavailable(0, f"{meta.nr_subbufs} sub-buffers")
        self.subbuf_size, self.nr_subbufs = meta.subbuf_size, meta.nr_subbufs
        self._data_len = meta.subbuf_size * meta.nr_subbufs
        self._data_addr = _map(self._fd, self._data_len, meta.meta_page_size)
        self._id, self._page_ts, self._offset, self._ts = -1, -1, 0, 0
        self._overrun = meta.overrun

    def fileno(self) -> int:
        return self._fd

    def _meta(self) -> Meta:
        return Meta.unpack(ctypes.string_at(self._meta_addr, META_STRUCT_MIN))

    def read(self) -> Batch:
        """Everything committed since the last call.  One ioctl when the reader sub-buffer
        holds it all; another per sub-buffer swapped in while the kernel still counts
        unread events, at most one pass round the ring."""
        out = Batch()
        parser = self.parser
        for _ in range(self.nr_subbufs + 1):
            fcntl.ioctl(self._fd, GET_READER)
            out.ioctls += 1
            meta = self._meta()
            if meta.overrun > self._overrun:
                out.lost += meta.overrun - self._overrun
            self._overrun = meta.overrun
            if meta.reader_id >= self.nr_subbufs:
                out.rejected.append(("meta", f"reader sub-buffer {meta.reader_id} of {self.nr_subbufs}"))
                break
            page = ctypes.string_at(self._data_addr + meta.reader_id * self.subbuf_size, self.subbuf_size)
            try:
                ts, size, _, _ = parser.header(page)
            except ValueError as exc:
                out.rejected.append(("page", str(exc)))
                break
            end = min(meta.reader_read, size)
            if meta.reader_id != self._id or ts != self._page_ts or end < self._offset:
                # A sub-buffer we have not read from yet.
                self._id, self._page_ts, self._offset, self._ts = meta.reader_id, ts, 0, ts
                out.pages += 1
            self._offset, self._ts = parser.events(page, self._offset, end, self._ts, out)
            if meta.unread <= 0:
                break
        return out

    def reader_page(self) -> bytes:
        """A copy of the current reader sub-buffer, header and all (for recording pages)."""
        return ctypes.string_at(self._data_addr + max(0, self._id) * self.subbuf_size, self.subbuf_size)

    def close(self) -> None:
        """Unmap and close; the instance can be removed only after this."""
        if self._data_addr:
            _libc.munmap(self._data_addr, self._data_len)
            self._data_addr = 0
        if self._meta_addr:
            _libc.munmap(self._meta_addr, self._meta_len)
            self._meta_addr = 0
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __repr__(self) -> str:
        return f"<MappedCpu {self.cpu} subbufs={getattr(self, 'nr_subbufs', '?')}>"


@final
class ReadCpu:
    """One CPU's ring through ``read()`` of ``trace_pipe_raw``: one sub-buffer per read."""

    __slots__ = ("cpu", "path", "parser", "_fd", "_stats", "_overrun", "max_pages")

    def __init__(self, path: Path, cpu: int, parser: PageParser, stats: Path | None = None,
                 max_pages: int = 256) -> None:
        self.cpu = cpu
        self.path = path
        self.parser = parser
        self._stats = stats
        self.max_pages = max_pages
        self._fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        self._overrun = self._read_overrun()

    def fileno(self) -> int:
        return self._fd

    def _read_overrun(self) -> int | None:
        if self._stats is None:
            return None
        try:
            for line in self._stats.read_text().splitlines():
                key, _, value = line.partition(":")
                if key.strip() == "overrun":
                    return int(value)
        except (OSError, ValueError):
            pass
        return None

    def read(self) -> Batch:
        out = Batch()
        size = self.parser.page.subbuf_size
        for _ in range(self.max_pages):
            try:
                buf = os.read(self._fd, size)
            except BlockingIOError:
                break
            if not buf:
                break
            missed, stored = self.parser.page_events(buf, out)
            if missed:
                if stored is not None:
                    out.lost += stored
                    if self._overrun is not None:
                        self._overrun += stored
                else:
                    now = self._read_overrun()
                    if now is not None and self._overrun is not None and now > self._overrun:
                        out.lost += now - self._overrun
                    else:
                        out.lost += 1  # at least one; the count was not kept
                    self._overrun = now
        return out

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __repr__(self) -> str:
        return f"<ReadCpu {self.cpu}>"
