"""The engine's own semantics, with in-test plugins and a fake source (no kernel involved)."""

from __future__ import annotations

from collections.abc import Sequence

import anyio
import msgspec
import pytest

from oomkit import Candidate, Config, Decision, Engine, EngineNotRunning, Event, KillResult, Scope, SourceError, hookimpl
from oomkit.config import EngineConfig, PathsConfig
from oomkit.testing import FakeProc, FakeSource, paths_for

pytestmark = pytest.mark.anyio

A = Candidate(pid=101, name="small", rss_bytes=10 << 20, start_ticks=1000)
B = Candidate(pid=102, name="big", rss_bytes=500 << 20, start_ticks=1000)
C = Candidate(pid=103, name="mid", rss_bytes=100 << 20, start_ticks=1000)


class Offer:
    name = "offer"

    def __init__(self, *cands: Candidate) -> None:
        self.cands = list(cands) or [A, B, C]
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

    def __init__(self, delay: float = 0.0, outcome: str = "killed") -> None:
        self.killed: list[int] = []
        self.delay = delay
        self.outcome = outcome

    @hookimpl
    async def oomkit_kill(self, victim: Candidate) -> KillResult:
        if self.delay:
            await anyio.sleep(self.delay)
        self.killed.append(victim.pid)
        return KillResult(action="test", outcome=self.outcome)  # type: ignore[arg-type]


class Notes:
    name = "notes"

    def __init__(self) -> None:
        self.seen: list[Decision] = []
        self.got = anyio.Event()

    @hookimpl
    async def oomkit_notify(self, decision: Decision) -> None:
        self.seen.append(decision)
        self.got.set()


PATHS: PathsConfig | None = None


@pytest.fixture(autouse=True)
def _processes(fake_proc: FakeProc) -> None:
    """The candidates exist in a fake /proc, which the engine re-reads before every kill."""
    global PATHS
    for c in (A, B, C):
        fake_proc.add_candidate(c)
    PATHS = paths_for(fake_proc)


def engine(*plugins: object, config: Config | None = None, **kw: object) -> Engine:
    cfg = msgspec.structs.replace(config or Config(sources=()), paths=PATHS)
    return Engine(cfg, plugins=plugins, autoload=False, **kw)  # type: ignore[arg-type]


async def test_chain_ranks_vetoes_and_kills_the_top_killable() -> None:
    class Protect:
        name = "protect"

        @hookimpl
        def oomkit_veto(self, candidates: Sequence[Candidate]) -> dict[int, str]:
            return {102: "it is important"}

    killer = Killer()
    async with engine(Offer(), BySize(), Protect(), killer) as e:
        d = await e.decide(Event(source="t", kind="oom"))
    assert [r.candidate.pid for r in d.ranking] == [103, 101, 102]
    assert d.ranking[-1].vetoes[0].reason == "it is important"
    assert d.victim == C and killer.killed == [103]
    assert d.outcome == "killed" and d.action == "test"
    assert set(d.stage_ns) >= {"queued", "candidates", "score", "veto", "recheck", "kill"}
    assert e.stats.kills == 1 and e.stats.decisions == 1


async def test_scores_are_weighted_and_summed() -> None:
    class Young:
        name = "young"

        @hookimpl
        def oomkit_score(self, candidates: Sequence[Candidate]) -> dict[int, float]:
            return {101: 1000.0}  # pids left out score 0

    cfg = Config(sources=(), weights={"young": 0.5, "by_size": 1.0})
    async with engine(Offer(), BySize(), Young(), Killer(), config=cfg) as e:
        d = await e.decide(Event(source="t", kind="oom"))
    top = d.ranking[0]
    assert top.candidate.pid == 101
    assert top.scores == {"by_size": 10.0, "young": 1000.0}
    assert top.score == pytest.approx(510.0)


async def test_a_weight_given_as_an_int_in_python_weighs_like_its_float() -> None:
    # A file's weights decode as floats; a Config built in Python may carry ints.
    cfg = Config(sources=(), weights={"by_size": 3})
    async with engine(Offer(), BySize(), Killer(), config=cfg) as e:
        d = await e.decide(Event(source="t", kind="oom"))
    assert d.ranking[0].score == pytest.approx(3 * d.ranking[0].scores["by_size"])


