"""The memcg fixture itself: a hog is contained, and removal leaves nothing behind."""

from __future__ import annotations

import time

import pytest

from .. import kernel

pytestmark = pytest.mark.kernel


def test_hog_over_limit_is_killed_by_kernel_and_cgroup_is_removed(memcg) -> None:  # type: ignore[no-untyped-def]
    cg = memcg(limit=32 << 20)
    hog = cg.hog(64, hold=True)
    assert hog.wait(timeout=30) == -9  # the kernel's memcg OOM killer
    assert cg.keyed("memory.oom_control")["oom_kill"] >= 1
    path = cg.path
    cg.remove()
    assert not path.exists()


def test_removal_unpauses_a_cgroup_stalled_at_oom(memcg) -> None:  # type: ignore[no-untyped-def]
    cg = memcg(limit=32 << 20)
    cg.write("memory.oom_control", 1)
    hog = cg.hog(64, hold=True)
    deadline = time.monotonic() + 20
    while cg.keyed("memory.oom_control")["under_oom"] != 1:
        assert time.monotonic() < deadline, "the hog never reached its limit"
        time.sleep(0.01)
    cg.remove()
    assert hog.wait(timeout=10) == -9
    assert kernel.sweep_stale() == []
