"""JsonLines: one decision per line, to a file or stdout; failures logged once and counted."""

from __future__ import annotations

import logging
from pathlib import Path

import msgspec
import pytest

from oomkit import ConfigError, Decision, Event
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
