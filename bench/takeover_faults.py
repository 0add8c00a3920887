"""Takeover faults: how long a memcg stays paused past its deadline, and how soon it is back
with the kernel when oomkit dies.

Each run gives a v1 memcg (32 MiB limit) to a real ``oomkit serve`` (deadline 1 s, the
watchdog rescanning every 5 s) and starts a 64 MiB hog in it (``tests/hog.py``).  A thread of
this process reads the memcg's ``memory.oom_control`` every millisecond (``tests.
takeover_support.PauseWatch``): a pause runs from the first read of ``under_oom 1`` to the
first read of 0, when the hog is dead and the memcg runs again.

Paused past the deadline (pause length minus the deadline), per fault:

* ``nobody kills (dry-run)``: the daemon decides and kills nothing, so the watchdog hands
  the memcg back at the deadline and the kernel kills; the baseline for the next two.
* ``veto blocks 3 s``: a sync veto plugin sleeps 3 s in the daemon's event loop.
* ``daemon SIGSTOPped``: the daemon is stopped before the hog starts.

Back with the kernel after a death (from the signal to the end of the pause; the daemon runs
with ``--dry-run`` and a one-hour deadline, so only the death can end the pause):

* ``daemon SIGKILLed``: its watchdog reads end of file and restores.
* ``daemon's process group SIGKILLed``: likewise; the watchdog has a session of its own.
* ``watchdog SIGTERMed``: it restores, then the daemon starts a new one (the memcg is taken
  over again: the second column measures that, from the signal).
* ``both SIGKILLed, then oomkit restore``: from the start of ``oomkit restore`` (a new
  Python process, its start-up included) to the end of the pause.
* ``inherited child``: from ``mkdir`` of a child under the memcg (it inherits
  ``oom_kill_disable=1``) to the daemon's watchdog having reset it to 0 (1 ms polls).
* ``removed and made again``: from ``mkdir`` of the memcg, right after its ``rmdir``, to
  ``oom_kill_disable=1`` again (the daemon took the new memcg over).

Plugin faults (``tests/fault_plugins.py``, the cases of
``tests/integration/test_takeover_plugin_faults.py``): the same memcg with a small ``sleep``
beside the hog, the daemon loading the case's misbehaving plugins, deadline 1 s.  Each row
gives how long the memcg stayed paused and how long past its deadline (0 when our kill or
the engine's hand-back ended it first).  A pause too short for the 1 ms poll to see (the
poll thread shares the interpreter with the benchmark) counts as 0 and is listed as missed.

    python -m bench takeover_faults            # or: python -m bench.takeover_faults --runs 10
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from oomkit.cgroupfs import find_mounts
from tests import fault_plugins, kernel
from tests.takeover_support import Daemon, Pause, PauseWatch, oom_control, oomkit, state_of, takeover_config, wait_for

from .stats import summary, table

MiB = 1 << 20
LIMIT = 32 * MiB
HOG_MIB = 64
LONG = 120.0


def skip_reason() -> str | None:
    return kernel.v1_skip_reason()


class Bench:
    def __init__(self, tmp: Path, deadline_s: float) -> None:
        self.tmp = tmp
        self.deadline_s = deadline_s
        parent = kernel.v1_parent()
        root = find_mounts("/proc")[0]
        assert parent is not None and root is not None
        self.parent, self.root = parent, root
        self.n = 0

    def memcg(self) -> kernel.Cgroup:
        cg = kernel.make(self.parent, self.root, "bench")
        cg.write("memory.limit_in_bytes", LIMIT)
        return cg

    def daemon(
        self, cg: kernel.Cgroup, *args: str, deadline_s: float | None = None, extra: str = "", group: bool = False,
        load: tuple[str, ...] = (), protect: tuple[str, ...] = ("sleep",),
    ) -> Daemon:
        self.n += 1
        run_dir = self.tmp / f"run-{self.n}"
        config = takeover_config([cg.rel], run_dir, deadline_s=deadline_s or self.deadline_s, extra=extra,
                                 load=load, protect=protect)
        return Daemon(self.tmp, config, *args, tag=f"-{self.n}", group=group).wait_ready(timeout=LONG)

    def pause(self, cg: kernel.Cgroup, during: Callable[[], None] = lambda: None) -> Pause:
        """Start a hog, run ``during`` once it is paused; the first pause, once it ended."""
        with PauseWatch(cg.path) as watch:
            hog = cg.hog(HOG_MIB, stdout=subprocess.DEVNULL)
            try:
                wait_for(lambda: bool(watch.pauses), LONG, "the hog to reach its limit", step=0.0005)
                during()
                try:
                    wait_for(watch.ended, LONG, "the pause to end", step=0.0005)
                except AssertionError as exc:
                    # Say what was left paused: this is the fault the benchmark exists to catch.
                    raise AssertionError(f"{exc}: {cg.path.name} {oom_control(cg.path)}, tasks {cg.procs()}") from None
            finally:
                hog.kill()
                hog.wait()
        return watch.pauses[0]

    def killed_pause(self, cg: kernel.Cgroup) -> Pause | None:
        """Start a hog and wait for its death; the first pause (None if none was seen)."""
        with PauseWatch(cg.path) as watch:
            hog = cg.hog(HOG_MIB, stdout=subprocess.DEVNULL)
            try:
                hog.wait(timeout=LONG)
                wait_for(lambda: oom_control(cg.path)["under_oom"] == 0, LONG, "the memcg to run again")
                wait_for(watch.ended if watch.pauses else lambda: True, LONG, "the pause to end", step=0.0005)
            finally:
                if hog.poll() is None:
                    hog.kill()
                hog.wait()
        return watch.pauses[0] if watch.pauses else None


def plugin_faults(b: Bench, runs: int) -> tuple[dict[str, list[float]], dict[str, list[float]], dict[str, int]]:
    """Per case: how long each pause lasted, how long past the deadline, pauses not seen."""
    paused: dict[str, list[float]] = {}
    late: dict[str, list[float]] = {}
    missed: dict[str, int] = {}
    for name, case in fault_plugins.CASES.items():
        paused[name], late[name], missed[name] = [], [], 0
        cg = b.memcg()
        sibling = cg.spawn(["sleep", "3600"])
        load = tuple(f"tests.fault_plugins:{p.__name__}" for p in case.plugins)
        d = b.daemon(cg, load=load, protect=())
        try:
            for _ in range(runs):
                pause = b.killed_pause(cg)
                if pause is None:
                    missed[name] += 1
                    length = 0.0
                else:
                    length = pause.length
                paused[name].append(length * 1000)
                late[name].append(max(0.0, length - b.deadline_s) * 1000)
                assert sibling.poll() is None, f"{name}: the sibling was killed"
                wait_for(lambda: oom_control(cg.path)["oom_kill_disable"] == 1, LONG, "the memcg taken over again")
        finally:
            d.stop()
            d.cleanup()
            sibling.kill()
            sibling.wait()
            cg.remove()
    return paused, late, missed


def past_deadline(b: Bench, runs: int) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    veto = '\n[plugins]\nload = ["tests.takeover_support:BlockingVeto"]\n'
    for name, args, extra, stop in (
        ("nobody kills (dry-run)", ("--dry-run",), "", False),
        ("veto blocks 3 s", (), veto, False),
        ("daemon SIGSTOPped", ("--dry-run",), "", True),
    ):
        samples = out[name] = []
        cg = b.memcg()
        d = b.daemon(cg, *args, extra=extra)
        try:
            for _ in range(runs):
                if stop:
                    d.signal(signal.SIGSTOP)
                    wait_for(lambda: state_of(d.pid) == "T", LONG, "the daemon to stop")
                samples.append((b.pause(cg).length - b.deadline_s) * 1000)
                if stop:
                    d.signal(signal.SIGCONT)
                # Taken over again (after the 3 s veto, for that one) before the next run.
                wait_for(lambda: oom_control(cg.path)["oom_kill_disable"] == 1, LONG, "the memcg taken over again")
                time.sleep(0.2 if not extra else 3.5)
        finally:
            d.stop()
            d.cleanup()
            cg.remove()
    return out


def after_death(b: Bench, runs: int) -> tuple[dict[str, list[float]], list[float]]:
    out: dict[str, list[float]] = {k: [] for k in (
        "daemon SIGKILLed", "daemon's process group SIGKILLed", "watchdog SIGTERMed",
        "both SIGKILLed, then oomkit restore", "inherited child", "removed and made again",
    )}
    retaken: list[float] = []
    for _ in range(runs):
        for name in out:
            cg = b.memcg()
            d = b.daemon(cg, "--dry-run", deadline_s=3600, group=name.startswith("daemon's"))
            try:
                t: list[float] = []
                if name == "inherited child":
                    child = cg.path / "child"
                    t0 = time.monotonic()
                    child.mkdir()
                    wait_for(lambda: oom_control(child)["oom_kill_disable"] == 0, LONG, "the child reset", step=0.0005)
                    out[name].append((time.monotonic() - t0) * 1000)
                    continue
                if name == "removed and made again":
                    cg.path.rmdir()
                    t0 = time.monotonic()
                    cg.path.mkdir()
                    wait_for(lambda: oom_control(cg.path)["oom_kill_disable"] == 1, LONG, "taken over again", step=0.0005)
                    out[name].append((time.monotonic() - t0) * 1000)
                    continue

                def die() -> None:
                    dog = d.watchdog()
                    if name == "daemon SIGKILLed":
                        t.append(time.monotonic())
                        d.proc.kill()
                    elif name.startswith("daemon's"):
                        t.append(time.monotonic())
                        os.killpg(d.pid, signal.SIGKILL)
                    elif name == "watchdog SIGTERMed":
                        t.append(time.monotonic())
                        os.kill(dog, signal.SIGTERM)
                    else:
                        # Stopped first: it must not see its watchdog die and replace it.
                        d.signal(signal.SIGSTOP)
                        wait_for(lambda: state_of(d.pid) == "T", LONG, "the daemon to stop")
                        os.kill(dog, signal.SIGKILL)
                        d.proc.kill()
                        d.proc.wait()
                        wait_for(lambda: state_of(dog) in ("-", "Z"), LONG, "the watchdog gone")
                        t.append(time.monotonic())
                        done = oomkit("restore", "-c", str(d.config))
                        assert done.returncode == 0, done.stdout + done.stderr

                try:
                    pause = b.pause(cg, die)
                except AssertionError as exc:
                    raise AssertionError(f"{name}: {exc}; the daemon said: {d.stderr()[-2000:]}") from None
                assert pause.end is not None
                out[name].append((pause.end - t[0]) * 1000)
                if name == "watchdog SIGTERMed":
                    wait_for(lambda: oom_control(cg.path)["oom_kill_disable"] == 1, LONG, "taken over again", step=0.0005)
                    retaken.append((time.monotonic() - t[0]) * 1000)
            finally:
                if d.proc.poll() is None:
                    d.stop()
                d.cleanup()
                kernel.remove_tree(cg.path / "child")
                cg.remove()
    return out, retaken


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.takeover_faults")
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--deadline", type=float, default=1.0, help="the takeover deadline, seconds")
    args = ap.parse_args(argv)
    reason = skip_reason()
    if reason:
        print(f"takeover_faults benchmark skipped: {reason}\n")
        return
    with tempfile.TemporaryDirectory(prefix=f"oomkit-bench-takeover-{os.getpid()}-") as tmp:
        b = Bench(Path(tmp), args.deadline)
        paused = past_deadline(b, args.runs)
        dead, retaken = after_death(b, args.runs)
        faults, faults_late, missed = plugin_faults(b, args.runs)
    rows = [(name, *_cols(v)) for name, v in paused.items()]
    print(table(f"Paused past the {args.deadline:g} s deadline (ms)", ("fault", "runs", "p50", "max"), rows))
    rows = [(name, *_cols(v)) for name, v in dead.items()]
    rows.append(("watchdog SIGTERMed: taken over again", *_cols(retaken)))
    print(table("Back with the kernel after a death (ms)", ("fault", "runs", "p50", "max"), rows))
    fault_rows = [(name, *_cols(v), *_cols(faults_late[name])[1:], missed[name]) for name, v in faults.items()]
    print(table(
        f"Plugin faults: paused, and past the {args.deadline:g} s deadline (ms)",
        ("fault", "runs", "paused p50", "paused max", "past p50", "past max", "missed"), fault_rows,
    ))


def _cols(values: list[float]) -> tuple[int, float, float]:
    s = summary(values)
    return int(s["n"]), s["p50"], s["max"]


if __name__ == "__main__":
    main(sys.argv[1:])
