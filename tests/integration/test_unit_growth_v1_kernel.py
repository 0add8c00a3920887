"""Kill the cause, for units, on the real v1 memory controller: under takeover, a child memcg
whose processes' summed memory grows beside a larger, stable child is the one ranked first
and killed whole, although its largest process is stable and smaller than the other child's."""

from __future__ import annotations

import subprocess
import sys
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


def _grower(cg: kernel.Cgroup, mib: int, rate: float) -> subprocess.Popen[bytes]:
    return cg.spawn([sys.executable, str(kernel.HOG), str(mib), "--rate", str(rate), "--hold"],
                    stdout=subprocess.PIPE)


def _ready(p: subprocess.Popen[bytes], word: str) -> None:
    assert p.stdout is not None
    while True:
        line = p.stdout.readline().decode()
        assert line, f"pid {p.pid} ended before {word!r}"
        if line.startswith(word):
            return


@pytest.mark.anyio
async def test_a_growing_child_memcg_beside_a_larger_stable_one_is_killed_whole(
    memcg: Callable[..., kernel.Cgroup], tmp_path: Path
) -> None:
    scope = memcg(limit=192 * MiB, tag="ugrow")
    stable = kernel.make(scope.path, scope.root, "stable")
    leak = kernel.make(scope.path, scope.root, "leak")
    procs: list[subprocess.Popen[bytes]] = []
    try:
        # stable: two 55 MiB holders (~130 MiB with their interpreters), the bigger unit to
        # the end.  leak: a 20 MiB holder, its largest process throughout, and two workers
        # growing 4 MiB/s each until the memcg is full.
        cache = [stable.hog(55, stdout=subprocess.PIPE) for _ in range(2)]
        server = leak.hog(20, stdout=subprocess.PIPE)
        procs += [*cache, server]
        for p in procs:
            _ready(p, "done")
        raw = {
            "paths": {"run_dir": str(tmp_path / "run")},
            "sources": [{"kind": "memcg-oom", "cgroups": [scope.rel], "deadline_s": 10.0}],
            "history": {"window_s": 3.0, "interval_s": 0.1},
            "plugins": {"units": {"cgroups": [f"v1:{scope.rel}"]}},
        }
        async with Engine(config_from_dict(raw, "<test>")) as engine:
            await anyio.sleep(4.5)  # longer than the window: the holders are old and stable
            workers = [_grower(leak, 64, 4.0) for _ in range(2)]  # together more than fits
            procs += workers
            done: list[Decision] = []
            with anyio.fail_after(90):
                while not done:
                    done = [d for d in engine.recent if d.outcome in ("killed", "failed", "all-vetoed")]
                    await anyio.sleep(0.02)
        (d,) = done
        assert d.outcome == "killed", d.detail
        ranked = {r.candidate.cgroup: r for r in d.ranking}
        assert set(ranked) == {stable.rel, leak.rel}, list(ranked)
        assert d.victim is not None and d.victim.unit == "cgroup" and d.victim.cgroup == leak.rel, d.detail
        # The leak's key, its largest process, is the stable server: only the sum grows.
        assert d.victim.pid == server.pid
        assert ranked[stable.rel].candidate.rss_bytes > d.victim.rss_bytes
        assert ranked[leak.rel].scores["growth"] > ranked[stable.rel].scores["growth"] + 50, ranked
        assert sorted(d.killed) == sorted(p.pid for p in (server, *workers))
        for p in (server, *workers):
            assert p.wait(timeout=20) == -9
        assert all(p.poll() is None for p in cache)
        assert scope.keyed("memory.oom_control")["oom_kill"] == 0  # oomkit killed, not the kernel
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
            if p.stdout is not None:
                p.stdout.close()
        for cg in (stable, leak):
            cg.remove()
