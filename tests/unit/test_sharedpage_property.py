"""Property tests: whatever a writer puts into a ring, the reader never crashes, never returns
an invalid record, and accounts for every record number it passes.

The oracle (``expected``) is written from the spec in docs/shared-page.md, field by field,
independently of the reader's code.
"""

from __future__ import annotations

import os
import struct
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from oomkit.sharedpage import HEADER_SIZE, KIND_CODES, WRITE_SEQ_OFFSET, Publisher, Record, RingReader

PID_MAX = 32768
MAX_AGE_S = 10.0

_names = st.text(st.sampled_from("ab.-_ é"), min_size=1, max_size=4).filter(lambda c: c not in (".", ".."))
valid_paths = st.one_of(
    st.just("/"), st.lists(_names, min_size=1, max_size=3).map(lambda p: "/" + "/".join(p))
).filter(lambda p: len(p.encode()) <= 24)  # fits the smallest record
any_paths = st.one_of(
    valid_paths.map(str.encode),
    st.sampled_from([b"", b"a", b"/a/", b"//", b"/..", b"/a/./b", b"/a\0", b"/\xff\xfe"]),
    st.binary(max_size=30),
)


@dataclass(frozen=True)
class Fields:
    kind: int
    flags: int
    pid: int
    ticks: int
    path: bytes
    len_delta: int
    reserved: bytes
    age_ns: int
    tail: bytes


_VALID: dict[str, st.SearchStrategy[Any]] = dict(kind=st.integers(1, 7), flags=st.sampled_from([0, 1]), pid=st.just(100), ticks=st.just(1),
              path=valid_paths.map(str.encode), len_delta=st.just(0), reserved=st.just(bytes(6)),
              age_ns=st.sampled_from([0, 1_000_000]), tail=st.just(b""))
_ANY: dict[str, st.SearchStrategy[Any]] = dict(
    kind=st.integers(0, 9),
    flags=st.sampled_from([0, 1, 2, 3, 4, 0x100]),
    pid=st.sampled_from([0, 1, 100, PID_MAX - 1, PID_MAX, 2**32 - 1]),
    ticks=st.sampled_from([0, 1, 2**64 - 1]),
    path=any_paths,
    len_delta=st.sampled_from([0, 1, -1, 600]),
    reserved=st.sampled_from([bytes(6), b"\0\0\0\0\0\1"]),
    age_ns=st.sampled_from([int(2 * MAX_AGE_S * 1e9), -5_000_000_000, 0]),
    tail=st.sampled_from([b"", b"\1"]),
)


@st.composite
def fields(draw: st.DrawFn) -> Fields:
    """A valid record with one or two fields drawn from anything, so that every single way
    of being wrong is tried often, and combinations too (``publish`` makes valid ones)."""
    wild = {draw(st.sampled_from(sorted(_ANY))), draw(st.sampled_from(sorted(_ANY)))}
    return Fields(**{name: draw((_ANY if name in wild else _VALID)[name]) for name in _ANY})


def expected(f: Fields, record_size: int, n: int) -> Record | str:
    """What the spec says a reader makes of a committed record: a Record, a rejection
    reason, or "stale"."""
    path_max = record_size - 40
    length = len(f.path) + f.len_delta
    if f.kind not in KIND_CODES:
        return "kind"
    if f.flags not in (0, 1, 2):
        return "flags"
    if f.pid >= PID_MAX or (f.pid == 0) != (f.ticks == 0):
        return "pid"
    if f.reserved != bytes(6):
        return "reserved"
    if not 0 <= length <= path_max or len(f.path) > path_max:
        return "path"
    stored = (f.path + bytes(path_max))[:length]
    after = (f.path + bytes(path_max))[length:path_max]
    if f.tail and length + 1 <= path_max:
        after = b"\1" + after[1:]
    ok_path = stored.startswith(b"/") and b"\0" not in stored and not any(after)
    if ok_path and stored != b"/":
        ok_path = all(c not in (b"", b".", b"..") for c in stored[1:].split(b"/"))
    try:
        text = stored.decode()
    except UnicodeDecodeError:
        ok_path = False
    if not ok_path or (f.flags == 2 and stored != b"/"):
        return "path"
    if f.age_ns < 0:
        return "time"
    if f.age_ns > MAX_AGE_S * 1e9:
        return "stale"
    tree = {0: "v1", 1: "v2", 2: "system"}[f.flags]
    return Record(seq=n, mono_ns=0, pid=f.pid, start_ticks=f.ticks, kind=KIND_CODES[f.kind], tree=tree, path=text)  # type: ignore[arg-type]


def write_raw(fd: int, capacity: int, record_size: int, n: int, f: Fields, *, torn: bool) -> None:
    """Commit record ``n`` with these fields (or leave it torn: an odd sequence word), the
    way a buggy or hostile writer could, and advance write_seq past it."""
    path_max = record_size - 40
    length = len(f.path) + f.len_delta
    body = (f.path + bytes(path_max))[:path_max]
    if f.tail and 0 <= length < path_max:
        body = body[:length] + b"\1" + body[length + 1 :]
    head = struct.pack(
        "<QQQIHHH", 2 * n - 1 if torn else 2 * n, time.monotonic_ns() - f.age_ns, f.ticks, f.pid, f.kind,
        f.flags, length & 0xFFFF,
    )
    off = HEADER_SIZE + (n - 1) % capacity * record_size
    os.pwrite(fd, head + f.reserved + body, off)
    os.pwrite(fd, struct.pack("<Q", n), WRITE_SEQ_OFFSET)


