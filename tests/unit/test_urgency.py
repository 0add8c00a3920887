"""Urgent decisions (oomkit.urgency): the switch interval lowered and put back, the collector
off and back on, other work parked at checkpoints and let go; the reaper.

No timed assertions: a parked thread is seen parked through the counters, and released by
the end of the urgency (or a budget that is spent); every wait polls with a generous deadline.
"""

from __future__ import annotations

import gc
import os
import resource
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence

import anyio
import pytest

from oomkit import Candidate, Event, hookimpl, urgency
from oomkit.hookthreads import HookThreads, Job
from oomkit.reaper import Reaper
from oomkit.testing import FakeProc, harness

DEADLINE_S = 30.0


def wait_until(predicate: Callable[[], object], what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.001)


def _scheduling() -> tuple[int, int]:
    return os.sched_getscheduler(0), os.sched_getparam(0).sched_priority


def _realtime_allowed() -> str | None:
    """Why this process may not make a thread SCHED_FIFO 1, or None (tried on a thread of its own)."""
    out: list[str | None] = []

    def probe() -> None:
        try:
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))
            out.append(None)
        except OSError as exc:
            out.append(f"SCHED_FIFO refused here ({exc.strerror}): needs CAP_SYS_NICE or RLIMIT_RTPRIO >= 1")

    t = threading.Thread(target=probe)
    t.start()
    t.join()
    return out[0]


needs_realtime = pytest.mark.skipif(_realtime_allowed() is not None, reason=str(_realtime_allowed()))


@pytest.fixture(autouse=True)
def calm() -> Iterator[None]:
    """Every test starts and ends with no urgency in flight, Python's own settings and the
    thread's own scheduling."""
    interval, collecting, scheduling = sys.getswitchinterval(), gc.isenabled(), _scheduling()
    assert urgency.stats().in_flight == 0
    yield
    assert urgency.stats().in_flight == 0
    assert _scheduling() == scheduling
    assert sys.getswitchinterval() == interval
    assert gc.isenabled() == collecting


@pytest.fixture
def hog(fake_proc: FakeProc) -> Candidate:
    """The one process of the fake tree the decisions below rank."""
    c = Candidate(pid=4242, name="hog", rss_bytes=64 << 20, start_ticks=7)
    fake_proc.add_candidate(c)
    return c


