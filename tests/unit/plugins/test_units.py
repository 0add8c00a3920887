"""Units on fake trees: cgroups and process groups offered whole, ranked as sums, the core's
protections member by member, the engine looking inside a chosen unit, oom.group found."""

from __future__ import annotations

from typing import Any

import pytest

from oomkit import Candidate, Member
from oomkit.hookresults import BadResult, check_candidates
from oomkit.safety import CORE
from oomkit.testing import FakeCgroups, FakeProc, assert_outcome, harness
from oomkit_plugins.unitkill import oom_group_of

MiB = 1 << 20


def _jobs(proc: FakeProc, cg: FakeCgroups) -> None:
    # /jobs/a: one process of 300 MiB; /jobs/b: three of 150 MiB (450 in all); 100 MiB in /jobs.
    cg.mkdir_v2("/jobs", pids=(10,))
    cg.mkdir_v2("/jobs/a", pids=(20,))
    cg.mkdir_v2("/jobs/b", pids=(30, 31))
    cg.mkdir_v2("/jobs/b/inner", pids=(32,))
    proc.add_process(10, "shell", rss=100 * MiB)
    proc.add_process(20, "big", rss=300 * MiB)
    for pid in (30, 31, 32):
        proc.add_process(pid, "worker", rss=150 * MiB)


def _cfg(**units: Any) -> dict[str, Any]:
    return {"plugins": {"units": units, "disable": ["growth", "burst", "trigger", "preference"]}}


@pytest.mark.anyio
async def test_child_cgroups_are_ranked_as_the_sum_of_their_processes(
    fake_proc: FakeProc, fake_cgroups: FakeCgroups
) -> None:
    _jobs(fake_proc, fake_cgroups)
    async with harness(proc=fake_proc, cgroups=fake_cgroups, config=_cfg(cgroups=["v2:/jobs"])) as h:
        d = await h.decide(scope="v2:/jobs")
    assert_outcome(d, "dry-run")
    assert d.victim is not None and d.victim.unit == "cgroup" and d.victim.cgroup == "/jobs/b"
    assert d.victim.rss_bytes == 450 * MiB and sorted(m.pid for m in d.victim.members) == [30, 31, 32]
    assert d.victim.pid in (30, 31, 32) and d.victim.name == "b"
    offered = sorted((r.candidate.unit, r.candidate.cgroup or "", r.candidate.pid) for r in d.ranking)
    # The processes of the units are not offered again; the one directly in /jobs is.
    assert offered == [("cgroup", "/jobs/a", 20), ("cgroup", "/jobs/b", d.victim.pid), ("process", "/jobs", 10)]
    assert "cgroup /jobs/b (3 processes)" in d.detail


@pytest.mark.anyio
async def test_without_a_matching_glob_nothing_changes(fake_proc: FakeProc, fake_cgroups: FakeCgroups) -> None:
    _jobs(fake_proc, fake_cgroups)
    async with harness(proc=fake_proc, cgroups=fake_cgroups, config=_cfg(cgroups=["v2:/other*"])) as h:
        d = await h.decide(scope="v2:/jobs")
    assert d.victim is not None and d.victim.unit == "process" and d.victim.pid == 20
    assert all(r.candidate.unit == "process" for r in d.ranking) and len(d.ranking) == 5


@pytest.mark.anyio
async def test_recursive_looks_inside_the_chosen_unit(fake_proc: FakeProc, fake_cgroups: FakeCgroups) -> None:
    _jobs(fake_proc, fake_cgroups)
    async with harness(proc=fake_proc, cgroups=fake_cgroups, config=_cfg(cgroups=["v2:/jobs"], recursive=True)) as h:
        d = await h.decide(scope="v2:/jobs")
    # /jobs/b wins (450 MiB); inside it, /jobs/b/inner (150) and pids 30 and 31 (150 each)
    # tie on size: the tiebreak is the lower pid among equals' larger RSS, so pid 30 loses.
    assert [u.cgroup for u in d.descended] == ["/jobs/b"]
    assert d.victim is not None and d.victim.rss_bytes == 150 * MiB
    inside = sorted((r.candidate.unit, r.candidate.pid) for r in d.ranking)
    assert inside == [("cgroup", 32), ("process", 30), ("process", 31)]


@pytest.mark.anyio
async def test_process_groups(fake_proc: FakeProc, fake_cgroups: FakeCgroups) -> None:
    fake_cgroups.mkdir_v2("/build", pids=(40, 41, 42, 50))
    fake_proc.add_process(40, "make", rss=10 * MiB, pgid=40)
    fake_proc.add_process(41, "cc1", rss=200 * MiB, pgid=40)
    fake_proc.add_process(42, "cc1", rss=200 * MiB, pgid=40)
    fake_proc.add_process(50, "editor", rss=300 * MiB, pgid=50)
    async with harness(proc=fake_proc, cgroups=fake_cgroups, config=_cfg(process_groups=["v2:/build"])) as h:
        d = await h.decide(scope="v2:/build")
    assert d.victim is not None and d.victim.unit == "process-group" and d.victim.pgid == 40
    assert d.victim.name == "make" and d.victim.rss_bytes == 410 * MiB
    # A process alone in its group stays a process.
    assert {(r.candidate.unit, r.candidate.pid) for r in d.ranking} == {("process-group", d.victim.pid), ("process", 50)}


