"""Test doubles for plugin authors and for oomkit's own tests.

Fake ``/proc`` and cgroupfs trees are real directories of real files in the layouts the
kernel uses, so code under test reads them through the same functions it uses in
production; point ``[paths]`` at them.  Registered as a pytest plugin (``pytest11``) that
provides the ``fake_proc`` and ``fake_cgroups`` fixtures, and ``anyio_backend`` (asyncio,
uvloop and trio) so a plugin package's async tests run on all three without a conftest.

:func:`harness` (async) and :func:`decide` (sync) run a real engine, with every stage of the
chain, in dry-run by default, and hand back the :class:`~oomkit.Decision`; the ``assert_*``
helpers check one and, when they fail, print the whole ranking with every score and veto.
"""

from __future__ import annotations

import errno
import mmap
import os
import struct
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Literal, final

import anyio
import msgspec
import pytest
from anyio.abc import TaskStatus

from .config import Config, PathsConfig, config_from_dict
from .engine import Engine
from .events import SYSTEM, Candidate, Decision, Event, EventKind, Outcome, Ranked, Scope, Veto
from .probes import Machine
from .ranking import Ranking
from .sources.base import Emit, Source

__all__ = [
    "FakeCgroups",
    "FakeProc",
    "FakeSource",
    "FakeTracefs",
    "Harness",
    "assert_not_vetoed",
    "assert_outcome",
    "assert_vetoed",
    "assert_victim",
    "BACKENDS",
    "EARLY_TIMER_NS",
    "config_for",
    "decide",
    "explain",
    "fake_cgroups",
    "fake_proc",
    "harness",
    "parse_scope",
    "paths_for",
    "probe_machine",
    "unbounded_numbers",
]

PAGE = 4096


