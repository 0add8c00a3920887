"""The shared-page layout, publisher and validating reader, on ring files under tmp_path."""

from __future__ import annotations

import os
import socket
import struct
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from oomkit import sharedpage as sp
from oomkit.sharedpage import (
    HEADER_SIZE,
    Doorbell,
    LayoutError,
    OwnerPolicy,
    Publisher,
    Record,
    RingReader,
    UnsafeRingError,
    check_directory,
)

NOBODY = 65534


@pytest.fixture
def ring(tmp_path: Path) -> Path:
    return tmp_path / "p.ring"


def slot(reader_or_pub: RingReader | Publisher, n: int) -> int:
    return HEADER_SIZE + (n - 1) % reader_or_pub.capacity * reader_or_pub.record_size


def raw_write(path: Path, offset: int, data: bytes) -> None:
    fd = os.open(path, os.O_RDWR)
    try:
        os.pwrite(fd, data, offset)
    finally:
        os.close(fd)


def test_round_trip_keeps_every_field(ring: Path) -> None:
    with Publisher.create(ring, capacity=8) as pub:
        reader = RingReader(ring)
        now = time.monotonic_ns()
        assert pub.publish("oom", "/a/b c", pid=4242, start_ticks=777, mono_ns=now) == 1
        pub.publish("pressure", "/x", tree="v2")
        pub.publish("kernel-kill", "/", tree="system")
        got = reader.poll()
    assert got == [
        Record(seq=1, mono_ns=now, pid=4242, start_ticks=777, kind="oom", tree="v1", path="/a/b c"),
        Record(seq=2, mono_ns=got[1].mono_ns, pid=0, start_ticks=0, kind="pressure", tree="v2", path="/x"),
        Record(seq=3, mono_ns=got[2].mono_ns, pid=0, start_ticks=0, kind="kernel-kill", tree="system", path="/"),
    ]
    assert reader.poll() == []
    assert reader.stats.records == 3 and reader.stats.rejected_total == 0


def test_every_kind_round_trips(ring: Path) -> None:
    with Publisher.create(ring, capacity=16) as pub:
        reader = RingReader(ring)
        for kind in sp.KIND_NUMBERS:
            pub.publish(kind, "/k")
        assert [r.kind for r in reader.poll()] == list(sp.KIND_NUMBERS)


def test_longest_path_fits_and_one_more_byte_does_not(ring: Path) -> None:
    with Publisher.create(ring, capacity=2, record_size=64) as pub:
        reader = RingReader(ring)
        longest = "/" + "x" * (64 - sp.RECORD_HEADER_SIZE - 1)
        pub.publish("oom", longest)
        with pytest.raises(ValueError, match="longer than the 24 bytes"):
            pub.publish("oom", longest + "x")
        assert [r.path for r in reader.poll()] == [longest]


@pytest.mark.parametrize(
    ("path", "kwargs", "message"),
    [
        ("a/b", {}, "not absolute"),
        ("/a/../b", {}, "'..'"),
        ("/a//b", {}, "empty"),
        ("/a/", {}, "empty"),
        ("/a\0b", {}, "NUL"),
        ("/a", {"tree": "system"}, "system-wide"),
        ("/a", {"pid": 5}, "both pid and start_ticks"),
    ],
)
def test_publisher_refuses_what_a_reader_would_reject(ring: Path, path: str, kwargs: dict[str, object], message: str) -> None:
    with Publisher.create(ring, capacity=2) as pub:
        with pytest.raises(ValueError, match=message):
            pub.publish("oom", path, **kwargs)  # type: ignore[arg-type]
        assert pub.write_seq == 0


def test_a_reader_starts_at_the_oldest_record_the_ring_still_holds(ring: Path) -> None:
    with Publisher.create(ring, capacity=4) as pub:
        for i in range(6):
            pub.publish("oom", f"/{i}")
        reader = RingReader(ring)
        assert [r.path for r in reader.poll()] == ["/2", "/3", "/4", "/5"]
        assert reader.stats.lost == 0  # never ours to lose: they were gone before we came


def test_lapping_the_reader_counts_exactly_the_lost_records(ring: Path) -> None:
    with Publisher.create(ring, capacity=4) as pub:
        reader = RingReader(ring)
        pub.publish("oom", "/0")
        assert len(reader.poll()) == 1
        for i in range(1, 11):  # ten more into four slots: six are overwritten unread
            pub.publish("oom", f"/{i}")
        got = reader.poll()
    assert [r.path for r in got] == ["/7", "/8", "/9", "/10"]
    assert reader.stats.lost == 6
    assert reader.stats.records == 5


