"""The shared-page source on ring directories under tmp_path, on every anyio backend."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest

from oomkit.config import Config, ConfigError, config_from_dict
from oomkit.events import Event, Scope
from oomkit.sharedpage import Publisher, Record, UnsafeRingError
from oomkit.sources import build_source
from oomkit.sources.shared_page import ProducerScopes, SharedPageSource, SharedPageSourceConfig
from oomkit.testing import FakeProc, config_for

NEVER = 3600.0  # a slow poll that never comes within a test: only the doorbell can wake


def make_source(directory: Path, **kw: Any) -> SharedPageSource:
    # A fake /proc: the records' made-up pids must not meet the machine's real processes.
    proc = FakeProc(directory.parent / f"proc-{directory.name}")
    return SharedPageSource(SharedPageSourceConfig(directory=str(directory), **kw), config_for(proc))


class Collected:
    def __init__(self) -> None:
        self.events: list[Event] = []
        self._arrived = anyio.Event()

    async def emit(self, event: Event) -> None:
        self.events.append(event)
        self._arrived.set()

    async def wait_for(self, n: int, timeout: float = 5.0) -> list[Event]:
        with anyio.fail_after(timeout):
            while len(self.events) < n:
                self._arrived = anyio.Event()
                await self._arrived.wait()
        return self.events


@asynccontextmanager
async def running(src: SharedPageSource) -> AsyncIterator[Collected]:
    got = Collected()
    async with anyio.create_task_group() as tg:
        await tg.start(src.run, got.emit)
        yield got
        tg.cancel_scope.cancel()


@pytest.mark.anyio
async def test_records_written_before_start_and_after_become_events(tmp_path: Path) -> None:
    d = tmp_path / "sp"
    d.mkdir()
    with Publisher.create(d / "a.ring", capacity=8) as pub:
        pub.publish("oom", "/early", pid=7, start_ticks=70)
        src = make_source(d, poll_interval_s=NEVER)
        async with running(src) as got:
            pub.publish("kernel-kill", "/", tree="system")
            pub.publish("pressure", "/v2/x", tree="v2")
            events = await got.wait_for(3)
    assert [(e.kind, e.scope, e.pid, e.pid_start_ticks) for e in events] == [
        ("oom", Scope("v1", "/early"), 7, 70),
        ("kernel-kill", Scope(), None, None),
        ("pressure", Scope("v2", "/v2/x"), None, None),
    ]
    assert all(e.source == "shared-page" for e in events)
    assert src.stats.doorbell_wakes >= 1
    assert not (d / "doorbell").exists()  # removed on the way out


@pytest.mark.anyio
async def test_a_record_published_while_the_source_hands_one_on_is_not_left_to_the_slow_poll(
    tmp_path: Path,
) -> None:
    """The doorbell is drained after the source's look: a ring that comes during the turn is
    drained with the one that woke it, and must still bring its record at once."""
    with Publisher.create(tmp_path / "a.ring", capacity=64) as pub:
        got: list[Event] = []
        arrived = anyio.Event()

        async def emit(event: Event) -> None:
            got.append(event)
            if len(got) < 20:
                pub.publish("oom", f"/r{len(got)}")  # written and rung during the source's turn
            else:
                arrived.set()

        src = make_source(tmp_path, poll_interval_s=NEVER)
        async with anyio.create_task_group() as tg:
            await tg.start(src.run, emit)
            pub.publish("oom", "/r0")
            with anyio.fail_after(10):
                await arrived.wait()
            tg.cancel_scope.cancel()
    assert [e.scope.path for e in got] == [f"/r{i}" for i in range(20)]
    assert src.stats.poll_wakes == 0


@pytest.mark.anyio
async def test_event_times_are_when_the_producer_wrote(tmp_path: Path) -> None:
    then = time.monotonic_ns() - 2_000_000_000
    with Publisher.create(tmp_path / "a.ring", capacity=4) as pub:
        pub.publish("oom", "/a", mono_ns=then)
        async with running(make_source(tmp_path, poll_interval_s=NEVER)) as got:
            (event,) = await got.wait_for(1)
    assert event.monotonic_ns == then
    assert abs(event.wall_time - (time.time() - 2.0)) < 1.0


@pytest.mark.anyio
async def test_without_doorbell_the_slow_poll_delivers(tmp_path: Path) -> None:
    src = make_source(tmp_path, doorbell=False, poll_interval_s=0.02)
    async with running(src) as got:
        assert not (tmp_path / "doorbell").exists()
        with Publisher.create(tmp_path / "a.ring", capacity=4) as pub:
            pub.publish("oom", "/a")
            await got.wait_for(1)
    assert src.stats.poll_wakes >= 1 and src.stats.doorbell_wakes == 0


@pytest.mark.anyio
async def test_a_ring_that_appears_later_is_found_by_its_first_doorbell(tmp_path: Path) -> None:
    src = make_source(tmp_path, poll_interval_s=NEVER)
    async with running(src) as got:
        await anyio.sleep(0.05)  # past the directory mtime's coarse tick
        with Publisher.create(tmp_path / "late.ring", capacity=4) as pub:
            pub.publish("oom", "/late")
            (event,) = await got.wait_for(1)
            assert list(src.readers) == ["late.ring"]
    assert event.scope == Scope("v1", "/late")
    assert src.readers == {}  # unmapped on the way out


@pytest.mark.anyio
async def test_a_replaced_ring_is_remapped_and_a_removed_one_dropped(tmp_path: Path) -> None:
    src = make_source(tmp_path, poll_interval_s=0.02)
    async with running(src) as got:
        pub = Publisher.create(tmp_path / "a.ring", capacity=4)
        pub.publish("oom", "/first")
        await got.wait_for(1)
        pub.close()
        with Publisher.create(tmp_path / "a.ring", capacity=4) as again:  # a restarted producer
            again.publish("oom", "/second")
            events = await got.wait_for(2)
        assert [e.scope.path for e in events] == ["/first", "/second"]
        (tmp_path / "a.ring").unlink()
        with anyio.fail_after(5):
            while src.readers:
                await anyio.sleep(0.01)


def _bad_record(ring: Path, pub: Publisher, kind: bytes = b"\xff\xff") -> int:
    n = pub.publish("oom", "/bad", ring=False)
    fd = os.open(ring, os.O_RDWR)
    os.pwrite(fd, kind, 64 + (n - 1) % pub.capacity * pub.record_size + 28)
    os.close(fd)
    return n


def _counts(caplog: pytest.LogCaptureFixture, what: str) -> list[int]:
    return [int(r.getMessage().split(": ")[2].split()[0]) for r in caplog.records if what in r.getMessage()]


@pytest.mark.anyio
async def test_rejections_are_counted_and_logged_once_per_interval(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "oomkit.sources.shared_page")
    src = make_source(tmp_path, poll_interval_s=NEVER, log_interval_s=NEVER)
    with Publisher.create(tmp_path / "a.ring", capacity=8) as pub:
        async with running(src) as got:
            for batch in range(2):
                _bad_record(tmp_path / "a.ring", pub)
                pub.publish("oom", f"/good{batch}")
                await got.wait_for(batch + 1)
            assert _counts(caplog, "rejected") == [1]  # the second is held back for the interval
    assert [e.scope.path for e in got.events] == ["/good0", "/good1"]
    assert src.stats.rejected == 2
    # ...and said when the source stops, not dropped.
    assert _counts(caplog, "rejected") == [1, 1]
    assert "record 3: unknown kind 65535" in caplog.records[-1].getMessage()


@pytest.mark.anyio
async def test_a_burst_of_rejections_is_reported_whole_once_the_interval_passed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Ten bad records, each on a wake-up of its own: the log once said "1 record(s)" and
    never mentioned the other nine."""
    caplog.set_level(logging.WARNING, "oomkit.sources.shared_page")
    src = make_source(tmp_path, poll_interval_s=0.05, log_interval_s=0.3)
    with Publisher.create(tmp_path / "a.ring", capacity=32) as pub:
        async with running(src):
            last = 0
            for _ in range(10):
                last = _bad_record(tmp_path / "a.ring", pub)
                pub.ring()
                with anyio.fail_after(10):
                    while src.stats.rejected < _ + 1:
                        await anyio.sleep(0.01)
            with anyio.fail_after(10):
                while sum(_counts(caplog, "rejected")) < 10:
                    await anyio.sleep(0.05)  # a slow poll after the interval says the rest
    assert sum(_counts(caplog, "rejected")) == 10 and _counts(caplog, "rejected")[0] == 1
    assert f"record {last}: unknown kind" in [r for r in caplog.records if "rejected" in r.getMessage()][-1].getMessage()
    assert src.counters()["rejected_kind"] == 10


