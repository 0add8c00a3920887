"""The ranking's order and its rows built on demand (oomkit.ranking)."""

from __future__ import annotations

import math

import threading
from collections.abc import Collection, Iterable
from typing import NamedTuple

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from oomkit import Candidate, Ranked, Ranking, Veto
from oomkit.events import Tier
from oomkit.ranking import HEAD
from oomkit.reaper import Reaper

from ..takeover_support import wait_for


def cand(pid: int, rss: int = 1 << 20) -> Candidate:
    return Candidate(pid=pid, name=f"p{pid}", start_ticks=pid, rss_bytes=rss)


def test_order_is_killable_then_tier_then_total_then_tiebreak_rss_and_pid() -> None:
    cands = [cand(1), cand(2), cand(3), cand(4), cand(5, rss=2 << 20), cand(6), cand(7)]
    ranking = Ranking(
        cands, ["a", "tb"],
        columns=[[10.0, 50.0, 50.0, 50.0, 50.0, 1.0, 99.0], [0.0, 0.0, 5.0, 0.0, 0.0, 0.0, 0.0]],
        totals=[10.0, 50.0, 50.0, 50.0, 50.0, 1.0, 99.0],
        vetoes={7: [Veto(plugin="p", reason="no")]},
        tiers={6: ("expendable", "declared"), 1: ("critical", "db")},
        tiebreak="tb",
    )
    # 6 is expendable; 3 wins its tie on the tiebreak, 5 on RSS, then 2 before 4 (lower pid);
    # critical 1 comes after every normal one, vetoed 7 last despite its score.
    assert [r.candidate.pid for r in ranking] == [6, 3, 5, 2, 4, 1, 7]
    assert ranking[0].tier == "expendable" and ranking[0].tier_reason == "declared"
    assert ranking[1].scores == {"a": 50.0, "tb": 5.0} and ranking[1].score == 50.0
    assert ranking[-1].vetoes == (Veto(plugin="p", reason="no"),)
    assert ranking.scorers == ("a", "tb")
    assert [c.pid for c in ranking.candidates] == [6, 3, 5, 2, 4, 1, 7]
    # In the order they came: what the group and rescue stages need looks up, never sorts.
    assert ranking.members == tuple(cands)
    assert list(ranking.killable()) == [1, 2, 3, 4, 5, 6]


def test_a_row_is_built_once_and_slices_are_lists() -> None:
    ranking = Ranking([cand(1), cand(2)], ["a"], [[1.0, 2.0]], [1.0, 2.0], {}, {}, "")
    first = ranking[0]
    assert ranking[0] is first and next(iter(ranking)) is first
    assert ranking[:1] == [first] and ranking.head(5) == (first, ranking[1])
    assert len(ranking) == 2 and ranking[-1].candidate.pid == 1
    assert isinstance(first, Ranked)
    assert "Ranking of 2" in repr(ranking)


def test_refuse_keeps_the_order_until_resort() -> None:
    ranking = Ranking([cand(1), cand(2), cand(3)], ["a"], [[3.0, 2.0, 1.0]], [3.0, 2.0, 1.0], {}, {}, "")
    walked = []
    for i, r in enumerate(ranking):
        walked.append(r.candidate.pid)
        if r.candidate.pid == 1:
            refused = ranking.refuse(i, Veto(plugin="oomkit", reason="changed"))
            assert refused.vetoes == (Veto(plugin="oomkit", reason="changed"),)
            assert refused is not r and r.vetoes == ()  # built again; the row read before is as it was
            assert ranking[i] is refused  # not moved yet: the walk goes on from i + 1
    assert walked == [1, 2, 3]
    ranking.resort()
    assert [r.candidate.pid for r in ranking] == [2, 3, 1]
    assert list(ranking.killable()) == [2, 3]
    assert [c.pid for c in ranking.members] == [1, 2, 3]


FREED_BY: dict[str, set[int]] = {}
"""For each kind of object the ranking holds, the threads that freed one."""


