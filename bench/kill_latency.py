"""The first-party killer alone: from calling ``oomkit_kill`` to SIGKILL sent, and to death seen.

    python -m bench.kill_latency [--runs N]

Victims are idle sleeping children (no memory to tear down), so this is the killer's own
cost: pidfd_open, the start-time check, the signal, the pidfd wait.  Microseconds.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

import anyio

from oomkit import Engine, Event
from oomkit.config import config_from_dict
from oomkit.procfs import read_process

from .stats import summary, table

LOOPS: tuple[tuple[str, str, dict[str, object]], ...] = (("asyncio", "asyncio", {}), ("uvloop", "asyncio", {"use_uvloop": True}), ("trio", "trio", {}))


async def measure(n: int) -> tuple[list[float], list[float]]:
    # The installed killer, as the engine loads it (its entry point), configured by the engine.
    killer = Engine(config_from_dict({"sources": []})).pm.get_plugin("killer")
    assert killer is not None, "the first-party killer is not installed"
    event = Event(source="bench", kind="oom")
    to_sent: list[float] = []
    to_dead: list[float] = []
    for _ in range(n):
        child = subprocess.Popen(
            [sys.executable, "-c", "import time; print(1, flush=True); time.sleep(60)"], stdout=subprocess.PIPE
        )
        assert child.stdout is not None
        child.stdout.readline()
        victim = read_process("/proc", child.pid)
        assert victim is not None
        t0 = time.monotonic_ns()
        res = await killer.oomkit_kill(event, victim)
        to_sent.append((res.sent_ns - t0) / 1e3)
        to_dead.append((res.dead_ns - t0) / 1e3)
        child.wait()
        child.stdout.close()
    return to_sent, to_dead


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.kill_latency")
    ap.add_argument("--runs", type=int, default=100)
    args = ap.parse_args(argv)
    rows = []
    for label, backend, options in LOOPS:
        sent, dead = anyio.run(measure, args.runs, backend=backend, backend_options=options)
        for stage, xs in (("call → SIGKILL sent", sent), ("call → death seen", dead)):
            s = summary(xs)
            rows.append((label, stage, s["n"], s["p50"], s["p99"], s["max"]))
    print(table("first-party killer on idle children (µs)", ("loop", "stage", "runs", "p50", "p99", "max"), rows))


if __name__ == "__main__":
    main(sys.argv[1:])
