"""The core's protections against the real /proc and real processes, with ``protect`` gone.

The killers here are real (the first-party ``SignalKiller``) wherever a broken protection
would only hurt a process the test made; where it would hurt this process, its parent or a
kernel thread, a recording killer stands in, and the test asserts it was never called.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import msgspec
import pytest

from oomkit import Candidate, Config, Engine, Event, KillResult, Scope, hookimpl
from oomkit.config import config_from_dict
from oomkit.procfs import PF_KTHREAD, read_process
from oomkit.safety import CORE
from oomkit.testing import assert_outcome, assert_vetoed
from oomkit_plugins.killer import SignalKiller

from .. import kernel

pytestmark = [pytest.mark.kernel, pytest.mark.anyio]

class Offer:
    name = "offer"

    def __init__(self, cands: Sequence[Candidate]) -> None:
        self.cands = list(cands)

    @hookimpl
    def oomkit_candidates(self) -> list[Candidate]:
        return self.cands


class Recorder:
    name = "recorder"

    def __init__(self) -> None:
        self.killed: list[int] = []

    @hookimpl
    async def oomkit_kill(self, victim: Candidate) -> KillResult:
        self.killed.append(victim.pid)
        return KillResult(action="recorded", outcome="killed")


def real(pid: int, **lies: object) -> Candidate:
    c = read_process("/proc", pid)
    assert c is not None, f"pid {pid} is gone"
    return msgspec.structs.replace(c, **lies)


def engine(*plugins: object, config: Config | None = None) -> Engine:
    return Engine(config or Config(sources=()), plugins=plugins, autoload=False, dry_run=False)


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    child = subprocess.Popen([sys.executable, "-c", "import time; print('up', flush=True); time.sleep(60)"],
                             stdout=subprocess.PIPE)
    assert child.stdout is not None and child.stdout.readline() == b"up\n"
    yield child
    child.kill()
    child.wait()
    child.stdout.close()


def _never_kill(pid: int) -> None:
    fd = os.open(f"/proc/{pid}/oom_score_adj", os.O_WRONLY)
    try:
        os.write(fd, b"-1000")  # os.write reports EACCES; a buffered file would hide it
    finally:
        os.close(fd)


async def test_a_real_child_with_adj_minus_1000_is_never_killed(sleeper: subprocess.Popen[bytes]) -> None:
    # Lowering it below 0 needs CAP_SYS_RESOURCE, which root may lack (KERNEL.md); the
    # probe's `oomkit doctor` line says so.
    reason = kernel.skip_reason("oom-score-adj")
    if reason:
        pytest.skip(reason)
    _never_kill(sleeper.pid)
    honest = real(sleeper.pid)
    assert honest.oom_score_adj == -1000
    async with engine(Offer([honest]), SignalKiller()) as e:
        d = await e.decide(Event(source="test", kind="oom"))
    assert_outcome(d, "all-vetoed")
    assert_vetoed(d, sleeper.pid, by=CORE, reason="oom_score_adj is -1000")
    # A candidates plugin that says adj 0: the re-read of /proc/PID/oom_score_adj catches it.
    async with engine(Offer([msgspec.structs.replace(honest, oom_score_adj=0)]), SignalKiller()) as e:
        d = await e.decide(Event(source="test", kind="oom"))
    assert_outcome(d, "all-vetoed")
    assert_vetoed(d, sleeper.pid, by=CORE, reason="re-verified in /proc before the kill: oom_score_adj is -1000")
    assert sleeper.poll() is None


async def test_the_real_killer_kills_an_ordinary_child_so_the_tests_above_can_fail(
    sleeper: subprocess.Popen[bytes],
) -> None:
    async with engine(Offer([real(sleeper.pid)]), SignalKiller()) as e:
        d = await e.decide(Event(source="test", kind="oom"))
    assert_outcome(d, "killed")
    assert sleeper.wait(timeout=10) == -9


def _kthread(pid: int) -> bool:
    raw = Path(f"/proc/{pid}/stat").read_bytes()
    return bool(int(raw[raw.rindex(b")") + 2 :].split()[6]) & PF_KTHREAD)


async def test_lies_about_real_processes_are_caught_before_the_kill() -> None:
    if not Path("/proc/2/stat").exists() or not _kthread(2):
        pytest.skip("pid 2 is not a kernel thread here (a pid namespace): no kernel thread to offer")
    stop = threading.Event()
    helper = threading.Thread(target=stop.wait, name="oomkit-test-thread")
    helper.start()
    try:
        tid = helper.native_id
        assert tid is not None and tid != os.getpid()
        lies = [
            real(2, kthread=False),  # kthreadd, said not to be a kernel thread
            real(os.getppid(), start_ticks=1),  # our parent, under another start time
            real(tid),  # one of our own threads, offered as a process
        ]
        recorder = Recorder()
        async with engine(Offer(lies), recorder) as e:
            d = await e.decide(Event(source="test", kind="oom"))
    finally:
        stop.set()
        helper.join()
    assert_outcome(d, "all-vetoed")
    assert recorder.killed == [] and e.stats.refused_at_recheck == 3
    assert_vetoed(d, 2, by=CORE, reason="re-verified in /proc before the kill: kernel thread")
    assert_vetoed(d, os.getppid(), by=CORE, reason="an ancestor of oomkit")
    assert_vetoed(d, tid, by=CORE, reason=f"is a thread of process {os.getpid()}, not a process")


async def test_the_takeover_watchdog_is_never_killed(memcg: Callable[..., kernel.Cgroup], tmp_path: Path) -> None:
    cg = memcg(limit=64 << 20)
    config = config_from_dict(
        {
            "sources": [{"kind": "memcg-oom", "cgroups": [cg.rel], "takeover": True}],
            "paths": {"run_dir": str(tmp_path / "run")},
        },
        "<test>",
    )
    # Found the way an operator would, not through the API under test: our child running
    # oomkit/watchdog.py.
    def watchdogs() -> list[int]:
        found = []
        for pid in os.listdir("/proc"):
            if pid.isdigit():
                try:
                    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                    c = read_process("/proc", int(pid))
                except OSError:
                    continue
                if c is not None and c.ppid == os.getpid() and any(a.endswith(b"watchdog.py") for a in argv):
                    found.append(int(pid))
        return found

    class OfferWatchdog:
        name = "offer"

        @hookimpl
        def oomkit_candidates(self) -> list[Candidate]:
            return [real(pid) for pid in watchdogs()]

    async with engine(OfferWatchdog(), SignalKiller(), config=config) as e:
        (dog,) = watchdogs()
        # From a source the engine does not know, so no re-check of under_oom stops the kill.
        d = await e.decide(Event(source="test", kind="oom", scope=Scope("v1", cg.rel)))
        # SignalKiller returns once its victim is dead, so a killed watchdog would be a
        # zombie (or gone) by now.
        try:
            stat = Path(f"/proc/{dog}/stat").read_bytes()
        except FileNotFoundError:
            pytest.fail("the watchdog was killed and reaped")
        assert stat[stat.rindex(b")") + 2 :].split()[0] not in (b"Z", b"X"), "the watchdog was killed"
    assert_outcome(d, "all-vetoed")
    assert_vetoed(d, dog, by=CORE, reason="depends on it (its watchdog)")
