"""The command notifier runs real programs: the decision in their environment and on stdin,
a deadline that kills the whole session, output bounded, concurrency bounded."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest

from oomkit import Candidate, ConfigError, Decision, Event, Ranked, Scope
from oomkit.config import config_from_dict
from oomkit_plugins.command import Command

pytestmark = pytest.mark.anyio

VICTIM = Candidate(pid=4242, name="hog\0x", uid=1000, rss_bytes=3 << 30, cgroup="/user/1000", start_ticks=1000)
RANKING = tuple(Ranked(candidate=Candidate(pid=n, name=f"p{n}", start_ticks=1000), score=float(n), scores={}) for n in range(30))
KILLED = Decision(
    id=7, event=Event(source="takeover", kind="oom", scope=Scope("v1", "/user/1000")), victim=VICTIM,
    action="kill", outcome="killed", detail="SIGKILL", ranking=RANKING,
)


def command(**settings: Any) -> Command:
    cfg = config_from_dict({"sources": [], "plugins": {"command": settings}}, "/etc/oomkit/test.toml")
    plugin = Command()
    plugin.oomkit_configure(cfg)
    return plugin


async def wait_for(predicate: Callable[[], object], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await anyio.sleep(0.01)


def py(code: str) -> list[str]:
    return [sys.executable, "-I", "-c", code]


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except FileNotFoundError:
        return False


async def test_the_decision_is_in_the_environment_and_on_stdin(tmp_path: Path) -> None:
    out = tmp_path / "seen.json"
    code = (
        "import json, os, sys; "
        f"json.dump({{'env': dict(os.environ), 'stdin': sys.stdin.read(), "
        f"'adj': open('/proc/self/oom_score_adj').read().strip()}}, open({str(out)!r}, 'w'))"
    )
    plugin = command(argv=py(code), max_ranking=3, oom_score_adj=500, environment={"EXTRA": "yes"})
    await plugin.oomkit_notify(KILLED)
    await wait_for(lambda: plugin.worker.sent == 1, "the command to run")
    seen = json.loads(out.read_text())
    env = seen["env"]
    assert {k: env[k] for k in ("OOMKIT_OUTCOME", "OOMKIT_PID", "OOMKIT_NAME", "OOMKIT_UID", "OOMKIT_SCOPE",
                                "OOMKIT_EVENT_KIND", "OOMKIT_DECISION_ID", "EARLYOOM_PID", "EARLYOOM_NAME",
                                "EXTRA")} == {
        "OOMKIT_OUTCOME": "killed", "OOMKIT_PID": "4242", "OOMKIT_NAME": "hogx", "OOMKIT_UID": "1000",
        "OOMKIT_SCOPE": "v1:/user/1000", "OOMKIT_EVENT_KIND": "oom", "OOMKIT_DECISION_ID": "7",
        "EARLYOOM_PID": "4242", "EARLYOOM_NAME": "hogx", "EXTRA": "yes",
    }
    assert env["OOMKIT_RSS_BYTES"] == str(3 << 30)
    decision = msgspec.json.decode(seen["stdin"], type=Decision)
    assert decision.victim == VICTIM and [r.candidate.pid for r in decision.ranking] == [0, 1, 2]
    assert seen["adj"] == "500", "the program does not keep the daemon's oom_score_adj"
    assert plugin.worker.failed == 0


async def test_other_outcomes_and_an_empty_argv_run_nothing(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    plugin = command(argv=["touch", str(marker)], outcomes=["failed"])
    await plugin.oomkit_notify(KILLED)
    off = command()
    await off.oomkit_notify(KILLED)
    assert plugin.worker.pending == 0 and plugin.worker.sent == 0 and off.worker.sent == 0
    assert not marker.exists()


async def test_past_the_deadline_the_whole_session_is_killed(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    # The program and a grandchild it started both block; both must go.
    code = (
        "import os, subprocess, sys, time; "
        "kid = subprocess.Popen(['sleep', '600']); "
        f"open({str(pids)!r}, 'w').write(f'{{os.getpid()}} {{kid.pid}}'); time.sleep(600)"
    )
    plugin = command(argv=py(code), timeout_s=1.0)
    await plugin.oomkit_notify(KILLED)
    await wait_for(lambda: plugin.worker.failed == 1, "the deadline")
    program, grandchild = map(int, pids.read_text().split())
    await wait_for(lambda: not alive(program) and not alive(grandchild), "the session to be killed")
    assert plugin.worker.sent == 0


async def test_what_a_program_leaves_running_is_killed_when_it_exits(tmp_path: Path) -> None:
    pid_file = tmp_path / "left"
    code = f"import subprocess; open({str(pid_file)!r}, 'w').write(str(subprocess.Popen(['sleep', '600']).pid))"
    plugin = command(argv=py(code))
    await plugin.oomkit_notify(KILLED)
    await wait_for(lambda: plugin.worker.sent == 1, "the command to run")
    left = int(pid_file.read_text())
    await wait_for(lambda: not alive(left), "the leftover sleep to be killed")


async def test_output_is_logged_cut_to_max_output_bytes(caplog: pytest.LogCaptureFixture) -> None:
    plugin = command(argv=py("import sys; sys.stdout.write('x' * (1 << 20)); sys.stderr.write('tail')"),
                     max_output_bytes=100)
    with caplog.at_level(logging.INFO, logger="oomkit.plugins.command"):
        await plugin.oomkit_notify(KILLED)
        await wait_for(lambda: plugin.worker.sent == 1, "the command to run")
    (line,) = [r.getMessage() for r in caplog.records]
    assert line == f"command {sys.executable}: {'x' * 100} ({(1 << 20) + 4 - 100} more bytes not shown)"


async def test_a_failing_program_is_counted_and_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    plugin = command(argv=["false"])
    with caplog.at_level(logging.WARNING, logger="oomkit.plugins.command"):
        for _ in range(3):
            await plugin.oomkit_notify(KILLED)
        await wait_for(lambda: plugin.worker.failed == 3, "three failures")
    assert [r.getMessage() for r in caplog.records] == [
        "command: false exited with status 1 (further failures are counted, not logged)"
    ]


async def test_pending_notifications_are_bounded(tmp_path: Path) -> None:
    gate = tmp_path / "open"
    code = f"import os, time\nwhile not os.path.exists({str(gate)!r}): time.sleep(0.01)"
    plugin = command(argv=py(code), concurrency=1, max_pending=2)
    for _ in range(5):
        await plugin.oomkit_notify(KILLED)
    assert plugin.worker.pending == 2 and plugin.worker.dropped == 3
    gate.touch()
    await wait_for(lambda: plugin.worker.sent == 2 and plugin.worker.pending == 0, "the two queued")
    assert plugin.worker.dropped == 3


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"argv": [""]}, "`argv[0]` cannot be empty"),
        ({"argv": ["x"], "environment": {"A=B": "1"}}, "`environment`: 'A=B' is not a valid variable"),
        ({"timeout_s": 0}, "Expected `float` >= 0.01 - at `$.plugins.command.timeout_s`"),
        ({"outcomes": ["killed", "won"]}, "at `$.plugins.command.outcomes[1]`"),
    ],
)
def test_bad_settings_name_their_key(settings: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        command(**settings)
    assert str(info.value).startswith("/etc/oomkit/test.toml: ") and message in str(info.value)


def test_the_daemons_notify_socket_is_not_passed_on(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", "/run/systemd/notify")
    monkeypatch.setenv("WATCHDOG_USEC", "1")
    plugin = command(argv=["true"])
    assert "NOTIFY_SOCKET" not in plugin._base_env and "WATCHDOG_USEC" not in plugin._base_env
    assert plugin._base_env["PATH"] == os.environ["PATH"]
