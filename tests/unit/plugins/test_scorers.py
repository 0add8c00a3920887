"""The strategy scorers on fake trees, with the cases that make naive rules fail: a stable
giant beside a small grower, a spiky allocator beside a steady one, equal growth with
different adj, sharers of one memfd, a burst of twenty children."""

from __future__ import annotations

import os
import time

import msgspec
import pytest

from oomkit import Candidate, ConfigError, Event, Scope
from oomkit.history import History
from oomkit.procfs import read_process
from oomkit.testing import FakeCgroups, FakeProc, assert_victim, decide
from oomkit_plugins.burst import Burst
from oomkit_plugins.freed import Freed, freed_bytes
from oomkit_plugins.growth import Growth, envelope_rise
from oomkit_plugins.preference import Preference
from oomkit_plugins.trigger import Trigger

from .support import config, configured

MiB = 1 << 20
S = 1_000_000_000
HZ = os.sysconf("SC_CLK_TCK")
JOBS = Scope("v1", "/jobs")
OOM = Event(source="t", kind="oom", scope=JOBS, values={"limit_bytes": 256 * MiB})


def started_ago(proc: FakeProc, seconds: float) -> int:
    return int((proc.uptime_s - seconds) * HZ)


def cands(proc: FakeProc, *pids: int) -> list[Candidate]:
    out = [read_process(proc.path, pid, "/jobs") for pid in pids]
    assert all(c is not None for c in out)
    return out  # type: ignore[return-value]


