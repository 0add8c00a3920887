"""ProcessCandidates on real cgroups: a memcg's subtree, a v2 cgroup's subtree, the system."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator

import pytest

from oomkit import Event, Scope
from oomkit.procfs import own_cgroup
from oomkit_plugins.candidates import ProcessCandidates

from ... import kernel
from ..._support_plugins import configured_real

pytestmark = pytest.mark.kernel


@pytest.fixture
def sleepers() -> Iterator[Callable[[kernel.Cgroup], subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []

    def start(cg: kernel.Cgroup) -> subprocess.Popen[bytes]:
        p = cg.spawn([sys.executable, "-c", "import time; time.sleep(60)"])
        started.append(p)
        return p

    yield start
    for p in started:
        p.kill()
        p.wait()


def offered(scope: Scope) -> dict[int, str]:
    plugin = configured_real(ProcessCandidates())
    return {c.pid: c.cgroup for c in plugin.oomkit_candidates(Event(source="t", kind="oom", scope=scope))}


def test_a_memcg_offers_its_tasks_and_its_childrens(
    memcg: Callable[..., kernel.Cgroup], sleepers: Callable[[kernel.Cgroup], subprocess.Popen[bytes]]
) -> None:
    parent = memcg()
    child = kernel.Cgroup(parent.path / "child", parent.root)
    child.path.mkdir()  # removed with its parent, children first
    a, b = sleepers(parent), sleepers(child)
    assert offered(Scope("v1", parent.rel)) == {a.pid: parent.rel, b.pid: child.rel}
    assert offered(Scope("v1", child.rel)) == {b.pid: child.rel}


def test_a_v2_cgroup_offers_its_subtree(
    cgroup2: Callable[..., kernel.Cgroup], sleepers: Callable[[kernel.Cgroup], subprocess.Popen[bytes]]
) -> None:
    parent = cgroup2()
    child = kernel.Cgroup(parent.path / "child", parent.root)
    child.path.mkdir()
    # v2 forbids tasks in a cgroup that has children with controllers enabled; with none
    # enabled (no memory controller here) a parent may hold tasks too.
    a, b = sleepers(parent), sleepers(child)
    assert offered(Scope("v2", parent.rel)) == {a.pid: parent.rel, b.pid: child.rel}


def test_the_system_offers_us_with_our_memcg_and_no_kernel_threads() -> None:
    got = configured_real(ProcessCandidates()).oomkit_candidates(Event(source="t", kind="low-memory"))
    by_pid = {c.pid: c for c in got}
    me = by_pid[os.getpid()]
    assert me.cgroup == own_cgroup("/proc", "memory")
    assert me.rss_bytes > 0 and me.start_ticks > 0
    assert 2 not in by_pid  # kthreadd
    assert all(not c.kthread for c in got)
