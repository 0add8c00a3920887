"""Wake-to-kill-sent latency of the first-party killer, on idle sleeping children.

    python bench/kill_latency.py [N] [asyncio|uvloop|trio]

Measures from the call of ``oomkit_kill`` to the SIGKILL leaving (``KillResult.sent_ns``),
and on to the pidfd reporting death (``dead_ns``); prints p50/p99/max in microseconds.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time

import anyio

from oomkit import Event
from oomkit.config import config_from_dict
from oomkit.procfs import read_process
from oomkit_plugins.killer import SignalKiller


def pct(values: list[float], p: float) -> float:
    return sorted(values)[min(len(values) - 1, int(len(values) * p))]


async def main(n: int) -> None:
    killer = SignalKiller()
    killer.oomkit_configure(config_from_dict({"sources": []}))
    event = Event(source="bench", kind="oom")
    to_sent: list[float] = []
    to_dead: list[float] = []
    for _ in range(n):
        child = subprocess.Popen([sys.executable, "-c", "import time; print(1, flush=True); time.sleep(60)"],
                                 stdout=subprocess.PIPE)
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
    for label, xs in (("call -> SIGKILL sent", to_sent), ("call -> death seen", to_dead)):
        print(f"{label:22s} p50 {statistics.median(xs):8.1f} us  p99 {pct(xs, 0.99):8.1f} us  max {max(xs):8.1f} us")


if __name__ == "__main__":
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 100
    backend = sys.argv[2] if len(sys.argv) > 2 else "asyncio"
    options = {"use_uvloop": True} if backend == "uvloop" else {}
    anyio.run(main, count, backend="trio" if backend == "trio" else "asyncio", backend_options=options)