def test_a_slot_overwritten_between_two_reads_counts_as_lost(ring: Path) -> None:
    with Publisher.create(ring, capacity=2) as pub:
        reader = RingReader(ring)
        pub.publish("oom", "/1")
        pub.publish("oom", "/2")
        # What a reader sees when the writer laps it mid-read: write_seq still says 2, but
        # slot 1 already carries record 3.
        raw_write(ring, slot(pub, 3), struct.pack("<Q", 6))
        got = reader.poll()
    assert [r.path for r in got] == ["/2"]
    assert reader.stats.lost == 1 and reader.stats.rejected_total == 0


def _corrupt(ring: Path, pub: Publisher, n: int, offset: int, data: bytes) -> RingReader:
    reader = RingReader(ring)
    raw_write(ring, slot(pub, n) + offset, data)
    return reader


@pytest.mark.parametrize(
    ("offset", "data", "reason"),
    [
        (0, struct.pack("<Q", 1), "torn"),  # odd: the writer died mid-record
        (0, struct.pack("<Q", 0), "sequence"),  # committed but not carrying its number
        (28, struct.pack("<H", 0), "kind"),
        (28, struct.pack("<H", 99), "kind"),
        (30, struct.pack("<H", 3), "flags"),  # tree code 3 does not exist
        (30, struct.pack("<H", 0x10), "flags"),
        (24, struct.pack("<I", 32768), "pid"),  # pid_max is 32768 here: pids are below it
        (16, struct.pack("<Q", 0), "pid"),  # a pid without its start time
        (36, b"\1", "reserved"),
        (34, struct.pack("<H", 1), "values"),  # a value whose name is all zeros
        (32, struct.pack("<H", 999), "path"),
        (32, struct.pack("<H", 0), "path"),  # empty path
        (40, b"x", "path"),  # relative
        (41, b"/", "path"),  # "//": an empty component
        (45, b"\1", "path"),  # garbage after the path
        (8, struct.pack("<Q", 0), "time"),
        (8, struct.pack("<Q", 2**63), "time"),  # in the future
    ],
)
def test_each_invalid_field_is_rejected_and_counted(ring: Path, offset: int, data: bytes, reason: str) -> None:
    with Publisher.create(ring, capacity=4) as pub:
        reader = RingReader(ring, pid_max=32768)
        pub.publish("oom", "/a", pid=100, start_ticks=5)
        pub.publish("oom", "/good", pid=101, start_ticks=6)
        raw_write(ring, slot(pub, 1) + offset, data)
        got = reader.poll()
    assert [r.path for r in got] == ["/good"]
    assert reader.stats.rejected == {reason: 1}
    assert reader.last_rejection.startswith("record 1: ")


def test_path_dot_dot_written_behind_the_publishers_back_is_rejected(ring: Path) -> None:
    with Publisher.create(ring, capacity=2) as pub:
        reader = RingReader(ring)
        pub.publish("oom", "/a/bb")
        raw_write(ring, slot(pub, 1) + 40 + 3, b"..")
        assert reader.poll() == []
    assert reader.stats.rejected == {"path": 1}
    assert "'..'" in reader.last_rejection


def test_old_records_are_stale_not_events(ring: Path) -> None:
    with Publisher.create(ring, capacity=4) as pub:
        reader = RingReader(ring, max_age_s=5)
        pub.publish("oom", "/old", mono_ns=time.monotonic_ns() - 6_000_000_000)
        pub.publish("oom", "/new")
        assert [r.path for r in reader.poll()] == ["/new"]
    assert reader.stats.stale == 1 and reader.stats.rejected_total == 0


def test_write_seq_going_backwards_without_new_records_delivers_nothing_twice(ring: Path) -> None:
    with Publisher.create(ring, capacity=4) as pub:
        reader = RingReader(ring)
        for i in range(3):
            pub.publish("oom", f"/{i}")
        assert len(reader.poll()) == 3
        raw_write(ring, sp.WRITE_SEQ_OFFSET, struct.pack("<Q", 1))
        # Record 1's slot still holds the old record 1, delivered already: its time says so.
        assert reader.poll() == []
        assert reader.stats.rejected == {"sequence": 2}
        assert reader.last_rejection == "record 1: written before the writer started over"
        assert reader.next == 2


def test_a_writer_that_starts_over_has_its_new_records_read(ring: Path) -> None:
    """The old rule (next = w + 1) skipped record w, and every one before it."""
    with Publisher.create(ring, capacity=8) as pub:
        reader = RingReader(ring)
        for i in range(5):
            pub.publish("oom", f"/old{i}")
        assert len(reader.poll()) == 5
        pub.write_seq = 0  # a producer that forgot its sequence and starts from 1 again
        pub.publish("oom", "/new1")
        pub.publish("oom", "/new2")
        got = reader.poll()
    assert [(r.seq, r.path) for r in got] == [(1, "/new1"), (2, "/new2")]
    assert reader.stats.rejected == {"sequence": 1}


