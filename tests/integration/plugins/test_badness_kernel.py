"""KernelBadness against the kernel itself: /proc/PID/oom_score and a real memcg OOM."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from oomkit import Engine, Event, Scope
from oomkit.config import config_from_dict
from oomkit.procfs import read_process
from oomkit_plugins.kernel_badness import KernelBadness

from ... import kernel
from ..._support_plugins import configured_real

pytestmark = pytest.mark.kernel

MiB = 1 << 20

HOLD = (
    "import mmap, sys\n"
    "n = int(sys.argv[1]) << 20\n"
    "m = mmap.mmap(-1, max(n, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)\n"
    "for off in range(0, n, mmap.PAGESIZE):\n"
    "    m[off] = 1\n"
    "print('up', flush=True)\n"
    "sys.stdin.read()\n"
)


def set_adj(pid: int, adj: int) -> None:
    # Raising needs no privilege; lowering below 0 would need CAP_SYS_RESOURCE (KERNEL.md).
    with open(f"/proc/{pid}/oom_score_adj", "w") as f:
        f.write(str(adj))


@pytest.fixture
def holders(memcg: Callable[..., kernel.Cgroup]) -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    """Start processes that hold N MiB of private memory, in a 2 GiB memcg (never the
    machine's memory); they are killed with the memcg."""
    cg = memcg(limit=2048 * MiB)
    started: list[subprocess.Popen[bytes]] = []

    def start(mib: int, adj: int = 0, cgroup: kernel.Cgroup = cg) -> subprocess.Popen[bytes]:
        p = cgroup.spawn([sys.executable, "-c", HOLD, str(mib)], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        started.append(p)
        assert p.stdout is not None and p.stdout.readline() == b"up\n"
        if adj:
            set_adj(p.pid, adj)
        return p

    yield start
    for p in started:
        p.kill()
        p.wait()
        for pipe in (p.stdin, p.stdout):
            assert pipe is not None
            pipe.close()


def kernel_oom_score(score: float) -> int:
    """What /proc/PID/oom_score shows for a badness of ``score`` permille (fs/proc/base.c)."""
    return int((1000 + int(score)) * 2 / 3)


def test_system_scores_match_proc_oom_score(holders: Callable[..., subprocess.Popen[bytes]]) -> None:
    # 1 permille of this machine is tens of MiB, so sizes and adjustments are far apart.
    procs = [holders(mib, adj) for mib, adj in [(8, 0), (200, 0), (400, 0), (8, 30), (200, 60), (8, 500)]]
    plugin = configured_real(KernelBadness())
    cands = [read_process("/proc", p.pid) for p in procs]
    assert all(cands)
    scores = plugin.oomkit_score(Event(source="t", kind="low-memory"), [c for c in cands if c is not None])
    shown = [int(Path(f"/proc/{p.pid}/oom_score").read_text()) for p in procs]
    assert [kernel_oom_score(s) for s in scores] == shown
    # The ranking agrees wherever the kernel's own (rounded) numbers tell processes apart.
    for i in range(len(procs)):
        for j in range(len(procs)):
            if shown[i] > shown[j]:
                assert scores[i] > scores[j], (i, j, scores, shown)
    assert len(set(shown)) >= 5  # the test really compares different scores


def test_memcg_scope_ranks_as_the_kernels_memcg_oom_killer_chooses(
    memcg: Callable[..., kernel.Cgroup], holders: Callable[..., subprocess.Popen[bytes]]
) -> None:
    # In a 256 MiB memcg, adj 300 is worth 77 MiB: the 150 MiB process is the kernel's choice.
    # Scaled by the whole machine, adj 300 would make the small process the victim instead.
    cg = memcg(limit=256 * MiB)
    cg.write("memory.oom_control", 1)  # takeover: everyone waits while we look
    big = holders(150, 0, cgroup=cg)
    small = holders(8, 300, cgroup=cg)
    trigger = cg.hog(400, chunk_mib=1, hold=True, stdout=subprocess.DEVNULL)  # grows until the limit
    try:
        deadline = time.monotonic() + 30
        while cg.keyed("memory.oom_control")["under_oom"] != 1:
            assert time.monotonic() < deadline, "the memcg never reached its limit"
            time.sleep(0.01)
        plugin = configured_real(KernelBadness())
        cands = [c for c in (read_process("/proc", p.pid) for p in (big, small, trigger)) if c is not None]
        assert len(cands) == 3
        scope = Scope("v1", cg.rel)
        memcg_scores = plugin.oomkit_score(Event(source="t", kind="oom", scope=scope), cands)
        system_scores = plugin.oomkit_score(Event(source="t", kind="oom"), cands)
        ours = cands[max(range(3), key=lambda i: memcg_scores[i])].pid
        assert ours == big.pid
        assert cands[max(range(3), key=lambda i: system_scores[i])].pid == small.pid  # the scope matters
        # The whole engine under `policy = "kernel"` ranks first whom the kernel kills below;
        # the default policy takes the process that declared itself expendable instead.
        event = Event(source="t", kind="oom", scope=scope)
        kernel_policy = Engine(config_from_dict({"sources": [], "engine": {"policy": "kernel"}}))
        assert kernel_policy.rank(event)[0].candidate.pid == big.pid
        assert Engine(config_from_dict({"sources": []})).rank(event)[0].candidate.pid == small.pid
        cg.write("memory.oom_control", 0)  # hand the decision back: the kernel kills now
        assert big.wait(timeout=10) == -9
        assert small.poll() is None and trigger.poll() is None
    finally:
        trigger.kill()
        trigger.wait()