def _freed(kind: str) -> None:
    FREED_BY.setdefault(kind, set()).add(threading.get_ident())


class Column(list[float]):
    """A column that records which thread frees it."""

    def __del__(self) -> None:
        _freed("column")


class Name(str):
    """A candidate's name, a veto's or a tier's reason: freed with what holds it, and records
    which thread that was (a Candidate, a Veto take no ``__del__`` of their own)."""

    kind = ""

    def __new__(cls, text: str, kind: str) -> Name:
        self = super().__new__(cls, text)
        self.kind = kind
        return self

    def __del__(self) -> None:
        _freed(self.kind)


def _ranking(n: int) -> Ranking:
    # Built here, so that no local of the test holds on to any of it.
    cands = [Candidate(pid=p, name=Name(f"p{p}", "candidate"), start_ticks=p) for p in range(1, n + 1)]
    column, totals = Column(float(p) for p in range(n)), Column(float(p) for p in range(n))
    vetoes = {p: [Veto(plugin="v", reason=Name("no", "veto"))] for p in range(1, n + 1, 2)}
    tiers: dict[int, tuple[Tier, str]] = {p: ("expendable", Name("declared", "tier")) for p in range(2, n + 1, 2)}
    return Ranking(cands, ["a"], [column], totals, vetoes, tiers, "")


def test_parts_hand_everything_to_the_reaper_and_empty_the_ranking() -> None:
    # A ranking freed on the caller's thread (the event loop) is what the reaper is for: the
    # candidates, the columns, the vetoes and the tiers' reasons must all go in its thread.
    FREED_BY.clear()
    reaper = Reaper()
    ranking = _ranking(2000)
    assert ranking.head(3)[0].tier_reason == "declared"
    ranking.refuse(0, Veto(plugin="oomkit", reason=Name("changed", "veto")))
    caller = threading.get_ident()
    reaper.drop(ranking.parts())
    assert len(ranking) == 0 and list(ranking) == [] and ranking.candidates == ()
    assert not FREED_BY, f"freed by parts() on the caller: {sorted(FREED_BY)}"
    kinds = {"candidate", "column", "veto", "tier"}
    wait_for(lambda: kinds <= FREED_BY.keys() and reaper.reaped == 1, 30, "the reaper to free the ranking")
    thread = reaper._thread
    assert thread is not None
    assert FREED_BY == {kind: {thread.ident} for kind in kinds}
    assert caller not in FREED_BY["candidate"]
    reaper.close()


def test_an_empty_ranking() -> None:
    ranking = Ranking((), (), (), (), {}, {}, "")
    assert len(ranking) == 0 and ranking.head(10) == () and not ranking


def test_columns_and_totals_of_another_length_than_the_candidates_are_refused() -> None:
    cands = [cand(1), cand(2), cand(3)]
    with pytest.raises(ValueError, match=r"^Ranking: 3 candidates but totals has 2$"):
        Ranking(cands, ["a"], [[1.0, 2.0, 3.0]], [1.0, 2.0], {}, {}, "")
    with pytest.raises(ValueError, match=r"^Ranking: 3 candidates but column 'b' has 4$"):
        Ranking(cands, ["a", "b"], [[1.0, 2.0, 3.0], [1.0, 2.0, 3.0, 4.0]], [1.0, 2.0, 3.0], {}, {}, "b")
    with pytest.raises(ValueError, match=r"^Ranking: 3 candidates but totals has 4, column 'a' has 2$"):
        Ranking(cands, ["a"], [[1.0, 2.0]], [1.0, 2.0, 3.0, 4.0], {}, {}, "")
    with pytest.raises(ValueError, match=r"^Ranking: 2 scorer names but 1 columns$"):
        Ranking(cands, ["a", "b"], [[1.0, 2.0, 3.0]], [1.0, 2.0, 3.0], {}, {}, "")



