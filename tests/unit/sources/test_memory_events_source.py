"""The v2 memory.events source on fake trees (inotify works on tmp_path files)."""

from __future__ import annotations

from pathlib import Path

import pytest

from oomkit import Engine
from oomkit.events import Scope
from oomkit.inotify import IN_DELETE_SELF, IN_MODIFY, Inotify
from oomkit.sources import build_source
from oomkit.sources.memory_events import MemoryEventsSource, MemoryEventsSourceConfig
from oomkit.testing import FakeCgroups, FakeProc, config_for
from tests.sources_support import eventually, running

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
        fake_cgroups.mkdir_v2("/work/a")
        b = fake_cgroups.mkdir_v2("/work/b")
        await eventually(lambda: [s.path for s in src.watching] == ["/work/a", "/work/b"], "both watched")
        # As on the kernel, the files of a removed cgroup get no event: only its directory's
        # removal tells the source.
        fake_cgroups.rmdir_v2("/work/a")
        await eventually(lambda: [s.path for s in src.watching] == ["/work/b"], "the removed one dropped")
        write_events(b, low=1)
        assert (await run.next()).scope.path == "/work/b"


async def test_engine_reports_kernel_kills_to_notifiers(fake_proc: FakeProc, fake_cgroups: FakeCgroups) -> None:
    d = fake_cgroups.mkdir_v2("/job")
    spec = MemoryEventsSourceConfig(cgroups=("/job",))
    async with Engine(config_for(fake_proc, fake_cgroups, sources=(spec,)), autoload=False) as engine:
        write_events(d, oom_kill=1)
        await eventually(lambda: bool(engine.recent), "a decision")
    [decision] = engine.recent
    assert decision.outcome == "observed" and decision.event.kind == "kernel-kill"
    assert engine.stats.events == 2  # memory-events (ignored by default) and kernel-kill


async def test_the_root_and_cgroups_without_the_memory_controller_are_refused_with_the_reason(
    fake_proc: FakeProc, fake_cgroups: FakeCgroups, caplog: pytest.LogCaptureFixture
) -> None:
    # As the guest kernel showed: the root keeps no memory.events, nor does a cgroup whose
    # parent does not enable the memory controller for it (this machine's v2 tree).
    fake_cgroups.mkdir_v2("/bare", memory=False)
    job = fake_cgroups.mkdir_v2("/job")
    src = source(fake_proc, fake_cgroups, cgroups=("/", "/bare", "/job"))
    async with running(src) as run:
        assert src.watching == [Scope(tree="v2", path="/job")]
        write_events(job, oom=1)
        assert (await run.next()).values == {"oom_delta": 1, "oom": 1}
    assert src.faults == 2
    messages = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("cannot watch v2:/: " in m and "the root cgroup has no memory.events" in m for m in messages)
    assert any(
        "cannot watch v2:/bare: " in m and "the memory controller is not enabled for this cgroup" in m
        and str(fake_cgroups.unified / "cgroup.subtree_control") in m
        for m in messages
    )


def test_the_fake_v2_tree_has_the_files_the_kernel_makes(fake_cgroups: FakeCgroups) -> None:
    root = fake_cgroups.unified
    assert not (root / "memory.events").exists() and not (root / "cgroup.events").exists()
    assert (root / "memory.pressure").exists() and (root / "cgroup.procs").exists()
    bare = fake_cgroups.mkdir_v2("/bare", memory=False)
    assert not (bare / "memory.events").exists() and (bare / "memory.pressure").exists()
    job = fake_cgroups.mkdir_v2("/job")
    assert (job / "memory.events").read_text().split()[::2] == list(COUNTERS)


def test_a_removed_fake_cgroups_files_get_no_inotify_event(fake_cgroups: FakeCgroups) -> None:
    d = fake_cgroups.mkdir_v2("/job")
    ino = Inotify()
    try:
        ino.add_watch(d / "memory.events", IN_MODIFY | IN_DELETE_SELF)
        fake_cgroups.rmdir_v2("/job")
        assert not d.exists()
        assert ino.read() == []  # no IN_DELETE_SELF, no IN_IGNORED: as on kernfs
    finally:
        ino.close()
