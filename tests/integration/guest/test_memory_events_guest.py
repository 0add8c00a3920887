"""The ``memory-events`` source against a real cgroup v2 memory controller (in the guest).

Every OOM here is a real one: a hog in a cgroup with ``memory.max`` set, killed by the
guest kernel's own memcg OOM killer.  Assertions compare the source's deltas with the
counters the kernel shows in ``memory.events`` afterwards.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.guest import Guest, GuestCgroup

from .support import START_S, MiB, hog, total, touched, watch

pytestmark = pytest.mark.kernel

Make = Callable[[str], GuestCgroup]


def test_an_oom_is_reported_with_its_counters_and_as_a_kernel_kill(guest: Guest, guest_cgroup: Make) -> None:
    cg = guest_cgroup("oom")
    cg.write("memory.max", 32 * MiB)
    w = watch(guest, {"kind": "memory-events", "cgroups": [cg.rel]})
    assert w.state()["watching"] == {"memory-events": [f"v2:{cg.rel}"]}
    victim = hog(cg, 64)
    assert victim.wait(120) == -9  # SIGKILLed by the kernel
    w.wait(lambda w: bool(w.events("kernel-kill")), "a kernel-kill event")
    counters = cg.keyed("memory.events")
    w.stop()
    changes = w.events("memory-events")
    assert counters["oom"] == 1 and counters["oom_kill"] == 1 and counters["max"] >= 1
    # Every change was reported: the deltas add up to the kernel's counters.
    for key in ("max", "oom", "oom_kill"):
        assert total(changes, f"{key}_delta") == counters[key], key
    assert [e["values"]["oom_kill"] for e in changes if "oom_kill" in e["values"]] == [1]
    [kill] = w.events("kernel-kill")
    assert kill["scope"] == {"tree": "v2", "path": cg.rel}
    assert kill["values"]["oom_kill_delta"] == 1 and kill["values"]["oom_kill"] == 1
    assert set(kill["values"]) <= {"oom_delta", "oom", "oom_kill_delta", "oom_kill", "oom_group_kill_delta", "oom_group_kill"}


def test_a_group_oom_reports_oom_group_kill(guest: Guest, guest_cgroup: Make) -> None:
    cg = guest_cgroup("group")
    cg.write("memory.max", 48 * MiB)
    cg.write("memory.oom.group", 1)
    w = watch(guest, {"kind": "memory-events", "cgroups": [cg.rel]})
    bystander = hog(cg, 4, "--hold")
    touched(bystander)
    grower = hog(cg, 100)
    # One OOM kills the whole group, the bystander too.
    assert grower.wait(120) == -9 and bystander.wait(60) == -9
    counters = cg.keyed("memory.events")
    assert counters["oom_group_kill"] == 1
    w.wait(lambda w: total(w.events("kernel-kill"), "oom_kill_delta") == counters["oom_kill"], "every kill reported")
    w.stop()
    kills = w.events("kernel-kill")
    assert total(kills, "oom_group_kill_delta") == 1
    # oom_kill counts kills, not processes: the kernel kills the victim, then every task of
    # the group, the victim again among them.
    assert counters["oom_kill"] >= 2
    assert total(w.events("memory-events"), "oom_group_kill_delta") == 1


def test_memory_high_reports_high_and_kills_nobody(guest: Guest, guest_cgroup: Make) -> None:
    cg = guest_cgroup("high")
    cg.write("memory.high", 16 * MiB)
    cg.write("memory.max", 64 * MiB)
    w = watch(guest, {"kind": "memory-events", "cgroups": [cg.rel]})
    throttled = hog(cg, 48, "--hold")
    # Above memory.high the kernel reclaims and throttles instead of killing.
    w.wait(lambda w: total(w.events("memory-events"), "high_delta") >= 3, "high grew")
    assert throttled.poll() is None
    throttled.signal(9)
    throttled.wait()
    counters = cg.keyed("memory.events")
    w.stop()
    changes = w.events("memory-events")
    assert counters["high"] >= 3 and counters["oom_kill"] == 0
    assert 3 <= total(changes, "high_delta") <= counters["high"]
    assert total(changes, "oom_kill_delta") == 0 and w.events("kernel-kill") == []


def test_a_parent_sees_its_childs_oom_and_its_local_file_does_not(guest: Guest, guest_cgroup: Make) -> None:
    parent = guest_cgroup("parent")
    child = parent.child("child")
    child.write("memory.max", 32 * MiB)
    w = watch(
        guest,
        {"kind": "memory-events", "name": "tree", "cgroups": [parent.rel]},
        {"kind": "memory-events", "name": "local", "cgroups": [parent.rel, child.rel], "local": True},
    )
    assert hog(child, 64).wait(120) == -9
    w.wait(lambda w: bool(w.events("kernel-kill", "tree")) and bool(w.events("kernel-kill", "local")), "both kills")
    assert parent.keyed("memory.events")["oom_kill"] == 1
    assert parent.keyed("memory.events.local")["oom_kill"] == 0
    w.stop()
    [tree_kill] = w.events("kernel-kill", "tree")
    assert tree_kill["scope"]["path"] == parent.rel
    # memory.events.local counts what happened in that cgroup itself: the child's kill.
    assert [e["scope"]["path"] for e in w.events("kernel-kill", "local")] == [child.rel]
    assert all(e["scope"]["path"] == child.rel for e in w.events(source="local"))


def test_a_removed_cgroup_ends_its_watch_and_a_new_one_is_watched(guest: Guest, guest_cgroup: Make) -> None:
    cg = guest_cgroup("gone")
    w = watch(guest, {"kind": "memory-events", "cgroups": [cg.rel]})
    assert w.state()["watching"]["memory-events"] == [f"v2:{cg.rel}"]
    cg.remove()
    w.wait(lambda w: w.state()["watching"]["memory-events"] == [], "the watch ended")
    assert w.state()["faults"]["memory-events"] == 0
    # The same path made again is a new cgroup: watched, and its OOM reported.
    guest.run(["mkdir", cg.path])
    w.wait(lambda w: w.state()["watching"]["memory-events"] == [f"v2:{cg.rel}"], "the new cgroup watched")
    cg.write("memory.max", 32 * MiB)
    assert hog(cg, 64).wait(120) == -9
    w.wait(lambda w: bool(w.events("kernel-kill")), "the new cgroup's kill")
    w.stop()
    assert w.state()["faults"]["memory-events"] == 0
    assert "stopped watching it" in w.log() and "WARNING" not in w.log()


def test_cgroups_without_memory_events_are_refused_with_the_reason(guest: Guest, guest_cgroup: Make) -> None:
    parent = guest_cgroup("nomem")
    bare = GuestCgroup.make(guest, "bare", parent.path)  # parent enables no controller for it
    w = watch(guest, {"kind": "memory-events", "cgroups": ["/", bare.rel]})
    w.stop()
    assert w.state()["watching"]["memory-events"] == [] and w.state()["faults"]["memory-events"] == 2
    refusals = [ln for ln in w.log().splitlines() if "cannot watch" in ln]
    assert any("v2:/:" in ln and "the root cgroup has no memory.events" in ln for ln in refusals), refusals
    assert any(
        f"v2:{bare.rel}:" in ln and "the memory controller is not enabled for this cgroup" in ln
        and f"{parent.path}/cgroup.subtree_control" in ln
        for ln in refusals
    ), refusals
    # PSI needs no controller: the same cgroup has its memory.pressure.
    assert bare.read("memory.pressure").startswith("some ")


def test_the_daemon_reports_kernel_kills_to_its_notifiers(guest: Guest, guest_cgroup: Make) -> None:
    cg = guest_cgroup("daemon")
    cg.write("memory.max", 32 * MiB)
    guest.write("/tmp/oomkit-kernel-kill.toml", f'[[sources]]\nkind = "memory-events"\ncgroups = ["{cg.rel}"]\n')
    oomkit = str(Path(guest.interpreter).with_name("oomkit"))  # the venv's console script
    daemon = guest.spawn([oomkit, "serve", "-c", "/tmp/oomkit-kernel-kill.toml", "--dry-run", "--events", "-"])
    daemon.wait_for(lambda p: b"oomkit ready" in p.stderr, timeout=START_S, what="the daemon started")
    assert hog(cg, 64).wait(120) == -9
    daemon.wait_for(lambda p: bool(p.json()), timeout=60, what="a decision line")
    assert daemon.stop() == 0
    [decision] = daemon.json()
    assert decision["outcome"] == "observed" and decision["victim"] is None
    assert decision["event"]["kind"] == "kernel-kill" and decision["event"]["scope"]["path"] == cg.rel
    assert decision["event"]["values"]["oom_kill_delta"] == 1