class Parker(threading.Thread):
    """A thread that may park, calling :func:`urgency.checkpoint` once when told to."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.go = threading.Event()
        self.returned = threading.Event()
        self.parks: list[bool] = []

    def run(self) -> None:
        with urgency.parkable(self.parks.append):
            self.go.wait()
            urgency.checkpoint()
        self.returned.set()


# --- the switch interval and the collector ------------------------------------------------------


def test_the_switch_interval_is_lowered_while_urgent_and_put_back() -> None:
    before = sys.getswitchinterval()
    with urgency.urgent(switch_interval_s=before / 10):
        assert sys.getswitchinterval() == pytest.approx(before / 10)
        assert urgency.stats().in_flight == 1
    assert sys.getswitchinterval() == before


def test_overlapping_urgent_decisions_restore_only_when_the_last_one_ends() -> None:
    before = sys.getswitchinterval()
    a = urgency.urgent(switch_interval_s=before / 10)
    b = urgency.urgent(switch_interval_s=before / 20)
    a.__enter__()
    b.__enter__()
    assert sys.getswitchinterval() == pytest.approx(before / 20)  # the smallest asked for
    b.__exit__(None, None, None)
    assert sys.getswitchinterval() == pytest.approx(before / 10)  # a's, still in flight
    assert urgency.stats().in_flight == 1
    a.__exit__(None, None, None)
    assert sys.getswitchinterval() == before


def test_the_interval_does_not_drift_over_many_spells() -> None:
    before = sys.getswitchinterval()
    sys.setswitchinterval(0.0001)
    try:
        low = sys.getswitchinterval()
        for _ in range(50):
            with urgency.urgent(switch_interval_s=0.00005):
                pass
        assert sys.getswitchinterval() == low
    finally:
        sys.setswitchinterval(before)


def test_ends_in_any_order() -> None:
    before = sys.getswitchinterval()
    a = urgency.urgent(switch_interval_s=before / 10)
    b = urgency.urgent(switch_interval_s=before / 20)
    a.__enter__()
    b.__enter__()
    a.__exit__(None, None, None)
    assert sys.getswitchinterval() == pytest.approx(before / 20)
    b.__exit__(None, None, None)
    assert sys.getswitchinterval() == before


def test_put_back_when_the_decision_raises() -> None:
    before = sys.getswitchinterval()
    with pytest.raises(RuntimeError, match="plugin bug"):
        with urgency.urgent(switch_interval_s=before / 10):
            raise RuntimeError("plugin bug")
    assert sys.getswitchinterval() == before
    assert gc.isenabled()


@pytest.mark.anyio
async def test_put_back_when_the_decision_is_cancelled() -> None:
    before = sys.getswitchinterval()
    with anyio.CancelScope() as scope:
        with urgency.urgent(switch_interval_s=before / 10, park_s=1.0):
            scope.cancel()
            await anyio.sleep_forever()
    assert scope.cancelled_caught
    assert sys.getswitchinterval() == before
    assert gc.isenabled()


def test_never_raises_an_interval_already_lower() -> None:
    before = sys.getswitchinterval()
    sys.setswitchinterval(0.0002)
    low = sys.getswitchinterval()
    try:
        with urgency.urgent(switch_interval_s=0.001):
            assert sys.getswitchinterval() == low
        assert sys.getswitchinterval() == low
    finally:
        sys.setswitchinterval(before)


def test_zero_leaves_the_interval_alone() -> None:
    before = sys.getswitchinterval()
    with urgency.urgent(switch_interval_s=0.0):
        assert sys.getswitchinterval() == before


def test_the_collector_is_off_while_urgent_and_on_again_after() -> None:
    with urgency.urgent():
        assert not gc.isenabled()
        with urgency.urgent():
            assert not gc.isenabled()
        assert not gc.isenabled()  # one decision is still in flight
    assert gc.isenabled()


def test_the_collector_is_not_off_for_long(monkeypatch: pytest.MonkeyPatch) -> None:
    # Back-to-back urgent decisions keep one spell going: the collector comes back on anyway.
    monkeypatch.setattr(urgency, "GC_OFF_MAX_S", 0.0)
    with urgency.urgent():
        assert not gc.isenabled()
        with urgency.urgent():
            assert gc.isenabled()
        assert gc.isenabled()
    assert gc.isenabled()


def test_a_collector_that_was_off_stays_off() -> None:
    gc.disable()
    try:
        with urgency.urgent():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()


# --- parking --------------------------------------------------------------------------------


def test_a_parkable_thread_parks_until_the_urgency_ends() -> None:
    before = urgency.stats()
    t = Parker()
    t.start()
    with urgency.urgent(park_s=DEADLINE_S * 2):
        t.go.set()
        wait_until(lambda: urgency.stats().parked_now == 1, "the thread to park")
        assert not t.returned.is_set()
    t.join(DEADLINE_S)
    assert t.returned.is_set()
    after = urgency.stats()
    assert after.parks == before.parks + 1 and after.parked_now == 0
    assert t.parks == [True, False]  # told as the park began and as it ended


def test_a_checkpoint_returns_at_once_when_nothing_is_urgent() -> None:
    before = urgency.stats().parks
    t = Parker()
    t.start()
    t.go.set()
    t.join(DEADLINE_S)
    assert t.returned.is_set() and t.parks == []
    assert urgency.stats().parks == before


def test_only_parkable_threads_park() -> None:
    # The loop's thread (here: the test's) never parks, whatever is urgent.
    before = urgency.stats().parks
    with urgency.urgent(park_s=DEADLINE_S * 2):
        urgency.checkpoint()
        for _ in urgency.checkpointed(range(1000), every=10):
            pass
    assert urgency.stats().parks == before


def test_without_a_park_budget_nobody_parks() -> None:
    t = Parker()
    t.start()
    with urgency.urgent(switch_interval_s=0.0001, park_s=0.0):
        t.go.set()
        t.join(DEADLINE_S)
        assert t.returned.is_set()  # while the urgent decision is still in flight
    assert t.parks == []


def test_a_spent_park_budget_lets_the_thread_go_on() -> None:
    t = Parker()
    t.start()
    with urgency.urgent(park_s=0.001):
        t.go.set()
        t.join(DEADLINE_S)
        assert t.returned.is_set()  # the urgency has not ended: its budget has
        assert urgency.stats().in_flight == 1


def test_the_budget_is_per_spell() -> None:
    # A thread that spent its budget in one spell of urgency parks again in the next one.
    done: list[int] = []
    go = [threading.Event(), threading.Event()]
    t = threading.Thread(target=lambda: _park_twice(go, done), daemon=True)
    t.start()
    for g in go:
        with urgency.urgent(park_s=DEADLINE_S * 2):
            g.set()
            wait_until(lambda: urgency.stats().parked_now == 1, "the thread to park")
        wait_until(lambda: len(done) == go.index(g) + 1, "the thread to go on")
    t.join(DEADLINE_S)
    assert done == [1, 2]


def _park_twice(go: list[threading.Event], done: list[int]) -> None:
    with urgency.parkable():
        for i, g in enumerate(go):
            g.wait()
            urgency.checkpoint()
            done.append(i + 1)


def test_release_lets_parked_threads_go_for_the_rest_of_the_spell() -> None:
    before = urgency.stats().released
    t = Parker()
    t.start()
    with urgency.urgent(park_s=DEADLINE_S * 2):
        t.go.set()
        wait_until(lambda: urgency.stats().parked_now == 1, "the thread to park")
        urgency.release_parked()
        t.join(DEADLINE_S)
        assert t.returned.is_set()
    assert urgency.stats().released == before + 1


def test_checkpointed_yields_everything_in_order() -> None:
    assert list(urgency.checkpointed(iter(range(1000)), every=7)) == list(range(1000))
    assert list(urgency.checkpointed([])) == []


# --- hook threads -----------------------------------------------------------------------------


@pytest.mark.anyio
async def test_a_job_parks_before_its_next_plugin_while_an_urgent_job_runs() -> None:
    pool = HookThreads(max_threads=4, stall_s=DEADLINE_S * 2)
    first_done = threading.Event()
    order: list[str] = []

    def slow(job: Job[str]) -> str:
        assert job.enter("p", "first") is None
        job.leave()
        first_done.set()
        assert job.enter("p", "second") is None  # parks here while the urgent job runs
        order.append("slow")
        job.leave()
        return "slow"

    def quick(job: Job[str]) -> str:
        assert job.enter("q", "only") is None
        order.append("urgent")
        job.leave()
        return "urgent"

    try:
        async with anyio.create_task_group() as tg:
            with urgency.urgent(park_s=DEADLINE_S * 2):
                results: list[str] = []

                async def run_slow() -> None:
                    results.append(await pool.run(slow))

                tg.start_soon(run_slow)
                with anyio.fail_after(DEADLINE_S):
                    while urgency.stats().parked_now < 1:
                        await anyio.sleep(0.001)
                assert await pool.run(quick, urgent=True) == "urgent"
                assert order == ["urgent"]  # the other one is still parked
        assert results == ["slow"] and order == ["urgent", "slow"]
        assert first_done.is_set()
    finally:
        pool.close()


@pytest.mark.anyio
async def test_a_park_inside_a_plugin_does_not_count_as_its_stall() -> None:
    # A park inside a plugin's call lasts several of its stall periods: not written off.
    stall_s = 1.0
    pool = HookThreads(max_threads=2, stall_s=stall_s)
    inside, go = threading.Event(), threading.Event()

    def parks_inside(job: Job[int]) -> int:
        assert job.enter("p", "candidates") is None
        inside.set()
        while not go.is_set():
            time.sleep(0.001)
        for _ in urgency.checkpointed(range(3)):  # parks here
            pass
        job.leave()
        return 1

    try:
        async with anyio.create_task_group() as tg:
            results: list[int] = []

            async def run() -> None:
                results.append(await pool.run(parks_inside))

            tg.start_soon(run)
            with anyio.fail_after(DEADLINE_S):
                while not inside.is_set():
                    await anyio.sleep(0.001)
            with urgency.urgent(park_s=DEADLINE_S * 2):
                go.set()
                with anyio.fail_after(DEADLINE_S):
                    while urgency.stats().parked_now < 1:
                        await anyio.sleep(0.001)
                await anyio.sleep(3 * stall_s)
                assert pool.abandoned == 0
        assert results == [1]
        assert pool.abandoned == 0
    finally:
        pool.close()


@pytest.mark.anyio
async def test_an_urgent_job_with_no_free_worker_releases_the_parked_ones() -> None:
    pool = HookThreads(max_threads=1, stall_s=DEADLINE_S * 2)
    before = urgency.stats().released

    def background(job: Job[str]) -> str:
        assert job.enter("p", "a") is None
        job.leave()
        assert job.enter("p", "b") is None  # parks: the only worker
        job.leave()
        return "background"

    def urgent_work(job: Job[str]) -> str:
        return "urgent"

    try:
        async with anyio.create_task_group() as tg:
            results: list[str] = []
            with urgency.urgent(park_s=DEADLINE_S * 2):
                async def run() -> None:
                    results.append(await pool.run(background))

                tg.start_soon(run)
                with anyio.fail_after(DEADLINE_S):
                    while urgency.stats().parked_now < 1:
                        await anyio.sleep(0.001)
                with anyio.fail_after(DEADLINE_S):
                    assert await pool.run(urgent_work, urgent=True) == "urgent"
        assert results == ["background"]
        assert urgency.stats().released == before + 1
    finally:
        pool.close()


# --- the engine -------------------------------------------------------------------------------


class Witness:
    """Records, in the candidates hook, what the interpreter looks like."""

    name = "witness"

    def __init__(self, c: Candidate) -> None:
        self.c = c
        self.seen: dict[str, tuple[float, bool]] = {}

    @hookimpl
    def oomkit_candidates(self, event: Event) -> list[Candidate]:
        self.seen[event.kind] = (sys.getswitchinterval(), gc.isenabled())
        return [self.c]


@pytest.mark.anyio
async def test_a_takeover_decision_is_urgent_and_others_are_not(fake_proc: FakeProc, hog: Candidate) -> None:
    witness = Witness(hog)
    before = sys.getswitchinterval()
    urgent_before = urgency.stats().decisions
    config = {"engine": {"urgent_switch_interval_s": before / 10}}
    async with harness(witness, proc=fake_proc, config=config) as h:
        await h.decide(kind="low-memory")
        await h.decide(kind="oom")
        counters = h.engine.snapshot().counters
    assert witness.seen["low-memory"] == (before, True)
    interval, collecting = witness.seen["oom"]
    assert interval == pytest.approx(before / 10, rel=0.05) and not collecting
    assert urgency.stats().decisions == urgent_before + 1
    assert counters.urgent_decisions >= urgent_before + 1


@pytest.mark.anyio
async def test_urgency_can_be_turned_off(fake_proc: FakeProc, hog: Candidate) -> None:
    witness = Witness(hog)
    before = sys.getswitchinterval()
    config = {"engine": {"urgent_switch_interval_s": 0.0, "urgent_park_s": 0.0}}
    async with harness(witness, proc=fake_proc, config=config) as h:
        await h.decide(kind="oom")
    assert witness.seen["oom"][0] == before  # the collector is still off: that has no setting


class Scheduled:
    """Records, in the candidates hook (on the loop: loop-safe), the thread's scheduling."""

    name = "scheduled"
    loop_safe = True

    def __init__(self, c: Candidate) -> None:
        self.c = c
        self.seen: dict[str, int] = {}

    @hookimpl
    def oomkit_candidates(self, event: Event) -> list[Candidate]:
        self.seen[event.kind] = os.sched_getscheduler(0) & ~os.SCHED_RESET_ON_FORK
        return [self.c]


