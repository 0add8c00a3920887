"""The unit killer on fake cgroup trees with real processes: which kernel interface it
chooses, what it spares, what it records.  The kernel's side (a real cgroup.kill, a real
memcg emptied under takeover) is in tests/integration."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Iterator

import pytest

from oomkit import Candidate, Event, Guard, Member, Scope
from oomkit.safety import Safety
from oomkit.testing import FakeCgroups, FakeProc
from oomkit_plugins.unitkill import UnitKiller

from .support import config, configured


def _sleeper(**kwargs: object) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], **kwargs)  # type: ignore[call-overload, no-any-return]


@pytest.fixture
def sleepers() -> Iterator[list[subprocess.Popen[bytes]]]:
    procs = [_sleeper() for _ in range(3)]
    yield procs
    for p in procs:
        p.kill()
        p.wait()


def _guard(proc: FakeProc, protected: dict[int, str] | None = None) -> Guard:
    return Guard(Safety(str(proc.path)), protected or {})


def _unit(procs: list[subprocess.Popen[bytes]], cgroup: str) -> Candidate:
    return Candidate(pid=procs[0].pid, name="u", unit="cgroup", cgroup=cgroup,
                     members=tuple(Member(pid=p.pid) for p in procs), start_ticks=1000)


def _dead(p: subprocess.Popen[bytes]) -> bool:
    try:
        return p.wait(timeout=10) == -signal.SIGKILL
    except subprocess.TimeoutExpired:
        return False


@pytest.mark.anyio
async def test_v2_uses_cgroup_kill_when_every_member_may_die(
    fake_proc: FakeProc, fake_cgroups: FakeCgroups, sleepers: list[subprocess.Popen[bytes]]
) -> None:
    fake_cgroups.mkdir_v2("/jobs")
    d = fake_cgroups.mkdir_v2("/jobs/a", pids=tuple(p.pid for p in sleepers))
    for p in sleepers:
        fake_proc.add_process(p.pid, "sleeper", cgroup2="/jobs/a")
    killer = configured(UnitKiller(), config(fake_proc, fake_cgroups))
    res = await killer.oomkit_kill(Event(source="t", kind="oom", scope=Scope("v2", "/jobs")),
                                   _unit(sleepers, "/jobs/a"), _guard(fake_proc))
    assert res is not None
    # The fake cgroup.kill kills nobody, and the fake cgroup.events already says populated 0.
    assert FakeCgroups.written(d, "cgroup.kill") == ["1"]
    assert (res.action, res.outcome) == ("kill-cgroup", "killed")
    assert sorted(res.pids) == sorted(p.pid for p in sleepers) and "cgroup.kill" in res.detail
    assert all(p.poll() is None for p in sleepers)


@pytest.mark.anyio
async def test_a_protected_member_means_each_is_killed_and_it_is_spared(
    fake_proc: FakeProc, fake_cgroups: FakeCgroups, sleepers: list[subprocess.Popen[bytes]]
) -> None:
    fake_cgroups.mkdir_v2("/jobs")
    d = fake_cgroups.mkdir_v2("/jobs/a", pids=tuple(p.pid for p in sleepers))
    guarded, *others = sleepers
    fake_proc.add_process(guarded.pid, "db", cgroup2="/jobs/a", oom_score_adj=-1000)
    for p in others:
        fake_proc.add_process(p.pid, "sleeper", cgroup2="/jobs/a")
    killer = configured(UnitKiller(), config(fake_proc, fake_cgroups))
    res = await killer.oomkit_kill(Event(source="t", kind="oom", scope=Scope("v2", "/jobs")),
                                   _unit(sleepers, "/jobs/a"), _guard(fake_proc))
    assert res is not None
    assert FakeCgroups.written(d, "cgroup.kill") == []
    assert all(_dead(p) for p in others) and guarded.poll() is None
    assert res.outcome == "killed" and sorted(res.pids) == sorted(p.pid for p in others)
    assert res.spared == (guarded.pid,) and "oom_score_adj is -1000" in res.detail


@pytest.mark.anyio
async def test_v1_kills_each_and_never_a_pid_that_left_the_cgroup(
    fake_proc: FakeProc, fake_cgroups: FakeCgroups, sleepers: list[subprocess.Popen[bytes]]
) -> None:
    fake_cgroups.mkdir_v1("/jobs")
    fake_cgroups.mkdir_v1("/jobs/a", pids=tuple(p.pid for p in sleepers))
    inside, also, elsewhere = sleepers
    for p in (inside, also):
        fake_proc.add_process(p.pid, "sleeper", memcg="/jobs/a")
    # Listed in cgroup.procs, but /proc says it is somewhere else now (a reused pid).
    fake_proc.add_process(elsewhere.pid, "sleeper", memcg="/other")
    killer = configured(UnitKiller(), config(fake_proc, fake_cgroups))
    res = await killer.oomkit_kill(Event(source="t", kind="oom", scope=Scope("v1", "/jobs")),
                                   _unit(sleepers, "/jobs/a"), _guard(fake_proc))
    assert res is not None
    assert _dead(inside) and _dead(also) and elsewhere.poll() is None
    assert sorted(res.pids) == sorted((inside.pid, also.pid)) and "kill-each" in res.detail
    assert res.outcome == "killed"


@pytest.mark.anyio
async def test_a_source_watchdog_in_the_unit_is_spared(
    fake_proc: FakeProc, fake_cgroups: FakeCgroups, sleepers: list[subprocess.Popen[bytes]]
) -> None:
    fake_cgroups.mkdir_v2("/jobs")
    fake_cgroups.mkdir_v2("/jobs/a", pids=tuple(p.pid for p in sleepers))
    for p in sleepers:
        fake_proc.add_process(p.pid, "sleeper", cgroup2="/jobs/a")
    watchdog = sleepers[1]
    killer = configured(UnitKiller(), config(fake_proc, fake_cgroups))
    res = await killer.oomkit_kill(Event(source="t", kind="oom", scope=Scope("v2", "/jobs")),
                                   _unit(sleepers, "/jobs/a"), _guard(fake_proc, {watchdog.pid: "memcg-oom"}))
    assert res is not None and res.spared == (watchdog.pid,) and watchdog.poll() is None
    assert all(_dead(p) for p in sleepers if p is not watchdog)


@pytest.mark.anyio
async def test_a_process_victim_in_an_oom_group_takes_the_group(
    fake_proc: FakeProc, fake_cgroups: FakeCgroups, sleepers: list[subprocess.Popen[bytes]]
) -> None:
    fake_cgroups.mkdir_v2("/pod")
    g = fake_cgroups.mkdir_v2("/pod/app", pids=(sleepers[0].pid,))
    fake_cgroups.mkdir_v2("/pod/app/worker", pids=tuple(p.pid for p in sleepers[1:]))
    (g / "memory.oom.group").write_text("1\n")
    fake_proc.add_process(sleepers[0].pid, "app", cgroup2="/pod/app")
    for p in sleepers[1:]:
        fake_proc.add_process(p.pid, "worker", cgroup2="/pod/app/worker")
    killer = configured(UnitKiller(), config(fake_proc, fake_cgroups))
    victim = Candidate(pid=sleepers[2].pid, name="worker", cgroup="/pod/app/worker", start_ticks=1000)
    event = Event(source="t", kind="oom", scope=Scope("v2", "/pod"))
    res = await killer.oomkit_kill(event, victim, _guard(fake_proc))
    assert res is not None and res.action == "kill-oom-group"
    assert "memory.oom.group=1 at /pod/app" in res.detail
    assert sorted(res.pids) == sorted(p.pid for p in sleepers)
    assert FakeCgroups.written(g, "cgroup.kill") == ["1"]
    # Without oom.group, a process victim is the plain killer's.
    (g / "memory.oom.group").write_text("0\n")
    assert await killer.oomkit_kill(event, victim, _guard(fake_proc)) is None


@pytest.mark.anyio
async def test_a_process_group_through_its_leaders_pidfd(fake_proc: FakeProc, fake_cgroups: FakeCgroups) -> None:
    leader = _sleeper(process_group=0)
    member = _sleeper(process_group=leader.pid)
    bystander = _sleeper()
    try:
        for p in (leader, member):
            fake_proc.add_process(p.pid, "make", pgid=leader.pid)
        fake_proc.add_process(bystander.pid, "other")
        killer = configured(UnitKiller(), config(fake_proc, fake_cgroups))
        unit = Candidate(pid=leader.pid, name="make", unit="process-group", pgid=leader.pid,
                         members=(Member(pid=leader.pid), Member(pid=member.pid)), start_ticks=1000)
        res = await killer.oomkit_kill(Event(source="t", kind="low-memory"), unit, _guard(fake_proc))
        assert res is not None and res.action == "kill-process-group"
        assert _dead(leader) and _dead(member) and bystander.poll() is None
        assert sorted(res.pids) == sorted((leader.pid, member.pid))
        # PIDFD_SIGNAL_PROCESS_GROUP is Linux 6.9; before it, each member by its own pidfd.
        assert ("process-group signal" in res.detail) or ("kill-each" in res.detail)
    finally:
        for p in (leader, member, bystander):
            p.kill()
            p.wait()


def test_the_plain_killer_declines_a_unit(fake_proc: FakeProc) -> None:
    import anyio

    from oomkit_plugins.killer import SignalKiller

    killer = configured(SignalKiller(), config(fake_proc))
    unit = Candidate(pid=5, name="u", unit="cgroup", cgroup="/a", members=(Member(pid=5),), start_ticks=1000)
    assert anyio.run(killer.oomkit_kill, Event(source="t", kind="oom"), unit) is None



@pytest.mark.anyio
async def test_processes_slower_to_die_than_every_round_are_killed_not_left(
    fake_proc: FakeProc, fake_cgroups: FakeCgroups, sleepers: list[subprocess.Popen[bytes]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A loaded machine: each killed process is still running at every round's look, and
    # dies (really) only after the rounds.  It was reported "processes were still left".
    from oomkit import unitkill

    fake_cgroups.mkdir_v1("/jobs")
    fake_cgroups.mkdir_v1("/jobs/a", pids=tuple(p.pid for p in sleepers))
    for p in sleepers:
        fake_proc.add_process(p.pid, "sleeper", memcg="/jobs/a")
    looks = {"rounds": 0}
    real_live = unitkill._Killer.live

    def slow_live(self: unitkill._Killer, pids: object) -> list[int]:
        looks["rounds"] += 1
        if looks["rounds"] <= 3:  # every round of the loop, and the look after it
            return list(pids)  # type: ignore[call-overload]
        return real_live(self, pids)  # type: ignore[arg-type]

    monkeypatch.setattr(unitkill._Killer, "live", slow_live)
    killer = configured(UnitKiller(), config(fake_proc, fake_cgroups, unit_killer={"rounds": 2}))
    res = await killer.oomkit_kill(Event(source="t", kind="oom", scope=Scope("v1", "/jobs")),
                                   _unit(sleepers, "/jobs/a"), _guard(fake_proc))
    assert res is not None and all(_dead(p) for p in sleepers)
    assert res.outcome == "killed", res.detail
    assert sorted(res.pids) == sorted(p.pid for p in sleepers)
