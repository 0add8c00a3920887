"""The PSI source on a real cgroup v2 memory controller (in the guest).

Pressure comes from ``memory.high`` set well under what a hog touches: above it the kernel
reclaims and throttles the hog (from ~63 MiB/s to ~0.4 MiB/s in KERNEL.md's measurements)
instead of killing it, and every task of the cgroup stalls on memory.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.guest import Guest, GuestCgroup

from .support import MiB, hog, touched, watch

pytestmark = pytest.mark.kernel

Make = Callable[[str], GuestCgroup]


def test_a_cgroup_trigger_fires_under_throttling_clears_and_ends_with_its_cgroup(
    guest: Guest, guest_cgroup: Make
) -> None:
    cg = guest_cgroup("psi")
    cg.write("memory.high", 32 * MiB)
    cg.write("memory.max", 64 * MiB)
    w = watch(guest, {"kind": "psi", "cgroups": [cg.rel], "stall_ms": 150, "window_s": 1.0})
    assert w.state()["watching"]["psi"] == [f"v2:{cg.rel}"]
    throttled = hog(cg, 200, "--hold")
    w.wait(lambda w: len(w.events("pressure")) >= 2, "two pressure reports", timeout=120)
    assert throttled.poll() is None  # throttled, not killed
    throttled.signal(9)
    throttled.wait()
    w.wait(lambda w: bool(w.events("pressure-cleared")), "pressure-cleared after the hog is gone", timeout=60)
    cg.remove()
    w.wait(lambda w: w.state()["watching"]["psi"] == [], "the watch ended with its cgroup")
    w.stop()
    pressure = w.events("pressure")
    assert all(e["scope"] == {"tree": "v2", "path": cg.rel} for e in w.events())
    # The guest runs as root with CAP_SYS_RESOURCE: the trigger has the exact 1 s window.
    assert {e["values"]["trigger_window_us"] for e in pressure} == {1_000_000}
    # Each report read the stall totals anew, and they only grow.
    totals = [e["values"]["some_total_us"] for e in pressure]
    assert totals == sorted(totals) and totals[-1] - totals[0] >= 150_000
    kinds = [e["kind"] for e in w.events()]
    assert kinds[-1] == "pressure-cleared" and kinds.count("pressure-cleared") == 1
    assert w.state()["faults"]["psi"] == 0
    assert "the trigger reported POLLERR" in w.log() or "is gone" in w.log()


def test_an_unthrottled_cgroup_reports_nothing(guest: Guest, guest_cgroup: Make) -> None:
    cg = guest_cgroup("calm")
    cg.write("memory.max", 64 * MiB)
    w = watch(guest, {"kind": "psi", "cgroups": [cg.rel], "stall_ms": 150, "window_s": 1.0})
    calm = hog(cg, 16, "--hold")
    touched(calm)
    pressure = cg.read("memory.pressure")
    calm.signal(9)
    calm.wait()
    w.stop()
    assert w.events() == [], pressure