@needs_realtime
@pytest.mark.anyio
async def test_a_takeover_decision_runs_real_time_and_others_do_not(fake_proc: FakeProc, hog: Candidate) -> None:
    plugin = Scheduled(hog)
    before = os.sched_getscheduler(0)
    async with harness(plugin, proc=fake_proc) as h:
        await h.decide(kind="low-memory")
        await h.decide(kind="oom")
        counters = h.engine.snapshot().counters
    assert plugin.seen == {"low-memory": before, "oom": os.SCHED_FIFO}
    assert os.sched_getscheduler(0) == before
    assert counters.urgent_realtime >= 1 and counters.urgent_realtime_refused == 0


@pytest.mark.anyio
async def test_real_time_can_be_turned_off(fake_proc: FakeProc, hog: Candidate) -> None:
    plugin = Scheduled(hog)
    before = os.sched_getscheduler(0)
    async with harness(plugin, proc=fake_proc, config={"engine": {"urgent_realtime_priority": 0}}) as h:
        await h.decide(kind="oom")
    assert plugin.seen == {"oom": before}


# --- urgent hooks on the loop ([engine] urgent_on_loop) ---------------------------------------


class Threads:
    """Records the thread each sync hook of a decision ran in, per event kind."""

    name = "threads"

    def __init__(self, c: Candidate, loop_safe: object = True) -> None:
        self.c = c
        self.loop_safe = loop_safe
        self.seen: dict[tuple[str, str], int] = {}

    @hookimpl
    def oomkit_candidates(self, event: Event) -> list[Candidate]:
        self.seen[event.kind, "candidates"] = threading.get_ident()
        return [self.c]

    @hookimpl
    def oomkit_veto(self, event: Event) -> dict[int, str]:
        self.seen[event.kind, "veto"] = threading.get_ident()
        return {}


