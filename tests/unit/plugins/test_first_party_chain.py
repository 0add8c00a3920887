"""The five first-party plugins, loaded from their entry points, decide together on fake trees."""

from __future__ import annotations

from pathlib import Path

import anyio
import msgspec
import pytest

from oomkit import Decision, Engine, Event, Scope
from oomkit.testing import FakeCgroups, FakeProc

from .support import config

pytestmark = pytest.mark.anyio

MiB = 1 << 20


async def test_entry_points_load_and_pick_the_biggest_unprotected_process(
    fake_proc: FakeProc, fake_cgroups: FakeCgroups, tmp_path: Path
) -> None:
    fake_proc.add_process(1, "init", ppid=0, rss=900 * MiB)
    fake_proc.add_process(10, "postgres", rss=800 * MiB)
    fake_proc.add_process(11, "leaky", rss=300 * MiB)
    fake_proc.add_process(12, "small", rss=10 * MiB, oom_score_adj=100)
    fake_cgroups.mkdir_v1("/jobs", limit=512 * MiB, pids=(11, 12))
    out = tmp_path / "d.jsonl"
    cfg = config(fake_proc, fake_cgroups, protect={"names": ["postgres"]}, jsonl={"path": str(out)})
    engine = Engine(cfg, autoload=True, dry_run=True)
    assert sorted(engine.plugins.loaded) == ["candidates", "jsonl", "kernel_badness", "killer", "pressure", "protect"]
    async with engine:
        system = await engine.decide(Event(source="t", kind="low-memory"))
        memcg = await engine.decide(Event(source="t", kind="oom", scope=Scope("v1", "/jobs")))
        with anyio.fail_after(10):  # notifiers run in a task of their own
            while out.read_bytes().count(b"\n") < 2:
                await anyio.sleep(0.01)
    assert system.victim is not None and system.victim.pid == 12  # adj 100 = 800 MiB of 8 GiB
    assert [(r.candidate.pid, r.vetoed) for r in system.ranking] == [(12, False), (11, False), (1, True), (10, True)]
    assert memcg.victim is not None and memcg.victim.pid == 11  # adj 100 is only 51 MiB of a 512 MiB memcg
    assert (system.outcome, memcg.outcome) == ("dry-run", "dry-run")
    lines = out.read_bytes().splitlines()
    assert [msgspec.json.decode(ln, type=Decision).id for ln in lines] == [system.id, memcg.id]
