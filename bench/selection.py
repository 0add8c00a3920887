"""Victim selection cost: one ranking (read /proc, score, veto) over N candidates, cold and
warm, each beside the floor of what it reads.

``Engine.rank(event)`` runs the ``candidates``, ``score`` and ``veto`` hooks of the default
plugins (candidates, kernel_badness, protect, and the strategy library's scorers) for the
system scope, and the rows a decision records (``[engine] record_ranking``) are read from
it: the whole decision but the re-check and the kill.  A cold ranking reads every process's
``stat``, ``status``, ``oom_score_adj`` and ``cgroup``; a warm one (the candidates plugin's
process table, :mod:`oomkit.proctable`) ``stat`` and ``oom_score_adj`` through descriptors
it holds, and ``status`` again only for a process whose ``stat`` changed.  Fake trees (:class:`oomkit.testing.FakeProc`,
on tmpfs when ``/dev/shm`` exists, so in the page cache like the real /proc is in memory)
hold 100, 1 000 and 10 000 processes; the real ``/proc`` holds whatever runs here, kernel
threads included: every process is read, and kernel threads are then left out.

* **cold**: the first ranking of an engine just built (every cache of every plugin empty),
  beside its floor: ``/proc`` listed and the same files opened, read and closed from Python
  (``os.open``/``os.read``/``os.close``), nothing parsed.
* **warm**: the same engine's next rankings, nothing changed in the tree, beside the floor
  issue 17 sets for it: ``/proc`` listed and one ``stat`` read per process (opened, read,
  closed).  The table holds two descriptors per process within ``RLIMIT_NOFILE`` (raised to
  its hard limit, a reserve kept): the rest are read by path, so a low limit shows here.
  The benchmark first raises its own limit to ``--nofile`` (262 144 by default, the
  ``LimitNOFILE=`` of ``examples/systemd/oomkit.service``) where it may (as root), so the
  rows show what the daemon gets under its unit; the line above the table says the limit.
* **cold candidates hook**: the candidates hook alone, of another engine just built: what
  reading and parsing cost, beside the same floor; the rest of ``cold`` is scoring, vetoes
  and ordering.
* **candidates hook**: the warm ranking's candidates hook alone.
* ``--sleepers N`` adds a row for the real ``/proc`` with N more ``sleep`` processes.

Repeats are interleaved (a new engine's cold ranking, its warm one, the floors), so a
machine that is busy meanwhile slows every figure of a row alike.

    python -m bench selection        # or: python -m bench.selection --sizes 100 1000 10000 --repeat 30
    python -m bench.selection --sizes 100 --repeat 10 --sleepers 10000   # real processes too
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
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


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter_ns()
    fn()
    return (time.perf_counter_ns() - t0) / 1e6


FILES = ("stat", "status", "oom_score_adj", "cgroup")


def raw_reads(proc: str, names: dict[int, tuple[str, ...]]) -> None:
    """``proc`` listed, then each process's files read, nothing parsed."""
    for pid in list_pids(proc):
        for name in names.get(pid, FILES[:1]):
            try:
                read_small(f"{proc}/{pid}/{name}", 8192)
            except OSError:
                pass  # exited meanwhile (real /proc)


def files_read(proc: str) -> dict[int, tuple[str, ...]]:
    """What a cold ranking reads: four files per process, ``stat`` alone for a kernel thread."""
    out: dict[int, tuple[str, ...]] = {}
    for pid in list_pids(proc):
        kthread = read_process(proc, pid, skip_kthreads=True) is None
        out[pid] = FILES[:1] if kthread else FILES
    return out