class NotLoopSafe:
    """A score with no ``loop_safe``: a third party's plugin that has not said."""

    name = "not_loop_safe"

    @hookimpl
    def oomkit_score(self, candidates: Sequence[Candidate]) -> list[float]:
        return [0.0] * len(candidates)


@pytest.mark.anyio
async def test_a_takeover_runs_loop_safe_hooks_on_the_loop_and_the_rest_in_threads(
    fake_proc: FakeProc, hog: Candidate
) -> None:
    threads = Threads(hog)
    loop = threading.get_ident()
    async with harness(threads, proc=fake_proc) as h:  # with every first-party plugin
        assert (await h.decide(kind="oom")).victim == hog
        # A scope never ranked before may be big: its first takeover goes to the threads.
        assert threads.seen["oom", "candidates"] != loop
        await h.decide(kind="low-memory")
        assert (await h.decide(kind="oom")).victim == hog
        counters = h.engine.snapshot().counters
    assert threads.seen["oom", "candidates"] == threads.seen["oom", "veto"] == loop
    assert threads.seen["low-memory", "candidates"] != loop
    assert threads.seen["low-memory", "veto"] != loop
    assert counters.urgent_on_loop >= 1


@pytest.mark.anyio
@pytest.mark.parametrize(
    "why", ["a plugin has not said", "it says so, but not as a bool", "the config says no", "the scope is too big"]
)
async def test_a_takeover_stays_in_hook_threads_unless_every_plugin_is_loop_safe(
    fake_proc: FakeProc, hog: Candidate, why: str
) -> None:
    threads = Threads(hog, loop_safe="yes" if why == "it says so, but not as a bool" else True)
    plugins: list[object] = [threads, NotLoopSafe()] if why == "a plugin has not said" else [threads]
    config = {"engine": {"urgent_on_loop": why != "the config says no",
                         "urgent_on_loop_max_candidates": 0 if why == "the scope is too big" else 256}}
    loop = threading.get_ident()
    async with harness(*plugins, proc=fake_proc, config=config) as h:
        await h.decide(kind="oom")  # the scope's size is known from here on
        assert (await h.decide(kind="oom")).victim == hog
        counters = h.engine.snapshot().counters
    assert threads.seen["oom", "candidates"] != loop
    assert threads.seen["oom", "veto"] != loop
    assert counters.urgent_on_loop == 0


