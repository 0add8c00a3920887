"""The memory history on fake trees: which scopes it samples, what it keeps, what it bounds."""

from __future__ import annotations

import os
import threading

import msgspec
import pytest

from oomkit.config import Config, HistoryConfig
from oomkit.events import SYSTEM, Candidate, Member, Scope
from oomkit import urgency
from oomkit.history import History, _Ring, _ScopeState
from oomkit.procfs import read_process
from oomkit.records import MemorySample
from oomkit.testing import FakeCgroups, FakeProc, config_for

MiB = 1 << 20
S = 1_000_000_000
HZ = os.sysconf("SC_CLK_TCK")
JOBS = Scope("v1", "/jobs")


def config(proc: FakeProc, cgroups: FakeCgroups, **history: object) -> Config:
    return msgspec.structs.replace(config_for(proc, cgroups), history=HistoryConfig(**history))  # type: ignore[arg-type]


def cand(proc: FakeProc, pid: int) -> Candidate:
    c = read_process(proc.path, pid)
    assert c is not None
    return c


def test_a_small_scope_is_sampled_and_a_process_keeps_its_samples(fake_proc: FakeProc, fake_cgroups: FakeCgroups) -> None:
    fake_cgroups.mkdir_v1("/jobs", limit=256 * MiB, usage=10 * MiB, pids=(10, 11))
    fake_proc.add_process(10, "a", rss=10 * MiB)
    fake_proc.add_process(11, "b", rss=20 * MiB)
    h = History(config(fake_proc, fake_cgroups), lambda: [JOBS])
    t0 = 100 * S
    for i in range(5):
        fake_proc.add_process(10, "a", rss=(10 + i) * MiB)
        assert h.tick(t0 + i * S // 4) == 2
    got = h.of(cand(fake_proc, 10), now_ns=t0 + S)
    assert got is not None
    assert got.rss_bytes == tuple((10 + i) * MiB for i in range(5))
    assert got.times_ns == tuple(t0 + i * S // 4 for i in range(5))
    assert h.sampled  # the scope is known
    assert h.limit_bytes(JOBS) == 256 * MiB


def test_the_window_drops_old_samples(fake_proc: FakeProc, fake_cgroups: FakeCgroups) -> None:
    fake_cgroups.mkdir_v1("/jobs", limit=256 * MiB, pids=(10,))
    fake_proc.add_process(10, "a", rss=MiB)
    h = History(config(fake_proc, fake_cgroups, window_s=1.0, interval_s=0.25), lambda: [JOBS])
    for i in range(20):
        h.tick(100 * S + i * S // 4)
    got = h.of(cand(fake_proc, 10), now_ns=100 * S + 19 * S // 4)
    assert got is not None and 4 <= len(got.times_ns) <= 5  # one second of quarter-second ticks


def test_a_big_cold_scope_costs_no_process_reads_and_keeps_nothing(fake_proc: FakeProc, fake_cgroups: FakeCgroups) -> None:
    pids = tuple(range(100, 150))
    fake_cgroups.mkdir_v1("/jobs", limit=1024 * MiB, usage=100 * MiB, pids=pids)
    for pid in pids:
        fake_proc.add_process(pid, "w", rss=MiB)
    h = History(config(fake_proc, fake_cgroups), lambda: [JOBS])
    assert h.tick(S) == 0
    assert list(h.processes()) == []
    # Warm by usage: 60 % of the limit is above the default half.
    (fake_cgroups.memory_v1 / "jobs" / "memory.usage_in_bytes").write_text(f"{600 * MiB}\n")
    assert h.tick(2 * S) == 50
    # Cold again: everything kept for it goes.
    (fake_cgroups.memory_v1 / "jobs" / "memory.usage_in_bytes").write_text(f"{100 * MiB}\n")
    assert h.tick(3 * S) == 0
    assert list(h.processes()) == []


def test_small_scopes_can_be_left_cold(fake_proc: FakeProc, fake_cgroups: FakeCgroups) -> None:
    fake_cgroups.mkdir_v1("/jobs", limit=1024 * MiB, usage=0, pids=(10,))
    fake_proc.add_process(10, "a", rss=MiB)
    h = History(config(fake_proc, fake_cgroups, small_scopes=False), lambda: [JOBS])
    assert h.tick(S) == 0


def test_an_event_warms_a_scope_for_a_while_and_the_system_only_so(fake_proc: FakeProc, fake_cgroups: FakeCgroups) -> None:
    fake_proc.add_process(10, "a", rss=MiB)
    fake_proc.add_process(11, "b", rss=MiB)
    h = History(config(fake_proc, fake_cgroups, warm_hold_s=5.0))
    assert h.tick(S) == 0
    h.touch(SYSTEM, "pressure-cleared", S)  # not a warming kind
    assert h.tick(S) == 0
    h.touch(SYSTEM, "low-memory", S)
    assert h.tick(2 * S) == 2
    assert h.tick(7 * S) == 0  # the hold ran out


def test_a_reused_pid_is_a_new_process(fake_proc: FakeProc, fake_cgroups: FakeCgroups) -> None:
    fake_cgroups.mkdir_v1("/jobs", limit=256 * MiB, pids=(10,))
    fake_proc.add_process(10, "old", rss=100 * MiB, start_ticks=1000)
    h = History(config(fake_proc, fake_cgroups), lambda: [JOBS])
    h.tick(S)
    old = cand(fake_proc, 10)
    fake_proc.add_process(10, "new", rss=MiB, start_ticks=5000)
    h.tick(S + S // 4)
    assert h.of(old, now_ns=2 * S) is None
    got = h.of(cand(fake_proc, 10), now_ns=2 * S)
    assert got is not None and got.rss_bytes == (MiB,)


def test_exited_processes_are_forgotten(fake_proc: FakeProc, fake_cgroups: FakeCgroups) -> None:
    d = fake_cgroups.mkdir_v1("/jobs", limit=256 * MiB, pids=(10, 11))
    fake_proc.add_process(10, "a")
    fake_proc.add_process(11, "b")
    h = History(config(fake_proc, fake_cgroups), lambda: [JOBS])
    h.tick(S)
    fake_proc.remove_process(11)
    fake_cgroups.set_procs(d, (10,))
    h.tick(2 * S)
    assert [pid for _, pid in h.processes()] == [10]


def test_tracking_is_bounded_per_scope_and_counted(fake_proc: FakeProc, fake_cgroups: FakeCgroups) -> None:
    pids = tuple(range(100, 110))
    fake_cgroups.mkdir_v1("/jobs", limit=256 * MiB, pids=pids)
    for pid in pids:
        fake_proc.add_process(pid, "w")
    h = History(config(fake_proc, fake_cgroups, max_processes=4), lambda: [JOBS])
    h.tick(S)
    assert len(list(h.processes())) == 4
    assert h.stats.untracked == 6


def test_one_tick_reads_at_most_its_budget_and_the_next_goes_on(fake_proc: FakeProc, fake_cgroups: FakeCgroups) -> None:
    pids = tuple(range(100, 110))
    fake_cgroups.mkdir_v1("/jobs", limit=256 * MiB, pids=pids)
    for pid in pids:
        fake_proc.add_process(pid, "w")
    h = History(config(fake_proc, fake_cgroups, tick_budget=4), lambda: [JOBS])
    assert [h.tick(i * S) for i in range(1, 5)] == [4, 4, 2, 4]
    assert len(list(h.processes())) == 10


def test_a_subtree_is_sampled_whole(fake_proc: FakeProc, fake_cgroups: FakeCgroups) -> None:
    fake_cgroups.mkdir_v1("/jobs", limit=256 * MiB, pids=(10,))
    fake_cgroups.mkdir_v1("/jobs/child", pids=(11,))
    fake_proc.add_process(10, "a")
    fake_proc.add_process(11, "b")
    h = History(config(fake_proc, fake_cgroups), lambda: [JOBS])
    assert h.tick(S) == 2


def test_a_vanished_scope_is_a_counted_fault_not_an_error(fake_proc: FakeProc, fake_cgroups: FakeCgroups) -> None:
    h = History(config(fake_proc, fake_cgroups), lambda: [Scope("v1", "/gone")])
    assert h.tick(S) == 0
    assert h.stats.faults == 1


def test_start_times_come_from_uptime(fake_proc: FakeProc, fake_cgroups: FakeCgroups) -> None:
    fake_proc.set_uptime(1000.0)
    h = History(config(fake_proc, fake_cgroups))
    # A process started 10 s before "now" (boot + 990 s).
    started = h.started_ns(990 * HZ)
    import time

    assert abs((time.monotonic_ns() - started) - 10 * S) < 2 * S


def test_disabled_history_never_samples(fake_proc: FakeProc, fake_cgroups: FakeCgroups) -> None:
    import anyio

    h = History(config(fake_proc, fake_cgroups, enabled=False), lambda: [JOBS])
    anyio.run(h.run)  # returns at once
    assert h.stats.ticks == 0


def test_kept_stat_files_are_bounded_and_closed_with_their_processes(fake_proc: FakeProc, fake_cgroups: FakeCgroups) -> None:
    pids = tuple(range(100, 105))
    d = fake_cgroups.mkdir_v1("/jobs", limit=256 * MiB, usage=200 * MiB, pids=pids)
    for pid in pids:
        fake_proc.add_process(pid, "w", rss=MiB)
    h = History(config(fake_proc, fake_cgroups, open_files=2), lambda: [JOBS])
    assert h.tick(S) == 5 and h.tick(2 * S) == 5
    assert h._open == 2  # the other three are read with open, read, close
    fake_cgroups.set_procs(d, pids[2:])
    h.tick(3 * S)
    assert len(list(h.processes())) == 3
    (d / "memory.usage_in_bytes").write_text("0\n")
    fake_cgroups.set_procs(d, tuple(range(200, 300)))  # big and cold now: nothing kept
    h.tick(4 * S)
    assert h._open == 0 and list(h.processes()) == []
    h.close()


def test_the_system_scope_is_sampled_while_most_of_ram_is_used(fake_proc: FakeProc, fake_cgroups: FakeCgroups) -> None:
    fake_proc.add_process(10, "a", rss=MiB)
    fake_proc.set_meminfo(mem_total=8 << 30, mem_available=4 << 30)
    h = History(config(fake_proc, fake_cgroups), lambda: [SYSTEM])
    assert h.tick(S) == 0  # half used: cold
    fake_proc.set_meminfo(mem_total=8 << 30, mem_available=1 << 30)
    assert h.tick(2 * S) == 1


# --- memory samples: what the sampler sums up per scope and tick --------------------------------


def test_each_tick_sums_up_each_sampled_scope_in_a_memory_sample(fake_proc: FakeProc, fake_cgroups: FakeCgroups) -> None:
    fake_cgroups.mkdir_v1("/jobs", limit=256 * MiB, usage=200 * MiB, pids=tuple(range(10, 20)))
    for pid in range(10, 20):
        fake_proc.add_process(pid, f"w{pid}", rss=(pid - 9) * MiB)
    got: list[object] = []
    h = History(config(fake_proc, fake_cgroups), lambda: [JOBS], on_sample=got.append)
    h.tick(100 * S)
    assert got == [], "handed over on deliver(), on the loop's side"
    assert h.deliver() == 1
    (sample,) = got
    assert isinstance(sample, MemorySample)
    assert (sample.scope, sample.monotonic_ns, sample.usage_bytes, sample.limit_bytes) == (JOBS, 100 * S, 200 * MiB, 256 * MiB)
    assert sample.warm, "200 of 256 MiB is past warm_fraction"
    assert sample.processes == 10 and sample.rss_bytes == sum(range(1, 11)) * MiB
    assert [(p.pid, p.name, p.rss_bytes) for p in sample.top[:2]] == [(19, "w19", 10 * MiB), (18, "w18", 9 * MiB)]
    assert len(sample.top) == 8, "the largest eight"
    assert msgspec.json.decode(msgspec.json.encode(sample), type=MemorySample) == sample


def test_a_cold_small_scope_is_sampled_as_cold_and_nothing_is_built_unless_someone_listens(
    fake_proc: FakeProc, fake_cgroups: FakeCgroups
) -> None:
    fake_cgroups.mkdir_v1("/jobs", limit=256 * MiB, usage=10 * MiB, pids=(10,))
    fake_proc.add_process(10, "a", rss=10 * MiB)
    h = History(config(fake_proc, fake_cgroups), lambda: [JOBS])
    h.tick(100 * S)
    (sample,) = h.take_samples()
    assert not sample.warm and sample.processes == 1
    listening = False
    quiet = History(config(fake_proc, fake_cgroups), lambda: [JOBS], want_samples=lambda: listening)
    quiet.tick(100 * S)
    assert quiet.take_samples() == []
    listening = True
    quiet.tick(101 * S)
    assert len(quiet.take_samples()) == 1


def test_samples_waiting_for_the_loop_are_bounded(fake_proc: FakeProc, fake_cgroups: FakeCgroups) -> None:
    fake_cgroups.mkdir_v1("/jobs", limit=256 * MiB, usage=10 * MiB, pids=(10,))
    fake_proc.add_process(10, "a", rss=10 * MiB)
    h = History(config(fake_proc, fake_cgroups), lambda: [JOBS])
    for i in range(300):
        h.tick(100 * S + i * S // 4)
    kept = h.take_samples()
    assert len(kept) == 256 and kept[-1].monotonic_ns == 100 * S + 299 * S // 4, "the oldest went"


def test_history_answers_thin_to_the_points_asked_keeping_both_ends(fake_proc: FakeProc, fake_cgroups: FakeCgroups) -> None:
    fake_cgroups.mkdir_v1("/jobs", limit=256 * MiB, usage=10 * MiB, pids=(10,))
    h = History(config(fake_proc, fake_cgroups), lambda: [JOBS])
    t0 = 100 * S
    for i in range(30):
        fake_proc.add_process(10, "a", rss=(1 + i) * MiB)
        h.tick(t0 + i * S // 4)
    now = t0 + 29 * S // 4
    for points in (1, 2, 4, 7, 29, 30, 500):
        (p,) = h.scope_history(JOBS, points=points, now_ns=now).history
        assert len(p.rss_bytes) == min(points, 30) == len(p.times_ns)
        assert p.rss_bytes[-1] == 30 * MiB and list(p.times_ns) == sorted(set(p.times_ns))
        if points > 1:
            assert p.rss_bytes[0] == MiB


def test_a_v2_scope_is_warm_relative_to_its_brake(fake_proc: FakeProc, fake_cgroups: FakeCgroups) -> None:
    pids = tuple(range(100, 150))  # too many to be a small scope
    d = fake_cgroups.mkdir_v2("/pod", pids=pids)
    for pid in pids:
        fake_proc.add_process(pid, "w", rss=MiB)
    FakeCgroups.set_memory(d, max=100 * MiB, current=40 * MiB)
    h = History(config(fake_proc, fake_cgroups), lambda: [Scope("v2", "/pod")])
    assert h.tick(S) == 0  # 40 % of memory.max: cold
    FakeCgroups.set_memory(d, high=60 * MiB)  # braked: 67 % of where the kernel throttles
    assert h.tick(2 * S) == 50
    assert h.limit_bytes(Scope("v2", "/pod")) == 60 * MiB


def test_a_process_renamed_after_its_first_sample_is_named_by_its_new_comm(
    fake_proc: FakeProc, fake_cgroups: FakeCgroups
) -> None:
    fake_cgroups.mkdir_v1("/jobs", limit=256 * MiB, usage=10 * MiB, pids=(10,))
    fake_proc.add_process(10, "python3", rss=10 * MiB, start_ticks=50)
    h = History(config(fake_proc, fake_cgroups), lambda: [JOBS])
    h.tick(100 * S)
    fake_proc.add_process(10, "leak", rss=11 * MiB, start_ticks=50)  # its exec or prctl, same process
    h.tick(101 * S)
    (first, second) = h.take_samples()
    assert first.top[0].name == "python3" and second.top[0].name == "leak"
    (p,) = h.scope_history(JOBS, now_ns=101 * S).history
    assert p.name == "leak" and len(p.rss_bytes) == 2, "the same process: its history goes on"


def test_of_all_answers_as_of_does_for_each_candidate(fake_proc: FakeProc, fake_cgroups: FakeCgroups) -> None:
    fake_cgroups.mkdir_v1("/jobs", limit=256 * MiB, pids=(10, 11))
    fake_proc.add_process(10, "a", rss=10 * MiB, start_ticks=1000)
    fake_proc.add_process(11, "b", rss=20 * MiB, start_ticks=1000)
    h = History(config(fake_proc, fake_cgroups), lambda: [JOBS])
    never = Candidate(pid=12, name="c", start_ticks=1000)
    unit = Candidate(pid=10, name="u", unit="process-group", pgid=10, start_ticks=1000,
                     members=(Member(pid=10, start_ticks=1000), Member(pid=11, start_ticks=1000)))
    reused = msgspec.structs.replace(cand(fake_proc, 11), start_ticks=7)
    cands = [cand(fake_proc, 10), never, unit, reused, cand(fake_proc, 11)]
    assert h.of_all(cands, 2 * S) == [None] * 5  # nothing tracked yet
    for i in range(4):
        h.tick(S + i * S // 4)
    got = h.of_all(cands, 2 * S, tree="v1")
    assert got == [h.of(c, 2 * S, tree="v1") for c in cands]
    assert got[0] is not None and got[2] is not None and got[4] is not None
    assert got[1] is None and got[3] is None
    assert got[2].rss_bytes == tuple(a + b for a, b in zip(got[0].rss_bytes, got[4].rss_bytes))


class _CountingLock:
    """A lock that counts what was looked up under each hold of it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.held = False
        self.holds: list[int] = []  # lookups under each hold, in order

    def __enter__(self) -> None:
        self._lock.acquire()
        self.held = True
        self.holds.append(0)

    def __exit__(self, *exc: object) -> None:
        self.held = False
        self._lock.release()


def test_of_all_lets_the_lock_go_between_chunks_and_builds_samples_outside_it(
    fake_proc: FakeProc, fake_cgroups: FakeCgroups, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The sampler's tick (on the event loop by default) takes the same lock: it must not
    # wait behind a whole ranking, only behind one chunk of it.
    h = History(config(fake_proc, fake_cgroups), lambda: [JOBS])
    n = 600
    tracks: dict[int, _Ring] = {}
    for pid in range(1, n + 1):
        ring = tracks[pid] = _Ring(1000, h._cap)
        ring.add(S, 100)
    h._states[JOBS] = _ScopeState(tracks=tracks, pids=list(tracks))
    lock = h._lock = _CountingLock()  # type: ignore[assignment]
    pairs = h._pairs

    def counted_pairs(pid: int, start_ticks: int, since: int) -> object:
        assert lock.held
        lock.holds[-1] += 1
        return pairs(pid, start_ticks, since)

    boot_read_held: list[bool] = []
    checkpoints_held: list[bool] = []
    monkeypatch.setattr(h, "_pairs", counted_pairs)
    monkeypatch.setattr(h, "_read_boot_offset", lambda: boot_read_held.append(lock.held) or 0)
    monkeypatch.setattr(urgency, "checkpoint", lambda: checkpoints_held.append(lock.held))
    cands = [Candidate(pid=pid, name="x", start_ticks=1000) for pid in range(1, n + 1)]
    got = h.of_all(cands, 2 * S)
    assert all(s is not None and s.times_ns == (S,) for s in got)
    looked_up = [k for k in lock.holds if k]
    assert sum(looked_up) == n
    assert len(looked_up) == 3 and max(looked_up) <= 256, lock.holds  # 256 + 256 + 88
    assert boot_read_held == [False], "the first read of /proc/uptime is not made under the lock"
    assert len(checkpoints_held) >= 3 and not any(checkpoints_held), "a checkpoint between chunks, lock let go"


def test_of_all_takes_the_lock_once_and_looks_nothing_up_while_nothing_is_tracked(
    fake_proc: FakeProc, fake_cgroups: FakeCgroups
) -> None:
    h = History(config(fake_proc, fake_cgroups), lambda: [JOBS])
    lock = h._lock = _CountingLock()  # type: ignore[assignment]
    assert h.of_all([Candidate(pid=pid, name="x", start_ticks=1) for pid in range(1, 1000)]) == [None] * 999
    assert lock.holds == [0]
