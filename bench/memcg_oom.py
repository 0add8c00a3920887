"""memcg OOM reaction: the kernel's own killer, a hand-written floor, and oomkit, side by side.

A hog (``bench/c/hog.c``) touches private anonymous memory in a v1 memcg with a hard limit
until it hits it.  Four handlers, each on a memcg of its own:

* ``kernel``: no takeover; the kernel's memcg OOM killer picks and kills.
* ``floor (C)``: ``bench/c/floor.c``, the minimal user-space handler: eventfd wake, read
  ``cgroup.procs``, SIGKILL each pid.  The user-space floor.
* ``oomkit asyncio`` / ``oomkit uvloop``: ``oomkit serve --takeover`` on that loop, full hook
  chain (candidates, kernel_badness, protect, killer with process_mrelease, jsonl).

Timestamps, all CLOCK_MONOTONIC:

* **limit**: the hog stamps the time after every page it touched into a shared page; when it
  stalls, the last stamp is when the last page that fitted was charged, and its next fault is
  the one that met the limit (within a microsecond: the loop does nothing else).
* **wake**: the handler's own reading after the eventfd woke it (floor: its stdout; oomkit:
  the event's ``monotonic_ns`` in its decision log).  The kernel has no wake.
* **kill sent**: the kernel's ``signal_generate`` tracepoint for the hog (``bench.tracing``),
  the same witness for every handler, including the kernel's own killer.
* **reaped**: this process's blocking ``waitpid`` on the hog returned.
* **running**: ``under_oom`` read back as 0 right after (the memcg runs again).

oomkit's decision log adds its own stages (wake to kill sent, to victim dead) and the time
each link of the chain took.

    python -m bench memcg_oom            # or: python -m bench.memcg_oom --runs 30 --limits 256 2048
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from oomkit.cgroupfs import find_mounts
from tests import kernel

from . import native, tracing
from .stats import summary, table

HANDLERS = ("kernel", "floor (C)", "oomkit asyncio", "oomkit uvloop")
STAGES = ("limit→wake", "limit→kill sent", "wake→kill sent", "limit→reaped", "limit→running")


@dataclass
class Runs:
    """Per-stage samples in ms for one handler and limit, plus the hog's touch rate."""

    stages: dict[str, list[float]] = field(default_factory=dict)
    rate_gib_s: list[float] = field(default_factory=list)
    foreign: int = 0
    """Runs whose SIGKILL came from someone else than the handler (a handback to the kernel)."""

    def add(self, stage: str, ms: float) -> None:
        self.stages.setdefault(stage, []).append(ms)


class Stamp:
    """The hog's progress page: start, last page touched (ns), pages touched, done."""

    def __init__(self, directory: str) -> None:
        self.path = Path(directory) / "stamp"
        self.path.write_bytes(bytes(mmap.PAGESIZE))  # charged here, never to the hog's memcg
        self._fd = os.open(self.path, os.O_RDWR)
        self._map = mmap.mmap(self._fd, mmap.PAGESIZE)

    def reset(self) -> None:
        self._map[:32] = bytes(32)

    def read(self) -> tuple[int, int, int]:
        start, last, pages, _ = struct.unpack_from("4Q", self._map)
        return start, last, pages

    def done(self) -> bool:
        """The hog touched everything it was asked to."""
        return bool(struct.unpack_from("4Q", self._map)[3])

    def close(self) -> None:
        self._map.close()
        os.close(self._fd)


def _wait(pred: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.001)