@pytest.mark.anyio
async def test_an_untrusted_ring_is_refused_once_until_it_changes(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "oomkit.sources.shared_page")
    with Publisher.create(tmp_path / "bad.ring", capacity=4, mode=0o666) as pub:
        pub.publish("oom", "/injected")
        src = make_source(tmp_path, poll_interval_s=0.02)
        async with running(src) as got:
            await anyio.sleep(0.2)  # several slow polls
            assert got.events == [] and src.stats.refused_rings == 1
            os.chmod(tmp_path / "bad.ring", 0o600)  # the admin fixes it
            await got.wait_for(1)
    refusals = [r for r in caplog.records if "refusing ring bad.ring" in r.getMessage()]
    assert len(refusals) == 1 and "writable by others" in refusals[0].getMessage()


@pytest.mark.anyio
async def test_an_unsafe_directory_refuses_to_start(tmp_path: Path) -> None:
    d = tmp_path / "open"
    d.mkdir()
    d.chmod(0o777)
    src = make_source(d)
    with pytest.raises(UnsafeRingError, match="shared-page source 'shared-page'.*without the sticky bit"):
        await src.run(Collected().emit)  # raises before started(): the engine would not start
    assert not (d / "doorbell").exists()


@pytest.mark.anyio
async def test_a_missing_directory_is_created_with_its_mode(tmp_path: Path) -> None:
    d = tmp_path / "run" / "oomkit"
    async with running(make_source(d, directory_mode=0o750)):
        assert d.stat().st_mode & 0o7777 == 0o750
        assert (d / "doorbell").stat().st_mode & 0o777 == 0o660


