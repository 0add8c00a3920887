"""StartTimes on the real /proc: a live process's start time kept behind a pidfd, dropped at exit."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

from oomkit.procfs import StartTimes, start_ticks

pytestmark = pytest.mark.kernel


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture
def children() -> Iterator[list[subprocess.Popen[bytes]]]:
    made: list[subprocess.Popen[bytes]] = []
    yield made
    for p in made:
        p.kill()
        p.wait()


def spawn(made: list[subprocess.Popen[bytes]]) -> subprocess.Popen[bytes]:
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    made.append(p)
    return p


def test_a_live_child_is_kept_and_an_exited_one_forgotten(children: list[subprocess.Popen[bytes]]) -> None:
    if not hasattr(os, "pidfd_open"):
        pytest.skip("this Python has no os.pidfd_open")
    times = StartTimes("/proc")
    child = spawn(children)
    want = start_ticks("/proc", child.pid)
    assert want is not None
    before = open_fds()
    assert times.get(child.pid) == want
    assert len(times) == 1 and open_fds() == before + 1  # one pidfd held
    assert times.get(child.pid) == want  # from the cache: the pidfd says it lives
    child.kill()
    child.wait()  # reaped: its pid may now be anyone's
    assert times.get(child.pid) is None
    assert len(times) == 0 and open_fds() == before  # its pidfd closed
    times.close()


def test_the_cache_is_bounded_and_close_releases_every_pidfd(children: list[subprocess.Popen[bytes]]) -> None:
    if not hasattr(os, "pidfd_open"):
        pytest.skip("this Python has no os.pidfd_open")
    before = open_fds()
    times = StartTimes("/proc", limit=2)
    kids = [spawn(children) for _ in range(4)]
    for k in kids:
        assert times.get(k.pid) == start_ticks("/proc", k.pid)
    assert len(times) == 2 and open_fds() == before + 2
    times.close()
    assert len(times) == 0 and open_fds() == before


def test_a_zombie_is_answered_by_a_read_not_kept(children: list[subprocess.Popen[bytes]]) -> None:
    if not hasattr(os, "pidfd_open"):
        pytest.skip("this Python has no os.pidfd_open")
    times = StartTimes("/proc")
    child = spawn(children)
    assert times.get(child.pid) is not None
    child.kill()
    os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)  # dead, not reaped: a zombie
    # The pidfd polls readable: the cached answer is not trusted; a zombie's stat still reads.
    assert times.get(child.pid) == start_ticks("/proc", child.pid)
    assert len(times) == 0
    times.close()
