"""cgroup v1 pressure_level and usage-threshold sources on fake trees.

register_v1_event appends its line to the fake ``cgroup.event_control`` (a plain file, so
every registration stays readable, one line each) and returns a real eventfd, which the
tests signal as the kernel would.
"""

from __future__ import annotations

import logging
import shutil

import pytest

from oomkit.events import Scope
from oomkit.sources import build_source
from oomkit.sources.memcg_pressure import MemcgPressureSource, MemcgPressureSourceConfig
from oomkit.sources.memcg_threshold import MemcgThresholdSource, MemcgThresholdSourceConfig
from oomkit.testing import FakeCgroups, FakeProc, config_for
from tests.sources_support import cpu_ns, eventually, fire, running

pytestmark = pytest.mark.anyio

JOB = Scope(tree="v1", path="/job")


def pressure(fake_proc: FakeProc, fake_cgroups: FakeCgroups, **kw: object) -> MemcgPressureSource:
    spec = MemcgPressureSourceConfig(**kw)  # type: ignore[arg-type]
    src = build_source(spec, config_for(fake_proc, fake_cgroups, sources=(spec,)))
    assert isinstance(src, MemcgPressureSource)
    return src


def thresholds(fake_proc: FakeProc, fake_cgroups: FakeCgroups, **kw: object) -> MemcgThresholdSource:
    spec = MemcgThresholdSourceConfig(**kw)  # type: ignore[arg-type]
    src = build_source(spec, config_for(fake_proc, fake_cgroups, sources=(spec,)))
    assert isinstance(src, MemcgThresholdSource)
    return src


def efd(src: MemcgPressureSource | MemcgThresholdSource, scope: Scope, key: object) -> int:
    watch = src._watches[scope]
    return watch.events[key].efd  # type: ignore[attr-defined,no-any-return]


# --- pressure_level ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode, suffix", [("default", ""), ("hierarchy", ",hierarchy"), ("local", ",local")])
async def test_registers_one_eventfd_per_level_with_the_mode(
    fake_proc: FakeProc, fake_cgroups: FakeCgroups, mode: str, suffix: str
) -> None:
    d = fake_cgroups.mkdir_v1("/job")
    src = pressure(fake_proc, fake_cgroups, cgroups=("/job",), levels=("critical",), mode=mode)
    async with running(src):
        efd_, cfd = (d / "cgroup.event_control").read_text().split()[:2]
        assert (d / "cgroup.event_control").read_text() == f"{efd_} {cfd} critical{suffix}\n"


async def test_reports_the_highest_level_and_the_counts(fake_proc: FakeProc, fake_cgroups: FakeCgroups) -> None:
    fake_cgroups.mkdir_v1("/job")
    src = pressure(fake_proc, fake_cgroups, cgroups=("/job",), levels=("low", "medium", "critical"))
    async with running(src) as run:
        fire(efd(src, JOB, "low"), 3)
        fire(efd(src, JOB, "medium"), 2)
        ev = await run.next()
    assert (ev.kind, ev.scope) == ("pressure", JOB)
    # Both eventfds were signalled before the source woke: one event carries both.
    assert ev.values["pressure_level"] == 2
    assert ev.values["low_notifications"] == 3 and ev.values["medium_notifications"] == 2
    assert ev.values["critical_notifications"] == 0


async def test_a_storm_becomes_one_event_per_interval(fake_proc: FakeProc, fake_cgroups: FakeCgroups) -> None:
    fake_cgroups.mkdir_v1("/job")
    src = pressure(fake_proc, fake_cgroups, cgroups=("/job",), min_interval_s=0.3, clear_after_s=5)
    async with running(src) as run:
        fire(efd(src, JOB, "medium"))
        first = await run.next()
        assert first.values["pressure_level"] == 2
        for _ in range(2000):  # while paused, the kernel's counters add up
            fire(efd(src, JOB, "medium"))
            fire(efd(src, JOB, "critical"))
        events = [await run.next(timeout=10)]
        events += await run.quiet(0.5)  # and nothing after it
    assert len(events) == 1
    assert events[0].values["medium_notifications"] == 2000
    assert events[0].values["critical_notifications"] == 2000
    assert events[0].values["pressure_level"] == 3


async def test_clears_after_a_quiet_spell(fake_proc: FakeProc, fake_cgroups: FakeCgroups) -> None:
    fake_cgroups.mkdir_v1("/job")
    src = pressure(fake_proc, fake_cgroups, cgroups=("/job",), min_interval_s=0.05, clear_after_s=0.3)
    async with running(src) as run:
        fire(efd(src, JOB, "critical"))
        ev = await run.next()
        assert src.still_holds(ev)
        cleared = await run.next(timeout=10)
        assert cleared.kind == "pressure-cleared" and cleared.values["quiet_s"] >= 0.3
        assert not src.still_holds(ev)


