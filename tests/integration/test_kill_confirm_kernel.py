"""Kill confirmation against real processes: a real child the engine kills through the
first-party killer is confirmed (a zombie until reaped: its memory is freed), and one a
lying killer only claims is found still running and counted."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator

import anyio
import pytest

from oomkit import Candidate, KillResult, hookimpl
from oomkit.procfs import read_process
from oomkit.testing import assert_outcome, harness

pytestmark = [pytest.mark.kernel, pytest.mark.anyio]


@pytest.fixture
def child() -> Iterator[subprocess.Popen[bytes]]:
    p = subprocess.Popen(["sleep", "600"])
    yield p
    p.kill()
    p.wait()


class OnlyThis:
    """Offers the one real process (the real /proc has the test runner, its parents...)."""

    name = "only_this"

    def __init__(self, pid: int) -> None:
        c = read_process("/proc", pid)
        assert c is not None
        self.cands = [c]

    @hookimpl(tryfirst=True)
    def oomkit_candidates(self) -> list[Candidate]:
        return self.cands


class Liar:
    name = "liar"

    @hookimpl(tryfirst=True)
    async def oomkit_kill(self, victim: Candidate) -> KillResult:
        return KillResult(action="claimed", outcome="killed", pids=(victim.pid,))


async def until(pred: Callable[[], bool]) -> None:
    with anyio.fail_after(60):
        while not pred():
            await anyio.sleep(0.02)


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_real_kill_is_confirmed_and_a_claimed_one_is_not(child: subprocess.Popen[bytes]) -> None:
    config = {"engine": {"kill_confirm_s": 1.0}, "plugins": {"disable": ["candidates"]}}
    async with harness(OnlyThis(child.pid), Liar(), dry_run=False, config=config) as h:
        d = await h.decide()
        assert_outcome(d, "killed")
        assert d.killer == "liar"
        await until(lambda: h.engine.stats.kills_unconfirmed == 1)
        assert child.poll() is None  # it was never signalled
    async with harness(OnlyThis(child.pid), dry_run=False, config=config) as h:
        d = await h.decide()
        assert_outcome(d, "killed")
        assert d.killer != "liar" and d.killed == (child.pid,)
        await anyio.sleep(1.5)  # past the window
        assert h.engine.stats.kills_unconfirmed == 0
    assert child.wait(timeout=30) == -9
