"""The PSI source on fake trees: its fallback ladder, trigger mode, poll mode, faults."""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from oomkit.events import SYSTEM, Event, Scope
from oomkit.poller import Poller
from oomkit.sources import build_source
from oomkit.sources.psi import PsiSource, PsiSourceConfig
from oomkit.testing import FakeCgroups, FakeProc, config_for
from tests.sources_support import Running, cpu_ns, eventually, running

pytestmark = pytest.mark.anyio

CAP_SYS_RESOURCE_ONLY = "0000000001000000"


def psi(fake_proc: FakeProc, fake_cgroups: FakeCgroups | None = None, **kw: object) -> PsiSource:
    spec = PsiSourceConfig(**kw)  # type: ignore[arg-type]
    src = build_source(spec, config_for(fake_proc, fake_cgroups, sources=(spec,)))
    assert isinstance(src, PsiSource)
    return src


def set_caps(proc: FakeProc, capeff: str) -> None:
    (proc.root / "self" / "status").write_text(f"Name:\tpython\nCapEff:\t{capeff}\n")


def set_total(d: Path, some_us: int) -> None:
    (d / "memory.pressure").write_text(
        f"some avg10=1.00 avg60=0.00 avg300=0.00 total={some_us}\n"
        f"full avg10=0.00 avg60=0.00 avg300=0.00 total=0\n"
    )


async def sustain(run: Running, d: Path, until: str = "pressure", step_us: int = 400_000) -> Event:
    """Grow ``d``'s stall total every 50 ms until the source reports ``until``.

    Sustained, not one step: a poll-mode source judges growth between its own samples, and
    on a busy machine its first sample may come after any single step."""
    total = 0
    with anyio.fail_after(10):
        while True:
            total += step_us
            set_total(d, total)
            for ev in await run.quiet(0.05):
                if ev.kind == until:
                    return ev


class FakeTriggers:
    """Stands in for the kernel's trigger files: each accepted trigger is a TCP socket that
    raises POLLPRI when :meth:`fire` sends urgent data, as a PSI trigger fd does."""

    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.calls: list[tuple[str, str, int, int]] = []
        self.refuse: set[str] = set()
        self.pairs: list[tuple[socket.socket, socket.socket]] = []

    def open(self, path: str | os.PathLike[str], line: str, stall_us: int, window_us: int) -> int:
        self.calls.append((str(path), line, stall_us, window_us))
        if str(path) in self.refuse or window_us % 2_000_000 and "strict" in self.refuse:
            raise OSError(22, "Invalid argument")
        client = socket.create_connection(self.server.getsockname())
        peer, _ = self.server.accept()
        self.pairs.append((client, peer))
        return os.dup(peer.fileno())

    def fire(self, i: int = -1) -> None:
        self.pairs[i][0].send(b"!", socket.MSG_OOB)

    def close(self) -> None:
        for a, b in self.pairs:
            a.close()
            b.close()
        self.server.close()


@pytest.fixture
def triggers(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeTriggers]:
    t = FakeTriggers()
    monkeypatch.setattr("oomkit.sources.psi.open_trigger", t.open)
    yield t
    t.close()


async def test_unprivileged_rounds_the_window_up(fake_proc: FakeProc, triggers: FakeTriggers) -> None:
    set_caps(fake_proc, "0")
    src = psi(fake_proc, window_s=0.5, stall_ms=50)
    async with running(src):
        pass
    assert triggers.calls == [(f"{fake_proc.path}/pressure/memory", "some", 50_000, 2_000_000)]


async def test_privileged_tries_the_exact_window_first(fake_proc: FakeProc, triggers: FakeTriggers) -> None:
    set_caps(fake_proc, CAP_SYS_RESOURCE_ONLY)
    triggers.refuse.add("strict")  # the kernel here refuses sub-2 s windows even so
    src = psi(fake_proc, window_s=0.5, line="full")
    async with running(src):
        assert src.watching == [SYSTEM]
    assert [c[3] for c in triggers.calls] == [500_000, 2_000_000]


