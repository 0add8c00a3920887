"""The ``kernel-page`` source: the kernel writes each OOM kill into a page that oomkit reads.

The kernel's OOM killer fires the ``oom:mark_victim`` tracepoint for every process it
kills.  This source creates a private tracefs instance (mounting tracefs if need be: that
needs CAP_SYS_ADMIN), enables ``mark_victim``, the OOM reaper's events and, as early
warnings, ``oom:reclaim_retry_zone`` and ``oom:compact_retry`` where the kernel has them,
and reads the instance's per-CPU ring buffers in one of three ways, the first that works:

1. ``mmap``: every CPU's ``trace_pipe_raw`` memory-mapped read-only (Linux >= 6.10); the
   kernel writes records into pages this process reads with no copy and no system call per
   event; one ``TRACE_MMAP_IOCTL_GET_READER`` per wake-up hands over what was written.
2. ``read``: ``read()`` of ``trace_pipe_raw``, one sub-buffer per call, same binary pages.
3. ``kmsg``: the OOM killer's lines in ``/dev/kmsg``, as nohang reads them.

Which one it ended in, and why the ones before it failed, is logged once.

Records are laid out as each event's ``format`` file says (:mod:`oomkit.tracefs`), pages
as ``events/header_page`` and ``events/header_event`` say (:mod:`oomkit.ringbuffer`).  A
worker thread waits in ``epoll_wait`` on the per-CPU fds (the instance's
``buffer_percent`` is set to 0, so the kernel wakes a waiter on every event: at the default
50, one event did not wake it within 1.5 s) and reads the rings on each wake-up.

Each kill becomes a ``kernel-kill`` event: the victim's ``pid``, ``comm`` and start time,
its memory as the kernel saw it (``total_vm_bytes``, ``anon_rss_bytes``,
``file_rss_bytes``, ``shmem_rss_bytes``, ``pgtables_bytes``, ``uid``, ``oom_score_adj``:
what the kernel's format provides; 6.1's has the pid alone), and as scope the victim's
memory cgroup, read from ``/proc/PID/cgroup`` while the victim still exists (it is being
torn down: best effort; a miss is counted and the scope is the system).  With kmsg the
kernel's own ``task_memcg=`` is used when its line was printed (the kernel rate-limits it
to 10 per 5 s).  The event's ``monotonic_ns`` is the kernel's timestamp of the kill when the
instance's clock is ``mono``.

Reclaim and compaction retries become ``pressure`` events for the system scope, at most one
per ``warn_interval_s``: the first of a burst at once, what followed folded into one more at
the end of the interval (``reclaim_retries``, ``compact_retries`` count them).  They carry
no PSI percentage, so the ``pressure`` gate plugin does not act on them; they are early
warnings for plugins and notifiers.

Nothing the kernel wrote is trusted: every length and offset is checked, a bad record is
counted (:meth:`KernelPageSource.counters`, ``rejected_<reason>``) and skipped, never
crashing the reader.  The instance is removed when the source stops, once every fd and
mapping on it is closed, and one left by a crashed run (its pid gone) is removed at start.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import select
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal, Protocol

import anyio
import msgspec
from anyio.abc import TaskStatus

from ..cgroupfs import mounts_for
from ..config import Config
from ..errors import SourceError
from ..events import SYSTEM, Event, Scope
from ..kmsg import Kmsg, KmsgRecord, parse_kill, parse_oom_summary
from ..procfs import read_small, stat_fields
from ..ratelog import RateLog
from ..ringbuffer import Batch, MappedCpu, MappingUnavailable, PageParser, ReadCpu
from ..tracefs import EventFormat, FormatError, Instance, Mount, RecordError, TracefsUnavailable, sweep_stale
from ..units import Interval
from .base import Emit, Source, SourceSettings

__all__ = ["KernelPageSource", "KernelPageSourceConfig", "KernelPageStats", "SourceUnavailable"]

log = logging.getLogger("oomkit.sources.kernel_page")

Mode = Literal["mmap", "read", "kmsg"]

KILL_EVENT = "mark_victim"
REAPER_EVENTS = ("wake_reaper", "start_task_reaping", "finish_task_reaping", "skip_task_reaping")
WARNING_EVENTS = ("reclaim_retry_zone", "compact_retry")
# oom:oom_score_adj_update is left off: every write to any process's oom_score_adj fires it,
# which says nothing about memory and would wake the source for each one.

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
KIB = 1024
_KB_FIELDS = {
    "total_vm": "total_vm_bytes",
    "anon_rss": "anon_rss_bytes",
    "file_rss": "file_rss_bytes",
    "shmem_rss": "shmem_rss_bytes",
    "pgtables": "pgtables_bytes",
}
PF_EXITING = 0x4
"""``task_struct.flags`` bit of a task that has begun to exit (field 9 of ``/proc/PID/stat``)."""
_MAX_KB = 1 << 40
"""1 PiB in kB: a larger size is not a real process's."""
_DUPLICATE_NS = 5_000_000_000
"""The same pid reported again within this long is the same kill (mark_victim can fire
for a task that was already exiting, and again when it is picked)."""