async def test_duplicate_pids_are_kept_once_first_offer_wins() -> None:
    other = Candidate(pid=101, name="dup", start_ticks=1000)
    async with engine(("first", Offer(other, B)), ("second", Offer(A)), BySize(), Killer()) as e:
        d = await e.decide(Event(source="t", kind="oom"))
    # "second" was registered last, so it runs first and its 101 wins.
    assert sorted(r.candidate.pid for r in d.ranking) == [101, 102]
    assert {r.candidate.name for r in d.ranking} == {"small", "big"}


async def test_raising_scorer_is_skipped_and_recorded() -> None:
    class Broken:
        name = "broken"

        @hookimpl
        def oomkit_score(self, candidates: Sequence[Candidate]) -> list[float]:
            raise RuntimeError("no data")

    class Short:
        name = "short"

        @hookimpl
        def oomkit_score(self, candidates: Sequence[Candidate]) -> list[float]:
            return [1.0]

    async with engine(Offer(), BySize(), Broken(), Short(), Killer()) as e:
        d = await e.decide(Event(source="t", kind="oom"))
    assert d.victim == B and d.outcome == "killed"
    assert {(x.plugin, x.error) for x in d.errors} == {
        ("broken", "RuntimeError: no data"),
        ("short", "returned 1 scores for 3 candidates"),
    }
    assert e.stats.errors_by_plugin == {"broken": 1, "short": 1}


async def test_raising_veto_protects_everyone_it_was_asked_about() -> None:
    class Broken:
        name = "broken_veto"

        @hookimpl
        def oomkit_veto(self, candidates: Sequence[Candidate]) -> dict[int, str]:
            raise OSError("cannot read the list")

    killer = Killer()
    async with engine(Offer(), BySize(), Broken(), killer) as e:
        d = await e.decide(Event(source="t", kind="oom"))
    assert d.outcome == "all-vetoed" and d.victim is None and killer.killed == []
    assert all(r.vetoes[0].plugin == "broken_veto" for r in d.ranking)


async def test_no_candidates() -> None:
    async with engine(Offer(), Killer()) as e:
        e.pm.unregister(name="offer")
        d = await e.decide(Event(source="t", kind="oom"))
    assert d.outcome == "no-candidates"


async def test_dry_run_runs_every_stage_but_never_kills() -> None:
    killer = Killer()
    async with engine(Offer(), BySize(), killer, dry_run=True) as e:
        d = await e.decide(Event(source="t", kind="oom"))
    assert d.outcome == "dry-run" and d.dry_run and d.victim == B and killer.killed == []
    assert "would kill pid 102 (big)" in d.detail


async def test_recheck_stops_the_kill_when_the_condition_cleared() -> None:
    src = FakeSource()
    killer = Killer()
    async with engine(Offer(), BySize(), killer, sources=[src]) as e:
        src.holds = False
        d = await e.decide(src.event("low-memory"))
    assert d.outcome == "condition-cleared" and killer.killed == [] and src.rechecks == 1


async def test_killer_that_declines_raises_or_times_out_gives_way_to_the_next() -> None:
    class Declines:
        name = "declines"

        @hookimpl(tryfirst=True)
        async def oomkit_kill(self, victim: Candidate) -> None:
            return None

    class Hangs:
        name = "hangs"

        @hookimpl(tryfirst=True)
        async def oomkit_kill(self, victim: Candidate) -> KillResult:
            await anyio.sleep(60)
            raise AssertionError("unreachable")

    killer = Killer()
    cfg = Config(sources=(), engine=EngineConfig(kill_timeout_s=0.05))
    async with engine(Offer(), BySize(), killer, Declines(), Hangs(), config=cfg) as e:
        d = await e.decide(Event(source="t", kind="oom"))
    assert d.outcome == "killed" and killer.killed == [102]
    assert [(x.plugin, x.error) for x in d.errors] == [("hangs", "TimeoutError: no answer within 0.05 s")]


async def test_no_killer_is_a_failed_decision() -> None:
    async with engine(Offer(), BySize()) as e:
        d = await e.decide(Event(source="t", kind="oom"))
    assert d.outcome == "failed" and d.detail == "no killer claimed the victim"