def test_publisher_open_continues_the_sequence(ring: Path) -> None:
    pub = Publisher.create(ring, capacity=4)
    pub.publish("oom", "/1")
    pub.close()
    with Publisher.open(ring) as again:
        reader = RingReader(ring)
        assert again.publish("oom", "/2") == 2
        assert [r.seq for r in reader.poll()] == [1, 2]


def test_a_second_publisher_on_one_ring_is_refused(ring: Path) -> None:
    with Publisher.create(ring, capacity=4):
        with pytest.raises(BlockingIOError, match="another publisher holds this ring"):
            Publisher.open(ring)


def test_create_leaves_no_temporary_and_sets_the_mode(ring: Path) -> None:
    old = os.umask(0o077)
    try:
        with Publisher.create(ring, capacity=4, mode=0o640):
            pass
    finally:
        os.umask(old)
    assert [p.name for p in ring.parent.iterdir()] == [ring.name]
    assert ring.stat().st_mode & 0o777 == 0o640


# --- headers -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("offset", "data", "message"),
    [
        (0, b"NOTARING", "not a shared-page ring"),
        (8, struct.pack("<H", 2), "layout version 2"),
        (10, struct.pack("<H", 128), "header size 128"),
        (12, struct.pack("<I", 100), "record size 100"),
        (16, struct.pack("<I", 0), "capacity 0"),
        (16, struct.pack("<I", 5), "bytes, its header describes"),
        (20, struct.pack("<I", 1), "unknown feature flags 0x1"),
    ],
)
def test_a_bad_header_is_refused_naming_the_file(ring: Path, offset: int, data: bytes, message: str) -> None:
    with Publisher.create(ring, capacity=4):
        raw_write(ring, offset, data)
        with pytest.raises(LayoutError, match=message) as info:
            RingReader(ring)
    assert str(ring) in str(info.value)


def test_a_short_file_is_refused(ring: Path) -> None:
    ring.write_bytes(b"OOMKRING")
    with pytest.raises(LayoutError, match="shorter than a header"):
        RingReader(ring)


def test_a_ring_over_the_size_limit_is_never_mapped(ring: Path) -> None:
    with Publisher.create(ring, capacity=1024, record_size=512):
        with pytest.raises(LayoutError, match="more than the 4096 allowed"):
            RingReader(ring, max_bytes=4096)


def test_geometry_limits() -> None:
    sp.check_geometry(64, 1)
    sp.check_geometry(8192, 65536)
    for rs, cap in ((32, 1), (65, 1), (8256, 1), (64, 0), (64, 65537)):
        with pytest.raises(LayoutError):
            sp.check_geometry(rs, cap)


# --- ownership ---------------------------------------------------------------------------------

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")


@needs_root
def test_a_ring_owned_by_an_untrusted_user_is_refused(ring: Path) -> None:
    with Publisher.create(ring, capacity=4):
        os.chown(ring, NOBODY, -1)
        with pytest.raises(UnsafeRingError, match=f"owned by uid {NOBODY}"):
            RingReader(ring)
        assert RingReader(ring, policy=OwnerPolicy(uids=frozenset({NOBODY}))).capacity == 4


@pytest.mark.parametrize("mode", [0o602, 0o666])
def test_a_world_writable_ring_is_refused(ring: Path, mode: int) -> None:
    with Publisher.create(ring, capacity=4, mode=mode):
        with pytest.raises(UnsafeRingError, match="writable by others"):
            RingReader(ring)


def test_a_group_writable_ring_needs_a_trusted_group(ring: Path) -> None:
    with Publisher.create(ring, capacity=4, mode=0o660):
        gid = ring.stat().st_gid
        with pytest.raises(UnsafeRingError, match=f"writable by group {gid}"):
            RingReader(ring)
        RingReader(ring, policy=OwnerPolicy(gids=frozenset({gid}))).close()


def test_a_symlink_or_fifo_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "real.ring"
    with Publisher.create(target, capacity=4):
        (tmp_path / "link.ring").symlink_to(target)
        with pytest.raises(OSError):
            RingReader(tmp_path / "link.ring")
    os.mkfifo(tmp_path / "fifo.ring")
    with pytest.raises(UnsafeRingError, match="not a regular file"):
        RingReader(tmp_path / "fifo.ring")


