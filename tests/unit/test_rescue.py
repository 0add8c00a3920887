"""The rescue stage on fake trees: each rescuer in turn, the condition re-checked after each,
deadlines, what a decision records."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import anyio
import pytest

from oomkit import Candidate, Config, Engine, Event, KillResult, hookimpl
from oomkit.config import EngineConfig
from oomkit.testing import FakeProc, FakeSource, paths_for

ONE = Candidate(pid=4242, name="victim", rss_bytes=1 << 20, start_ticks=1000)


class Basics:
    name = "basics"

    def __init__(self) -> None:
        self.killed: list[int] = []

    @hookimpl(trylast=True)
    def oomkit_candidates(self) -> list[Candidate]:
        return [ONE]

    @hookimpl(trylast=True)
    async def oomkit_kill(self, victim: Candidate) -> KillResult:
        self.killed.append(victim.pid)
        return KillResult(action="recorded", outcome="killed")


class Rescuer:
    def __init__(self, name: str, answer: Any = "nothing", *, clears: FakeSource | None = None,
                 hang: bool = False) -> None:
        self.name = name
        self.answer = answer
        self.clears = clears
        self.hang = hang
        self.calls = 0

    @hookimpl
    async def oomkit_rescue(self, victim: Candidate, candidates: Sequence[Candidate]) -> Any:
        self.calls += 1
        if self.hang:
            await anyio.sleep_forever()
        if self.clears is not None:
            self.clears.holds = False
        return self.answer


def _engine(proc: FakeProc, *plugins: object, source: FakeSource, dry_run: bool = False, **engine: Any) -> Engine:
    proc.add_candidate(ONE)
    config = Config(sources=(), paths=paths_for(proc), engine=EngineConfig(**engine))
    return Engine(config, plugins=[(getattr(p, "name"), p) for p in plugins], sources=[source], autoload=False,
                  dry_run=dry_run)


@pytest.mark.anyio
async def test_a_rescue_that_frees_nothing_is_recorded_and_the_kill_goes_ahead(fake_proc: FakeProc) -> None:
    source, basics = FakeSource("t"), Basics()
    first, second = Rescuer("first", ("nothing", 0, "no cache")), Rescuer("second", ("freed", 4096))
    async with _engine(fake_proc, basics, first, second, source=source) as e:
        d = await e.decide(source.event("oom"))
    assert d.outcome == "killed" and basics.killed == [ONE.pid] and d.killed == (ONE.pid,)
    assert [(r.plugin, r.result, r.freed_bytes, r.cleared) for r in d.rescues] == [
        ("second", "freed", 4096, False), ("first", "nothing", 0, False)]  # pluggy: the last registered runs first
    assert d.rescues[1].detail == "no cache" and "rescue" in d.stage_ns


@pytest.mark.anyio
async def test_the_first_rescue_that_clears_the_condition_ends_the_decision(fake_proc: FakeProc) -> None:
    source, basics = FakeSource("t"), Basics()
    later, clears = Rescuer("later"), Rescuer("clears", "freed", clears=source)
    async with _engine(fake_proc, basics, later, clears, source=source) as e:
        d = await e.decide(source.event("oom"))
    assert d.outcome == "rescued" and basics.killed == [] and later.calls == 0
    assert [(r.plugin, r.cleared) for r in d.rescues] == [("clears", True)]
    assert "rescued by clears" in d.detail


@pytest.mark.anyio
async def test_a_hanging_rescuer_costs_its_deadline_then_the_kill(fake_proc: FakeProc) -> None:
    source, basics = FakeSource("t"), Basics()
    hangs = Rescuer("hangs", hang=True)
    async with _engine(fake_proc, basics, hangs, source=source, rescue_timeout_s=0.05) as e:
        d = await e.decide(source.event("oom"))
    assert d.outcome == "killed" and basics.killed == [ONE.pid]
    (attempt,) = d.rescues
    assert (attempt.plugin, attempt.result) == ("hangs", "timeout") and "0.05 s" in attempt.detail
    assert [err.hook for err in d.errors] == ["oomkit_rescue"]


@pytest.mark.anyio
async def test_the_budget_ends_the_stage(fake_proc: FakeProc) -> None:
    source, basics = FakeSource("t"), Basics()
    a, b, c = Rescuer("a", hang=True), Rescuer("b", hang=True), Rescuer("c", hang=True)
    async with _engine(fake_proc, basics, a, b, c, source=source, rescue_timeout_s=0.2, rescue_budget_s=0.25) as e:
        d = await e.decide(source.event("oom"))
    assert d.outcome == "killed"
    assert len(d.rescues) == 2 and c.calls + b.calls + a.calls == 2  # the third had no budget left


@pytest.mark.anyio
@pytest.mark.parametrize("answer", ["freed!", ("freed", -1), ("freed", 1.5), ("freed", 1, 2), 7, ("a", 1, "b", "c")])
async def test_a_malformed_answer_is_an_error_and_the_kill_goes_ahead(fake_proc: FakeProc, answer: Any) -> None:
    source, basics = FakeSource("t"), Basics()
    async with _engine(fake_proc, basics, Rescuer("bad", answer), source=source) as e:
        d = await e.decide(source.event("oom"))
    assert d.outcome == "killed" and [r.result for r in d.rescues] == ["error"]


@pytest.mark.anyio
async def test_a_declining_rescuer_is_not_recorded(fake_proc: FakeProc) -> None:
    source, basics = FakeSource("t"), Basics()
    async with _engine(fake_proc, basics, Rescuer("declines", None, clears=source), source=source) as e:
        d = await e.decide(source.event("oom"))
    # It declined: no attempt recorded, and no re-check after it (its side effect is not
    # looked at before the kill).
    assert d.rescues == () and d.outcome == "killed"


@pytest.mark.anyio
async def test_dry_run_and_the_kernel_policy_skip_rescue(fake_proc: FakeProc) -> None:
    source, basics = FakeSource("t"), Basics()
    r = Rescuer("r", "freed", clears=source)
    async with _engine(fake_proc, basics, r, source=source, dry_run=True) as e:
        d = await e.decide(source.event("oom"))
    assert d.outcome == "dry-run" and r.calls == 0 and d.rescues == ()
    async with _engine(fake_proc, basics, r, source=FakeSource("u"), policy="kernel") as e:
        d = await e.decide(Event(source="u", kind="oom"))
    assert d.outcome == "killed" and r.calls == 0


# --- oomkit.Rescuer: the embedding service's one-function rescuer ---------------------------


@pytest.mark.anyio
async def test_an_embedded_release_function_rescues_and_its_bytes_are_recorded(fake_proc: FakeProc) -> None:
    import oomkit

    source, basics = FakeSource("t"), Basics()
    seen: list[Event] = []

    def shed(event: Event) -> int:
        seen.append(event)
        source.holds = False  # what dropping the cache does to the source's condition
        return 3 << 20

    async with _engine(fake_proc, basics, oomkit.Rescuer(shed, name="shed-cache"), source=source) as e:
        d = await e.decide(source.event("oom"))
    assert d.outcome == "rescued" and basics.killed == [] and d.killed == ()
    (attempt,) = d.rescues
    assert (attempt.plugin, attempt.result, attempt.freed_bytes, attempt.cleared) == ("shed-cache", "freed", 3 << 20, True)
    assert "it says it released 3145728 bytes" in attempt.detail and seen == [d.event]


@pytest.mark.anyio
@pytest.mark.parametrize("kind", ["async", "thread"])
async def test_an_embedded_release_that_hangs_costs_its_deadline_then_the_kill(fake_proc: FakeProc, kind: str) -> None:
    import threading

    import oomkit

    source, basics = FakeSource("t"), Basics()
    stop = threading.Event()

    async def forever(event: Event) -> int:
        await anyio.sleep_forever()
        return 0

    def blocks(event: Event) -> int:
        stop.wait(30)
        return 0

    rescuer = oomkit.Rescuer(forever) if kind == "async" else oomkit.Rescuer(blocks, thread=True)
    try:
        async with _engine(fake_proc, basics, rescuer, source=source, rescue_timeout_s=0.05) as e:
            d = await e.decide(source.event("oom"))
    finally:
        stop.set()
    assert d.outcome == "killed" and basics.killed == [ONE.pid]
    assert [(r.plugin, r.result, r.cleared) for r in d.rescues] == [("rescuer", "timeout", False)]


@pytest.mark.anyio
async def test_an_embedded_release_for_another_scope_is_not_asked_and_a_bad_answer_is_an_error(
    fake_proc: FakeProc,
) -> None:
    import oomkit
    from oomkit import Scope

    source, basics = FakeSource("t"), Basics()
    calls: list[str] = []
    mine = oomkit.Rescuer(lambda e: calls.append("mine"), name="mine", scopes=[Scope("v1", "/mine")])
    wrong = oomkit.Rescuer(lambda e: "lots", name="wrong")  # type: ignore[arg-type,return-value]
    async with _engine(fake_proc, basics, mine, wrong, source=source) as e:
        d = await e.decide(source.event("oom"))
    assert calls == [] and d.outcome == "killed"
    (attempt,) = d.rescues
    assert attempt.plugin == "wrong" and attempt.result == "error" and "not a byte count" in attempt.detail
    with pytest.raises(TypeError, match="needs a callable"):
        oomkit.Rescuer(42)  # type: ignore[arg-type]