class FakeProc:
    """A fake ``/proc``: processes with ``stat``, ``status``, ``comm``, ``oom_score_adj``,
    ``oom_score``, ``wchan``, ``cmdline`` and ``cgroup``; ``meminfo``; ``swaps``; ``uptime``;
    ``self/mounts``, ``self/cgroup``, ``self/status`` and ``self/oom_score_adj``;
    ``pressure/memory``; ``sys/kernel/osrelease``."""

    def __init__(self, root: Path, *, mem_total: int = 8 << 30) -> None:
        self.root = root
        self._faults: dict[int, int] = {}
        root.mkdir(parents=True, exist_ok=True)
        (root / "self").mkdir(exist_ok=True)
        (root / "pressure").mkdir(exist_ok=True)
        (root / "sys" / "kernel").mkdir(parents=True, exist_ok=True)
        self.set_meminfo(mem_total=mem_total, mem_available=mem_total // 2)
        self.set_mounts()
        self.set_pressure()
        self.set_uptime(10_000.0)
        self.set_self_cgroup()
        self.set_self()
        self.set_kernel()
        self.set_swaps()

    @property
    def path(self) -> Path:
        """The fake ``/proc`` (the same as ``root``).  A Path; ``PathsConfig`` takes it as is,
        and ``str(proc.path)`` is the string form older tests used."""
        return self.root

    def add_process(
        self,
        pid: int,
        name: str = "proc",
        *,
        ppid: int = 1,
        uid: int = 0,
        rss: int = 0,
        swap: int = 0,
        pgtables: int = 0,
        oom_score_adj: int = 0,
        start_ticks: int = 1000,
        state: str = "S",
        kthread: bool = False,
        cmdline: tuple[str, ...] | None = None,
        memcg: str = "/",
        cgroup2: str = "/",
        tgid: int | None = None,
        exiting: bool = False,
        rss_shmem: int = 0,
        rss_file: int = 0,
        wchan: str = "0",
        pgid: int | None = None,
    ) -> Path:
        """Add (or overwrite) a process.  Sizes in bytes; kernel threads have no Vm lines.

        ``tgid`` other than ``pid`` makes it a thread of that process (``/proc`` does not list
        threads, but it has a directory for each: ``/proc/TID`` can be opened).  ``exiting``
        sets PF_EXITING, as for a task the kernel is tearing down (its v1 cgroup paths then
        read ``/``; give ``memcg="/"`` to match).  ``rss`` is the whole resident size;
        ``rss_shmem`` and ``rss_file`` say how much of it is shared memory and page cache
        (``RssAnon`` is the rest).  ``wchan`` is where it sleeps in the kernel
        (``mem_cgroup_oom_synchronize``: paused at a v1 memcg limit).  ``pgid`` is its
        process group (default: its own, as a group leader).
        """
        d = self.root / str(pid)
        d.mkdir(exist_ok=True)
        flags = (0x00200000 if kthread else 0x00400100) | (0x4 if exiting else 0)
        rss_pages = rss // PAGE
        # Every rewrite counts as a minor fault: on a real kernel a process whose memory
        # changed has faulted, and the candidates' process table trusts that.
        faults = self._faults[pid] = self._faults.get(pid, -1) + 1
        # Fields 3..52 of stat after "pid (comm) "; only the ones oomkit reads matter.
        fields = [state, str(ppid), str(pid if pgid is None else pgid)] + ["0"] * 3 + [str(flags), str(faults)]
        fields += ["0"] * 11 + [str(start_ticks)]
        fields += ["0", str(rss_pages)] + ["0"] * 30
        (d / "stat").write_text(f"{pid} ({name}) {' '.join(fields)}\n")
        lines = [
            f"Name:\t{name[:15]}", f"State:\t{state}", f"Tgid:\t{pid if tgid is None else tgid}", f"Pid:\t{pid}",
            f"PPid:\t{ppid}", f"Uid:\t{uid}\t{uid}\t{uid}\t{uid}",
        ]
        if not kthread:
            anon = max(0, rss - rss_shmem - rss_file)
            lines += [
                f"VmRSS:\t{rss // 1024:8d} kB",
                f"RssAnon:\t{anon // 1024:8d} kB",
                f"RssFile:\t{rss_file // 1024:8d} kB",
                f"RssShmem:\t{rss_shmem // 1024:8d} kB",
                f"VmPTE:\t{pgtables // 1024:8d} kB",
                f"VmSwap:\t{swap // 1024:8d} kB",
            ]
        (d / "status").write_text("\n".join(lines) + "\n")
        (d / "oom_score_adj").write_text(f"{oom_score_adj}\n")
        (d / "wchan").write_text(wchan)
        (d / "comm").write_text(f"{name[:15]}\n")
        (d / "cmdline").write_bytes(b"" if kthread else b"\0".join(a.encode() for a in (cmdline or (name,))) + b"\0")
        (d / "cgroup").write_text(f"4:memory:{memcg}\n0::{cgroup2}\n")
        return d

    def add_candidate(self, c: Candidate) -> Path:
        """Add the process ``c`` describes, so a test's made-up candidates pass the engine's
        re-verification in ``/proc`` before a kill (it trusts no plugin's facts)."""
        return self.add_process(
            c.pid, c.name, ppid=c.ppid, uid=c.uid, rss=c.rss_bytes, swap=c.swap_bytes, pgtables=c.pgtables_bytes,
            oom_score_adj=c.oom_score_adj, start_ticks=c.start_ticks, kthread=c.kthread, cmdline=c.cmdline,
        )

    def remove_process(self, pid: int) -> None:
        """The process exits and is reaped.  Its files are emptied before they go, so a
        descriptor held on one reads nothing, as one held on procfs fails (ESRCH) once its
        process is gone, whatever process has its pid next."""
        d = self.root / str(pid)
        for f in d.iterdir():
            f.write_bytes(b"")
            f.unlink()
        d.rmdir()
        self._faults.pop(pid, None)

    def set_meminfo(
        self, *, mem_total: int, mem_available: int, swap_total: int = 0, swap_free: int = 0
    ) -> None:
        def kb(n: int) -> str:
            return f"{n // 1024:8d} kB"

        self.mem_total = mem_total
        # Replaced whole, never truncated in place: a source may be polling it from a thread.
        tmp = self.root / ".meminfo.new"
        tmp.write_text(
            f"MemTotal:       {kb(mem_total)}\nMemFree:        {kb(mem_available)}\n"
            f"MemAvailable:   {kb(mem_available)}\nBuffers:        {kb(0)}\n"
            f"SwapTotal:      {kb(swap_total)}\nSwapFree:       {kb(swap_free)}\n"
        )
        os.replace(tmp, self.root / "meminfo")

    def set_uptime(self, seconds: float) -> None:
        """``/proc/uptime``: seconds since boot, what ``stat`` start times (in clock ticks,
        ``os.sysconf("SC_CLK_TCK")`` a second) count from."""
        self.uptime_s = seconds
        (self.root / "uptime").write_text(f"{seconds:.2f} {2 * seconds:.2f}\n")

    def set_mounts(
        self,
        memory_v1: str | None = None,
        unified: str | None = None,
        *,
        v1: Mapping[str, str] | None = None,
        tracefs: str | None = None,
    ) -> None:
        """``self/mounts``: the v1 memory and v2 hierarchies, other v1 hierarchies by
        controller (``v1={"freezer": path}``), and tracefs."""
        lines = ["proc /proc proc rw,nosuid,nodev,noexec,relatime 0 0"]
        if memory_v1:
            lines.append(f"cgroup {memory_v1} cgroup rw,nosuid,nodev,noexec,relatime,memory 0 0")
        for controller, where in (v1 or {}).items():
            lines.append(f"cgroup {where} cgroup rw,nosuid,nodev,noexec,relatime,{controller} 0 0")
        if unified:
            lines.append(f"cgroup2 {unified} cgroup2 rw,nosuid,nodev,noexec,relatime 0 0")
        if tracefs:
            lines.append(f"tracefs {tracefs} tracefs rw,nosuid,nodev,noexec,relatime 0 0")
        (self.root / "self" / "mounts").write_text("\n".join(lines) + "\n")

    def set_self_cgroup(self, memcg: str = "/", cgroup2: str | None = "/", **v1: str) -> None:
        """``self/cgroup``: our memcg, our v2 cgroup (None: no ``0::`` line), and other v1
        controllers' cgroups by keyword (``freezer="/"``)."""
        lines = [f"4:memory:{memcg}"] + [f"{5 + i}:{c}:{path}" for i, (c, path) in enumerate(v1.items())]
        if cgroup2 is not None:
            lines.append(f"0::{cgroup2}")
        (self.root / "self" / "cgroup").write_text("\n".join(lines) + "\n")

    def set_self(self, *, cap_eff: int = 0, vm_lck_kb: int = 0, oom_score_adj: int = 0) -> None:
        """Our own ``self/status`` (``CapEff``, ``VmLck``) and ``self/oom_score_adj``."""
        (self.root / "self" / "status").write_text(
            f"Name:\tpython3\nCapEff:\t{cap_eff:016x}\nVmLck:\t{vm_lck_kb:8d} kB\n"
        )
        (self.root / "self" / "oom_score_adj").write_text(f"{oom_score_adj}\n")

    def set_kernel(self, release: str = "6.18.0-fake") -> None:
        (self.root / "sys" / "kernel" / "osrelease").write_text(f"{release}\n")

    def set_swaps(self, *areas: tuple[str, int]) -> None:
        """``swaps``: ``(device, size in bytes)`` rows under the kernel's header."""
        rows = [f"{name}\tpartition\t{size // 1024}\t0\t-2" for name, size in areas]
        (self.root / "swaps").write_text("\n".join(["Filename\tType\tSize\tUsed\tPriority", *rows]) + "\n")

    def set_pressure(self, some_avg10: float = 0.0, full_avg10: float = 0.0, some_total: int = 0, full_total: int = 0) -> None:
        (self.root / "pressure" / "memory").write_text(
            f"some avg10={some_avg10:.2f} avg60=0.00 avg300=0.00 total={some_total}\n"
            f"full avg10={full_avg10:.2f} avg60=0.00 avg300=0.00 total={full_total}\n"
        )


class FakeCgroups:
    """Fake cgroupfs trees: a v1 memory hierarchy at ``memory`` and a v2 one at ``unified``
    whose root offers ``v2_controllers`` and enables ``v2_enabled`` for its children.

    :meth:`mkdir` and :meth:`rmdir` behave as cgroupfs does (a new cgroup comes with its
    control files), for code that makes cgroups itself (:func:`probe_machine`).
    """

    def __init__(
        self,
        root: Path,
        *,
        v2_controllers: tuple[str, ...] = ("cpu", "io", "memory", "pids"),
        v2_enabled: tuple[str, ...] = ("memory",),
    ) -> None:
        self.root = root
        self.memory_v1 = root / "memory"
        self.unified = root / "unified"
        self._removed: list[Path] = []
        self.v1_roots: dict[str, Path] = {"memory": self.memory_v1}
        self.mkdir_v1("/")
        self.mkdir_v2("/")
        (self.unified / "cgroup.controllers").write_text(" ".join(v2_controllers) + "\n")
        self.set_subtree_control(self.unified, v2_enabled)

    def mkdir_v1(
        self,
        path: str,
        *,
        limit: int = 2**63 - 4096,
        usage: int = 0,
        pids: tuple[int, ...] = (),
        oom_kill_disable: int = 0,
    ) -> Path:
        """A v1 memcg; ``oom_kill_disable=1`` as a child of a memcg under takeover inherits it."""
        d = self.memory_v1 / path.strip("/")
        d.mkdir(parents=True, exist_ok=True)
        (d / "memory.limit_in_bytes").write_text(f"{limit}\n")
        (d / "memory.usage_in_bytes").write_text(f"{usage}\n")
        (d / "memory.oom_control").write_text(f"oom_kill_disable {oom_kill_disable}\nunder_oom 0\noom_kill 0\n")
        (d / "memory.pressure_level").write_text("")
        (d / "memory.stat").write_text("cache 0\nrss 0\n")
        (d / "cgroup.event_control").write_text("")
        self.set_procs(d, pids)
        return d

    def mkdir_v2(self, path: str, *, pids: tuple[int, ...] = (), memory: bool = True) -> Path:
        """A v2 cgroup with the files the kernel makes for it.  The root has no
        ``memory.events`` and no ``cgroup.events``; ``memory=False`` is a cgroup whose parent
        does not enable the memory controller for it (``memory.pressure`` stays: PSI files
        exist without it)."""
        d = self.unified / path.strip("/")
        d.mkdir(parents=True, exist_ok=True)
        root = d == self.unified
        if memory and not root:
            (d / "memory.events").write_text("low 0\nhigh 0\nmax 0\noom 0\noom_kill 0\noom_group_kill 0\n")
            (d / "memory.events.local").write_text("low 0\nhigh 0\nmax 0\noom 0\noom_kill 0\noom_group_kill 0\n")
        (d / "memory.pressure").write_text(
            "some avg10=0.00 avg60=0.00 avg300=0.00 total=0\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=0\n"
        )
        if not root:
            (d / "cgroup.events").write_text("populated 0\nfrozen 0\n")
            if memory:
                (d / "memory.max").write_text("max\n")
                (d / "memory.high").write_text("max\n")
                (d / "memory.current").write_text("0\n")
                (d / "memory.stat").write_text("anon 0\nfile 0\nactive_file 0\ninactive_file 0\nshmem 0\n")
                (d / "memory.oom.group").write_text("0\n")
                (d / "memory.reclaim").write_text("")
            (d / "cgroup.controllers").write_text((d.parent / "cgroup.subtree_control").read_text())
            (d / "cgroup.subtree_control").write_text("\n")
            (d / "cgroup.kill").write_text("")
            (d / "cgroup.freeze").write_text("0\n")
        self.set_procs(d, pids)
        return d

    def rmdir_v2(self, path: str) -> None:
        """Remove a v2 cgroup as the kernel does: the directory goes (its parent's watchers
        see ``IN_DELETE``), but a watch on one of its files gets no event at all, as on
        kernfs, where no ``IN_DELETE_SELF`` or ``IN_IGNORED`` comes.  (``shutil.rmtree``
        would send both.)  Each file keeps a hard link under ``.removed/``; a cgroup with
        child cgroups cannot be removed (EBUSY in the kernel; here the link fails)."""
        d = self.unified / path.strip("/")
        keep = self.root / ".removed" / f"{path.strip('/').replace('/', '-')}-{len(self._removed)}"
        self._removed.append(keep)
        keep.mkdir(parents=True)
        for f in d.iterdir():
            os.link(f, keep / f.name)
            f.unlink()
        d.rmdir()

    @staticmethod
    def set_memory(
        d: Path, *, current: int | None = None, max: int | str | None = None, high: int | str | None = None,
        file_lru: int | None = None,
    ) -> None:
        """Set a v2 cgroup's ``memory.current``, ``memory.max``, ``memory.high`` and the page
        cache on its file LRU (``active_file`` in ``memory.stat``); None leaves one as it is."""
        for name, value in (("memory.current", current), ("memory.max", max), ("memory.high", high)):
            if value is not None:
                (d / name).write_text(f"{value}\n")
        if file_lru is not None:
            (d / "memory.stat").write_text(f"anon 0\nfile {file_lru}\nactive_file {file_lru}\ninactive_file 0\nshmem 0\n")

    @staticmethod
    def bump_events(d: Path, name: str = "memory.events", **deltas: int) -> dict[str, int]:
        """Add ``deltas`` to counters of a v2 ``memory.events`` (as the kernel would:
        rewritten whole, which inotify reports as ``IN_MODIFY``); returns the new counters."""
        counters = {k: int(v) for k, v in (ln.split() for ln in (d / name).read_text().splitlines() if ln)}
        for key, delta in deltas.items():
            counters[key] = counters.get(key, 0) + delta
        (d / name).write_text("".join(f"{k} {v}\n" for k, v in counters.items()))
        return counters

    @staticmethod
    def set_subtree_control(d: Path, enabled: Iterable[str]) -> None:
        """What ``d`` enables for its children (``cgroup.subtree_control``)."""
        (d / "cgroup.subtree_control").write_text(" ".join(enabled) + "\n")

    def mount_v1(self, controller: str) -> Path:
        """Another v1 hierarchy (``freezer``...) at ``ROOT/<controller>``; mount it in a
        :class:`FakeProc` with ``set_mounts(v1={controller: str(path)})``."""
        d = self.root / controller
        self.v1_roots[controller] = d
        self._populate_v1(d, controller)
        return d

    @staticmethod
    def _populate_v1(d: Path, controller: str) -> None:
        d.mkdir(parents=True, exist_ok=True)
        (d / "cgroup.procs").write_text("")
        if controller == "freezer":
            (d / "freezer.state").write_text("THAWED\n")

    def mkdir(self, path: Path) -> None:
        """``mkdir`` in a fake hierarchy, which (as cgroupfs) comes with its files: v2
        memory files only when the parent enables the memory controller."""
        path.mkdir()  # FileExistsError, FileNotFoundError as the kernel's would be
        if path.is_relative_to(self.unified):
            enabled = (path.parent / "cgroup.subtree_control").read_text().split()
            self.mkdir_v2("/" + str(path.relative_to(self.unified)), memory="memory" in enabled)
            return
        for controller, root in self.v1_roots.items():
            if path.is_relative_to(root):
                if controller == "memory":
                    self.mkdir_v1("/" + str(path.relative_to(root)))
                else:
                    self._populate_v1(path, controller)
                return
        path.rmdir()
        raise PermissionError(errno.EPERM, f"not in a fake cgroup hierarchy: {path}")

    @staticmethod
    def rmdir(path: Path) -> None:
        """``rmdir`` of a fake cgroup: EBUSY with children or processes, as cgroupfs."""
        if any(p.is_dir() for p in path.iterdir()):
            raise OSError(errno.EBUSY, os.strerror(errno.EBUSY), str(path))
        procs = path / "cgroup.procs"
        if procs.exists() and procs.read_text().strip():
            raise OSError(errno.EBUSY, os.strerror(errno.EBUSY), str(path))
        for f in path.iterdir():
            f.unlink()
        path.rmdir()

    @staticmethod
    def set_procs(d: Path, pids: tuple[int, ...] | list[int]) -> None:
        (d / "cgroup.procs").write_text("".join(f"{p}\n" for p in pids))

    @staticmethod
    def written(d: Path, name: str = "memory.oom_control") -> list[str]:
        """What code under test wrote to a keyed control file since it was last set, in order.

        :func:`oomkit.cgroupfs.write_value` appends one line per write; the lines without a
        key (the kernel would have consumed them) are the writes.  Not for ``cgroup.procs``,
        whose every line is a bare value.
        """
        return [ln for ln in (d / name).read_text().splitlines() if ln and " " not in ln]

    @staticmethod
    def set_oom_control(d: Path, *, oom_kill_disable: int = 0, under_oom: int = 0, oom_kill: int = 0) -> None:
        (d / "memory.oom_control").write_text(
            f"oom_kill_disable {oom_kill_disable}\nunder_oom {under_oom}\noom_kill {oom_kill}\n"
        )


_OOM_EVENTS = (
    "compact_retry", "finish_task_reaping", "mark_victim", "oom_score_adj_update",
    "reclaim_retry_zone", "skip_task_reaping", "start_task_reaping", "wake_reaper",
)

_MARK_VICTIM_FORMAT = """name: mark_victim
ID: 1
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:unsigned char common_flags;\toffset:2;\tsize:1;\tsigned:0;
\tfield:unsigned char common_preempt_count;\toffset:3;\tsize:1;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;

\tfield:int pid;\toffset:8;\tsize:4;\tsigned:1;
\tfield:__data_loc char[] comm;\toffset:12;\tsize:4;\tsigned:0;
\tfield:unsigned long total_vm;\toffset:16;\tsize:8;\tsigned:0;
\tfield:unsigned long anon_rss;\toffset:24;\tsize:8;\tsigned:0;
\tfield:short oom_score_adj;\toffset:64;\tsize:2;\tsigned:1;
"""


class FakeTracefs:
    """A fake tracefs: ``events/oom/<event>/format`` and ``instances/``, whose
    :meth:`mkdir` (as tracefs) makes an instance with ``per_cpu/cpuN/trace_pipe_raw``.

    Each ``trace_pipe_raw`` holds one ring-buffer meta page (``meta_page_size``,
    ``meta_struct_len``, ``subbuf_size``, ``nr_subbufs``) so that mapping it reads what the
    kernel's would; with ``mappable=False`` it is empty, as on a kernel before 6.10 (whose
    refusal, ENODEV, only the real kernel gives).
    """

    def __init__(self, root: Path, *, events: tuple[str, ...] = _OOM_EVENTS, cpus: int = 1, mappable: bool = True) -> None:
        self.root = root
        self.cpus = cpus
        self.mappable = mappable
        (root / "instances").mkdir(parents=True, exist_ok=True)
        for event in events:
            d = root / "events" / "oom" / event
            d.mkdir(parents=True, exist_ok=True)
            (d / "format").write_text(_MARK_VICTIM_FORMAT if event == "mark_victim" else f"name: {event}\nformat:\n")

    @property
    def path(self) -> str:
        return str(self.root)

    def mkdir(self, path: Path) -> None:
        path.mkdir()
        for cpu in range(self.cpus):
            d = path / "per_cpu" / f"cpu{cpu}"
            d.mkdir(parents=True)
            meta = struct.pack("<4I", mmap.PAGESIZE, 80, 4096, 8).ljust(mmap.PAGESIZE, b"\0")
            (d / "trace_pipe_raw").write_bytes(meta if self.mappable else b"")

    @staticmethod
    def rmdir(path: Path) -> None:
        for f in sorted(path.rglob("*"), key=lambda p: len(p.parts), reverse=True):
            f.rmdir() if f.is_dir() else f.unlink()
        path.rmdir()


def probe_machine(
    proc: FakeProc, cgroups: FakeCgroups | None = None, tracefs: FakeTracefs | None = None, *, sys: Path | None = None
) -> Machine:
    """A :class:`~oomkit.probes.Machine` on fake trees: cgroups and tracefs instances are
    made in the fakes, and mounting tracefs fails with EPERM (a fake tree never mounts
    anything; list ``tracefs`` in ``proc.set_mounts`` instead).  The probed system calls
    stay real."""

    def mkdir(path: Path) -> None:
        if tracefs is not None and path.is_relative_to(tracefs.root):
            tracefs.mkdir(path)
        elif cgroups is not None and path.is_relative_to(cgroups.root):
            cgroups.mkdir(path)
        else:
            raise PermissionError(errno.EPERM, f"not in a fake tree: {path}")

    def rmdir(path: Path) -> None:
        if tracefs is not None and path.is_relative_to(tracefs.root):
            tracefs.rmdir(path)
        elif cgroups is not None and path.is_relative_to(cgroups.root):
            cgroups.rmdir(path)
        else:
            raise PermissionError(errno.EPERM, f"not in a fake tree: {path}")

    def mount(path: Path) -> None:
        raise PermissionError(errno.EPERM, os.strerror(errno.EPERM), str(path))

    return Machine.from_paths(
        paths_for(proc, cgroups), sys=str(sys or proc.root.parent / "sys"), mkdir=mkdir, rmdir=rmdir, mount=mount, umount=mount
    )


def paths_for(proc: FakeProc, cgroups: FakeCgroups | None = None) -> PathsConfig:
    """``[paths]`` pointing at fake trees."""
    if cgroups is None:
        return PathsConfig(proc=str(proc.path), memory_v1="/nonexistent-memory", unified="/nonexistent-unified")
    return PathsConfig(proc=str(proc.path), memory_v1=str(cgroups.memory_v1), unified=str(cgroups.unified))


def unbounded_numbers(struct: type[msgspec.Struct]) -> list[str]:
    """Where a settings Struct takes a number with no lower or no upper bound: the paths of
    every ``int`` or ``float`` inside it (in unions, tuples, lists, dict keys and values,
    nested Structs) whose ``msgspec.Meta`` lacks ``ge``/``gt`` or ``le``/``lt``.

    oomkit's own config passes this empty; a plugin's test can hold its settings to the
    same rule: ``assert unbounded_numbers(MySettings) == []``.
    """
    m = msgspec.inspect
    found: list[str] = []
    seen: set[type] = set()

    def walk(t: msgspec.inspect.Type, path: str) -> None:
        if isinstance(t, (m.IntType, m.FloatType)):
            if (t.ge is None and t.gt is None) or (t.le is None and t.lt is None):
                found.append(path)
        elif isinstance(t, m.DecimalType):
            found.append(path)  # msgspec has no bounds for it
        elif isinstance(t, m.UnionType):
            for member in t.types:
                walk(member, path)
        elif isinstance(t, (m.ListType, m.VarTupleType, m.SetType, m.FrozenSetType)):
            walk(t.item_type, f"{path}[]")
        elif isinstance(t, m.TupleType):
            for i, item in enumerate(t.item_types):
                walk(item, f"{path}[{i}]")
        elif isinstance(t, m.DictType):
            walk(t.key_type, f"{path}{{key}}")
            walk(t.value_type, f"{path}[]")
        elif isinstance(t, (m.StructType, m.DataclassType, m.TypedDictType, m.NamedTupleType)):
            if t.cls in seen:
                return
            seen.add(t.cls)
            for f in t.fields:
                walk(f.type, f"{path}.{f.name}")

    walk(m.type_info(struct), struct.__qualname__)
    return found


def config_for(proc: FakeProc, cgroups: FakeCgroups | None = None, **fields: object) -> Config:
    """A :class:`Config` reading fake trees; no sources unless given."""
    fields.setdefault("sources", ())
    return Config(paths=paths_for(proc, cgroups), **fields)  # type: ignore[arg-type]


BACKENDS: tuple[tuple[str, dict[str, object]], ...] = (("asyncio", {}), ("asyncio", {"use_uvloop": True}), ("trio", {}))
"""What ``anyio_backend`` takes in a test that uses it: asyncio, uvloop and trio."""

EARLY_TIMER_NS = 2_000_000
"""How much earlier than ``time.monotonic_ns`` says a deadline may end on these backends.

uvloop's clock counts whole milliseconds (libuv's ``uv_now``) and rounds a delay to one, so
``anyio.fail_after(0.5)`` can end 1.3 ms short of 0.5 s measured by ``time.monotonic_ns``
(measured: ``call_later(0.0105)`` 1.31 ms early at worst in 200 calls).  A test that checks a
timeout was waited out compares against ``timeout_ns - EARLY_TIMER_NS``; lateness needs no
allowance in that direction, and a busy machine only makes timers later."""


@pytest.hookimpl(tryfirst=True)
def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Every test that uses ``anyio_backend`` (every ``@pytest.mark.anyio`` test) runs on
    asyncio, uvloop and trio, as oomkit's own suite does, unless the project or the test
    chose its own: a conftest or module ``anyio_backend`` fixture, or a parametrize mark.

    A parametrization rather than a fixture: anyio's pytest plugin has an ``anyio_backend``
    fixture of its own, and which of two plugins' fixtures wins depends on the order their
    entry points happen to load in; a direct parametrization always wins.
    """
    if "anyio_backend" not in metafunc.fixturenames:
        return
    # pytest keeps the fixture definitions a test sees here (no public accessor in pytest 8).
    defs = metafunc._arg2fixturedefs.get("anyio_backend", ())
    if defs and defs[-1].func.__module__ != "anyio.pytest_plugin":
        return
    for mark in metafunc.definition.iter_markers("parametrize"):
        names = mark.args[0]
        if "anyio_backend" in (names.replace(" ", "").split(",") if isinstance(names, str) else names):
            return
    # As a mark, before pytest's own hooks run: they apply it, and skip the fixture's params.
    metafunc.definition.add_marker(pytest.mark.parametrize("anyio_backend", BACKENDS, ids=["asyncio", "uvloop", "trio"]))


@pytest.fixture
def fake_proc(tmp_path: Path) -> Iterator[FakeProc]:
    """An empty fake ``/proc`` in ``tmp_path / "proc"``."""
    yield FakeProc(tmp_path / "proc")


@pytest.fixture
def fake_cgroups(tmp_path: Path, fake_proc: FakeProc) -> Iterator[FakeCgroups]:
    """Fake v1 memory and v2 trees, mounted (as far as ``fake_proc`` says) where they are."""
    cg = FakeCgroups(tmp_path / "cgroup")
    fake_proc.set_mounts(memory_v1=str(cg.memory_v1), unified=str(cg.unified))
    yield cg


class FakeSource(Source):
    """A source whose events a test injects: ``await source.inject(event)``.

    ``holds`` answers the engine's re-check right before a kill (set it to False to see a
    decision end in ``condition-cleared``).
    """

    def __init__(self, name: str = "fake") -> None:
        self.name = name
        self.holds = True
        self.rechecks = 0
        self._emit: Emit | None = None

    async def run(self, emit: Emit, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        self._emit = emit
        task_status.started()
        await anyio.sleep_forever()

    async def inject(self, event: Event) -> None:
        """Hand ``event`` to the engine as if the kernel had signalled it."""
        if self._emit is None:
            raise RuntimeError("the engine has not started this source yet")
        await self._emit(event)

    def event(self, kind: EventKind = "oom", scope: Scope = SYSTEM, **values: float) -> Event:
        """An event from this source."""
        return Event(source=self.name, kind=kind, scope=scope, values=dict(values))

    def still_holds(self, event: Event) -> bool:
        self.rechecks += 1
        return self.holds


# --- the engine harness -------------------------------------------------------------------


def parse_scope(scope: Scope | str) -> Scope:
    """``"system"``, ``"v1:/jobs"`` or ``"v2:/app"`` (what ``str(scope)`` prints) as a Scope."""
    if isinstance(scope, Scope):
        return scope
    if scope == "system":
        return SYSTEM
    tree, sep, path = scope.partition(":")
    if not sep or tree not in ("v1", "v2") or not path.startswith("/"):
        raise ValueError(f"scope {scope!r}: expected 'system', 'v1:/path' or 'v2:/path'")
    return Scope(tree, path)  # type: ignore[arg-type]


def _config(
    config: Config | Mapping[str, Any] | None, proc: FakeProc | None, cgroups: FakeCgroups | None
) -> Config:
    if isinstance(config, Config):
        return config if proc is None else msgspec.structs.replace(config, paths=paths_for(proc, cgroups))
    # A mapping goes through the same decoding as a TOML file, so a plugin's settings are
    # checked exactly as an operator's file would be.
    raw = dict(config or {})
    raw.setdefault("sources", [])
    if proc is not None and "paths" not in raw:
        raw["paths"] = msgspec.to_builtins(paths_for(proc, cgroups))
    return config_from_dict(raw, "<harness>")


@final
class Harness:
    """A running engine fed by a :class:`FakeSource`; made by :func:`harness`."""

    __slots__ = ("engine", "source")

    def __init__(self, engine: Engine, source: FakeSource) -> None:
        self.engine = engine
        self.source = source
        """Set ``source.holds = False`` to have the re-check before the kill find the
        condition gone."""

    def event(self, kind: EventKind = "oom", scope: Scope | str = SYSTEM, **values: float) -> Event:
        """An event from the harness's source (so the engine re-checks it there)."""
        return self.source.event(kind, parse_scope(scope), **values)

    async def decide(
        self, event: Event | None = None, /, *, kind: EventKind = "oom", scope: Scope | str = SYSTEM, **values: float
    ) -> Decision:
        """Run the whole chain for ``event`` (by default an ``oom`` for ``scope``) now.

        Like :meth:`oomkit.Engine.decide`, it skips ``should_act``, coalescing and cooldown:
        use :meth:`offer` to test those.
        """
        return await self.engine.decide(event or self.event(kind, scope, **values))

    async def offer(self, event: Event, *, timeout: float = 5.0) -> Decision | None:
        """Hand ``event`` to the engine as a source would, and wait for what it does with it.

        Returns its decision, or None when the engine did not act on it (``should_act``
        said no, it was coalesced into a pending event, or the scope is cooling down).
        """
        def counts() -> tuple[int, int, int]:
            stats = self.engine.stats  # a copy: read it again each time
            return stats.ignored, stats.coalesced, stats.cooled

        before = counts()
        await self.source.inject(event)
        with anyio.fail_after(timeout):
            while True:
                for d in self.engine.recent:
                    if d.event is event:
                        return d
                if counts() != before:
                    return None
                await anyio.sleep(0.001)

    async def notified(self, decision: Decision, *, timeout: float = 10.0) -> None:
        """Wait until every notifier has been handed ``decision`` (no sleep loop of your own)."""
        await self.engine.notified(decision, timeout)

    def rank(self, scope: Scope | str = SYSTEM) -> Ranking:
        """Candidates, scores and vetoes for an ``oom`` in ``scope``, as ``oomkit top`` shows."""
        return self.engine.rank(self.event("oom", scope))

    def __repr__(self) -> str:
        return f"<Harness {self.engine!r}>"


