"""Victim selection cost: one ranking (read /proc, score, veto) over N candidates.

``Engine.rank(event)`` runs the ``candidates``, ``score`` and ``veto`` hooks of the default
plugins (candidates, kernel_badness, protect) for the system scope, reading every process's
``stat``, ``status``, ``oom_score_adj`` and ``cgroup``: the whole decision but the kill.
Fake trees (:class:`oomkit.testing.FakeProc`, on tmpfs when ``/dev/shm`` exists, so in the
page cache like the real /proc is in memory) hold 100, 1 000 and 10 000 processes; the real
``/proc`` holds whatever runs here, kernel threads included: every process is read, and
kernel threads are then left out of the candidates.  The candidates hook alone is timed too,
and so is the floor under both: the same files opened, read and closed from Python
(``os.open``/``os.read``/``os.close``), nothing parsed.

    python -m bench selection        # or: python -m bench.selection --sizes 100 1000 10000
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from oomkit import Config, Engine, Event
from oomkit.procfs import list_pids, read_process, read_small
from oomkit.testing import FakeProc, config_for

from .stats import summary, table

EVENT = Event(source="bench", kind="low-memory")


def fake_tree(root: Path, n: int) -> FakeProc:
    proc = FakeProc(root)
    for i in range(n):
        pid = 1000 + i
        proc.add_process(pid, f"worker{i % 97}", ppid=1, uid=1000 + i % 7, rss=(i % 251 + 1) << 20,
                         pgtables=(i % 13) << 12, oom_score_adj=(i % 5) * 100, memcg=f"/svc{i % 10}")
    return proc


def timed(fn: Callable[[], object], repeat: int) -> list[float]:
    out = []
    for _ in range(repeat):
        t0 = time.perf_counter_ns()
        fn()
        out.append((time.perf_counter_ns() - t0) / 1e6)
    return out


FILES = ("stat", "status", "oom_score_adj", "cgroup")


def raw_reads(paths: list[list[str]]) -> None:
    """The I/O floor of a ranking: each process's files read, nothing parsed."""
    for files in paths:
        for path in files:
            try:
                read_small(path, 8192)
            except OSError:
                pass  # exited meanwhile (real /proc)


def files_read(proc: str) -> list[list[str]]:
    """What the candidates hook reads: four files per process, ``stat`` alone for a kernel thread."""
    out = []
    for pid in list_pids(proc):
        kthread = read_process(proc, pid, skip_kthreads=True) is None
        out.append([f"{proc}/{pid}/{name}" for name in (FILES[:1] if kthread else FILES)])
    return out


def measure(config: Config, repeat: int) -> tuple[int, list[float], list[float], list[float]]:
    """(processes in the tree, raw read times, candidates hook times, whole ranking times), in ms."""
    engine = Engine(config)
    n = len(list_pids(config.paths.proc))
    paths = files_read(config.paths.proc)
    raw = timed(lambda: raw_reads(paths), repeat)
    cands = timed(lambda: engine.candidates(EVENT), repeat)
    rank = timed(lambda: engine.rank(EVENT), repeat)
    return n, raw, cands, rank


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.selection")
    ap.add_argument("--sizes", type=int, nargs="+", default=[100, 1000, 10000])
    ap.add_argument("--repeat", type=int, default=30)
    args = ap.parse_args(argv)
    rows = []
    base = "/dev/shm" if os.path.isdir("/dev/shm") else None
    for size in args.sizes:
        with tempfile.TemporaryDirectory(dir=base) as tmp:
            fake = fake_tree(Path(tmp) / "proc", size)
            n, raw, cands, rank = measure(config_for(fake), args.repeat)
        rows.append((f"fake /proc, {size}", n, *_cells(raw, cands, rank, n)))
    n, raw, cands, rank = measure(Config(sources=()), args.repeat)
    rows.append(("real /proc", n, *_cells(raw, cands, rank, n)))
    print(table(
        f"victim selection: Engine.rank over N candidates, system scope, default plugins ({args.repeat} repeats)",
        ("tree", "processes", "raw reads ms p50", "candidates hook ms p50", "p99", "whole ranking ms p50", "p99",
         "µs per process"),
        rows,
    ))


def _cells(raw: list[float], cands: list[float], rank: list[float], n: int) -> tuple[float, ...]:
    c, r = summary(cands), summary(rank)
    return summary(raw)["p50"], c["p50"], c["p99"], r["p50"], r["p99"], r["p50"] * 1000 / max(1, n)


if __name__ == "__main__":
    main(sys.argv[1:])
