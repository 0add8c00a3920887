"""System threshold mode: oomkit's meminfo source against earlyoom and nohang.

Every daemon is set to act (SIGKILL) when MemAvailable falls under the same threshold T,
chosen ``--distance`` MiB under MemAvailable right before each run; each daemon is started
for one run and stopped once the hog is dead.  A hog
(``bench/c/hog.c``, comm ``benchhog``, ``oom_score_adj`` 1000) then allocates at a fixed
rate inside a v1 memcg whose hard limit sits ``--headroom`` MiB past T: a daemon that does
not act in time leaves the hog to the memcg OOM killer (counted, never the machine's).

Witnesses, independent of the daemons: ``bench/c/memsampler.c`` reads /proc/meminfo every
millisecond (the **crossing** is interpolated between the last sample above T and the first
under it; the **overshoot** is how far under T MemAvailable got before the hog died); the
``signal_generate`` tracepoint gives the **kill sent** and its sender; this process's
``waitpid`` gives the hog's **death** (reaped).

Two memory regimes (KERNEL.md: this VM hands freed memory back to its host, and touching it
again is slow): ``fresh`` allocates at 256 MiB/s, what memory the host took back allows;
``warm`` at 1024 MiB/s right after a warm-up hog touched nearly the same amount.  The rate
the hog reached is printed beside the results.

    python -m bench threshold          # or: python -m bench.threshold --runs 15 --distance 512
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from oomkit.cgroupfs import find_mounts
from oomkit.procfs import read_meminfo
from tests import kernel

from . import native, peers, tracing
from .memcg_oom import Stamp
from .stats import percentile, summary, table

REGIMES = {"fresh": (256.0, False), "warm": (1024.0, True)}


@dataclass
class Results:
    overshoot_mib: list[float] = field(default_factory=list)
    to_kill_ms: list[float] = field(default_factory=list)
    to_death_ms: list[float] = field(default_factory=list)
    rate_mib_s: list[float] = field(default_factory=list)
    missed: int = 0
    """Runs the memcg limit ended (the daemon never signalled in time)."""
    invalid: int = 0
    """Runs that measured nothing: MemAvailable drifted (other work on the machine) so the
    sampler never saw the crossing.  Counted and left out, so one bad run does not end the
    benchmark."""
    traces: list[tuple[float, list[tuple[float, float]]]] = field(default_factory=list)
    """Per run: (crossing→kill ms, [(ms from crossing, MiB under T)]) for the plot."""
    crossings: dict[int, float] = field(default_factory=dict)
    """Hog pid → crossing (monotonic ns), to place oomkit's own decision log on the same axis."""
    internals: dict[str, list[float]] = field(default_factory=dict)
    """oomkit only: its decision log's stages, in ms."""


def mem_available_kib() -> int:
    return read_meminfo("/proc", ("MemAvailable",))["MemAvailable"] // 1024


def steady_mem_available_kib(timeout_s: float = 180.0) -> int:
    """MemAvailable once it has stopped falling: three 1 s windows in a row, none down 8 MiB.

    After a hog dies this VM hands the freed memory to its host: MemAvailable drops by about
    the hog's size within a few seconds, then climbs back at a few MiB/s for a minute.  A
    threshold set during the drop would be crossed with no hog at all; one set during the
    slow climb is fine (it moves a few MiB during a run of a few seconds).
    """
    deadline = time.monotonic() + timeout_s
    last = mem_available_kib()
    steady = 0
    while steady < 3 and time.monotonic() < deadline:
        time.sleep(1.0)
        now = mem_available_kib()
        steady = steady + 1 if now - last > -8 * 1024 else 0
        last = now
    if steady < 3:
        raise RuntimeError(f"MemAvailable kept falling for {timeout_s:g} s (now {last} KiB)")
    return last


def _spawn_hog(cg: kernel.Cgroup, argv: list[str]) -> subprocess.Popen[bytes]:
    procs = str(cg.path / "cgroup.procs")

    def prepare() -> None:
        with open(procs, "w") as f:
            f.write(str(os.getpid()))
        # The one signal all three daemons read the same way (and raising it needs no privilege).
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write("1000")

    return subprocess.Popen(argv, preexec_fn=prepare)


def _sample(argv: list[str]) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE)
    assert proc.stdout is not None
    if proc.stdout.readline().strip() != b"ready":
        proc.kill()
        proc.wait()
        raise RuntimeError("memsampler did not start")
    return proc


