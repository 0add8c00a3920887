"""Event-driven sources against the real kernel: PSI triggers, pressure_level, usage
thresholds, cgroups appearing and disappearing.

Pressure needs page-cache thrashing (anonymous memory without swap makes none): a process
in a 64 MiB v1 memcg *and* a v2 child cgroup mmap-reads a 96 MiB file whose cached pages
were dropped first (``tests/thrash.py``).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import anyio
import pytest

from oomkit.cgroupfs import find_mounts
from oomkit.config import Config
from oomkit.events import SYSTEM, Event, Scope
from oomkit.sources import build_source
from oomkit.sources.memcg_pressure import MemcgPressureSourceConfig
from oomkit.sources.memcg_threshold import MemcgThresholdSourceConfig
from oomkit.sources.memory_events import MemoryEventsSourceConfig
from oomkit.sources.psi import PsiSource, PsiSourceConfig
from tests import kernel
from tests.sources_support import cpu_ns, running

pytestmark = [pytest.mark.kernel, pytest.mark.anyio]

THRASH = Path(__file__).parent.parent / "thrash.py"
MiB = 1 << 20
Make = Callable[..., kernel.Cgroup]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def spawn_in(cgroups: list[kernel.Cgroup], argv: list[str]) -> subprocess.Popen[bytes]:
    """Start ``argv`` inside every one of ``cgroups`` (one per hierarchy)."""
    procs = [str(cg.path / "cgroup.procs") for cg in cgroups]

    def join() -> None:
        for p in procs:
            with open(p, "w") as f:
                f.write(str(os.getpid()))

    return subprocess.Popen(argv, preexec_fn=join, stdout=subprocess.PIPE)


@pytest.fixture
def thrashing(memcg: Make, cgroup2: Make, tmp_path: Path) -> Iterator[tuple[kernel.Cgroup, kernel.Cgroup, Callable[[float], None]]]:
    """``(v1 memcg, v2 cgroup, start)``: ``start(seconds)`` runs the thrashing process in both."""
    v1 = memcg(64 * MiB, tag="thrash")
    v2 = cgroup2(tag="thrash")
    started: list[subprocess.Popen[bytes]] = []

    def start(seconds: float) -> None:
        p = spawn_in([v1, v2], [sys.executable, str(THRASH), str(tmp_path / "data"), "96", "--seconds", str(seconds)])
        assert p.stdout is not None and p.stdout.readline().startswith(b"ready")
        started.append(p)

    yield v1, v2, start
    for p in started:
        p.kill()
        p.wait()
        assert p.stdout is not None
        p.stdout.close()


def cfg(*sources: object) -> Config:
    return Config(sources=sources)  # type: ignore[arg-type]


async def test_psi_and_pressure_level_fire_under_page_cache_thrashing(
    thrashing: tuple[kernel.Cgroup, kernel.Cgroup, Callable[[float], None]],
) -> None:
    v1, v2, start = thrashing
    specs = (
        PsiSourceConfig(name="psi-cgroup", cgroups=(v2.rel,), stall_ms=50, window_s=2),
        PsiSourceConfig(name="psi-system", stall_ms=50, window_s=2),
        MemcgPressureSourceConfig(cgroups=(v1.rel,), levels=("low", "medium", "critical"), min_interval_s=1.0),
    )
    config = cfg(*specs)
    sources = [build_source(s, config) for s in specs]
    seen: dict[str, list[Event]] = {s.name: [] for s in sources}
    system = sources[1]
    assert isinstance(system, PsiSource)

    async def emit(event: Event) -> None:
        seen[event.source].append(event)

    async with anyio.create_task_group() as tg:
        for src in sources:
            await tg.start(src.run, emit)
        # /proc/pressure/memory takes a NUL-terminated trigger (KERNEL.md's EINVAL came from a
        # line without one: the kernel cuts the last byte).
        assert system._watches[SYSTEM].path == Path("/proc/pressure/memory")  # type: ignore[attr-defined]
        start(14)
        with anyio.fail_after(15):
            while not all(any(e.kind == "pressure" for e in evs) for evs in seen.values()):
                await anyio.sleep(0.2)
        await anyio.sleep(3)  # a few seconds of the storm, to see it coalesced
        tg.cancel_scope.cancel()

    cg = [e for e in seen["psi-cgroup"] if e.kind == "pressure"]
    assert cg[0].scope == Scope(tree="v2", path=v2.rel)
    assert cg[0].values["trigger_window_us"] == 2_000_000 and cg[0].values["some_total_us"] > 0
    levels = [e for e in seen["memcg-pressure"] if e.kind == "pressure"]
    notifications = sum(e.values["low_notifications"] for e in levels)
    # Hundreds of kernel notifications a second; at most one event per second comes out.
    first, last = levels[0].monotonic_ns, levels[-1].monotonic_ns
    assert len(levels) <= (last - first) / 1e9 + 2
    assert notifications > len(levels)


async def test_psi_watch_ends_cleanly_when_its_cgroup_is_removed(
    cgroup2: Make, caplog: pytest.LogCaptureFixture
) -> None:
    v2 = cgroup2(tag="psi-gone")
    src = build_source(PsiSourceConfig(cgroups=(v2.rel,)), cfg())
    caplog.set_level(logging.INFO, "oomkit.sources")
    async with running(src) as run:
        assert isinstance(src, PsiSource) and src._watches[Scope(tree="v2", path=v2.rel)].fd is not None  # type: ignore[attr-defined]
        v2.remove()
        with anyio.fail_after(5):
            while src.watching:
                await anyio.sleep(0.05)
        before = cpu_ns()
        assert await run.quiet(2.0) == []
        assert cpu_ns() - before < 100_000_000
    assert src.faults == 0
    assert any("POLLERR" in r.getMessage() or "is gone" in r.getMessage() for r in caplog.records)


async def test_usage_threshold_fires_on_the_way_up_and_down(memcg: Make) -> None:
    v1 = memcg(512 * MiB, tag="threshold")
    src = build_source(MemcgThresholdSourceConfig(cgroups=(v1.rel,), thresholds=("32M",)), cfg())
    async with running(src) as run:
        hog = v1.hog(64, stdout=subprocess.PIPE)
        try:
            up = await run.next(timeout=10)
            assert (up.kind, up.values["direction"]) == ("threshold", 1.0)
            assert up.values["usage_bytes"] >= 32 * MiB and up.values["threshold_bytes"] == 32 * MiB
            assert src.still_holds(up)
        finally:
            hog.kill()
            hog.wait()
            assert hog.stdout is not None
            hog.stdout.close()
        down = await run.next(timeout=10)
        assert (down.kind, down.values["direction"]) == ("threshold", -1.0)
        assert down.values["usage_bytes"] < 32 * MiB


async def test_pressure_level_watch_ends_when_the_memcg_is_removed(memcg: Make) -> None:
    v1 = memcg(64 * MiB, tag="level-gone")
    src = build_source(MemcgPressureSourceConfig(cgroups=(v1.rel,)), cfg())
    async with running(src) as run:
        assert src.watching == [Scope(tree="v1", path=v1.rel)]  # type: ignore[attr-defined]
        v1.remove()  # the kernel signals each registered eventfd as it goes
        with anyio.fail_after(5):
            while src.watching:  # type: ignore[attr-defined]
                await anyio.sleep(0.05)
        assert await run.quiet(0.5) == []
    assert src.faults == 0  # type: ignore[attr-defined]


async def test_new_memcgs_matching_a_glob_are_watched(memcg: Make) -> None:
    parent = kernel.v1_parent()
    root = find_mounts("/proc")[0]
    assert parent is not None and root is not None
    pattern = "/" + str(parent.relative_to(root)) + f"/{kernel.PREFIX}{os.getpid()}-*-glob"
    src = build_source(MemcgPressureSourceConfig(cgroups=(pattern,)), cfg())
    async with running(src):
        assert src.watching == []  # type: ignore[attr-defined]
        v1 = memcg(tag="glob")
        with anyio.fail_after(5):
            while src.watching != [Scope(tree="v1", path=v1.rel)]:  # type: ignore[attr-defined]
                await anyio.sleep(0.02)
        v1.remove()
        with anyio.fail_after(5):
            while src.watching:  # type: ignore[attr-defined]
                await anyio.sleep(0.02)


async def test_v2_memory_events_report_kernel_kills(cgroup2: Make) -> None:
    reason = kernel.skip_reason("cgroup-v2-memory")
    if reason:
        pytest.skip(
            f"{reason}: no memory.events and no v2 OOM kill to observe here;"
            " tests/integration/guest runs them in a guest kernel"
        )
    v2 = cgroup2(tag="events")
    v2.write("memory.max", 32 * MiB)
    v2.write("memory.swap.max", 0)
    src = build_source(MemoryEventsSourceConfig(cgroups=(v2.rel,)), cfg())
    async with running(src) as run:
        hog = v2.hog(64, hold=True)
        try:
            kill = await run.until("kernel-kill", timeout=10)
        finally:
            hog.kill()
            hog.wait()
    assert kill.values["oom_kill_delta"] >= 1
