"""The memory history's cost: CPU per sampled process, CPU of a scope it does not sample, and
what sampling does to a takeover OOM's wake-to-kill path, on the loop or in a thread.

Real processes (``sleep``) in a real v1 memcg made under this process's memcg, read through
the real ``/proc``:

* **sampling**: :class:`oomkit.history.History` on a warm scope of N processes (one ``stat``
  read each per tick); CPU is the thread time of the ticks, per tick and per process.
* **not sampling**: the same scope cold (usage under ``warm_fraction`` of the limit, more
  processes than ``small_scope_processes``): what a tick still costs (usage, limit and the
  process list), and a second without any scope.
* **OOM path**: ``oomkit serve`` taking over two memcgs, one holding N sleepers it samples
  (``warm_fraction = 0``: always warm) every ``interval_s`` = 50 ms, the other hit by a hog
  that runs into its 256 MiB limit again and again; wake → kill sent from oomkit's own
  decision log, with the history off, on the event loop (the default) and in a thread.

    python -m bench history          # or: python -m bench.history --processes 10 100 500 --runs 20
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from oomkit.cgroupfs import find_mounts
from oomkit.config import Config, HistoryConfig
from oomkit.events import Scope
from oomkit.history import History
from tests import kernel

from . import native
from .stats import summary, table

MiB = 1 << 20


def _sleepers(cg: kernel.Cgroup, n: int) -> list[subprocess.Popen[bytes]]:
    return [cg.spawn(["sleep", "3600"]) for _ in range(n)]


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        p.kill()
    for p in procs:
        p.wait()


def _ticks(history: History, seconds: float) -> tuple[float, int, int]:
    """(CPU us per tick, ticks, processes read) over ``seconds`` of back-to-back ticks."""
    cpu0, reads0, ticks0 = history.stats.cpu_ns, history.stats.reads, history.stats.ticks
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        history.tick()
    ticks = history.stats.ticks - ticks0
    return (history.stats.cpu_ns - cpu0) / 1e3 / max(1, ticks), ticks, history.stats.reads - reads0


def tick_costs(sizes: list[int]) -> list[tuple[object, ...]]:
    parent, root = kernel.v1_parent(), find_mounts("/proc")[0]
    assert parent is not None and root is not None
    rows: list[tuple[object, ...]] = []
    for n in sizes:
        cg = kernel.make(parent, root, "history")
        procs: list[subprocess.Popen[bytes]] = []
        try:
            cg.write("memory.limit_in_bytes", 1 << 30)
            procs = _sleepers(cg, n)
            scope = Scope("v1", cg.rel)
            warm = Config(sources=(), history=HistoryConfig(warm_fraction=0.0, tick_budget=1 << 16))
            h = History(warm, lambda: [scope])
            per_tick, ticks, reads = _ticks(h, 1.0)
            rows.append((n, "sampling (warm)", f"{per_tick:.0f}", f"{per_tick / max(1, reads / ticks):.2f}",
                         f"{per_tick * 4 / 1e4:.3f}"))
            cold = Config(sources=(), history=HistoryConfig(warm_fraction=1.0, small_scope_processes=max(1, n - 1)))
            h = History(cold, lambda: [scope])
            per_tick, ticks, reads = _ticks(h, 1.0)
            assert reads == 0, "a cold scope was sampled"
            rows.append((n, "not sampling (cold)", f"{per_tick:.0f}", "-", f"{per_tick * 4 / 1e4:.3f}"))
        finally:
            _stop(procs)
            cg.remove()
    idle = History(Config(sources=()), tuple)
    per_tick, _, _ = _ticks(idle, 0.5)
    rows.append((0, "no scope at all", f"{per_tick:.1f}", "-", f"{per_tick * 4 / 1e4:.4f}"))
    return rows


def _serve(tmp: Path, busy: kernel.Cgroup, sampled: kernel.Cgroup, history: str, events: Path) -> subprocess.Popen[bytes]:
    cfg = tmp / f"oomkit-{history}.toml"
    body = {"off": "enabled = false", "loop": "thread = false", "thread": "thread = true"}[history]
    cfg.write_text(
        '[[sources]]\nkind = "meminfo"\nmem_available = "0%"\n'
        f"[history]\n{body}\ninterval_s = 0.05\nwarm_fraction = 0.0\n"
    )
    log = tmp / f"serve-{history}.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "oomkit", "serve", "-c", str(cfg), "--takeover", str(busy.path),
         "--takeover", str(sampled.path), "--events", str(events)],
        stdout=subprocess.DEVNULL, stderr=open(log, "wb"),
    )
    deadline = time.monotonic() + 30
    while b"oomkit ready" not in log.read_bytes():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"oomkit serve did not start: {log.read_text()[-2000:]}")
        time.sleep(0.02)
    return proc


def oom_path(n: int, runs: int) -> list[tuple[object, ...]]:
    parent, root = kernel.v1_parent(), find_mounts("/proc")[0]
    assert parent is not None and root is not None
    hog = str(native.build("hog"))
    rows: list[tuple[object, ...]] = []
    for mode in ("off", "loop", "thread"):
        busy, sampled = kernel.make(parent, root, "hist-oom"), kernel.make(parent, root, "hist-sampled")
        procs: list[subprocess.Popen[bytes]] = []
        try:
            busy.write("memory.limit_in_bytes", 256 * MiB)
            sampled.write("memory.limit_in_bytes", 1 << 30)
            procs = _sleepers(sampled, n)
            with tempfile.TemporaryDirectory() as tmpdir:
                tmp = Path(tmpdir)
                events = tmp / "decisions.jsonl"
                serve = _serve(tmp, busy, sampled, mode, events)
                try:
                    time.sleep(1.0)  # a few ticks over the sleepers before the first OOM
                    for _ in range(runs):
                        h = busy.spawn([hog, "512"])
                        h.wait(timeout=30)
                        time.sleep(0.1)
                    samples = []
                    for line in events.read_text().splitlines():
                        d = json.loads(line)
                        if d.get("outcome") == "killed" and d.get("kill"):
                            samples.append((d["kill"]["sent_ns"] - d["event"]["monotonic_ns"]) / 1e6)
                finally:
                    serve.send_signal(signal.SIGTERM)
                    serve.wait(timeout=10)
            s = summary(samples)
            rows.append((mode, n, s["n"], s["p50"], s["p99"], s["max"]))
        finally:
            _stop(procs)
            busy.remove()
            sampled.remove()
    return rows


def skip_reason() -> str | None:
    return kernel.v1_skip_reason() or native.skip_reason()


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.history")
    ap.add_argument("--processes", type=int, nargs="+", default=[10, 100, 500])
    ap.add_argument("--runs", type=int, default=20, help="OOMs per history mode")
    ap.add_argument("--oom-processes", type=int, default=200, help="sleepers sampled during the OOMs")
    args = ap.parse_args(argv)
    reason = skip_reason()
    if reason:
        print(f"history benchmark skipped: {reason}\n")
        return
    print(table(
        "memory history: CPU per tick (back-to-back ticks; a tick every 0.25 s by default)",
        ("processes", "scope", "us per tick", "us per sampled process", "% of a core at 4 ticks/s"),
        tick_costs(args.processes),
    ))
    print(table(
        f"takeover OOM, 256 MiB, while {args.oom_processes} processes are sampled every 50 ms (ms, oomkit's log)",
        ("history", "sampled processes", "OOMs", "wake→kill sent p50", "p99", "max"),
        oom_path(args.oom_processes, args.runs),
    ))


if __name__ == "__main__":
    main(sys.argv[1:])