async def test_system_falls_back_to_the_v2_root(
    fake_proc: FakeProc, fake_cgroups: FakeCgroups, triggers: FakeTriggers, caplog: pytest.LogCaptureFixture
) -> None:
    set_caps(fake_proc, "0")
    triggers.refuse.add(f"{fake_proc.path}/pressure/memory")
    src = psi(fake_proc, fake_cgroups)
    with caplog.at_level(logging.INFO, "oomkit.sources.psi"):
        async with running(src) as run:
            triggers.fire()
            ev = await run.until("pressure")
    assert triggers.calls[-1][0] == str(fake_cgroups.unified / "memory.pressure")
    assert ev.scope == SYSTEM and ev.values["trigger_window_us"] == 2_000_000
    assert ev.values["some_avg10_pct"] == 0.0 and "full_total_us" in ev.values
    [msg] = [r.getMessage() for r in caplog.records if "trigger" in r.getMessage()]
    assert "unified/memory.pressure" in msg and "refused" in msg and "Invalid argument" in msg


async def test_trigger_reports_then_clears_after_two_quiet_windows(
    fake_proc: FakeProc, fake_cgroups: FakeCgroups, triggers: FakeTriggers
) -> None:
    set_caps(fake_proc, CAP_SYS_RESOURCE_ONLY)
    fake_cgroups.mkdir_v2("/job")
    src = psi(fake_proc, fake_cgroups, cgroups=("/job",), window_s=0.5)
    async with running(src) as run:
        triggers.fire()
        ev = await run.next()
        assert (ev.kind, ev.scope) == ("pressure", Scope(tree="v2", path="/job"))
        assert src.still_holds(ev)
        cleared = await run.next(timeout=10)
        assert cleared.kind == "pressure-cleared"
        assert not src.still_holds(ev)


async def test_trigger_hangup_ends_the_watch_and_stays_idle(
    fake_proc: FakeProc, fake_cgroups: FakeCgroups, triggers: FakeTriggers, caplog: pytest.LogCaptureFixture
) -> None:
    set_caps(fake_proc, CAP_SYS_RESOURCE_ONLY)
    fake_cgroups.mkdir_v2("/job")
    src = psi(fake_proc, fake_cgroups, cgroups=("/job",))
    caplog.set_level(logging.INFO, "oomkit.sources")
    async with running(src) as run:
        # What the kernel does when the cgroup goes: the trigger fd reports an error/hangup.
        triggers.pairs[-1][1].shutdown(socket.SHUT_RDWR)
        await eventually(lambda: src.watching == [], "the watch ended")
        assert run.pending() == []
        before = cpu_ns()
        assert await run.quiet(1.0) == []
        assert cpu_ns() - before < 100_000_000  # idle: nothing spins on the dead fd
    assert sum("stopped watching" in r.getMessage() for r in caplog.records) == 1


async def test_poll_mode_reports_pressure_and_its_clearing(
    fake_proc: FakeProc, fake_cgroups: FakeCgroups, caplog: pytest.LogCaptureFixture
) -> None:
    # Fake pressure files are plain files, which cannot be polled: every rung of the ladder
    # refuses them, down to polling.
    d = fake_cgroups.mkdir_v2("/job")
    src = psi(fake_proc, fake_cgroups, cgroups=("/job",), window_s=0.5, stall_ms=100, poll_interval_s=0.05)
    with caplog.at_level(logging.INFO):
        async with running(src) as run:
            ev = await sustain(run, d)
            assert ev.values["window_stall_us"] >= 100_000
            assert src.still_holds(ev)
            # The total stops growing: pressure clears once a window holds too little stall
            # (a report or two more may come first, at most one per window).
            cleared = await run.until("pressure-cleared", timeout=10)
            assert cleared.values["window_stall_us"] < 100_000
    assert any("polling" in r.getMessage() and "Operation not permitted" in r.getMessage() for r in caplog.records)


def test_poll_mode_reports_at_most_once_per_window(fake_proc: FakeProc, fake_cgroups: FakeCgroups) -> None:
    # Driven by a clock the test controls: 3 s of sustained pressure sampled every 20 ms,
    # however fast or slow this machine is today.
    d = fake_cgroups.mkdir_v2("/job")
    src = psi(fake_proc, fake_cgroups, cgroups=("/job",), window_s=1.0, stall_ms=10, poll_interval_s=0.02)
    poller = Poller[object]()
    try:
        watch = src.open_watch(Scope(tree="v2", path="/job"), poller)  # type: ignore[arg-type]
        reports: list[tuple[float, str]] = []
        for i in range(151):
            now = 100.0 + i * 0.02
            set_total(d, 20_000 * (i + 1))
            reports += [(now, e.kind) for e in watch.tick(now)]
        watch.close()
    finally:
        poller.close()
    assert [kind for _, kind in reports] == ["pressure"] * 3
    times = [t for t, _ in reports]
    assert all(later - earlier >= 1.0 for earlier, later in zip(times, times[1:])), times


