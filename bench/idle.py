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

    python -m bench idle            # or: python -m bench.idle --seconds 60
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
    args = ap.parse_args(argv)
    notes = []
    with ExitStack() as stack, tempfile.TemporaryDirectory() as tmp:
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
        f"idle cost over {args.seconds:g} s, default configurations",
        ("daemon", "CPU % of one core", "RSS MiB", "RssAnon MiB", "PSS MiB", "Locked MiB"),
        rows,
    ))
    print("\n".join(notes) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
