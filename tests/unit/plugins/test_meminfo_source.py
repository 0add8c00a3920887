"""MeminfoSource on a fake /proc: the condition, the adaptive interval, errors."""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
from pathlib import Path

import anyio
import pytest

from oomkit import Config, ConfigError, Event
from oomkit.config import config_from_dict
from oomkit.procfs import read_meminfo
from oomkit.sources.meminfo import MeminfoError, MeminfoSource, MeminfoSourceConfig, Reading
from oomkit.testing import FakeProc, paths_for

GiB, MiB = 1 << 30, 1 << 20


def source(proc: FakeProc, **spec: object) -> MeminfoSource:
    return MeminfoSource(MeminfoSourceConfig(**spec), Config(paths=paths_for(proc)))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("available", "swap_total", "swap_free", "low"),
    [
        (GiB // 2, 0, 0, True),  # no swap counts as swap exhausted
        (2 * GiB, 0, 0, False),
        (GiB // 2, 4 * GiB, GiB, False),  # swap still has room
        (GiB // 2, 4 * GiB, GiB // 4, True),
        (2 * GiB, 4 * GiB, 0, False),  # swap gone, but memory is fine
    ],
)
def test_low_means_both_under_their_thresholds(
    fake_proc: FakeProc, available: int, swap_total: int, swap_free: int, low: bool
) -> None:
    fake_proc.set_meminfo(mem_total=10 * GiB, mem_available=available, swap_total=swap_total, swap_free=swap_free)
    assert source(fake_proc).read().low is low  # 10 % of 10 GiB is 1 GiB; 10 % of 4 GiB is 410 MiB


def test_thresholds_can_be_sizes(fake_proc: FakeProc) -> None:
    fake_proc.set_meminfo(mem_total=10 * GiB, mem_available=600 * MiB)
    src = source(fake_proc, mem_available="512M", swap_free=0)
    assert not src.read().low
    fake_proc.set_meminfo(mem_total=10 * GiB, mem_available=500 * MiB)
    reading = src.read()
    assert reading.low
    assert reading.values() == {
        "mem_total_bytes": 10 * GiB,
        "mem_available_bytes": 500 * MiB,
        "mem_threshold_bytes": 512 * MiB,
        "swap_total_bytes": 0,
        "swap_free_bytes": 0,
        "swap_threshold_bytes": 0,
    }


@pytest.mark.parametrize(
    ("available", "swap_free", "interval"),
    [
        (20 * GiB, 0, 3.0),  # 19 GiB away at 1 GiB/s: the slowest poll
        (GiB + 300 * MiB, 0, 300 / 1024),  # 300 MiB away: 0.29 s
        (GiB + 300 * MiB, 200 * MiB, 400 / 1024),  # swap must fill too: 0.39 s
        (GiB + 5 * MiB, 0, 0.01),  # close: the fastest poll
        (GiB // 2, 0, 0.01),  # under the threshold: the fastest poll
    ],
)
def test_interval_is_distance_over_fill_rate_clamped(
    fake_proc: FakeProc, available: int, swap_free: int, interval: float
) -> None:
    fake_proc.set_meminfo(mem_total=10 * GiB, mem_available=available, swap_total=GiB, swap_free=swap_free)
    src = source(fake_proc, mem_available="1G", swap_free="100M", fill_rate_per_s="1G")
    assert src.interval(src.read()) == pytest.approx(interval)


def test_read_meminfo_parses_only_the_keys_asked_for(fake_proc: FakeProc) -> None:
    (fake_proc.root / "meminfo").write_text(
        "MemTotal:       10485760 kB\nMemAvailable:    1048576 kB\nHugePages_Total:       7\nSwapTotal:  0 kB"
    )  # the last line without its newline, a count without a unit
    want = ("MemTotal", "HugePages_Total", "SwapTotal", "SwapFree", "Total")
    assert read_meminfo(str(fake_proc.root), want) == {
        "MemTotal": 10 * GiB, "HugePages_Total": 7, "SwapTotal": 0,  # absent keys are left out, not guessed
    }
    assert read_meminfo(str(fake_proc.root)) == {
        "MemTotal": 10 * GiB, "MemAvailable": GiB, "HugePages_Total": 7, "SwapTotal": 0,
    }


@pytest.mark.parametrize(
    "line",
    [
        "MemAvailable:    1048576 kB extra",  # trailing text: was read as 1048576 bytes
        "MemAvailable:    1048576 MB",  # another unit: was read 1024x too small
        "MemAvailable:    -5 kB",
        "MemAvailable:",
        "MemAvailable:    12.5 kB",
    ],
)
def test_one_meminfo_parser_strict_about_units(fake_proc: FakeProc, line: str) -> None:
    (fake_proc.root / "meminfo").write_text(f"MemTotal:       10485760 kB\n{line}\nSwapTotal:  0 kB\n")
    # Both ways of reading refuse the same line with the same words.
    for keys in (("MemTotal", "MemAvailable"), None):
        with pytest.raises(ValueError, match=r"^not a meminfo line: 'MemAvailable:.*'$"):
            read_meminfo(str(fake_proc.root), keys)
    with pytest.raises(MeminfoError, match=r"unexpected content: not a meminfo line"):
        source(fake_proc).read()


def test_oomkit_serve_without_memavailable_is_one_line(fake_proc: FakeProc, tmp_path: Path) -> None:
    (fake_proc.root / "meminfo").write_text("MemTotal: 1024 kB\nMemFree: 10 kB\n")
    config = tmp_path / "oomkit.toml"
    config.write_text(f'[paths]\nproc = "{fake_proc.root}"\nrun_dir = "{tmp_path / "run"}"\n[daemon]\nmlockall = false\n')
    run = subprocess.run(
        [sys.executable, "-m", "oomkit", "serve", "-c", str(config), "--dry-run", "--log-level", "error"],
        capture_output=True, text=True, timeout=120,
    )
    assert run.returncode == 1, run.stderr
    assert run.stderr.splitlines() == [
        f"oomkit: error: {fake_proc.root}/meminfo: no MemAvailable line (MemAvailable needs Linux 3.14)"
    ]


def test_still_holds_reads_meminfo_again(fake_proc: FakeProc) -> None:
    fake_proc.set_meminfo(mem_total=10 * GiB, mem_available=GiB // 2)
    src = source(fake_proc)
    event = Event(source=src.name, kind="low-memory")
    assert src.still_holds(event)
    fake_proc.set_meminfo(mem_total=10 * GiB, mem_available=5 * GiB)
    assert not src.still_holds(event)


def test_unreadable_or_incomplete_meminfo_is_a_clear_error(fake_proc: FakeProc) -> None:
    path = fake_proc.root / "meminfo"
    path.write_text("MemTotal: 1024 kB\nMemFree: 10 kB\n")
    with pytest.raises(MeminfoError, match=rf"^{path}: no MemAvailable line \(MemAvailable needs Linux 3.14\)$"):
        source(fake_proc).read()
    path.unlink()
    with pytest.raises(MeminfoError, match=rf"^{path}: cannot read: No such file or directory$"):
        source(fake_proc).read()


@pytest.mark.anyio
async def test_run_emits_low_memory_events_while_low(fake_proc: FakeProc) -> None:
    fake_proc.set_meminfo(mem_total=10 * GiB, mem_available=5 * GiB)
    src = source(fake_proc, interval_min_s=0.01, interval_max_s=0.02)
    got: list[Event] = []

    async def emit(event: Event) -> None:
        got.append(event)
        tg.cancel_scope.cancel()

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            await tg.start(src.run, emit)
            await anyio.sleep(0.05)
            assert got == []  # not low: nothing
            fake_proc.set_meminfo(mem_total=10 * GiB, mem_available=GiB // 2)
    assert [(e.source, e.kind, e.values["mem_available_bytes"]) for e in got] == [("meminfo", "low-memory", GiB // 2)]


@pytest.mark.anyio
async def test_cancelling_the_source_ends_its_poller_thread_at_once(fake_proc: FakeProc) -> None:
    fake_proc.set_meminfo(mem_total=10 * GiB, mem_available=5 * GiB)
    ended = threading.Event()

    class Watched(MeminfoSource):
        def _until_low(self, reading: Reading | None, stop: threading.Lock) -> Reading | None:
            try:
                return super()._until_low(reading, stop)
            finally:
                ended.set()

    src = Watched(MeminfoSourceConfig(interval_min_s=20, interval_max_s=20), Config(paths=paths_for(fake_proc)))

    async def emit(event: Event) -> None:
        raise AssertionError("nothing is low")

    # Both waits are bounded: the source must not hold up its task group (the thread is
    # abandoned) and the thread must end (the stop signal), each far sooner than its 20 s.
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            await tg.start(src.run, emit)
            await anyio.sleep(0.05)  # the thread is now in its 20 s wait
            tg.cancel_scope.cancel()
    with anyio.fail_after(5):
        while not ended.is_set():
            await anyio.sleep(0.01)


@pytest.mark.anyio
async def test_run_refuses_to_arm_when_meminfo_is_unreadable(fake_proc: FakeProc) -> None:
    (fake_proc.root / "meminfo").unlink()

    async def emit(event: Event) -> None:
        raise AssertionError("never")

    started = False

    class Status:
        def started(self, value: None = None) -> None:
            nonlocal started
            started = True

    # Raising before task_status.started() is how a source refuses to let the engine start.
    with pytest.raises(MeminfoError, match="meminfo: cannot read: No such file or directory"):
        await source(fake_proc).run(emit, task_status=Status())
    assert not started


@pytest.mark.anyio
async def test_a_read_failure_while_running_is_logged_once_counted_and_polled_slowly(
    fake_proc: FakeProc, caplog: pytest.LogCaptureFixture
) -> None:
    src = source(fake_proc, interval_min_s=0.01, interval_max_s=0.02)
    path = fake_proc.root / "meminfo"

    async def emit(event: Event) -> None:
        raise AssertionError("nothing is low")

    with caplog.at_level(logging.WARNING, logger="oomkit.sources.meminfo"):
        async with anyio.create_task_group() as tg:
            await tg.start(src.run, emit)
            saved = path.read_bytes()
            path.unlink()
            with anyio.fail_after(10):
                while src.read_failures < 3:
                    await anyio.sleep(0.01)
            path.write_bytes(saved)
            with anyio.fail_after(10):
                while not any("readable again" in r.getMessage() for r in caplog.records):
                    await anyio.sleep(0.01)
            tg.cancel_scope.cancel()
    assert [r.levelname for r in caplog.records] == ["ERROR", "WARNING"]
    assert caplog.records[0].getMessage() == (
        f"source meminfo: {path}: cannot read: No such file or directory (retrying every 0.02 s)"
    )


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"fill_rate": "1G"}, "Object contains unknown field `fill_rate` - at `$.sources[0]`"),
        ({"fill_rate_per_s": "fast"}, "expected a size such as 4096, '64K', '512MiB' or '2G', got 'fast'"
         " - at `$.sources[0]`"),
        ({"fill_rate_per_s": 0}, "Expected `int` >= 1 - at `$.sources[0].fill_rate_per_s`"),
        ({"fill_rate_per_s": "0K"}, "`fill_rate_per_s` must be positive - at `$.sources[0]`"),
        ({"mem_available": "110%"}, "a percentage must be between 0 and 100, got '110%' - at `$.sources[0]`"),
    ],
)
def test_bad_source_config_names_the_file_and_key(table: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        config_from_dict({"sources": [{"kind": "meminfo", **table}]}, "/etc/oomkit.toml")
    assert str(info.value) == f"/etc/oomkit.toml: {message}"
