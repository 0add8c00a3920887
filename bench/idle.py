"""Idle cost: CPU and memory of oomkit serve, earlyoom and nohang doing nothing for a minute.

All three start on their default configuration (earlyoom with no options: it prints a memory
report every second by default; nohang with its packaged ``/etc/nohang/nohang.conf``), run
side by side, settle for ``--settle`` seconds, then are measured over ``--seconds``:

* CPU: the first field of ``/proc/PID/task/TID/schedstat`` (ns on a CPU) summed over every
  thread, before and after, as a percentage of one core (the process's own ``schedstat`` is
  its main thread only, and oomkit's meminfo source polls from a worker thread);
* memory at the end, from ``/proc/PID/smaps_rollup``: Rss, its anonymous part, and Pss
  (shared pages divided among their users).

A fourth row, ``deps only``, is the floor under oomkit's memory: the same Python importing
what ``oomkit serve`` cannot do without (asyncio with anyio's backend, pluggy, msgspec,
uvloop, importlib.metadata for entry points, tomllib) and then sleeping.

``--sleepers N`` starts N ``sleep`` processes first: a big host at rest, where oomkit's
warm-up (``[engine] warm_up``) has read every process and holds two descriptors for each
(its caches warm, so its memory is that of a table of N processes).

    python -m bench idle            # or: python -m bench.idle --seconds 60
    python -m bench.idle --sleepers 10000 --settle 15   # a host of 10 000 processes
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

from . import peers
from .stats import table
from tests.sources_support import cpu_ns


def rollup_mib(pid: int) -> dict[str, float]:
    out = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, value = line.split(":", 1)
        out[key] = int(value.split()[0]) / 1024
    return out


DEPS_ONLY = (
    "import asyncio, anyio, anyio._backends._asyncio, pluggy, msgspec, uvloop, importlib.metadata, tomllib, time\n"
    "while True: time.sleep(3600)"
)


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.idle")
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--settle", type=float, default=5.0)
    ap.add_argument("--peers", nargs="+", default=list(peers.PEERS), choices=list(peers.PEERS))
    ap.add_argument("--sleepers", type=int, default=0, metavar="N",
                    help="start N `sleep` processes first (~200 KiB each)")
    args = ap.parse_args(argv)
    notes = []
    with ExitStack() as stack, tempfile.TemporaryDirectory() as tmp:
        sleepers = [subprocess.Popen(["sleep", "3600"], stdin=subprocess.DEVNULL) for _ in range(args.sleepers)]
        for s in sleepers:
            stack.callback(s.wait)
            stack.callback(s.kill)
        if sleepers:
            notes.append(f"- {len(sleepers)} `sleep` processes ran beside them")
        procs = {}
        for peer in args.peers:
            why = peers.skip_reason(peer)
            if why:
                notes.append(f"- {peer}: not run: {why}")
                continue
            procs[peer] = stack.enter_context(peers.running(peer, Path(tmp), None, settle_s=0))
            argv_text = " ".join(str(a) for a in procs[peer].args).replace(tmp, "$TMP")  # type: ignore[union-attr]
            notes.append(f"- {peers.version(peer)}: `{argv_text}`")
        floor = subprocess.Popen([sys.executable, "-c", DEPS_ONLY])
        stack.callback(floor.wait)
        stack.callback(floor.kill)
        procs["deps only"] = floor
        notes.append(f"- deps only: `python -c {DEPS_ONLY.splitlines()[0]!r}`, then sleeps")
        time.sleep(args.settle)
        t0 = time.monotonic_ns()
        before = {peer: cpu_ns(p.pid) for peer, p in procs.items()}
        time.sleep(args.seconds)
        elapsed = time.monotonic_ns() - t0
        rows = []
        for peer, p in procs.items():
            mem = rollup_mib(p.pid)
            cpu = (cpu_ns(p.pid) - before[peer]) / elapsed * 100
            rows.append((peer, cpu, mem["Rss"], mem["Anonymous"], mem["Pss"], mem.get("Locked", 0.0)))
    print(table(
        f"idle cost over {args.seconds:g} s, default configurations"
        + (f", {args.sleepers} more processes on the host" if args.sleepers else ""),
        ("daemon", "CPU % of one core", "RSS MiB", "RssAnon MiB", "PSS MiB", "Locked MiB"),
        rows,
    ))
    print("\n".join(notes) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
