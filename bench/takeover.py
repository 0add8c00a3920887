"""memcg OOM takeover latency of `oomkit serve`, from the eventfd wake to the cgroup running.

For each event loop, one `oomkit serve --takeover` runs against a fresh memcg (256 MiB limit)
and a hog that wants 512 MiB is started 30 times.  From the daemon's JSON decision log:
the wake (the source read the eventfd), the kill sent, the victim dead (its pidfd readable,
memory released); from this process: the hog reaped (waitpid returned) and `under_oom` read
back as 0.  All times are CLOCK_MONOTONIC, so they compare across the two processes.

    python -m bench takeover [--runs N] [--limit-mib N]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from tests import kernel

from .stats import summary, table

STAGES = ("wake→kill sent", "wake→victim dead", "wake→reaped", "wake→under_oom 0")


def _wait(pred: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.002)


def measure(loop: str, runs: int, limit_mib: int) -> dict[str, list[float]]:
    parent = kernel.v1_parent()
    root = kernel.find_mounts("/proc")[0]
    assert parent is not None and root is not None
    cg = kernel.make(parent, root, "bench")
    out: dict[str, list[float]] = {s: [] for s in STAGES}
    with tempfile.TemporaryDirectory() as tmp:
        events = Path(tmp) / "decisions.jsonl"
        cfg = Path(tmp) / "oomkit.toml"
        cfg.write_text('[[sources]]\nkind = "meminfo"\nmem_available = "0%"\n')
        errlog = open(Path(tmp) / "serve.log", "wb")
        cg.write("memory.limit_in_bytes", limit_mib << 20)
        serve = subprocess.Popen(
            [sys.executable, "-m", "oomkit", "serve", "-c", str(cfg), "--loop", loop,
             "--takeover", str(cg.path), "--events", str(events)],
            stdout=subprocess.DEVNULL, stderr=errlog,
        )
        try:
            _wait(lambda: b"oomkit ready" in (Path(tmp) / "serve.log").read_bytes(), 20, "oomkit ready")
            for i in range(runs):
                hog = cg.hog(limit_mib * 2, chunk_mib=4, stdout=subprocess.DEVNULL)
                # A blocking waitpid: Popen.wait(timeout=...) polls with sleeps of up to 50 ms.
                os.waitpid(hog.pid, 0)
                reaped = time.monotonic_ns()
                hog.returncode = -9
                _wait(lambda: cg.keyed("memory.oom_control")["under_oom"] == 0, 5, "under_oom 0")
                clear = time.monotonic_ns()
                _wait(lambda: events.exists() and len(events.read_text().splitlines()) > i, 5, "decision")
                d = json.loads(events.read_text().splitlines()[i])
                if d["outcome"] != "killed" or d["victim"]["pid"] != hog.pid:
                    raise RuntimeError(f"run {i}: unexpected decision {d['outcome']} for {d['victim']}")
                wake = d["event"]["monotonic_ns"]
                for stage, t in zip(STAGES, (d["kill"]["sent_ns"], d["kill"]["dead_ns"], reaped, clear)):
                    out[stage].append((t - wake) / 1e6)
                for stage, ns in d["stage_ns"].items():
                    out.setdefault(f"  in chain: {stage}", []).append(ns / 1e6)
                time.sleep(0.05)  # let the memcg's charge settle before the next hog
        finally:
            serve.send_signal(signal.SIGTERM)
            serve.wait(timeout=10)
            errlog.close()
            cg.remove()
    return out


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench takeover")
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--limit-mib", type=int, default=256)
    args = ap.parse_args(argv)
    reason = kernel.v1_skip_reason()
    if reason:
        print(f"takeover benchmark skipped: {reason}")
        return
    rows = []
    for loop in ("asyncio", "uvloop"):
        res = measure(loop, args.runs, args.limit_mib)
        for stage in res:
            s = summary(res[stage])
            rows.append((loop, stage, s["n"], s["p50"], s["p99"], s["max"]))
    print(table(
        f"memcg OOM takeover, {args.limit_mib} MiB limit, full hook chain (ms)",
        ("loop", "stage", "runs", "p50", "p99", "max"),
        rows,
    ))


if __name__ == "__main__":
    main(sys.argv[1:])
