"""The v2 usage-threshold source (``memory-threshold``) on fake trees: the test writes
``memory.current`` and ``memory.max`` as the kernel would."""

from __future__ import annotations

import logging

import msgspec
import pytest

from oomkit.config import ConfigError, config_from_dict
from oomkit.events import Scope
from oomkit.sources import build_source
from oomkit.sources.memory_threshold import MemoryThresholdSource, MemoryThresholdSourceConfig, next_interval
from oomkit.testing import FakeCgroups, FakeProc, config_for
from tests.sources_support import eventually, running

MiB = 1 << 20
JOB = Scope("v2", "/job")


def source(fake_proc: FakeProc, fake_cgroups: FakeCgroups, **kw: object) -> MemoryThresholdSource:
    kw.setdefault("cgroups", ("/job",))
    kw.setdefault("interval_max_s", 0.05)
    spec = MemoryThresholdSourceConfig(**kw)  # type: ignore[arg-type]
    src = build_source(spec, config_for(fake_proc, fake_cgroups, sources=(spec,)))
    assert isinstance(src, MemoryThresholdSource)
    return src


def test_the_interval_is_the_time_to_the_nearest_threshold_within_its_bounds() -> None:
    rate = 1000 * MiB
    assert next_interval(100 * MiB, [600 * MiB, 900 * MiB], rate, 0.01, 1.0) == pytest.approx(0.5)
    assert next_interval(700 * MiB, [600 * MiB, 900 * MiB], rate, 0.01, 1.0) == pytest.approx(0.1)  # back down too
    assert next_interval(0, [1 << 40], rate, 0.01, 1.0) == 1.0
    assert next_interval(600 * MiB, [600 * MiB], rate, 0.01, 1.0) == 0.01


@pytest.mark.parametrize(("raw", "message"), [
    ({"cgroups": []}, "`cgroups` needs at least one cgroup"),
    ({"thresholds": []}, "`thresholds` needs at least one threshold"),
    ({"thresholds": ["90 %%"]}, "90 %%"),
    ({"interval_min_s": 2.0, "interval_max_s": 1.0}, "`interval_min_s` cannot be longer than `interval_max_s`"),
    ({"interval_min_s": float("nan")}, "interval_min_s"),
    ({"fill_rate_per_s": "0"}, "fill_rate_per_s"),
])
def test_bad_settings_are_one_line_errors_naming_the_key(raw: dict[str, object], message: str) -> None:
    table = {"kind": "memory-threshold", "cgroups": ["/job"], "thresholds": ["90%"], **raw}
    with pytest.raises(ConfigError) as err:
        config_from_dict({"sources": [table]}, "oomkit.toml")
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.anyio
async def test_crossings_up_and_down_and_a_threshold_passed_before_the_start(
    fake_proc: FakeProc, fake_cgroups: FakeCgroups
) -> None:
    d = fake_cgroups.mkdir_v2("/job")
    FakeCgroups.set_memory(d, max=100 * MiB, current=60 * MiB)
    async with running(source(fake_proc, fake_cgroups, thresholds=("50%", "80M"))) as run:
        first = await run.until("threshold")  # 50 % was passed before the source started
        assert first.scope == JOB and first.values == {
            "usage_bytes": 60 * MiB, "threshold_bytes": 50 * MiB, "direction": 1.0, "limit_bytes": 100 * MiB}
        FakeCgroups.set_memory(d, current=90 * MiB)
        up = await run.until("threshold")
        assert (up.values["threshold_bytes"], up.values["direction"]) == (80 * MiB, 1.0)
        assert run.source.still_holds(up)
        FakeCgroups.set_memory(d, current=10 * MiB)
        downs = [await run.until("threshold"), await run.until("threshold")]
        assert sorted(e.values["threshold_bytes"] for e in downs) == [50 * MiB, 80 * MiB]
        assert all(e.values["direction"] == -1.0 for e in downs)
        assert not run.source.still_holds(up) and not run.source.still_holds(downs[0])
        assert await run.quiet(0.2) == []  # nothing crosses: nothing said


@pytest.mark.anyio
async def test_percentages_follow_memory_max_and_swap_counts_when_asked(
    fake_proc: FakeProc, fake_cgroups: FakeCgroups
) -> None:
    d = fake_cgroups.mkdir_v2("/job")
    FakeCgroups.set_memory(d, max=100 * MiB, current=40 * MiB)
    (d / "memory.swap.current").write_text(f"{20 * MiB}\n")
    async with running(source(fake_proc, fake_cgroups, thresholds=("50%",), swap=True)) as run:
        ev = await run.until("threshold")  # 40 + 20 MiB of swap: over half of 100 MiB
        assert ev.values["usage_bytes"] == 60 * MiB
        FakeCgroups.set_memory(d, max=200 * MiB)  # resized in place: 50 % is 100 MiB now
        down = await run.until("threshold")
        assert down.values == {"usage_bytes": 60 * MiB, "threshold_bytes": 100 * MiB, "direction": -1.0,
                               "limit_bytes": 200 * MiB}


@pytest.mark.anyio
async def test_a_percentage_without_a_limit_and_a_garbled_file_are_refused_and_counted(
    fake_proc: FakeProc, fake_cgroups: FakeCgroups, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    fake_cgroups.mkdir_v2("/pods")
    free, garbled, good = (fake_cgroups.mkdir_v2(f"/pods/{n}") for n in ("free", "garbled", "good"))
    FakeCgroups.set_memory(free, max="max", current=MiB)
    FakeCgroups.set_memory(good, max=100 * MiB, current=MiB)
    FakeCgroups.set_memory(garbled, max=100 * MiB)
    (garbled / "memory.current").write_text("nan\n")
    src = source(fake_proc, fake_cgroups, cgroups=("/pods/*",), thresholds=("90%",))
    async with running(src):
        assert src.watching == [Scope("v2", "/pods/good")] and src.faults == 2
        assert "memory.max is 'max': a percentage threshold needs a limit ('90%')" in caplog.text
        assert "memory.current reads 'nan', not a size" in caplog.text
        FakeCgroups.set_memory(good, current=99 * MiB)
        (good / "memory.current").write_text("9" * 30 + "\n")  # not a size: that watch ends, counted
        await eventually(lambda: src.watching == [], "the garbled one dropped")
        assert src.faults == 3


@pytest.mark.anyio
async def test_a_removed_cgroup_ends_its_watch_quietly(fake_proc: FakeProc, fake_cgroups: FakeCgroups) -> None:
    fake_cgroups.mkdir_v2("/pods")
    a = fake_cgroups.mkdir_v2("/pods/a")
    FakeCgroups.set_memory(a, max=100 * MiB, current=MiB)
    src = source(fake_proc, fake_cgroups, cgroups=("/pods/*",), thresholds=("64M",))
    async with running(src):
        await eventually(lambda: src.watching == [Scope("v2", "/pods/a")], "watched")
        fake_cgroups.rmdir_v2("/pods/a")
        await eventually(lambda: src.watching == [], "dropped")
        assert src.faults == 0


def test_the_settings_are_frozen_and_bounded() -> None:
    spec = msgspec.convert({"kind": "memory-threshold", "cgroups": ["/job"], "thresholds": ["1G"]},
                           MemoryThresholdSourceConfig)
    assert spec.interval_min_s == 0.01 and spec.interval_max_s == 1.0 and not spec.swap
    with pytest.raises(AttributeError):
        spec.swap = True  # type: ignore[misc]