def one_run(cg: kernel.Cgroup, trace: tracing.SignalTrace, stamp: Stamp, threshold_kib: int, floor_kib: int,
            mib: int, rate: float, warm: bool, res: Results) -> None:
    """One hog against the running daemon; left out unless MemAvailable is above ``floor_kib``
    when the hog starts."""
    hog_bin = str(native.build("hog"))
    if warm:
        stamp.reset()
        warmup = _spawn_hog(cg, [hog_bin, str(max(64, (mem_available_kib() - threshold_kib) // 1024 - 64)), "0",
                                 str(stamp.path)])
        deadline = time.monotonic() + 60
        # The warm-up can die early (its memcg, or a daemon): then it warmed what it could.
        while not stamp.done() and warmup.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        warmup.kill()
        warmup.wait()
    if mem_available_kib() < floor_kib:
        # MemAvailable fell toward T with no hog running (the VM taking memory back): a run
        # now would measure the host, not the daemon.
        res.invalid += 1
        print("  (run left out: MemAvailable fell toward the threshold before the hog started)", file=sys.stderr)
        return
    stamp.reset()
    trace.clear()
    sampler = _sample([str(native.build("memsampler")), "1000"])
    try:
        hog = _spawn_hog(cg, [hog_bin, str(mib), str(rate), str(stamp.path)])
        os.waitpid(hog.pid, 0)
        death = time.monotonic_ns()
        hog.returncode = -9
        time.sleep(0.1)
    finally:
        sampler.send_signal(signal.SIGTERM)
        out, _ = sampler.communicate(timeout=10)
    start, last, pages = stamp.read()
    samples = [(int(t), int(k)) for t, k in (ln.split() for ln in out.decode().splitlines())]
    kill = trace.first(hog.pid)
    i = next((i for i, (t, k) in enumerate(samples) if t >= start and k < threshold_kib), None)
    if i is None or i == 0:
        res.invalid += 1
        print("  (run left out: the sampler never saw MemAvailable cross the threshold before the memcg"
              " limit; it moved by more than --headroom since the daemon started)", file=sys.stderr)
        return
    if kill is None or kill.sender == peers.HOG:
        res.missed += 1
        return
    (t0, k0), (t1, k1) = samples[i - 1], samples[i]
    crossing = t0 + (t1 - t0) * (k0 - threshold_kib) / max(1, k0 - k1)
    lowest = min(k for t, k in samples if t <= death)
    res.overshoot_mib.append(max(0, threshold_kib - lowest) / 1024)
    res.to_kill_ms.append((kill.ns - crossing) / 1e6)
    res.to_death_ms.append((death - crossing) / 1e6)
    res.crossings[hog.pid] = crossing
    res.rate_mib_s.append(pages * mmap.PAGESIZE / 2**20 / max(1e-9, (last - start) / 1e9))
    res.traces.append(((kill.ns - crossing) / 1e6, [((t - crossing) / 1e6, (threshold_kib - k) / 1024)
                                                    for t, k in samples if -200e6 < t - crossing < 600e6]))


def measure(peer: str, regime: str, runs: int, distance_mib: int, headroom_mib: int,
            trace: tracing.SignalTrace) -> tuple[Results, str]:
    """Runs of one daemon in one regime; returns them and the daemon's command line.

    The daemon is started for each run and stopped as soon as the hog is dead, with T set
    from MemAvailable just before: a daemon left running between runs saw MemAvailable fall
    under T after a hog's death (the VM handing memory back) and, with no hog left, killed
    the benchmark itself.
    """
    rate, warm = REGIMES[regime]
    parent = kernel.v1_parent()
    root = find_mounts("/proc")[0]
    assert parent is not None and root is not None
    res = Results()
    cg = kernel.make(parent, root, f"bench-{peer}")
    argv = ""
    thresholds: list[int] = []
    try:
        cg.write("memory.limit_in_bytes", (distance_mib + headroom_mib) << 20)
        with tempfile.TemporaryDirectory() as tmp:
            stamp = Stamp(tmp)
            try:
                for _ in range(runs):
                    threshold_kib = steady_mem_available_kib() - distance_mib * 1024
                    thresholds.append(threshold_kib)
                    with peers.running(peer, Path(tmp), threshold_kib, settle_s=1.0) as proc:
                        argv = " ".join(str(a) for a in proc.args).replace(tmp, "$TMP")  # type: ignore[union-attr]
                        one_run(cg, trace, stamp, threshold_kib, threshold_kib + distance_mib * 1024 * 3 // 4,
                                distance_mib + 2 * headroom_mib, rate, warm, res)
            finally:
                stamp.close()
            if peer == "oomkit":
                _internals(Path(tmp) / "decisions.jsonl", res)
    finally:
        cg.remove()
    span = f"{min(thresholds)}..{max(thresholds)}" if thresholds else "none"
    return res, f"`{argv}` (T per run in {span} KiB)"


def _internals(log: Path, res: Results) -> None:
    """oomkit's view of each kill: when its poll saw the crossing, and what each stage took."""
    for line in log.read_text().splitlines() if log.exists() else ():
        d = json.loads(line)
        victim = d.get("victim") or {}
        crossing = res.crossings.get(victim.get("pid", -1))
        if crossing is None or d["outcome"] != "killed":
            continue
        seen = d["event"]["monotonic_ns"]
        for stage, ms in (("crossing→poll saw it", (seen - crossing) / 1e6),
                          ("poll→kill sent", (d["kill"]["sent_ns"] - seen) / 1e6),
                          *((f"  in chain: {k}", v / 1e6) for k, v in d["stage_ns"].items())):
            res.internals.setdefault(stage, []).append(ms)


def skip_reason() -> str | None:
    return kernel.v1_skip_reason() or native.skip_reason() or tracing.skip_reason()


def plot(results: dict[tuple[str, str], Results], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    regimes = [r for r in REGIMES if any(k[1] == r for k in results)]
    fig, axes = plt.subplots(1, len(regimes), figsize=(6 * len(regimes), 4), squeeze=False)
    for ax, regime in zip(axes[0], regimes):
        for peer in peers.PEERS:
            res = results.get((peer, regime))
            if res is None or not res.traces:
                continue
            median = percentile([t[0] for t in res.traces], 50)
            kill_ms, pts = min(res.traces, key=lambda t: abs(t[0] - median))
            line, = ax.plot([p[0] for p in pts], [p[1] for p in pts], label=f"{peer} (kill at {kill_ms:.0f} ms)")
            ax.axvline(kill_ms, color=line.get_color(), linestyle=":")
        ax.axhline(0, color="black", linewidth=0.8)
        top = ax.get_ylim()[1]
        ax.set_ylim(-0.3 * top, top * 1.05)  # the freed memory after the kill is off the interesting part
        ax.set_title(f"{regime} regime ({REGIMES[regime][0]:.0f} MiB/s): median run of each")
        ax.set_xlabel("ms from crossing the threshold")
        ax.set_ylabel("MiB under the threshold (MemAvailable)")
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.threshold")
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--distance", type=int, default=512, metavar="MIB",
                    help="threshold this far under MemAvailable at start")
    ap.add_argument("--headroom", type=int, default=768, metavar="MIB",
                    help="memcg hard limit this far past the threshold (the safety net)")
    ap.add_argument("--regimes", nargs="+", default=list(REGIMES), choices=list(REGIMES))
    ap.add_argument("--peers", nargs="+", default=list(peers.PEERS), choices=list(peers.PEERS))
    ap.add_argument("--plot", metavar="PNG")
    args = ap.parse_args(argv)
    reason = skip_reason()
    if reason:
        print(f"threshold benchmark skipped: {reason}\n")
        return
    results: dict[tuple[str, str], Results] = {}
    skipped: list[str] = []
    commands: list[str] = []
    with tracing.SignalTrace(peers.HOG) as trace:
        for regime in args.regimes:
            for peer in args.peers:
                why = peers.skip_reason(peer)
                if why:
                    skipped.append(f"- {peer}: not run: {why}")
                    continue
                results[(peer, regime)], command_line = measure(
                    peer, regime, args.runs, args.distance, args.headroom, trace)
                commands.append(f"- {regime}, {peers.version(peer)}: {command_line}")
    rows: list[tuple[object, ...]] = []
    for (peer, regime), res in results.items():
        o, k, d, r = (summary(x) for x in (res.overshoot_mib, res.to_kill_ms, res.to_death_ms, res.rate_mib_s))
        rows.append((regime, peer, f"{o['n']}/{o['n'] + res.missed}", res.invalid, r["p50"], o["p50"], o["p99"],
                     k["p50"], k["p99"], d["p50"], d["p99"]))
    print(table(
        f"threshold mode: MemAvailable under T = start - {args.distance} MiB, hog at a fixed rate",
        ("regime", "daemon", "acted", "left out", "hog MiB/s", "overshoot MiB p50", "p99",
         "crossing→kill sent ms p50", "p99", "crossing→death ms p50", "p99"),
        rows,
    ))
    print("\n".join(commands + skipped))
    print("- acted: runs where the daemon's signal reached the hog before the memcg limit did; "
          f"p99 over {args.runs} runs is close to the maximum. left out: runs where MemAvailable "
          "drifted so no crossing was seen, or fell toward T before the hog started (not counted either way).\n")
    inner = [(regime, stage, *(summary(v)[k] for k in ("n", "p50", "p99", "max")))
             for (peer, regime), res in results.items() if peer == "oomkit" for stage, v in res.internals.items()]
    if inner:
        print(table("threshold mode: inside oomkit, from its decision log (ms)",
                    ("regime", "stage", "runs", "p50", "p99", "max"), inner))
    if args.plot:
        plot(results, Path(args.plot))
        print(f"![MemAvailable around the crossing]({Path(args.plot).name})\n")


if __name__ == "__main__":
    main(sys.argv[1:])