async def test_unreadable_scope_is_refused_and_the_rest_goes_on(
    fake_proc: FakeProc, fake_cgroups: FakeCgroups, caplog: pytest.LogCaptureFixture
) -> None:
    bad = fake_cgroups.mkdir_v2("/bad")
    (bad / "memory.pressure").write_text("garbage\n")
    good = fake_cgroups.mkdir_v2("/good")
    src = psi(fake_proc, fake_cgroups, cgroups=("/*",), window_s=0.5, poll_interval_s=0.05)
    async with running(src) as run:
        assert src.watching == [Scope(tree="v2", path="/good")]
        assert (await sustain(run, good)).scope == Scope(tree="v2", path="/good")
    assert src.faults == 1
    assert sum("cannot watch v2:/bad" in r.getMessage() for r in caplog.records) == 1


async def test_poll_mode_reads_the_experimental_format(fake_proc: FakeProc, fake_cgroups: FakeCgroups) -> None:
    d = fake_cgroups.mkdir_v2("/old")
    (d / "memory.pressure").write_text("aggr 1\nsome 0.00 0.00 0.00\nfull 0.00 0.00 0.00\n")
    src = psi(fake_proc, fake_cgroups, cgroups=("/old",), window_s=1.0, stall_ms=100, poll_interval_s=0.02)
    async with running(src) as run:
        await run.quiet(0.05)
        (d / "memory.pressure").write_text("aggr 1\nsome 25.00 5.00 1.00\nfull 0.00 0.00 0.00\n")
        ev = await run.next()
        # 25 % of a 1 s window: 250 ms of stall, over the 100 ms trigger.
        assert ev.kind == "pressure" and ev.values["window_stall_us"] == pytest.approx(250_000)
        (d / "memory.pressure").write_text("aggr 1\nsome 1.00 5.00 1.00\nfull 0.00 0.00 0.00\n")
        assert (await run.next()).kind == "pressure-cleared"


async def test_a_file_without_the_watched_line_ends_only_its_own_watch(
    fake_proc: FakeProc, fake_cgroups: FakeCgroups, caplog: pytest.LogCaptureFixture
) -> None:
    # Once broke the whole source (a KeyError out of the poll) for every cgroup it watched.
    odd = fake_cgroups.mkdir_v2("/odd")
    good = fake_cgroups.mkdir_v2("/good")
    set_total(odd, 0)
    set_total(good, 0)
    src = psi(fake_proc, fake_cgroups, cgroups=("/*",), line="full", window_s=0.5, poll_interval_s=0.02)
    async with running(src) as run:
        await run.quiet(0.05)
        (odd / "memory.pressure").write_text("some avg10=0.00 avg60=0.00 avg300=0.00 total=5\n")
        with anyio.fail_after(10):
            while src.watching != [Scope(tree="v2", path="/good")]:
                await anyio.sleep(0.02)
        (good / "memory.pressure").write_text(
            "some avg10=0.00 avg60=0.00 avg300=0.00 total=0\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=900000\n"
        )
        assert (await run.until("pressure")).scope == Scope(tree="v2", path="/good")
    assert sum("has no `full` line" in r.getMessage() for r in caplog.records) == 1


async def test_follows_new_and_removed_cgroups(fake_proc: FakeProc, fake_cgroups: FakeCgroups) -> None:
    src = psi(fake_proc, fake_cgroups, cgroups=("/work/*",), window_s=0.5, poll_interval_s=0.05)
    fake_cgroups.mkdir_v2("/work")
    async with running(src) as run:
        assert src.watching == []
        d = fake_cgroups.mkdir_v2("/work/new")
        await eventually(lambda: src.watching == [Scope(tree="v2", path="/work/new")], "the new cgroup watched")
        assert (await sustain(run, d)).scope.path == "/work/new"
        fake_cgroups.rmdir_v2("/work/new")
        await eventually(lambda: src.watching == [], "the removed cgroup dropped")
