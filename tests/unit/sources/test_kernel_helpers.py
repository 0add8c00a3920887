"""inotify, the poller and PSI parsing, on tmp_path files and eventfds."""

from __future__ import annotations

import os
import select
import socket
from pathlib import Path

import anyio
import pytest

from oomkit.inotify import IN_CREATE, IN_DELETE, IN_ISDIR, IN_MODIFY, Inotify
from oomkit.poller import Poller
from oomkit.psi import has_capability, open_trigger, parse_pressure, round_window_us

pytestmark = pytest.mark.anyio


def test_inotify_reports_modify_create_delete(tmp_path: Path) -> None:
    f = tmp_path / "memory.events"
    f.write_text("oom 0\n")
    ino = Inotify()
    try:
        wd_file = ino.add_watch(f, IN_MODIFY)
        wd_dir = ino.add_watch(tmp_path, IN_CREATE | IN_DELETE)
        assert ino.read() == []
        f.write_text("oom 1\n")
        (tmp_path / "child").mkdir()
        (tmp_path / "child").rmdir()
        events = ino.read()
        assert any(e.wd == wd_file and e.mask & IN_MODIFY for e in events)
        made = [e for e in events if e.wd == wd_dir and e.mask & IN_CREATE]
        gone = [e for e in events if e.wd == wd_dir and e.mask & IN_DELETE]
        assert [e.name for e in made] == ["child"] and made[0].mask & IN_ISDIR
        assert [e.name for e in gone] == ["child"]
    finally:
        ino.close()


def test_inotify_add_watch_error_names_the_path(tmp_path: Path) -> None:
    ino = Inotify()
    try:
        with pytest.raises(FileNotFoundError, match="inotify_add_watch") as info:
            ino.add_watch(tmp_path / "missing", IN_MODIFY)
        assert info.value.filename == str(tmp_path / "missing")
    finally:
        ino.close()


@pytest.mark.parametrize("threaded", [False, True], ids=["loop", "threaded"])
async def test_poller_reports_the_key_of_the_fd_that_fired(threaded: bool) -> None:
    poller = Poller[str](threaded=threaded)
    a = os.eventfd(0, os.EFD_NONBLOCK)
    b = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        poller.register(a, select.EPOLLIN, "a")
        poller.register(b, select.EPOLLIN, "b")
        assert await poller.wait(0.01) == []
        os.eventfd_write(b, 3)
        assert await poller.wait(5) == [("b", select.EPOLLIN)]
        os.eventfd_read(b)
        poller.unregister(b)
        os.eventfd_write(b, 1)
        assert await poller.wait(0.01) == []
    finally:
        poller.close()
        os.close(a)
        os.close(b)


@pytest.mark.parametrize("threaded", [False, True], ids=["loop", "threaded"])
async def test_poller_wait_can_be_cancelled(threaded: bool) -> None:
    poller = Poller[str](threaded=threaded)
    try:
        with anyio.move_on_after(0.05) as scope:
            await poller.wait()
        assert scope.cancelled_caught
    finally:
        poller.close()


async def test_threaded_poller_sees_pollpri(anyio_backend: object) -> None:
    # TCP urgent data raises POLLPRI, as a PSI trigger does; the loop's own readiness wait
    # would never report it.
    server = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(server.getsockname())
    peer, _ = server.accept()
    poller = Poller[str](threaded=True)
    try:
        poller.register(peer.fileno(), select.EPOLLPRI, "trigger")
        client.send(b"!", socket.MSG_OOB)
        ready = await poller.wait(5)
        assert ready and ready[0][0] == "trigger" and ready[0][1] & select.EPOLLPRI
    finally:
        poller.close()
        for s in (client, peer, server):
            s.close()


def test_parse_pressure_names_units() -> None:
    raw = (
        b"some avg10=1.50 avg60=0.25 avg300=0.00 total=123456\n"
        b"full avg10=0.75 avg60=0.10 avg300=0.00 total=654\n"
    )
    assert parse_pressure(raw) == {
        "some_avg10_pct": 1.5,
        "some_avg60_pct": 0.25,
        "some_avg300_pct": 0.0,
        "some_total_us": 123456.0,
        "full_avg10_pct": 0.75,
        "full_avg60_pct": 0.1,
        "full_avg300_pct": 0.0,
        "full_total_us": 654.0,
    }


def test_parse_pressure_reads_the_experimental_format() -> None:
    # oomd's fixtures and its parser: "aggr N" first, then the averages by position, no total.
    raw = b"aggr 316016073\nsome 0.00 0.03 0.05\nfull 0.01 0.02 0.04\n"
    assert parse_pressure(raw) == {
        "some_avg10_pct": 0.0, "some_avg60_pct": 0.03, "some_avg300_pct": 0.05,
        "full_avg10_pct": 0.01, "full_avg60_pct": 0.02, "full_avg300_pct": 0.04,
    }


def test_parse_pressure_needs_no_full_line() -> None:
    # A CPU pressure file, and memory.pressure on some kernels, have a `some` line only.
    assert parse_pressure(b"some avg10=2.00 avg60=1.00 avg300=0.50 total=99\n") == {
        "some_avg10_pct": 2.0, "some_avg60_pct": 1.0, "some_avg300_pct": 0.5, "some_total_us": 99.0,
    }


@pytest.mark.parametrize(
    "raw, message",
    [
        (b"", "no `some` line"),
        (b"full avg10=0.00 avg60=0.00 avg300=0.00 total=1\n", "no `some` line"),
        (b"some avg10=nan avg60=0.00 avg300=0.00 total=1\n", "not a finite non-negative number"),
        (b"some avg10=0.00 avg60=0.00 avg300=0.00 total=-4\n", "not a finite non-negative number"),
        (b"some avg10=inf total=1\n", "not a finite non-negative number"),
        (b"some 0.00 0.03\n", "not a pressure line"),
        (b"aggr 1 2\nsome 0.00 0.03 0.05\n", "not a pressure line"),
        (b"some avg10=x total=1\n", "not a number"),
        (b"cpu avg10=0.00 total=1\n", "not a pressure line"),
        (b"some avg10\n", "not a pressure line"),
    ],
)
def test_parse_pressure_rejects_garbage(raw: bytes, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_pressure(raw)


@pytest.mark.parametrize("window_us, rounded", [(500_000, 2_000_000), (2_000_000, 2_000_000), (2_000_001, 4_000_000)])
def test_round_window_us(window_us: int, rounded: int) -> None:
    assert round_window_us(window_us) == rounded


def test_has_capability_reads_capeff(tmp_path: Path) -> None:
    (tmp_path / "self").mkdir()
    (tmp_path / "self" / "status").write_text("Name:\tx\nCapEff:\t0000000001000000\n")
    assert has_capability(str(tmp_path), 24)
    assert not has_capability(str(tmp_path), 21)


def test_open_trigger_refuses_a_file_that_cannot_be_polled_without_writing_it(tmp_path: Path) -> None:
    f = tmp_path / "memory.pressure"
    f.write_bytes(b"some avg10=0.00 avg60=0.00 avg300=0.00 total=0\n")
    with pytest.raises(PermissionError):
        open_trigger(f, "full", 150_000, 2_000_000)
    assert f.read_bytes().startswith(b"some avg10")
