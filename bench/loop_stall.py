"""Loop stall: a takeover OOM's wake → kill sent while a 10 000-process ranking runs, vs idle.

An engine in this process takes over a real v1 memcg (32 MiB limit, ``memcg-oom``,
deadline 10 s) with the default plugins; a 64 MiB hog (``tests/hog.py``) started in it meets
the limit, the memcg pauses, the source wakes and the killer kills the hog: **wake → kill
sent** is the decision's own record (the event's ``monotonic_ns`` to ``KillResult.sent_ns``).

* ``idle``: nothing else runs.
* ``busy``: another task decides the system scope back to back, each decision ranking
  10 000 processes of a fake /proc (a candidates plugin reading each one's ``stat``,
  ``status``, ``oom_score_adj`` and ``cgroup`` with :func:`oomkit.procfs.read_process`, then
  every default scorer; a veto keeps anyone there from being killed).  Candidates and sync
  scorers run in a hook worker thread (:mod:`oomkit.hookthreads`), so the loop is free;
  what is left is the GIL, which the ranking thread hands over every
  ``sys.getswitchinterval()`` (5 ms by default; the ``switch`` column).  Before the hook
  worker threads, the whole ranking (``ranking ms p50``) ran on the loop, and a takeover
  that woke during it waited for the rest of it.

    python -m bench loop_stall       # or: python -m bench.loop_stall --runs 20 --processes 10000
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import anyio

from oomkit import Candidate, Decision, Engine, Event, hookimpl
from oomkit.cgroupfs import find_mounts
from oomkit.config import load_config
from oomkit.events import SYSTEM
from oomkit.procfs import read_process
from tests import kernel
from tests.takeover_support import takeover_config

from .selection import fake_tree
from .stats import summary, table

MiB = 1 << 20
STAGES = ("queued", "candidates", "score", "veto", "recheck", "kill")


class Big:
    """The system scope's candidates: every process of a fake tree, read as the default
    candidates plugin reads them."""

    name = "bench_big"

    def __init__(self, proc: str, pids: list[int]) -> None:
        self.proc = proc
        self.pids = pids

    @hookimpl
    def oomkit_candidates(self, event: Event) -> list[Candidate] | None:
        if event.scope != SYSTEM:
            return None
        out = []
        for pid in self.pids:
            c = read_process(self.proc, pid)
            if c is not None:
                out.append(msgspec_replace(c, pid=pid + 3_000_000))  # never a real pid
        return out


def msgspec_replace(c: Candidate, **changes: object) -> Candidate:
    import msgspec

    return msgspec.structs.replace(c, **changes)


class SpareSystem:
    """Vetoes everyone in the system scope: the busy rankings must kill nobody."""

    name = "bench_spare"

    @hookimpl
    def oomkit_veto(self, event: Event, candidates: Sequence[Candidate]) -> dict[int, str]:
        return {c.pid: "bench: ranked, not killed" for c in candidates} if event.scope == SYSTEM else {}


class Kills:
    name = "bench_kills"

    def __init__(self) -> None:
        self.seen: list[Decision] = []

    @hookimpl
    async def oomkit_notify(self, decision: Decision) -> None:
        if decision.event.kind == "oom" and decision.kill is not None:
            self.seen.append(decision)


async def measure(
    tmp: Path, cg: kernel.Cgroup, runs: int, busy: bool, fake: str, pids: list[int]
) -> tuple[list[float], list[float], dict[str, list[float]]]:
    cfg_path = tmp / f"loop-stall-{os.getpid()}.toml"
    cfg_path.write_text(takeover_config([cg.rel], tmp / "run", deadline_s=10.0,
                                        extra='\n[plugins]\ndisable = ["jsonl", "confirm"]\n'))
    kills = Kills()
    rankings: list[float] = []
    out: list[float] = []
    stages: dict[str, list[float]] = {}
    async with Engine(load_config(cfg_path), plugins=[Big(fake, pids), SpareSystem(), kills]) as engine:
        async with anyio.create_task_group() as tg:
            async def rank_forever() -> None:
                while True:
                    t0 = time.perf_counter()
                    await engine.decide(Event(source="bench", kind="low-memory"))
                    rankings.append((time.perf_counter() - t0) * 1e3)

            if busy:
                tg.start_soon(rank_forever)
                while not rankings:
                    await anyio.sleep(0.05)
            for _ in range(runs):
                before = len(kills.seen)
                hog = cg.hog(64)
                with anyio.fail_after(120):
                    while len(kills.seen) == before:
                        await anyio.sleep(0.01)
                await anyio.to_thread.run_sync(hog.wait)
                d = kills.seen[-1]
                assert d.kill is not None and d.kill.sent_ns
                out.append((d.kill.sent_ns - d.event.monotonic_ns) / 1e6)
                for stage, ns in d.stage_ns.items():
                    stages.setdefault(stage, []).append(ns / 1e6)
                await anyio.sleep(0.1)
            tg.cancel_scope.cancel()
    return out, rankings, stages


def skip_reason() -> str | None:
    return kernel.v1_skip_reason()


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.loop_stall")
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--processes", type=int, default=10_000)
    ap.add_argument("--switch", type=float, nargs="+", default=[0.005, 0.001],
                    help="GIL switch intervals to measure the busy case at (seconds)")
    args = ap.parse_args(argv)
    why = skip_reason()
    if why:
        print(f"loop_stall skipped: {why}")
        return
    parent = kernel.v1_parent()
    root = find_mounts("/proc")[0]
    assert parent is not None and root is not None
    base = "/dev/shm" if os.path.isdir("/dev/shm") else None
    rows = []
    stage_rows = []
    default_switch = sys.getswitchinterval()
    with tempfile.TemporaryDirectory(prefix=f"oomkit-loop-stall-{os.getpid()}-", dir=base) as tmp:
        fake = fake_tree(Path(tmp) / "proc", args.processes)
        pids = list(range(1000, 1000 + args.processes))
        cg = kernel.make(parent, root, "loopstall")
        try:
            cg.write("memory.limit_in_bytes", 32 * MiB)
            cases = [("idle", False, default_switch)] + [("busy", True, s) for s in args.switch]
            idle_p99 = 0.0
            for label, busy, switch in cases:
                sys.setswitchinterval(switch)
                try:
                    ms, rankings, stages = anyio.run(measure, Path(tmp), cg, args.runs, busy, str(fake.root), pids)
                finally:
                    sys.setswitchinterval(default_switch)
                s = summary(ms)
                if not busy:
                    idle_p99 = s["p99"]
                rank = summary(rankings)["p50"] if rankings else 0.0
                stage_rows.append([label, f"{switch * 1e3:g} ms",
                                   *(summary(stages.get(k, [0.0]))["p50"] for k in STAGES)])
                rows.append([label, f"{switch * 1e3:g} ms", args.processes if busy else 0, len(rankings), rank,
                             len(ms), s["p50"], s["p99"], s["max"], f"{s['p99'] / idle_p99:.2f}x" if idle_p99 else "-"])
        finally:
            cg.remove()
    print(table("loop stall: takeover wake → kill sent, ms (asyncio)",
                ["case", "switch", "ranked", "rankings", "ranking ms p50", "runs", "p50", "p99", "max", "p99 vs idle"],
                rows))
    print(table("loop stall: the takeover decision's own stages, ms p50", ["case", "switch", *STAGES], stage_rows))


if __name__ == "__main__":
    main(sys.argv[1:])
