"""The ranking's order and its rows built on demand (oomkit.ranking)."""

from __future__ import annotations

import weakref

from oomkit import Candidate, Ranked, Ranking, Veto
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
    assert list(ranking.killable()) == [6, 3, 5, 2, 4, 1]


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
            assert ranking[i] is refused  # not moved yet: the walk goes on from i + 1
    assert walked == [1, 2, 3]
    ranking.resort()
    assert [r.candidate.pid for r in ranking] == [2, 3, 1]
    assert list(ranking.killable()) == [2, 3]


class Column(list[float]):
    """A column that can be watched for being freed (a list subclass takes weak references)."""


def test_parts_hand_everything_to_the_reaper_and_empty_the_ranking() -> None:
    reaper = Reaper()
    column = Column(float(p) for p in range(2000))
    ref = weakref.ref(column)
    ranking = Ranking([cand(p) for p in range(1, 2001)], ["a"], [column], column, {}, {}, "")
    ranking.head(3)
    del column
    reaper.drop(ranking.parts())
    assert len(ranking) == 0 and list(ranking) == [] and ranking.candidates == ()
    wait_for(lambda: ref() is None, 30, "the reaper to free the ranking's columns")
    wait_for(lambda: reaper.reaped == 1, 30, "the reaper to count it")
    reaper.close()


def test_an_empty_ranking() -> None:
    ranking = Ranking((), (), (), (), {}, {}, "")
    assert len(ranking) == 0 and ranking.head(10) == () and not ranking
