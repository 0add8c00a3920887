"""StartTimes on the real /proc: a live process's start time kept behind a pidfd, dropped at
exit (asked at each get, or told by the event loop while watched); a pid reused by a new
process (forced in a pid namespace of our own through ``ns_last_pid``) never answered with
the old process's start time."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator

import anyio
import pytest
import sniffio

from oomkit.procfs import StartTimes, start_ticks

from ..pidreuse import run_in_pid_namespace

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
    assert open_fds() == before + 1  # the epoll set the pidfds go into
    kids = [spawn(children) for _ in range(4)]
    for k in kids:
        assert times.get(k.pid) == start_ticks("/proc", k.pid)
    assert len(times) == 2 and open_fds() == before + 3
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


@pytest.mark.anyio
async def test_a_watched_cache_is_told_of_an_exit_by_the_loop(children: list[subprocess.Popen[bytes]]) -> None:
    if not hasattr(os, "pidfd_open"):
        pytest.skip("this Python has no os.pidfd_open")
    times = StartTimes("/proc")
    child = spawn(children)
    want = start_ticks("/proc", child.pid)
    before = open_fds()
    async with times.watching() as watched:
        assert watched == (sniffio.current_async_library() == "asyncio")
        assert "watched" in repr(times) if watched else "watched" not in repr(times)
        assert times.get(child.pid) == want
        assert open_fds() == before + 1
        child.kill()
        child.wait()
        if watched:
            # Nobody asks: the loop's callback on the pidfd drops the entry and closes it.
            with anyio.fail_after(30):
                while len(times):
                    await anyio.sleep(0.01)
        else:
            # trio: no registration; the next get asks the kernel, as outside watching().
            await anyio.sleep(0.05)
            assert len(times) == 1
            assert times.get(child.pid) is None
        assert len(times) == 0 and times.reaped == 1 and open_fds() == before
    assert "watched" not in repr(times)
    times.close()


_REUSE = textwrap.dedent("""
    import asyncio, json, os, subprocess, sys, tempfile
    from pathlib import Path
    from oomkit.procfs import StartTimes, start_ticks
    from oomkit.sharedpage import Publisher, RingReader
    from tests.pidreuse import spawn_with_pid

    async def main():
        times = StartTimes("/proc")
        async with times.watching() as watched:
            old = subprocess.Popen(["sleep", "60"])
            old_ticks = times.get(old.pid)
            old.kill()
            old.wait()
            # The loop waits (and looks at its fds) for a few clock ticks: the new process will
            # start at another time.  Nothing asks the cache meanwhile.
            await asyncio.sleep(0.05)
            new = spawn_with_pid(old.pid, ["sleep", "60"])
            answer = times.get(new.pid)
            with tempfile.TemporaryDirectory() as d:
                ring = Path(d) / "reuse.ring"
                with Publisher.create(ring, doorbell=Path(d) / "none") as pub:
                    reader = RingReader(ring, proc="/proc", start_times=times)
                    pub.publish("oom", "/x", pid=old.pid, start_ticks=old_ticks, ring=False)
                    pub.publish("oom", "/x", pid=new.pid, start_ticks=answer, ring=False)
                    got = [r.start_ticks for r in reader.poll()]
                    reader.close()
            new.kill()
            new.wait()
        print(json.dumps({"watched": watched, "pid": [old.pid, new.pid], "ticks": [old_ticks, answer],
                          "accepted": got,
                          "rejected": reader.stats.rejected, "reaped": times.reaped}))
        times.close()

    if sys.argv[1] == "uvloop":
        import uvloop
        uvloop.run(main())
    else:
        asyncio.run(main())
""")


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_a_reused_pid_is_never_answered_with_the_old_start_time(loop: str) -> None:
    got = run_in_pid_namespace(_REUSE, loop)
    assert got["watched"] is True
    assert got["pid"][0] == got["pid"][1]
    old_ticks, new_ticks = got["ticks"]
    assert old_ticks != new_ticks
    assert got["reaped"] == 1
    # The record naming the old process is refused; the one naming the new process passes.
    assert got["accepted"] == [new_ticks]
    assert got["rejected"] == {"pid": 1}


@pytest.mark.anyio
async def test_close_inside_watching_is_refused(children: list[subprocess.Popen[bytes]]) -> None:
    if not hasattr(os, "pidfd_open"):
        pytest.skip("this Python has no os.pidfd_open")
    times = StartTimes("/proc")
    async with times.watching() as watched:
        if watched:
            with pytest.raises(RuntimeError, match="inside watching"):
                times.close()
    times.close()
    assert len(times) == 0
