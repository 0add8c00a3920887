"""The v2 usage-threshold source (``memory-threshold``) against the guest's real memory
controller: a hog grows past thresholds of its cgroup's ``memory.max`` and is killed by the
kernel at the limit; every crossing is reported, both ways, with what the kernel's
``memory.current`` said."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.guest import Guest, GuestCgroup

from .support import MiB, hog, touched, watch

pytestmark = pytest.mark.kernel

Make = Callable[[str], GuestCgroup]


def test_crossings_of_a_real_cgroup_are_reported_both_ways(guest: Guest, guest_cgroup: Make) -> None:
    cg = guest_cgroup("usage")
    cg.write("memory.max", 64 * MiB)
    w = watch(guest, {"kind": "memory-threshold", "cgroups": [cg.rel], "thresholds": ["25%", "48M"]})
    assert w.state()["watching"] == {"memory-threshold": [f"v2:{cg.rel}"]}
    held = hog(cg, 24, "--hold")  # with its interpreter: past 25 % (16 MiB), under 48 MiB
    touched(held)
    w.wait(lambda w: len(w.events("threshold")) >= 1, "the first crossing")
    [first] = w.events("threshold")
    assert first["scope"] == {"tree": "v2", "path": cg.rel}
    assert first["values"]["threshold_bytes"] == 16 * MiB and first["values"]["direction"] == 1
    assert first["values"]["usage_bytes"] >= 16 * MiB and first["values"]["limit_bytes"] == 64 * MiB
    grower = hog(cg, 96)  # past 48 MiB, then killed by the kernel at 64 MiB
    assert grower.wait(120) == -9
    held.signal(9)
    held.wait()
    cg.wait_empty()
    w.wait(lambda w: sum(e["values"]["direction"] == -1 for e in w.events("threshold")) >= 2, "both back down")
    w.stop()
    seen = [(e["values"]["threshold_bytes"] // MiB, e["values"]["direction"]) for e in w.events("threshold")]
    assert seen[:2] == [(16, 1), (48, 1)] and sorted(seen[2:]) == [(16, -1), (48, -1)], seen
    assert w.state()["faults"] == {"memory-threshold": 0}
