"""Units and unit kills against the guest's real v2 memory controller: a child cgroup ranked
and killed whole with ``cgroup.kill``, a ``memory.oom.group`` cgroup killed as a group, a
unit holding a protected process killed around it, ``memory.reclaim`` ending an OOM with
no kill."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.guest import Guest, GuestCgroup

from .support import CHECKOUT, DECIDE, START_S, decide, hog, read_into_cache, touched

pytestmark = pytest.mark.kernel

def test_a_child_cgroup_is_ranked_and_killed_whole_with_cgroup_kill(
    guest: Guest, guest_cgroup: Callable[[str], GuestCgroup]
) -> None:
    scope = guest_cgroup("units")
    one, many = scope.child("one"), scope.child("many")
    big = hog(one, 24, "--hold")
    workers = [hog(many, 12, "--hold") for _ in range(3)]  # 36 MiB in all: the bigger unit
    for h in (big, *workers):
        touched(h)
    d = decide(guest, scope, {"units": {"cgroups": [f"v2:{scope.rel}"]}})
    assert d["outcome"] == "killed", d["detail"]
    assert d["victim"]["unit"] == "cgroup" and d["victim"]["cgroup"] == many.rel
    assert d["kill"]["action"] == "kill-cgroup" and "cgroup.kill" in d["kill"]["detail"]
    assert sorted(d["killed"]) == sorted(w.pid for w in workers)
    many.wait_empty()
    assert all(w.wait(timeout=30) == -9 for w in workers)
    assert big.poll() is None and one.procs() == [big.pid]


def test_a_growing_child_cgroup_beside_a_larger_stable_one_is_ranked_by_its_sum_and_killed_whole(
    guest: Guest, guest_cgroup: Callable[[str], GuestCgroup]
) -> None:
    scope = guest_cgroup("ugrow")
    scope.write("memory.max", 192 << 20)  # the score scale: growth is a share of this
    stable, leak = scope.child("stable"), scope.child("leak")
    cache = [hog(stable, 24, "--hold") for _ in range(2)]
    server = hog(leak, 16, "--hold")  # the leak's largest process throughout
    for h in (*cache, server):
        touched(h)
    decider = guest_cgroup("udecide").spawn(
        [guest.interpreter, str(DECIDE), scope.rel, json.dumps({"units": {"cgroups": [f"v2:{scope.rel}"]}}), "0",
         "4"], cwd=str(CHECKOUT))
    decider.wait_for(lambda p: "grow" in p.lines(), timeout=3 * START_S, what="the engine sampled the scope")
    workers = [hog(leak, 8, "--rate", "4", "--hold") for _ in range(2)]
    assert decider.wait(timeout=3 * START_S) == 0, decider.lines()
    d = json.loads(decider.lines()[-1])
    ranked = {r["candidate"]["cgroup"]: r for r in d["ranking"]}
    assert set(ranked) == {stable.rel, leak.rel}
    assert ranked[stable.rel]["candidate"]["rss_bytes"] > ranked[leak.rel]["candidate"]["rss_bytes"], ranked
    assert d["outcome"] == "killed", d["detail"]
    assert d["victim"]["cgroup"] == leak.rel and d["victim"]["pid"] == server.pid, d["detail"]
    # How much of the 16 MiB the engine saw grow depends on how fast the guest runs today
    # (the scores are shares of memory.max): that it saw growth in the leak alone is the point.
    assert ranked[leak.rel]["scores"]["growth"] > ranked[stable.rel]["scores"]["growth"], ranked
    assert d["kill"]["action"] == "kill-cgroup" and "cgroup.kill" in d["kill"]["detail"]
    assert sorted(d["killed"]) == sorted(p.pid for p in (server, *workers))
    leak.wait_empty()
    assert all(c.poll() is None for c in cache) and sorted(stable.procs()) == sorted(c.pid for c in cache)


def test_an_oom_group_cgroup_is_killed_as_a_group(guest: Guest, guest_cgroup: Callable[[str], GuestCgroup]) -> None:
    scope = guest_cgroup("oomgroup")
    app = scope.child("app")
    worker, side = app.child("worker"), app.child("side")  # no processes in app itself: v2's rule
    other = scope.child("other")
    app.write("memory.oom.group", 1)
    biggest = hog(worker, 32, "--hold")
    helper = hog(side, 4, "--hold")
    bystander = hog(other, 16, "--hold")
    for h in (biggest, helper, bystander):
        touched(h)
    # Processes, not units: the kernel's own oom.group rule.  The engine watches them first:
    # unwatched, a hog started more than the history's window ago scores no growth while the
    # younger ones score their whole size, so on a slow guest the order would depend on how
    # long the first hog took to touch its memory.  Watched, none grew and size decides.
    d = decide(guest, scope, {}, "0", "4")
    assert d["outcome"] == "killed", d["detail"]
    assert d["victim"]["pid"] == biggest.pid and d["kill"]["action"] == "kill-oom-group"
    assert f"memory.oom.group=1 at {app.rel}" in d["kill"]["detail"]
    assert sorted(d["killed"]) == sorted((biggest.pid, helper.pid))
    app.wait_empty()
    assert bystander.poll() is None


def test_a_unit_holding_a_protected_process_is_killed_around_it(
    guest: Guest, guest_cgroup: Callable[[str], GuestCgroup]
) -> None:
    scope = guest_cgroup("spare")
    job = scope.child("job")
    guarded = hog(job, 4, "--hold")
    others = [hog(job, 16, "--hold") for _ in range(2)]
    for h in (guarded, *others):
        touched(h)
    guest.write(f"/proc/{guarded.pid}/oom_score_adj", -1000)  # the guest's root may lower it
    d = decide(guest, scope, {"units": {"cgroups": [f"v2:{scope.rel}"]}})
    assert d["outcome"] == "killed", d["detail"]
    assert d["kill"]["spared"] == [guarded.pid] and "kill-each" in d["kill"]["detail"]
    assert sorted(d["killed"]) == sorted(o.pid for o in others)
    assert all(o.wait(timeout=30) == -9 for o in others)
    assert guarded.poll() is None and job.procs() == [guarded.pid]




def test_memory_reclaim_of_a_page_cache_heavy_cgroup_rescues_without_a_kill(
    guest: Guest, guest_cgroup: Callable[[str], GuestCgroup], tmp_path: Path
) -> None:
    # The guest's own writable files are tmpfs (shmem: nothing to reclaim without swap); a
    # host file read over 9p fills ordinary page cache, charged to the reader's cgroup.  A
    # fresh directory: the guest has never looked there, so its 9p cache cannot hide it.
    data = tmp_path / "cache.bin"
    with data.open("wb") as f:
        for _ in range(48):
            f.write(bytes(range(256)) * 4096)
    scope = guest_cgroup("reclaim")
    reader = read_into_cache(scope, data)
    holder = hog(scope, 8, "--hold")
    touched(holder)
    stat = {k: int(v) for k, v in (ln.split() for ln in scope.read("memory.stat").splitlines())}
    assert stat["file"] >= 32 << 20, stat
    bound = int(scope.read("memory.current")) - (16 << 20)  # the "OOM" holds while usage is above
    plugins = {"reclaim": {"scopes": [f"v2:{scope.rel}"], "fraction": 1.0, "min_bytes": 32 << 20}}
    d = decide(guest, scope, plugins, str(bound))
    assert d["outcome"] == "rescued", d
    (attempt,) = d["rescues"]
    assert attempt["plugin"] == "reclaim" and attempt["cleared"] and attempt["freed_bytes"] >= 16 << 20, attempt
    assert d["killed"] == [] and holder.poll() is None and reader.poll() is None
