"""Units ranked by the strategy scorers on the sum of their processes (fake trees): a unit's
summed memory history, growth of a small cgroup beside a large stable one, trigger, tiers and
bursts seen through a unit's members, smaps added up."""

from __future__ import annotations

import os
import time
from typing import Any

import msgspec
import pytest

from oomkit import Candidate, Event, Member, Scope
from oomkit.config import Config, HistoryConfig
from oomkit.history import History
from oomkit.testing import FakeCgroups, FakeProc, harness
from oomkit_plugins.burst import Burst
from oomkit_plugins.freed import Freed
from oomkit_plugins.preference import Preference
from oomkit_plugins.trigger import Trigger
from oomkit_plugins.units import make_unit

from .support import config, configured

MiB = 1 << 20
S = 1_000_000_000
HZ = os.sysconf("SC_CLK_TCK")
JOBS = Scope("v2", "/jobs")


def _quiet(cfg: Config) -> Config:
    # Ticks come from the test, at the times it says; the engine's own sampler stays off.
    return msgspec.structs.replace(cfg, history=HistoryConfig(enabled=False))


def _unit(proc: FakeProc, cgroup: str, *pids: int) -> Candidate:
    from oomkit.procfs import read_process

    members = [read_process(proc.path, pid, cgroup) for pid in pids]
    assert all(m is not None for m in members)
    return make_unit("cgroup", members, name=cgroup.rsplit("/", 1)[-1], cgroup=cgroup)  # type: ignore[arg-type]