def test_every_first_party_plugin_with_a_decision_hook_is_loop_safe_until_it_is_told_to_wait_long() -> None:
    from importlib.metadata import entry_points

    from oomkit.config import config_from_dict
    from oomkit.engine import _SYNC_HOOKS

    found = []
    for ep in entry_points(group="oomkit"):
        if not ep.value.startswith("oomkit_plugins."):
            continue
        plugin = ep.load()()
        if any(hasattr(plugin, hook) for hook in _SYNC_HOOKS):
            found.append(ep.name)
            assert plugin.loop_safe is True, ep.name
    assert {"candidates", "protect", "preference", "freed", "kernel_badness"} <= set(found)
    long_waits = {
        "protect": {"cmdline_timeout_s": 1.0},
        "preference": {"cmdline_timeout_s": 1.0},
        "freed": {"smaps_rollup": True, "smaps_timeout_s": 1.0},
    }
    for name, settings in long_waits.items():
        plugin = next(ep for ep in entry_points(group="oomkit") if ep.name == name).load()()
        plugin.oomkit_configure(config=config_from_dict({"plugins": {name: settings}}, "<test>"))
        assert plugin.loop_safe is False, name


# --- the reaper -------------------------------------------------------------------------------


class Thing:
    pass


def test_the_reaper_frees_what_it_is_given() -> None:
    reaper = Reaper()
    things = [Thing() for _ in range(2000)]
    refs = [weakref.ref(t) for t in things]
    big: Sequence[object] = tuple(things)
    del things
    reaper.drop(big)
    del big
    wait_until(lambda: all(r() is None for r in refs), "the reaper to free everything")
    wait_until(lambda: reaper.reaped == 1, "the reaper to count it")
    reaper.close()