class KernelPageSourceConfig(SourceSettings, frozen=True, tag="kernel-page", kw_only=True):
    """The kernel's own OOM kills (``oom:mark_victim``) from a private tracefs instance's
    memory-mapped ring buffers, with ``read()`` and ``/dev/kmsg`` as fallbacks.

    Emits ``kernel-kill`` for every kill (victim pid, comm, memory, memcg) and, with
    ``early_warnings``, rate-limited ``pressure`` events from reclaim and compaction retries.
    Needs root (CAP_SYS_ADMIN to mount tracefs and create the instance; CAP_SYSLOG for kmsg).
    """

    mode: Literal["auto", "mmap", "read", "kmsg"] = "auto"
    """``auto`` tries ``mmap``, then ``read``, then ``kmsg``; any other value uses that way
    only and refuses to start without it."""
    tracefs: str = ""
    """A tracefs mount to use; empty: the one mounted (``/sys/kernel/tracing``), else a private
    mount made for this process."""
    kmsg: str = "/dev/kmsg"
    """The kernel log device, for the last fallback."""
    buffer_kib: Annotated[int, msgspec.Meta(ge=8, le=65536)] = 64
    """The instance's ring buffer per CPU, in KiB (``buffer_size_kb``): kernel memory taken
    once.  A kill is a record of about 100 bytes; the default holds hundreds."""
    early_warnings: bool = True
    """Enable ``oom:reclaim_retry_zone`` and ``oom:compact_retry`` and emit ``pressure``."""
    warn_interval_s: Interval = 1.0
    """At most one ``pressure`` event this often; retries in between are folded into the next."""
    min_no_progress_loops: Annotated[int, msgspec.Meta(ge=0, le=1000)] = 1
    """Reclaim retries count only once reclaim made no progress this many times in a row
    (a kernel-side filter, so the others do not even wake the source)."""
    log_interval_s: Interval = 10.0
    """At most one log line per kind of trouble this often; counts go on."""


class SourceUnavailable(SourceError):
    """None of the ways this source may read the kernel works here; the message says why."""


@dataclass(slots=True)
class KernelPageStats:
    """Counters since the source started, for status and metrics."""

    mode: str = ""
    """How the kernel is read: ``mmap``, ``read`` or ``kmsg``."""
    kills: int = 0
    """``kernel-kill`` events emitted."""
    warnings: int = 0
    """``pressure`` events emitted."""
    warnings_folded: int = 0
    """Retries folded into a later ``pressure`` event by the rate limit."""
    records: dict[str, int] = field(default_factory=dict)
    """Valid records read, by tracepoint (or ``kmsg`` line kind)."""
    lost: int = 0
    """Records the kernel overwrote (or dropped from its log) before they were read."""
    duplicates: int = 0
    """Kills of a pid already reported within 5 s, not reported again."""
    memcg_misses: int = 0
    """Kills whose memory cgroup could not be found (the victim gone from /proc, and no
    single memcg's ``oom_kill`` grew); reported for the system."""
    rejected: dict[str, int] = field(default_factory=dict)
    """Records and pages skipped as malformed, by reason."""
    wakes: int = 0
    ioctls: int = 0
    fallbacks: list[str] = field(default_factory=list)
    """Why each better way was not used (one line each)."""

    @property
    def rejected_total(self) -> int:
        return sum(self.rejected.values())


