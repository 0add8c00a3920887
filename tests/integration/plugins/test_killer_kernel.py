"""SignalKiller on real processes: pidfds, signals, grace, ESRCH, reused pids, process_mrelease."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import anyio
import pytest

from oomkit import Candidate, Config, Event, KillResult, probes
from oomkit.procfs import read_process
from oomkit.testing import EARLY_TIMER_NS
from oomkit_plugins.killer import SignalKiller

from ... import kernel
from ..._support_plugins import configured_real

pytestmark = [pytest.mark.kernel, pytest.mark.anyio]

MiB = 1 << 20

SLEEP = "import time; print('up', flush=True); time.sleep(60)"
EXIT_ON_TERM = (
    "import signal, sys, time\n"
    "signal.signal(signal.SIGTERM, lambda *a: sys.exit(3))\n"
    "print('up', flush=True)\n"
    "time.sleep(60)\n"
)
IGNORE_TERM = (
    "import signal, time\n"
    "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    "print('up', flush=True)\n"
    "time.sleep(60)\n"
)


@pytest.fixture
def spawn() -> Iterator[Callable[[str], subprocess.Popen[bytes]]]:
    """Start a Python child that says ``up`` once its signal handlers are set."""
    children: list[subprocess.Popen[bytes]] = []

    def start(code: str) -> subprocess.Popen[bytes]:
        child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
        children.append(child)
        assert child.stdout is not None and child.stdout.readline() == b"up\n"
        return child

    yield start
    for child in children:
        child.kill()
        child.wait()
        assert child.stdout is not None
        child.stdout.close()


def candidate(pid: int) -> Candidate:
    cand = read_process("/proc", pid)
    assert cand is not None
    return cand


def killer(**settings: object) -> SignalKiller:
    return configured_real(SignalKiller(), killer=settings)


LOW = Event(source="t", kind="low-memory")
OOM = Event(source="t", kind="oom")


async def test_plain_kill_sends_sigkill_and_waits_for_death(spawn: Callable[[str], subprocess.Popen[bytes]]) -> None:
    child = spawn(SLEEP)
    res = await killer(grace_s=0).oomkit_kill(LOW, candidate(child.pid))
    assert (res.action, res.outcome, res.signals) == ("kill", "killed", ("SIGKILL",))
    assert 0 < res.sent_ns <= res.dead_ns
    assert child.wait(timeout=5) == -9


async def test_sigterm_is_enough_for_a_process_that_exits_on_it(spawn: Callable[[str], subprocess.Popen[bytes]]) -> None:
    child = spawn(EXIT_ON_TERM)
    res = await killer(grace_s=3).oomkit_kill(LOW, candidate(child.pid))
    assert (res.outcome, res.signals, res.memory_released) == ("killed", ("SIGTERM",), False)
    assert child.wait(timeout=5) == 3
    assert res.dead_ns - res.sent_ns < 3e9  # it did not wait out the grace period


async def test_sigkill_follows_the_grace_period_when_sigterm_is_ignored(
    spawn: Callable[[str], subprocess.Popen[bytes]]
) -> None:
    child = spawn(IGNORE_TERM)
    res = await killer(grace_s=0.2).oomkit_kill(LOW, candidate(child.pid))
    assert (res.outcome, res.signals) == ("killed", ("SIGTERM", "SIGKILL"))
    assert res.dead_ns - res.sent_ns >= 0.2e9 - EARLY_TIMER_NS
    assert child.wait(timeout=5) == -9


async def test_oom_events_skip_the_grace_period(spawn: Callable[[str], subprocess.Popen[bytes]]) -> None:
    child = spawn(EXIT_ON_TERM)
    res = await killer(grace_s=3).oomkit_kill(OOM, candidate(child.pid))
    assert (res.outcome, res.signals) == ("killed", ("SIGKILL",))
    assert child.wait(timeout=5) == -9


async def test_a_process_that_is_gone_is_exited_not_an_error(spawn: Callable[[str], subprocess.Popen[bytes]]) -> None:
    child = spawn(SLEEP)
    cand = candidate(child.pid)
    child.kill()
    child.wait()  # reaped: the pid no longer exists (ESRCH from pidfd_open)
    res = await killer().oomkit_kill(LOW, cand)
    assert (res.outcome, res.signals, res.sent_ns) == ("exited", (), 0)


async def test_a_pid_reused_by_another_process_is_never_killed(spawn: Callable[[str], subprocess.Popen[bytes]]) -> None:
    child = spawn(SLEEP)
    # The same pid with another start time is what a reused pid looks like.
    stale = Candidate(pid=child.pid, name="python3", start_ticks=candidate(child.pid).start_ticks - 1)
    res = await killer(grace_s=0).oomkit_kill(OOM, stale)
    assert res.outcome == "exited" and "was reused" in res.detail
    time.sleep(0.05)
    assert child.poll() is None


# Private anonymous memory: tests/hog.py maps MAP_SHARED (shmem), which no reaper can free
# while the shmem object lives, so process_mrelease would "succeed" and free nothing.
PRIVATE_HOG = (
    "import mmap, sys\n"
    "n = int(sys.argv[1]) << 20\n"
    "m = mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)\n"
    "for off in range(0, n, mmap.PAGESIZE):\n"
    "    m[off] = 1\n"
    "print('up', flush=True)\n"
    "sys.stdin.read()\n"
)


class Freezer:
    """A v1 freezer cgroup of our own.  A SIGKILLed task that is frozen cannot run its own
    exit, so process_mrelease does not race with it."""

    def __init__(self) -> None:
        found = probes.run_probe("freezer-v1")
        if not found.ok:
            pytest.skip(found.reason)
        self.dir = Path(found.detail["dir"]) / f"{kernel.PREFIX}{os.getpid()}-freezer"
        self.dir.mkdir()

    def freeze(self, pid: int) -> None:
        (self.dir / "cgroup.procs").write_text(str(pid))
        (self.dir / "freezer.state").write_text("FROZEN")
        deadline = time.monotonic() + 10
        while (self.dir / "freezer.state").read_text().strip() != "FROZEN":
            assert time.monotonic() < deadline, "the freezer never froze the hog"
            time.sleep(0.001)

    def thaw(self) -> None:
        (self.dir / "freezer.state").write_text("THAWED")

    def remove(self) -> None:
        self.thaw()
        for _ in range(500):
            try:
                self.dir.rmdir()
                return
            except OSError:
                time.sleep(0.01)  # the killed task leaves the cgroup as it exits
        self.dir.rmdir()


@pytest.fixture
def freezer() -> Iterator[Freezer]:
    f = Freezer()
    yield f
    f.remove()


async def test_process_mrelease_reaps_a_frozen_hog_inside_a_memcg(
    memcg: Callable[..., kernel.Cgroup], freezer: Freezer
) -> None:
    cg = memcg(limit=512 * MiB)
    hog = cg.spawn([sys.executable, "-c", PRIVATE_HOG, "256"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert hog.stdout is not None and hog.stdout.readline() == b"up\n"
        assert int(cg.read("memory.usage_in_bytes")) > 256 * MiB
        cand = candidate(hog.pid)
        freezer.freeze(hog.pid)
        results: list[KillResult] = []

        async def kill() -> None:
            results.append(await killer(grace_s=0).oomkit_kill(OOM, cand))

        async with anyio.create_task_group() as tg:
            tg.start_soon(kill)
            with anyio.fail_after(10):
                # Released while the victim is still frozen: by process_mrelease alone.
                while int(cg.read("memory.usage_in_bytes")) > 64 * MiB:
                    await anyio.sleep(0.005)
            assert not results  # the killer still waits for the frozen victim to die
            freezer.thaw()
        res = results[0]
        assert (res.outcome, res.signals, res.memory_released) == ("killed", ("SIGKILL",), True)
        assert hog.wait(timeout=5) == -9
    finally:
        freezer.thaw()
        hog.kill()
        hog.wait()
        for pipe in (hog.stdin, hog.stdout):
            assert pipe is not None
            pipe.close()


async def test_without_release_memory_it_is_not_reported_released(spawn: Callable[[str], subprocess.Popen[bytes]]) -> None:
    child = spawn(SLEEP)
    res = await killer(grace_s=0, release_memory=False).oomkit_kill(LOW, candidate(child.pid))
    assert (res.outcome, res.memory_released) == ("killed", False)


def test_the_default_settings_fit_the_default_kill_timeout() -> None:
    assert configured_real(SignalKiller()).settings.grace_s < Config().engine.kill_timeout_s
