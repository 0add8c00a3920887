"""The core's protections on fake trees: what no config and no plugin can switch off, in the
ranking (vetoes by ``oomkit``) and in the re-verification against /proc before the kill."""

from __future__ import annotations

import os
from collections.abc import Collection, Sequence
from pathlib import Path

import msgspec
import pytest

from oomkit import Candidate, Decision, KillResult, PluginLoadError, hookimpl
from oomkit.procfs import read_process
from oomkit.safety import CORE, Safety
from oomkit.testing import FakeProc, FakeSource, assert_outcome, assert_vetoed, assert_victim, harness

pytestmark = pytest.mark.anyio

MiB = 1 << 20
ME = os.getpid()
NO_PROTECT = {"plugins": {"disable": ["protect"]}}


@pytest.fixture
def machine(fake_proc: FakeProc) -> FakeProc:
    """pid 1, a kernel thread, oomkit (this process) with two ancestors, a -1000 daemon."""
    fake_proc.add_process(1, "init", ppid=0, rss=900 * MiB, start_ticks=1)
    fake_proc.add_process(2, "kthreadd", ppid=0, kthread=True, start_ticks=2)
    fake_proc.add_process(800, "supervisor", ppid=1, rss=700 * MiB, start_ticks=10)
    fake_proc.add_process(801, "shell", ppid=800, rss=600 * MiB, start_ticks=20)
    fake_proc.add_process(ME, "oomkit", ppid=801, rss=800 * MiB, start_ticks=30)
    fake_proc.add_process(950, "sshd", oom_score_adj=-1000, rss=1000 * MiB, start_ticks=40)
    return fake_proc


def facts(proc: FakeProc, pid: int, **lies: object) -> Candidate:
    c = read_process(proc.path, pid)
    assert c is not None
    return msgspec.structs.replace(c, **lies)


class Offer:
    """Offers what it is given, true or not (the first-party candidates plugin leaves kernel
    threads out, so one that does not has to be a plugin of the test's)."""

    name = "offer"

    def __init__(self, cands: Sequence[Candidate]) -> None:
        self.cands = list(cands)

    @hookimpl(tryfirst=True)  # first, so its facts win over the first-party plugin's
    def oomkit_candidates(self) -> list[Candidate]:
        return self.cands


class PreferProtected:
    """A scorer that wants the protected processes dead: weights cannot undo the core."""

    name = "prefer_protected"

    @hookimpl
    def oomkit_score(self, candidates: Sequence[Candidate]) -> dict[int, float]:
        return {c.pid: 1e9 for c in candidates if c.pid in (1, 2, 800, 801, ME, 950)}


class Recorder:
    name = "recorder"

    def __init__(self) -> None:
        self.killed: list[int] = []

    @hookimpl(tryfirst=True)
    async def oomkit_kill(self, victim: Candidate) -> KillResult:
        self.killed.append(victim.pid)
        return KillResult(action="recorded", outcome="killed")


REASONS = {
    1: "pid 1 (init)",
    2: "kernel thread",
    800: f"an ancestor of oomkit (pid {ME})",
    801: f"an ancestor of oomkit (pid {ME})",
    ME: "oomkit itself",
    950: "oom_score_adj is -1000",
}


async def test_with_protect_disabled_none_of_them_can_be_chosen(machine: FakeProc) -> None:
    recorder = Recorder()
    offer = Offer([facts(machine, 2)])
    async with harness(offer, PreferProtected(), recorder, proc=machine, config=NO_PROTECT, dry_run=False) as h:
        assert "protect" in h.engine.plugins.disabled
        d = await h.decide(kind="low-memory")
    assert_outcome(d, "all-vetoed")
    assert recorder.killed == []
    assert {r.candidate.pid for r in d.ranking} == set(REASONS)
    for pid, reason in REASONS.items():
        assert_vetoed(d, pid, by=CORE, reason=reason)


async def test_the_one_ordinary_process_is_the_victim(machine: FakeProc) -> None:
    machine.add_process(960, "batch", rss=10 * MiB, start_ticks=50)
    recorder = Recorder()
    offer = Offer([facts(machine, 2)])
    async with harness(offer, PreferProtected(), recorder, proc=machine, config=NO_PROTECT, dry_run=False) as h:
        d = await h.decide(kind="low-memory")
        top = h.rank()
    assert_victim(d, "batch")
    assert recorder.killed == [960]
    # `oomkit top`'s ranking shows why, each core veto first in its list.
    assert [r.candidate.pid for r in top][0] == 960
    assert all(r.vetoes[0].plugin == CORE for r in top[1:])


