"""The kill-each loop on the real v1 memory controller: a child memcg of a memcg under
takeover (its tasks paused at the limit, where the v1 freezer cannot help) ranked as a unit
and emptied, every task killed and recorded."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import anyio
import pytest

from oomkit import Engine
from oomkit.config import config_from_dict
from oomkit.events import Decision

from .. import kernel

pytestmark = pytest.mark.kernel

MiB = 1 << 20


@pytest.mark.anyio
async def test_the_kill_each_loop_empties_a_memcg_under_takeover(
    memcg: Callable[..., kernel.Cgroup], tmp_path: Path
) -> None:
    scope = memcg(limit=96 * MiB, tag="units")
    job = kernel.make(scope.path, scope.root, "job")
    small = kernel.make(scope.path, scope.root, "small")
    bystander = small.hog(8)
    try:
        holders = [job.hog(16) for _ in range(2)]
        raw = {
            "paths": {"run_dir": str(tmp_path / "run")},
            "sources": [{"kind": "memcg-oom", "cgroups": [scope.rel], "deadline_s": 5.0}],
            "plugins": {"units": {"cgroups": [f"v1:{scope.rel}"]}},
        }
        async with Engine(config_from_dict(raw, "<test>")) as engine:
            hog = job.hog(128)  # pauses at the limit: an OOM under takeover
            killed: list[Decision] = []
            with anyio.fail_after(60):
                while not killed:
                    killed = [d for d in engine.recent if d.outcome == "killed"]
                    await anyio.sleep(0.02)
        (d,) = killed
        assert d.victim is not None and d.victim.unit == "cgroup" and d.victim.cgroup == job.rel
        assert d.kill is not None and d.kill.action == "kill-cgroup" and "kill-each" in d.kill.detail
        assert sorted(d.killed) == sorted(p.pid for p in (*holders, hog))
        for p in (*holders, hog):
            assert p.wait(timeout=20) == -9
        assert job.procs() == [] and bystander.poll() is None
        assert scope.keyed("memory.oom_control")["oom_kill"] == 0  # oomkit killed, not the kernel
    finally:
        bystander.kill()
        bystander.wait()
        for cg in (job, small):
            cg.remove()
