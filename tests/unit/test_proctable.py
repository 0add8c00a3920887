"""ProcessTable on fake /proc trees: what a warm ranking reads, and that it never offers a
process with another one's facts (the real-kernel side: tests/integration/test_proctable_kernel.py)."""

from __future__ import annotations

import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from oomkit import Candidate
from oomkit.procfs import list_pids, own_cgroup, read_process
from oomkit.proctable import FdBudget, ProcessTable
from oomkit.testing import FakeProc

from ..descriptors import descriptors_left


def naive(proc: FakeProc) -> dict[int, Candidate]:
    """Every file read afresh: what the table must always agree with."""
    out = {}
    for pid in list_pids(str(proc.path)):
        c = read_process(str(proc.path), pid, own_cgroup(str(proc.path), "memory", pid) or "", skip_kthreads=True)
        if c is not None:
            out[pid] = c
    return out


def ranked(table: ProcessTable, proc: FakeProc) -> dict[int, Candidate]:
    offered = table.offer(list_pids(str(proc.path)))
    assert len({c.pid for c in offered}) == len(offered)
    return {c.pid: c for c in offered}


def test_a_reused_pid_is_never_offered_with_the_old_process_facts(fake_proc: FakeProc) -> None:
    fake_proc.add_process(300, "old", uid=1000, oom_score_adj=0, memcg="/a", rss=1 << 20, start_ticks=100)
    table = ProcessTable(str(fake_proc.path), FdBudget(100), "memory")
    assert ranked(table, fake_proc)[300].uid == 1000
    fake_proc.remove_process(300)
    # Same pid, same start time even (a fake tree allows it): only the held descriptors,
    # emptied like procfs's fail, tell the two apart.
    fake_proc.add_process(300, "new", uid=2000, oom_score_adj=500, memcg="/b", rss=1 << 20, start_ticks=100)
    c = ranked(table, fake_proc)[300]
    assert (c.name, c.uid, c.oom_score_adj, c.cgroup) == ("new", 2000, 500, "/b")
    assert table.stats.reused == 1


def test_a_pid_rewritten_in_place_with_another_start_time_is_a_new_process(fake_proc: FakeProc) -> None:
    fake_proc.add_process(300, "old", uid=1000, memcg="/a", start_ticks=100)
    table = ProcessTable(str(fake_proc.path), FdBudget(100), "memory")
    ranked(table, fake_proc)
    fake_proc.add_process(300, "new", uid=2000, memcg="/b", start_ticks=200)
    c = ranked(table, fake_proc)[300]
    assert (c.uid, c.cgroup, c.start_ticks) == (2000, "/b", 200)


def test_adj_is_read_at_every_ranking_and_status_only_after_activity(fake_proc: FakeProc) -> None:
    fake_proc.add_process(300, "db", rss=1 << 20, pgtables=8192)
    table = ProcessTable(str(fake_proc.path), FdBudget(100), "memory")
    first = ranked(table, fake_proc)[300]
    assert ranked(table, fake_proc)[300] is first  # nothing changed: the same object again
    assert (table.stats.cold, table.stats.unchanged) == (1, 1)
    (fake_proc.path / "300" / "oom_score_adj").write_text("700\n")  # no fault: adj alone
    assert ranked(table, fake_proc)[300].oom_score_adj == 700
    assert (table.stats.changed, table.stats.status) == (1, 0)
    fake_proc.add_process(300, "db", rss=1 << 20, pgtables=3 << 12, oom_score_adj=700)
    assert ranked(table, fake_proc)[300].pgtables_bytes == 3 << 12
    assert table.stats.status == 1


def test_gone_processes_are_dropped_and_their_descriptors_given_back(fake_proc: FakeProc) -> None:
    for pid in (300, 301, 302):
        fake_proc.add_process(pid, "p")
    budget = FdBudget(100)
    table = ProcessTable(str(fake_proc.path), budget, None)
    ranked(table, fake_proc)
    assert (len(table), budget.held) == (3, 6)
    fake_proc.remove_process(301)
    assert set(ranked(table, fake_proc)) == {300, 302}
    assert (len(table), budget.held) == (2, 4)
    table.close()
    assert (len(table), budget.held) == (0, 0)


def test_a_table_dropped_without_close_gives_its_descriptors_back(fake_proc: FakeProc) -> None:
    fake_proc.add_process(300, "p")
    budget = FdBudget(100)
    table = ProcessTable(str(fake_proc.path), budget, None)
    ranked(table, fake_proc)
    assert budget.held == 2
    del table
    import gc

    gc.collect()
    assert budget.held == 0


def test_an_empty_budget_reads_by_path_and_still_agrees(fake_proc: FakeProc) -> None:
    for pid in (300, 301, 302):
        fake_proc.add_process(pid, "p", oom_score_adj=pid - 300)
    budget = FdBudget(3)  # one process and a half
    table = ProcessTable(str(fake_proc.path), budget, "memory")
    assert ranked(table, fake_proc) == naive(fake_proc)
    (fake_proc.path / "302" / "oom_score_adj").write_text("900\n")
    assert ranked(table, fake_proc) == naive(fake_proc)
    assert budget.held == 3 and table.stats.uncached > 0


