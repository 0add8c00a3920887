"""CmdlineReader on a fake /proc: a stuck read (a FIFO no one writes, as blocking as a
cmdline behind a held mmap lock) holds up neither the other reads nor more threads."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from oomkit import Candidate
from oomkit.cmdline import CmdlineReader
from oomkit.testing import FakeProc


def cand(pid: int, start: int = 100) -> Candidate:
    return Candidate(pid=pid, name="p", start_ticks=start)


@pytest.fixture
def stuck(fake_proc: FakeProc) -> Iterator[int]:
    """Pid 66, whose cmdline read blocks until the test ends."""
    fake_proc.add_process(66, "stuck")
    path = fake_proc.root / "66" / "cmdline"
    path.unlink()
    os.mkfifo(path)
    yield 66
    release(path)


def release(path: Path) -> None:
    """Unblock whoever reads the FIFO at ``path`` (end of file), and every later reader (a
    plain file takes its place)."""
    fd = os.open(path, os.O_RDWR)  # a writer: readers blocked in open() go on to read()
    path.unlink()
    path.write_bytes(b"")
    os.close(fd)  # the last writer gone: those reads see end of file


def eventually(check: object, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_reads_and_caches_by_pid_and_start_time(fake_proc: FakeProc) -> None:
    fake_proc.add_process(10, "a", cmdline=("/bin/a", "--x"))
    fake_proc.add_process(11, "b", cmdline=("b",))
    reader = CmdlineReader(str(fake_proc.root))
    assert reader.get([cand(10), cand(11), cand(12)], timeout=30) == {10: ("/bin/a", "--x"), 11: ("b",), 12: None}
    (fake_proc.root / "10" / "cmdline").write_bytes(b"/bin/changed\0")
    assert reader.get([cand(10)], timeout=30) == {10: ("/bin/a", "--x")}  # cached
    assert reader.get([cand(10, start=200)], timeout=30) == {10: ("/bin/changed",)}  # a reused pid


def test_a_stuck_read_holds_up_neither_the_others_nor_more_threads(fake_proc: FakeProc, stuck: int) -> None:
    for pid in range(20, 30):
        fake_proc.add_process(pid, f"p{pid}", cmdline=(f"/bin/p{pid}",))
    reader = CmdlineReader(str(fake_proc.root), max_workers=2, stall_s=0.05)
    cands = [cand(stuck)] + [cand(pid) for pid in range(20, 30)]
    # The stuck pid comes first: its worker blocks; the stall is seen and a fresh worker
    # reads the rest, whatever the number of decisions asking meanwhile.
    found: dict[int, object] = {}

    def all_but_stuck() -> bool:
        found.update(reader.get(cands, timeout=0.01))
        return set(found) == set(range(20, 30))

    eventually(all_but_stuck)
    assert stuck not in found and reader.stalled == [stuck]
    for _ in range(100):
        reader.get(cands, timeout=0.001)
    assert reader.threads <= 2


def test_a_machine_full_of_stuck_reads_costs_at_most_max_workers_threads(fake_proc: FakeProc) -> None:
    fifos = []
    for pid in range(40, 46):
        fake_proc.add_process(pid, "stuck")
        path = fake_proc.root / str(pid) / "cmdline"
        path.unlink()
        os.mkfifo(path)
        fifos.append(path)
    reader = CmdlineReader(str(fake_proc.root), max_workers=3, stall_s=0.01)
    try:
        cands = [cand(pid) for pid in range(40, 46)]
        for _ in range(50):
            assert reader.get(cands, timeout=0.002) == {}
            time.sleep(0.002)
        assert reader.threads == 3
    finally:
        for path in fifos:
            release(path)
    eventually(lambda: reader.threads == 0)