def replay(proc: FakeProc, cgroups: FakeCgroups, frames: list[dict[int, int]], *, interval_s: float = 0.25) -> History:
    """A history whose ticks saw each frame ({pid: rss}), the last one a tick ago."""
    h = History(config(proc, cgroups), lambda: [JOBS])
    now = time.monotonic_ns()
    for i, frame in enumerate(frames):
        for pid, rss in frame.items():
            d = proc.root / str(pid) / "stat"
            fields = d.read_text().split()
            fields[23] = str(rss // 4096)
            d.write_text(" ".join(fields) + "\n")
        h.tick(now - int((len(frames) - i) * interval_s * S))
    return h


@pytest.fixture
def jobs(fake_proc: FakeProc, fake_cgroups: FakeCgroups) -> FakeCgroups:
    fake_cgroups.mkdir_v1("/jobs", limit=256 * MiB, usage=200 * MiB, pids=(10, 11))
    return fake_cgroups


# --- growth -------------------------------------------------------------------------------


def test_envelope_ignores_spikes_whatever_their_phase() -> None:
    for phase in range(4):
        spiky = [(t, 80 * MiB + (80 * MiB if (t + phase) % 2 else 0)) for t in range(32)]
        steady = [(t, (10 + 3 * t) * MiB) for t in range(32)]
        assert envelope_rise(spiky, 4) == 0
        assert envelope_rise(steady, 4) >= 60 * MiB


def test_a_small_grower_beats_a_stable_giant(fake_proc: FakeProc, jobs: FakeCgroups) -> None:
    fake_proc.add_process(10, "cache", rss=150 * MiB)
    fake_proc.add_process(11, "leak", rss=10 * MiB)
    frames = [{10: 150 * MiB, 11: (10 + 2 * i) * MiB} for i in range(32)]
    h = replay(fake_proc, jobs, frames)
    fake_proc.add_process(11, "leak", rss=74 * MiB)
    g = configured(Growth(), config(fake_proc, jobs))
    cache, leak = g.oomkit_score(OOM, cands(fake_proc, 10, 11), h)
    assert cache == 0
    assert 180 < leak < 260  # grew ~48 to 64 MiB of a 256 MiB limit


def test_a_spiky_allocator_is_not_growing(fake_proc: FakeProc, jobs: FakeCgroups) -> None:
    fake_proc.add_process(10, "spiky", rss=160 * MiB)  # caught at a peak
    fake_proc.add_process(11, "steady", rss=90 * MiB)
    frames = [{10: (80 + 80 * (i % 2)) * MiB, 11: (10 + 2 * i) * MiB} for i in range(32)]
    g = configured(Growth(), config(fake_proc, jobs))
    spiky, steady = g.oomkit_score(OOM, cands(fake_proc, 10, 11), replay(fake_proc, jobs, frames))
    assert spiky == 0 and steady > 100


def test_a_young_process_counts_from_its_start_even_unsampled(fake_proc: FakeProc, jobs: FakeCgroups) -> None:
    fake_proc.add_process(10, "old", rss=170 * MiB)
    fake_proc.add_process(11, "young", rss=80 * MiB, start_ticks=started_ago(fake_proc, 1.0))
    h = History(config(fake_proc, jobs))  # never ticked
    g = configured(Growth(), config(fake_proc, jobs))
    old, young = g.oomkit_score(OOM, cands(fake_proc, 10, 11), h)
    assert old == 0  # old and never sampled: nothing is known
    assert young == pytest.approx(80 / 256 * 1000)


# --- trigger ------------------------------------------------------------------------------


def test_trigger_names_the_event_pid_and_the_tasks_paused_at_the_limit(fake_proc: FakeProc, jobs: FakeCgroups) -> None:
    fake_proc.add_process(10, "sleeper", wchan="hrtimer_nanosleep")
    fake_proc.add_process(11, "faulting", wchan="mem_cgroup_oom_synchronize")
    fake_proc.add_process(12, "named")
    t = configured(Trigger(), config(fake_proc, jobs))
    event = msgspec.structs.replace(OOM, pid=12)
    assert t.oomkit_score(event, cands(fake_proc, 10, 11, 12)) == {12: 1000.0, 11: 1000.0}
    # Not a v1 OOM: no wchan reads; a pid whose start time differs is someone else.
    other = Event(source="t", kind="low-memory", pid=12, pid_start_ticks=1)
    assert t.oomkit_score(other, cands(fake_proc, 10, 11, 12)) == {}


# --- freed --------------------------------------------------------------------------------


def test_sharers_of_one_memfd_free_nothing_of_it(fake_proc: FakeProc, jobs: FakeCgroups) -> None:
    fake_proc.add_process(10, "viewer", rss=141 * MiB, rss_shmem=140 * MiB)
    fake_proc.add_process(11, "viewer2", rss=141 * MiB, rss_shmem=140 * MiB)
    fake_proc.add_process(12, "worker", rss=100 * MiB)
    fake_proc.add_process(13, "reader", rss=60 * MiB, rss_file=58 * MiB)
    f = configured(Freed(), config(fake_proc, jobs))
    a, b, worker, reader = f.oomkit_score(OOM, cands(fake_proc, 10, 11, 12, 13), History(config(fake_proc, jobs)))
    assert a == b == pytest.approx(1 / 256 * 1000)
    assert worker == pytest.approx(100 / 256 * 1000)
    assert reader == pytest.approx(2 / 256 * 1000)


def test_freed_falls_back_to_rss_where_status_has_no_split() -> None:
    assert freed_bytes(Candidate(pid=1, name="x", rss_bytes=5, swap_bytes=2, start_ticks=1000)) == 7


def test_freed_reads_smaps_rollup_as_an_option(fake_proc: FakeProc, jobs: FakeCgroups) -> None:
    fake_proc.add_process(10, "child", rss=110 * MiB)  # 100 MiB of it shared copy-on-write
    (fake_proc.root / "10" / "smaps_rollup").write_text(
        f"Rss: {110 * 1024} kB\nShared_Dirty: {100 * 1024} kB\nPrivate_Dirty: {10 * 1024} kB\n"
        f"Private_Clean: 0 kB\nAnonymous: {110 * 1024} kB\n"
    )
    f = configured(Freed(), config(fake_proc, jobs, freed={"smaps_rollup": True, "smaps_timeout_s": 5.0}))
    (score,) = f.oomkit_score(OOM, cands(fake_proc, 10), History(config(fake_proc, jobs)))
    assert score == pytest.approx(10 / 256 * 1000)


# --- burst --------------------------------------------------------------------------------


def burst_tree(proc: FakeProc, cgroups: FakeCgroups, *, parent_age: float = 3600.0, n: int = 20) -> list[int]:
    proc.add_process(50, "server", rss=100 * MiB, start_ticks=started_ago(proc, parent_age))
    kids = list(range(100, 100 + n))
    for i, pid in enumerate(kids):
        proc.add_process(pid, "worker", ppid=50, rss=10 * MiB, start_ticks=started_ago(proc, 5.0 - 0.05 * i))
    cgroups.mkdir_v1("/jobs", limit=256 * MiB, pids=(50, *kids))
    return kids


def test_a_burst_of_twenty_is_one_set_newest_first(fake_proc: FakeProc, fake_cgroups: FakeCgroups) -> None:
    kids = burst_tree(fake_proc, fake_cgroups)
    b = configured(Burst(), config(fake_proc, fake_cgroups))
    h = History(config(fake_proc, fake_cgroups))
    all_ = cands(fake_proc, 50, *kids)
    scores = b.oomkit_score(OOM, all_, h)
    assert 50 not in scores and set(scores) == set(kids)
    assert max(scores, key=lambda p: scores[p]) == kids[-1]  # the newest
    group = b.oomkit_group(OOM, all_[-1], all_, h)
    assert group == list(reversed(kids[:-1]))


def test_a_service_that_just_started_its_workers_is_not_a_burst(fake_proc: FakeProc, fake_cgroups: FakeCgroups) -> None:
    kids = burst_tree(fake_proc, fake_cgroups, parent_age=6.0)
    b = configured(Burst(), config(fake_proc, fake_cgroups))
    assert b.oomkit_score(OOM, cands(fake_proc, 50, *kids), History(config(fake_proc, fake_cgroups))) == {}


def test_a_few_siblings_are_not_a_burst(fake_proc: FakeProc, fake_cgroups: FakeCgroups) -> None:
    kids = burst_tree(fake_proc, fake_cgroups, n=3)
    b = configured(Burst(), config(fake_proc, fake_cgroups))
    assert b.oomkit_score(OOM, cands(fake_proc, 50, *kids), History(config(fake_proc, fake_cgroups))) == {}


def test_the_default_chain_kills_the_whole_burst_in_one_decision(fake_proc: FakeProc, fake_cgroups: FakeCgroups) -> None:
    kids = burst_tree(fake_proc, fake_cgroups)
    d = decide(proc=fake_proc, cgroups=fake_cgroups, scope="v1:/jobs")
    assert_victim(d, kids[-1])
    assert [c.pid for c in d.group] == list(reversed(kids[:-1]))
    assert "and 19 more with it" in d.detail


# --- preference ---------------------------------------------------------------------------


def test_equal_growth_with_different_adj(fake_proc: FakeProc, jobs: FakeCgroups) -> None:
    fake_proc.add_process(10, "grow-a", rss=60 * MiB)
    fake_proc.add_process(11, "grow-b", rss=60 * MiB, oom_score_adj=100)
    p = configured(Preference(), config(fake_proc, jobs))
    cs = cands(fake_proc, 10, 11)
    assert p.oomkit_score(cs) == [0.0, 100.0]
    assert p.oomkit_tier(OOM, cs) == {11: ("expendable", "oom_score_adj 100 > 0 (self-declared)")}
    d = decide(proc=fake_proc, cgroups=jobs, scope="v1:/jobs")
    assert_victim(d, "grow-b")


def test_patterns_by_name_cmdline_cgroup_and_uid(fake_proc: FakeProc, jobs: FakeCgroups) -> None:
    fake_proc.add_process(10, "sshd")
    fake_proc.add_process(11, "python3", cmdline=("python3", "-m", "batchjob"))
    fake_proc.add_process(12, "app", uid=1001)
    fake_proc.add_process(13, "other")
    settings = {"expendable": {"cmdlines": ["-m batch"], "uids": [1001]}}
    p = configured(Preference(), config(fake_proc, jobs, preference=settings))
    tiers = p.oomkit_tier(OOM, cands(fake_proc, 10, 11, 12, 13))
    assert tiers == {
        10: ("critical", "preference.critical: name 'sshd' matches 'sshd'"),
        11: ("expendable", "preference.expendable: command line matches '-m batch'"),
        12: ("expendable", "preference.expendable: uid 1001"),
    }
    p = configured(Preference(), config(fake_proc, jobs, preference={"critical": {"cgroups": ["^/jo"]}}))
    assert {pid for pid, (tier, _) in p.oomkit_tier(OOM, cands(fake_proc, 10, 13)).items()} == {10, 13}


def test_a_bad_pattern_is_one_line_naming_its_key(fake_proc: FakeProc) -> None:
    with pytest.raises(ConfigError) as err:
        configured(Preference(), config(fake_proc, preference={"critical": {"names": ["ok", "(unclosed"]}}))
    message = str(err.value)
    assert "\n" not in message
    assert "`critical.names[1]` is not a regular expression" in message and "$.plugins.preference" in message


def test_a_critical_process_dies_only_when_nobody_else_is_left(fake_proc: FakeProc, fake_cgroups: FakeCgroups) -> None:
    fake_proc.add_process(10, "postgres", rss=150 * MiB)
    fake_proc.add_process(11, "batch", rss=5 * MiB)
    fake_cgroups.mkdir_v1("/jobs", limit=256 * MiB, pids=(10, 11))
    assert_victim(decide(proc=fake_proc, cgroups=fake_cgroups, scope="v1:/jobs"), "batch")
    fake_cgroups.set_procs(fake_cgroups.memory_v1 / "jobs", (10,))
    assert_victim(decide(proc=fake_proc, cgroups=fake_cgroups, scope="v1:/jobs"), "postgres")


def test_a_sudden_allocation_is_growth_and_a_return_to_an_old_peak_is_not(fake_proc: FakeProc, jobs: FakeCgroups) -> None:
    fake_proc.add_process(10, "loader", rss=76 * MiB)  # flat at 1 MiB, then a jump since the last tick
    fake_proc.add_process(11, "spiky", rss=160 * MiB)  # back at a peak it has reached before
    # The last tick caught the loader halfway through its jump.
    frames = [{10: MiB, 11: (80 + 80 * (i % 2)) * MiB} for i in range(31)] + [{10: 40 * MiB, 11: 80 * MiB}]
    h = replay(fake_proc, jobs, frames)
    fake_proc.add_process(10, "loader", rss=76 * MiB)
    fake_proc.add_process(11, "spiky", rss=160 * MiB)
    g = configured(Growth(), config(fake_proc, jobs))
    loader, spiky = g.oomkit_score(OOM, cands(fake_proc, 10, 11), h)
    assert loader == pytest.approx(75 / 256 * 1000)
    assert spiky == 0


def test_siblings_started_long_before_the_window_are_not_a_burst(fake_proc: FakeProc, fake_cgroups: FakeCgroups) -> None:
    fake_proc.add_process(50, "runner", start_ticks=started_ago(fake_proc, 3600))
    kids = list(range(100, 109))
    for pid in kids:
        fake_proc.add_process(pid, "job", ppid=50, rss=18 * MiB, start_ticks=started_ago(fake_proc, 12.0))
    fake_cgroups.mkdir_v1("/jobs", limit=256 * MiB, pids=tuple(kids))
    b = configured(Burst(), config(fake_proc, fake_cgroups))
    assert b.oomkit_score(OOM, cands(fake_proc, *kids), History(config(fake_proc, fake_cgroups))) == {}


def test_a_cgroup_that_vanished_mid_decision_scales_by_the_machine(fake_proc: FakeProc, jobs: FakeCgroups) -> None:
    fake_proc.add_process(10, "gone-with-it", rss=80 * MiB)
    (c,) = cands(fake_proc, 10)
    event = Event(source="t", kind="oom", scope=Scope("v1", "/vanished"))  # no limit in the event either
    h = History(config(fake_proc, jobs))
    (freed,) = configured(Freed(), config(fake_proc, jobs)).oomkit_score(event, [c], h)
    assert freed == pytest.approx(80 * MiB / fake_proc.mem_total * 1000)
    fake_proc.remove_process(10)  # exited between the sampling and the scoring
    assert configured(Trigger(), config(fake_proc, jobs)).oomkit_score(event, [c]) == {}
    (rise,) = configured(Growth(), config(fake_proc, jobs)).oomkit_score(event, [c], h)
    assert rise == 0