ops = st.lists(
    st.one_of(
        st.tuples(st.just("publish"), st.sampled_from(sorted(KIND_CODES)), valid_paths),
        st.tuples(st.just("raw"), fields(), st.booleans()),
        st.tuples(st.just("read")),
    ),
    max_size=40,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(capacity=st.integers(1, 5), record_size=st.sampled_from([64, 128]), script=ops, rang=st.booleans())
def test_every_record_number_is_delivered_lost_stale_or_rejected_exactly_as_the_spec_says(
    capacity: int, record_size: int, script: list[tuple[Any, ...]], rang: bool
) -> None:
    """``rang``: every read as after a doorbell (RingReader.poll's guess), which must make
    no difference."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "r.ring"
        pub = Publisher.create(path, capacity=capacity, record_size=record_size, doorbell=Path(d) / "none")
        fd = os.open(path, os.O_RDWR)
        reader = RingReader(path, pid_max=PID_MAX, max_age_s=MAX_AGE_S)
        want: dict[int, Record | str] = {}
        got: list[Record] = []
        lost = 0
        judged: list[int] = []
        seen = 0  # the highest record number a read has passed

        def read() -> None:
            # The writer is idle while we read, so what is lost is exactly what it lapped.
            nonlocal lost, seen
            w = pub.write_seq
            first = max(seen + 1, w - capacity + 1)
            lost += max(0, first - (seen + 1))
            judged.extend(range(first, w + 1))
            seen = w
            got.extend(reader.poll(rang=rang))

        try:
            for op in script:
                n = pub.write_seq + 1
                if op[0] == "publish":
                    pub.publish(KIND_CODES[op[1]], op[2], ring=False)
                    want[n] = Record(seq=n, mono_ns=0, pid=0, start_ticks=0, kind=KIND_CODES[op[1]], tree="v1", path=op[2])
                elif op[0] == "raw":
                    write_raw(fd, capacity, record_size, n, op[1], torn=op[2])
                    pub.write_seq = n  # the publisher continues after what we wrote
                    want[n] = "torn" if op[2] else expected(op[1], record_size, n)
                else:
                    read()
            read()
        finally:
            os.close(fd)
            pub.close()
            reader.close()

    assert [r.seq for r in got] == [n for n in judged if isinstance(want[n], Record)]
    for rec in got:
        assert msgspec.structs.replace(rec, mono_ns=0) == want[rec.seq]
    reasons: dict[str, int] = {}
    for n in judged:
        w_n = want[n]
        if isinstance(w_n, str) and w_n != "stale":
            reasons[w_n] = reasons.get(w_n, 0) + 1
    stats = reader.stats
    assert stats.rejected == reasons
    assert stats.stale == sum(1 for n in judged if want[n] == "stale")
    assert stats.lost == lost
    assert stats.records + stats.lost + stats.stale + stats.rejected_total == len(want)


@settings(max_examples=300, deadline=None)
@given(
    capacity=st.integers(1, 4),
    script=st.lists(
        st.one_of(
            st.tuples(st.just("scribble"), st.integers(0, HEADER_SIZE + 4 * 128 - 1), st.binary(min_size=1, max_size=64)),
            st.tuples(st.just("publish"), valid_paths),
            st.tuples(st.just("read")),
        ),
        max_size=30,
    ),
    rang=st.booleans(),
)
def test_random_bytes_anywhere_never_crash_the_reader_or_make_an_invalid_record(
    capacity: int, script: list[tuple[Any, ...]], rang: bool
) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "r.ring"
        pub = Publisher.create(path, capacity=capacity, record_size=128, doorbell=Path(d) / "none")
        size = HEADER_SIZE + capacity * 128
        fd = os.open(path, os.O_RDWR)
        reader = RingReader(path, pid_max=PID_MAX, max_age_s=MAX_AGE_S)
        got: list[Record] = []
        try:
            for op in script:
                if op[0] == "scribble":
                    os.pwrite(fd, op[2][: max(0, size - op[1])], min(op[1], size))
                elif op[0] == "publish":
                    pub.publish("oom", op[1], ring=False)
                else:
                    before = reader.stats.rejected_total
                    got += reader.poll(rang=rang)
                    assert reader.stats.rejected_total >= before
        finally:
            os.close(fd)
            pub.close()
            reader.close()
    now = time.monotonic_ns()
    for rec in got:
        assert rec.kind in KIND_CODES.values() and rec.tree in ("v1", "v2", "system")
        assert 0 <= rec.pid < PID_MAX and (rec.pid == 0) == (rec.start_ticks == 0)
        assert rec.path.startswith("/") and "\0" not in rec.path and len(rec.path.encode()) <= 88
        assert rec.path == "/" or all(c not in ("", ".", "..") for c in rec.path[1:].split("/"))
        assert 0 < rec.mono_ns <= now + 1_000_000_000
