"""The ``candidates`` plugin on a real v2 scope, through ``oomkit top`` in the guest."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.guest import Guest, GuestCgroup

from .support import CHECKOUT, hog, touched

pytestmark = pytest.mark.kernel


def test_top_lists_the_processes_of_a_v2_scope_and_of_its_children(
    guest: Guest, guest_cgroup: Callable[[str], GuestCgroup]
) -> None:
    scope = guest_cgroup("scope")
    leaf = scope.child("leaf")
    inner = scope.child("inner")
    outside = guest_cgroup("outside")
    hogs = {leaf: hog(leaf, 4, "--hold"), inner: hog(inner, 8, "--hold"), outside: hog(outside, 4, "--hold")}
    for h in hogs.values():
        touched(h)
    oomkit = str(Path(guest.interpreter).with_name("oomkit"))
    top = guest.run([oomkit, "top", "--scope", f"v2:{scope.rel}", "--json"], cwd=str(CHECKOUT))
    rows = [json.loads(ln)["candidate"] for ln in top.text.splitlines()]
    assert {(r["pid"], r["cgroup"]) for r in rows} == {(hogs[leaf].pid, leaf.rel), (hogs[inner].pid, inner.rel)}
    by_pid = {r["pid"]: r for r in rows}
    # The 8 MiB hog holds more than the 4 MiB one, as the kernel counts its RSS.
    assert by_pid[hogs[inner].pid]["rss_bytes"] > by_pid[hogs[leaf].pid]["rss_bytes"] > 4 << 20


def test_kernel_badness_ranks_a_v2_scope_as_the_kernels_oom_killer_chooses(
    guest: Guest, guest_cgroup: Callable[[str], GuestCgroup]
) -> None:
    # oom_score_adj weighs totalpages / 1000 per point, and a memcg OOM's totalpages is the
    # cgroup's memory.max: at -100 the biggest hog stays the kernel's victim here, while a
    # scorer that scaled by the guest's RAM would rank it below the others.
    cg = guest_cgroup("rank")
    small, big, medium = (hog(cg, mib, "--hold") for mib in (8, 40, 16))
    for h in (small, big, medium):
        touched(h)
    guest.write(f"/proc/{big.pid}/oom_score_adj", -100)
    cg.write("memory.max", int(cg.read("memory.current")) + (16 << 20))
    oomkit = str(Path(guest.interpreter).with_name("oomkit"))
    top = guest.run([oomkit, "top", "--scope", f"v2:{cg.rel}", "--json"], cwd=str(CHECKOUT))
    ranked = [json.loads(ln) for ln in top.text.splitlines()]
    assert [r["candidate"]["pid"] for r in ranked] == [big.pid, medium.pid, small.pid]
    assert ranked[0]["vetoes"] == []
    # Now a real OOM: a fourth process grows past the limit, and the kernel picks.
    grower = hog(cg, 32)
    assert big.wait(120) == -9
    assert grower.wait(120) == 0 and small.poll() is None and medium.poll() is None
    assert cg.keyed("memory.events")["oom_kill"] == 1
