"""Takeover faults against the real kernel: real v1 memcgs, real OOMs, a real ``oomkit serve``.

Each test asserts the same three things: no memcg is left paused past its deadline (the
paused hog dies, by our kill or by the kernel's after a hand-back, while the fault still
holds), nothing is killed that should not be (a protected ``sleep`` sibling lives, and the
daemon kills only what is in the memcg), and nothing is lost (every journal entry is gone
once the daemon is, and ``oom_kill_disable`` is back to its original).  Waits are generous
(a CPU hog may run on both cores): timing is measured by ``bench/takeover_faults.py``,
never asserted here.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from oomkit.journal import Journal
from oomkit.procfs import own_cgroup

from .. import kernel
from ..takeover_support import Daemon, alive, oom_control, oomkit, state_of, takeover_config, wait_for

pytestmark = pytest.mark.kernel

MiB = 1 << 20
Make = Callable[..., kernel.Cgroup]
LONG = 60.0  # a generous bound for anything that must happen "soon" on a loaded machine


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    started: list[Daemon] = []

    def start(config: str, *args: str, ready: bool = True, group: bool = False) -> Daemon:
        d = Daemon(tmp_path, config, *args, tag=str(len(started)), group=group)
        started.append(d)
        return d.wait_ready() if ready else d

    yield start
    for d in started:
        d.cleanup()


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    return tmp_path / "run"


def journal(run_dir: Path) -> list[str]:
    return Journal(run_dir).names()


def disabled(cg: kernel.Cgroup) -> int:
    return oom_control(cg.path)["oom_kill_disable"]


def paused(cg: kernel.Cgroup) -> bool:
    return oom_control(cg.path)["under_oom"] == 1


def hog_paused(cg: kernel.Cgroup, mib: int = 64) -> subprocess.Popen[bytes]:
    hog = cg.hog(mib)
    wait_for(lambda: paused(cg) or hog.poll() is not None, LONG, "the hog to reach its limit")
    return hog


# --- the deadline, whatever the daemon does -----------------------------------------------


def test_a_veto_that_blocks_3_s_cannot_hold_the_memcg_past_its_1_s_deadline(
    memcg: Make, daemons: Callable[..., Daemon], run_dir: Path
) -> None:
    cg = memcg(limit=32 * MiB)
    sibling = cg.spawn(["sleep", "600"])
    extra = '\n[plugins]\nload = ["tests.takeover_support:BlockingVeto"]\n'
    d = daemons(takeover_config([cg.rel], run_dir, deadline_s=1.0) + extra)
    try:
        hog = cg.hog(64)
        # The watchdog hands the memcg back at the deadline while the daemon sits in the veto;
        # the kernel kills the hog.
        assert hog.wait(timeout=LONG) == -signal.SIGKILL
        assert oom_control(cg.path)["oom_kill"] >= 1
        assert sibling.poll() is None  # the kernel's pick: the hog (the sleep is tiny)
        wait_for(lambda: "handed it back to the kernel" in d.stderr(), LONG, "the hand-back in the log")
        wait_for(lambda: disabled(cg) == 1, LONG, "the memcg taken over again once the veto returned")
        assert d.stop() == 0, d.stderr()
        assert sibling.poll() is None  # the late decision did not kill anything
        assert disabled(cg) == 0 and journal(run_dir) == []
    finally:
        sibling.kill()
        sibling.wait()


def test_when_every_candidate_is_vetoed_the_oom_goes_back_at_once(
    memcg: Make, daemons: Callable[..., Daemon], run_dir: Path
) -> None:
    cg = memcg(limit=32 * MiB)
    # Everyone in the memcg is protected and the deadline is an hour: only the engine's
    # hand-back (asked of the watchdog) can let the kernel act.
    config = takeover_config([cg.rel], run_dir, deadline_s=3600).replace('names = ["sleep"]', 'names = ["python*"]')
    d = daemons(config)
    hog = cg.hog(64)
    assert hog.wait(timeout=LONG) == -signal.SIGKILL
    assert oom_control(cg.path)["oom_kill"] >= 1  # the kernel's kill
    wait_for(lambda: "kills nobody here; handing the OOM back to the kernel" in d.stderr(), LONG, "the log")
    assert "not resolved within" not in d.stderr()  # not the deadline's
    wait_for(lambda: disabled(cg) == 1, LONG, "the memcg taken over again")
    assert d.stop() == 0
    assert disabled(cg) == 0 and journal(run_dir) == []


def test_a_stopped_daemon_cannot_hold_the_memcg(memcg: Make, daemons: Callable[..., Daemon], run_dir: Path) -> None:
    cg = memcg(limit=32 * MiB)
    d = daemons(takeover_config([cg.rel], run_dir, deadline_s=1.0))
    d.signal(signal.SIGSTOP)
    wait_for(lambda: state_of(d.pid) == "T", LONG, "the daemon to stop")
    hog = cg.hog(64)
    assert hog.wait(timeout=LONG) == -signal.SIGKILL  # the kernel's kill, after the watchdog's hand-back
    assert state_of(d.pid) == "T"  # all of that while the daemon was stopped
    assert disabled(cg) == 0  # and it stays with the kernel until the daemon can take it again
    d.signal(signal.SIGCONT)
    wait_for(lambda: disabled(cg) == 1, LONG, "the memcg taken over again")
    assert d.stop() == 0, d.stderr()
    assert disabled(cg) == 0 and journal(run_dir) == []


def test_a_stopped_watchdog_cannot_hold_the_memcg_either(
    memcg: Make, daemons: Callable[..., Daemon], run_dir: Path
) -> None:
    cg = memcg(limit=32 * MiB)
    d = daemons(takeover_config([cg.rel], run_dir, deadline_s=1.0), "--dry-run")  # nobody kills
    dog = d.watchdog()
    os.kill(dog, signal.SIGSTOP)
    try:
        hog = cg.hog(64)
        # The daemon sees the deadline pass without a hand-back, replaces the watchdog (the
        # memcg goes back to the kernel meanwhile), and the kernel kills.
        assert hog.wait(timeout=LONG) == -signal.SIGKILL
        wait_for(lambda: "has not handed it back" in d.stderr(), LONG, "the daemon to say why")
        wait_for(lambda: disabled(cg) == 1, LONG, "the memcg taken over by the new watchdog")
        assert d.watchdog() != dog
        assert d.stop() == 0, d.stderr()
        assert disabled(cg) == 0 and journal(run_dir) == []
    finally:
        if alive(dog):
            os.kill(dog, signal.SIGKILL)


def test_the_watchdog_restores_when_the_daemon_is_sigkilled(
    memcg: Make, daemons: Callable[..., Daemon], run_dir: Path
) -> None:
    cg = memcg(limit=32 * MiB)
    d = daemons(takeover_config([cg.rel], run_dir, deadline_s=3600), "--dry-run")
    dog = d.watchdog()
    hog = hog_paused(cg)
    assert disabled(cg) == 1 and len(journal(run_dir)) == 1
    d.proc.kill()
    d.proc.wait()
    assert hog.wait(timeout=LONG) == -signal.SIGKILL
    wait_for(lambda: not alive(dog), LONG, "the watchdog to exit")
    assert disabled(cg) == 0
    assert journal(run_dir) == []  # the watchdog removed the entry it restored


def test_the_watchdog_survives_a_kill_of_the_daemons_process_group(
    memcg: Make, daemons: Callable[..., Daemon], run_dir: Path
) -> None:
    cg = memcg(limit=32 * MiB)
    d = daemons(takeover_config([cg.rel], run_dir, deadline_s=3600), "--dry-run", group=True)
    dog = d.watchdog()
    hog = hog_paused(cg)
    assert os.getpgid(d.pid) == d.pid != os.getpgid(0)
    assert os.getsid(dog) == dog  # a session (and process group) of its own
    os.killpg(d.pid, signal.SIGKILL)  # what a Ctrl-C's or a supervisor's group kill reaches
    d.proc.wait()
    assert hog.wait(timeout=LONG) == -signal.SIGKILL
    wait_for(lambda: not alive(dog), LONG, "the watchdog to exit")
    assert disabled(cg) == 0 and journal(run_dir) == []


def kill_both(d: Daemon, dog: int) -> None:
    """SIGKILL the daemon and its watchdog as a service manager's kill of the unit would:
    neither gets to act (the daemon, stopped first, cannot see its watchdog die and replace it)."""
    os.kill(d.pid, signal.SIGSTOP)
    wait_for(lambda: state_of(d.pid) == "T", LONG, "the daemon to stop")
    os.kill(dog, signal.SIGKILL)
    d.proc.kill()


def test_oomkit_restore_after_daemon_and_watchdog_are_both_sigkilled(
    memcg: Make, daemons: Callable[..., Daemon], run_dir: Path
) -> None:
    cg = memcg(limit=32 * MiB)
    d = daemons(takeover_config([cg.rel], run_dir, deadline_s=3600), "--dry-run")
    dog = d.watchdog()
    hog = hog_paused(cg)
    kill_both(d, dog)
    d.proc.wait()
    wait_for(lambda: not alive(dog), LONG, "the watchdog to die")
    assert disabled(cg) == 1 and paused(cg) and hog.poll() is None  # stranded: nobody is left
    assert len(journal(run_dir)) == 1
    out = oomkit("restore", "-c", str(d.config))
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        f"v1:{cg.rel}: oom_kill_disable 1 -> 0 (the original, journalled by pid {d.pid})"
    ]
    assert hog.wait(timeout=LONG) == -signal.SIGKILL
    assert disabled(cg) == 0 and journal(run_dir) == []
    again = oomkit("restore", "-c", str(d.config))
    assert again.returncode == 0 and again.stdout.startswith("nothing to restore")


def test_serve_restores_a_journal_left_by_a_dead_daemon_at_start(
    memcg: Make, daemons: Callable[..., Daemon], run_dir: Path
) -> None:
    cg = memcg(limit=32 * MiB)
    d = daemons(takeover_config([cg.rel], run_dir, deadline_s=3600), "--dry-run")
    dog = d.watchdog()
    kill_both(d, dog)
    d.proc.wait()
    wait_for(lambda: not alive(dog), LONG, "the watchdog to die")
    assert disabled(cg) == 1
    other = memcg(limit=32 * MiB)  # the new daemon takes over another memcg
    d2 = daemons(takeover_config([other.rel], run_dir))
    assert f"did not exit cleanly: v1:{cg.rel}: oom_kill_disable 1 -> 0" in d2.stderr()
    assert disabled(cg) == 0 and disabled(other) == 1
    assert d2.stop() == 0
    assert journal(run_dir) == []


def test_a_sigtermed_watchdog_is_replaced_and_the_takeover_goes_on(
    memcg: Make, daemons: Callable[..., Daemon], run_dir: Path, tmp_path: Path
) -> None:
    cg = memcg(limit=32 * MiB)
    sibling = cg.spawn(["sleep", "600"])
    events = tmp_path / "decisions.jsonl"
    d = daemons(takeover_config([cg.rel], run_dir), "--events", str(events))
    try:
        dog = d.watchdog()
        os.kill(dog, signal.SIGTERM)
        wait_for(lambda: children_changed(d, dog), LONG, "a new watchdog")
        lines = [ln for ln in d.stderr().splitlines() if f"takeover watchdog (pid {dog})" in ln]
        assert len(lines) == 1 and "exited on SIGTERM" in lines[0] and "starting a new one" in lines[0], lines
        wait_for(lambda: disabled(cg) == 1, LONG, "the memcg taken over again")
        hog = cg.hog(64)
        assert hog.wait(timeout=LONG) == -signal.SIGKILL
        wait_for(lambda: events.exists() and '"outcome":"killed"' in events.read_text(), LONG, "our kill")
        assert oom_control(cg.path)["oom_kill"] == 0  # ours, not the kernel's
        assert sibling.poll() is None
        assert d.stop() == 0, d.stderr()
        assert disabled(cg) == 0 and journal(run_dir) == []
    finally:
        sibling.kill()
        sibling.wait()


def children_changed(d: Daemon, old: int) -> bool:
    try:
        return d.watchdog() != old
    except ValueError:
        return False  # none, or two for a moment


def test_a_watchdog_that_keeps_dying_ends_the_daemon_in_one_line(
    memcg: Make, daemons: Callable[..., Daemon], run_dir: Path
) -> None:
    cg = memcg(limit=32 * MiB)
    d = daemons(takeover_config([cg.rel], run_dir, extra="watchdog_restarts = 0\n"))
    os.kill(d.watchdog(), signal.SIGKILL)
    assert d.proc.wait(timeout=LONG) == 1
    last = d.stderr().strip().splitlines()[-1]
    assert last.startswith("oomkit: error: source 'takeover' failed and stopped: WatchdogError: "), last
    assert "the takeover ends, every memcg is back with the kernel" in last
    assert disabled(cg) == 0 and journal(run_dir) == []


# --- descendants, recreated memcgs ---------------------------------------------------------


def test_a_child_that_inherits_the_takeover_is_reset_and_its_oom_goes_to_the_kernel(
    memcg: Make, daemons: Callable[..., Daemon], run_dir: Path
) -> None:
    cg = memcg(limit=256 * MiB)
    d = daemons(takeover_config([cg.rel], run_dir))
    child = cg.path / "child"
    child.mkdir()
    try:
        wait_for(lambda: oom_control(child)["oom_kill_disable"] == 0, LONG, "the child reset to 0")
        wait_for(lambda: "its child child inherited oom_kill_disable=1" in d.stderr(), LONG, "the reset in the log")
        (child / "memory.limit_in_bytes").write_text(str(32 * MiB))
        hog = kernel.Cgroup(child, cg.root).hog(64)
        assert hog.wait(timeout=LONG) == -signal.SIGKILL  # the kernel's: nobody paused it
        assert oom_control(child)["oom_kill"] >= 1
        assert disabled(cg) == 1  # the parent is still ours
        grand = child / "grand"
        grand.mkdir()  # made under a child at 0: inherits 0, nothing to do
        assert oom_control(grand)["oom_kill_disable"] == 0
        assert d.stop() == 0
        assert disabled(cg) == 0 and journal(run_dir) == []
    finally:
        kernel.remove_tree(child)


def test_children_still_at_1_are_reset_when_the_daemon_exits(
    memcg: Make, daemons: Callable[..., Daemon], run_dir: Path
) -> None:
    cg = memcg(limit=256 * MiB)
    d = daemons(takeover_config([cg.rel], run_dir))
    d.signal(signal.SIGSTOP)  # nobody sees the child appear
    wait_for(lambda: state_of(d.pid) == "T", LONG, "the daemon to stop")
    child = cg.path / "late"
    try:
        child.mkdir()
        inherited = oom_control(child)["oom_kill_disable"]
        assert d.stop() == 0  # SIGCONT, SIGTERM
        assert inherited == 1 or "inherited" in d.stderr()  # the watchdog's rescan may have been first
        assert oom_control(child)["oom_kill_disable"] == 0
        assert disabled(cg) == 0
    finally:
        kernel.remove_tree(child)


def test_a_memcg_removed_and_made_again_is_taken_over_again(
    memcg: Make, daemons: Callable[..., Daemon], run_dir: Path
) -> None:
    cg = memcg(limit=32 * MiB)
    d = daemons(takeover_config([cg.rel], run_dir))
    for round_ in range(3):
        cg.path.rmdir()
        cg.path.mkdir()
        cg.write("memory.limit_in_bytes", 32 * MiB)
        wait_for(lambda: disabled(cg) == 1, LONG, f"the new memcg taken over (round {round_})")
    wait_for(lambda: "made again" in d.stderr() or "is back; taken over again" in d.stderr(), LONG, "the log")
    assert len(journal(run_dir)) == 1  # one entry: the memcg held now
    hog = cg.hog(64)
    assert hog.wait(timeout=LONG) == -signal.SIGKILL
    assert oom_control(cg.path)["oom_kill"] == 0  # ours: the new memcg is really taken over
    assert d.stop() == 0
    assert disabled(cg) == 0 and journal(run_dir) == []


def test_a_removed_memcg_waits_and_comes_back(memcg: Make, daemons: Callable[..., Daemon], run_dir: Path) -> None:
    cg = memcg(limit=32 * MiB)
    d = daemons(takeover_config([cg.rel], run_dir))
    cg.path.rmdir()
    wait_for(lambda: "waiting for it to come back" in d.stderr(), LONG, "the daemon to notice")
    assert d.stderr().count("waiting for it to come back") == 1
    # The watchdog removes the entry when it hears `forget`, sent just before that line.
    wait_for(lambda: journal(run_dir) == [], LONG, "the journal entry removed")
    assert d.proc.poll() is None  # not a failure
    cg.path.mkdir()
    wait_for(lambda: disabled(cg) == 1, LONG, "the memcg taken over again")
    assert d.stop() == 0
    assert disabled(cg) == 0


def test_a_glob_takes_over_memcgs_as_they_appear(memcg: Make, daemons: Callable[..., Daemon], run_dir: Path) -> None:
    cg = memcg()
    d = daemons(takeover_config([f"{cg.rel}/pod-*"], run_dir))
    pod = cg.path / "pod-1"
    pod.mkdir()
    try:
        wait_for(lambda: oom_control(pod)["oom_kill_disable"] == 1, LONG, "the new pod taken over")
        (pod / "memory.limit_in_bytes").write_text(str(32 * MiB))
        hog = kernel.Cgroup(pod, cg.root).hog(64)
        assert hog.wait(timeout=LONG) == -signal.SIGKILL
        assert oom_control(pod)["oom_kill"] == 0  # our kill
        assert d.stop() == 0
        assert oom_control(pod)["oom_kill_disable"] == 0 and journal(run_dir) == []
    finally:
        kernel.remove_tree(pod)


# --- one memcg, one daemon -----------------------------------------------------------------


def test_two_daemons_cannot_hold_one_memcg_under_two_spellings(
    memcg: Make, daemons: Callable[..., Daemon], run_dir: Path, tmp_path: Path
) -> None:
    cg = memcg(limit=32 * MiB)
    first = daemons(takeover_config([cg.rel], run_dir))
    for i, spelling in enumerate([str(cg.path), f"{cg.rel}/x/..", f"/{cg.rel}//./", cg.rel.lstrip("/")]):
        other_run_dir = tmp_path / f"run-{i}"
        second = daemons(takeover_config([spelling], other_run_dir), ready=False)
        assert second.proc.wait(timeout=LONG) == 2
        err = second.stderr().strip().splitlines()
        errors = [ln for ln in err if "error" in ln.lower()]
        assert errors == [err[-1]], err  # one line says why, after the daemon's usual start-up lines
        assert err[-1].startswith("oomkit: error: cgroup ") and f"another oomkit (pid {first.pid}) holds it" in err[-1]
        assert disabled(cg) == 1  # its exit released nothing of the first's
    hog = cg.hog(64)
    assert hog.wait(timeout=LONG) == -signal.SIGKILL
    assert oom_control(cg.path)["oom_kill"] == 0  # the first still decides
    assert first.stop() == 0
    assert disabled(cg) == 0


def test_dotdot_cannot_reach_the_daemons_own_memcg(memcg: Make, run_dir: Path, tmp_path: Path) -> None:
    own = own_cgroup("/proc", "memory")
    assert own is not None
    sub = memcg()  # a child of our memcg, where the daemon runs too
    for spelling in (f"{sub.rel}/..", f"{own}/./", f"{sub.path}/../"):
        cfg = tmp_path / "dotdot.toml"
        cfg.write_text(takeover_config([spelling], run_dir))
        out = oomkit("serve", "-c", str(cfg))
        assert out.returncode == 2, out.stderr
        assert out.stderr.count("\n") == 1 and "oomkit runs in it; an OOM there would pause oomkit too" in out.stderr
    own_path = kernel.v1_parent()
    assert own_path is not None and oom_control(own_path)["oom_kill_disable"] == 0


def test_a_200_character_name_and_a_path_over_path_max(memcg: Make, daemons: Callable[..., Daemon], run_dir: Path, tmp_path: Path) -> None:
    cg = memcg()
    long = cg.path / ("n" * 200)
    long.mkdir()
    try:
        d = daemons(takeover_config([str(long)], run_dir))
        assert oom_control(long)["oom_kill_disable"] == 1
        assert d.stop() == 0
        assert oom_control(long)["oom_kill_disable"] == 0
        assert journal(run_dir) == [] and os.listdir(run_dir / "journal") == []
    finally:
        kernel.remove_tree(long)
    cfg = tmp_path / "long.toml"
    cfg.write_text(takeover_config([cg.rel + "/x" * 2100], run_dir))
    out = oomkit("serve", "-c", str(cfg))
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "longer than PATH_MAX" in out.stderr, out.stderr