def test_the_reaper_parks_while_a_takeover_is_decided() -> None:
    # It would take the GIL at each of the decision's system calls.
    reaper = Reaper()
    things = [Thing() for _ in range(2000)]
    refs = [weakref.ref(t) for t in things]
    big: Sequence[object] = tuple(things)
    del things
    with urgency.urgent(park_s=DEADLINE_S * 2):
        reaper.drop(big)
        del big
        wait_until(lambda: urgency.stats().parked_now == 1, "the reaper to park")
        assert reaper.reaped == 0 and all(r() is not None for r in refs)
    wait_until(lambda: reaper.reaped == 1, "the reaper to go on once the urgency ended")
    assert all(r() is None for r in refs)
    reaper.close()


# --- real-time scheduling ([engine] urgent_realtime_priority), on the real kernel ---------------


@needs_realtime
def test_the_urgent_thread_runs_real_time_and_is_put_back() -> None:
    before, counted = _scheduling(), urgency.stats().realtime
    assert before[0] not in (os.SCHED_FIFO, os.SCHED_RR)
    with urgency.urgent(realtime_priority=3):
        policy, priority = _scheduling()
        assert policy & ~os.SCHED_RESET_ON_FORK == os.SCHED_FIFO and priority == 3
        assert policy & os.SCHED_RESET_ON_FORK  # a child it forks starts ordinary
        with urgency.urgent(realtime_priority=7):  # nested: the outer block's priority stays
            assert _scheduling()[1] == 3
        assert _scheduling()[1] == 3
    assert _scheduling() == before
    assert urgency.stats().realtime == counted + 1


