"""SignalKiller's refusals and settings, on fake trees; real kills are in tests/integration."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import pytest

from oomkit import Candidate, Config, ConfigError, Event
from oomkit.config import EngineConfig
from oomkit.testing import FakeProc
from oomkit_plugins.killer import SignalKiller

from .support import config, configured


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield proc
    proc.kill()
    proc.wait()


@pytest.mark.anyio
async def test_a_pid_whose_start_time_differs_is_never_signalled(
    fake_proc: FakeProc, sleeper: subprocess.Popen[bytes]
) -> None:
    # The fake /proc says the live pid started at another time: it is someone else now.
    fake_proc.add_process(sleeper.pid, "python3", start_ticks=5)
    killer = configured(SignalKiller(), config(fake_proc))
    victim = Candidate(pid=sleeper.pid, name="python3", start_ticks=4)
    res = await killer.oomkit_kill(Event(source="t", kind="oom"), victim)
    assert (res.outcome, res.signals, res.sent_ns) == ("exited", (), 0)
    assert "was reused (start time 5, the candidate's 4)" in res.detail
    assert sleeper.poll() is None


@pytest.mark.anyio
async def test_a_pid_without_proc_entry_is_exited(fake_proc: FakeProc, sleeper: subprocess.Popen[bytes]) -> None:
    killer = configured(SignalKiller(), config(fake_proc))
    res = await killer.oomkit_kill(Event(source="t", kind="oom"), Candidate(pid=sleeper.pid, name="x", start_ticks=1000))
    assert (res.outcome, res.detail) == ("exited", f"pid {sleeper.pid} had exited")
    assert sleeper.poll() is None


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"grace": 1}, "Object contains unknown field `grace` - at `$.plugins.killer`"),
        ({"grace_s": -1}, "Expected `float` >= 0.0 - at `$.plugins.killer.grace_s`"),
        ({"death_timeout_s": 0}, "Expected `float` >= 0.001 - at `$.plugins.killer.death_timeout_s`"),
        ({"release_memory": 1}, "Expected `bool`, got `int` - at `$.plugins.killer.release_memory`"),
        ({"grace_s": 6}, "grace_s + death_timeout_s must stay under engine.kill_timeout_s (10 s),"
         " or the engine gives up on the kill half-way - at `$.plugins.killer.grace_s`"),
        ({"oom_grace_s": 6}, "oom_grace_s + death_timeout_s must stay under"
         " engine.kill_timeout_s (10 s), or the engine gives up on the kill half-way"
         " - at `$.plugins.killer.oom_grace_s`"),
    ],
)
def test_bad_settings_name_the_file_and_key(fake_proc: FakeProc, table: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        configured(SignalKiller(), config(fake_proc, killer=table))
    assert str(info.value) == f"/etc/oomkit/test.toml: {message}"


def test_a_longer_kill_timeout_allows_a_longer_grace(fake_proc: FakeProc) -> None:
    cfg = config(fake_proc, killer={"grace_s": 30})
    cfg = Config(engine=EngineConfig(kill_timeout_s=60), paths=cfg.paths, plugins=cfg.plugins, sources=())
    assert configured(SignalKiller(), cfg).settings.grace_s == 30