class _Backend(Protocol):
    mode: Mode
    clock_mono: bool

    def fds(self) -> list[int]: ...

    def drain(self, ready: set[int]) -> list[Event]: ...

    def close(self) -> None: ...


# --- building events -------------------------------------------------------------------------


class _Warnings:
    """Folds retries into at most one ``pressure`` event per interval."""

    def __init__(self, src: KernelPageSource, interval_s: float) -> None:
        self._src = src
        self._interval_ns = int(interval_s * 1e9)
        self._last_ns = -(1 << 62)
        self._values: dict[str, float] = {}
        self._ts = 0

    def add(self, name: str, rec: dict[str, int | str], ts: int, now: int) -> Event | None:
        v = self._values

        def num(key: str) -> int | None:
            value = rec.get(key)
            return value if isinstance(value, int) and -(1 << 48) < value < 1 << 48 else None

        if name == "reclaim_retry_zone":
            v["reclaim_retries"] = v.get("reclaim_retries", 0.0) + 1
            loops = num("no_progress_loops")
            if loops is not None:
                v["no_progress_loops"] = max(v.get("no_progress_loops", 0.0), float(loops))
            for key in ("available", "reclaimable", "min_wmark"):
                pages = num(key)
                if pages is not None and pages >= 0:
                    v[f"{key}_bytes"] = float(pages * PAGE_SIZE)  # the latest zone's
        else:
            v["compact_retries"] = v.get("compact_retries", 0.0) + 1
            for key in ("retries", "max_retries"):
                value = num(key)
                if value is not None:
                    v[f"compact_{key}"] = float(value)
        order = num("order")
        if order is not None:
            v["order"] = max(v.get("order", 0.0), float(order))
        self._ts = ts
        if now - self._last_ns >= self._interval_ns:
            return self.flush(now)
        self._src.stats.warnings_folded += 1
        return None

    def due_in(self, now: int) -> float | None:
        if not self._values:
            return None
        return max(0.0, (self._last_ns + self._interval_ns - now) / 1e9)

    def flush(self, now: int) -> Event | None:
        if not self._values:
            return None
        values, self._values = self._values, {}
        self._last_ns = now
        src = self._src
        src.stats.warnings += 1
        mono = self._ts if src.clock_mono else now
        return Event(source=src.name, kind="pressure", scope=SYSTEM, values=values, monotonic_ns=mono,
                     wall_time=_wall(mono, now))


def _valid_path(path: str) -> bool:
    return path.startswith("/") and "\0" not in path and len(path) <= 4096 and "\n" not in path


# --- tracefs ---------------------------------------------------------------------------------


