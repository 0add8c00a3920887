"""The engine harness and the decision assertions of oomkit.testing, as plugin authors use them."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from oomkit import Candidate, ConfigError, Event, KillResult, Scope, hookimpl
from oomkit.testing import (
    FakeCgroups,
    FakeProc,
    assert_not_vetoed,
    assert_outcome,
    assert_vetoed,
    assert_victim,
    decide,
    explain,
    harness,
    parse_scope,
)

MiB = 1 << 20


class NoDatabases:
    name = "no_databases"

    @hookimpl
    def oomkit_veto(self, candidates: Sequence[Candidate]) -> dict[int, str]:
        return {c.pid: "databases stay up" for c in candidates if c.name == "postgres"}


class Recorder:
    """A killer that only records; for the tests that turn dry-run off."""

    name = "recorder"

    def __init__(self) -> None:
        self.killed: list[int] = []

    @hookimpl(tryfirst=True)
    async def oomkit_kill(self, victim: Candidate) -> KillResult:
        self.killed.append(victim.pid)
        return KillResult(action="recorded", outcome="killed")


@pytest.fixture
def machine(fake_proc: FakeProc, fake_cgroups: FakeCgroups) -> FakeProc:
    fake_proc.add_process(1, "init", ppid=0, rss=50 * MiB)
    fake_proc.add_process(10, "postgres", rss=900 * MiB)
    fake_proc.add_process(11, "leaky", rss=300 * MiB)
    fake_proc.add_process(12, "small", rss=20 * MiB)
    fake_cgroups.mkdir_v1("/jobs", limit=512 * MiB, pids=(11, 12))
    return fake_proc


@pytest.mark.anyio
async def test_the_default_chain_plus_a_plugin_on_fake_trees(machine: FakeProc, fake_cgroups: FakeCgroups) -> None:
    async with harness(NoDatabases(), proc=machine, cgroups=fake_cgroups) as h:
        system = await h.decide()
        jobs = await h.decide(scope="v1:/jobs")
        assert [r.candidate.pid for r in h.rank("v1:/jobs")] == [11, 12]
    assert_outcome(system, "dry-run")
    assert_vetoed(system, "postgres", by="no_databases", reason="databases stay up")
    assert_vetoed(system, 1, by="oomkit", reason="pid 1")
    assert_victim(system, "leaky")
    assert_not_vetoed(jobs, "small")
    assert assert_victim(jobs, 11).name == "leaky"
    assert jobs.event.scope == Scope("v1", "/jobs")


def test_the_sync_helper_runs_on_every_backend(machine: FakeProc, anyio_backend: tuple[str, dict[str, object]]) -> None:
    name, options = anyio_backend
    backend = "uvloop" if options.get("use_uvloop") else name
    d = decide(NoDatabases(), proc=machine, backend=backend)  # type: ignore[arg-type]
    assert_victim(d, "leaky")


def test_assertions_fail_with_the_whole_ranking(machine: FakeProc) -> None:
    d = decide(NoDatabases(), proc=machine)
    with pytest.raises(AssertionError) as info:
        assert_victim(d, "postgres")
    text = str(info.value)
    assert text.startswith("victim is pid 11 'leaky', expected 'postgres'\ndecision ")
    assert "> pid 11 'leaky'" in text and "VETOED no_databases: databases stay up" in text
    with pytest.raises(AssertionError, match="outcome is 'dry-run', expected 'killed'"):
        assert_outcome(d, "killed")
    with pytest.raises(AssertionError, match="candidate 'leaky' is not vetoed"):
        assert_vetoed(d, "leaky")
    with pytest.raises(AssertionError, match="candidate 'postgres' is not vetoed by 'protect'"):
        assert_vetoed(d, "postgres", by="protect")
    with pytest.raises(AssertionError, match="not vetoed with 'tables' in the reason"):
        assert_vetoed(d, "postgres", reason="tables")
    with pytest.raises(AssertionError, match="candidate 'postgres' is vetoed"):
        assert_not_vetoed(d, "postgres")
    with pytest.raises(AssertionError, match="no candidate 999 in the ranking"):
        assert_not_vetoed(d, 999)


def test_a_name_that_two_candidates_share_must_be_given_as_a_pid(fake_proc: FakeProc) -> None:
    fake_proc.add_process(20, "worker", rss=MiB)
    fake_proc.add_process(21, "worker", rss=2 * MiB)
    d = decide(proc=fake_proc)
    with pytest.raises(AssertionError, match="2 candidates are named 'worker': name one by pid"):
        assert_not_vetoed(d, "worker")
    assert_victim(d, 21)


def test_no_victim_is_reported_as_such(fake_proc: FakeProc) -> None:
    fake_proc.add_process(10, "postgres", rss=MiB)
    d = decide(NoDatabases(), proc=fake_proc)
    assert_outcome(d, "all-vetoed")
    with pytest.raises(AssertionError, match="no victim, expected 'postgres'"):
        assert_victim(d, "postgres")
    assert explain(d).splitlines()[1] == (
        "  pid 10 'postgres' score 0.0305176 critical (preference: preference.critical: name 'postgres' matches"
        " 'postgres') [burst=0 freed=0.12207 growth=0 kernel_badness=0.12207 preference=0 trigger=0]"
        " VETOED no_databases: databases stay up"
    )


@pytest.mark.anyio
async def test_dry_run_off_calls_the_killers(machine: FakeProc) -> None:
    rec = Recorder()
    async with harness(rec, proc=machine, dry_run=False) as h:
        d = await h.decide()
    assert_outcome(d, "killed")
    assert rec.killed == [11]  # postgres is critical by default: the biggest of the others


@pytest.mark.anyio
async def test_offer_goes_through_should_act(fake_proc: FakeProc) -> None:
    class OnlyOom:
        @hookimpl
        def oomkit_should_act(self, event: Event) -> bool:
            return event.kind == "oom"

    class One:
        @hookimpl
        def oomkit_candidates(self) -> list[Candidate]:
            return [Candidate(pid=5, name="x", start_ticks=1000)]

    fake_proc.add_candidate(Candidate(pid=5, name="x", start_ticks=1000))
    async with harness(("gate", OnlyOom()), ("one", One()), proc=fake_proc, autoload=False) as h:
        assert await h.offer(h.event("pressure")) is None
        d = await h.offer(h.event("oom", "v2:/app"))
    assert d is not None and d.event.scope == Scope("v2", "/app")
    assert_victim(d, 5)
    assert h.engine.stats.ignored == 1


@pytest.mark.anyio
async def test_the_recheck_asks_the_harness_source(fake_proc: FakeProc) -> None:
    fake_proc.add_process(10, "x", rss=MiB)
    async with harness(proc=fake_proc) as h:
        h.source.holds = False
        d = await h.decide(kind="low-memory")
    assert_outcome(d, "condition-cleared")


def test_plugin_settings_are_decoded_as_from_a_file(fake_proc: FakeProc) -> None:
    with pytest.raises(ConfigError, match=r"^<harness>: Object contains unknown field `nmes` - at `\$.plugins.protect`$"):
        decide(proc=fake_proc, config={"plugins": {"protect": {"nmes": ["x"]}}})


def test_scopes_are_written_as_str_prints_them() -> None:
    for scope in (Scope(), Scope("v1", "/a/b"), Scope("v2", "/c")):
        assert parse_scope(str(scope)) == scope
    with pytest.raises(ValueError, match="scope 'v3:/x': expected 'system', 'v1:/path' or 'v2:/path'"):
        parse_scope("v3:/x")
