"""A killer's word is checked: after a ``killed`` decision the engine waits up to
``[engine] kill_confirm_s`` for every pid the killer named to be gone (exited, a zombie, its
pid reused) and logs and counts one that still runs.  Fake /proc: the test plays the kernel."""

from __future__ import annotations

import logging
from collections.abc import Callable

import anyio
import pytest

from oomkit import Candidate, KillResult, hookimpl
from oomkit.procfs import running
from oomkit.testing import FakeProc, assert_outcome, harness

pytestmark = pytest.mark.anyio

MiB = 1 << 20


class Killer:
    """Says it killed the victim; what happens to the process is the test's ``then``."""

    name = "claims"

    def __init__(self, then: Callable[[Candidate], None]) -> None:
        self.then = then

    @hookimpl(tryfirst=True)
    async def oomkit_kill(self, victim: Candidate) -> KillResult:
        self.then(victim)
        return KillResult(action="claimed", outcome="killed", pids=(victim.pid,))


async def until(pred: Callable[[], bool]) -> None:
    with anyio.fail_after(30):
        while not pred():
            await anyio.sleep(0.01)


def test_running_means_alive_not_a_zombie_and_not_a_reused_pid(fake_proc: FakeProc) -> None:
    fake_proc.add_process(700, "job", start_ticks=50)
    assert running(str(fake_proc.path), 700, 50)
    assert not running(str(fake_proc.path), 700, 51)  # another process has the pid now
    fake_proc.add_process(700, "job", start_ticks=50, state="Z")
    assert not running(str(fake_proc.path), 700, 50)
    fake_proc.remove_process(700)
    assert not running(str(fake_proc.path), 700, 50)


@pytest.mark.parametrize("fate", ["exits", "zombie", "reused"])
async def test_a_kill_that_happened_is_confirmed(fake_proc: FakeProc, fate: str) -> None:
    fake_proc.add_process(700, "job", rss=64 * MiB, start_ticks=50)

    def die(victim: Candidate) -> None:
        if fate == "exits":
            fake_proc.remove_process(victim.pid)
        else:
            fake_proc.add_process(victim.pid, "job", start_ticks=50 if fate == "zombie" else 99,
                                  state="Z" if fate == "zombie" else "S")

    async with harness(Killer(die), proc=fake_proc, dry_run=False, config={"engine": {"kill_confirm_s": 0.5}}) as h:
        d = await h.decide()
        assert_outcome(d, "killed")
        assert d.killer == "claims" and d.killed == (700,)
        await anyio.sleep(0.8)  # past the window: a confirmed kill says nothing either way
        assert h.engine.stats.kills_unconfirmed == 0
        assert h.engine.snapshot().counters.kills_unconfirmed == 0


async def test_a_killer_that_only_claims_its_kill_is_found_out(
    fake_proc: FakeProc, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "oomkit.engine")
    fake_proc.add_process(700, "job", rss=64 * MiB, start_ticks=50)
    async with harness(Killer(lambda v: None), proc=fake_proc, dry_run=False,
                       config={"engine": {"kill_confirm_s": 0.2}}) as h:
        d = await h.decide()
        assert_outcome(d, "killed")  # the decision records what the killer said...
        await until(lambda: h.engine.stats.kills_unconfirmed == 1)  # ...and the engine what it found
        assert h.engine.snapshot().counters.kills_unconfirmed == 1
    assert (f"decision {d.id}: claims said it killed pid 700 (job), but pid 700 still runs 0.2 s later"
            in caplog.text), caplog.text