async def test_removed_while_the_event_is_in_flight(
    fake_proc: FakeProc, fake_cgroups: FakeCgroups, caplog: pytest.LogCaptureFixture
) -> None:
    d = fake_cgroups.mkdir_v1("/job")
    fake_cgroups.mkdir_v1("/other")
    src = pressure(fake_proc, fake_cgroups, cgroups=("/job", "/other"))
    caplog.set_level(logging.INFO, "oomkit.sources")
    async with running(src) as run:
        medium = efd(src, JOB, "medium")
        shutil.rmtree(d)
        fire(medium)  # the kernel signals every listener once as it removes the memcg
        await eventually(lambda: src.watching == [Scope(tree="v1", path="/other")], "the removed memcg dropped")
        assert run.pending() == []
        before = cpu_ns()
        await run.quiet(1.0)
        assert cpu_ns() - before < 100_000_000
        fire(efd(src, Scope(tree="v1", path="/other"), "critical"))
        assert (await run.next()).scope.path == "/other"
    assert sum("v1:/job" in r.getMessage() for r in caplog.records) == 1


async def test_a_memcg_without_pressure_level_is_refused_once(
    fake_proc: FakeProc, fake_cgroups: FakeCgroups, caplog: pytest.LogCaptureFixture
) -> None:
    d = fake_cgroups.mkdir_v1("/job")
    (d / "memory.pressure_level").unlink()
    src = pressure(fake_proc, fake_cgroups, cgroups=("/job",))
    async with running(src):
        assert src.watching == []
    assert src.faults == 1
    [msg] = [r.getMessage() for r in caplog.records if "cannot watch" in r.getMessage()]
    assert "memory.pressure_level" in msg and "ENOENT" in msg


# --- usage thresholds -------------------------------------------------------------------------


async def test_thresholds_report_each_crossing_both_ways(fake_proc: FakeProc, fake_cgroups: FakeCgroups) -> None:
    mib = 1 << 20
    d = fake_cgroups.mkdir_v1("/job", limit=400 * mib, usage=10 * mib)
    src = thresholds(fake_proc, fake_cgroups, cgroups=("/job",), thresholds=("100M", "50%"))
    async with running(src) as run:
        lines = (d / "cgroup.event_control").read_text()
        assert lines.endswith(f" {200 * mib}\n")  # 50 % of the limit, in bytes

        async def usage(n: int, count: int = 1) -> list[tuple[float, float]]:
            (d / "memory.usage_in_bytes").write_text(f"{n * mib}\n")
            fire(efd(src, JOB, 0))
            out = [await run.next() for _ in range(count)]
            out += await run.quiet(0.05)  # and no more
            return [(e.values["threshold_bytes"] / mib, e.values["direction"]) for e in out]

        assert await usage(150) == [(100, 1)]
        assert await usage(250) == [(200, 1)]
        assert sorted(await usage(50, 2)) == [(100, -1), (200, -1)]
        (d / "memory.usage_in_bytes").write_text(f"{120 * mib}\n")
        fire(efd(src, JOB, 0))
        ev = await run.next()
        assert ev.kind == "threshold" and ev.values["usage_bytes"] == 120 * mib
        assert src.still_holds(ev)
        (d / "memory.usage_in_bytes").write_text(f"{90 * mib}\n")
        assert not src.still_holds(ev)


async def test_a_share_of_no_limit_is_refused(
    fake_proc: FakeProc, fake_cgroups: FakeCgroups, caplog: pytest.LogCaptureFixture
) -> None:
    fake_cgroups.mkdir_v1("/job")  # unlimited
    src = thresholds(fake_proc, fake_cgroups, cgroups=("/job",), thresholds=("90%",))
    async with running(src):
        assert src.watching == []
    assert any("has none" in r.getMessage() for r in caplog.records)


async def test_threshold_memcg_removed_in_flight(fake_proc: FakeProc, fake_cgroups: FakeCgroups) -> None:
    d = fake_cgroups.mkdir_v1("/job", limit=1 << 30)
    src = thresholds(fake_proc, fake_cgroups, cgroups=("/job",), thresholds=("1M",))
    async with running(src) as run:
        fd = efd(src, JOB, 0)
        shutil.rmtree(d)
        fire(fd)
        await eventually(lambda: src.watching == [], "the removed memcg dropped")
        assert run.pending() == []
    assert src.faults == 0  # a vanished cgroup is not a fault
