"""Sync hooks run in worker threads that a stuck plugin cannot hold (oomkit.hookthreads).

No timed assertions: a stuck plugin blocks on a threading.Event the test releases at the
end; what is checked is counted (threads, abandoned calls, log lines, outcomes).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Sequence

import anyio
import msgspec
import pytest

from oomkit import Candidate, Config, Engine, Event, hookimpl
from oomkit.config import EngineConfig, PathsConfig
from oomkit.hookthreads import HookThreads, HooksStuck, Job
from oomkit.testing import FakeProc, FakeSource, paths_for

pytestmark = pytest.mark.anyio

A = Candidate(pid=101, name="small", rss_bytes=10 << 20, start_ticks=1000)
B = Candidate(pid=102, name="big", rss_bytes=500 << 20, start_ticks=1000)


@pytest.fixture
def release() -> Iterator[threading.Event]:
    """Set at the end of each test: every stuck plugin call returns, its thread ends."""
    gate = threading.Event()
    yield gate
    gate.set()


@pytest.fixture
def paths(fake_proc: FakeProc) -> PathsConfig:
    for c in (A, B):
        fake_proc.add_candidate(c)
    return paths_for(fake_proc)


class Offer:
    name = "offer"

    @hookimpl
    def oomkit_candidates(self, event: Event) -> list[Candidate]:
        return [A, B]


class StuckVeto:
    """A veto whose every call blocks until ``gate`` is set."""

    name = "stuck_veto"

    def __init__(self, gate: threading.Event) -> None:
        self.gate = gate
        self.calls = 0

    @hookimpl
    def oomkit_veto(self, candidates: Sequence[Candidate]) -> dict[int, str]:
        self.calls += 1
        self.gate.wait()
        return {}


class StuckGate:
    name = "stuck_gate"

    def __init__(self, gate: threading.Event) -> None:
        self.gate = gate
        self.calls = 0

    @hookimpl
    def oomkit_should_act(self, event: Event) -> bool | None:
        self.calls += 1
        self.gate.wait()
        return None


def _engine(paths: PathsConfig, *plugins: object, sources: Sequence[FakeSource] = (), **engine: object) -> Engine:
    settings = msgspec.convert({"sync_hook_timeout_s": 0.05, **engine}, EngineConfig)
    cfg = Config(sources=(), paths=paths, engine=settings)
    return Engine(cfg, plugins=plugins, sources=sources, autoload=False, dry_run=True)


def _step(job: Job[list[str]], name: str, gate: threading.Event, hang: bool) -> str:
    skipped = job.enter(name, "oomkit_score")
    if skipped is not None:
        return f"{name}: {skipped.split(':')[0]}"
    try:
        if hang:
            gate.wait()
        return f"{name}: ran"
    finally:
        job.leave()


async def test_a_stalled_step_is_given_up_and_the_job_runs_again_without_it(release: threading.Event) -> None:
    pool = HookThreads(max_threads=2, stall_s=0.05)
    runs = 0

    def work(job: Job[list[str]]) -> list[str]:
        nonlocal runs
        runs += 1
        return [_step(job, "first", release, False), _step(job, "stuck", release, True),
                _step(job, "last", release, False)]

    assert await pool.run(work) == ["first: ran", "stuck: skipped", "last: ran"]
    assert runs == 2 and pool.abandoned == 1
    assert [(p, h) for p, h, _ in pool.stuck] == [("stuck", "oomkit_score")]
    # Skipped while its call is stuck: no second thread is spent on it.
    assert await pool.run(work) == ["first: ran", "stuck: skipped", "last: ran"]
    assert pool.abandoned == 1 and pool.threads <= 2
    release.set()
    with anyio.fail_after(60):
        while pool.stuck:
            await anyio.sleep(0.01)
    # Its call returned: it is called again, and its thread is a live one again.
    assert pool.threads <= 2
    pool.close()


async def test_with_every_thread_stuck_a_job_fails_at_once(release: threading.Event) -> None:
    pool = HookThreads(max_threads=1, stall_s=0.05)

    def work(job: Job[str]) -> str:
        return _step(job, "stuck", release, True)  # type: ignore[arg-type]

    with pytest.raises(HooksStuck, match=r"all 1 hook threads are stuck in plugins \(stuck.oomkit_score\)"):
        await pool.run(work)
    with pytest.raises(HooksStuck):
        await pool.run(lambda job: "never runs")
    assert pool.threads == 1 and pool.abandoned == 1
    pool.close()


async def test_a_job_raises_what_its_work_raised() -> None:
    pool = HookThreads()

    def work(job: Job[None]) -> None:
        raise ValueError("from the worker")

    with pytest.raises(ValueError, match="from the worker"):
        await pool.run(work)
    pool.close()


async def test_a_veto_that_never_returns_is_given_up_reported_once_and_protects(
    paths: PathsConfig, release: threading.Event, caplog: pytest.LogCaptureFixture
) -> None:
    veto = StuckVeto(release)
    caplog.set_level(logging.WARNING, logger="oomkit")
    async with _engine(paths, Offer(), veto, hook_threads=2) as e:
        decisions = [await e.decide(Event(source="t", kind="oom")) for _ in range(20)]
        snap = e.snapshot()
    assert {d.outcome for d in decisions} == {"all-vetoed"}
    for d in decisions:
        assert all(any(v.plugin == "stuck_veto" for v in r.vetoes) for r in d.ranking)
    # The first decision's call is given up; every later one skips the plugin, which the
    # decision records, without a log line each.
    assert veto.calls == 1
    assert snap.counters.hooks_abandoned == 1
    assert "skipped" in decisions[-1].errors[0].error
    hung = [r for r in caplog.records if "has not returned" in r.getMessage()]
    assert len(hung) == 1 and "stuck_veto" in hung[0].getMessage() and "oomkit_veto" in hung[0].getMessage()
    assert not [r for r in caplog.records if "failed in oomkit_veto" in r.getMessage()]
    # Stopping says once that the call is still stuck.
    assert sum("is still running" in r.getMessage() for r in caplog.records) == 1


async def test_a_stuck_should_act_does_not_hold_up_dispatching(
    paths: PathsConfig, release: threading.Event
) -> None:
    src = FakeSource()
    gate = StuckGate(release)
    async with _engine(paths, Offer(), gate, sources=[src]) as e:
        for scope in ("/a", "/b", "/c"):
            await src.inject(src.event("oom", f"v1:{scope}"))
        with anyio.fail_after(60):
            while e.stats.decisions < 3:
                await anyio.sleep(0.01)
    assert gate.calls == 1  # given up once, then skipped: the events went by their kind
    assert e.snapshot().counters.hooks_abandoned == 1


async def test_leaving_the_engine_does_not_wait_for_a_stuck_sync_hook(
    paths: PathsConfig, release: threading.Event
) -> None:
    class StuckCandidates:
        name = "stuck_candidates"

        @hookimpl
        def oomkit_candidates(self, event: Event) -> list[Candidate]:
            release.wait()
            return []

    before = threading.active_count()
    with anyio.fail_after(60):  # a hang fails here instead of hanging the suite
        async with _engine(paths, StuckCandidates(), sync_hook_timeout_s=3600.0) as e:
            async with anyio.create_task_group() as tg:
                tg.start_soon(e.decide, Event(source="t", kind="oom"))
                while threading.active_count() == before:  # the worker is in the plugin
                    await anyio.sleep(0.01)
                tg.cancel_scope.cancel()
    # One thread is left, stuck in the plugin; released, it ends.
    release.set()
    with anyio.fail_after(60):
        while threading.active_count() > before:
            await anyio.sleep(0.01)


async def test_the_threads_end_with_the_engine(paths: PathsConfig) -> None:
    before = threading.active_count()
    async with _engine(paths, Offer(), hook_threads=4) as e:
        for _ in range(10):
            await e.decide(Event(source="t", kind="oom"))
    with anyio.fail_after(60):
        while threading.active_count() > before:
            await anyio.sleep(0.01)


def test_hook_threads_are_bounded_in_config() -> None:
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({"hook_threads": 0}, EngineConfig)
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({"hook_threads": 65}, EngineConfig)
