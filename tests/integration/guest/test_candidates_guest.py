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
