"""The v2 memory.events source on fake trees (inotify works on tmp_path files)."""

from __future__ import annotations

import shutil
from pathlib import Path

import anyio
import pytest

from oomkit import Engine
from oomkit.events import Scope
from oomkit.sources import build_source
from oomkit.sources.memory_events import MemoryEventsSource, MemoryEventsSourceConfig
from oomkit.testing import FakeCgroups, FakeProc, config_for
from tests.sources_support import running

pytestmark = pytest.mark.anyio

COUNTERS = ("low", "high", "max", "oom", "oom_kill", "oom_group_kill")


def source(fake_proc: FakeProc, fake_cgroups: FakeCgroups, **kw: object) -> MemoryEventsSource:
    spec = MemoryEventsSourceConfig(**kw)  # type: ignore[arg-type]
    src = build_source(spec, config_for(fake_proc, fake_cgroups, sources=(spec,)))
    assert isinstance(src, MemoryEventsSource)
    return src


def write_events(d: Path, name: str = "memory.events", **counts: int) -> None:
    (d / name).write_text("".join(f"{k} {counts.get(k, 0)}\n" for k in COUNTERS))


async def test_reports_changed_counters_and_kernel_kills(fake_proc: FakeProc, fake_cgroups: FakeCgroups) -> None:
    d = fake_cgroups.mkdir_v2("/job")
    write_events(d, high=5)
    src = source(fake_proc, fake_cgroups, cgroups=("/job",))
    async with running(src) as run:
        write_events(d, high=7, max=1)
        ev = await run.next()
        assert (ev.kind, ev.scope) == ("memory-events", Scope(tree="v2", path="/job"))
        assert ev.values == {"high_delta": 2, "high": 7, "max_delta": 1, "max": 1}
        write_events(d, high=7, max=1, oom=1, oom_kill=2)
        changed = await run.next()
        assert changed.values["oom_kill_delta"] == 2 and changed.values["oom_delta"] == 1
        kill = await run.next()
        assert kill.kind == "kernel-kill"
        assert kill.values == {"oom_kill_delta": 2, "oom_kill": 2, "oom_delta": 1, "oom": 1}


async def test_local_watches_memory_events_local(fake_proc: FakeProc, fake_cgroups: FakeCgroups) -> None:
    d = fake_cgroups.mkdir_v2("/job")
    src = source(fake_proc, fake_cgroups, cgroups=("/job",), local=True)
    async with running(src) as run:
        write_events(d, oom_kill=1)  # the hierarchical file: not watched
        assert await run.quiet(0.2) == []
        write_events(d, "memory.events.local", oom_group_kill=1)
        assert (await run.next()).values == {"oom_group_kill_delta": 1, "oom_group_kill": 1}


async def test_follows_cgroups_and_ends_removed_ones(fake_proc: FakeProc, fake_cgroups: FakeCgroups) -> None:
    fake_cgroups.mkdir_v2("/work")
    src = source(fake_proc, fake_cgroups, cgroups=("/work/*",))
    async with running(src) as run:
        a = fake_cgroups.mkdir_v2("/work/a")
        b = fake_cgroups.mkdir_v2("/work/b")
        await run.quiet(0.2)
        assert [s.path for s in src.watching] == ["/work/a", "/work/b"]
        shutil.rmtree(a)
        await run.quiet(0.2)
        assert [s.path for s in src.watching] == ["/work/b"]
        write_events(b, low=1)
        assert (await run.next()).scope.path == "/work/b"


async def test_engine_reports_kernel_kills_to_notifiers(fake_proc: FakeProc, fake_cgroups: FakeCgroups) -> None:
    d = fake_cgroups.mkdir_v2("/job")
    spec = MemoryEventsSourceConfig(cgroups=("/job",))
    async with Engine(config_for(fake_proc, fake_cgroups, sources=(spec,)), autoload=False) as engine:
        write_events(d, oom_kill=1)
        for _ in range(200):
            if engine.recent:
                break
            await anyio.sleep(0.01)
    [decision] = engine.recent
    assert decision.outcome == "observed" and decision.event.kind == "kernel-kill"
    assert engine.stats.events == 2  # memory-events (ignored by default) and kernel-kill