@asynccontextmanager
async def harness(
    *plugins: Any,
    proc: FakeProc | None = None,
    cgroups: FakeCgroups | None = None,
    config: Config | Mapping[str, Any] | None = None,
    autoload: bool = True,
    dry_run: bool = True,
    sources: Iterable[Source] = (),
) -> AsyncIterator[Harness]:
    """Run an engine with ``plugins`` (objects, classes or ``(name, plugin)`` pairs)::

        async with harness(MyVeto(), proc=fake_proc) as h:
            d = await h.decide(scope="v1:/jobs")
        assert_vetoed(d, "postgres", by="my_veto")

    ``autoload`` loads the ``oomkit`` entry-point group as the daemon does (first-party
    plugins and every installed one), so a decision is what production would decide;
    pass ``proc`` (and ``cgroups``) so that they read fake trees.  ``config`` is a
    :class:`~oomkit.Config` or a TOML-like dict (``{"plugins": {"mine": {...}}}``) decoded
    as a file would be; with ``proc``, ``[paths]`` point at the fake trees.  A dict without
    ``sources`` runs no configured source (the defaults would poll the real
    ``/proc/meminfo``); events come from ``Harness.source`` and ``sources``.
    ``dry_run`` (the default) runs every stage but never calls a killer: the candidates are
    fake, the pids and signals would be real.  Every stage includes the engine's
    re-verification of the victim in ``proc``: a candidate a test makes up must exist there
    (:meth:`FakeProc.add_candidate`), or the decision ends ``exited``.
    """
    source = FakeSource("harness")
    engine = Engine(
        _config(config, proc, cgroups), plugins=plugins, sources=[source, *sources], autoload=autoload, dry_run=dry_run
    )
    async with engine:
        yield Harness(engine, source)