class _TraceBackend:
    """A private instance and a reader per CPU: mapped when it can be, else read()."""

    def __init__(self, src: KernelPageSource, *, mapped: bool) -> None:
        self._src = src
        spec = src.spec
        self.mount = Mount.open(spec.tracefs, src.proc)
        self.instance: Instance | None = None
        self.readers: list[MappedCpu | ReadCpu] = []
        try:
            for stale in sweep_stale(self.mount.path, src.proc):
                log.info("kernel-page %s: removed %s, left by a run that is gone", src.name, stale)
            self.instance = inst = Instance(self.mount.path)
            src.instance_name = inst.name
            self._configure(inst)
            self.formats = self._enable(inst)
            parser = PageParser(inst.page_header(), inst.event_header())
            cpus = inst.cpus()
            self.mode: Mode = "read"
            if mapped:
                try:
                    for cpu in cpus:
                        self.readers.append(MappedCpu(inst.cpu_file(cpu), cpu, parser))
                    self.mode = "mmap"
                except MappingUnavailable as exc:
                    failed = inst.cpu_file(cpus[len(self.readers)])
                    for r in self.readers:
                        r.close()
                    self.readers = []
                    why = exc.strerror or str(exc)
                    if exc.errno in (errno.ENODEV, errno.EINVAL, errno.EOPNOTSUPP):
                        why += " (ring-buffer mapping needs Linux 6.10)"
                    src.fallback(f"cannot memory-map {failed}: {why}; using read()")
            if self.mode == "read":
                self.readers = [ReadCpu(inst.cpu_file(c), c, parser, inst.cpu_file(c, "stats")) for c in cpus]
            inst.write("tracing_on", "1")
        except BaseException:
            self.close()
            raise
        self._by_fd = {r.fileno(): r for r in self.readers}

    def _configure(self, inst: Instance) -> None:
        src = self._src
        inst.write("tracing_on", "0")
        inst.write("buffer_size_kb", str(src.spec.buffer_kib))
        try:
            inst.write("trace_clock", "mono")
            self.clock_mono = True
        except OSError as exc:
            self.clock_mono = False
            src.fallback(f"trace_clock mono refused ({exc.strerror}): event times are when they were read")
        try:
            # The default, 50, makes poll wait for half a sub-buffer: one kill never wakes it.
            inst.write("buffer_percent", "0")
        except FileNotFoundError:
            pass  # before 5.1 every event woke the reader anyway

    def _enable(self, inst: Instance) -> dict[int, EventFormat]:
        src = self._src
        if not inst.has_event("oom", KILL_EVENT):
            raise TracefsUnavailable(f"{inst.path}: no oom:{KILL_EVENT} event in this kernel")
        wanted = [KILL_EVENT, *REAPER_EVENTS]
        if src.spec.early_warnings:
            wanted += WARNING_EVENTS
        formats: dict[int, EventFormat] = {}
        for name in wanted:
            if not inst.has_event("oom", name):
                if name in WARNING_EVENTS:
                    src.fallback(f"no oom:{name} in this kernel: no early warnings from it")
                continue
            fmt = inst.event_format("oom", name)
            if name == "reclaim_retry_zone" and src.spec.min_no_progress_loops and "no_progress_loops" in fmt.fields:
                inst.write(f"events/oom/{name}/filter", f"no_progress_loops >= {src.spec.min_no_progress_loops}")
            inst.enable("oom", name)
            formats[fmt.id] = fmt
        if KILL_EVENT not in {f.name for f in formats.values()}:
            raise TracefsUnavailable(f"{inst.path}: oom:{KILL_EVENT} could not be enabled")
        return formats

    def fds(self) -> list[int]:
        return list(self._by_fd)

    def drain(self, ready: set[int]) -> list[Event]:
        src = self._src
        got: list[tuple[int, EventFormat, dict[str, int | str]]] = []
        for fd in ready:
            reader = self._by_fd.get(fd)
            if reader is None:
                continue
            try:
                batch = reader.read()
            except OSError as exc:
                src.reject("read", f"cpu {reader.cpu}: {exc}")
                continue
            got += src.records(batch, self.formats, reader.cpu)
        return src.trace_events(got, self.clock_mono, time.monotonic_ns())

    def close(self) -> None:
        for r in self.readers:
            r.close()
        self.readers = []
        try:
            if self.instance is not None:
                self.instance.remove()
                self.instance = None
        finally:
            self.mount.close()


# --- /dev/kmsg -------------------------------------------------------------------------------


class _KmsgBackend:
    mode: Mode = "kmsg"
    clock_mono = False

    def __init__(self, src: KernelPageSource) -> None:
        self._src = src
        self.kmsg = Kmsg(src.spec.kmsg)
        self._lost = 0

    def fds(self) -> list[int]:
        return [self.kmsg.fileno()]

    def drain(self, ready: set[int]) -> list[Event]:
        src = self._src
        records, bad = self.kmsg.read()
        for problem in bad:
            src.reject("kmsg", problem)
        if self.kmsg.lost > self._lost:
            src.lost(self.kmsg.lost - self._lost, "the kernel log dropped %d record(s) before they were read")
            self._lost = self.kmsg.lost
        return src.kmsg_events(records, time.monotonic_ns())

    def close(self) -> None:
        self.kmsg.close()


# --- the source ------------------------------------------------------------------------------