async def test_no_plugin_may_take_the_core_name_nor_disable_it(machine: FakeProc) -> None:
    class Impostor:
        name = "oomkit"

        @hookimpl
        def oomkit_veto(self) -> dict[int, str]:
            return {}

    with pytest.raises(PluginLoadError, match="'oomkit': the name is reserved"):
        async with harness(Impostor(), proc=machine, autoload=False):
            pass  # pragma: no cover
    with pytest.raises(PluginLoadError, match="cannot disable unknown plugin.*'oomkit'"):
        async with harness(proc=machine, config={"plugins": {"disable": ["oomkit"]}}):
            pass  # pragma: no cover


def test_an_ancestor_is_matched_by_pid_and_start_time(machine: FakeProc) -> None:
    safety = Safety(machine.path)  # reads the chain now: 800 is the supervisor, start 10
    # The supervisor exits and a batch job gets its pid: that one is no ancestor of oomkit.
    machine.add_process(800, "batch", ppid=1, rss=700 * MiB, start_ticks=99999)
    batch = facts(machine, 800)
    assert safety.vetoes([batch], {}) == {}
    assert safety.verify(batch, {}).status == "ok"
    # A candidate claiming the supervisor's start time is vetoed on its word; /proc then
    # says it is another process, so it would not be killed either.
    assert 800 in safety.vetoes([facts(machine, 800, start_ticks=10)], {})
    assert safety.verify(facts(machine, 800, start_ticks=10), {}).status == "gone"


# --- the re-verification before the kill --------------------------------------------------


async def test_a_lying_candidates_plugin_is_caught_before_the_kill(machine: FakeProc) -> None:
    machine.add_process(960, "batch", rss=10 * MiB, start_ticks=50)
    machine.add_process(970, "worker-thread", tgid=960, rss=20 * MiB, start_ticks=51)
    lies = [
        facts(machine, 2, kthread=False, rss_bytes=5000 * MiB),  # a kernel thread, it says not
        facts(machine, 950, oom_score_adj=0),  # adj -1000, it says 0
        facts(machine, 800, start_ticks=12345),  # an ancestor, under another start time
        facts(machine, 970),  # a thread id: a signal to it kills process 960 unjudged
    ]
    recorder = Recorder()
    # Ranked by memory alone (the kernel's policy), so every lie ranks above the victim.
    config = {**NO_PROTECT, "engine": {"policy": "kernel"}}
    async with harness(Offer(lies), recorder, proc=machine, config=config, dry_run=False) as h:
        d = await h.decide()
    assert_victim(d, "batch")
    assert recorder.killed == [960]
    assert h.engine.stats.refused_at_recheck == 4
    for pid, what in [(2, "kernel thread"), (950, "oom_score_adj is -1000"), (800, "an ancestor of oomkit"),
                      (970, "pid 970 is a thread of process 960, not a process")]:
        v = assert_vetoed(d, pid, by=CORE, reason=what)
        assert v.reason.startswith("re-verified")
    # The ranking stays sorted: the victim first, every vetoed one after it.
    assert d.ranking[0].candidate.pid == 960 and all(r.vetoes for r in d.ranking[1:])


async def test_adj_rewritten_after_the_ranking_is_caught(machine: FakeProc) -> None:
    machine.add_process(960, "batch", rss=10 * MiB, start_ticks=50)

    class Rewrites:
        """Plays the process that lowers its own adj between the ranking and the kill."""

        name = "rewrites"

        @hookimpl
        def oomkit_veto(self) -> None:
            machine.add_process(960, "batch", rss=10 * MiB, start_ticks=50, oom_score_adj=-1000)

    recorder = Recorder()
    async with harness(Rewrites(), recorder, proc=machine, dry_run=False) as h:
        d = await h.decide()
    assert_outcome(d, "all-vetoed")
    assert d.detail == "every killable candidate was refused when re-verified in /proc before the kill"
    assert_vetoed(d, 960, by=CORE, reason="oom_score_adj is -1000")
    assert recorder.killed == []


async def test_a_victim_gone_or_reused_is_not_killed(machine: FakeProc) -> None:
    machine.add_process(960, "batch", rss=10 * MiB, start_ticks=50)
    recorder = Recorder()
    async with harness(Offer([facts(machine, 960)]), recorder, proc=machine, dry_run=False) as h:
        h.source.holds = False  # its going ended the condition
        machine.add_process(960, "other", rss=10 * MiB, start_ticks=77)  # pid reused
        reused = await h.decide()
        machine.remove_process(960)
        gone = await h.decide()
    assert_outcome(reused, "exited")
    assert reused.detail == "pid 960 now belongs to another process (start time 77, the candidate's 50)"
    assert_outcome(gone, "exited")
    assert gone.detail == "pid 960 was gone when re-verified before the kill"
    assert recorder.killed == []