def test_a_cgroup_units_history_is_the_sum_of_its_processes_then(fake_proc: FakeProc, fake_cgroups: FakeCgroups) -> None:
    fake_cgroups.mkdir_v2("/jobs")
    fake_cgroups.mkdir_v2("/jobs/b", pids=(30, 31))
    fake_cgroups.mkdir_v2("/jobs/b/inner", pids=(32,))
    h = History(config(fake_proc, fake_cgroups), lambda: [JOBS])
    t0 = time.monotonic_ns() - 2 * S
    for i in range(4):
        fake_proc.add_process(30, "w", rss=(10 + i) * MiB)
        fake_proc.add_process(31, "w", rss=20 * MiB)
        fake_proc.add_process(32, "w", rss=5 * MiB)
        h.tick(t0 + i * S // 4)
    # 31 exits; a new worker takes its place at the same size: the total stays what it was.
    fake_cgroups.set_procs(fake_cgroups.unified / "jobs/b", (30, 33))
    fake_proc.add_process(33, "w", rss=20 * MiB, start_ticks=int((fake_proc.uptime_s - 1.1) * HZ))
    h.tick(t0 + S)
    whole = _unit(fake_proc, "/jobs/b", 30, 32, 33)
    got = h.of(whole, t0 + S, tree="v2")
    assert got is not None
    assert got.times_ns == tuple(t0 + i * S // 4 for i in range(5))
    assert got.rss_bytes == (35 * MiB, 36 * MiB, 37 * MiB, 38 * MiB, 38 * MiB)
    inner = h.of(_unit(fake_proc, "/jobs/b/inner", 32), t0 + S)
    assert inner is not None and inner.rss_bytes == (5 * MiB,) * 5
    # No v1 cgroup of that path was sampled: the members' samples added up instead, which
    # miss the worker that left (so the cgroup's own sum is the one used where it exists).
    members = h.of(whole, t0 + S, tree="v1")
    assert members is not None and members.rss_bytes == (15 * MiB, 16 * MiB, 17 * MiB, 18 * MiB, 38 * MiB)


def test_a_process_group_units_history_adds_its_members_up(fake_proc: FakeProc, fake_cgroups: FakeCgroups) -> None:
    fake_cgroups.mkdir_v1("/jobs", pids=(40, 41))
    h = History(config(fake_proc, fake_cgroups), lambda: [Scope("v1", "/jobs")])
    t0 = 1000 * S
    for i in range(3):
        fake_proc.add_process(40, "make", rss=10 * MiB, pgid=40)
        fake_proc.add_process(41, "cc1", rss=(50 + 10 * i) * MiB, pgid=40)
        h.tick(t0 + i * S)
    from oomkit.procfs import read_process

    members = [read_process(fake_proc.path, p, "/jobs") for p in (40, 41)]
    group = make_unit("process-group", members, name="make", cgroup="/jobs", pgid=40)  # type: ignore[arg-type]
    got = h.of(group, t0 + 2 * S)
    assert got is not None and got.rss_bytes == (60 * MiB, 70 * MiB, 80 * MiB)
    # A member never sampled makes the sum unknown, not smaller.
    stranger = msgspec.structs.replace(group, members=(*group.members, Member(pid=99, start_ticks=1)))
    assert h.of(stranger, t0 + 2 * S) is None


def _grow(fake_proc: FakeProc, i: int) -> None:
    # /jobs/cache: two stable processes, 200 MiB.  /jobs/leak: a stable 30 MiB server (the
    # unit's key, its largest member) and two workers growing 0.75 MiB a tick each: only
    # the sum shows the growth.
    fake_proc.add_process(20, "cache", rss=120 * MiB)
    fake_proc.add_process(21, "cache", rss=80 * MiB)
    fake_proc.add_process(30, "server", rss=30 * MiB)
    for pid in (31, 32):
        fake_proc.add_process(pid, "worker", rss=2 * MiB + i * 3 * MiB // 4)


@pytest.mark.anyio
async def test_a_growing_cgroup_beside_a_larger_stable_one_is_chosen(fake_proc: FakeProc, fake_cgroups: FakeCgroups) -> None:
    fake_cgroups.mkdir_v2("/jobs")
    fake_cgroups.mkdir_v2("/jobs/cache", pids=(20, 21))
    fake_cgroups.mkdir_v2("/jobs/leak", pids=(30, 31, 32))
    raw: dict[str, Any] = {"plugins": {"units": {"cgroups": ["v2:/jobs"]}}, "history": {"enabled": False}}
    async with harness(proc=fake_proc, cgroups=fake_cgroups, config=raw) as h:
        history = h.engine.history
        now = time.monotonic_ns()
        frames = 32
        for i in range(frames):
            _grow(fake_proc, i)
            t = now - (frames - i) * S // 4
            history.touch(JOBS, "threshold", t)  # as a source's event would keep it warm
            history.tick(t)
        _grow(fake_proc, frames)
        d = await h.decide(scope="v2:/jobs", limit_bytes=256 * MiB)
    ranked = {r.candidate.cgroup: r for r in d.ranking}
    assert set(ranked) == {"/jobs/cache", "/jobs/leak"}
    assert d.victim is not None and d.victim.unit == "cgroup" and d.victim.cgroup == "/jobs/leak", d.detail
    assert ranked["/jobs/cache"].scores["growth"] == 0
    assert d.victim.pid == 30
    assert ranked["/jobs/leak"].scores["growth"] > 100  # its lower envelope rose ~36 MiB of 256
    # The kernel's formula alone would have taken the larger cgroup.
    assert ranked["/jobs/cache"].scores["kernel_badness"] > ranked["/jobs/leak"].scores["kernel_badness"]


def test_trigger_names_a_unit_by_any_member(fake_proc: FakeProc, fake_cgroups: FakeCgroups) -> None:
    fake_proc.add_process(20, "big", rss=100 * MiB)
    fake_proc.add_process(21, "small", rss=10 * MiB, start_ticks=777)
    fake_proc.add_process(30, "paused", rss=10 * MiB, wchan="mem_cgroup_oom_synchronize")
    fake_proc.add_process(31, "other", rss=50 * MiB)
    a, b = _unit(fake_proc, "/jobs/a", 20, 21), _unit(fake_proc, "/jobs/b", 30, 31)
    assert a.pid == 20 and b.pid == 31  # the keys are the largest members, not the witnesses
    t = configured(Trigger(), config(fake_proc, fake_cgroups))
    named = Event(source="t", kind="low-memory", scope=Scope("v1", "/jobs"), pid=21, pid_start_ticks=777)
    assert t.oomkit_score(named, [a, b]) == {20: 1000.0}
    oom = Event(source="t", kind="oom", scope=Scope("v1", "/jobs"))
    assert t.oomkit_score(oom, [a, b]) == {31: 1000.0}


def test_a_unit_is_critical_through_any_member_and_expendable_only_through_all(
    fake_proc: FakeProc, fake_cgroups: FakeCgroups
) -> None:
    fake_proc.add_process(20, "postgres", rss=100 * MiB)
    fake_proc.add_process(21, "batch", rss=10 * MiB, oom_score_adj=500)
    fake_proc.add_process(30, "batch", rss=10 * MiB, oom_score_adj=300)
    fake_proc.add_process(31, "batch", rss=10 * MiB, oom_score_adj=100)
    fake_proc.add_process(40, "app", rss=10 * MiB)
    db, jobs, app = (_unit(fake_proc, "/u/db", 20, 21), _unit(fake_proc, "/u/jobs", 30, 31),
                     _unit(fake_proc, "/u/app", 40))
    p = configured(Preference(), config(fake_proc, fake_cgroups))
    tiers = p.oomkit_tier(Event(source="t", kind="oom"), [db, jobs, app])
    assert tiers[db.pid][0] == "critical" and "member 20 name 'postgres'" in tiers[db.pid][1]
    assert tiers[jobs.pid][0] == "expendable" and "every member" in tiers[jobs.pid][1]
    assert app.pid not in tiers


def test_units_are_neither_members_nor_parents_of_a_burst(fake_proc: FakeProc, fake_cgroups: FakeCgroups) -> None:
    up = fake_proc.uptime_s
    fake_proc.add_process(50, "runner", rss=10 * MiB, start_ticks=int((up - 3600) * HZ))
    pids = range(60, 66)
    for pid in pids:
        fake_proc.add_process(pid, "job", ppid=50, rss=10 * MiB, start_ticks=int((up - 2) * HZ))
    cfg = config(fake_proc, fake_cgroups)
    history = History(cfg)
    b = configured(Burst(), cfg)
    ev = Event(source="t", kind="oom", scope=Scope("v1", "/jobs"))
    procs = [_unit(fake_proc, "/jobs", pid) for pid in pids]
    singles = [msgspec.structs.replace(u, unit="process", members=()) for u in procs]
    assert len(b.bursts(ev, singles, history)) == 1  # the same processes, one by one, are a burst
    assert b.bursts(ev, procs, history) == []


def test_freed_adds_up_a_units_smaps(fake_proc: FakeProc, fake_cgroups: FakeCgroups) -> None:
    for pid, private in ((20, 30), (21, 40)):
        fake_proc.add_process(pid, "w", rss=100 * MiB)
        (fake_proc.root / str(pid) / "smaps_rollup").write_text(
            f"Anonymous: {100 * 1024} kB\nPrivate_Clean: 0 kB\nPrivate_Dirty: {private * 1024} kB\n")
    unit = _unit(fake_proc, "/jobs/a", 20, 21)
    f = configured(Freed(), config(fake_proc, fake_cgroups, freed={"smaps_rollup": True, "smaps_timeout_s": 5.0}))
    ev = Event(source="t", kind="oom", scope=Scope("v1", "/jobs"), values={"limit_bytes": 1000 * MiB})
    history = History(config(fake_proc, fake_cgroups))
    (score,) = f.oomkit_score(ev, [unit], history)
    assert score == pytest.approx(70 * 1000 / 1000)  # 30 + 40 MiB of 1000 MiB, not the key's 40
