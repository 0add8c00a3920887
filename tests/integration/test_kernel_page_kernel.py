"""The kernel-page source and the tracefs ring buffer against this machine's kernel.

Real memcg OOMs killed by the kernel's own killer (a 100 MiB hog in a 32 MiB v1 memcg),
read through the memory-mapped ring buffer (Linux >= 6.10), through ``read()`` of
``trace_pipe_raw``, and through ``/dev/kmsg``; the reader protocol itself with
``trace_marker`` writes, which cost no OOM.  Other tests on this machine kill processes in
their own memcgs at the same time, so every assertion looks at our victim and our memcg
only.  Skips, with the reason, where tracefs cannot be used (not root, no CONFIG_TRACING).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import anyio
import pytest

from oomkit.config import Config
from oomkit.events import Event, Scope
from oomkit.ringbuffer import MappedCpu, MappingUnavailable, PageParser, ReadCpu
from oomkit.sources.kernel_page import KernelPageSource, KernelPageSourceConfig
from oomkit.tracefs import INSTANCE_PREFIX, Instance, Mount
from tests import kernel
from tests.sources_support import Running, running

pytestmark = [pytest.mark.kernel, pytest.mark.anyio]

MiB = 1 << 20
Make = Callable[..., kernel.Cgroup]
COMM = Path(sys.executable).name[:15]


def _skip_reason() -> str | None:
    return kernel.skip_reason("tracefs") or kernel.skip_reason("trace-oom-events")


@pytest.fixture
def tracefs() -> Iterator[Path]:
    """A tracefs mount to look at instances through (one superblock: every mount shows all)."""
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    mount = Mount.open()
    yield mount.path
    mount.close()


def ours(root: Path) -> set[str]:
    return {n for n in os.listdir(root / "instances") if n.startswith(f"{INSTANCE_PREFIX}{os.getpid()}-")}


async def kill_one(r: Running, cg: kernel.Cgroup) -> tuple[subprocess.Popen[bytes], Event, list[Event]]:
    """A kernel memcg OOM kill of a fresh hog; the hog, its kernel-kill, whatever else came."""
    hog = cg.hog(100, stdout=subprocess.DEVNULL)
    try:
        with anyio.fail_after(30):
            while True:
                ev = await r.next(timeout=30)
                if ev.kind == "kernel-kill" and ev.pid == hog.pid:
                    break
    finally:
        rc = await anyio.to_thread.run_sync(hog.wait)
    assert rc == -signal.SIGKILL
    return hog, ev, await r.quiet(0.5)


@pytest.mark.parametrize("mode", ["mmap", "read", "kmsg"])
async def test_a_kernel_oom_kill_is_one_kernel_kill_event(mode: str, memcg: Make, tracefs: Path) -> None:
    if mode == "mmap" and (reason := kernel.skip_reason("trace-ring-buffer-mmap")):
        pytest.skip(reason)
    cg = memcg(32 * MiB, tag=f"kpage-{mode}")
    src = KernelPageSource(KernelPageSourceConfig(mode=mode), Config())  # type: ignore[arg-type]
    before = ours(tracefs)
    async with running(src) as r:
        assert src.stats.mode == mode
        if mode != "kmsg":
            assert src.instance_name in ours(tracefs)
        hog, ev, rest = await kill_one(r, cg)
    assert (ev.comm, ev.scope) == (COMM, Scope("v1", cg.rel))
    assert ev.values["anon_rss_bytes"] > 16 * MiB and ev.values["oom_score_adj"] == 0.0
    mine = [e for e in [ev, *rest] if e.kind == "kernel-kill" and (e.pid == hog.pid or e.scope == ev.scope)]
    assert mine == [ev]
    assert src.stats.duplicates == 0 and src.stats.rejected == {}
    assert ours(tracefs) == before  # the instance is gone once the source stopped


async def test_a_storm_of_kills_each_seen_once(memcg: Make, tracefs: Path) -> None:
    cg = memcg(32 * MiB, tag="kpage-storm")
    src = KernelPageSource(KernelPageSourceConfig(), Config())  # type: ignore[arg-type]
    async with running(src) as r:
        hogs = [cg.hog(100, stdout=subprocess.DEVNULL) for _ in range(8)]
        codes = [await anyio.to_thread.run_sync(h.wait) for h in hogs]
        events = await r.quiet(2.0)
    assert codes == [-signal.SIGKILL] * len(hogs)
    pids = [e.pid for e in events if e.kind == "kernel-kill" and e.pid in {h.pid for h in hogs}]
    assert sorted(pids) == sorted(h.pid for h in hogs)
    assert src.stats.lost == 0


async def test_a_stale_instance_is_removed_at_start(tracefs: Path) -> None:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    stale = tracefs / "instances" / f"{INSTANCE_PREFIX}{p.pid}-0"
    stale.mkdir()
    try:
        src = KernelPageSource(KernelPageSourceConfig(mode="mmap"), Config())  # type: ignore[arg-type]
        async with running(src):
            assert not stale.exists()
    finally:
        if stale.exists():
            stale.rmdir()


async def test_without_tracefs_the_source_falls_back_to_kmsg_and_says_why(
    tmp_path: Path, memcg: Make, caplog: pytest.LogCaptureFixture
) -> None:
    if not os.access("/dev/kmsg", os.R_OK):
        pytest.skip("/dev/kmsg is not readable here")
    cg = memcg(32 * MiB, tag="kpage-fallback")
    src = KernelPageSource(KernelPageSourceConfig(tracefs=str(tmp_path)), Config())  # type: ignore[arg-type]
    with caplog.at_level(logging.WARNING, "oomkit.sources.kernel_page"):
        async with running(src) as r:
            _, ev, _ = await kill_one(r, cg)
    assert src.stats.mode == "kmsg" and ev.comm == COMM
    [why] = [rec.getMessage() for rec in caplog.records]
    assert f"{tmp_path}: not a tracefs mount" in why and "reading /dev/kmsg instead" in why


# --- the reader protocol, with trace_marker ---------------------------------------------------


def _markers(inst: Instance, texts: list[str]) -> None:
    fd = os.open(inst.path / "trace_marker", os.O_WRONLY)
    try:
        for t in texts:
            os.write(fd, t.encode())
    finally:
        os.close(fd)


@pytest.mark.parametrize("mapped", [True, False], ids=["mmap", "read"])
def test_every_record_is_read_once_across_sub_buffers(mapped: bool, tracefs: Path) -> None:
    inst = Instance(tracefs)
    readers: list[MappedCpu | ReadCpu] = []
    try:
        inst.write("buffer_size_kb", "64")
        inst.write("buffer_percent", "0")
        fmt = inst.event_format("ftrace", "print")
        parser = PageParser(inst.page_header(), inst.event_header())
        os.sched_setaffinity(0, {0})
        try:
            readers = [MappedCpu(inst.cpu_file(0), 0, parser) if mapped else ReadCpu(inst.cpu_file(0), 0, parser)]
        except MappingUnavailable as exc:
            pytest.skip(f"this kernel cannot map its ring buffer: {exc}")
        seen: list[int] = []
        lost = 0
        n = 0
        for burst in (1, 5, 90, 1, 300, 7):  # some within a sub-buffer, some across several
            _markers(inst, [f"m {i}" for i in range(n, n + burst)])
            n += burst
            for _ in range(3):  # a read after nothing new returns nothing
                batch = readers[0].read()
                assert batch.rejected == []
                lost += batch.lost
                seen += [int(str(fmt.decode(e.payload)["buf"]).split()[1]) for e in batch.events]
        assert lost == 0 and seen == list(range(n))
    finally:
        os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))
        for rd in readers:
            rd.close()
        inst.remove()
    assert not inst.path.exists()


def test_an_overrun_is_counted_not_duplicated(tracefs: Path) -> None:
    inst = Instance(tracefs)
    reader: MappedCpu | None = None
    try:
        inst.write("buffer_size_kb", "8")
        fmt = inst.event_format("ftrace", "print")
        os.sched_setaffinity(0, {0})
        try:
            reader = MappedCpu(inst.cpu_file(0), 0, PageParser(inst.page_header(), inst.event_header()))
        except MappingUnavailable as exc:
            pytest.skip(f"this kernel cannot map its ring buffer: {exc}")
        _markers(inst, [f"m {i}" for i in range(3000)])
        batch = reader.read()
        seen = [int(str(fmt.decode(e.payload)["buf"]).split()[1]) for e in batch.events]
        assert batch.lost > 0 and batch.rejected == []
        assert seen == sorted(set(seen)) and len(seen) + batch.lost == 3000
    finally:
        os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))
        if reader is not None:
            reader.close()
        inst.remove()
