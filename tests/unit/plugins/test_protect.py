"""Protect on fake trees: globs, cmdline patterns and the cmdline deadline.

The fixed protections (pid 1, kernel threads, oomkit, -1000) are the engine's: tests/unit/test_safety.py."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from oomkit import Candidate, ConfigError, Event
from oomkit.procfs import read_process
from oomkit.testing import FakeProc
from oomkit_plugins.protect import Protect

from .support import config, configured

EVENT = Event(source="t", kind="low-memory")


def cands(proc: FakeProc, *pids: int) -> list[Candidate]:
    out = [read_process(proc.path, pid) for pid in pids]
    assert all(out)
    return [c for c in out if c is not None]


def test_unconfigured_it_protects_nobody_the_fixed_protections_are_the_cores(fake_proc: FakeProc) -> None:
    me = os.getpid()
    fake_proc.add_process(1, "init", ppid=0)
    fake_proc.add_process(2, "kthreadd", ppid=0, kthread=True)
    fake_proc.add_process(me, "oomkit", ppid=1)
    fake_proc.add_process(950, "sshd", oom_score_adj=-1000)
    plugin = configured(Protect(), config(fake_proc, protect={"cmdline": ["."], "cmdline_timeout_s": 30}))
    # With a pattern that matches any command line: kernel threads have none to match.
    got = plugin.oomkit_veto(EVENT, cands(fake_proc, 1, 2, me, 950))
    assert set(got) == {1, me, 950}
    assert configured(Protect(), config(fake_proc)).oomkit_veto(EVENT, cands(fake_proc, 1, 2, me, 950)) == {}


def test_name_globs_match_the_whole_name(fake_proc: FakeProc) -> None:
    fake_proc.add_process(10, "postgres")
    fake_proc.add_process(11, "postgres-exporter")
    fake_proc.add_process(12, "mypostgres")
    plugin = configured(Protect(), config(fake_proc, protect={"names": ["postgres", "x*"]}))
    assert plugin.oomkit_veto(EVENT, cands(fake_proc, 10, 11, 12)) == {
        10: "name 'postgres' matches protect.names 'postgres'"
    }


def test_cmdline_patterns_search_the_joined_argv(fake_proc: FakeProc) -> None:
    fake_proc.add_process(10, "python3", cmdline=("python3", "-m", "myservice.main", "--port", "80"))
    fake_proc.add_process(11, "python3", cmdline=("python3", "batch.py"))
    plugin = configured(Protect(), config(fake_proc, protect={"cmdline": [r"-m myservice\b"], "cmdline_timeout_s": 30}))
    assert plugin.oomkit_veto(EVENT, cands(fake_proc, 10, 11)) == {
        10: "cmdline matches protect.cmdline '-m myservice\\\\b'"
    }


def make_stalling_cmdline(proc: FakeProc, pid: int) -> Path:
    """A cmdline that blocks its reader, like a process whose mmap lock is held."""
    path = proc.root / str(pid) / "cmdline"
    path.unlink()
    os.mkfifo(path)
    return path


@pytest.fixture
def release_fifos() -> Iterator[list[Path]]:
    """Unblock the reader threads left waiting on fake cmdlines (a writer that closes = EOF)."""
    fifos: list[Path] = []
    yield fifos
    for fifo in fifos:
        try:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass  # no reader waiting


def test_cmdline_is_never_read_without_cmdline_patterns(fake_proc: FakeProc, release_fifos: list[Path]) -> None:
    fake_proc.add_process(10, "stuck")
    release_fifos.append(make_stalling_cmdline(fake_proc, 10))
    plugin = configured(Protect(), config(fake_proc, protect={"names": ["other"]}))
    assert plugin.oomkit_veto(EVENT, cands(fake_proc, 10)) == {}


def test_a_cmdline_that_stalls_protects_its_process_and_not_the_others(
    fake_proc: FakeProc, release_fifos: list[Path]
) -> None:
    fake_proc.add_process(10, "stuck")
    fake_proc.add_process(11, "fine", cmdline=("fine",))
    release_fifos.append(make_stalling_cmdline(fake_proc, 10))
    table = {"cmdline": ["nothing-matches"], "cmdline_timeout_s": 0.05}
    plugin = configured(Protect(), config(fake_proc, protect=table))
    # 11 is read first, then the reader blocks on 10's cmdline; 11's read may take longer
    # than one decision's deadline on a busy machine, and then 11 is protected meanwhile.
    deadline = time.monotonic() + 30
    while set(got := plugin.oomkit_veto(EVENT, cands(fake_proc, 11, 10))) != {10}:
        assert time.monotonic() < deadline, got
    assert got == {
        10: "cmdline not readable within 0.05 s (the process may hold its mmap lock);"
        " protected as protect.cmdline may match"
    }


def test_a_stalled_cmdline_first_protects_only_its_own_process_and_leaks_no_threads(
    fake_proc: FakeProc, release_fifos: list[Path]
) -> None:
    # Once, one stuck read protected every candidate after it, and each decision started
    # another thread that stuck on the same file.
    fake_proc.add_process(10, "stuck")
    for pid in range(11, 16):
        fake_proc.add_process(pid, f"fine{pid}", cmdline=(f"fine{pid}",))
    release_fifos.append(make_stalling_cmdline(fake_proc, 10))
    plugin = configured(Protect(), config(fake_proc, protect={"cmdline": ["fine13"], "cmdline_timeout_s": 0.05}))
    offered = cands(fake_proc, 10, 11, 12, 13, 14, 15)
    deadline = time.monotonic() + 30
    while True:
        got = plugin.oomkit_veto(EVENT, offered)
        if set(got) == {10, 13}:
            break
        assert time.monotonic() < deadline, got
    assert got[13] == "cmdline matches protect.cmdline 'fine13'"
    assert got[10].startswith("cmdline not readable within 0.05 s")
    for _ in range(50):
        assert set(plugin.oomkit_veto(EVENT, offered)) == {10, 13}
    assert plugin._cmdlines.threads <= plugin._cmdlines.max_workers


def test_cmdlines_are_cached_per_pid_and_start_time(fake_proc: FakeProc) -> None:
    fake_proc.add_process(10, "python3", cmdline=("python3", "keep.py"), start_ticks=100)
    plugin = configured(Protect(), config(fake_proc, protect={"cmdline": ["keep"], "cmdline_timeout_s": 30}))
    assert 10 in plugin.oomkit_veto(EVENT, cands(fake_proc, 10))
    # A changed file under the same pid and start time is not read again...
    (fake_proc.root / "10" / "cmdline").write_bytes(b"python3\0other.py\0")
    assert 10 in plugin.oomkit_veto(EVENT, cands(fake_proc, 10))
    # ...but a reused pid (new start time) is.
    fake_proc.add_process(10, "python3", cmdline=("python3", "other.py"), start_ticks=200)
    assert plugin.oomkit_veto(EVENT, cands(fake_proc, 10)) == {}


def test_a_process_gone_before_its_cmdline_was_read_is_not_protected(fake_proc: FakeProc) -> None:
    fake_proc.add_process(10, "gone", cmdline=("keep",))
    offered = cands(fake_proc, 10)
    fake_proc.remove_process(10)
    plugin = configured(Protect(), config(fake_proc, protect={"cmdline": ["keep"], "cmdline_timeout_s": 30}))
    assert plugin.oomkit_veto(EVENT, offered) == {}


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"name": ["x"]}, "Object contains unknown field `name` - at `$.plugins.protect`"),
        ({"names": "postgres"}, "Expected `array`, got `str` - at `$.plugins.protect.names`"),
        ({"cmdline": ["ok", "(unclosed"]},
         "`cmdline[1]` is not a regular expression: missing ), unterminated subpattern at position 0"
         " - at `$.plugins.protect`"),
        ({"cmdline_timeout_s": 0}, "Expected `float` >= 0.001 - at `$.plugins.protect.cmdline_timeout_s`"),
    ],
)
def test_bad_settings_name_the_file_and_key(fake_proc: FakeProc, table: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        configured(Protect(), config(fake_proc, protect=table))
    assert str(info.value) == f"/etc/oomkit/test.toml: {message}"
