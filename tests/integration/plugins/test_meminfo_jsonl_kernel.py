"""The meminfo source on the real /proc, and the whole first-party chain writing JSON lines."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import anyio
import msgspec
import pytest

from oomkit import Candidate, Decision, Engine, Event, hookimpl
from oomkit.config import Config, config_from_dict
from oomkit.procfs import read_meminfo
from oomkit.sources.meminfo import MeminfoSource, MeminfoSourceConfig
from ... import kernel

MiB = 1 << 20

pytestmark = [pytest.mark.kernel, pytest.mark.anyio]


def always_low() -> MeminfoSourceConfig:
    """Thresholds above what the machine has, so that the real meminfo reads as low."""
    info = read_meminfo("/proc")
    return MeminfoSourceConfig(
        mem_available=info["MemTotal"] + 4096,
        swap_free=info.get("SwapTotal", 0) + 4096,
        interval_min_s=0.01,
        interval_max_s=0.05,
    )


async def test_meminfo_source_fires_on_the_real_proc() -> None:
    src = MeminfoSource(always_low(), Config())
    got: list[Event] = []

    async def emit(event: Event) -> None:
        got.append(event)
        if len(got) == 2:
            tg.cancel_scope.cancel()

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            await tg.start(src.run, emit)
    values = got[0].values
    assert got[0].kind == "low-memory" and got[0].scope.tree == "system"
    assert 0 < values["mem_available_bytes"] < values["mem_total_bytes"] < values["mem_threshold_bytes"]
    assert src.still_holds(got[0])
    assert not MeminfoSource(MeminfoSourceConfig(), Config()).still_holds(got[0])  # 10 %: not low here


async def test_the_poller_thread_sees_real_memory_fall_under_the_threshold(
    memcg: Callable[..., kernel.Cgroup],
) -> None:
    # Starts above the threshold, so the event can only come from the poller thread, and the
    # hog (inside a memcg with a hard limit) is what pushes MemAvailable under it.  The hog is
    # 16 times the distance: right after heavy memory churn this VM's MemAvailable falls by
    # much less than what a process touches (seen in the threshold benchmark).
    info = read_meminfo("/proc")
    spec = MeminfoSourceConfig(
        mem_available=info["MemAvailable"] - 64 * MiB,
        swap_free=info.get("SwapTotal", 0) + 4096,
        interval_min_s=0.01,
        interval_max_s=0.05,
    )
    src = MeminfoSource(spec, Config())
    assert not src.read().low
    got: list[Event] = []

    async def emit(event: Event) -> None:
        got.append(event)
        tg.cancel_scope.cancel()

    cg = memcg(limit=1280 * MiB)
    hogs: list[subprocess.Popen[bytes]] = []
    try:
        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                await tg.start(src.run, emit)
                spawned = time.monotonic_ns()
                hogs.append(cg.hog(1024, chunk_mib=8, stdout=subprocess.DEVNULL))
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()
    assert got[0].values["mem_available_bytes"] < got[0].values["mem_threshold_bytes"]
    assert got[0].monotonic_ns > spawned  # seen after the hog started, so by the poller thread


async def test_the_first_party_chain_writes_each_decision_as_a_json_line(tmp_path: Path) -> None:
    out = tmp_path / "decisions.jsonl"
    spec = always_low()
    cfg = config_from_dict(
        {
            "engine": {"dry_run": True, "cooldown_s": 60},
            "sources": [msgspec.to_builtins(spec)],
            "plugins": {"jsonl": {"path": str(out)}},
        },
        "<test>",
    )
    # The sure victim (dry-run: it is never signalled): a machine running other work (another
    # test's hog with adj 1000) could outrank it, so a veto leaves nobody else killable.
    victim = subprocess.Popen(["sleep", "60"])

    class OnlyTheVictim:
        @hookimpl
        def oomkit_veto(self, candidates: Sequence[Candidate]) -> dict[int, str]:
            return {c.pid: "not this test's process" for c in candidates if c.pid != victim.pid}

    try:
        Path(f"/proc/{victim.pid}/oom_score_adj").write_text("1000")
        async with Engine(cfg, plugins=[OnlyTheVictim()], autoload=True) as engine:
            with anyio.fail_after(10):
                while not out.exists() or not out.read_bytes():
                    await anyio.sleep(0.01)
    finally:
        victim.kill()
        victim.wait()
    decision = msgspec.json.decode(out.read_bytes().splitlines()[0], type=Decision)
    assert (decision.outcome, decision.event.source, decision.event.kind) == ("dry-run", "meminfo", "low-memory")
    assert decision.victim is not None and decision.victim.pid == victim.pid
    assert decision.ranking[0].candidate == decision.victim
    assert {"kernel_badness", "growth", "freed", "preference"} <= decision.ranking[0].scores.keys()
    assert decision.ranking[0].tier == "expendable"  # adj 1000: it declared itself so
    assert engine.stats.decisions >= 1