def test_a_directory_writable_by_others_without_sticky_bit_is_refused(tmp_path: Path) -> None:
    d = tmp_path / "d"
    d.mkdir()
    check_directory(d)
    d.chmod(0o777)
    with pytest.raises(UnsafeRingError, match="without the sticky bit"):
        check_directory(d)
    d.chmod(0o1777)
    check_directory(d)
    inner = d / "inner"
    inner.mkdir(mode=0o755)
    d.chmod(0o757)
    with pytest.raises(UnsafeRingError, match=f"{d}: writable"):
        check_directory(inner)  # a parent that others can write lets them swap `inner`


@needs_root
def test_a_directory_owned_by_an_untrusted_user_is_refused(tmp_path: Path) -> None:
    d = tmp_path / "d"
    d.mkdir()
    os.chown(d, NOBODY, -1)
    with pytest.raises(UnsafeRingError, match=f"owned by uid {NOBODY}"):
        check_directory(d)


# --- doorbell ----------------------------------------------------------------------------------


def test_publish_rings_the_doorbell_and_drain_empties_it(tmp_path: Path) -> None:
    bell = Doorbell(tmp_path / "doorbell", mode=0o620)
    try:
        assert (tmp_path / "doorbell").stat().st_mode & 0o777 == 0o620
        with Publisher.create(tmp_path / "a.ring", capacity=4) as pub:
            pub.publish("oom", "/a")
            pub.publish("oom", "/a")
        assert bell.drain() == 2
        assert bell.drain() == 0
    finally:
        bell.close()
    assert not (tmp_path / "doorbell").exists()


def test_ringing_with_no_reader_is_not_an_error(tmp_path: Path) -> None:
    with Publisher.create(tmp_path / "a.ring", capacity=4) as pub:
        assert pub.ring() is False
        pub.publish("oom", "/a")  # the slow poll will find it
        assert pub.write_seq == 1


def test_a_publisher_rings_a_reader_that_restarted_and_one_that_came_late(tmp_path: Path) -> None:
    """The publisher's socket stays connected to the doorbell it first reached: a reader
    that restarts binds a new socket, and the next ring must find that one."""
    with Publisher.create(tmp_path / "a.ring", capacity=4) as pub:
        assert pub.ring() is False  # nobody listens yet
        for _ in range(2):
            bell = Doorbell(tmp_path / "doorbell")
            try:
                assert pub.ring() is True
                assert pub.ring() is True
                assert bell.drain() == 2
            finally:
                bell.close()
        assert pub.ring() is False  # gone again


def test_drain_takes_zero_length_rings_too(tmp_path: Path) -> None:
    """A producer may ring with an empty datagram: FIONREAD says 0 for it, as for none."""
    bell = Doorbell(tmp_path / "doorbell")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        for payload in (b"", b"", b"\0"):
            sock.sendto(payload, str(tmp_path / "doorbell"))
        taken = 0
        while (n := bell.drain()) and taken < 10:
            taken += n
        assert taken == 3
        assert bell.drain() == 0
    finally:
        sock.close()
        bell.close()


def test_a_stale_doorbell_is_replaced_but_a_live_one_is_not(tmp_path: Path) -> None:
    first = Doorbell(tmp_path / "doorbell")
    with pytest.raises(FileExistsError, match="another reader is listening"):
        Doorbell(tmp_path / "doorbell")
    first.sock.close()  # a reader that died without cleaning up
    second = Doorbell(tmp_path / "doorbell")
    second.close()
    (tmp_path / "doorbell").write_text("")
    with pytest.raises(FileExistsError, match="not a socket"):
        Doorbell(tmp_path / "doorbell")


def test_read_pid_max(tmp_path: Path) -> None:
    (tmp_path / "sys" / "kernel").mkdir(parents=True)
    (tmp_path / "sys" / "kernel" / "pid_max").write_text("32768\n")
    assert sp.read_pid_max(str(tmp_path)) == 32768
    assert sp.read_pid_max(str(tmp_path / "none")) == sp.PID_MAX_LIMIT


def test_values_round_trip(ring: Path) -> None:
    with Publisher.create(ring, capacity=2, record_size=256) as pub:
        reader = RingReader(ring)
        pub.publish("pressure", "/a/b", values={"some_avg10_pct": 42.5, "stall_us": 1e6})
        [rec] = reader.poll()
    assert rec.kind == "pressure" and rec.values == {"some_avg10_pct": 42.5, "stall_us": 1e6}