def measure(config: Config, repeat: int) -> dict[str, list[float]]:
    """Times in ms by kind: cold, warm, candidates, floor_cold, floor_stat (and n)."""
    proc = config.paths.proc
    cold_files = files_read(proc)
    stat_only: dict[int, tuple[str, ...]] = {pid: FILES[:1] for pid in cold_files}
    out: dict[str, list[float]] = {k: [] for k in ("cold", "warm", "cold_candidates", "candidates", "floor_cold", "floor_stat")}
    recorded = config.engine.record_ranking
    for _ in range(repeat):
        first = Engine(config)
        out["cold_candidates"].append(timed(lambda: first.candidates(EVENT)))
        _close(first)
        engine = Engine(config)
        # What a decision reads of its ranking: the rows it records (a victim is among them).
        out["cold"].append(timed(lambda: engine.rank(EVENT).head(recorded)))
        out["warm"].append(timed(lambda: engine.rank(EVENT).head(recorded)))
        out["candidates"].append(timed(lambda: engine.candidates(EVENT)))
        out["floor_cold"].append(timed(lambda: raw_reads(proc, cold_files)))
        out["floor_stat"].append(timed(lambda: raw_reads(proc, stat_only)))
        _close(engine)
    out["n"] = [float(len(cold_files))]
    return out


def _close(engine: Engine) -> None:
    close = getattr(engine.pm.get_plugin("candidates"), "close", None)
    if close is not None:
        close()  # its descriptors now, not when the collector finds the engine


def row(label: str, m: dict[str, list[float]]) -> tuple[object, ...]:
    p50 = {k: summary(v)["p50"] for k, v in m.items()}
    cold, warm = summary(m["cold"]), summary(m["warm"])
    n = int(m["n"][0])
    return (label, n, p50["floor_cold"], p50["cold_candidates"], p50["cold_candidates"] / p50["floor_cold"],
            cold["p50"], cold["p99"], cold["p50"] / p50["floor_cold"],
            p50["floor_stat"], warm["p50"], warm["p99"], warm["p50"] / p50["floor_stat"], p50["candidates"],
            warm["p50"] * 1000 / max(1, n))


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.selection")
    ap.add_argument("--sizes", type=int, nargs="+", default=[100, 1000, 10000])
    ap.add_argument("--repeat", type=int, default=30)
    ap.add_argument("--sleepers", type=int, default=0, metavar="N",
                    help="also rank the real /proc with N more `sleep` processes (~200 KiB each)")
    ap.add_argument("--nofile", type=int, default=262144, metavar="N",
                    help="raise RLIMIT_NOFILE to N first where allowed (the shipped systemd unit's LimitNOFILE)")
    args = ap.parse_args(argv)
    if resource.getrlimit(resource.RLIMIT_NOFILE)[1] < args.nofile:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (args.nofile, args.nofile))
        except (OSError, ValueError):
            pass  # not root (or above fs.nr_open): what this process has is what it measures
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    rows = []
    base = "/dev/shm" if os.path.isdir("/dev/shm") else None
    for size in args.sizes:
        with tempfile.TemporaryDirectory(dir=base) as tmp:
            fake = fake_tree(Path(tmp) / "proc", size)
            rows.append(row(f"fake /proc, {size}", measure(config_for(fake), args.repeat)))
    rows.append(row("real /proc", measure(Config(sources=()), args.repeat)))
    if args.sleepers:
        sleepers = [subprocess.Popen(["sleep", "3600"], stdin=subprocess.DEVNULL) for _ in range(args.sleepers)]
        try:
            rows.append(row(f"real /proc + {args.sleepers} sleeps", measure(Config(sources=()), args.repeat)))
        finally:
            for p in sleepers:
                p.kill()
            for p in sleepers:
                p.wait()
    print(f"RLIMIT_NOFILE {soft}/{hard} (soft/hard) before the candidates plugin raises the soft one; "
          f"two descriptors per process held within it")
    print(table(
        f"victim selection: Engine.rank, system scope, default plugins, cold and warm beside their read floors"
        f" ({args.repeat} repeats, ms)",
        ("tree", "processes", "floor: cold files", "cold candidates hook p50", "hook/floor", "cold p50", "p99",
         "cold/floor", "floor: 1 stat each",
         "warm p50", "p99", "warm/floor", "candidates hook p50", "warm µs per process"),
        rows,
    ))


if __name__ == "__main__":
    main(sys.argv[1:])
