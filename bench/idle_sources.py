"""What event-driven sources cost: the daemon at rest watching many cgroups, and in a storm.

    python -m bench.idle_sources [--cgroups 50] [--seconds 60] [--storm-seconds 10]
                                 [--idle-cmd "python -m oomkit serve -c {config}"]
                                 [--serve-cmd "python -m bench.engine_standin -c {config} ..."]

1. Idle: ``oomkit serve`` (``--idle-cmd``) watches ``--cgroups`` v1 memcgs
   (``memory.pressure_level`` and a usage threshold each) and as many v2 cgroups (a PSI
   trigger each), plus the system's PSI; its CPU time (every thread's
   ``/proc/PID/task/*/schedstat``) is read over ``--seconds``, and its memory
   (``/proc/PID/smaps_rollup``) at the end.  Target: under 0.1 % of one core.
2. Storm: one 64 MiB memcg thrashing its page cache (``tests/thrash.py``), which makes the
   kernel send ``memory.pressure_level`` notifications by the thousand.  The benchmark
   counts them itself on eventfds of its own (events in), and reads from the engine the
   events it received and the decisions it ran (the stand-in prints them at exit), and the
   engine's CPU time.

Each runs as a subprocess; ``{config}`` in a command is the config file.  The storm's
engine (``--serve-cmd``) is ``python -m bench.engine_standin``, which runs
``oomkit.Engine`` with the ``pressure`` plugin and prints its counters at exit, which the
daemon does not.  Needs root, the v1 memory controller and a v2 mount, as the integration
tests do (their cgroup helpers are reused, so a crashed run's cgroups are swept by the next
test run).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from oomkit.cgroupfs import find_mounts, register_v1_event

from .idle import rollup_mib
from tests import kernel
from tests.sources_support import cpu_ns

SERVE = f"{sys.executable} -m oomkit serve -c {{config}}"
STANDIN = f"{sys.executable} -m bench.engine_standin -c {{config}} --plugin oomkit_plugins.pressure:Pressure"
THRASH = Path(__file__).resolve().parent.parent / "tests" / "thrash.py"
MiB = 1 << 20


def toml_list(items: list[str]) -> str:
    return "[" + ", ".join(json.dumps(i) for i in items) + "]"


class EngineProcess:
    """The engine under test, in its own process; ``stop()`` returns its printed stats.

    Ready once its log (stderr) says ``engine ready``, as the engine logs at level info.
    """

    def __init__(self, serve_cmd: str, config: str, log: Path) -> None:
        self._log = log
        self._out = log.with_suffix(".out")
        argv = shlex.split(serve_cmd.format(config=config))
        with log.open("w") as err, self._out.open("w") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=err, text=True)
        deadline = time.monotonic() + 30
        while "engine ready" not in log.read_text():
            if self.proc.poll() is not None:
                raise RuntimeError(f"engine exited before it was ready:\n{log.read_text()}")
            if time.monotonic() > deadline:
                self.proc.kill()
                raise RuntimeError(f"engine not ready after 30 s; see {log}")
            time.sleep(0.05)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> dict[str, int]:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=30)
        for line in reversed(self._out.read_text().splitlines()):
            if line.startswith("{"):
                return dict(json.loads(line))
        return {}


def idle(args: argparse.Namespace, v1_parent: Path, v2_parent: Path, tmp: Path) -> list[tuple[str, str]]:
    v1_root, v2_root = find_mounts("/proc")
    assert v1_root is not None and v2_root is not None
    made = []
    try:
        for _ in range(args.cgroups):
            cg = kernel.make(v1_parent, v1_root, "bench")
            cg.write("memory.limit_in_bytes", 256 * MiB)
            made.append(cg)
            made.append(kernel.make(v2_parent, v2_root, "bench"))
        name = f"{kernel.PREFIX}{os.getpid()}-*-bench"
        v1_pattern = "/" + str(v1_parent.relative_to(v1_root)) + "/" + name
        v2_pattern = "/" + str(v2_parent.relative_to(v2_root)) + "/" + name
        config = tmp / "idle.toml"
        config.write_text(
            "[engine]\ndry_run = true\n\n"
            '[[sources]]\nkind = "psi"\nname = "psi-system"\n\n'
            f'[[sources]]\nkind = "psi"\nname = "psi-cgroups"\ncgroups = {toml_list([v2_pattern])}\n\n'
            f'[[sources]]\nkind = "memcg-pressure"\ncgroups = {toml_list([v1_pattern])}\n\n'
            f'[[sources]]\nkind = "memcg-threshold"\ncgroups = {toml_list([v1_pattern])}\nthresholds = ["90%"]\n'
        )
        engine = EngineProcess(args.idle_cmd, str(config), tmp / "idle.log")
        try:
            time.sleep(2)  # let start-up work (imports, first reads) finish
            threads = len(os.listdir(f"/proc/{engine.pid}/task"))
            c0, t0 = cpu_ns(engine.pid), time.monotonic()
            time.sleep(args.seconds)
            c1, t1 = cpu_ns(engine.pid), time.monotonic()
            mem = rollup_mib(engine.pid)
        finally:
            engine.stop()
    finally:
        for cg in reversed(made):
            cg.remove()
    pct = (c1 - c0) / ((t1 - t0) * 1e9) * 100
    log = (tmp / "idle.log").read_text()
    watching = [ln.split("oomkit.sources: ", 1)[-1] for ln in log.splitlines() if "watching" in ln]
    return [
        ("cgroups watched", f"{args.cgroups} v1 (pressure_level x2 levels + 1 threshold) + {args.cgroups} v2 (PSI) + system PSI"),
        ("engine log", "; ".join(watching) or "(no source log lines)"),
        ("engine threads", str(threads)),
        ("measured over", f"{t1 - t0:.1f} s"),
        ("engine CPU in that time", f"{(c1 - c0) / 1e6:.2f} ms (since its start: {c1 / 1e6:.0f} ms)"),
        ("idle CPU, % of one core", f"{pct:.4f} %  (target < 0.1 %)"),
        ("memory at the end", f"RSS {mem['Rss']:.1f} MiB, RssAnon {mem['Anonymous']:.1f} MiB, "
                              f"PSS {mem['Pss']:.1f} MiB"),
    ]


def storm(args: argparse.Namespace, v1_parent: Path, v2_parent: Path, tmp: Path) -> list[tuple[str, str]]:
    v1_root, v2_root = find_mounts("/proc")
    assert v1_root is not None and v2_root is not None
    v1 = kernel.make(v1_parent, v1_root, "storm")
    v2 = kernel.make(v2_parent, v2_root, "storm")
    thrash: subprocess.Popen[bytes] | None = None
    counters = []
    try:
        v1.write("memory.limit_in_bytes", 64 * MiB)
        config = tmp / "storm.toml"
        config.write_text(
            "[engine]\ndry_run = true\n\n"
            f'[[sources]]\nkind = "memcg-pressure"\ncgroups = {toml_list([v1.rel])}\n'
            'levels = ["low", "medium", "critical"]\nmin_interval_s = 1.0\n\n'
            f'[[sources]]\nkind = "psi"\ncgroups = {toml_list([v2.rel])}\nstall_ms = 50\n\n'
            "[plugins.pressure]\nmin_level = \"low\"\nthreshold_pct = 1.0\nduration_s = 0.0\n"
            "require_reclaim = false\n"
        )
        counters = [register_v1_event(v1.path, "memory.pressure_level", lvl) for lvl in ("low", "medium", "critical")]
        engine = EngineProcess(args.serve_cmd, str(config), tmp / "storm.log")
        try:
            procs = [str(v1.path / "cgroup.procs"), str(v2.path / "cgroup.procs")]

            def join() -> None:
                for p in procs:
                    with open(p, "w") as f:
                        f.write(str(os.getpid()))

            for ev in counters:
                ev.drain()
            c0, t0 = cpu_ns(engine.pid), time.monotonic()
            thrash = subprocess.Popen(
                [sys.executable, str(THRASH), str(tmp / "data"), "96", "--seconds", str(args.storm_seconds)],
                preexec_fn=join, stdout=subprocess.DEVNULL,
            )
            thrash.wait(timeout=args.storm_seconds + 60)
            time.sleep(1.5)  # the last throttled report
            c1, t1 = cpu_ns(engine.pid), time.monotonic()
            mem = rollup_mib(engine.pid)
        finally:
            stats = engine.stop()
        counts = [ev.drain() for ev in counters]
    finally:
        if thrash is not None and thrash.poll() is None:
            thrash.kill()
            thrash.wait()
        for ev in counters:
            ev.close()
        v1.remove()
        v2.remove()
    na = "n/a (the serve command printed no stats)"
    return [
        ("storm", f"{args.storm_seconds:g} s of page-cache thrashing in a 64 MiB memcg"),
        ("kernel notifications (low / medium / critical)", " / ".join(str(c) for c in counts)),
        ("events into the engine", str(stats.get("events", na))),
        ("decisions out (one at a time per scope)", str(stats.get("decisions", na))),
        ("coalesced while a decision ran", str(stats.get("coalesced", na))),
        ("engine CPU during the storm", f"{(c1 - c0) / 1e6:.1f} ms over {t1 - t0:.1f} s = "
                                        f"{(c1 - c0) / ((t1 - t0) * 1e9) * 100:.3f} % of one core"),
    ]


def print_table(title: str, rows: list[tuple[str, str]]) -> None:
    width = max(len(k) for k, _ in rows)
    print(f"\n{title}")
    print("-" * len(title))
    for k, v in rows:
        print(f"{k:<{width}}  {v}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.idle_sources", description=__doc__.split("\n\n")[0])
    ap.add_argument("--cgroups", type=int, default=50)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--storm-seconds", type=float, default=10.0)
    ap.add_argument("--idle-cmd", default=SERVE, help="the idle part's command; {config} is the config file")
    ap.add_argument("--serve-cmd", default=STANDIN, help="the storm's engine command; {config} is the config file")
    args = ap.parse_args(argv)
    reason = kernel.v1_skip_reason() or kernel.v2_skip_reason()
    if reason:
        print(f"idle_sources: cannot run here: {reason}", file=sys.stderr)
        return 1
    v1_parent, v2_parent = kernel.v1_parent(), kernel.v2_parent()
    assert v1_parent is not None and v2_parent is not None
    print(f"bench.idle_sources on {platform.system()} {platform.release()}, {os.cpu_count()} cores, "
          f"Python {platform.python_version()}")
    print(f"idle command: {args.idle_cmd}")
    print(f"storm command: {args.serve_cmd}")
    with tempfile.TemporaryDirectory(prefix="oomkit-bench-", dir="/var/tmp") as d:
        print_table("Idle", idle(args, v1_parent, v2_parent, Path(d)))
        print_table("pressure_level storm", storm(args, v1_parent, v2_parent, Path(d)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