async def test_a_victim_gone_while_the_condition_holds_makes_the_next_candidate_the_victim(
    machine: FakeProc,
) -> None:
    machine.add_process(960, "batch", rss=10 * MiB, start_ticks=50)
    machine.add_process(961, "batch2", rss=5 * MiB, start_ticks=51)
    recorder = Recorder()
    offer = Offer([facts(machine, 960), facts(machine, 961)])
    async with harness(offer, recorder, proc=machine, dry_run=False) as h:
        machine.remove_process(960)  # gone, and the OOM still holds (h.source.holds)
        d = await h.decide()
        assert h.engine.stats.gone_at_recheck == 1
    assert_victim(d, 961)
    assert_vetoed(d, 960, by=CORE, reason="gone: pid 960 was gone when re-verified before the kill")
    assert recorder.killed == [961]


async def test_victims_gone_one_after_another_end_at_a_bound(machine: FakeProc) -> None:
    phantoms = [Candidate(pid=5000 + i, name=f"ghost{i}", rss_bytes=(100 - i) * MiB, start_ticks=7) for i in range(20)]
    machine.add_process(961, "batch2", rss=5 * MiB, start_ticks=51)
    recorder = Recorder()
    async with harness(Offer([*phantoms, facts(machine, 961)]), recorder, proc=machine, dry_run=False) as h:
        d = await h.decide()
        assert h.engine.stats.gone_at_recheck == 8
    assert_outcome(d, "exited")  # the ninth ghost ends it: a plugin offering pids nobody has cannot loop
    assert d.victim is not None and d.victim.pid == 5008
    assert recorder.killed == []


async def test_the_only_candidate_gone_while_the_condition_holds_hands_the_decision_back(machine: FakeProc) -> None:
    machine.add_process(960, "batch", rss=10 * MiB, start_ticks=50)
    recorder = Recorder()
    async with harness(Offer([facts(machine, 960)]), recorder, proc=machine, dry_run=False) as h:
        machine.remove_process(960)
        d = await h.decide()
        assert h.engine.stats.gone_at_recheck == 1
    assert_outcome(d, "all-vetoed")
    assert d.detail.startswith("1 victim(s) were gone at the re-check and every other candidate is protected")
    assert recorder.killed == []


async def test_a_process_that_cannot_be_read_is_not_killed(machine: FakeProc) -> None:
    machine.add_process(960, "batch", rss=10 * MiB, start_ticks=50)
    recorder = Recorder()
    async with harness(Offer([facts(machine, 960)]), recorder, proc=machine, dry_run=False) as h:
        (Path(machine.path) / "960" / "status").write_text("Name:\tbatch\n")
        d = await h.decide()
    assert_outcome(d, "all-vetoed")
    assert_vetoed(d, 960, by=CORE, reason="has no Tgid line")
    assert recorder.killed == []


async def test_dry_run_re_verifies_too(machine: FakeProc) -> None:
    async with harness(Offer([facts(machine, 2, kthread=False)]), proc=machine, config=NO_PROTECT) as h:
        d = await h.decide()
    assert_outcome(d, "all-vetoed")
    assert_vetoed(d, 2, by=CORE, reason="re-verified in /proc before the kill: kernel thread")


# --- sources' watchdogs -------------------------------------------------------------------


class Guarded(FakeSource):
    def __init__(self, name: str, pids: Collection[int] | Exception) -> None:
        super().__init__(name)
        self.pids = pids

    def protected_pids(self) -> Collection[int]:
        if isinstance(self.pids, Exception):
            raise self.pids
        return self.pids


async def test_a_sources_watchdog_is_never_chosen(machine: FakeProc) -> None:
    machine.add_process(970, "watchdog", ppid=ME, rss=900 * MiB, start_ticks=60)
    machine.add_process(960, "batch", rss=10 * MiB, start_ticks=50)
    sources = [Guarded("takeover", [970]), Guarded("broken", RuntimeError("lost track"))]
    async with harness(proc=machine, sources=sources, config=NO_PROTECT) as h:
        d = await h.decide()
    assert_victim(d, "batch")
    assert_vetoed(d, 970, by=CORE, reason="source 'takeover' depends on it")


async def test_the_watchdog_pid_is_checked_again_before_the_kill(machine: FakeProc) -> None:
    machine.add_process(970, "watchdog", ppid=ME, rss=900 * MiB, start_ticks=60)
    guarded = Guarded("takeover", [])

    class DeclaresLate:
        """The source declares its watchdog between the ranking and the kill."""

        name = "declares_late"

        @hookimpl
        def oomkit_veto(self) -> None:
            guarded.pids = [970]

    recorder = Recorder()
    async with harness(DeclaresLate(), recorder, proc=machine, sources=[guarded], dry_run=False) as h:
        d: Decision = await h.decide()
    assert_outcome(d, "all-vetoed")
    assert_vetoed(d, 970, by=CORE, reason="re-verified in /proc before the kill: source 'takeover'")
    assert recorder.killed == []