async def test_storm_for_one_scope_is_one_decision_at_a_time() -> None:
    src = FakeSource()
    killer = Killer(delay=0.2)
    cfg = Config(sources=(), engine=EngineConfig(cooldown_s=0))
    async with engine(Offer(), BySize(), killer, sources=[src], config=cfg) as e:
        for _ in range(1000):
            await src.inject(src.event("oom", Scope("v1", "/a")))
        await src.inject(src.event("oom", Scope("v1", "/b")))
        with anyio.fail_after(5):
            while e.stats.decisions < 2:
                await anyio.sleep(0.01)
            # /b was decided while /a's first decision was still killing
            assert {d.event.scope.path for d in e.recent} == {"/a", "/b"}
            while e.stats.decisions < 3:
                await anyio.sleep(0.01)
        await anyio.sleep(0.3)
    assert e.stats.events == 1001
    assert e.stats.decisions == 3  # /a twice (first, then the newest pending), /b once
    assert e.stats.coalesced == 998


async def test_cooldown_skips_pressure_but_never_an_oom() -> None:
    src = FakeSource()
    killer = Killer()
    async with engine(Offer(), BySize(), killer, sources=[src]) as e:  # cooldown 5 s
        await src.inject(src.event("low-memory"))
        with anyio.fail_after(30):
            while e.stats.decisions < 1:
                await anyio.sleep(0.01)
        await src.inject(src.event("low-memory"))
        await src.inject(src.event("oom"))
        with anyio.fail_after(30):
            while e.stats.decisions < 2:
                await anyio.sleep(0.01)
    assert e.stats.cooled == 1
    assert [d.event.kind for d in e.recent] == ["low-memory", "oom"]


async def test_should_act_decides_and_a_raising_gate_counts_as_no_opinion() -> None:
    class Gate:
        name = "gate"

        @hookimpl
        def oomkit_should_act(self, event: Event) -> bool | None:
            if event.kind == "pressure":
                return event.values["some_avg10_pct"] > 50
            if event.kind == "low-memory":
                raise ValueError("confused")
            return None

    src = FakeSource()
    async with engine(Offer(), BySize(), Killer(), Gate(), sources=[src], config=Config(sources=(), engine=EngineConfig(cooldown_s=0))) as e:
        await src.inject(src.event("pressure", Scope("v2", "/p"), some_avg10_pct=10))
        await src.inject(src.event("pressure", Scope("v2", "/q"), some_avg10_pct=90))
        await src.inject(src.event("low-memory"))  # gate raises: default for low-memory is to act
        await src.inject(src.event("threshold", Scope("v1", "/t")))  # no opinion: default ignores
        with anyio.fail_after(5):
            while e.stats.decisions < 2:
                await anyio.sleep(0.01)
        await anyio.sleep(0.05)
    assert sorted(str(d.event.scope) for d in e.recent) == ["system", "v2:/q"]
    assert e.stats.ignored == 2 and e.stats.errors_by_plugin == {"gate": 1}


async def test_kernel_kills_are_reported_to_notifiers_not_decided() -> None:
    src = FakeSource()
    notes = Notes()
    killer = Killer()
    async with engine(Offer(), BySize(), killer, notes, sources=[src]) as e:
        await src.inject(src.event("kernel-kill", Scope("v1", "/k"), oom_kill_delta=1))
        with anyio.fail_after(5):
            await notes.got.wait()
    assert notes.seen[0].outcome == "observed" and killer.killed == []
    assert e.stats.decisions == 0


async def test_slow_notifier_never_delays_a_kill_and_overflow_is_counted() -> None:
    class Slow:
        name = "slow"

        def __init__(self) -> None:
            self.busy = anyio.Event()

        @hookimpl
        async def oomkit_notify(self, decision: Decision) -> None:
            self.busy.set()
            await anyio.sleep(10)

    killer = Killer()
    slow = Slow()
    cfg = Config(sources=(), engine=EngineConfig(notify_queue_size=1, hook_timeout_s=30))
    async with engine(Offer(), BySize(), killer, slow, config=cfg) as e:
        with anyio.fail_after(2):
            await e.decide(Event(source="t", kind="oom"))
            await slow.busy.wait()  # the notifier task now holds decision 1
            for _ in range(3):
                await e.decide(Event(source="t", kind="oom"))
        assert killer.killed == [102] * 4
        # decision 2 waits in the one-slot queue; 3 and 4 are dropped
        assert e.stats.notify_dropped == 2