Backend = Literal["asyncio", "uvloop", "trio"]


def decide(
    *plugins: Any,
    kind: EventKind = "oom",
    scope: Scope | str = SYSTEM,
    proc: FakeProc | None = None,
    cgroups: FakeCgroups | None = None,
    config: Config | Mapping[str, Any] | None = None,
    autoload: bool = True,
    dry_run: bool = True,
    backend: Backend = "asyncio",
    **values: float,
) -> Decision:
    """:func:`harness` for a plain (sync) test: start an engine, decide one event, wait for
    the notifiers to have it, stop."""

    async def once() -> Decision:
        async with harness(*plugins, proc=proc, cgroups=cgroups, config=config, autoload=autoload, dry_run=dry_run) as h:
            d = await h.decide(kind=kind, scope=scope, **values)
            await h.notified(d)
            return d

    if backend == "uvloop":
        return anyio.run(once, backend="asyncio", backend_options={"use_uvloop": True})
    return anyio.run(once, backend=backend)


# --- assertions on decisions ----------------------------------------------------------------


def explain(decision: Decision) -> str:
    """The decision as a readable table: outcome, then every candidate with scores and vetoes."""
    ev = decision.event
    lines = [
        f"decision {decision.id} for {ev.kind} in {ev.scope}: {decision.outcome}"
        + (f" ({decision.detail})" if decision.detail else "")
    ]
    for r in decision.ranking:
        c = r.candidate
        mark = ">" if decision.victim is not None and c.pid == decision.victim.pid else " "
        scores = " ".join(f"{k}={v:g}" for k, v in sorted(r.scores.items()))
        vetoes = "; ".join(f"{v.plugin}: {v.reason}" for v in r.vetoes)
        lines.append(
            f"{mark} pid {c.pid} {c.name!r} score {r.score:g}"
            + (f" {r.tier} ({r.tier_reason})" if r.tier != "normal" else "")
            + (f" [{scores}]" if scores else "")
            + (f" VETOED {vetoes}" if vetoes else "")
        )
    if not decision.ranking:
        lines.append("  (no candidates)")
    lines += [f"  error: {e.plugin} in {e.hook}: {e.error}" for e in decision.errors]
    return "\n".join(lines)


