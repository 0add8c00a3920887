"""The v2 brake (``memory-high``) on fake trees: the test plays the kernel.

The fake ``memory.high`` holds whatever was written last (the watchdog writes it whole);
``memory.current``, ``memory.max`` and the page cache are set by the test; a ``high`` rise
is a rewrite of the fake ``memory.events``, which inotify reports as the kernel's
notification would.  A fake file cannot be polled for ``EPOLLPRI``, so tests that need the
watchdog to see an episode by itself give it a short ``rescan_s``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import anyio
import msgspec
import pytest

from oomkit.config import Config, ConfigError, PathsConfig
from oomkit.events import Scope
from oomkit.journal import Journal
from oomkit.sources.memory_high import PAGE, MemoryHighSource, MemoryHighSourceConfig, brake_point
from oomkit.testing import FakeCgroups, FakeProc, paths_for
from oomkit.watchdog import STUCK_DIP, stuck
from tests.sources_support import Collected, collecting, until

MiB = 1 << 20
CG = "/pods/a"
SCOPE = Scope("v2", CG)
LIMIT = 64 * MiB
BRAKE = LIMIT - 16 * MiB


@pytest.fixture
def paths(tmp_path: Path, fake_proc: FakeProc, fake_cgroups: FakeCgroups) -> PathsConfig:
    (fake_proc.root / "self" / "cgroup").write_text("4:memory:/daemon\n0::/daemon\n")
    fake_cgroups.mkdir_v2("/daemon")
    fake_cgroups.mkdir_v2("/pods")
    d = fake_cgroups.mkdir_v2(CG)
    FakeCgroups.set_memory(d, max=LIMIT, current=8 * MiB)
    return msgspec.structs.replace(paths_for(fake_proc, fake_cgroups), run_dir=str(tmp_path / "run"))


@pytest.fixture
def cgdir(fake_cgroups: FakeCgroups) -> Path:
    return fake_cgroups.unified / CG.lstrip("/")


def source_for(paths: PathsConfig, **kw: object) -> MemoryHighSource:
    kw.setdefault("cgroups", (CG,))
    kw.setdefault("poll_interval_s", 0.01)
    kw.setdefault("deadline_s", 0.3)
    kw.setdefault("idle_poll_s", 0.05)
    return MemoryHighSource(MemoryHighSourceConfig(**kw), Config(paths=paths))  # type: ignore[arg-type]


def high(d: Path) -> str:
    return (d / "memory.high").read_text().strip()


def journal(paths: PathsConfig) -> list[str]:
    return Journal(paths.run_dir).names()


def brake(d: Path, current: int = BRAKE + 2 * MiB) -> None:
    """The kernel: usage over the brake, ``high`` raised."""
    FakeCgroups.set_memory(d, current=current)
    FakeCgroups.bump_events(d, high=3)


# --- the brake point ----------------------------------------------------------------------


def test_the_brake_point_is_a_margin_under_the_limit_in_whole_pages() -> None:
    assert brake_point(LIMIT, "16M") == BRAKE
    assert brake_point(100 * MiB, "10%") == 90 * MiB
    assert brake_point(LIMIT + 100, 4096) == LIMIT - 4096  # rounded down to a page
    with pytest.raises(ValueError, match="margin 64M is not smaller than its memory.max"):
        brake_point(LIMIT, "64M")


@pytest.mark.parametrize(
    ("margin", "message"),
    [(100, "at least one page"), ("0%", "above 0 and below 100"), ("100%", "above 0 and below 100"), ("x", "expected a size")],
)
def test_a_bad_margin_is_refused_at_decode(margin: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        MemoryHighSourceConfig(cgroups=(CG,), margin=margin)  # type: ignore[arg-type]


def test_a_cgroup_without_memory_max_is_refused_in_one_line(paths: PathsConfig, cgdir: Path) -> None:
    FakeCgroups.set_memory(cgdir, max="max")
    with pytest.raises(ConfigError) as info:
        source_for(paths)
    assert str(info.value) == f"cgroup {CG!r}: its memory.max is 'max': there is no limit to brake under"


def test_a_margin_larger_than_the_limit_is_refused_in_one_line(paths: PathsConfig) -> None:
    with pytest.raises(ConfigError) as info:
        source_for(paths, margin="80M")
    assert str(info.value) == f"cgroup {CG!r}: margin 80M is not smaller than its memory.max {LIMIT}: nothing left to brake at"


def test_oomkits_own_cgroup_and_a_cgroup_without_the_controller_are_refused(
    paths: PathsConfig, fake_cgroups: FakeCgroups
) -> None:
    FakeCgroups.set_memory(fake_cgroups.unified / "daemon", max=LIMIT)
    with pytest.raises(ConfigError, match="oomkit runs in it; a brake there would throttle oomkit too"):
        source_for(paths, cgroups=("/daemon",))
    fake_cgroups.mkdir_v2("/bare", memory=False)
    with pytest.raises(ConfigError, match="no memory.max .*not a v2 cgroup with the memory controller enabled"):
        source_for(paths, cgroups=("/bare",))
    with pytest.raises(ConfigError, match="no such cgroup"):
        source_for(paths, cgroups=("/nope",))


# --- braking ------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_brakes_journalled_first_reports_the_episode_and_restores(paths: PathsConfig, cgdir: Path) -> None:
    source = source_for(paths, deadline_s=30)
    async with collecting(source) as run:
        assert high(cgdir) == str(BRAKE)
        (name,) = journal(paths)
        entry = Journal(paths.run_dir).read(name)
        assert (entry.tree, entry.path, entry.original, entry.written) == ("v2", CG, "max", str(BRAKE))
        assert [s.state for s in source.status().scopes] == ["braked"]
        assert source.scopes() == [SCOPE]
        await anyio.sleep(0.1)
        assert run.events == []  # under the brake: nothing to say
        brake(cgdir)
        await until(lambda: bool(run.kinds("oom")))
        ev = run.kinds("oom")[0]
        assert ev.scope == SCOPE and ev.values["braked"] == 1
        assert ev.values["usage_bytes"] == BRAKE + 2 * MiB and ev.values["high_bytes"] == BRAKE
        assert ev.values["limit_bytes"] == LIMIT and ev.values["high_total"] == 3
        assert source.still_holds(ev)
        FakeCgroups.set_memory(cgdir, current=4 * MiB)  # the engine's kill
        assert not source.still_holds(ev)
        await until(lambda: not source._held[SCOPE].episode)
        assert source.counters() == {} and source.status().counters["episodes"] == 1
    assert high(cgdir) == "max"  # the watchdog's restore
    assert journal(paths) == []
    assert source.protected_pids() == ()


@pytest.mark.anyio
async def test_a_cgroup_stuck_just_under_its_brake_still_holds_at_the_recheck(paths: PathsConfig, cgdir: Path) -> None:
    # The guest's numbers: reclaim took the last of the page cache and left usage 112 KiB
    # under memory.high, the hog still stuck.
    source = source_for(paths, deadline_s=30)
    async with collecting(source) as run:
        brake(cgdir)
        await until(lambda: bool(run.kinds("oom")))
        ev = run.kinds("oom")[0]
        FakeCgroups.set_memory(cgdir, current=BRAKE - 112 * 1024, file_lru=4096)
        assert source.still_holds(ev)
        FakeCgroups.set_memory(cgdir, current=BRAKE - STUCK_DIP, file_lru=0)
        assert source.still_holds(ev)
        FakeCgroups.set_memory(cgdir, current=BRAKE - 512 * 1024, file_lru=16 * MiB)
        assert not source.still_holds(ev)  # page cache the kernel trims: not stuck
        FakeCgroups.set_memory(cgdir, current=BRAKE - STUCK_DIP - PAGE, file_lru=0)
        assert not source.still_holds(ev)  # further under than reclaim dips: relieved


@pytest.mark.anyio
async def test_reclaims_dips_under_the_brake_do_not_end_the_episode(paths: PathsConfig, cgdir: Path) -> None:
    # An episode ended by a dip would start again at the next look over memory.high: a second
    # event for the same stuck cgroup, and its deadline counted from the new start.
    source = source_for(paths, deadline_s=30)
    async with collecting(source) as run:
        brake(cgdir)
        await until(lambda: bool(run.kinds("oom")))
        since = source._held[SCOPE].since
        for _ in range(3):
            FakeCgroups.set_memory(cgdir, current=BRAKE - 112 * 1024, file_lru=4096)
            await anyio.sleep(0.1)  # ten looks at the poll interval
            assert source._held[SCOPE].episode
            brake(cgdir)
            await anyio.sleep(0.1)
        assert len(run.kinds("oom")) == 1 and source.status().counters["episodes"] == 1
        assert source._held[SCOPE].since == since
        FakeCgroups.set_memory(cgdir, current=BRAKE - STUCK_DIP - PAGE, file_lru=0)
        await until(lambda: not source._held[SCOPE].episode)  # further under: relieved


def test_stuck_starts_at_memory_high_and_holds_through_a_dip() -> None:
    slack = 16 * MiB
    assert stuck(BRAKE, BRAKE, 0, slack) and not stuck(BRAKE, BRAKE - PAGE, 0, slack)
    assert stuck(BRAKE, BRAKE - STUCK_DIP, 0, slack, held=True)
    assert not stuck(BRAKE, BRAKE - STUCK_DIP - PAGE, 0, slack, held=True)
    # A slack smaller than the dip bounds it: never further under than the brake's margin.
    assert not stuck(BRAKE, BRAKE - 2 * PAGE, 0, PAGE, held=True)
    assert not stuck(BRAKE, BRAKE, 40 * MiB, slack, held=True)  # page cache: not stuck
    assert not stuck(-1, BRAKE, 0, slack, held=True)  # no brake in force


@pytest.mark.anyio
async def test_a_cgroup_full_of_page_cache_is_not_stuck(paths: PathsConfig, cgdir: Path) -> None:
    async with collecting(source_for(paths, deadline_s=0.2, rescan_s=0.02)) as run:
        FakeCgroups.set_memory(cgdir, file_lru=40 * MiB)
        brake(cgdir)
        await anyio.sleep(0.5)  # past the deadline: nobody released anything either
        assert run.kinds("oom") == [] and high(cgdir) == str(BRAKE)
        FakeCgroups.set_memory(cgdir, file_lru=1 * MiB)  # the cache is gone, the anon stays
        FakeCgroups.bump_events(cgdir, high=1)
        await until(lambda: bool(run.kinds("oom")))


@pytest.mark.anyio
async def test_the_watchdog_releases_at_the_deadline_and_the_brake_comes_back_once_under(
    paths: PathsConfig, cgdir: Path
) -> None:
    source = source_for(paths, deadline_s=0.2, rescan_s=0.02)
    async with collecting(source) as run:
        t0 = time.monotonic()
        brake(cgdir)
        await until(lambda: high(cgdir) == "max")
        assert time.monotonic() - t0 >= 0.2
        await until(lambda: source.handbacks == 1)
        assert [s.state for s in source.status().scopes] == ["handed-back"]
        oom = run.kinds("oom")[0]
        assert not source.still_holds(oom)  # the kernel decides now
        FakeCgroups.set_memory(cgdir, current=LIMIT)  # at memory.max: the kernel's killer
        await anyio.sleep(0.1)
        assert high(cgdir) == "max"  # not braked again while usage is over
        FakeCgroups.set_memory(cgdir, current=4 * MiB)
        FakeCgroups.bump_events(cgdir, oom=1, oom_kill=1)
        await until(lambda: high(cgdir) == str(BRAKE))
        await until(lambda: bool(run.kinds("kernel-kill")))
        assert run.kinds("kernel-kill")[0].values == {"oom_kill_delta": 1, "oom_kill": 1}
        assert [s.state for s in source.status().scopes] == ["braked"]
        assert len(journal(paths)) == 1


@pytest.mark.anyio
async def test_the_deadline_holds_while_the_daemon_is_blocked(paths: PathsConfig, cgdir: Path) -> None:
    async with collecting(source_for(paths, deadline_s=0.2, rescan_s=0.02)) as run:
        brake(cgdir)
        await until(lambda: bool(run.kinds("oom")))
        t0 = time.monotonic()
        while high(cgdir) != "max":  # no await: nothing of the source runs
            assert time.monotonic() - t0 < 10
            time.sleep(0.01)


@pytest.mark.anyio
async def test_hand_back_releases_the_brake_now(paths: PathsConfig, cgdir: Path) -> None:
    source = source_for(paths, deadline_s=30, rescan_s=0.02)
    async with collecting(source) as run:
        brake(cgdir)
        await until(lambda: bool(run.kinds("oom")))
        assert source.hand_back(run.kinds("oom")[0])
        await until(lambda: high(cgdir) == "max")
        await until(lambda: source.handbacks == 1)


@pytest.mark.anyio
async def test_an_operators_memory_high_is_kept_and_followed(paths: PathsConfig, cgdir: Path) -> None:
    source = source_for(paths, deadline_s=0.2, rescan_s=0.02)
    async with collecting(source) as run:
        assert high(cgdir) == str(BRAKE)
        theirs = 32 * MiB
        FakeCgroups.set_memory(cgdir, high=theirs)
        FakeCgroups.bump_events(cgdir, low=1)
        await until(lambda: source._held[SCOPE].state == "theirs")
        await until(lambda: journal(paths) == [])  # nothing of ours to restore
        assert source.status().scopes[0].detail.endswith(f"memory.high {theirs} is someone else's; followed")
        # Stuck at their value: the engine still decides there, and nobody releases it.
        FakeCgroups.set_memory(cgdir, current=theirs + MiB)
        FakeCgroups.bump_events(cgdir, high=1)
        await until(lambda: bool(run.kinds("oom")))
        assert run.kinds("oom")[0].values["high_bytes"] == theirs
        assert source.still_holds(run.kinds("oom")[0])
        await anyio.sleep(0.4)
        assert high(cgdir) == str(theirs)
        assert not source.hand_back(run.kinds("oom")[0])
    assert high(cgdir) == str(theirs)


@pytest.mark.anyio
async def test_a_memory_high_already_under_the_brake_point_is_followed_not_written(
    paths: PathsConfig, cgdir: Path
) -> None:
    FakeCgroups.set_memory(cgdir, high=20 * MiB)
    source = source_for(paths)
    async with collecting(source):
        assert high(cgdir) == str(20 * MiB) and journal(paths) == []
        assert source.status().scopes[0].state == "observed"
    assert high(cgdir) == str(20 * MiB)


@pytest.mark.anyio
async def test_an_original_above_the_brake_point_is_put_back(paths: PathsConfig, cgdir: Path) -> None:
    FakeCgroups.set_memory(cgdir, high=60 * MiB)
    async with collecting(source_for(paths)):
        assert high(cgdir) == str(BRAKE)
    assert high(cgdir) == str(60 * MiB)


@pytest.mark.anyio
async def test_a_cgroup_that_vanishes_while_braked_waits_and_is_braked_again(
    paths: PathsConfig, fake_cgroups: FakeCgroups, cgdir: Path
) -> None:
    source = source_for(paths, deadline_s=5)
    async with collecting(source) as run:
        brake(cgdir)
        await until(lambda: bool(run.kinds("oom")))
        fake_cgroups.rmdir_v2(CG)
        await until(lambda: [s.state for s in source.status().scopes] == ["missing"])
        await until(lambda: journal(paths) == [])
        assert not source.still_holds(run.kinds("oom")[0])
        d = fake_cgroups.mkdir_v2(CG)
        FakeCgroups.set_memory(d, max=LIMIT)
        await until(lambda: high(d) == str(BRAKE))
        await until(lambda: [s.state for s in source.status().scopes] == ["braked"])
    assert high(d) == "max"
    assert source.faults == 0


@pytest.mark.anyio
async def test_globs_brake_matches_as_they_come_and_retry_one_without_a_limit(
    paths: PathsConfig, fake_cgroups: FakeCgroups
) -> None:
    source = source_for(paths, cgroups=("/pods/*",), rescan_s=0.05)
    async with collecting(source):
        assert high(fake_cgroups.unified / "pods" / "a") == str(BRAKE)
        b = fake_cgroups.mkdir_v2("/pods/b")  # made first, its limit set after (a runtime's order)
        await anyio.sleep(0.1)
        FakeCgroups.set_memory(b, max=128 * MiB)
        await until(lambda: high(b) == str(112 * MiB))
        assert sorted(s.path for s in source.scopes()) == ["/pods/a", "/pods/b"]
    assert high(b) == "max"


@pytest.mark.anyio
async def test_a_second_oomkit_cannot_brake_a_held_cgroup(paths: PathsConfig, cgdir: Path) -> None:
    async with collecting(source_for(paths)):
        other = source_for(paths)
        with pytest.raises(ConfigError, match="another oomkit .* holds it"):
            await other.run(Collected().emit)
    assert high(cgdir) == "max"


@pytest.mark.anyio
async def test_a_dead_watchdog_is_replaced_and_the_brake_put_back(paths: PathsConfig, cgdir: Path) -> None:
    source = source_for(paths)
    async with collecting(source):
        dog = source.protected_pids()[0]
        os.kill(dog, 9)
        await until(lambda: source.restarts == 1 and source.protected_pids() not in ((), (dog,)))
        await until(lambda: high(cgdir) == str(BRAKE) and len(journal(paths)) == 1)
    assert high(cgdir) == "max" and journal(paths) == []


@pytest.mark.anyio
async def test_the_brake_follows_memory_max_up_down_and_away(paths: PathsConfig, cgdir: Path) -> None:
    source = source_for(paths, deadline_s=5, rescan_s=0.05)
    async with collecting(source) as run:
        assert high(cgdir) == str(BRAKE)
        FakeCgroups.set_memory(cgdir, max=2 * LIMIT)  # resized in place: more room
        await until(lambda: high(cgdir) == str(2 * LIMIT - 16 * MiB))
        await until(lambda: [s.state for s in source.status().scopes] == ["braked"])
        (name,) = journal(paths)
        entry = Journal(paths.run_dir).read(name)
        assert (entry.original, entry.written) == ("max", str(2 * LIMIT - 16 * MiB))  # the first original kept
        FakeCgroups.set_memory(cgdir, max=LIMIT // 2, current=LIMIT // 2 - 8 * MiB)  # less room: stuck sooner
        await until(lambda: high(cgdir) == str(LIMIT // 2 - 16 * MiB))
        await until(lambda: bool(run.kinds("oom")))  # stuck at the new point, and said so
        assert run.kinds("oom")[0].values["limit_bytes"] == LIMIT // 2
        FakeCgroups.set_memory(cgdir, max="max", current=8 * MiB)  # no limit: nothing to brake under
        await until(lambda: high(cgdir) == "max" and journal(paths) == [] and source.scopes() == [])
        FakeCgroups.set_memory(cgdir, max=LIMIT)  # a limit again: braked again at the rescan
        await until(lambda: high(cgdir) == str(BRAKE) and source.scopes() == [SCOPE])
        assert source.status().counters["moves"] == 3 and source.faults == 0
    assert high(cgdir) == "max" and journal(paths) == []