_op = st.one_of(
    st.tuples(st.just("add"), st.integers(0, 11), st.integers(0, 3), st.integers(0, 40)),  # (pid, uid, rss MiB)
    st.tuples(st.just("remove"), st.integers(0, 11), st.just(0), st.just(0)),
    st.tuples(st.just("reuse"), st.integers(0, 11), st.integers(0, 3), st.integers(0, 40)),
    st.tuples(st.just("adj"), st.integers(0, 11), st.integers(-1000, 1000), st.just(0)),
    st.tuples(st.just("grow"), st.integers(0, 11), st.integers(0, 64), st.integers(0, 4)),  # page tables, swap
    st.tuples(st.just("rank"), st.just(0), st.just(0), st.just(0)),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(_op, max_size=40), budget=st.integers(0, 30))
def test_warm_rankings_equal_naive_full_reads_on_a_changing_tree(ops: list[tuple[str, int, int, int]], budget: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        proc = FakeProc(Path(tmp) / "proc")
        facts: dict[int, dict[str, int | str]] = {}
        starts = iter(range(1000, 10**6))
        table = ProcessTable(str(proc.path), FdBudget(budget), "memory")

        def write(pid: int) -> None:
            f = facts[pid]
            proc.add_process(pid, str(f["name"]), uid=int(f["uid"]), rss=int(f["rss"]), pgtables=int(f["pgt"]),
                             swap=int(f["swap"]), oom_score_adj=int(f["adj"]), memcg=str(f["memcg"]),
                             start_ticks=int(f["start"]), kthread=pid == 11)

        for op, i, a, b in ops:
            pid = 100 + i if i < 11 else 11
            if op in ("add", "reuse") and (op == "add") == (pid not in facts):
                if op == "reuse":
                    proc.remove_process(pid)
                facts[pid] = {"name": f"p{a}", "uid": 1000 * a, "rss": b << 20, "pgt": 0, "swap": 0, "adj": 0,
                              "memcg": f"/m{a}", "start": next(starts)}
                write(pid)
            elif pid in facts and op == "remove":
                proc.remove_process(pid)
                del facts[pid]
            elif pid in facts and op == "adj":
                facts[pid]["adj"] = a
                (proc.path / str(pid) / "oom_score_adj").write_text(f"{a}\n")
            elif pid in facts and op == "grow":
                facts[pid]["pgt"], facts[pid]["swap"] = a << 12, b << 12
                write(pid)
            elif op == "rank":
                assert ranked(table, proc) == naive(proc)
        assert ranked(table, proc) == naive(proc)
        table.close()


def test_a_process_that_moved_and_did_something_shows_its_new_cgroup(fake_proc: FakeProc) -> None:
    fake_proc.add_process(300, "db", memcg="/a", uid=1000)
    table = ProcessTable(str(fake_proc.path), FdBudget(100), "memory")
    assert ranked(table, fake_proc)[300].cgroup == "/a"
    (fake_proc.path / "300" / "cgroup").write_text("4:memory:/b\n0::/\n")
    assert ranked(table, fake_proc)[300].cgroup == "/a"  # no activity: kept (documented)
    fake_proc.add_process(300, "db", memcg="/b", uid=1000, rss=1 << 20)
    assert ranked(table, fake_proc)[300].cgroup == "/b"


def test_running_out_of_descriptors_gives_some_back_and_ranks_everyone(fake_proc: FakeProc) -> None:
    for pid in range(300, 340):
        fake_proc.add_process(pid, "p", oom_score_adj=pid - 300)
    expected = naive(fake_proc)
    budget = FdBudget(1000)  # believes it may hold every one of the 80
    table = ProcessTable(str(fake_proc.path), budget, "memory")
    with descriptors_left(12):
        first = ranked(table, fake_proc)
        second = ranked(table, fake_proc)
    assert first == expected and second == expected
    assert table.stats.emfile >= 1 and table.stats.unread == 0
    assert budget.limit < 12 and budget.held <= budget.limit


def test_a_process_that_cannot_be_read_for_want_of_descriptors_is_counted_and_read_later(fake_proc: FakeProc) -> None:
    for pid in range(300, 305):
        fake_proc.add_process(pid, "p")
    expected = naive(fake_proc)
    table = ProcessTable(str(fake_proc.path), FdBudget(1000), "memory")
    pids = list_pids(str(fake_proc.path))  # listing takes a descriptor too
    with descriptors_left(0):
        assert table.offer(pids) == []
    # One look for something to give back, which found nothing: the others were not each
    # another pass over the table (that made a ranking out of descriptors quadratic).
    assert table.stats.unread == 5 and table.stats.emfile == 1
    assert ranked(table, fake_proc) == expected


def test_the_table_adds_nothing_for_the_cyclic_collector_to_walk(fake_proc: FakeProc) -> None:
    import gc

    for pid in range(400, 700):
        fake_proc.add_process(pid, f"p{pid}", rss=1 << 20)
    table = ProcessTable(str(fake_proc.path), FdBudget(1000), "memory")
    ranked(table, fake_proc)
    ranked(table, fake_proc)  # warm: every row kept
    gc.collect()
    rows = list(table._box[0].values())
    assert len(rows) >= 300
    assert not any(gc.is_tracked(r) for r in rows)
    table.close()