@pytest.mark.anyio
async def test_a_unit_with_a_protected_member_is_ranked_and_one_with_only_protected_ones_is_vetoed(
    fake_proc: FakeProc, fake_cgroups: FakeCgroups
) -> None:
    fake_cgroups.mkdir_v2("/jobs")
    fake_cgroups.mkdir_v2("/jobs/mixed", pids=(60, 61))
    fake_cgroups.mkdir_v2("/jobs/guarded", pids=(70,))
    fake_proc.add_process(60, "db", rss=500 * MiB, oom_score_adj=-1000)
    fake_proc.add_process(61, "batch", rss=50 * MiB)
    fake_proc.add_process(70, "agent", rss=900 * MiB, oom_score_adj=-1000)
    async with harness(proc=fake_proc, cgroups=fake_cgroups, config=_cfg(cgroups=["v2:/jobs"])) as h:
        d = await h.decide(scope="v2:/jobs")
    by_cgroup = {r.candidate.cgroup: r for r in d.ranking}
    assert [v.plugin for v in by_cgroup["/jobs/guarded"].vetoes] == [CORE]
    assert "every member is protected" in by_cgroup["/jobs/guarded"].vetoes[0].reason
    assert not by_cgroup["/jobs/mixed"].vetoes
    assert d.victim is not None and d.victim.cgroup == "/jobs/mixed"


@pytest.mark.anyio
async def test_a_cgroup_with_too_many_processes_is_offered_one_by_one(
    fake_proc: FakeProc, fake_cgroups: FakeCgroups
) -> None:
    fake_cgroups.mkdir_v2("/jobs")
    fake_cgroups.mkdir_v2("/jobs/many", pids=(80, 81, 82))
    for pid in (80, 81, 82):
        fake_proc.add_process(pid, "w", rss=MiB)
    async with harness(proc=fake_proc, cgroups=fake_cgroups, config=_cfg(cgroups=["*"], max_members=2)) as h:
        d = await h.decide(scope="v2:/jobs")
    assert sorted(r.candidate.pid for r in d.ranking if r.candidate.unit == "process") == [80, 81, 82]


def _unit(**changes: Any) -> Candidate:
    fields: dict[str, Any] = dict(pid=5, name="u", unit="cgroup", cgroup="/a", start_ticks=1000,
                                  members=(Member(pid=5), Member(pid=6)))
    fields.update(changes)
    return Candidate(**fields)


@pytest.mark.parametrize(
    ("changes", "problem"),
    [
        ({"members": ()}, "a cgroup unit needs a tuple of 1..65536 members"),
        ({"pid": 7}, "the unit's key pid 7 is not one of its members"),
        ({"members": (Member(pid=5), Member(pid=5))}, "member pid 5 is not a pid, or is listed twice"),
        ({"members": (Member(pid=5, oom_score_adj=-2000),)}, "member 5: oom_score_adj -2000 is not an int in"),
        ({"unit": "process"}, "a process has no members"),
        ({"unit": "pod"}, "unit 'pod' is not one of cgroup, process-group"),
        ({"unit": "process-group", "descend": True}, "descend must be a bool, and true only for a cgroup unit"),
        ({"members": [Member(pid=5)]}, "needs a tuple"),
    ],
)
def test_malformed_units_are_refused(changes: dict[str, Any], problem: str) -> None:
    with pytest.raises(BadResult, match="candidate 0 "):
        check_candidates([_unit(**changes)])
    with pytest.raises(BadResult) as exc:
        check_candidates([_unit(**changes)])
    assert problem in str(exc.value)


def test_a_well_formed_unit_passes() -> None:
    assert check_candidates([_unit()]) == [_unit()]


def test_oom_group_is_the_highest_ancestor_at_or_below_the_scope(fake_cgroups: FakeCgroups) -> None:
    for path in ("/pod", "/pod/app", "/pod/app/worker"):
        fake_cgroups.mkdir_v2(path)
    root = str(fake_cgroups.unified)
    assert oom_group_of(root, "/pod", "/pod/app/worker") is None
    (fake_cgroups.unified / "pod/app/worker/memory.oom.group").write_text("1\n")
    assert oom_group_of(root, "/pod", "/pod/app/worker") == "/pod/app/worker"
    (fake_cgroups.unified / "pod/app/memory.oom.group").write_text("1\n")
    assert oom_group_of(root, "/pod", "/pod/app/worker") == "/pod/app"
    # The scope itself counts (the kernel walks up to the OOM's memcg, included)...
    (fake_cgroups.unified / "pod/memory.oom.group").write_text("1\n")
    assert oom_group_of(root, "/pod", "/pod/app/worker") == "/pod"
    # ...and nothing above it does.
    assert oom_group_of(root, "/pod/app/worker", "/pod/app/worker") == "/pod/app/worker"
    assert oom_group_of(root, "/pod/app", "/elsewhere") is None
    assert oom_group_of(root, "/", "/pod/app/worker") == "/pod"
