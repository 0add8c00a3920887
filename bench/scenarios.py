"""Who dies: realistic memcg OOMs, each with one common-sense right victim, under the kernel's
own memcg OOM killer and under ``oomkit serve --takeover`` on the default configuration.

Every scenario runs real processes (``bench/c/alloc.c``: hold memory, grow at a rate, spike,
fork children, share a memfd, set ``oom_score_adj`` and ``comm``) in a real v1 memcg of its
own with a 256 MiB limit, made under this process's memcg and always removed.  The
situations and their right victims come from what an operator would say, not from how
oomkit ranks:

1. *Kill the cause*: a leak growing beside a large, stable cache; a steady grower beside a
   spiky allocator that maps and frees a big buffer every 100 ms; a sudden large allocation
   beside a stable giant; a young process growing fast beside an old big one; a leak among
   many small stable processes.
2. *A burst is the overflow*: 20 young workers forked 50 ms apart by a long-lived server.
3. *Declared preferences first*: a database (``postgres``) loading its buffers beside a
   stable batch job; a process that declared itself expendable (``oom_score_adj`` 300)
   beside a big one while an app grows; two equal growers, one with ``oom_score_adj`` 100.
   (Where one kill suffices, the grower stops short of the limit once it is made.)
4. *Count what a kill frees*: two processes mapping one 140 MiB memfd beside a private
   allocator (killing one sharer frees nothing).
5. *No false positives* (controls, which must see no kill): a scope that comes near its limit
   and stays under it; a scope whose reader streams a file larger than the limit through the
   page cache, which the kernel reclaims.

Processes that must look long-lived start first and hold still for a *pre-roll* (oomkit's
history window, 8 s by default, plus half a second) before anything grows: a process younger
than the window has, by definition, grown since it started.  The kernel's formula ignores
age, so its runs skip the pre-roll.

Per run: the first process to die and whether it is a right victim; **collateral**: every
other process that died within 1.5 s of the first death and is not a right victim;
**OOM → death**: from the memcg's first OOM notification (an eventfd of this benchmark's
own, registered on ``memory.oom_control``, which fires under takeover and without) to the
first death (pidfds polled in a thread).  A control passes when nothing dies in 8 s.
Under oomkit, the decision that made each run's first kill is read back from its JSON-lines
log: its stage times (candidates, score with every scorer of the default policy, veto) and
its event → kill sent, the strategy library's decision time at a real OOM.

    python -m bench scenarios                       # 3 runs of every scenario, both handlers
    python -m bench.scenarios --runs 1 --only leak-beside-cache --handlers oomkit
"""

from __future__ import annotations

import argparse
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from oomkit.cgroupfs import V1Event, find_mounts, read_procs, register_v1_event
from oomkit.events import Decision
from oomkit.records import read_log
from tests import kernel

from . import native
from .stats import percentile, table

HANDLERS = ("kernel", "oomkit")
LIMIT_MIB = 256
WINDOW_S = 8.0
"""oomkit's default ``[history] window_s``: the pre-roll is this plus half a second."""
SETTLE_S = 1.5
CONTROL_S = 8.0
TIMEOUT_S = 25.0


@dataclass(frozen=True)
class Proc:
    """One process of a scenario: ``args`` for scenalloc, ``{P}`` standing for the pre-roll."""

    args: str
    late: bool = False
    """Started after the pre-roll rather than at once (a young process)."""


@dataclass(frozen=True)
class Scenario:
    name: str
    principle: str
    procs: tuple[Proc, ...]
    right: frozenset[str] = frozenset()
    """The comms a careful operator would kill first; empty for a control."""

    @property
    def control(self) -> bool:
        return not self.right


