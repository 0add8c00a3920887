"""Engine.reload on fake trees: a good config changes a weight and keeps a takeover source
running (its memcg is never handed back), a bad one changes nothing, a changed source is
restarted, a new source that cannot start rolls everything back, and no event is lost."""

from __future__ import annotations

import fcntl
import os

from pathlib import Path
from typing import Any

import anyio
import pytest

from oomkit import ConfigError, Engine, PluginLoadError
from oomkit.config import Config, config_from_dict
from oomkit.engine import ReloadError
from oomkit.testing import FakeCgroups, FakeProc, FakeSource, paths_for

pytestmark = pytest.mark.anyio

CG = "/jobs/a"


@pytest.fixture
def memdir(fake_proc: FakeProc, fake_cgroups: FakeCgroups) -> Path:
    (fake_proc.root / "self" / "cgroup").write_text("4:memory:/daemon\n0::/\n")
    fake_cgroups.mkdir_v1("/daemon")
    fake_proc.add_process(4000, "hog", rss=300 << 20, memcg=CG)
    return fake_cgroups.mkdir_v1(CG, limit=64 << 20, usage=64 << 20, pids=(4000,))


def config(fake_proc: FakeProc, fake_cgroups: FakeCgroups, tmp_path: Path, **extra: Any) -> Config:
    paths = paths_for(fake_proc, fake_cgroups)
    raw: dict[str, Any] = {
        "paths": {"proc": paths.proc, "memory_v1": paths.memory_v1, "unified": paths.unified,
                  "run_dir": str(tmp_path / "run")},
        "sources": [{"kind": "memcg-oom", "name": "takeover", "cgroups": [CG], "poll_interval_s": 0.01}],
        "weights": {"kernel_badness": 1.0},
        "plugins": {"jsonl": {"path": str(tmp_path / "decisions.jsonl")}},
    }
    raw.update(extra)
    return config_from_dict(raw, str(tmp_path / "oomkit.toml"))


async def test_a_good_config_changes_a_weight_and_keeps_the_takeover(
    fake_proc: FakeProc, fake_cgroups: FakeCgroups, memdir: Path, tmp_path: Path
) -> None:
    fake = FakeSource("test")
    async with Engine(config(fake_proc, fake_cgroups, tmp_path), sources=[fake], dry_run=True) as engine:
        takeover = engine._configured["takeover"]
        assert FakeCgroups.written(memdir) == ["1"]
        before = await engine.decide(fake.event("oom"))
        line = await engine.reload(config(fake_proc, fake_cgroups, tmp_path, weights={"kernel_badness": 3.0}))
        assert line.startswith(f"reloaded {tmp_path / 'oomkit.toml'} (generation 2)") and "kept: takeover" in line
        after = await engine.decide(fake.event("oom"))
        assert engine.config.weights == {"kernel_badness": 3.0}
        # kernel_badness counted once, now three times; the other scorers are unchanged.
        first = before.ranking[0]
        again = next(r for r in after.ranking if r.candidate.pid == first.candidate.pid)
        assert again.score == pytest.approx(first.score + 2 * first.scores["kernel_badness"])
        assert engine._configured["takeover"] is takeover, "the running source was kept"
        assert FakeCgroups.written(memdir) == ["1"], "never handed back, never taken again"
        snap = engine.snapshot()
        assert snap.generation == 2 and [s.state for s in snap.taken_over] == ["taken-over"]
        FakeCgroups.set_oom_control(memdir, oom_kill_disable=1)  # what the kernel shows after the "1"
    # Handed back once, at the end, by the watchdog (the only writer).
    assert FakeCgroups.written(memdir) == ["0"]


@pytest.mark.parametrize(
    ("extra", "error", "message"),
    [
        ({"weights": {"nobody": 1.0}}, ConfigError, "[weights] names 'nobody', which is not a loaded scorer"),
        ({"plugins": {"disable": ["ghost"]}}, PluginLoadError, "cannot disable unknown plugin(s) 'ghost'"),
        ({"sources": [{"kind": "memcg-oom", "name": "takeover", "cgroups": ["/no/such"]}]}, ConfigError,
         "no such cgroup"),
    ],
)
async def test_a_bad_config_keeps_the_old_one_running(
    fake_proc: FakeProc, fake_cgroups: FakeCgroups, memdir: Path, tmp_path: Path,
    extra: dict[str, Any], error: type[Exception], message: str,
) -> None:
    old = config(fake_proc, fake_cgroups, tmp_path)
    async with Engine(old, dry_run=True) as engine:
        pm, takeover = engine.pm, engine._configured["takeover"]
        with pytest.raises(error) as info:
            await engine.reload(config(fake_proc, fake_cgroups, tmp_path, **extra))
        assert message in str(info.value) and "\n" not in str(info.value)
        assert engine.config is old and engine.pm is pm and engine._configured["takeover"] is takeover
        snap = engine.snapshot()
        assert snap.generation == 1 and snap.reload_failures == 1 and message in snap.last_reload_error
        assert FakeCgroups.written(memdir) == ["1"]