def _fail(message: str, decision: Decision) -> AssertionError:
    return AssertionError(f"{message}\n{explain(decision)}")


def _matches(c: Candidate, who: int | str) -> bool:
    return c.pid == who if isinstance(who, int) else c.name == who


def _ranked(decision: Decision, who: int | str) -> Ranked:
    found = [r for r in decision.ranking if _matches(r.candidate, who)]
    if not found:
        raise _fail(f"no candidate {who!r} in the ranking", decision)
    if len(found) > 1:
        raise _fail(f"{len(found)} candidates are named {who!r}: name one by pid", decision)
    return found[0]


def assert_outcome(decision: Decision, outcome: Outcome) -> None:
    """The decision ended in ``outcome`` (``"dry-run"``, ``"killed"``, ``"all-vetoed"``...)."""
    if decision.outcome != outcome:
        raise _fail(f"outcome is {decision.outcome!r}, expected {outcome!r}", decision)


def assert_victim(decision: Decision, who: int | str) -> Candidate:
    """The victim is the candidate with pid ``who`` (an int) or name ``who`` (a str)."""
    if decision.victim is None:
        raise _fail(f"no victim, expected {who!r}", decision)
    if not _matches(decision.victim, who):
        raise _fail(f"victim is pid {decision.victim.pid} {decision.victim.name!r}, expected {who!r}", decision)
    return decision.victim


def assert_vetoed(decision: Decision, who: int | str, *, by: str | None = None, reason: str | None = None) -> Veto:
    """Candidate ``who`` was vetoed, by plugin ``by`` if given, with ``reason`` in the reason."""
    r = _ranked(decision, who)
    for v in r.vetoes:
        if (by is None or v.plugin == by) and (reason is None or reason in v.reason):
            return v
    want = " ".join(filter(None, [f"by {by!r}" if by else "", f"with {reason!r} in the reason" if reason else ""]))
    raise _fail(f"candidate {who!r} is not vetoed{' ' + want if want else ''}", decision)


def assert_not_vetoed(decision: Decision, who: int | str) -> None:
    """Candidate ``who`` is in the ranking and nobody vetoed it."""
    if _ranked(decision, who).vetoes:
        raise _fail(f"candidate {who!r} is vetoed", decision)