class Made(NamedTuple):
    """A ranking and what it was made of."""

    ranking: Ranking
    cands: list[Candidate]
    totals: list[float]
    tb: list[float]
    vetoed: set[int]
    tiers: dict[int, tuple[Tier, str]]

    def want(self, refused: Collection[int] = ()) -> list[int]:
        """The order the Ranking documents, sorted whole, by its own key, with ``refused``
        vetoed as well."""
        order = {"expendable": 2, "normal": 1, "critical": 0}
        cands = self.cands

        def key(k: int) -> tuple[bool, int, float, float, int, int]:
            pid = cands[k].pid
            return (pid not in self.vetoed and pid not in refused, order[self.tiers.get(pid, ("normal", ""))[0]],
                    self.totals[k], self.tb[k], cands[k].rss_bytes, -pid)

        return [cands[k].pid for k in sorted(range(len(cands)), key=key, reverse=True)]


TIERS: list[Tier] = ["normal", "normal", "expendable", "critical"]


@st.composite
def _rankings(draw: st.DrawFn) -> Made:
    # Around the head's size: the order is put together from the head and the rest.
    n = draw(st.sampled_from([0, 1, HEAD - 1, HEAD, HEAD + 1, 2 * HEAD + 7, 5 * HEAD]))
    pids = draw(st.permutations(range(1, n + 1)))
    # Few distinct values: ties on the total, the tiebreak and RSS, down to the pid.
    values = st.sampled_from([0.0, 1.0, 2.5, 7.0])
    totals = [draw(values) for _ in range(n)]
    tb = [draw(values) for _ in range(n)]
    cands = [cand(p, rss=draw(st.sampled_from([1 << 20, 2 << 20]))) for p in pids]
    vetoed = {p for p in pids if draw(st.integers(0, 9)) == 0}
    tiers: dict[int, tuple[Tier, str]] = {}
    for p in pids:
        tier = draw(st.sampled_from(TIERS))
        if tier != "normal":
            tiers[p] = (tier, "why")
    ranking = Ranking(cands, ["a", "tb"], [totals, tb], totals, {p: [Veto(plugin="v", reason="no")] for p in vetoed},
                      tiers, "tb")
    return Made(ranking, cands, totals, tb, vetoed, tiers)


def _pids(rows: Iterable[Ranked]) -> list[int]:
    return [r.candidate.pid for r in rows]


@settings(max_examples=120, deadline=None)
@given(_rankings(), st.data())
def test_every_read_of_a_ranking_sees_the_one_whole_order(made: Made, data: st.DataObject) -> None:
    ranking, want = made.ranking, made.want()
    n = len(want)
    assert len(ranking) == n
    # Reads in any order: the head first, or past it first, or from the end.
    for _ in range(data.draw(st.integers(1, 6))):
        how = data.draw(st.sampled_from(["index", "negative", "slice", "head", "iter", "candidates", "killable",
                                         "members"]))
        if how == "index" and n:
            i = data.draw(st.integers(0, n - 1))
            assert ranking[i].candidate.pid == want[i]
        elif how == "negative" and n:
            i = data.draw(st.integers(-n, -1))
            assert ranking[i].candidate.pid == want[i]
        elif how == "slice":
            a, b = data.draw(st.integers(-n - 2, n + 2)), data.draw(st.integers(-n - 2, n + 2))
            step = data.draw(st.sampled_from([None, 1, 2, -1, -3]))
            assert _pids(ranking[a:b:step]) == want[a:b:step]
        elif how == "head":
            k = data.draw(st.integers(0, n + 3))
            assert _pids(ranking.head(k)) == want[:k]
        elif how == "iter":
            assert _pids(ranking) == want
        elif how == "candidates":
            assert [c.pid for c in ranking.candidates] == want
        elif how == "members":
            assert ranking.members == tuple(made.cands)
        else:
            assert list(ranking.killable()) == [c.pid for c in made.cands if c.pid not in made.vetoed]
    with pytest.raises(IndexError):
        ranking[n]
    with pytest.raises(IndexError):
        ranking[-n - 1]