@needs_realtime
def test_put_back_when_the_urgent_block_raises() -> None:
    before = _scheduling()
    with pytest.raises(RuntimeError), urgency.urgent(realtime_priority=1):
        raise RuntimeError("a plugin failed")
    assert _scheduling() == before


@needs_realtime
def test_a_child_forked_while_urgent_starts_ordinary() -> None:
    with urgency.urgent(realtime_priority=1):
        pid = os.fork()
        if pid == 0:
            os._exit(0 if os.sched_getscheduler(0) == os.SCHED_OTHER else 1)
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_zero_leaves_the_scheduling_alone() -> None:
    before, counted = _scheduling(), urgency.stats().realtime
    with urgency.urgent(realtime_priority=0):
        assert _scheduling() == before
    assert urgency.stats().realtime == counted


@needs_realtime
def test_a_thread_already_real_time_is_left_as_it_is() -> None:
    seen: list[tuple[int, int]] = []

    def body() -> None:
        os.sched_setscheduler(0, os.SCHED_RR, os.sched_param(2))
        with urgency.urgent(realtime_priority=1):
            seen.append(_scheduling())
        seen.append(_scheduling())

    t = threading.Thread(target=body)
    t.start()
    t.join()
    assert seen == [(os.SCHED_RR, 2), (os.SCHED_RR, 2)]


def _urgent_without_cap_sys_nice(rtprio: int) -> str:
    """What one urgent block with ``realtime_priority=1`` did in a child without
    CAP_SYS_NICE (as nobody, when run as root) whose RLIMIT_RTPRIO is ``rtprio``:
    "ran real-time-inside refused ordinary-after"."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(read)
            resource.setrlimit(resource.RLIMIT_RTPRIO, (rtprio, rtprio))
            if os.geteuid() == 0:
                os.setgid(65534)
                os.setuid(65534)  # root's capabilities go with its uid
            before = urgency.stats().realtime_refused
            ran = False
            with urgency.urgent(realtime_priority=1):
                ran = True
                inside = os.sched_getscheduler(0) & ~os.SCHED_RESET_ON_FORK == os.SCHED_FIFO
            refused = urgency.stats().realtime_refused - before
            os.write(write, f"{ran} {inside} {refused} {os.sched_getscheduler(0) == os.SCHED_OTHER}".encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write)
    with os.fdopen(read) as f:
        said = f.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    return said


def test_a_refusal_is_counted_and_the_block_runs() -> None:
    # RLIMIT_RTPRIO 0 and no CAP_SYS_NICE: the kernel's own refusal.
    assert _urgent_without_cap_sys_nice(0) == "True False 1 True"


def test_rlimit_rtprio_is_enough_without_the_capability() -> None:
    # What examples/systemd/oomkit.service relies on (LimitRTPRIO=1, no CAP_SYS_NICE).
    if resource.getrlimit(resource.RLIMIT_RTPRIO)[1] < 1:
        try:
            raised = subprocess.run([sys.executable, "-c", "import resource; resource.setrlimit(resource.RLIMIT_RTPRIO, (1, 1))"],
                                    capture_output=True, timeout=60).returncode == 0
        except OSError:
            raised = False
        if not raised:
            pytest.skip("RLIMIT_RTPRIO's hard limit is 0 here and raising it needs CAP_SYS_RESOURCE, which this"
                        " process lacks (systemd's LimitRTPRIO= sets it before the daemon starts)")
    assert _urgent_without_cap_sys_nice(1) == "True True 0 True"