class KernelPageSource(Source):
    """``kernel-kill`` and early ``pressure`` events from the kernel; see the module doc."""

    settings_type = KernelPageSourceConfig

    def __init__(self, spec: KernelPageSourceConfig, config: Config) -> None:
        self.name = spec.source_name
        self.spec = spec
        self.proc = config.paths.proc
        self._mounts = mounts_for(config.paths)
        self.stats = KernelPageStats()
        self.ratelog = RateLog(log, spec.log_interval_s)
        self.warnings = _Warnings(self, spec.warn_interval_s)
        self.clock_mono = False
        self._pid_max = _pid_max(self.proc)
        self._recent: OrderedDict[int, int] = OrderedDict()  # pid -> monotonic ns reported
        # pid -> task_memcg from the kernel log's oom-kill summary, printed before the kill line.
        self._memcgs: OrderedDict[int, str] = OrderedDict()
        self._lock = threading.Lock()
        self._closed = False
        self._backend: _Backend | None = None
        self.instance_name: str | None = None
        self._counters: _OomKillCounters | None = None
        """The tracefs instance (``instances/NAME``) while reading through tracefs."""

    def __repr__(self) -> str:
        s = self.stats
        return (f"<KernelPageSource {self.name!r} mode={s.mode or '-'} kills={s.kills} lost={s.lost}"
                f" rejected={s.rejected_total} memcg_misses={s.memcg_misses}>")

    def counters(self) -> dict[str, int]:
        s = self.stats
        out = {
            "kills": s.kills, "warnings": s.warnings, "warnings_folded": s.warnings_folded, "lost": s.lost,
            "duplicates": s.duplicates, "memcg_misses": s.memcg_misses, "rejected": s.rejected_total,
            "wakes": s.wakes, "ioctls": s.ioctls,
        }
        out.update({f"rejected_{reason}": n for reason, n in sorted(s.rejected.items())})
        out.update({f"records_{name.replace('-', '_')}": n for name, n in sorted(s.records.items())})
        return out

    # -- helpers the backends call (from the worker thread) --

    def fallback(self, reason: str) -> None:
        self.stats.fallbacks.append(reason)
        log.warning("kernel-page %s: %s", self.name, reason)

    def reject(self, reason: str, detail: str) -> None:
        self.stats.rejected[reason] = self.stats.rejected.get(reason, 0) + 1
        self.ratelog.note(("rejected", reason), f"kernel-page {self.name}: %d malformed record(s) skipped ({reason})",
                          latest=detail)

    def count(self, what: str) -> None:
        self.stats.records[what] = self.stats.records.get(what, 0) + 1

    def lost(self, n: int, what: str, key: object = "lost") -> None:
        self.stats.lost += n
        self.ratelog.note(key, f"kernel-page {self.name}: {what}", n)

    def records(self, batch: Batch, formats: Mapping[int, EventFormat], cpu: int
                ) -> list[tuple[int, EventFormat, dict[str, int | str]]]:
        """The valid records of one read of a CPU's ring, decoded by their ``format``; the
        rest counted and skipped."""
        self.stats.ioctls += batch.ioctls
        if batch.lost:
            self.lost(batch.lost, f"cpu {cpu}: the kernel overwrote %d record(s) before they were read", ("lost", cpu))
        for reason, detail in batch.rejected:
            self.reject(reason, f"cpu {cpu}: {detail}")
        out = []
        for raw in batch.events:
            payload = raw.payload
            if len(payload) < 2:
                self.reject("record", f"cpu {cpu}: a {len(payload)}-byte record")
                continue
            fmt = formats.get(int.from_bytes(payload[0:2], "little"))
            if fmt is None:
                self.reject("type", f"cpu {cpu}: record of unknown type {int.from_bytes(payload[0:2], 'little')}")
                continue
            try:
                rec = fmt.decode(payload)
            except RecordError as exc:
                self.reject("record", f"cpu {cpu}: {exc}")
                continue
            self.count(fmt.name)
            out.append((raw.ts, fmt, rec))
        return out

    def trace_events(self, records: list[tuple[int, EventFormat, dict[str, int | str]]], clock_mono: bool,
                     now: int) -> list[Event]:
        """Events from decoded tracepoint records (of every CPU, put in time order)."""
        out: list[Event] = []
        for ts, fmt, rec in sorted(records, key=lambda r: r[0]):
            ev: Event | None = None
            if fmt.name == KILL_EVENT:
                ev = self._trace_kill(ts if clock_mono else now, rec, now)
            elif fmt.name in WARNING_EVENTS:
                ev = self.warnings.add(fmt.name, rec, ts if clock_mono else now, now)
            if ev is not None:
                out.append(ev)
        return out

    def _trace_kill(self, ts: int, rec: dict[str, int | str], now: int) -> Event | None:
        pid = rec.get("pid")
        if not isinstance(pid, int):
            self.reject("record", f"{KILL_EVENT} without an integer pid field")
            return None
        comm = rec.get("comm")
        values: dict[str, float] = {}
        for key, name in _KB_FIELDS.items():
            value = rec.get(key)
            if isinstance(value, int):
                values[name] = float(value * KIB)
        for key in ("uid", "oom_score_adj"):
            value = rec.get(key)
            if isinstance(value, int):
                values[key] = float(value)
        return self.kill(pid, comm if isinstance(comm, str) else None, values, ts, now)

    def kmsg_events(self, records: Iterable[KmsgRecord], now: int) -> list[Event]:
        """Events from kernel log records: one per "Killed process" line, its memcg from the
        ``oom-kill:`` summary before it when the kernel printed one."""
        out: list[Event] = []
        for rec in records:
            if "oom-kill:" in rec.text:
                summary = parse_oom_summary(rec.text)
                if summary is None or not _valid_path(summary.task_memcg):
                    self.reject("kmsg", f"unreadable oom-kill line: {rec.text[:160]!r}")
                    continue
                self.count("oom-kill")
                self._memcgs[summary.pid] = summary.task_memcg
                while len(self._memcgs) > 64:
                    self._memcgs.popitem(last=False)
            elif "Killed process" in rec.text:
                kill = parse_kill(rec.text)
                if kill is None:
                    self.reject("kmsg", f"unreadable kill line: {rec.text[:160]!r}")
                    continue
                self.count("killed-process")
                values: dict[str, float] = {}
                for key, value in kill.fields.items():
                    if key in _KB_FIELDS:
                        values[_KB_FIELDS[key]] = float(value * KIB)
                    elif key in ("uid", "oom_score_adj"):
                        values[key] = float(value)
                ev = self.kill(kill.pid, kill.comm, values, now, now, memcg=self._memcgs.pop(kill.pid, None))
                if ev is not None:
                    out.append(ev)
        return out

    def kill(self, pid: int, comm: str | None, values: dict[str, float], mono_ns: int, now: int,
             memcg: str | None = None) -> Event | None:
        """The ``kernel-kill`` event for one victim, validated; None if rejected or a repeat."""
        if not 0 < pid < self._pid_max:
            self.reject("pid", f"pid {pid} outside (0, {self._pid_max})")
            return None
        for key, value in values.items():
            limit = _MAX_KB * KIB if key.endswith("_bytes") else 1 << 32
            if not (math.isfinite(value) and -limit <= value <= limit):
                self.reject("value", f"pid {pid}: {key} = {value}")
                return None
        adj = values.get("oom_score_adj")
        if adj is not None and not -1000 <= adj <= 1000:
            self.reject("value", f"pid {pid}: oom_score_adj {adj}")
            return None
        last = self._recent.get(pid)
        if last is not None and mono_ns - last < _DUPLICATE_NS:
            self.stats.duplicates += 1
            return None
        self._recent[pid] = mono_ns
        while len(self._recent) > 256:
            self._recent.popitem(last=False)
        scope, ticks = self._scope(pid, memcg)
        if comm is None:
            comm = _read_comm(self.proc, pid)
        if comm is not None:
            comm = comm[:64]
        self.stats.kills += 1
        return Event(source=self.name, kind="kernel-kill", scope=scope, pid=pid, pid_start_ticks=ticks,
                     comm=comm, values=values, monotonic_ns=mono_ns, wall_time=_wall(mono_ns, now))

    def _scope(self, pid: int, memcg: str | None) -> tuple[Scope, int | None]:
        """The victim's memory cgroup and its start time.

        ``/proc/PID/cgroup`` first, read before anything else since the victim is being
        torn down.  On a v1 hierarchy the kernel shows ``/`` for a task that has begun to
        exit (``PF_EXITING``), which a victim does within microseconds of its kill unless it
        is still busy in the kernel (printing its own OOM report, say): then the memcg
        whose ``oom_kill`` counter grew is the victim's (v1 counts a kill in the victim's
        memcg only).  What neither finds is a miss, reported for the system.
        """
        v1 = self._mounts.memory_v1 is not None
        tree: Literal["v1", "v2"] = "v1" if v1 else "v2"
        path = memcg  # the kernel's own word, from its log
        if path is None:
            try:
                path = _cgroup_of(self.proc, pid, v1)
            except (OSError, ValueError):
                pass
        ticks, exiting = _stat_of(self.proc, pid)
        if v1 and memcg is None and path == "/" and (exiting or ticks is None):
            path = None  # PF_EXITING hides the v1 path behind "/"
        if v1 and self._counters is not None:
            if path is None:
                path = self._counters.resolve()
            else:
                self._counters.attributed(path)
        if path is None or not _valid_path(path):
            self.stats.memcg_misses += 1
            self.ratelog.note("memcg", f"kernel-page {self.name}: %d victim(s) whose memory cgroup could not be"
                              " read (reported for the system)", latest=f"pid {pid}", level=logging.INFO)
            return SYSTEM, ticks
        return Scope(tree, path), ticks

    # -- running --

    def snapshot_memcgs(self) -> None:
        """Read every v1 memcg's ``oom_kill`` counter, the baseline that finds the memcg of
        a victim ``/proc`` no longer shows (done when the source starts)."""
        root = self._mounts.memory_v1
        self._counters = _OomKillCounters(root) if root is not None and root.is_dir() else None

    def _open(self) -> _Backend:
        self.snapshot_memcgs()
        mode = self.spec.mode
        if mode in ("auto", "mmap", "read"):
            try:
                backend = _TraceBackend(self, mapped=mode != "read")
                if mode == "mmap" and backend.mode != "mmap":
                    backend.close()
                    raise SourceUnavailable(f"kernel-page {self.name}: mode = \"mmap\": {self.stats.fallbacks[-1]}")
                return backend
            except (TracefsUnavailable, FormatError, OSError) as exc:
                if mode != "auto":
                    raise SourceUnavailable(f"kernel-page {self.name}: tracefs: {exc}") from None
                self.fallback(f"tracefs: {exc}; reading /dev/kmsg instead")
        try:
            return _KmsgBackend(self)
        except OSError as exc:
            raise SourceUnavailable(
                f"kernel-page {self.name}: {self.spec.kmsg}: {exc.strerror or exc}"
                + ("" if not self.stats.fallbacks else f" (and {'; '.join(self.stats.fallbacks)})")
            ) from None

    async def run(self, emit: Emit, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        backend = await anyio.to_thread.run_sync(self._open)
        self._backend = backend
        self.stats.mode = backend.mode
        self.clock_mono = backend.clock_mono
        stop = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        ep = select.epoll()
        self._closed = False
        try:
            ep.register(stop, select.EPOLLIN)
            for fd in backend.fds():
                ep.register(fd, select.EPOLLIN)
            log.info("kernel-page %s: reading the kernel's OOM kills through %s", self.name, _DESCRIBE[backend.mode])
            task_status.started()
            while True:
                events = await anyio.to_thread.run_sync(self._next, backend, ep, stop, abandon_on_cancel=True)
                for event in events:
                    await emit(event)
        finally:
            os.eventfd_write(stop, 1)  # an abandoned worker returns at once
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(self._shut, backend, ep, stop)

    def _next(self, backend: _Backend, ep: select.epoll, stop: int) -> list[Event]:
        """Wait in the worker thread until there are events (or the source stops)."""
        with self._lock:
            while not self._closed:
                now = time.monotonic_ns()
                waits = [t for t in (self.warnings.due_in(now), self.ratelog.due_in(now)) if t is not None]
                ready = ep.poll(min(waits) if waits else -1)
                now = time.monotonic_ns()
                fds = {fd for fd, _ in ready}
                if stop in fds:
                    return []
                out = backend.drain(fds) if fds else []
                if fds:
                    self.stats.wakes += 1
                flushed = self.warnings.flush(now) if self.warnings.due_in(now) == 0 else None
                if flushed is not None:
                    out.append(flushed)
                self.ratelog.flush(now_ns=now)
                if out:
                    return out
            return []

    def _shut(self, backend: _Backend, ep: select.epoll, stop: int) -> None:
        with self._lock:  # waits for a worker still reading the mapped pages
            self._closed = True
            ep.close()
            os.close(stop)
            try:
                backend.close()
            except OSError as exc:
                log.error("kernel-page %s: %s", self.name, exc)
            self.ratelog.flush(force=True)
            self._backend = None


_DESCRIBE = {
    "mmap": "memory-mapped tracefs ring buffers (one ioctl per wake-up, no copy per event)",
    "read": "read() of tracefs ring buffers",
    "kmsg": "the kernel log (/dev/kmsg)",
}


def _wall(mono_ns: int, now_ns: int) -> float:
    """The wall-clock time of a monotonic reading ``now_ns - mono_ns`` ago."""
    return time.time() - (now_ns - mono_ns) / 1e9


def _pid_max(proc: str) -> int:
    try:
        return int(read_small(f"{proc}/sys/kernel/pid_max", 64))
    except (OSError, ValueError):
        return 1 << 22


def _read_comm(proc: str, pid: int) -> str | None:
    try:
        return read_small(f"{proc}/{pid}/comm", 64).rstrip(b"\n").decode("utf-8", errors="replace")
    except OSError:
        return None


def _stat_of(proc: str, pid: int) -> tuple[int | None, bool]:
    """``(start time, PF_EXITING)`` from ``/proc/PID/stat``; ``(None, False)`` when gone."""
    try:
        fields = stat_fields(read_small(f"{proc}/{pid}/stat", 1024))[1]
        return int(fields[19]), bool(int(fields[6]) & PF_EXITING)
    except (OSError, ValueError, IndexError):
        return None, False


class _OomKillCounters:
    """Which v1 memcgs' ``memory.oom_control`` ``oom_kill`` counters grew, and by how much
    that no victim has been matched with yet."""

    def __init__(self, root: Path, limit: int = 65536) -> None:
        self.root = root
        self.limit = limit
        self._counts = self._scan()
        self._attributed: dict[str, int] = {}
        self._unmatched: dict[str, int] = {}

    def _scan(self) -> dict[str, int]:
        out: dict[str, int] = {}
        stack = [self.root]
        while stack and len(out) < self.limit:
            d = stack.pop()
            try:
                raw = read_small(d / "memory.oom_control", 256)
            except OSError:
                raw = b""
            for line in raw.split(b"\n"):
                if line.startswith(b"oom_kill ") and line[9:].strip().isdigit():
                    rel = "/" + str(d.relative_to(self.root)) if d != self.root else "/"
                    out[rel] = int(line[9:])
            try:
                with os.scandir(d) as it:
                    stack.extend(Path(e.path) for e in it if e.is_dir(follow_symlinks=False))
            except OSError:
                pass
        return out

    def attributed(self, path: str) -> None:
        """A victim whose memcg was read from /proc: its kill is not news for :meth:`resolve`."""
        self._attributed[path] = self._attributed.get(path, 0) + 1

    def resolve(self) -> str | None:
        """The memcg of one victim not found in /proc: the only memcg with an unmatched kill."""
        new = self._scan()
        for path, n in new.items():
            grew = n - self._counts.get(path, 0) - self._attributed.pop(path, 0)
            if grew > 0:
                self._unmatched[path] = self._unmatched.get(path, 0) + grew
        self._counts = new
        self._attributed.clear()
        for gone in [p for p in self._unmatched if p not in new]:
            del self._unmatched[gone]
        if len(self._unmatched) != 1:
            return None  # none, or kills in several memcgs at once: cannot tell which is whose
        path = next(iter(self._unmatched))
        self._unmatched[path] -= 1
        if not self._unmatched[path]:
            del self._unmatched[path]
        return path


def _cgroup_of(proc: str, pid: int, v1: bool) -> str | None:
    """``pid``'s memory cgroup: its v1 memory line on a machine with the v1 controller, else
    its v2 line."""
    raw = read_small(f"{proc}/{pid}/cgroup", 65536)
    want = b"memory" if v1 else b""
    for line in raw.split(b"\n"):
        _, _, rest = line.partition(b":")
        controllers, sep, path = rest.partition(b":")
        if sep and ((want in controllers.split(b",")) if want else not controllers):
            return path.decode("utf-8", errors="replace")
    return None

