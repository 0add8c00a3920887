"""One test per hook, through a real engine, and the tests that keep the reference honest:
every hook is documented (and says what raising means), every hook has a test here."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import anyio
import pytest

import oomkit
from oomkit import Candidate, Config, Decision, Engine, Event, KillResult, Source, hookimpl
from oomkit.testing import FakeProc, FakeSource, assert_outcome, assert_vetoed, assert_victim, harness, paths_for

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "docs"))
import gen_hooks  # noqa: E402

ONE = Candidate(pid=4242, name="victim", rss_bytes=1 << 20, start_ticks=1000)
OTHER = Candidate(pid=7, name="other", rss_bytes=2 << 20, start_ticks=1000)
PROC: FakeProc | None = None


@pytest.fixture(autouse=True)
def _processes(fake_proc: FakeProc) -> None:
    """The candidates exist in a fake /proc, which the engine re-reads before every kill."""
    global PROC
    fake_proc.add_candidate(ONE)
    fake_proc.add_candidate(OTHER)
    PROC = fake_proc


class Basics:
    """The least a chain needs: someone to offer, someone to kill."""

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


def engine(*plugins: object, sources: Sequence[Source] = ()) -> Engine:
    assert PROC is not None
    return Engine(Config(sources=(), paths=paths_for(PROC)), plugins=plugins, sources=sources, autoload=False)


def test_every_hook_is_documented_and_says_what_raising_means() -> None:
    for name in gen_hooks.hook_names():
        doc = getattr(oomkit.hookspecs, name).__doc__ or ""
        assert len(doc) > 80, f"{name} has no real docstring"
        assert "rais" in doc.lower(), f"{name}'s docstring does not say what a raising implementation means"


def test_hook_reference_is_up_to_date() -> None:
    done = subprocess.run([sys.executable, str(ROOT / "docs" / "gen_hooks.py"), "--check"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_every_hook_has_a_test_here() -> None:
    missing = [n for n in gen_hooks.hook_names() if f"test_hook_{n.removeprefix('oomkit_')}" not in globals()]
    assert not missing, f"hooks without a test_hook_* test: {missing}"


def test_hook_configure() -> None:
    class P:
        @hookimpl
        def oomkit_configure(self, config: Config) -> None:
            self.origin = config.origin

    p = P()
    engine(("p", p))
    assert p.origin == "<defaults>"


@pytest.mark.anyio
async def test_hook_sources() -> None:
    extra = FakeSource("from-plugin")

    class P:
        @hookimpl
        def oomkit_sources(self) -> list[Source]:
            return [extra]

    basics = Basics()
    async with engine(("p", P()), basics) as e:
        assert extra in e.sources
        await extra.inject(extra.event("oom"))
        with anyio.fail_after(5):
            while not basics.killed:
                await anyio.sleep(0.01)


@pytest.mark.anyio
async def test_hook_should_act() -> None:
    class OnlyOom:
        @hookimpl
        def oomkit_should_act(self, event: Event) -> bool:
            return event.kind == "oom"

    basics = Basics()
    async with harness(("only_oom", OnlyOom()), basics, proc=PROC, autoload=False, dry_run=False) as h:
        assert await h.offer(h.event("low-memory")) is None
        d = await h.offer(h.event("oom"))
    assert d is not None
    assert_victim(d, ONE.pid)
    assert h.engine.stats.ignored == 1 and basics.killed == [ONE.pid]


@pytest.mark.anyio
async def test_hook_candidates() -> None:
    class P:
        @hookimpl
        def oomkit_candidates(self, event: Event) -> list[Candidate]:
            return [OTHER]

    async with engine(("p", P()), Basics()) as e:
        d = await e.decide(Event(source="t", kind="oom"))
    assert {r.candidate.pid for r in d.ranking} == {7, 4242}


@pytest.mark.anyio
async def test_hook_score() -> None:
    class Prefer:
        @hookimpl
        def oomkit_score(self, event: Event, candidates: Sequence[Candidate]) -> dict[int, float]:
            return {c.pid: 5.0 for c in candidates}

    async with engine(("prefer", Prefer()), Basics()) as e:
        d = await e.decide(Event(source="t", kind="oom"))
    assert d.ranking[0].scores == {"prefer": 5.0}


@pytest.mark.anyio
async def test_hook_veto() -> None:
    class No:
        @hookimpl
        def oomkit_veto(self, candidates: Sequence[Candidate]) -> dict[int, str]:
            return {4242: "not this one"}

    basics = Basics()
    async with harness(("no", No()), basics, proc=PROC, autoload=False, dry_run=False) as h:
        d = await h.decide()
    assert_outcome(d, "all-vetoed")
    assert_vetoed(d, "victim", by="no", reason="not this one")
    assert basics.killed == []


@pytest.mark.anyio
async def test_hook_tier() -> None:
    big = Candidate(pid=7, name="big", rss_bytes=900 << 20, start_ticks=1000)
    spare = Candidate(pid=8, name="spare", rss_bytes=1 << 20, start_ticks=1000)
    db = Candidate(pid=9, name="db", rss_bytes=2000 << 20, start_ticks=1000)
    assert PROC is not None
    for c in (big, spare, db):
        PROC.add_candidate(c)

    class More:
        @hookimpl
        def oomkit_candidates(self) -> list[Candidate]:
            return [big, spare, db]

        @hookimpl
        def oomkit_score(self, candidates: Sequence[Candidate]) -> list[float]:
            return [c.rss_bytes / 2**20 for c in candidates]

    class Tiers:
        @hookimpl
        def oomkit_tier(self, candidates: Sequence[Candidate]) -> dict[int, tuple[str, str]]:
            return {8: ("expendable", "asked for it"), 9: ("critical", "the database")}

    class Disagrees:
        @hookimpl
        def oomkit_tier(self) -> dict[int, tuple[str, str]]:
            return {9: ("expendable", "no, this one"), 7: ("nonsense", "?")}

    async with engine(("more", More()), ("tiers", Tiers()), ("disagrees", Disagrees()), Basics()) as e:
        d = await e.decide(Event(source="t", kind="oom"))
    # Expendable first whatever its score; critical last though it is the biggest; the
    # critical tier wins a disagreement; a tier that is not one is a counted plugin error.
    assert [r.candidate.pid for r in d.ranking] == [8, 7, 4242, 9]
    assert [r.tier for r in d.ranking] == ["expendable", "normal", "normal", "critical"]
    assert d.ranking[0].tier_reason == "tiers: asked for it"
    assert [(err.plugin, err.hook) for err in d.errors] == [("disagrees", "oomkit_tier")]


@pytest.mark.anyio
async def test_hook_group() -> None:
    kids = [Candidate(pid=100 + i, name="kid", rss_bytes=(10 + i) << 20, start_ticks=1000) for i in range(4)]
    assert PROC is not None
    for kid in kids:
        PROC.add_candidate(kid)

    class Family:
        def __init__(self) -> None:
            self.got: dict[str, list[int]] = {}

        @hookimpl
        def oomkit_candidates(self) -> list[Candidate]:
            return kids

        @hookimpl
        def oomkit_group(self, victim: Candidate, candidates: Sequence[Candidate]) -> list[int]:
            assert victim.pid == 103  # the biggest
            self.got["group"] = [c.pid for c in candidates if c.name == "kid"]
            return [102, 4242, 101, 103, 99999, 100]  # the victim and a stranger are dropped

        @hookimpl
        async def oomkit_rescue(self, candidates: Sequence[Candidate]) -> None:
            self.got["rescue"] = [c.pid for c in candidates if c.name == "kid"]

    class Spare:
        @hookimpl
        def oomkit_veto(self) -> dict[int, str]:
            return {4242: "spare it"}

    basics, family = Basics(), Family()
    async with engine(("family", family), ("spare", Spare()), basics) as e:
        d = await e.decide(Event(source="t", kind="oom"))
    # Everyone, in the order they were offered rather than ranked (103 first): the whole
    # order of a big ranking is a sort neither stage needs (oomkit.ranking).
    assert family.got == {"group": [100, 101, 102, 103], "rescue": [100, 101, 102, 103]}
    assert [c.pid for c in d.group] == [102, 101, 100]
    assert basics.killed == [103, 102, 101, 100]  # one decision, the victim first
    assert [k.outcome for k in d.group_kills] == ["killed"] * 3


@pytest.mark.anyio
async def test_hook_kill() -> None:
    class First:
        @hookimpl(tryfirst=True)
        async def oomkit_kill(self, event: Event, victim: Candidate) -> KillResult:
            return KillResult(action="froze", outcome="killed", detail=event.kind)

    basics = Basics()
    async with engine(("first", First()), basics) as e:
        d = await e.decide(Event(source="t", kind="oom"))
    assert d.action == "froze" and d.kill is not None and d.kill.detail == "oom"
    assert basics.killed == []  # first result wins


@pytest.mark.anyio
async def test_hook_rescue() -> None:
    source = FakeSource("t")

    class Frees:
        def __init__(self) -> None:
            self.asked: list[tuple[int, int]] = []

        @hookimpl
        async def oomkit_rescue(self, victim: Candidate, candidates: Sequence[Candidate]) -> tuple[str, int]:
            self.asked.append((victim.pid, len(candidates)))
            source.holds = False  # what it freed ended the condition
            return "freed", 1 << 20

    frees, basics = Frees(), Basics()
    async with engine(("frees", frees), basics, sources=[source]) as e:
        d = await e.decide(source.event("oom"))
    assert frees.asked == [(ONE.pid, 1)]
    assert d.outcome == "rescued" and basics.killed == [] and d.killed == ()
    (attempt,) = d.rescues
    assert (attempt.plugin, attempt.result, attempt.freed_bytes, attempt.cleared) == ("frees", "freed", 1 << 20, True)


@pytest.mark.anyio
async def test_hook_notify() -> None:
    got: list[Decision] = []
    done = anyio.Event()

    class N:
        @hookimpl
        async def oomkit_notify(self, event: Event, decision: Decision) -> None:
            got.append(decision)
            done.set()

    async with engine(("n", N()), Basics()) as e:
        d = await e.decide(Event(source="t", kind="oom"))
        with anyio.fail_after(5):
            await done.wait()
    assert got == [d]


def test_memory_samples_are_built_only_while_a_listener_wants_them(fake_proc: FakeProc) -> None:
    from oomkit import Scope
    from oomkit.records import MemorySample

    class Sampler:
        def __init__(self) -> None:
            self.memory_samples = False
            self.got: list[MemorySample] = []

        @hookimpl
        def oomkit_memory_sample(self, sample: MemorySample) -> None:
            self.got.append(sample)

    sampler = Sampler()
    e = engine(("sampler", sampler), Basics())
    fake_proc.set_meminfo(mem_total=8 << 30, mem_available=4 << 30)
    e.history.touch(Scope(), "oom", 10**12)
    e.history.tick(10**12)
    assert e.history.deliver() == 0, "memory_samples false: none built"
    sampler.memory_samples = True
    e.history.tick(10**12 + 1)
    assert e.history.deliver() == 1
    (sample,) = sampler.got
    assert sample.scope == Scope() and sample.limit_bytes == 8 << 30 and sample.usage_bytes == 4 << 30
    assert sample.warm and {p.pid for p in sample.top} == {ONE.pid, OTHER.pid}


@pytest.mark.anyio
async def test_hook_memory_sample(fake_proc: FakeProc) -> None:
    from oomkit.config import HistoryConfig
    from oomkit.events import SYSTEM

    class Scoped(FakeSource):
        def scopes(self) -> list[oomkit.Scope]:
            return [SYSTEM]

    class Watch:
        def __init__(self) -> None:
            self.got: list[object] = []

        @hookimpl
        def oomkit_memory_sample(self, sample: object) -> None:
            self.got.append(sample)

    watch = Watch()
    cfg = Config(sources=(), paths=paths_for(fake_proc), history=HistoryConfig(system_warm_fraction=0.0))
    async with Engine(cfg, plugins=[watch], sources=[Scoped()], autoload=False) as e:
        e.history.tick()
        e.history.deliver()
    assert watch.got and getattr(watch.got[0], "scope") == SYSTEM
