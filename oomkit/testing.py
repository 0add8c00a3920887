"""Test doubles for plugin authors and for oomkit's own tests.

Fake ``/proc`` and cgroupfs trees are real directories of real files in the layouts the
kernel uses, so code under test reads them through the same functions it uses in
production; point ``[paths]`` at them.  Registered as a pytest plugin (``pytest11``) that
provides the ``fake_proc`` and ``fake_cgroups`` fixtures.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
from anyio.abc import TaskStatus

from .config import Config, PathsConfig
from .events import SYSTEM, Event, EventKind, Scope
from .sources.base import Emit, Source

__all__ = ["FakeCgroups", "FakeProc", "FakeSource", "config_for", "fake_cgroups", "fake_proc", "paths_for"]

PAGE = 4096


class FakeProc:
    """A fake ``/proc``: processes with ``stat``, ``status``, ``oom_score_adj``,
    ``oom_score``, ``cmdline`` and ``cgroup``; ``meminfo``; ``self/mounts`` and
    ``self/cgroup``; ``pressure/memory``."""

    def __init__(self, root: Path, *, mem_total: int = 8 << 30) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        (root / "self").mkdir(exist_ok=True)
        (root / "pressure").mkdir(exist_ok=True)
        self.set_meminfo(mem_total=mem_total, mem_available=mem_total // 2)
        self.set_mounts()
        self.set_pressure()
        (root / "self" / "cgroup").write_text("4:memory:/\n0::/\n")

    @property
    def path(self) -> str:
        return str(self.root)

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
    ) -> Path:
        """Add (or overwrite) a process.  Sizes in bytes; kernel threads have no Vm lines."""
        d = self.root / str(pid)
        d.mkdir(exist_ok=True)
        flags = 0x00200000 if kthread else 0x00400100
        rss_pages = rss // PAGE
        # Fields 3..52 of stat after "pid (comm) "; only the ones oomkit reads matter.
        fields = [state, str(ppid)] + ["0"] * 4 + [str(flags)] + ["0"] * 12 + [str(start_ticks)]
        fields += ["0", str(rss_pages)] + ["0"] * 30
        (d / "stat").write_text(f"{pid} ({name}) {' '.join(fields)}\n")
        lines = [f"Name:\t{name[:15]}", f"State:\t{state}", f"PPid:\t{ppid}", f"Uid:\t{uid}\t{uid}\t{uid}\t{uid}"]
        if not kthread:
            lines += [f"VmRSS:\t{rss // 1024:8d} kB", f"VmPTE:\t{pgtables // 1024:8d} kB", f"VmSwap:\t{swap // 1024:8d} kB"]
        (d / "status").write_text("\n".join(lines) + "\n")
        (d / "oom_score_adj").write_text(f"{oom_score_adj}\n")
        (d / "cmdline").write_bytes(b"" if kthread else b"\0".join(a.encode() for a in (cmdline or (name,))) + b"\0")
        (d / "cgroup").write_text(f"4:memory:{memcg}\n0::{cgroup2}\n")
        return d

    def remove_process(self, pid: int) -> None:
        d = self.root / str(pid)
        for f in d.iterdir():
            f.unlink()
        d.rmdir()

    def set_meminfo(
        self, *, mem_total: int, mem_available: int, swap_total: int = 0, swap_free: int = 0
    ) -> None:
        def kb(n: int) -> str:
            return f"{n // 1024:8d} kB"

        self.mem_total = mem_total
        (self.root / "meminfo").write_text(
            f"MemTotal:       {kb(mem_total)}\nMemFree:        {kb(mem_available)}\n"
            f"MemAvailable:   {kb(mem_available)}\nBuffers:        {kb(0)}\n"
            f"SwapTotal:      {kb(swap_total)}\nSwapFree:       {kb(swap_free)}\n"
        )

    def set_mounts(self, memory_v1: str | None = None, unified: str | None = None) -> None:
        lines = ["proc /proc proc rw,nosuid,nodev,noexec,relatime 0 0"]
        if memory_v1:
            lines.append(f"cgroup {memory_v1} cgroup rw,nosuid,nodev,noexec,relatime,memory 0 0")
        if unified:
            lines.append(f"cgroup2 {unified} cgroup2 rw,nosuid,nodev,noexec,relatime 0 0")
        (self.root / "self" / "mounts").write_text("\n".join(lines) + "\n")

    def set_pressure(self, some_avg10: float = 0.0, full_avg10: float = 0.0, some_total: int = 0, full_total: int = 0) -> None:
        (self.root / "pressure" / "memory").write_text(
            f"some avg10={some_avg10:.2f} avg60=0.00 avg300=0.00 total={some_total}\n"
            f"full avg10={full_avg10:.2f} avg60=0.00 avg300=0.00 total={full_total}\n"
        )


class FakeCgroups:
    """Fake cgroupfs trees: a v1 memory hierarchy at ``memory`` and a v2 one at ``unified``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.memory_v1 = root / "memory"
        self.unified = root / "unified"
        self.mkdir_v1("/")
        self.mkdir_v2("/")

    def mkdir_v1(self, path: str, *, limit: int = 2**63 - 4096, usage: int = 0, pids: tuple[int, ...] = ()) -> Path:
        d = self.memory_v1 / path.strip("/")
        d.mkdir(parents=True, exist_ok=True)
        (d / "memory.limit_in_bytes").write_text(f"{limit}\n")
        (d / "memory.usage_in_bytes").write_text(f"{usage}\n")
        (d / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 0\n")
        (d / "memory.pressure_level").write_text("")
        (d / "memory.stat").write_text("cache 0\nrss 0\n")
        (d / "cgroup.event_control").write_text("")
        self.set_procs(d, pids)
        return d

    def mkdir_v2(self, path: str, *, pids: tuple[int, ...] = ()) -> Path:
        d = self.unified / path.strip("/")
        d.mkdir(parents=True, exist_ok=True)
        (d / "memory.events").write_text("low 0\nhigh 0\nmax 0\noom 0\noom_kill 0\noom_group_kill 0\n")
        (d / "memory.events.local").write_text("low 0\nhigh 0\nmax 0\noom 0\noom_kill 0\noom_group_kill 0\n")
        (d / "memory.pressure").write_text(
            "some avg10=0.00 avg60=0.00 avg300=0.00 total=0\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=0\n"
        )
        (d / "cgroup.events").write_text("populated 0\nfrozen 0\n")
        self.set_procs(d, pids)
        return d

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


def paths_for(proc: FakeProc, cgroups: FakeCgroups | None = None) -> PathsConfig:
    """``[paths]`` pointing at fake trees."""
    if cgroups is None:
        return PathsConfig(proc=proc.path, memory_v1="/nonexistent-memory", unified="/nonexistent-unified")
    return PathsConfig(proc=proc.path, memory_v1=str(cgroups.memory_v1), unified=str(cgroups.unified))


def config_for(proc: FakeProc, cgroups: FakeCgroups | None = None, **fields: object) -> Config:
    """A :class:`Config` reading fake trees; no sources unless given."""
    fields.setdefault("sources", ())
    return Config(paths=paths_for(proc, cgroups), **fields)  # type: ignore[arg-type]


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
