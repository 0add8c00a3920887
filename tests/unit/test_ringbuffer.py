"""Ring-buffer pages: real ones recorded on this machine (tests/record_tracefs.py), and
synthetic ones for what a quiet machine rarely writes (time stamps, discarded events,
truncated and malformed records)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from oomkit.kmsg import parse_kill
from oomkit.ringbuffer import MISSED_EVENTS, MISSED_STORED, Batch, PageParser, ReadCpu
from oomkit.tracefs import EventFormat, parse_event_header, parse_format, parse_page_header

DATA = Path(__file__).parents[1] / "data" / "tracefs" / "6.18"
PAGE = 4096


def parser() -> PageParser:
    return PageParser(parse_page_header((DATA / "header_page").read_text()),
                      parse_event_header((DATA / "header_event").read_text()))


def fmt(system: str, event: str) -> EventFormat:
    return parse_format((DATA / system / event / "format").read_text(), system=system)


def recorded(name: str) -> tuple[bytes, dict]:  # type: ignore[type-arg]
    return (DATA / f"{name}.bin").read_bytes(), json.loads((DATA / f"{name}.json").read_text())


def decode_pages(data: bytes) -> Batch:
    out = Batch()
    p = parser()
    for off in range(0, len(data), PAGE):
        p.page_events(data[off : off + PAGE], out)
    return out


def assert_matches_kmsg(rec: dict[str, int | str], line: str) -> None:
    """A decoded mark_victim against the kernel's own "Killed process" line for that kill."""
    kill = parse_kill(line)
    assert kill is not None
    assert (rec["pid"], rec["comm"]) == (kill.pid, kill.comm)
    f = kill.fields
    assert (rec["total_vm"], rec["anon_rss"], rec["file_rss"], rec["shmem_rss"], rec["pgtables"]) == (
        f["total_vm"], f["anon_rss"], f["file_rss"], f["shmem_rss"], f["pgtables"])
    assert (rec["uid"], rec["oom_score_adj"]) == (f["uid"], f["oom_score_adj"])


# --- recorded pages ----------------------------------------------------------------------------


def test_recorded_mapped_page_holds_the_kill() -> None:
    data, meta = recorded("kill-mmap")
    batch = decode_pages(data)
    assert batch.rejected == [] and len(batch.events) == 1
    rec = fmt("oom", "mark_victim").decode(batch.events[0].payload)
    assert rec["pid"] == meta["pids"][0]
    assert_matches_kmsg(rec, meta["kmsg"][0])


def test_recorded_read_pages_through_read_cpu(tmp_path: Path) -> None:
    data, meta = recorded("kills-read")
    # A regular file of pages reads like trace_pipe_raw: one sub-buffer per read, then EOF.
    (tmp_path / "trace_pipe_raw").write_bytes(data)
    r = ReadCpu(tmp_path / "trace_pipe_raw", 0, parser())
    try:
        batch = r.read()
    finally:
        r.close()
    assert (batch.pages, batch.lost, batch.rejected) == (meta["pages"], 0, [])
    f = fmt("oom", "mark_victim")
    recs = {rec["pid"]: rec for rec in (f.decode(e.payload) for e in batch.events)}
    assert sorted(recs) == sorted(meta["pids"])
    for line in meta["kmsg"]:
        kill = parse_kill(line)
        assert kill is not None
        assert_matches_kmsg(recs[kill.pid], line)


def test_recorded_time_extend() -> None:
    data, meta = recorded("marker-extend")
    batch = decode_pages(data)
    f = fmt("ftrace", "print")
    assert [str(f.decode(e.payload)["buf"]).strip() for e in batch.events] == meta["texts"]
    gap = batch.events[1].ts - batch.events[0].ts
    # 27 bits of delta hold 134 ms: a gap of 300 ms is only right if the extend was applied.
    assert gap >= meta["min_gap_ns"] > 1 << 27
    assert gap < 10 * meta["min_gap_ns"]