SCENARIOS = (
    Scenario("leak-beside-cache", "kill the cause", (
        Proc("--name cache --hold 150"),
        Proc("--name leak --hold 10 --grow 20 --grow-delay {P}"),
    ), frozenset({"leak"})),
    Scenario("fork-burst", "a burst is the overflow", (
        Proc("--name server --hold 100 --fork 20 --fork-delay {P} --fork-interval 50 --child-mib 10"
             " --child-name worker"),
    ), frozenset({"worker"})),
    Scenario("critical-database", "declared preferences first", (
        Proc("--name batch --hold 100"),
        Proc("--name postgres --hold 20 --grow 30 --grow-max 200 --grow-delay {P}"),
    ), frozenset({"batch"})),
    Scenario("shared-memfd", "count what a kill frees", (
        Proc("--name viewer --memfd 140 --sharers 2 --child-name viewer2"),
        Proc("--name worker --hold 10 --grow 20 --grow-delay {P}"),
    ), frozenset({"worker"})),
    Scenario("declared-expendable", "declared preferences first", (
        Proc("--name big --hold 140"),
        Proc("--name spare --adj 300 --hold 30"),
        Proc("--name app --hold 10 --grow 20 --grow-max 90 --grow-delay {P}"),
    ), frozenset({"spare"})),
    Scenario("equal-growth-adj", "declared preferences first", (
        Proc("--name base --hold 60"),
        Proc("--name grow-a --hold 10 --grow 15 --grow-delay {P}"),
        Proc("--name grow-b --adj 100 --hold 10 --grow 15 --grow-delay {P}"),
    ), frozenset({"grow-b"})),
    Scenario("spiky-vs-steady", "kill the cause", (
        Proc("--name spiky --hold 80 --spike 80 --period 100"),
        Proc("--name steady --hold 10 --grow 15 --grow-delay {P}"),
    ), frozenset({"steady"})),
    Scenario("sudden-allocation", "kill the cause", (
        Proc("--name big --hold 180"),
        Proc("--name loader --grow 400 --grow-delay {P}"),
    ), frozenset({"loader"})),
    Scenario("young-grower", "kill the cause", (
        Proc("--name old --hold 170"),
        Proc("--name young --grow 60", late=True),
    ), frozenset({"young"})),
    Scenario("leak-among-many", "kill the cause", (
        *(Proc(f"--name small-{i} --hold 18") for i in range(8)),
        Proc("--name leak --grow 12 --grow-delay {P}"),
    ), frozenset({"leak"})),
    Scenario("control-near-limit", "no false positives", (
        Proc("--name big --hold 180"),
        Proc("--name grower --hold 10 --grow 20 --grow-max 40 --grow-delay {P}"),
    )),
    Scenario("control-page-cache", "no false positives", (
        Proc("--name big --hold 120"),
        Proc("--name reader --cache {CACHE} --grow-delay {P}"),
    )),
)
BY_NAME = {s.name: s for s in SCENARIOS}


@dataclass
class Run:
    """What one run of one scenario under one handler saw."""

    ooms: list[int] = field(default_factory=list)
    deaths: list[tuple[int, int, str]] = field(default_factory=list)
    """(monotonic ns, pid, comm) in the order they died."""
    start_ns: int = 0
    end_ns: int = 0
    decisions: list[Decision] = field(default_factory=list)
    """oomkit's decisions whose event came during this run, from its log (oomkit only)."""

    @property
    def first(self) -> str | None:
        return self.deaths[0][2] if self.deaths else None

    def collateral(self, right: frozenset[str]) -> int:
        if not self.deaths:
            return 0
        until = self.deaths[0][0] + int(SETTLE_S * 1e9)
        return sum(1 for ns, _, comm in self.deaths if ns <= until and comm not in right)

    def oom_to_death_ms(self) -> float | None:
        if not self.deaths or not self.ooms:
            return None
        return (self.deaths[0][0] - self.ooms[0]) / 1e6


class _Watch(threading.Thread):
    """Sees every process of the memcg (pidfds), their deaths, and the memcg's OOMs."""

    def __init__(self, cg: kernel.Cgroup, oom: V1Event, run: Run) -> None:
        super().__init__(daemon=True, name="scenario-watch")
        self._cg, self._oom, self.run_ = cg, oom, run
        self._halt = threading.Event()
        self._fds: dict[int, tuple[int, str]] = {}  # pidfd -> (pid, comm)
        self._seen: set[int] = set()
        self.comms: dict[int, str] = {}

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=5)
        for fd in self._fds:
            os.close(fd)
        self._fds.clear()

    def _discover(self, poller: select.poll) -> None:
        for pid in read_procs(self._cg.path):
            if pid in self._seen:
                continue
            try:
                comm = Path(f"/proc/{pid}/comm").read_text().strip()
                fd = os.pidfd_open(pid)
            except OSError:
                continue
            self._seen.add(pid)
            self.comms[pid] = comm
            self._fds[fd] = (pid, comm)
            poller.register(fd, select.POLLIN)

    def _rename(self) -> None:
        # A process is seen as soon as it joins, often before its exec or its prctl: keep
        # reading the names of the living until they die.
        for fd, (pid, _) in self._fds.items():
            try:
                comm = Path(f"/proc/{pid}/comm").read_text().strip()
            except OSError:
                continue
            self._fds[fd] = (pid, comm)
            self.comms[pid] = comm

    def run(self) -> None:
        poller = select.poll()
        poller.register(self._oom.efd, select.POLLIN)
        while not self._halt.is_set():
            self._discover(poller)
            self._rename()
            for fd, _ in poller.poll(5):
                now = time.monotonic_ns()
                if fd == self._oom.efd:
                    if self._oom.drain():
                        self.run_.ooms.append(now)
                    continue
                pid, comm = self._fds.pop(fd)
                poller.unregister(fd)
                os.close(fd)
                self.run_.deaths.append((now, pid, comm))