@pytest.mark.parametrize(
    ("values", "message"),
    [({"Bad": 1.0}, "value name"), ({"x" * 25: 1.0}, "value name"), ({"nan": float("nan")}, "not finite"),
     ({"big": 1e19}, "beyond"), ({"s": "1"}, "not a number")],
)
def test_publisher_refuses_bad_values(ring: Path, values: dict[str, object], message: str) -> None:
    with Publisher.create(ring, capacity=2, record_size=256) as pub, pytest.raises(ValueError, match=message):
        pub.publish("pressure", "/a", values=values)  # type: ignore[arg-type]


def test_values_that_do_not_fit_are_refused(ring: Path) -> None:
    with Publisher.create(ring, capacity=2, record_size=128) as pub, pytest.raises(ValueError, match="need"):
        pub.publish("pressure", "/a", values={f"v{i}": 1.0 for i in range(3)})


@pytest.mark.parametrize(
    ("offset", "data"),
    [(48, b"A"), (48 + 24, struct.pack("<d", float("inf"))), (48 + 32, b"x"), (34, struct.pack("<H", 9))],
)
def test_bad_values_written_behind_the_publishers_back_are_rejected(ring: Path, offset: int, data: bytes) -> None:
    with Publisher.create(ring, capacity=2, record_size=256) as pub:
        reader = RingReader(ring)
        pub.publish("pressure", "/a", values={"x": 1.0})
        raw_write(ring, slot(pub, 1) + offset, data)
        assert reader.poll() == []
    assert reader.stats.rejected == {"values": 1}


@pytest.mark.parametrize(
    ("offset", "data", "reason"),
    [
        (45, b"\1", "path"),  # garbage after a path seen valid before
        (30, struct.pack("<H", 2), "path"),  # the same path, now for the whole system
        (48 + 24, struct.pack("<d", float("nan")), "values"),  # a name seen valid, its value NaN
        (48 + 24, struct.pack("<d", 1e19), "values"),
        (48 + 32, b"x", "values"),  # garbage after the values
        (48 + 23, b"x", "values"),  # the name seen valid, no longer NUL-padded
    ],
)
def test_what_a_reader_saw_valid_before_is_checked_again_in_every_record(
    ring: Path, offset: int, data: bytes, reason: str
) -> None:
    """The reader remembers paths and value names that passed, not records: the padding, the
    values and how the path is used are checked in each record."""
    with Publisher.create(ring, capacity=4, record_size=256) as pub:
        reader = RingReader(ring)
        pub.publish("pressure", "/a", values={"x": 1.0})
        assert len(reader.poll()) == 1
        pub.publish("pressure", "/a", values={"x": 1.0})
        raw_write(ring, slot(pub, 2) + offset, data)
        assert reader.poll() == []
    assert reader.stats.rejected == {reason: 1}


def test_the_paths_a_reader_remembers_are_bounded(ring: Path) -> None:
    with Publisher.create(ring, capacity=1024, record_size=1024) as pub:
        reader = RingReader(ring)
        for i in range(sp._KEPT + 10):
            pub.publish("oom", f"/p{i}", ring=False)
        pub.publish("oom", "/" + "x" * (sp._KEPT_PATH_MAX + 1), ring=False)
        got = reader.poll()
    assert len(got) == sp._KEPT + 11
    assert 0 < len(reader._paths) <= sp._KEPT
    assert all(len(raw) <= sp._KEPT_PATH_MAX for raw in reader._paths)


def test_a_record_whose_pid_started_at_another_time_is_rejected(ring: Path, tmp_path: Path) -> None:
    from oomkit.testing import FakeProc

    proc = FakeProc(tmp_path / "proc")
    proc.add_process(4242, "victim", start_ticks=777)
    with Publisher.create(ring, capacity=4) as pub:
        reader = RingReader(ring, proc=proc.path)
        pub.publish("oom", "/a", pid=4242, start_ticks=777)
        pub.publish("oom", "/a", pid=4242, start_ticks=778)  # a reused pid, or another namespace's
        pub.publish("oom", "/a", pid=4243, start_ticks=1)  # gone: the killer will find out
        got = reader.poll()
    assert [(r.pid, r.start_ticks) for r in got] == [(4242, 777), (4243, 1)]
    assert reader.stats.rejected == {"pid": 1} and "another pid or time namespace" in reader.last_rejection


def test_create_does_not_replace_a_ring_a_live_publisher_holds(ring: Path) -> None:
    with Publisher.create(ring, capacity=4) as first:
        first.publish("oom", "/a")
        with pytest.raises(BlockingIOError, match="a live publisher holds this ring"):
            Publisher.create(ring, capacity=4)
        assert not list(ring.parent.glob(".*.tmp"))
    with Publisher.create(ring, capacity=4) as second:  # once the first is gone
        assert second.write_seq == 0