async def test_raising_notifier_is_counted_and_the_next_still_runs() -> None:
    class Broken:
        name = "broken_notifier"

        @hookimpl(tryfirst=True)
        async def oomkit_notify(self, decision: Decision) -> None:
            raise ConnectionError("no route")

    notes = Notes()
    async with engine(Offer(), BySize(), Killer(), Broken(), notes) as e:
        await e.decide(Event(source="t", kind="oom"))
        with anyio.fail_after(5):
            await notes.got.wait()
    assert e.stats.errors_by_plugin == {"broken_notifier": 1}


async def test_a_source_failing_before_it_armed_refuses_to_start() -> None:
    class Bad(FakeSource):
        async def run(self, emit, *, task_status=anyio.TASK_STATUS_IGNORED):  # type: ignore[no-untyped-def]
            raise FileNotFoundError("memory.oom_control vanished")

    with pytest.raises(SourceError, match=r"^source 'bad' could not start: FileNotFoundError: memory.oom_control vanished$"):
        async with engine(sources=[Bad("bad")]):
            pass  # pragma: no cover


class Dies(FakeSource):
    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.die = anyio.Event()

    async def run(self, emit, *, task_status=anyio.TASK_STATUS_IGNORED):  # type: ignore[no-untyped-def]
        task_status.started()
        await self.die.wait()
        raise OSError("gone")


async def test_a_source_dying_later_stops_the_engine_by_default() -> None:
    dies = Dies("dies")
    with pytest.raises(SourceError, match=r"^source 'dies' failed and stopped: OSError: gone; stopping"):
        async with engine(Offer(), BySize(), Killer(), sources=[dies, FakeSource("good")]) as e:
            dies.die.set()
            with anyio.fail_after(10):
                await anyio.sleep_forever()
    assert e.stats.source_failures == 1


async def test_a_source_dying_later_ends_alone_when_told_to_continue() -> None:
    dies, good = Dies("dies"), FakeSource("good")
    killer = Killer()
    config = Config(sources=(), engine=EngineConfig(on_source_failure="continue"))
    async with engine(Offer(), BySize(), killer, sources=[dies, good], config=config) as e:
        dies.die.set()
        with anyio.fail_after(10):
            while not e.stats.source_failures:
                await anyio.sleep(0.01)
        await good.inject(good.event("oom"))
        with anyio.fail_after(10):
            while not killer.killed:
                await anyio.sleep(0.01)
    assert e.stats.source_failures == 1


async def test_operations_need_a_running_engine() -> None:
    e = engine(Offer())
    with pytest.raises(EngineNotRunning):
        await e.decide(Event(source="t", kind="oom"))
    with pytest.raises(EngineNotRunning):
        await e.submit(Event(source="t", kind="oom"))
    assert e.rank(Event(source="t", kind="oom"))  # ranking needs no loop
    assert repr(e) == "<Engine stopped sources=0 plugins=1 queued=0/1024 decisions=0>"


async def test_two_sources_with_one_name_are_refused() -> None:
    from oomkit import ConfigError

    with pytest.raises(ConfigError, match="two sources are named 'x'"):
        engine(sources=[FakeSource("x"), FakeSource("x")])


class _HandsBack(FakeSource):
    def __init__(self) -> None:
        super().__init__("holder")
        self.handed: list[Event] = []

    def hand_back(self, event: Event) -> bool:
        self.handed.append(event)
        return True


@pytest.mark.anyio
async def test_all_vetoed_hands_the_decision_back_to_the_source_at_once() -> None:
    class NoOne:
        @hookimpl
        def oomkit_candidates(self) -> list[Candidate]:
            return [Candidate(pid=4242, name="x", start_ticks=1000)]

        @hookimpl
        def oomkit_veto(self) -> dict[int, str]:
            return {4242: "no"}

    src = _HandsBack()
    async with Engine(Config(sources=()), plugins=[("n", NoOne())], sources=[src], autoload=False) as e:
        ev = src.event("oom")
        d = await e.decide(ev)
    assert d.outcome == "all-vetoed" and d.detail == "handed back to the kernel"
    assert src.handed == [ev]