@pytest.mark.anyio
async def test_a_vanished_directory_is_logged_once_and_polled_on(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    d = tmp_path / "sp"
    src = make_source(d, doorbell=False, poll_interval_s=0.01, log_interval_s=NEVER)
    async with running(src):
        d.rmdir()
        await anyio.sleep(0.1)
        assert len([r for r in caplog.records if "cannot list" in r.getMessage()]) == 1
    assert src.stats.scan_errors >= 2
    lines = [r.getMessage() for r in caplog.records if "cannot list" in r.getMessage()]
    assert sum(int(ln.split("(")[1].split()[0]) for ln in lines) == src.stats.scan_errors


def test_config_decodes_builds_and_names_bad_keys(tmp_path: Path) -> None:
    cfg = config_from_dict(
        {"sources": [{"kind": "shared-page", "directory": str(tmp_path), "allowed_uids": [1000]}]}, "oomkit.toml"
    )
    src = build_source(cfg.sources[0], cfg)
    assert isinstance(src, SharedPageSource) and src.policy.uids == {1000}
    bad: list[tuple[dict[str, Any], str]] = [
        ({"directory": "relative"}, "absolute"),
        ({"directory": "/x", "poll_interval_s": 0}, "poll_interval_s"),
        ({"directory": "/x", "doorbell_mode": 0o10000}, "doorbell_mode"),
        ({"directory": "/x", "max_ring_bytes": 10}, "max_ring_bytes"),
        ({"directory": "/x", "capacity": 4}, "unknown field `capacity`"),
        ({}, "missing required field `directory`"),
    ]
    for fields, message in bad:
        with pytest.raises(ConfigError, match=message) as info:
            config_from_dict({"sources": [{"kind": "shared-page", **fields}]}, "oomkit.toml")
        assert str(info.value).startswith("oomkit.toml: ")
        assert "$.sources[0]" in str(info.value)


def test_repr_reads(tmp_path: Path) -> None:
    assert repr(make_source(tmp_path)) == "<SharedPageSource 'shared-page' rings=0 events=0 lost=0 rejected=0 refused=0>"


@pytest.mark.anyio
async def test_values_reach_the_event(tmp_path: Path) -> None:
    src = make_source(tmp_path, poll_interval_s=NEVER)
    with Publisher.create(tmp_path / "a.ring", capacity=4, record_size=256) as pub:
        async with running(src) as got:
            pub.publish("pressure", "/svc", values={"some_avg10_pct": 55.0, "some_avg60_pct": 20.0})
            [ev] = await got.wait_for(1)
    assert (ev.kind, ev.scope, ev.values) == ("pressure", Scope("v1", "/svc"),
                                              {"some_avg10_pct": 55.0, "some_avg60_pct": 20.0})


def _foreign_ring(d: Path, name: str, uid: int) -> Publisher:
    pub = Publisher.create(d / name, capacity=8)
    os.chown(d / name, uid, -1)
    return pub


@pytest.mark.anyio
async def test_a_non_root_producer_cannot_report_on_the_system(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to give a ring to another owner")
    src = make_source(tmp_path, poll_interval_s=NEVER, allowed_uids=(1000,))
    with _foreign_ring(tmp_path, "user.ring", 1000) as pub:
        async with running(src) as got:
            pub.publish("oom", "/", tree="system")
            pub.publish("low-memory", "/", tree="system")
            pub.publish("oom", "/user.slice/app", tree="v2")
            [ev] = await got.wait_for(1)
    assert ev.scope == Scope("v2", "/user.slice/app")
    assert src.counters()["rejected_scope"] == 2 and src.stats.events == 1


@pytest.mark.anyio
async def test_producers_are_held_to_their_scopes(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to give a ring to another owner")
    grant = ProducerScopes(uid=1000, scopes=("v1:/jobs/*", "v2:/user.slice"))
    src = make_source(tmp_path, poll_interval_s=NEVER, allowed_uids=(1000,), producers=(grant,))
    with _foreign_ring(tmp_path, "user.ring", 1000) as pub, Publisher.create(tmp_path / "root.ring") as root:
        async with running(src) as got:
            for tree, path in [("v1", "/jobs/a/b"), ("v1", "/jobs"), ("v1", "/other"), ("v2", "/user.slice"),
                               ("v2", "/user.slice/x/y"), ("v2", "/jobs/a"), ("system", "/")]:
                pub.publish("oom", path, tree=tree, ring=False)  # type: ignore[arg-type]
            root.publish("oom", "/", tree="system")  # root reports on anything
            events = await got.wait_for(4)
    assert sorted(str(e.scope) for e in events) == ["system", "v1:/jobs/a/b", "v2:/user.slice", "v2:/user.slice/x/y"]
    assert src.counters()["rejected_scope"] == 4


def test_producer_scopes_are_checked_when_decoded() -> None:
    with pytest.raises(ConfigError, match=r"scope 'jobs' is not .* at `\$\.sources\[0\]\.producers\[0\]`"):
        config_from_dict({"sources": [{"kind": "shared-page", "directory": "/x",
                                       "producers": [{"uid": 1000, "scopes": ["jobs"]}]}]}, "o.toml")
    with pytest.raises(ConfigError, match="lists a uid twice"):
        config_from_dict({"sources": [{"kind": "shared-page", "directory": "/x", "producers": [
            {"uid": 1, "scopes": ["system"]}, {"uid": 1, "scopes": ["system"]}]}]}, "o.toml")


@pytest.mark.anyio
async def test_a_ring_cut_short_is_refused_and_the_others_go_on(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "oomkit.sources.shared_page")
    src = make_source(tmp_path, poll_interval_s=NEVER)
    with Publisher.create(tmp_path / "a.ring", capacity=8) as a, Publisher.create(tmp_path / "b.ring") as b:
        async with running(src) as got:
            a.publish("oom", "/a1")
            await got.wait_for(1)
            a.publish("oom", "/a2", ring=False)
            os.truncate(tmp_path / "a.ring", 100)
            b.publish("oom", "/b1")
            await got.wait_for(2)
            assert "a.ring" not in src.readers and src.stats.refused_rings == 1
    assert [e.scope.path for e in got.events] == ["/a1", "/b1"]
    assert any("cut to 100 bytes" in r.getMessage() for r in caplog.records)


def test_counters_are_a_snapshot(tmp_path: Path) -> None:
    src = make_source(tmp_path)
    c = src.counters()
    assert c == {"events": 0, "lost": 0, "stale": 0, "rejected": 0, "refused_rings": 0, "doorbell_wakes": 0,
                 "poll_wakes": 0, "scan_errors": 0, "rings": 0}
    c["events"] = 5
    assert src.counters()["events"] == 0


def test_a_doorbell_poll_reads_the_ring_that_rang_in_two_reads_and_an_idle_one_in_one(tmp_path: Path) -> None:
    src = make_source(tmp_path)
    with Publisher.create(tmp_path / "a.ring", capacity=8) as a, Publisher.create(tmp_path / "b.ring", capacity=8):
        assert src._rescan(full=True)
        reads = {name: 0 for name in src.readers}
        for name, reader in src.readers.items():
            real = reader._pread

            def pread(size: int, offset: int, name: str = name, real: Callable[[int, int], bytes] = real) -> bytes:
                reads[name] += 1
                return real(size, offset)

            reader._pread = pread  # type: ignore[method-assign]

        def collect(rang: bool) -> tuple[list[str], dict[str, int]]:
            got = [e.scope.path for e in src._collect(rang=rang)]
            out = dict(reads)
            reads.update(dict.fromkeys(reads, 0))
            return got, out

        a.publish("oom", "/1", ring=False)
        assert collect(True) == (["/1"], {"a.ring": 3, "b.ring": 1})  # write_seq, the copy, its second load
        a.publish("oom", "/2", ring=False)
        assert collect(True) == (["/2"], {"a.ring": 2, "b.ring": 1})  # the guess
        assert collect(False) == ([], {"a.ring": 1, "b.ring": 1})  # the slow poll never guesses
    assert src.stats.events == 2


@pytest.mark.anyio
async def test_a_doorbell_wake_tells_the_rings_it_rang(tmp_path: Path) -> None:
    src = make_source(tmp_path, poll_interval_s=NEVER)
    with Publisher.create(tmp_path / "a.ring", capacity=8) as pub:
        async with running(src) as got:
            pub.publish("oom", "/1")
            await got.wait_for(1)
            reader = src.readers["a.ring"]
            rangs: list[bool] = []
            real = reader.poll

            def poll(*, rang: bool = False) -> list[Record]:
                rangs.append(rang)
                return real(rang=rang)

            reader.poll = poll  # type: ignore[method-assign]
            pub.publish("oom", "/2")
            await got.wait_for(2)
    assert rangs and all(rangs)