def test_open_writes_its_pid_into_the_header(ring: Path) -> None:
    Publisher.create(ring, capacity=4).close()
    raw_write(ring, sp.PRODUCER_PID_OFFSET, struct.pack("<I", 1))
    with Publisher.open(ring):
        assert struct.unpack("<I", ring.read_bytes()[24:28])[0] == os.getpid()


def test_the_reader_fences_between_its_loads_and_the_publisher_between_its_stores(
    ring: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Step 4: load the sequence word, copy, *fence*, load it again (and fence after
    write_seq); the writer fences between its four stores.  Without the fences a weakly
    ordered CPU may hoist the second load above the copy and accept a torn record."""
    trace: list[str] = []
    monkeypatch.setattr(sp, "fence", lambda: trace.append("fence"))
    with Publisher.create(ring, capacity=4) as pub:
        mm = pub._mm

        class Stores:
            def __setitem__(self, key: slice, value: bytes) -> None:
                trace.append(f"store {key.start - HEADER_SIZE if key.start >= HEADER_SIZE else 'w'}+{len(value)}")
                mm[key] = value

            def __getitem__(self, key: slice) -> bytes:
                return mm[key]

        pub._mm = Stores()  # type: ignore[assignment]
        pub.publish("oom", "/a")
        assert trace == ["store 0+8", "fence", f"store 8+{pub.record_size - 8}", "fence", "store 0+8", "fence",
                         "store w+8"]
        pub._mm = mm
        reader = RingReader(ring)
        real = reader._pread

        def pread(size: int, offset: int) -> bytes:
            trace.append(f"load {offset}+{size}")
            return real(size, offset)

        reader._pread = pread  # type: ignore[method-assign]
        trace.clear()
        [rec] = reader.poll()
    assert trace == [f"load {sp.WRITE_SEQ_OFFSET}+8", "fence", f"load {HEADER_SIZE}+{reader.record_size}", "fence",
                     f"load {HEADER_SIZE}+{reader.record_size}"]


def test_a_ring_cut_short_under_the_reader_is_refused_not_a_crash(ring: Path) -> None:
    """A mapped reader died of SIGBUS here; pread comes up short instead."""
    script = f"""
import os, sys
from oomkit.sharedpage import LayoutError, Publisher, RingReader
pub = Publisher.create({str(ring)!r}, capacity=64)
reader = RingReader({str(ring)!r})
for i in range(3):
    pub.publish("oom", f"/{{i}}")
os.truncate({str(ring)!r}, 64)
try:
    reader.poll()
except LayoutError as exc:
    print("refused:", exc)
    sys.exit(0)
sys.exit(3)
"""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, (done.returncode, done.stderr)
    assert "cut to 64 bytes while being read" in done.stdout


# --- a doorbell's poll: one new record in two reads -----------------------------------------


class Reads:
    """Every read a reader makes of its ring, as (offset, size): each one is a pread."""

    def __init__(self, reader: RingReader, after: dict[int, Callable[[], None]] | None = None) -> None:
        self.log: list[tuple[int, int]] = []
        self._after = after or {}
        """What happens in the ring right after the read of that number (from 1)."""
        real = reader._pread

        def pread(size: int, offset: int) -> bytes:
            self.log.append((offset, size))
            raw = real(size, offset)
            action = self._after.pop(len(self.log), None)
            if action is not None:
                action()
            return raw

        reader._pread = pread  # type: ignore[method-assign]

    def take(self) -> list[tuple[int, int]]:
        out, self.log = self.log, []
        return out


def guessing(ring: Path, pub: Publisher) -> RingReader:
    """A reader caught up with ``pub`` whose last doorbell poll found one record."""
    reader = RingReader(ring)
    reader.poll()
    pub.publish("oom", "/warm")
    assert [r.path for r in reader.poll(rang=True)] == ["/warm"]
    return reader


def caught_up(ring: Path) -> RingReader:
    reader = RingReader(ring)
    reader.poll()
    return reader


def same(plain: RingReader, guesser: RingReader) -> list[tuple[int, str]]:
    """Both readers' next poll, the guesser's after a doorbell; they must agree on every
    record and every count."""
    got = [(r.seq, r.path) for r in plain.poll()]
    assert [(r.seq, r.path) for r in guesser.poll(rang=True)] == got
    assert guesser.stats == plain.stats and guesser.next == plain.next
    return got


def test_one_new_record_at_a_doorbell_costs_two_reads(ring: Path) -> None:
    with Publisher.create(ring, capacity=8) as pub:
        reader = guessing(ring, pub)
        reads = Reads(reader)
        now = time.monotonic_ns()
        pub.publish("oom", "/a/b", pid=4242, start_ticks=777, mono_ns=now)
        assert reader.poll(rang=True) == [
            Record(seq=2, mono_ns=now, pid=4242, start_ticks=777, kind="oom", tree="v1", path="/a/b")]
        assert reads.take() == [(slot(reader, 2), 2 * reader.record_size)] * 2
        pub.publish("oom", "/c")
        assert [r.seq for r in reader.poll(rang=True)] == [3]
        assert len(reads.take()) == 2
    assert reader.stats.records == 3 and reader.stats.troubles == 0


def test_the_guess_fences_between_its_two_copies(ring: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with Publisher.create(ring, capacity=4) as pub:
        reader = guessing(ring, pub)
        pub.publish("oom", "/a")
        trace: list[str] = []
        monkeypatch.setattr(sp, "fence", lambda: trace.append("fence"))
        real = reader._pread

        def pread(size: int, offset: int) -> bytes:
            trace.append(f"load {offset}+{size}")
            return real(size, offset)

        reader._pread = pread  # type: ignore[method-assign]
        [rec] = reader.poll(rang=True)
    load = f"load {slot(reader, 2)}+{2 * reader.record_size}"
    assert rec.path == "/a" and trace == [load, "fence", load]


def test_two_new_records_at_a_doorbell_are_both_read_in_order(ring: Path) -> None:
    with Publisher.create(ring, capacity=8) as pub:
        reader = guessing(ring, pub)
        reads = Reads(reader)
        pub.publish("oom", "/1")
        pub.publish("oom", "/2")
        assert [(r.seq, r.path) for r in reader.poll(rang=True)] == [(2, "/1"), (3, "/2")]
        # The guess sees record 3 committed and leaves both to write_seq's poll.
        two = (slot(reader, 2), 2 * reader.record_size)
        assert reads.take() == [two, (sp.WRITE_SEQ_OFFSET, 8), two, two]
    assert reader.stats.records == 3 and reader.stats.troubles == 0


def test_a_lapped_reader_counts_the_same_loss_at_a_doorbell(ring: Path) -> None:
    with Publisher.create(ring, capacity=4) as pub:
        guesser = guessing(ring, pub)
        plain = caught_up(ring)
        for i in range(10):  # ten into four slots: six overwritten unread
            pub.publish("oom", f"/{i}")
        assert same(plain, guesser) == [(8, "/6"), (9, "/7"), (10, "/8"), (11, "/9")]
    assert guesser.stats.lost == 6


def test_a_writer_that_laps_the_guess_between_its_copies_loses_the_record(ring: Path) -> None:
    """The first copy is record 2, whole and committed; before the second, the writer wrote
    four more into four slots.  The copies differ, and write_seq's poll counts record 2 lost
    instead of passing on the first copy."""
    with Publisher.create(ring, capacity=4) as pub:
        reader = guessing(ring, pub)
        pub.publish("oom", "/2")

        def lap() -> None:
            for n in range(3, 7):
                pub.publish("oom", f"/{n}")

        Reads(reader, after={1: lap})
        assert [r.path for r in reader.poll(rang=True)] == ["/3", "/4", "/5", "/6"]
    assert reader.stats.lost == 1 and reader.stats.rejected_total == 0


def test_a_first_copy_with_the_commit_but_older_bytes_is_not_taken(ring: Path) -> None:
    """What a pread may return while the record is committed under it: 2n, and a path from
    before.  The second copy differs, so write_seq's poll reads the record afresh."""
    with Publisher.create(ring, capacity=4) as pub:
        reader = guessing(ring, pub)
        pub.publish("oom", "/new")
        real = reader._pread
        calls: list[int] = []

        def pread(size: int, offset: int) -> bytes:
            raw = real(size, offset)
            calls.append(size)
            if len(calls) == 1:
                return raw[:40] + b"/old" + raw[44:]
            return raw

        reader._pread = pread  # type: ignore[method-assign]
        assert [r.path for r in reader.poll(rang=True)] == ["/new"]
        assert len(calls) == 5  # the guess's two, then write_seq, the copy and its second load
    assert reader.stats.troubles == 0


def test_a_writer_that_starts_over_is_seen_as_before_at_a_doorbell(ring: Path) -> None:
    with Publisher.create(ring, capacity=8) as pub:
        guesser = guessing(ring, pub)
        plain = caught_up(ring)
        for i in range(1, 4):
            pub.publish("oom", f"/a{i}")
            assert same(plain, guesser) == [(i + 1, f"/a{i}")]
        pub.write_seq = 0  # a producer that forgot its sequence
        pub.publish("oom", "/b1")
        assert same(plain, guesser) == [(1, "/b1")]
        assert guesser.stats.rejected == {"sequence": 1}
        pub.publish("oom", "/b2")
        assert same(plain, guesser) == [(2, "/b2")]
        pub.publish("oom", "/b3")
        assert same(plain, guesser) == [(3, "/b3")]
        # Slot 4 holds /a3, the old writer's record 4, read already: committed as 2 x 4 and
        # followed by no record 5, it is what the guess looks for, but its time gives it away.
        assert same(plain, guesser) == []
        pub.publish("oom", "/b4")
        assert same(plain, guesser) == [(4, "/b4")]
    assert guesser.stats.rejected == {"sequence": 1} and guesser.stats.records == 8


def test_a_torn_record_is_rejected_as_before_at_a_doorbell(ring: Path) -> None:
    with Publisher.create(ring, capacity=4) as pub:
        guesser = guessing(ring, pub)
        plain = caught_up(ring)
        pub.publish("oom", "/torn")
        raw_write(ring, slot(pub, 2), struct.pack("<Q", 3))  # 2n - 1, yet write_seq says 2
        assert same(plain, guesser) == []
        pub.publish("oom", "/next")
        assert same(plain, guesser) == [(3, "/next")]
    assert guesser.stats.rejected == {"torn": 1}


def test_a_torn_record_after_the_new_one_leaves_the_poll_to_write_seq(ring: Path) -> None:
    """Record 3 torn, write_seq past it and record 4 after: the guess must not take record 2
    alone and leave 3 and 4 to some later poll (found by the property test)."""
    with Publisher.create(ring, capacity=8) as pub:
        guesser = guessing(ring, pub)
        plain = caught_up(ring)
        pub.publish("oom", "/2")
        pub.publish("oom", "/3")
        raw_write(ring, slot(pub, 3), struct.pack("<Q", 5))
        pub.publish("oom", "/4")
        assert same(plain, guesser) == [(2, "/2"), (4, "/4")]
    assert guesser.stats.rejected == {"torn": 1}


def test_the_last_slot_is_read_the_usual_way_and_the_guess_goes_on_after_it(ring: Path) -> None:
    with Publisher.create(ring, capacity=4) as pub:
        reader = guessing(ring, pub)  # record 1, slot 0
        reads = Reads(reader)
        counts = []
        for n in range(2, 7):
            pub.publish("oom", f"/{n}")
            assert [r.seq for r in reader.poll(rang=True)] == [n]
            counts.append(len(reads.take()))
    # Record 4 is in the last slot: slot "5" is the first, not one read away.
    assert counts == [2, 2, 3, 2, 2]
    assert reader.stats.records == 6 and reader.stats.troubles == 0


def test_nothing_new_costs_one_read(ring: Path) -> None:
    with Publisher.create(ring, capacity=8) as pub:
        fresh = RingReader(ring)
        guesser = guessing(ring, pub)
        fresh.poll()
        reads, fresh_reads = Reads(guesser), Reads(fresh)
        assert guesser.poll() == [] and reads.take() == [(sp.WRITE_SEQ_OFFSET, 8)]  # the slow poll never guesses
        assert fresh.poll(rang=True) == [] and fresh_reads.take() == [(sp.WRITE_SEQ_OFFSET, 8)]
        # A doorbell for another ring: the guess misses once, then the ring is not guessed at.
        assert guesser.poll(rang=True) == [] and len(reads.take()) == 2
        for _ in range(3):
            assert guesser.poll(rang=True) == [] and reads.take() == [(sp.WRITE_SEQ_OFFSET, 8)]
        pub.publish("oom", "/x")
        assert [r.path for r in guesser.poll(rang=True)] == ["/x"] and len(reads.take()) == 3
        pub.publish("oom", "/y")
        assert [r.path for r in guesser.poll(rang=True)] == ["/y"] and len(reads.take()) == 2


def test_a_record_committed_before_its_write_seq_is_taken_once(ring: Path) -> None:
    """seq = 2n is the commit; write_seq = n comes after it.  A guess in between takes the
    record one poll before write_seq's poll would, and never again."""
    with Publisher.create(ring, capacity=8) as pub:
        guesser = guessing(ring, pub)
        plain = caught_up(ring)
        pub.publish("oom", "/early")
        raw_write(ring, sp.WRITE_SEQ_OFFSET, struct.pack("<Q", 1))
        assert plain.poll() == []
        assert [r.path for r in guesser.poll(rang=True)] == ["/early"]
        raw_write(ring, sp.WRITE_SEQ_OFFSET, struct.pack("<Q", 2))
        assert [r.path for r in plain.poll()] == ["/early"]
        assert guesser.poll(rang=True) == []
    assert guesser.stats == plain.stats