@contextmanager
def _handler(name: str, cg: kernel.Cgroup, tmp: str, config: str | None) -> Iterator[None]:
    if name == "kernel":
        yield
        return
    events = Path(tmp) / "decisions.jsonl"
    argv = [sys.executable, "-m", "oomkit", "serve", "--takeover", str(cg.path), "--events", str(events)]
    if config is not None:
        cfg = Path(tmp) / "oomkit.toml"
        cfg.write_text(config)
        argv += ["-c", str(cfg)]
    log_path = Path(tmp) / "serve.log"
    with open(log_path, "wb") as errlog:
        serve = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=errlog)
        try:
            deadline = time.monotonic() + 30
            while b"oomkit ready" not in log_path.read_bytes():
                if serve.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"oomkit serve did not start: {log_path.read_text()[-2000:]}")
                time.sleep(0.02)
            yield
        finally:
            serve.send_signal(signal.SIGTERM)
            serve.wait(timeout=10)


def _empty(cg: kernel.Cgroup) -> None:
    deadline = time.monotonic() + 10
    while pids := read_procs(cg.path):
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{cg.path}: {pids} survive SIGKILL")
        time.sleep(0.01)


def _start(cg: kernel.Cgroup, binary: str, proc: Proc, preroll: float, cache: str) -> subprocess.Popen[bytes]:
    argv = [binary, *proc.args.replace("{P}", f"{preroll:g}").replace("{CACHE}", cache).split()]
    child = cg.spawn(argv, stdout=subprocess.PIPE)
    assert child.stdout is not None
    line = child.stdout.readline()
    child.stdout.close()
    if line.strip() != b"ready":
        raise RuntimeError(f"{' '.join(argv)}: did not get ready (said {line!r})")
    return child


def run_once(scenario: Scenario, cg: kernel.Cgroup, preroll: float, cache: str) -> Run:
    """One run of ``scenario`` in the (empty, limited) memcg ``cg``, whoever handles its OOMs."""
    binary = str(native.build("alloc"))
    run = Run(start_ns=time.monotonic_ns())
    oom = register_v1_event(cg.path, "memory.oom_control")
    watch = _Watch(cg, oom, run)
    watch.start()
    children: list[subprocess.Popen[bytes]] = []
    try:
        t0 = time.monotonic()
        for proc in scenario.procs:
            if not proc.late:
                children.append(_start(cg, binary, proc, preroll, cache))
        while time.monotonic() < t0 + preroll:
            time.sleep(0.01)
        for proc in scenario.procs:
            if proc.late:
                children.append(_start(cg, binary, proc, 0, cache))
        end = time.monotonic() + (CONTROL_S if scenario.control else TIMEOUT_S)
        while time.monotonic() < end:
            if run.deaths and not scenario.control:
                end = min(end, run.deaths[0][0] / 1e9 + SETTLE_S)
            time.sleep(0.01)
    finally:
        watch.stop()
        oom.close()
        _empty(cg)
        for child in children:
            child.wait()
        run.end_ns = time.monotonic_ns()
    return run


def measure(scenario: Scenario, handler: str, runs: int, config: str | None = None,
            window_s: float = WINDOW_S, keep_log: Path | None = None) -> list[Run]:
    """``runs`` runs of ``scenario`` under ``handler`` ("kernel" or "oomkit", with ``config``:
    TOML text, or None for the defaults); oomkit's JSON-lines log is copied to ``keep_log``."""
    parent = kernel.v1_parent()
    root = find_mounts("/proc")[0]
    assert parent is not None and root is not None
    cg = kernel.make(parent, root, "scenario")
    preroll = 0.5 if handler == "kernel" else window_s + 0.5
    out: list[Run] = []
    try:
        cg.write("memory.limit_in_bytes", LIMIT_MIB << 20)
        with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
            cache = str(Path(tmp) / "cache.bin")
            if "{CACHE}" in "".join(p.args for p in scenario.procs):
                _cache_file(cache, 2 * LIMIT_MIB)
            with _handler(handler, cg, tmp, config):
                for _ in range(runs):
                    out.append(run_once(scenario, cg, preroll, cache))
                    time.sleep(0.2)
            log = Path(tmp) / "decisions.jsonl"
            if handler == "oomkit" and log.exists():  # complete: the daemon has stopped
                for _, rec in read_log(log):
                    if isinstance(rec, Decision):
                        for run in out:
                            if run.start_ns <= rec.event.monotonic_ns <= run.end_ns:
                                run.decisions.append(rec)
                if keep_log is not None:
                    shutil.copyfile(log, keep_log)
    finally:
        cg.remove()
    return out


