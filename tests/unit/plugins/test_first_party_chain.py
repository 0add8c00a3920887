"""The first-party plugins, loaded from their entry points, decide together on fake trees."""

from __future__ import annotations

import threading
from pathlib import Path

import anyio
import msgspec
import pytest

import oomkit
from oomkit import Candidate, Decision, Engine, Event, Scope, hookimpl
from oomkit.proctable import TableStats
from oomkit.testing import (
    FakeCgroups, FakeProc, FakeSource, Harness, assert_outcome, assert_vetoed, assert_victim, harness,
)

from ...sources_support import until

pytestmark = pytest.mark.anyio

MiB = 1 << 20
FIRST_PARTY = [
    "burst", "candidates", "command", "confirm", "desktop", "freed", "growth", "jsonl", "kernel_badness", "killer",
    "pageout", "preference", "pressure", "protect", "reclaim", "trigger", "unit_killer", "units", "webhook",
]


async def test_entry_points_load_and_pick_the_biggest_unprotected_process(
    fake_proc: FakeProc, fake_cgroups: FakeCgroups, tmp_path: Path
) -> None:
    fake_proc.add_process(1, "init", ppid=0, rss=900 * MiB)
    fake_proc.add_process(10, "postgres", rss=800 * MiB)
    fake_proc.add_process(11, "leaky", rss=300 * MiB)
    fake_proc.add_process(12, "small", rss=10 * MiB, oom_score_adj=100)
    fake_cgroups.mkdir_v1("/jobs", limit=512 * MiB, pids=(11, 12))
    out = tmp_path / "d.jsonl"
    settings = {"plugins": {"protect": {"names": ["postgres"]}, "jsonl": {"path": str(out)}}}
    async with harness(proc=fake_proc, cgroups=fake_cgroups, config=settings) as h:
        # Installed third-party plugins load too (the example plugin is, unconfigured).
        loaded = h.engine.plugins.loaded
        assert sorted(n for n, where in loaded.items() if where.endswith(f"(oomkit {oomkit.__version__})")) == FIRST_PARTY
        system = await h.decide(kind="low-memory")
        memcg = await h.decide(scope="v1:/jobs")
        with anyio.fail_after(10):  # notifiers run in a task of their own
            while out.read_bytes().count(b"\n") < 2:
                await anyio.sleep(0.01)
    assert_victim(system, 12)  # adj 100 = 800 MiB of 8 GiB
    assert [(r.candidate.pid, r.vetoed) for r in system.ranking] == [(12, False), (11, False), (1, True), (10, True)]
    assert_vetoed(system, "postgres", by="protect", reason="matches protect.names 'postgres'")
    # adj 100 declares "small" expendable: it goes first even where it is only 51 MiB of
    # the kernel's points in a 512 MiB memcg, against leaky's 300 MiB.
    assert_victim(memcg, 12)
    assert memcg.ranking[0].tier == "expendable"
    assert_outcome(system, "dry-run")
    assert_outcome(memcg, "dry-run")
    lines = out.read_bytes().splitlines()
    assert [msgspec.json.decode(ln, type=Decision).id for ln in lines] == [system.id, memcg.id]


async def test_the_kernel_policy_picks_what_the_kernel_would(fake_proc: FakeProc, fake_cgroups: FakeCgroups) -> None:
    fake_proc.add_process(11, "leaky", rss=300 * MiB)
    fake_proc.add_process(12, "small", rss=10 * MiB, oom_score_adj=100)
    fake_proc.add_process(13, "postgres", rss=400 * MiB)
    fake_cgroups.mkdir_v1("/jobs", limit=512 * MiB, pids=(11, 12, 13))
    async with harness(proc=fake_proc, cgroups=fake_cgroups, config={"engine": {"policy": "kernel"}}) as h:
        d = await h.decide(scope="v1:/jobs")
    assert [r.candidate.pid for r in d.ranking] == [13, 11, 12]  # no tiers: memory and adj alone
    assert {r.tier for r in d.ranking} == {"normal"} and d.policy == "kernel"
    assert d.ranking[0].score == d.ranking[0].scores["kernel_badness"]


class _Watching(FakeSource):
    """A source that watches the system scope and one cgroup, as the memcg sources do."""

    def scopes(self) -> tuple[Scope, ...]:
        return (Scope(), Scope("v1", "/jobs"))


def _table_stats(h: Harness, scope: Scope) -> TableStats | None:
    plugin = h.engine.pm.get_plugin("candidates")
    found = plugin._tables.get(scope)
    return None if found is None else found[0].stats


async def test_warm_up_reads_every_watched_scope_before_the_first_event(
    fake_proc: FakeProc, fake_cgroups: FakeCgroups
) -> None:
    for pid in range(300, 320):
        fake_proc.add_process(pid, "worker", rss=(pid - 290) * MiB)
    fake_cgroups.mkdir_v1("/jobs", limit=512 * MiB, pids=(300, 301))
    async with harness(proc=fake_proc, cgroups=fake_cgroups, sources=[_Watching("memcg")]) as h:
        await until(lambda: h.engine.stats.warmed_up >= 2)
        system, jobs = _table_stats(h, Scope()), _table_stats(h, Scope("v1", "/jobs"))
        assert system is not None and jobs is not None
        assert (system.cold, jobs.cold) == (20, 2)
        assert_victim(await h.decide(kind="low-memory"), 319)
        assert_victim(await h.decide(scope="v1:/jobs"), 301)
        # The decisions found every process read already: nobody cold, nobody changed.
        assert (system.cold, system.unchanged, jobs.cold, jobs.unchanged) == (20, 20, 2, 2)


@pytest.mark.parametrize("on", [True, False])
async def test_warm_up_is_started_only_when_on(
    fake_proc: FakeProc, fake_cgroups: FakeCgroups, monkeypatch: pytest.MonkeyPatch, on: bool
) -> None:
    started: list[Engine] = []

    async def spy(self: Engine) -> None:
        started.append(self)

    monkeypatch.setattr(Engine, "_warm_up", spy)
    fake_proc.add_process(300, "worker", rss=10 * MiB)
    config = {"engine": {"warm_up": on}}
    async with harness(proc=fake_proc, cgroups=fake_cgroups, config=config, sources=[_Watching("memcg")]) as h:
        # The decision waits on hook threads: a task started with the engine has run by then.
        assert_victim(await h.decide(kind="low-memory"), 300)
        assert started == ([h.engine] if on else [])
        stats = _table_stats(h, Scope())
        assert stats is not None and (stats.cold, stats.unchanged) == (1, 0)  # the decision read it


async def test_a_warm_up_given_up_as_stuck_leaves_the_engine_running(
    fake_proc: FakeProc, caplog: pytest.LogCaptureFixture
) -> None:
    release = threading.Event()

    class Stuck:
        @hookimpl
        def oomkit_candidates(self, event: Event) -> list[Candidate]:
            if event.source == "engine":
                release.wait(60)  # past sync_hook_timeout_s: written off, its only thread stuck
            return []

    fake_proc.add_process(300, "worker", rss=10 * MiB)
    config = {"engine": {"hook_threads": 1, "sync_hook_timeout_s": 0.1}}
    try:
        async with harness(("stuck", Stuck()), proc=fake_proc, config=config, sources=[_Watching("memcg")]) as h:
            await until(lambda: "warm-up stopped" in caplog.text)
            assert h.engine.stats.warmed_up == 0
            release.set()
    finally:
        release.set()