def test_recorded_lost_events_are_counted(tmp_path: Path) -> None:
    data, meta = recorded("marker-lost")
    (tmp_path / "trace_pipe_raw").write_bytes(data)
    r = ReadCpu(tmp_path / "trace_pipe_raw", 0, parser())
    try:
        batch = r.read()
    finally:
        r.close()
    f = fmt("ftrace", "print")
    texts = [str(f.decode(e.payload)["buf"]).strip() for e in batch.events]
    numbers = [int(t.split()[1]) for t in texts]
    assert numbers == sorted(numbers) and len(set(numbers)) == len(numbers)
    assert batch.lost > 0 and batch.rejected == []
    # Every write is either read or counted lost.
    assert len(batch.events) + batch.lost == meta["written"]


# --- synthetic pages ---------------------------------------------------------------------------


def word(type_len: int, delta: int = 0) -> bytes:
    return (type_len | delta << 5).to_bytes(4, "little")


def data_event(payload: bytes, delta: int = 0, *, long: bool = False) -> bytes:
    payload += bytes(-len(payload) % 4)
    if len(payload) > 112 or long:
        return word(0, delta) + (len(payload) + 4).to_bytes(4, "little") + payload
    return word(len(payload) // 4, delta) + payload


def extend(delta: int) -> bytes:
    return word(30, delta & ((1 << 27) - 1)) + (delta >> 27).to_bytes(4, "little")


def stamp(ts: int) -> bytes:
    return word(31, ts & ((1 << 27) - 1)) + (ts >> 27).to_bytes(4, "little")


def discarded(n: int, delta: int = 1) -> bytes:
    return word(29, delta) + (n - 4).to_bytes(4, "little") + bytes(n - 8)


def page(data: bytes, ts: int = 1_000_000, *, commit: int | None = None, flags: int = 0,
         lost: int | None = None) -> bytes:
    size = len(data) if commit is None else commit
    tail = b""
    if lost is not None:
        flags |= MISSED_EVENTS | MISSED_STORED
        tail = lost.to_bytes(8, "little")
    buf = ts.to_bytes(8, "little") + (size | flags).to_bytes(8, "little") + data + tail
    return buf + bytes(PAGE - len(buf))


def victim(pid: int, comm: bytes = b"hog\0") -> bytes:
    f = fmt("oom", "mark_victim")
    rec = bytearray(66)
    rec[0:2] = f.id.to_bytes(2, "little")
    rec[8:12] = pid.to_bytes(4, "little")
    rec[12:16] = (66 | len(comm) << 16).to_bytes(4, "little")
    return bytes(rec) + comm


def run(buf: bytes) -> Batch:
    out = Batch()
    parser().page_events(buf, out)
    return out


def pids(batch: Batch) -> list[int]:
    f = fmt("oom", "mark_victim")
    return [int(f.decode(e.payload)["pid"]) for e in batch.events]


def test_deltas_extends_and_absolute_stamps() -> None:
    buf = page(data_event(victim(1), 10) + extend(5 << 30) + data_event(victim(2))
               + stamp(77 << 32) + data_event(victim(3), 3), ts=1000)
    batch = run(buf)
    assert pids(batch) == [1, 2, 3] and batch.rejected == []
    assert [e.ts for e in batch.events] == [1010, 1010 + (5 << 30), (77 << 32) + 3]


def test_long_event_with_a_length_word() -> None:
    batch = run(page(data_event(victim(5, b"x" * 90 + b"\0"), long=True) + data_event(victim(6))))
    assert pids(batch) == [5, 6] and batch.rejected == []
    assert fmt("oom", "mark_victim").decode(batch.events[0].payload)["comm"] == "x" * 90


def test_discarded_events_are_skipped_and_null_padding_ends_the_page() -> None:
    batch = run(page(data_event(victim(1)) + discarded(24) + data_event(victim(2)) + word(29, 0)
                     + data_event(victim(99))))
    assert pids(batch) == [1, 2] and batch.rejected == []


def test_stored_lost_count() -> None:
    out = Batch()
    missed, stored = parser().page_events(page(data_event(victim(1)), lost=12), out)
    assert (missed, stored, pids(out)) == (True, 12, [1])
    # Flagged but with no room for the count: lost, count unknown.
    full = page(data_event(victim(1)), commit=PAGE - 16, flags=MISSED_EVENTS | MISSED_STORED)
    assert parser().header(full)[2:] == (True, None)


def test_truncated_record_keeps_what_came_before() -> None:
    good = data_event(victim(1))
    cut = data_event(victim(2))[:-8]
    batch = run(page(good + cut))
    assert pids(batch) == [1]
    assert [r for r, _ in batch.rejected] == ["truncated"]


def test_commit_beyond_the_page_rejects_the_page() -> None:
    batch = run(page(data_event(victim(1)), commit=PAGE))
    assert batch.events == [] and [r for r, _ in batch.rejected] == ["page"]


def test_bad_length_word_and_short_page() -> None:
    batch = run(page(word(0) + (2).to_bytes(4, "little") + bytes(8)))
    assert batch.events == [] and [r for r, _ in batch.rejected] == ["length"]
    batch = run(b"\0" * 8)
    assert [r for r, _ in batch.rejected] == ["page"]


def test_data_loc_outside_its_record_is_caught_when_decoded() -> None:
    f = fmt("oom", "mark_victim")
    rec = bytearray(victim(1))
    rec[12:16] = (60 | 40 << 16).to_bytes(4, "little")
    batch = run(page(data_event(bytes(rec))))
    assert len(batch.events) == 1
    with pytest.raises(ValueError, match="outside"):
        f.decode(batch.events[0].payload)


def test_resuming_in_the_middle_of_a_page() -> None:
    """The mapped reader reads a sub-buffer in pieces as the kernel hands them over."""
    p = parser()
    first, second = data_event(victim(1), 7), data_event(victim(2), 5)
    buf = page(first + second, ts=100)
    out = Batch()
    offset, ts = p.events(buf, 0, len(first), 100, out)
    assert (offset, ts) == (len(first), 107)
    offset, ts = p.events(buf, offset, len(first) + len(second), ts, out)
    assert pids(out) == [1, 2] and [e.ts for e in out.events] == [107, 112]
    assert p.events(buf, offset, offset, ts, out) == (offset, ts)


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=0, max_size=PAGE))
def test_any_bytes_never_crash_or_escape_the_page(raw: bytes) -> None:
    buf = raw + bytes(PAGE - len(raw))
    out = Batch()
    parser().page_events(buf, out)
    for e in out.events:
        assert len(e.payload) <= PAGE - 16
    for e in out.events:
        try:
            fmt("oom", "mark_victim").decode(e.payload)
        except ValueError:
            pass


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 30000), st.integers(0, (1 << 27) - 1)), min_size=1, max_size=40))
def test_pages_of_events_decode_exactly(events: list[tuple[int, int]]) -> None:
    data = b"".join(data_event(victim(pid), delta) for pid, delta in events)
    if len(data) > PAGE - 16:
        return
    batch = run(page(data, ts=5))
    assert pids(batch) == [pid for pid, _ in events]
    ts = 5
    expect = []
    for _, delta in events:
        ts += delta
        expect.append(ts)
    assert [e.ts for e in batch.events] == expect


def test_lost_count_from_the_cpu_stats_when_the_page_has_none(tmp_path: Path) -> None:
    stats = tmp_path / "stats"
    stats.write_text("entries: 0\noverrun: 5\ncommit overrun: 0\n")
    pipe = tmp_path / "trace_pipe_raw"
    full = page(data_event(victim(1)), flags=MISSED_EVENTS)
    pipe.write_bytes(full)
    r = ReadCpu(pipe, 0, parser(), stats)
    stats.write_text("entries: 1\noverrun: 9\ncommit overrun: 0\n")
    try:
        batch = r.read()
    finally:
        r.close()
    assert (pids(batch), batch.lost) == ([1], 4)


def test_a_type_the_header_does_not_define() -> None:
    text = (DATA / "header_event").read_text().replace("data max type_len  == 28", "data max type_len  == 20")
    p = PageParser(parse_page_header((DATA / "header_page").read_text()), parse_event_header(text))
    out = Batch()
    p.page_events(page(data_event(victim(1)) + word(25) + bytes(100)), out)
    assert [r for r, _ in out.rejected] == ["type"]
    assert pids(out) == [1]  # type_len 18 is within the header's data_max; 25 is not