@settings(max_examples=100, deadline=None)
@given(_rankings(), st.data())
def test_refusals_in_a_walk_past_the_head_keep_its_order_until_resort(made: Made, data: st.DataObject) -> None:
    ranking, want = made.ranking, made.want()
    # A walk that refuses rows as it goes (the engine's re-check), some of them past the head.
    refused = {p for p in want if data.draw(st.integers(0, 3)) == 0}
    walked = []
    for i, r in enumerate(ranking):
        walked.append(r.candidate.pid)
        if r.candidate.pid in refused:
            assert ranking.refuse(i, Veto(plugin="oomkit", reason="changed")).candidate.pid == r.candidate.pid
    assert walked == want
    assert _pids(ranking) == want  # not moved until resort
    ranking.resort()
    want_now = made.want(refused)
    assert _pids(ranking) == want_now
    assert [c.pid for c in ranking.candidates] == want_now
    assert list(ranking.killable()) == [c.pid for c in made.cands if c.pid not in made.vetoed | refused]


def _big(n: int = 4 * HEAD) -> Ranking:
    totals = [float(p) for p in range(1, n + 1)]
    return Ranking([cand(p) for p in range(1, n + 1)], ["a"], [totals], totals, {}, {}, "")


def test_an_iterator_walks_the_order_it_was_taken_in() -> None:
    # As a list iterator would: taken before a refusal and a resort, it walks the old order.
    ranking = _big()
    before = _pids(ranking)
    walk = iter(ranking)
    ranking.refuse(0, Veto(plugin="oomkit", reason="changed"))
    ranking.resort()
    assert _pids(walk) == before
    assert _pids(ranking) == before[1:] + before[:1]


def test_a_walk_with_refusals_in_the_head_does_not_sort_the_rest() -> None:
    # The point of the head (see oomkit.ranking): a decision that reads only the top, refusing
    # some of it at the re-check, never sorts all of a big ranking.
    ranking = _big()
    for _ in range(3):
        assert ranking.refuse(0, Veto(plugin="oomkit", reason="changed")).vetoes
        assert not ranking._sort.full
        ranking.resort()
        assert len(ranking.head(20)) == 20
        assert not ranking._sort.full
    assert [r.candidate.pid for r in ranking.head(3)] == [4 * HEAD - 3, 4 * HEAD - 4, 4 * HEAD - 5]


def test_the_group_and_rescue_stages_reads_do_not_sort_the_rest() -> None:
    ranking = _big()
    assert len(ranking.members) == 4 * HEAD and len(ranking.killable()) == 4 * HEAD
    assert not ranking._sort.full


@pytest.mark.parametrize("where", ["totals", "tiebreak"])
def test_a_nan_the_order_depends_on_is_refused_naming_it(where: str) -> None:
    n = 2 * HEAD
    totals = [float(p) for p in range(n)]
    tb = [0.0] * n
    (totals if where == "totals" else tb)[HEAD + 3] = math.nan
    cands = [cand(p) for p in range(1, n + 1)]
    what = "totals" if where == "totals" else "column 'tb'"
    with pytest.raises(ValueError, match=f"^Ranking: {what} is NaN for pid {HEAD + 4}$"):
        Ranking(cands, ["a", "tb"], [totals, tb], totals, {}, {}, "tb")


def test_nan_elsewhere_and_infinities_keep_one_order() -> None:
    # A shown-only column may hold NaN; +-inf sorts, and a sum of +inf and -inf is NaN but
    # no value is.
    n = 2 * HEAD
    totals = [float(p) for p in range(n)]
    totals[5], totals[HEAD + 9] = math.inf, -math.inf
    shown = [math.nan] * n
    ranking = Ranking([cand(p) for p in range(1, n + 1)], ["a", "shown"], [totals, shown], totals, {}, {}, "a")
    order = [r.candidate.pid for r in ranking]
    assert sorted(order) == list(range(1, n + 1)) and order[0] == 6 and order[-1] == HEAD + 10
