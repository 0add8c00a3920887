"""Faults inside a decision, against the real kernel: a real ``oomkit serve`` takes a real v1
memcg over, a real hog pauses at its limit, and something goes wrong between the event and
the kill.

* A plugin raises or returns garbage, in each stage of the chain (``tests/fault_plugins.py``):
  one real OOM per case, each asserting that the engine went on, blamed the plugin (the
  daemon's counters, its log and the decision), never blamed a first-party plugin for it,
  and ended the OOM the way the hookspec says: the right victim (the hog) killed by oomkit,
  or the memcg handed back to the kernel at once (a veto that could not judge protects
  everyone), or, for a killer that only claims a kill, at the watchdog's deadline.  The
  garbage is aimed at the hog's small sibling, which must live.
* The victim exits between the ranking and the kill (before the core's re-check, and after
  it: the killer meets ``ESRCH``), its pid is reused by a new process, its memcg is removed
  mid-decision: nobody else is killed, the new process lives, the memcg is free again.

Nothing here asserts a duration (a CPU hog may run on both cores); ``bench/takeover_faults.py``
measures how long each fault keeps the memcg paused.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from oomkit.journal import Journal

from .. import fault_plugins as fp
from .. import kernel
from ..takeover_support import Daemon, oom_control, oomkit, takeover_config, wait_for

pytestmark = pytest.mark.kernel

MiB = 1 << 20
Make = Callable[..., kernel.Cgroup]
LONG = 60.0
# The engine's own decision must win: a deadline no loaded machine reaches first.
GENEROUS_DEADLINE_S = 60.0
CASES = fp.CASES


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    started: list[Daemon] = []

    def start(config: str, *args: str, env: dict[str, str] | None = None) -> Daemon:
        d = Daemon(tmp_path, config, *args, tag=str(len(started)), env=env)
        started.append(d)
        return d.wait_ready()

    yield start
    for d in started:
        d.cleanup()


def decisions(path: Path) -> list[dict[str, Any]]:
    """The decisions the jsonl notifier wrote, kernel-kill reports left out."""
    if not path.exists():
        return []
    out = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [d for d in out if d["outcome"] != "observed"]


def status(d: Daemon) -> dict[str, Any]:
    out = oomkit("status", "--json", "-c", str(d.config))
    assert out.returncode == 0, out.stderr
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def blamed(st: dict[str, Any]) -> dict[tuple[str, str], int]:
    return {(plugin, hook): n for plugin, hook, n in st["plugin_errors"]}


# Hooks called inside a decision: their failures are listed in the decision itself.
IN_DECISION = {"oomkit_candidates", "oomkit_score", "oomkit_tier", "oomkit_group", "oomkit_veto",
               "oomkit_rescue", "oomkit_kill"}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_a_plugin_that_raises_or_returns_garbage_cannot_hold_the_memcg_or_kill_the_wrong_process(
    case: fp.Case, memcg: Make, daemons: Callable[..., Daemon], tmp_path: Path
) -> None:
    cg = memcg(limit=32 * MiB)
    sibling = cg.spawn(["sleep", "600"])  # not protected: only the garbage could pick it
    run_dir, log = tmp_path / "run", tmp_path / "decisions.jsonl"
    load = [f"tests.fault_plugins:{p.__name__}" for p in case.plugins]
    deadline_s = {"ours": GENEROUS_DEADLINE_S, "handed-back": 3600.0, "deadline": 1.0}[case.ends]
    d = daemons(takeover_config([cg.rel], run_dir, deadline_s=deadline_s, protect=(), load=load),
                "--events", str(log))
    try:
        hog = cg.hog(64, stdout=subprocess.DEVNULL)
        assert hog.wait(timeout=LONG) == -signal.SIGKILL
        wait_for(lambda: oom_control(cg.path)["under_oom"] == 0, LONG, "the memcg to run again")
        wait_for(lambda: decisions(log), LONG, "the decision in the log")
        decision = decisions(log)[0]
        kernel_kills = oom_control(cg.path)["oom_kill"]
        if case.ends == "ours":
            assert decision["outcome"] == "killed", decision["detail"]
            assert decision["victim"]["pid"] == hog.pid and decision["killed"] == [hog.pid]
            assert kernel_kills == 0  # ended by our kill: no hand-back, by the engine or the deadline
        elif case.ends == "handed-back":
            assert decision["outcome"] == "all-vetoed"
            assert "handed back to the kernel" in decision["detail"]
            assert kernel_kills >= 1
            assert "not resolved within" not in d.stderr()  # the engine's hand-back, not the deadline's
        else:
            assert decision["outcome"] == "killed" and decision["killed"] == [hog.pid]  # what it was told
            assert kernel_kills >= 1
            wait_for(lambda: "OOM not resolved within" in d.stderr(), LONG, "the watchdog's hand-back in the log")
        assert sibling.poll() is None, "the sibling was killed"

        # Blamed exactly where the hookspec says, and nobody else blamed for it.
        errors = blamed(status(d))
        expected = {(p.name, p.hook) for p in case.plugins if p.blamed}
        assert set(errors) == expected, errors
        stderr = d.stderr()
        for name, hook in expected:
            assert f"plugin {name} failed in {hook}" in stderr
        in_decision = {(e["plugin"], e["hook"]) for e in decision["errors"]}
        assert in_decision == {(n, h) for n, h in expected if h in IN_DECISION}
        if fp.VetoUnprintableReason in case.plugins:
            (ranked,) = [r for r in decision["ranking"] if r["candidate"]["pid"] == sibling.pid]
            assert {"plugin": fp.VetoUnprintableReason.name,
                    "reason": "<a _Unprintable that str() cannot print>"} in ranked["vetoes"]
        if fp.RescueLies in case.plugins:
            lie = [r for r in decision["rescues"] if r["plugin"] == fp.RescueLies.name]
            assert lie and lie[0]["result"] == "freed" and not lie[0]["cleared"]

        # The engine goes on: the memcg is ours again, the daemon stops cleanly and restores.
        wait_for(lambda: oom_control(cg.path)["oom_kill_disable"] == 1, LONG, "the memcg taken over again")
        assert d.proc.poll() is None
        assert d.stop() == 0, d.stderr()
        assert oom_control(cg.path)["oom_kill_disable"] == 0 and Journal(run_dir).names() == []
    finally:
        sibling.kill()
        sibling.wait()


# --- the victim changes under the decision ----------------------------------------------


class Paused:
    """The handshake with :class:`tests.fault_plugins.PauseInVeto` / ``PauseInKill``."""

    def __init__(self, tmp: Path) -> None:
        self.base = tmp / "pause"
        self.env = {"OOMKIT_TEST_PAUSE": str(self.base)}

    def reached(self) -> tuple[int, int]:
        """Wait until the decision is held; the victim it ranked first (pid, start time)."""
        path = self.base.with_suffix(".reached")
        wait_for(path.exists, LONG, "the decision to reach the pause")
        pid, start = path.read_text().split()
        return int(pid), int(start)

    def go(self) -> None:
        self.base.with_suffix(".go").touch()


def start_ticks(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])


def spawn_with_pid(cg: kernel.Cgroup, pid: int, attempts: int = 200) -> subprocess.Popen[bytes]:
    """A new ``sleep`` in ``cg`` that gets ``pid`` (through ``ns_last_pid``; another process
    of the machine may take it first, so try again)."""
    for _ in range(attempts):
        with open("/proc/sys/kernel/ns_last_pid", "w") as f:
            f.write(str(pid - 1))
        p = cg.spawn(["sleep", "600"])
        if p.pid == pid:
            return p
        p.kill()
        p.wait()
    pytest.fail(f"pid {pid} was taken by someone else {attempts} times in a row")


def ns_last_pid_reason() -> str | None:
    try:
        with open("/proc/sys/kernel/ns_last_pid", "r+") as f:
            f.write(f.read().strip())
    except OSError as exc:
        return f"cannot steer pid allocation through /proc/sys/kernel/ns_last_pid ({exc.strerror}): needs CAP_SYS_ADMIN"
    return None


def held_daemon(
    daemons: Callable[..., Daemon], cg: kernel.Cgroup, tmp_path: Path, plugin: str
) -> tuple[Daemon, Paused, Path, Path]:
    paused = Paused(tmp_path)
    run_dir, log = tmp_path / "run", tmp_path / "decisions.jsonl"
    # An hour's deadline: only what the test does may end the OOM.  The kill stage is held
    # as long as the test needs.
    config = takeover_config([cg.rel], run_dir, deadline_s=3600, protect=(), load=[f"tests.fault_plugins:{plugin}"],
                             engine="kill_timeout_s = 600")
    return daemons(config, "--events", str(log), env=paused.env), paused, run_dir, log


def only_decision(log: Path) -> dict[str, Any]:
    wait_for(lambda: decisions(log), LONG, "the decision in the log")
    (decision,) = decisions(log)
    return decision


@pytest.mark.parametrize("stage", ["PauseInVeto", "PauseInKill"])
def test_a_victim_that_exits_between_the_ranking_and_the_kill_is_reported_not_replaced(
    stage: str, memcg: Make, daemons: Callable[..., Daemon], tmp_path: Path
) -> None:
    cg = memcg(limit=32 * MiB)
    sibling = cg.spawn(["sleep", "600"])
    d, paused, run_dir, log = held_daemon(daemons, cg, tmp_path, stage)
    try:
        hog = cg.hog(64, stdout=subprocess.DEVNULL)
        victim, _ = paused.reached()
        assert victim == hog.pid
        hog.kill()  # it exits (and is reaped) while the decision is held
        hog.wait()
        paused.go()
        decision = only_decision(log)
        assert decision["outcome"] == "exited" and decision["victim"]["pid"] == hog.pid
        if stage == "PauseInVeto":  # the core's re-check in /proc finds it gone
            assert decision["detail"] == f"pid {hog.pid} was gone when re-verified before the kill"
        else:  # re-checked alive; gone when the killer opens its pidfd (ESRCH)
            assert decision["detail"] == f"pid {hog.pid} had exited"
        assert decision["killed"] == [] and decision["errors"] == []
        assert sibling.poll() is None  # nobody killed in its stead
        assert oom_control(cg.path)["under_oom"] == 0 and oom_control(cg.path)["oom_kill"] == 0
        assert d.stop() == 0, d.stderr()
        assert oom_control(cg.path)["oom_kill_disable"] == 0 and Journal(run_dir).names() == []
    finally:
        sibling.kill()
        sibling.wait()


@pytest.mark.parametrize("stage", ["PauseInVeto", "PauseInKill"])
def test_a_victim_whose_pid_is_reused_is_not_killed(
    stage: str, memcg: Make, daemons: Callable[..., Daemon], tmp_path: Path
) -> None:
    reason = ns_last_pid_reason()
    if reason:
        pytest.skip(reason)
    cg = memcg(limit=32 * MiB)
    d, paused, run_dir, log = held_daemon(daemons, cg, tmp_path, stage)
    impostor: subprocess.Popen[bytes] | None = None
    try:
        hog = cg.hog(64, stdout=subprocess.DEVNULL)
        victim, judged = paused.reached()
        assert victim == hog.pid
        hog.kill()
        hog.wait()
        # A new process with the victim's pid, in the same memcg: exactly what a kill by pid
        # alone would hit.
        impostor = spawn_with_pid(cg, victim)
        if start_ticks(victim) == judged:
            pytest.skip("the new process started in the victim's clock tick: no start time can tell them apart")
        paused.go()
        decision = only_decision(log)
        assert decision["outcome"] == "exited" and decision["killed"] == []
        if stage == "PauseInVeto":  # oomkit/safety.py: the start time no longer matches
            assert f"pid {victim} now belongs to another process" in decision["detail"]
        else:  # the built-in killer, after opening its pidfd
            assert f"pid {victim} was reused" in decision["detail"] and "not killed" in decision["detail"]
        assert impostor.poll() is None, "the impostor was killed"
        assert d.stop() == 0, d.stderr()
        assert impostor.poll() is None
        assert oom_control(cg.path)["oom_kill_disable"] == 0 and Journal(run_dir).names() == []
    finally:
        if impostor is not None:
            impostor.kill()
            impostor.wait()


def test_a_memcg_removed_mid_decision_is_let_go_and_taken_over_again_when_it_comes_back(
    memcg: Make, daemons: Callable[..., Daemon], tmp_path: Path
) -> None:
    cg = memcg(limit=32 * MiB)
    d, paused, run_dir, log = held_daemon(daemons, cg, tmp_path, "PauseInVeto")
    hog = cg.hog(64, stdout=subprocess.DEVNULL)
    victim, _ = paused.reached()
    assert victim == hog.pid
    hog.kill()
    hog.wait()
    wait_for(lambda: not cg.procs(), LONG, "the memcg to empty")
    cg.path.rmdir()  # removed while the daemon is deciding about it
    paused.go()
    decision = only_decision(log)
    assert decision["outcome"] == "exited" and decision["killed"] == []
    wait_for(lambda: "waiting for it to come back" in d.stderr(), LONG, "the daemon to let it go")
    wait_for(lambda: Journal(run_dir).names() == [], LONG, "its journal entry removed")
    assert d.proc.poll() is None  # not a failure
    cg.path.mkdir()
    cg.write("memory.limit_in_bytes", 32 * MiB)
    wait_for(lambda: oom_control(cg.path)["oom_kill_disable"] == 1, LONG, "the new memcg taken over")
    paused.base.with_suffix(".reached").unlink()
    hog = cg.hog(64, stdout=subprocess.DEVNULL)
    assert paused.reached()[0] == hog.pid  # a new decision, held too (the go file is still there: it runs on)
    assert hog.wait(timeout=LONG) == -signal.SIGKILL
    assert oom_control(cg.path)["oom_kill"] == 0  # ours
    assert d.stop() == 0, d.stderr()
    assert oom_control(cg.path)["oom_kill_disable"] == 0 and Journal(run_dir).names() == []
    assert os.path.isdir(cg.path)
