"""What keeps the engine bounded: the hold-off after a decision that killed nobody, the top of
the ranking in decision records, ``recent`` in bytes, the jsonl line, ``start_ticks``."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import anyio
import msgspec
import pytest

from oomkit import Candidate, Config, Engine, Event, KillResult, hookimpl
from oomkit.config import EngineConfig, PathsConfig
from oomkit.events import SYSTEM
from oomkit.explain import explain, find_decision
from oomkit.testing import FakeProc, FakeSource, paths_for

pytestmark = pytest.mark.anyio

MANY = [Candidate(pid=200 + i, name=f"p{i}", rss_bytes=(i + 1) << 20, start_ticks=1000) for i in range(50)]


@pytest.fixture
def paths(fake_proc: FakeProc) -> PathsConfig:
    for c in MANY:
        fake_proc.add_candidate(c)
    return paths_for(fake_proc)


class Offer:
    name = "offer"

    def __init__(self, cands: Sequence[Candidate] = MANY) -> None:
        self.cands = list(cands)
        self.calls = 0

    @hookimpl
    def oomkit_candidates(self, event: Event) -> list[Candidate]:
        self.calls += 1
        return self.cands


class BySize:
    name = "by_size"

    @hookimpl
    def oomkit_score(self, candidates: Sequence[Candidate]) -> list[float]:
        return [c.rss_bytes / 2**20 for c in candidates]


class Killer:
    name = "test_killer"

    @hookimpl
    async def oomkit_kill(self, victim: Candidate) -> KillResult:
        return KillResult(action="test", outcome="killed")


def _engine(paths: PathsConfig, *plugins: object, dry_run: bool = True, sources: Sequence[FakeSource] = (),
            **engine: object) -> Engine:
    cfg = Config(sources=(), paths=paths, engine=EngineConfig(**engine))  # type: ignore[arg-type]
    return Engine(cfg, plugins=plugins, sources=sources, autoload=False, dry_run=dry_run)


def _hold_s(e: Engine) -> float:
    """What is left of the system scope's hold-off (private state: the doubling is
    arithmetic, not speed)."""
    return (e._cool_until[SYSTEM] - time.monotonic_ns()) / 1e9


# --- the hold-off ------------------------------------------------------------------------------


async def test_a_storm_nobody_can_end_costs_one_decision_per_hold_off(paths: PathsConfig) -> None:
    src = FakeSource()
    offer = Offer()
    async with _engine(paths, offer, BySize(), sources=[src], holdoff_s=3600.0, holdoff_max_s=3600.0) as e:
        for _ in range(2000):
            await src.inject(src.event("low-memory"))
        with anyio.fail_after(60):
            while e.stats.events < 2000 or e.snapshot(recent=0).deciding:
                await anyio.sleep(0.01)
    st = e.stats
    assert st.decisions == 1 and offer.calls == 1
    assert e.recent[0].outcome == "dry-run"
    # Every other event is accounted for: replaced while the decision ran, or held off.
    assert st.coalesced + st.held_off + 1 + (1 if st.coalesced else 0) >= 2000 - 1
    assert st.events == 2000 and st.held_off >= 1


async def test_the_hold_off_doubles_up_to_its_maximum_and_a_kill_resets_it(paths: PathsConfig) -> None:
    ev = Event(source="t", kind="low-memory")
    async with _engine(paths, Offer(), BySize(), holdoff_s=100.0, holdoff_max_s=700.0, cooldown_s=5.0) as e:
        holds = []
        for _ in range(5):
            await e.decide(ev)  # dry-run: nobody killed
            holds.append(_hold_s(e))
    # 100, 200, 400, then 700 (the maximum) twice; the slack is the time a decision took.
    for got, want in zip(holds, (100, 200, 400, 700, 700)):
        assert want - 60 < got <= want
    async with _engine(paths, Offer(), BySize(), Killer(), dry_run=False, holdoff_s=100.0,
                       holdoff_max_s=700.0, cooldown_s=5.0) as e:
        await e.decide(Event(source="t", kind="low-memory", scope=SYSTEM))
        assert _hold_s(e) <= 5.0  # killed: the cooldown, not a hold-off
        assert not e._streak


async def test_an_oom_is_never_held_off_nor_replaced_by_a_lesser_event(paths: PathsConfig) -> None:
    src = FakeSource()
    async with _engine(paths, Offer(), BySize(), sources=[src], holdoff_s=3600.0, holdoff_max_s=3600.0) as e:
        await e.decide(Event(source=src.name, kind="low-memory"))  # the scope is now held off
        for _ in range(3):
            await src.inject(src.event("oom"))
            await src.inject(src.event("low-memory"))
        with anyio.fail_after(60):
            while e.stats.events < 6 or e.snapshot(recent=0).deciding:
                await anyio.sleep(0.01)
    kinds = [d.event.kind for d in e.recent]
    assert kinds[0] == "low-memory" and "oom" in kinds[1:]
    assert all(k == "oom" for k in kinds[1:])  # a low-memory event never displaced a pending oom


async def test_a_rescue_holds_nothing_off(paths: PathsConfig) -> None:
    src = FakeSource()

    class Frees:
        name = "frees"

        @hookimpl
        async def oomkit_rescue(self, event: Event) -> tuple[str, int, str]:
            src.holds = False  # the source's re-check now says the condition is gone
            return ("freed", 1 << 20, "dropped a cache")

    async with _engine(paths, Offer(), BySize(), Frees(), Killer(), dry_run=False, sources=[src],
                       holdoff_s=3600.0, holdoff_max_s=3600.0) as e:
        d = await e.decide(src.event("low-memory"))
        assert d.outcome == "rescued"
        src.holds = True
        await src.inject(src.event("low-memory"))
        with anyio.fail_after(60):
            while e.stats.decisions < 2:
                await anyio.sleep(0.01)
    assert e.stats.held_off == 0 and e.stats.cooled == 0


def test_holdoff_max_cannot_be_shorter_than_holdoff() -> None:
    with pytest.raises(msgspec.ValidationError, match="holdoff_max_s"):
        msgspec.convert({"holdoff_s": 10.0, "holdoff_max_s": 5.0}, EngineConfig)


# --- what a decision keeps ---------------------------------------------------------------------


async def test_a_decision_record_keeps_the_top_of_its_ranking_with_every_score(paths: PathsConfig) -> None:
    async with _engine(paths, Offer(), BySize(), record_ranking=10) as e:
        d = await e.decide(Event(source="t", kind="oom"))
    assert d.ranked == 50 and len(d.ranking) == 10
    assert [r.candidate.pid for r in d.ranking] == [249 - i for i in range(10)]
    assert all(r.scores.get("by_size") for r in d.ranking)


async def test_recent_is_bounded_in_bytes(paths: PathsConfig) -> None:
    async with _engine(paths, Offer(), BySize(), record_ranking=50, recent_bytes=1 << 16,
                       recent_decisions=1000) as e:
        for _ in range(100):
            await e.decide(Event(source="t", kind="oom"))
        kept, size = e.recent, e.recent_bytes
    one = len(msgspec.json.encode(kept[-1]))
    assert size <= 1 << 16 and len(kept) >= (1 << 16) // one - 1
    assert len(kept) < 100 and kept[-1].id == 100


async def test_the_newest_decision_is_kept_whatever_its_size(paths: PathsConfig) -> None:
    many = [Candidate(pid=200 + i % 50, name="x" * 200, rss_bytes=1, start_ticks=1000) for i in range(50)]
    async with _engine(paths, Offer(many), BySize(), record_ranking=1000, recent_bytes=1 << 16) as e:
        await e.decide(Event(source="t", kind="oom"))
        assert len(e.recent) == 1


async def test_a_jsonl_line_is_bounded_and_still_explains(paths: PathsConfig, tmp_path: Path) -> None:
    from oomkit_plugins.jsonl import JsonLines, JsonLinesSettings

    async with _engine(paths, Offer(), BySize(), record_ranking=50) as e:
        d = await e.decide(Event(source="t", kind="oom"))
    notifier = JsonLines()
    notifier.settings = JsonLinesSettings(path=str(tmp_path / "d.jsonl"), max_line_bytes=4096)
    assert len(msgspec.json.encode(d)) > 4096
    await notifier.oomkit_notify(d)
    line = (tmp_path / "d.jsonl").read_bytes()
    assert len(line) <= 4096 and line.endswith(b"\n")
    back = find_decision(tmp_path / "d.jsonl", d.id)
    assert back.ranked == 50 and 0 < len(back.ranking) < 50
    assert back.ranking[0] == d.ranking[0]
    assert "p49" in explain(back)


async def test_a_jsonl_line_that_cannot_fit_is_counted_not_written(tmp_path: Path) -> None:
    from oomkit_plugins.jsonl import JsonLines, JsonLinesSettings

    from oomkit import Decision

    notifier = JsonLines()
    notifier.settings = JsonLinesSettings(path=str(tmp_path / "d.jsonl"), max_line_bytes=4096)
    huge = Decision(id=1, event=Event(source="t", kind="oom"), outcome="failed", detail="x" * 8192)
    await notifier.oomkit_notify(huge)
    assert notifier.too_long == 1 and not (tmp_path / "d.jsonl").exists()


# --- start_ticks -------------------------------------------------------------------------------


def test_a_candidate_needs_its_start_time() -> None:
    with pytest.raises(TypeError, match="start_ticks"):
        Candidate(pid=5, name="x")  # type: ignore[call-arg]


async def test_a_candidates_plugin_that_omits_start_ticks_is_named_with_the_field(paths: PathsConfig) -> None:
    class Careless:
        name = "careless"

        @hookimpl
        def oomkit_candidates(self, event: Event) -> list[Candidate]:
            return [Candidate(pid=201, name="p1")]  # type: ignore[call-arg]

    async with _engine(paths, Careless(), Offer(MANY[:2]), BySize()) as e:
        d = await e.decide(Event(source="t", kind="oom"))
    assert d.outcome == "dry-run" and d.ranked == 2
    (err,) = d.errors
    assert err.plugin == "careless" and "start_ticks" in err.error