async def test_a_changed_source_is_restarted_with_its_new_settings(
    fake_proc: FakeProc, fake_cgroups: FakeCgroups, memdir: Path, tmp_path: Path
) -> None:
    async with Engine(config(fake_proc, fake_cgroups, tmp_path), dry_run=True) as engine:
        old = engine._configured["takeover"]
        changed = [{"kind": "memcg-oom", "name": "takeover", "cgroups": [CG], "poll_interval_s": 0.01, "deadline_s": 2.0}]
        line = await engine.reload(config(fake_proc, fake_cgroups, tmp_path, sources=changed))
        assert "restarted: takeover" in line
        new = engine._configured["takeover"]
        assert new is not old and engine.sources.count(new) == 1 and old not in engine.sources
        assert FakeCgroups.written(memdir)[0] == "1" and FakeCgroups.written(memdir)[-1] == "1"
        assert FakeCgroups.written(memdir).count("1") == 2, "released by the old source, taken by the new"


async def test_a_new_source_that_cannot_start_rolls_the_reload_back(
    fake_proc: FakeProc, fake_cgroups: FakeCgroups, memdir: Path, tmp_path: Path
) -> None:
    broken = fake_cgroups.mkdir_v1("/jobs/broken")
    # It builds, but cannot be taken over: another oomkit holds it.
    held = os.open(broken, os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(held, fcntl.LOCK_EX)
    sources = [{"kind": "memcg-oom", "name": "takeover", "cgroups": [CG], "poll_interval_s": 0.01},
               {"kind": "memcg-oom", "name": "second", "cgroups": ["/jobs/broken"]}]
    old = config(fake_proc, fake_cgroups, tmp_path)
    async with Engine(old, dry_run=True) as engine:
        with pytest.raises(ReloadError) as info:
            await engine.reload(config(fake_proc, fake_cgroups, tmp_path, sources=sources, weights={"kernel_badness": 2.0}))
        why = str(info.value)
        assert "cgroup '/jobs/broken': another oomkit (pid" in why and "the old configuration runs again" in why
        assert engine.config is old and list(engine._configured) == ["takeover"]
        assert FakeCgroups.written(memdir) == ["1"]
    os.close(held)


async def test_no_event_is_lost_across_a_reload(
    fake_proc: FakeProc, fake_cgroups: FakeCgroups, memdir: Path, tmp_path: Path
) -> None:
    fake = FakeSource("test")
    cfg = config(fake_proc, fake_cgroups, tmp_path, engine={"cooldown_s": 0})
    async with Engine(cfg, sources=[fake], dry_run=True) as engine:
        scopes = [f"/s{i}" for i in range(50)]
        from oomkit import Scope

        async with anyio.create_task_group() as tg:
            for i, path in enumerate(scopes):
                await fake.inject(fake.event("oom", Scope("v1", path)))
                if i == 25:
                    tg.start_soon(engine.reload, config(fake_proc, fake_cgroups, tmp_path, weights={"kernel_badness": 2.0},
                                                        engine={"cooldown_s": 0}))
        with anyio.fail_after(30):
            while engine.stats.decisions < len(scopes):
                await anyio.sleep(0.01)
        assert engine.snapshot().generation == 2
        assert sorted(d.event.scope.path for d in engine.recent if d.event.source == "test") == sorted(scopes)
        assert engine.stats.events == len(scopes) and engine.stats.coalesced == 0


async def test_engine_state_is_read_as_copies_and_snapshots(fake_proc: FakeProc) -> None:
    from oomkit.testing import config_for

    fake = FakeSource("test")
    async with Engine(config_for(fake_proc), sources=[fake], dry_run=True) as engine:
        await engine.decide(fake.event("oom"))
        stats = engine.stats
        stats.decisions = 99
        stats.errors_by_plugin["x"] = 1
        assert engine.stats.decisions == 1 and "x" not in engine.stats.errors_by_plugin
        assert isinstance(engine.recent, tuple)
        snap = engine.snapshot()
        with pytest.raises(AttributeError):
            snap.generation = 5  # type: ignore[misc]
        await engine.decide(fake.event("oom"))
        assert snap.counters.decisions == 1 and engine.snapshot().counters.decisions == 2