def _cache_file(path: str, mib: int) -> None:
    """A file to stream through the page cache, written and then dropped from the cache
    (pages stay charged to whoever cached them: here, this process's memcg)."""
    block = os.urandom(1 << 20)
    with open(path, "wb") as f:
        for _ in range(mib):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def skip_reason() -> str | None:
    return kernel.v1_skip_reason() or native.skip_reason()


def verdict(scenario: Scenario, run: Run) -> str:
    if scenario.control:
        return "right (no kill)" if not run.deaths else f"WRONG: killed {run.first}"
    if run.first is None:
        return "WRONG: nobody died"
    return "right" if run.first in scenario.right else "WRONG"


def main(argv: Sequence[str]) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.scenarios")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--only", nargs="+", choices=list(BY_NAME), metavar="SCENARIO")
    ap.add_argument("--handlers", nargs="+", default=list(HANDLERS), choices=HANDLERS)
    args = ap.parse_args(argv)
    reason = skip_reason()
    if reason:
        print(f"scenarios benchmark skipped: {reason}\n")
        return
    scenarios = [BY_NAME[n] for n in args.only] if args.only else list(SCENARIOS)
    rows: list[tuple[object, ...]] = []
    totals = {h: [0, 0, 0] for h in args.handlers}  # right, runs, collateral
    timing: list[tuple[object, ...]] = []
    for scenario in scenarios:
        for handler in args.handlers:
            runs = measure(scenario, handler, args.runs)
            if handler == "oomkit" and (times := decision_times(scenario.name, runs)) is not None:
                timing.append(times)
            for i, run in enumerate(runs):
                v = verdict(scenario, run)
                ms = run.oom_to_death_ms()
                coll = run.collateral(scenario.right)
                totals[handler][0] += v.startswith("right")
                totals[handler][1] += 1
                totals[handler][2] += coll
                rows.append((scenario.name, handler, i + 1, run.first or "-",
                             "/".join(sorted(scenario.right)) or "(none)", v, coll,
                             f"{ms:.1f}" if ms is not None else "-"))
                print(f"{scenario.name} {handler} run {i + 1}: {v}, first {run.first}, collateral {coll}",
                      file=sys.stderr)
    print(table(f"Who dies first: {LIMIT_MIB} MiB memcgs, kernel killer vs oomkit serve --takeover (defaults)",
                ("scenario", "handler", "run", "died first", "right victim", "verdict", "collateral",
                 "OOM→death ms"), rows))
    summary = [(h, f"{t[0]}/{t[1]}", t[2]) for h, t in totals.items()]
    print(table("Right-victim rate and collateral deaths, all runs", ("handler", "right", "collateral"),
                summary))
    if timing:
        print(table("the strategy library's decision time at OOM: the first kill of each oomkit run, from its"
                    " log (ms, p50 over runs)", DECISION_COLUMNS, timing))


DECISION_COLUMNS = ("scenario", "kills", "victim", "candidates", "score", "veto", "event → kill sent",
                    "all stages (the kill's waits for the death)")
"""Stage times of the decision that made a run's first kill (``Decision.stage_ns``; the
kill stage includes the killer's wait for the death, so it is left out of the columns)."""


def decision_times(name: str, runs: Sequence[Run]) -> tuple[object, ...] | None:
    """One row of :data:`DECISION_COLUMNS` for ``name``'s runs, None without a kill."""
    firsts = [next((d for d in run.decisions if d.kill is not None and d.kill.sent_ns), None) for run in runs]
    kills = [d for d in firsts if d is not None]
    if not kills:
        return None

    def p50(values: list[float]) -> float:
        return percentile(values, 50)

    def stage(k: str) -> float:
        return p50([d.stage_ns.get(k, 0) / 1e6 for d in kills])

    victims = "/".join(sorted({d.victim.name for d in kills if d.victim is not None}))
    return (name, len(kills), victims, stage("candidates"), stage("score"), stage("veto"),
            p50([(d.kill.sent_ns - d.event.monotonic_ns) / 1e6 for d in kills if d.kill is not None]),
            p50([sum(d.stage_ns.values()) / 1e6 for d in kills]))


if __name__ == "__main__":
    main(sys.argv[1:])
