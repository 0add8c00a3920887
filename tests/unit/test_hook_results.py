"""Malformed plugin results, one class per test: each costs that plugin its say in one
decision, is recorded in the decision's ``errors`` and the engine's stats, and the decision
completes without it.  Real engine, in-test plugins, candidates that exist in a fake /proc."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from typing import Any

import pytest

from oomkit import Candidate, Decision, Event, KillResult, Source, hookimpl
from oomkit.hookcall import ErrorLog
from oomkit import hookspecs
from oomkit.hookresults import MAX_CANDIDATES, MAX_PID, MAX_SCORE, MAX_SCORE_TEXT, MAX_TEXT
from oomkit.plugins import PluginLoadError
from oomkit.testing import FakeProc, FakeSource, assert_outcome, assert_victim, harness

pytestmark = pytest.mark.anyio

MiB = 1 << 20
SMALL = Candidate(pid=101, name="small", rss_bytes=1 * MiB, start_ticks=500)
BIG = Candidate(pid=102, name="big", rss_bytes=4000 * MiB, start_ticks=600)


@pytest.fixture
def proc(fake_proc: FakeProc) -> FakeProc:
    fake_proc.add_candidate(SMALL)
    fake_proc.add_candidate(BIG)
    return fake_proc


class Offer:
    """Offers SMALL before BIG, always in that order (so order can decide nothing by luck)."""

    name = "offer"

    @hookimpl(trylast=True)
    def oomkit_candidates(self) -> list[Candidate]:
        return [SMALL, BIG]


class BySize:
    name = "by_size"

    @hookimpl
    def oomkit_score(self, candidates: Sequence[Candidate]) -> list[float]:
        return [c.rss_bytes / MiB for c in candidates]


class Scores:
    """A scorer that returns whatever the test gives it."""

    name = "bad"

    def __init__(self, result: Any) -> None:
        self.result = result

    @hookimpl
    def oomkit_score(self, candidates: Sequence[Candidate]) -> Any:
        return self.result


class Recorder:
    name = "recorder"

    def __init__(self) -> None:
        self.killed: list[int] = []

    @hookimpl(trylast=True)
    async def oomkit_kill(self, victim: Candidate) -> KillResult:
        self.killed.append(victim.pid)
        return KillResult(action="recorded", outcome="killed")


async def run(proc: FakeProc, *plugins: object, dry_run: bool = True) -> tuple[Decision, dict[str, int]]:
    async with harness(Offer(), BySize(), *plugins, proc=proc, autoload=False, dry_run=dry_run) as h:
        d = await h.decide()
    return d, h.engine.stats.errors_by_plugin


def only_error(d: Decision, plugin: str = "bad") -> str:
    assert [(e.plugin) for e in d.errors] == [plugin], d.errors
    return d.errors[0].error


# --- score --------------------------------------------------------------------------------


async def test_nan_score_is_rejected_and_the_big_process_is_chosen(proc: FakeProc) -> None:
    # Before: a nan in the sum made the sort order (and so the victim) depend on the order
    # the candidates came in, and the 1 MiB process was killed instead of the 4000 MiB one.
    d, errors = await run(proc, Scores([0.0, math.nan]))
    assert_outcome(d, "dry-run")
    assert_victim(d, "big")
    assert only_error(d) == "score for pid 102 is nan: every score must be finite"
    assert errors == {"bad": 1}
    assert all("bad" not in r.scores for r in d.ranking)


async def test_inf_score_is_rejected(proc: FakeProc) -> None:
    d, errors = await run(proc, Scores({101: math.inf}))
    assert_victim(d, "big")
    assert only_error(d) == "score for pid 101 is inf: every score must be finite"
    assert d.ranking[0].score == 4000.0 and errors == {"bad": 1}


async def test_huge_score_is_rejected_not_clamped(proc: FakeProc) -> None:
    d, _ = await run(proc, Scores([1e300, 0.0]))
    assert_victim(d, "big")  # 1e300 on the small one would have made it the victim
    assert only_error(d) == f"score for pid 101 is 1e+300, outside ±{MAX_SCORE_TEXT}"
    # The bound is inclusive, and negative scores are legal.
    d, _ = await run(proc, Scores([MAX_SCORE, -MAX_SCORE]))
    assert d.errors == () and d.ranking[0].scores["bad"] == MAX_SCORE
    assert_victim(d, "small")


async def test_non_number_score_is_rejected(proc: FakeProc) -> None:
    d, _ = await run(proc, Scores({101: "9999", 102: 1.0}))
    assert_victim(d, "big")
    assert only_error(d) == "score for pid 101 is a str, not a number"


async def test_bool_is_not_a_number(proc: FakeProc) -> None:
    d, _ = await run(proc, Scores([True, 0]))
    assert_victim(d, "big")
    assert only_error(d) == "score for pid 101 is a bool, not a number"
    # ints are numbers, a mapping's keys must be candidates' pids
    d, _ = await run(proc, Scores([5000, 0]))
    assert d.errors == ()
    assert_victim(d, "small")
    d, _ = await run(proc, Scores({101: 5000.0, 999: 1.0}))
    assert only_error(d) == "key 999 is not the pid of a candidate"
    d, _ = await run(proc, Scores({True: 5000.0}))
    assert only_error(d) == "key True is not the pid of a candidate"


async def test_wrong_length_and_wrong_type_are_rejected(proc: FakeProc) -> None:
    d, _ = await run(proc, Scores([5000.0]))
    assert_victim(d, "big")
    assert only_error(d) == "returned 1 scores for 2 candidates"

    def endless() -> Iterator[float]:
        while True:
            yield 5000.0

    d, _ = await run(proc, Scores(endless()))
    assert only_error(d) == "returned 3 or more scores for 2 candidates"
    d, _ = await run(proc, Scores({1.0, 2.0}))
    assert only_error(d) == "returned a set, not a sequence or mapping of scores"
    d, _ = await run(proc, Scores(5000.0))
    assert only_error(d) == "returned a float, not a sequence or mapping of scores"
    assert_victim(d, "big")


# --- candidates ---------------------------------------------------------------------------


class Candidates:
    name = "bad"

    def __init__(self, result: Any) -> None:
        self.result = result

    @hookimpl
    def oomkit_candidates(self) -> Any:
        return self.result


async def test_an_iterator_raising_midway_contributes_nobody(proc: FakeProc) -> None:
    proc.add_process(103, "third", rss=8000 * MiB)

    def offers() -> Iterator[Candidate]:
        yield Candidate(pid=103, name="third", rss_bytes=8000 * MiB, start_ticks=1000)
        raise OSError("/proc went away")

    d, errors = await run(proc, Candidates(offers()))
    assert [r.candidate.pid for r in d.ranking] == [102, 101]  # not even 103, yielded first
    assert_victim(d, "big")
    assert only_error(d) == "OSError: /proc went away" and errors == {"bad": 1}


async def test_non_candidate_items_contribute_nobody(proc: FakeProc) -> None:
    proc.add_process(103, "third", rss=8000 * MiB)
    good = Candidate(pid=103, name="third", rss_bytes=8000 * MiB, start_ticks=1000)
    d, _ = await run(proc, Candidates([good, {"pid": 104, "name": "dict"}]))
    assert [r.candidate.pid for r in d.ranking] == [102, 101]
    assert only_error(d) == "item 1 is a dict, not a Candidate"
    d, _ = await run(proc, Candidates(good))
    assert only_error(d) == "returned a Candidate, not an iterable of Candidates"


@pytest.mark.parametrize(
    ("fields", "error"),
    [
        ({"pid": 0}, f"pid 0 is not a pid (an int in 1..{MAX_PID})"),
        ({"pid": -1}, f"pid -1 is not a pid (an int in 1..{MAX_PID})"),  # kill(-1) is everyone
        ({"pid": True}, f"pid True is not a pid (an int in 1..{MAX_PID})"),
        ({"pid": MAX_PID + 1}, f"pid {MAX_PID + 1} is not a pid (an int in 1..{MAX_PID})"),
        ({"rss_bytes": 1.5}, "rss_bytes 1.5 is not a non-negative int"),
        ({"start_ticks": -3}, "start_ticks -3 is not a non-negative int"),
        ({"oom_score_adj": 2000}, "oom_score_adj 2000 is not an int in -1000..1000"),
        ({"kthread": 0}, "kthread 0 is not a bool"),
        ({"name": None}, "name and cgroup must be str"),
        ({"cmdline": ["a"]}, "cmdline must be None or a tuple of str"),
        # Optional, but read by scorers (freed): garbage there would fail a first-party plugin.
        ({"rss_anon_bytes": float("nan")}, "rss_anon_bytes nan is not None or a non-negative int"),
        ({"rss_file_bytes": "many"}, "rss_file_bytes 'many' is not None or a non-negative int"),
        ({"rss_shmem_bytes": -1}, "rss_shmem_bytes -1 is not None or a non-negative int"),
    ],
)
async def test_a_candidate_with_a_bad_field_contributes_nobody(
    proc: FakeProc, fields: dict[str, Any], error: str
) -> None:
    raw = {"pid": 105, "name": "liar", "rss_bytes": 9000 * MiB, "start_ticks": 1000, **fields}
    d, _ = await run(proc, Candidates([Candidate(**raw)]))
    assert [r.candidate.pid for r in d.ranking] == [102, 101]
    assert only_error(d) == f"candidate 0 ({raw['name']!r}): {error}"


def test_the_candidate_bound_is_more_than_linux_has_pids() -> None:
    from oomkit.hookresults import BadResult, check_candidates

    def endless() -> Iterator[Candidate]:
        while True:
            yield SMALL

    assert MAX_CANDIDATES >= MAX_PID
    with pytest.raises(BadResult, match=f"more than {MAX_CANDIDATES} candidates"):
        check_candidates(endless())


# --- veto ---------------------------------------------------------------------------------


class Vetoes:
    name = "bad"

    def __init__(self, result: Any) -> None:
        self.result = result

    @hookimpl
    def oomkit_veto(self) -> Any:
        return self.result


async def test_a_non_mapping_veto_protects_everyone(proc: FakeProc) -> None:
    d, errors = await run(proc, Vetoes([102]))
    assert_outcome(d, "all-vetoed")
    assert only_error(d) == "returned a list, not a mapping of pid to reason"
    assert all(v.plugin == "bad" for r in d.ranking for v in r.vetoes) and errors == {"bad": 1}
    # A key that is not an int: whom it meant cannot be told, so everyone is protected.
    d, _ = await run(proc, Vetoes({"102": "the database"}))
    assert_outcome(d, "all-vetoed")
    assert only_error(d) == "key '102' is a str, not a pid"


async def test_a_non_str_reason_still_protects_and_is_recorded(proc: FakeProc) -> None:
    d, errors = await run(proc, Vetoes({102: 42, 101: ValueError("why")}))
    assert_outcome(d, "all-vetoed")
    reasons = {r.candidate.pid: r.vetoes[0].reason for r in d.ranking}
    assert reasons == {102: "42", 101: "why"}
    assert only_error(d) == "reason for pid 102 (and 1 more) is a int, not a str; vetoed anyway"
    assert errors == {"bad": 1}


async def test_reasons_are_cut_and_unknown_pids_ignored(proc: FakeProc) -> None:
    d, _ = await run(proc, Vetoes({102: "x" * 10_000, 31337: "not here"}))
    assert d.errors == ()
    assert_victim(d, "small")
    big = next(r for r in d.ranking if r.candidate.pid == 102)
    assert len(big.vetoes[0].reason) == MAX_TEXT and big.vetoes[0].reason.endswith("…")


# --- kill, should_act, sources ------------------------------------------------------------


async def test_a_non_killresult_from_a_killer_gives_way_to_the_next(proc: FakeProc) -> None:
    class Liar:
        name = "bad"

        @hookimpl(tryfirst=True)
        async def oomkit_kill(self) -> Any:
            return {"outcome": "killed"}

    recorder = Recorder()
    d, errors = await run(proc, Liar(), recorder, dry_run=False)
    assert_outcome(d, "killed")
    assert d.action == "recorded" and recorder.killed == [102]
    assert only_error(d) == "returned a dict, not a KillResult" and errors == {"bad": 1}


async def test_a_killresult_with_an_engine_outcome_gives_way_to_the_next(proc: FakeProc) -> None:
    class Liar:
        name = "bad"

        @hookimpl(tryfirst=True)
        async def oomkit_kill(self) -> KillResult:
            return KillResult(action="x", outcome="all-vetoed")

    recorder = Recorder()
    d, _ = await run(proc, Liar(), recorder, dry_run=False)
    assert_outcome(d, "killed")
    assert only_error(d) == "outcome 'all-vetoed' is not one of exited, failed, killed"


async def test_a_non_bool_should_act_counts_as_no_opinion(proc: FakeProc) -> None:
    class Gate:
        name = "bad"

        @hookimpl(tryfirst=True)
        def oomkit_should_act(self) -> Any:
            return 1

    class Honest:
        name = "honest"

        @hookimpl
        def oomkit_should_act(self, event: Event) -> bool:
            return event.kind == "pressure"

    async with harness(Offer(), BySize(), Gate(), Honest(), proc=proc, autoload=False) as h:
        d = await h.offer(h.event("pressure"))  # the next implementation's True decides
        assert d is not None
        assert await h.offer(h.event("oom", "v1:/other")) is None  # Honest says no
    assert_victim(d, "big")
    assert h.engine.stats.errors_by_plugin == {"bad": 2}


def test_non_sources_refuse_to_start_the_engine(fake_proc: FakeProc) -> None:
    from oomkit import Config, Engine
    from oomkit.testing import paths_for

    class P:
        name = "bad"

        @hookimpl
        def oomkit_sources(self) -> Any:
            return [FakeSource("ok"), "not a source"]

    with pytest.raises(PluginLoadError, match="plugin 'bad', hook oomkit_sources: item 1 is a str, not a Source"):
        Engine(Config(sources=(), paths=paths_for(fake_proc)), plugins=[P()], autoload=False)

    class Q:
        name = "bad"

        @hookimpl
        def oomkit_sources(self) -> Source:
            return FakeSource("alone")  # type: ignore[return-value]

    with pytest.raises(PluginLoadError, match="returned a FakeSource, not a sequence of Sources"):
        Engine(Config(sources=(), paths=paths_for(fake_proc)), plugins=[Q()], autoload=False)


# --- the log ------------------------------------------------------------------------------


async def test_a_plugin_failing_every_time_logs_once_but_counts_every_time(
    proc: FakeProc, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="oomkit.hooks")
    async with harness(Offer(), BySize(), Scores([math.nan, 0.0]), proc=proc, autoload=False) as h:
        decisions = [await h.decide() for _ in range(50)]
    assert all(len(d.errors) == 1 for d in decisions)
    assert h.engine.stats.errors_by_plugin == {"bad": 50} and h.engine.stats.plugin_errors == 50
    lines = [r.getMessage() for r in caplog.records if r.name == "oomkit.hooks"]
    # One line when it first failed, one when the engine stopped, for the 49 held back.
    assert lines == [
        "plugin bad failed in oomkit_score: score for pid 101 is nan: every score must be finite",
        "bad in oomkit_score: 49 more like the last line logged, not logged one by one",
    ]


def test_the_log_says_how_many_were_held_back_when_the_interval_is_over(caplog: pytest.LogCaptureFixture) -> None:
    from oomkit import PluginError

    caplog.set_level(logging.WARNING, logger="oomkit.hooks")
    errlog = ErrorLog(interval_s=0)  # every call is past the interval
    err = PluginError(plugin="p", hook="oomkit_score", error="bad")
    errlog(err)
    errlog(err)
    held = ErrorLog(interval_s=3600)
    for _ in range(3):
        held(err)
    held.flush()
    held.flush()  # nothing left to say
    assert [r.getMessage() for r in caplog.records] == [
        "plugin p failed in oomkit_score: bad",
        "plugin p failed in oomkit_score: bad",
        "plugin p failed in oomkit_score: bad",
        "p in oomkit_score: 2 more like the last line logged, not logged one by one",
    ]


def hook_doc(name: str) -> str:
    return " ".join((getattr(hookspecs, name).__doc__ or "").split())


def test_the_bounds_are_the_ones_the_hook_reference_states() -> None:
    assert f"1..{MAX_PID}" in hook_doc("oomkit_candidates")
    assert f"At most {MAX_CANDIDATES} candidates" in hook_doc("oomkit_candidates")
    assert f"±{MAX_SCORE_TEXT}" in hook_doc("oomkit_score")
    assert f"{MAX_TEXT} characters" in hook_doc("oomkit_veto")
    assert f"{MAX_TEXT} characters" in hook_doc("oomkit_kill")


def test_a_weighted_sum_stays_finite_because_weights_are_bounded_too(fake_proc: FakeProc) -> None:
    from oomkit import Config, ConfigError, Engine
    from oomkit.testing import paths_for

    # A Config built in Python skips the decoder's bounds; the engine checks weights again.
    for weight in (1e300, math.nan, -1.0):
        with pytest.raises(ConfigError, match=r"at `\$.weights.by_size`"):
            Engine(Config(sources=(), paths=paths_for(fake_proc), weights={"by_size": weight}),
                   plugins=[BySize()], autoload=False)


def test_a_candidate_checked_before_is_passed_again_and_a_new_bad_one_still_fails() -> None:
    from oomkit import hookresults

    good = Candidate(pid=300, name="db", start_ticks=1)
    assert hookresults.check_candidates([good]) == [good]
    assert hookresults.check_candidates([good]) == [good]
    with pytest.raises(hookresults.BadResult, match="oom_score_adj"):
        hookresults.check_candidates([good, Candidate(pid=301, name="x", start_ticks=1, oom_score_adj=5000)])
    # Only what the last check passed is remembered: the memo is as big as one offer.
    hookresults.check_candidates([Candidate(pid=302, name="y", start_ticks=1)])
    assert all(c.pid == 302 for c in hookresults._validated[0].values())
