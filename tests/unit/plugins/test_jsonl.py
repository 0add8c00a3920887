"""JsonLines: one decision per line, to a file or stdout; failures logged once and counted;
memory samples of warm scopes at a bounded rate, in whole lines beside the decisions."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import msgspec
import pytest

from oomkit import ConfigError, Decision, Event, Scope
from oomkit.records import MemorySample, ProcessSample, read_log
from oomkit.testing import FakeProc
from oomkit_plugins.jsonl import JsonLines

from .support import config, configured

pytestmark = pytest.mark.anyio


DECISIONS = [Decision(id=n, event=Event(source="t", kind="low-memory"), outcome="no-candidates") for n in range(4)]


def decision(n: int) -> Decision:
    return DECISIONS[n]


async def test_each_decision_is_appended_as_one_line(fake_proc: FakeProc, tmp_path: Path) -> None:
    out = tmp_path / "decisions.jsonl"
    out.write_bytes(b'{"earlier":"line"}\n')
    plugin = configured(JsonLines(), config(fake_proc, jsonl={"path": str(out)}))
    await plugin.oomkit_notify(decision(1))
    await plugin.oomkit_notify(decision(2))
    lines = out.read_bytes().splitlines()
    assert lines[0] == b'{"earlier":"line"}'
    assert [msgspec.json.decode(ln, type=Decision) for ln in lines[1:]] == [decision(1), decision(2)]


async def test_default_is_stdout(fake_proc: FakeProc, capfdbinary: pytest.CaptureFixture[bytes]) -> None:
    plugin = configured(JsonLines(), config(fake_proc))
    await plugin.oomkit_notify(decision(0))
    assert msgspec.json.decode(capfdbinary.readouterr().out, type=Decision) == decision(0)


async def test_failing_writes_are_logged_once_counted_and_recovered(
    fake_proc: FakeProc, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out = tmp_path / "decisions.jsonl"
    plugin = configured(JsonLines(), config(fake_proc, jsonl={"path": str(out)}))
    out.unlink()
    out.mkdir()  # appending to a directory fails
    with caplog.at_level(logging.WARNING, logger="oomkit.plugins.jsonl"):
        await plugin.oomkit_notify(decision(1))
        await plugin.oomkit_notify(decision(2))
        out.rmdir()
        await plugin.oomkit_notify(decision(3))
    assert plugin.failures == 2
    assert [r.getMessage().split(":")[1].strip() for r in caplog.records] == [
        f"cannot write to {out}",
        f"writing to {out} works again after 2 lost lines",
    ]
    assert msgspec.json.decode(out.read_bytes(), type=Decision) == decision(3)


def test_an_unwritable_path_is_refused_at_start(fake_proc: FakeProc, tmp_path: Path) -> None:
    path = tmp_path / "missing-dir" / "d.jsonl"
    with pytest.raises(ConfigError) as info:
        configured(JsonLines(), config(fake_proc, jsonl={"path": str(path)}))
    assert str(info.value) == (
        f"/etc/oomkit/test.toml: cannot append to {path}: No such file or directory - at `$.plugins.jsonl.path`"
    )


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"file": "x"}, "Object contains unknown field `file` - at `$.plugins.jsonl`"),
        ({"path": ""}, "`path` cannot be empty; use '-' for standard output - at `$.plugins.jsonl`"),
    ],
)
def test_bad_settings_name_the_file_and_key(fake_proc: FakeProc, table: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        configured(JsonLines(), config(fake_proc, jsonl=table))
    assert str(info.value) == f"/etc/oomkit/test.toml: {message}"


# --- memory samples -------------------------------------------------------------------------------


def _sample(t_s: float, *, warm: bool = True, scope: Scope = Scope(), top: int = 8) -> MemorySample:
    return MemorySample(scope=scope, monotonic_ns=int(t_s * 1e9), wall_time=1.7e9 + t_s, usage_bytes=900 << 20,
                        limit_bytes=1 << 30, rss_bytes=800 << 20, processes=top, warm=warm,
                        top=tuple(ProcessSample(pid=100 + i, name=f"p{i}", rss_bytes=(top - i) << 20) for i in range(top)))


def _lines(path: Path, n: int) -> list[bytes]:
    deadline = time.monotonic() + 60  # the writer is a thread: wait for it, generously
    while True:
        lines = path.read_bytes().splitlines() if path.exists() else []
        if len(lines) >= n or time.monotonic() > deadline:
            return lines
        time.sleep(0.01)


def test_warm_scopes_samples_are_written_at_most_once_per_interval_and_read_back(
    fake_proc: FakeProc, tmp_path: Path
) -> None:
    out = tmp_path / "events.jsonl"
    plugin = configured(JsonLines(), config(fake_proc, jsonl={"path": str(out), "sample_interval_s": 1.0,
                                                              "sample_processes": 3}))
    jobs = Scope("v1", "/jobs")
    for t in (0.0, 0.25, 0.5, 0.99, 1.0, 1.5, 2.2):
        plugin.oomkit_memory_sample(sample=_sample(t))
    plugin.oomkit_memory_sample(sample=_sample(0.1, scope=jobs))  # each scope has its own pace
    plugin.oomkit_memory_sample(sample=_sample(3.0, warm=False))  # a cold scope's: not logged
    assert plugin.samples == 4
    lines = _lines(out, 4)
    records = [rec for _, rec in read_log(out)]
    assert sorted((r.scope.tree, r.monotonic_ns) for r in records if isinstance(r, MemorySample)) == [
        ("system", 0), ("system", 1_000_000_000), ("system", 2_200_000_000), ("v1", 100_000_000)]
    assert all(b'"type":"memory-sample"' in ln for ln in lines)
    assert all(len(r.top) == 3 and r.top[0].pid == 100 for r in records if isinstance(r, MemorySample)), "the largest 3"


def test_sample_interval_zero_writes_no_samples(fake_proc: FakeProc, tmp_path: Path) -> None:
    out = tmp_path / "events.jsonl"
    plugin = configured(JsonLines(), config(fake_proc, jsonl={"path": str(out), "sample_interval_s": 0}))
    plugin.oomkit_memory_sample(sample=_sample(0.0))
    assert plugin.samples == 0 and not out.read_bytes()


async def test_samples_and_decisions_share_the_log_in_whole_lines(fake_proc: FakeProc, tmp_path: Path) -> None:
    out = tmp_path / "events.jsonl"
    plugin = configured(JsonLines(), config(fake_proc, jsonl={"path": str(out), "sample_interval_s": 0.001}))
    for i in range(40):
        plugin.oomkit_memory_sample(sample=_sample(i * 0.01))
        if i % 10 == 0:
            await plugin.oomkit_notify(decision(i // 10))
    _lines(out, 40 - plugin.samples_dropped + 4)
    kinds = [type(rec).__name__ for _, rec in read_log(out)]
    assert kinds.count("Decision") == 4 and kinds.count("MemorySample") == plugin.samples
    assert plugin.samples + plugin.samples_dropped == 40


def test_the_engine_builds_samples_only_while_jsonl_wants_them(fake_proc: FakeProc) -> None:
    from oomkit import Engine

    fake_proc.add_process(10, "a", rss=10 << 20)
    for interval, built in ((0, 0), (1.0, 1)):
        engine = Engine(config(fake_proc, jsonl={"sample_interval_s": interval}))
        now = time.monotonic_ns()
        engine.history.touch(Scope(), "oom", now)
        engine.history.tick(now)
        assert len(engine.history.take_samples()) == built, f"sample_interval_s = {interval}"
