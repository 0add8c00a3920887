"""Protect on fake trees: globs, cmdline patterns and the cmdline deadline.

The fixed protections (pid 1, kernel threads, oomkit, -1000) are the engine's: tests/unit/test_safety.py."""

from __future__ import annotations

import os
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
    plugin = configured(Protect(), config(fake_proc, protect={"cmdline": ["."]}))
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
    plugin = configured(Protect(), config(fake_proc, protect={"cmdline": [r"-m myservice\b"]}))
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
    # 11 is read first, then the reader blocks on 10's cmdline
    got = plugin.oomkit_veto(EVENT, cands(fake_proc, 11, 10))
    assert got == {
        10: "cmdline not readable within 0.05 s (the process may hold its mmap lock);"
        " protected as protect.cmdline may match"
    }


def test_cmdlines_are_cached_per_pid_and_start_time(fake_proc: FakeProc) -> None:
    fake_proc.add_process(10, "python3", cmdline=("python3", "keep.py"), start_ticks=100)
    plugin = configured(Protect(), config(fake_proc, protect={"cmdline": ["keep"]}))
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
    plugin = configured(Protect(), config(fake_proc, protect={"cmdline": ["keep"]}))
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
