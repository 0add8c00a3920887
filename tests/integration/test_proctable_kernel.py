"""ProcessTable on real processes: an adj rewritten is seen at the next ranking, a reaped
process's held descriptors fail, and a pid reused by a new process (another uid, memcg and
adj; forced in a pid namespace of our own through ``ns_last_pid``) is never offered with
the old process's facts."""

from __future__ import annotations

import subprocess
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from oomkit.procfs import own_cgroup
from oomkit.proctable import FdBudget, ProcessTable

from .. import kernel
from ..pidreuse import run_in_pid_namespace

pytestmark = pytest.mark.kernel


def test_an_adj_rewritten_is_seen_at_the_next_ranking() -> None:
    child = subprocess.Popen(["sleep", "60"])
    try:
        # Until it has exec'd and loaded, the child's stat changes (comm, sizes, faults) and
        # the table would rightly re-read it between the two offers: wait until it is still.
        deadline, stat = time.monotonic() + 60, Path(f"/proc/{child.pid}/stat")
        while True:
            before = stat.read_bytes()
            time.sleep(0.05)
            if b"(sleep)" in before and stat.read_bytes() == before:
                break
            assert time.monotonic() < deadline, "the child never settled in sleep"
        table = ProcessTable("/proc", FdBudget(100), "memory")
        (first,) = table.offer([child.pid])
        assert first.oom_score_adj == 0
        assert table.offer([child.pid]) == [first]
        # Raising is allowed without CAP_SYS_RESOURCE (KERNEL.md); nothing else changes.
        with open(f"/proc/{child.pid}/oom_score_adj", "w") as f:
            f.write("321")
        (again,) = table.offer([child.pid])
        assert (again.oom_score_adj, again.start_ticks) == (321, first.start_ticks)
        assert table.stats.cold == 1
    finally:
        child.kill()
        child.wait()
    assert table.offer([child.pid]) == []  # reaped: its descriptors fail
    assert table.stats.reused == 1 and len(table) == 0
    table.close()


_REUSE = textwrap.dedent("""
    import json, os, subprocess, sys
    from oomkit.proctable import FdBudget, ProcessTable
    from tests.pidreuse import spawn_with_pid

    procs = sys.argv[1]
    table = ProcessTable("/proc", FdBudget(100), "memory")
    old = subprocess.Popen(["sleep", "60"])
    (before,) = table.offer([old.pid])
    old.kill()
    old.wait()
    new = spawn_with_pid(old.pid, ["sleep", "60"], user=65534)
    with open(procs, "w") as f:
        f.write(str(new.pid))
    with open(f"/proc/{new.pid}/oom_score_adj", "w") as f:
        f.write("300")
    (after,) = table.offer([new.pid])
    new.kill()
    new.wait()
    print(json.dumps({"pid": [before.pid, after.pid], "uid": [before.uid, after.uid],
                      "cgroup": [before.cgroup, after.cgroup], "adj": [before.oom_score_adj, after.oom_score_adj],
                      "start": [before.start_ticks, after.start_ticks], "reused": table.stats.reused}))
""")


def test_a_reused_pid_is_never_offered_with_the_old_process_facts(memcg: Callable[..., kernel.Cgroup]) -> None:
    cg = memcg(tag="reuse")
    ours = own_cgroup("/proc", "memory")
    got = run_in_pid_namespace(_REUSE, str(cg.path / "cgroup.procs"))
    assert got["pid"][0] == got["pid"][1]
    assert got["uid"] == [0, 65534]
    assert got["cgroup"] == [ours, cg.rel]
    assert got["adj"] == [0, 300]
    assert got["reused"] == 1