class _Lines:
    """A child's stdout lines, collected by a thread so reading never blocks a run."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.lines: list[str] = []
        self._proc = proc
        self._thread = threading.Thread(target=self._pump, daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        assert self._proc.stdout is not None
        for raw in self._proc.stdout:
            self.lines.append(raw.decode().strip())

    def close(self) -> None:
        """After the child exited: its EOF ends the thread, then the pipe is closed."""
        self._thread.join(timeout=5)
        assert self._proc.stdout is not None
        self._proc.stdout.close()


@contextmanager
def _handler(name: str, cg: kernel.Cgroup, tmp: str) -> Iterator[Callable[[int, int], int | None]]:
    """Start the handler on ``cg``; yield ``wake(run, pid)``: its wake time for that run."""
    if name == "kernel":
        yield lambda run, pid: None
        return
    if name == "floor (C)":
        proc = subprocess.Popen([str(native.build("floor")), str(cg.path)], stdout=subprocess.PIPE)
        out = _Lines(proc)
        try:
            _wait(lambda: "ready" in out.lines, 10, "floor ready")

            def floor_wake(run: int, pid: int) -> int | None:
                _wait(lambda: any(ln.endswith(" 1") for ln in out.lines[1:]), 5, "floor's report")
                hit = [ln for ln in out.lines[1:] if ln.endswith(" 1")]
                del out.lines[1:]
                return int(hit[0].split()[0])

            yield floor_wake
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=10)
            out.close()
        return
    loop = name.split()[1]
    events = Path(tmp) / f"decisions-{loop}.jsonl"
    cfg = Path(tmp) / "oomkit.toml"
    # The meminfo source is the default; 0 % keeps it from ever acting on this machine.
    cfg.write_text('[[sources]]\nkind = "meminfo"\nmem_available = "0%"\n')
    log_path = Path(tmp) / f"serve-{loop}.log"
    with open(log_path, "wb") as errlog:
        serve = subprocess.Popen(
            [sys.executable, "-m", "oomkit", "serve", "-c", str(cfg), "--loop", loop,
             "--takeover", str(cg.path), "--events", str(events)],
            stdout=subprocess.DEVNULL, stderr=errlog,
        )
        try:
            _wait(lambda: b"oomkit ready" in log_path.read_bytes(), 30, "oomkit ready")
            seen = 0

            def oomkit_wake(run: int, pid: int) -> int | None:
                nonlocal seen
                _wait(lambda: events.exists() and len(events.read_text().splitlines()) > seen, 5, "decision")
                lines = events.read_text().splitlines()
                decisions = [json.loads(ln) for ln in lines[seen:]]
                seen = len(lines)
                mine = [d for d in decisions if d.get("victim") and d["victim"]["pid"] == pid]
                if not mine or mine[0]["outcome"] != "killed":
                    raise RuntimeError(f"run {run}: no kill of the hog in {decisions}")
                d = mine[0]
                wake = int(d["event"]["monotonic_ns"])
                oomkit_stages.append((wake, d["kill"]["sent_ns"], d["kill"]["dead_ns"], d["stage_ns"]))
                return wake

            yield oomkit_wake
        finally:
            serve.send_signal(signal.SIGTERM)
            serve.wait(timeout=10)


# oomkit's own view of each run (wake, sent, dead, stage_ns), filled by the handler above.
oomkit_stages: list[tuple[int, int, int, dict[str, int]]] = []


def measure(name: str, limit_mib: int, runs: int, trace: tracing.SignalTrace) -> Runs:
    parent = kernel.v1_parent()
    root = find_mounts("/proc")[0]
    assert parent is not None and root is not None
    cg = kernel.make(parent, root, "bench")
    res = Runs()
    hog_bin = str(native.build("hog"))
    oomkit_stages.clear()
    try:
        cg.write("memory.limit_in_bytes", limit_mib << 20)
        with tempfile.TemporaryDirectory() as tmp, _handler(name, cg, tmp) as wake_of:
            stamp = Stamp(tmp)
            try:
                for run in range(runs):
                    stamp.reset()
                    trace.clear()
                    hog = cg.spawn([hog_bin, str(limit_mib * 2), "0", str(stamp.path)])
                    # A blocking waitpid: Popen.wait(timeout=...) polls with sleeps of up to 50 ms.
                    os.waitpid(hog.pid, 0)
                    reaped = time.monotonic_ns()
                    hog.returncode = -9
                    _wait(lambda: cg.keyed("memory.oom_control")["under_oom"] == 0, 5, "under_oom 0")
                    running = time.monotonic_ns()
                    start, limit, pages = stamp.read()
                    kill = trace.first(hog.pid)
                    wake = wake_of(run, hog.pid)
                    if kill is None:
                        raise RuntimeError(f"{name}: run {run}: no signal to the hog was traced")
                    if name != "kernel" and kill.sender == "benchhog":
                        res.foreign += 1  # the kernel killed it: the handler was too late
                    res.rate_gib_s.append(pages * mmap.PAGESIZE / max(1, limit - start) * 1e9 / 2**30)
                    res.add("limit→kill sent", (kill.ns - limit) / 1e6)
                    res.add("limit→reaped", (reaped - limit) / 1e6)
                    res.add("limit→running", (running - limit) / 1e6)
                    if wake is not None:
                        res.add("limit→wake", (wake - limit) / 1e6)
                        res.add("wake→kill sent", (kill.ns - wake) / 1e6)
                    time.sleep(0.05)  # let the memcg's charge settle before the next hog
            finally:
                stamp.close()
        for wake, sent, dead, stage_ns in oomkit_stages:
            res.add("oomkit log: wake→kill sent", (sent - wake) / 1e6)
            res.add("oomkit log: wake→victim dead", (dead - wake) / 1e6)
            for stage, ns in stage_ns.items():
                res.add(f"  in chain: {stage}", ns / 1e6)
    finally:
        cg.remove()
    return res


def skip_reason() -> str | None:
    return kernel.v1_skip_reason() or native.skip_reason() or tracing.skip_reason()


def plot(results: dict[tuple[str, int], Runs], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    limits = sorted({limit for _, limit in results})
    fig, axes = plt.subplots(1, len(limits), figsize=(5.5 * len(limits), 4), squeeze=False)
    for ax, limit in zip(axes[0], limits):
        names = [n for n in HANDLERS if (n, limit) in results]
        data = [results[(n, limit)].stages["limit→reaped"] for n in names]
        ax.boxplot(data, whis=(1, 99), showfliers=True)
        ax.set_xticks(range(1, len(names) + 1), names, rotation=15)
        ax.set_title(f"memcg limit {limit} MiB: limit → victim reaped")
        ax.set_ylabel("ms (box: p25-p75, whiskers: p1-p99)")
        ax.set_ylim(bottom=0)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.memcg_oom")
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--limits", type=int, nargs="+", default=[256, 2048], metavar="MIB")
    ap.add_argument("--handlers", nargs="+", default=list(HANDLERS), choices=HANDLERS)
    ap.add_argument("--plot", metavar="PNG", help="write a box plot of limit→reaped here")
    args = ap.parse_args(argv)
    reason = skip_reason()
    if reason:
        print(f"memcg_oom benchmark skipped: {reason}\n")
        return
    results: dict[tuple[str, int], Runs] = {}
    with tracing.SignalTrace("benchhog") as trace:
        for limit in args.limits:
            for name in args.handlers:
                results[(name, limit)] = measure(name, limit, args.runs, trace)
    for limit in args.limits:
        rows: list[tuple[object, ...]] = []
        for name in args.handlers:
            res = results[(name, limit)]
            for stage in (*STAGES, *(s for s in res.stages if s not in STAGES)):
                if stage in res.stages:
                    s = summary(res.stages[stage])
                    rows.append((name, stage, s["n"], s["p50"], s["p99"], s["max"]))
        print(table(
            f"memcg OOM reaction, {limit} MiB limit (ms)",
            ("handler", "stage", "runs", "p50", "p99", "max"),
            rows,
        ))
        notes = []
        for name in args.handlers:
            res = results[(name, limit)]
            rate = summary(res.rate_gib_s)
            notes.append(f"- {name}: hog touched memory at {rate['p50']:.2f} GiB/s (p50 over its runs)"
                         + (f"; **{res.foreign} run(s) killed by the kernel instead**" if res.foreign else ""))
        print("\n".join(notes) + "\n")
    if args.plot:
        plot(results, Path(args.plot))
        print(f"![limit to victim reaped]({Path(args.plot).name})\n")


if __name__ == "__main__":
    main(sys.argv[1:])
