"""``command``: run a program for each decision, as earlyoom's ``-N`` does after a kill.

The program gets the decision in its environment (``OOMKIT_OUTCOME``, ``OOMKIT_PID``,
``OOMKIT_NAME``... and earlyoom's ``EARLYOOM_PID``, ``EARLYOOM_UID``, ``EARLYOOM_NAME``, so an
earlyoom hook script runs unchanged) and, on its standard input, the decision as JSON.  It
runs in a session of its own with a deadline (``timeout_s``): past it the whole session is
SIGKILLed, and whatever it leaves running in that session when it exits is killed too.  Its output (standard output and error together) is logged, cut to
``max_output_bytes``, and the rest is read and thrown away, so a chatty program neither
blocks nor fills the daemon's memory.  Its ``oom_score_adj`` is set to ``oom_score_adj``
(0 by default): it would otherwise inherit the daemon's -1000, and a notifier the kernel
can never kill is a hazard in an out-of-memory machine.

Off with an empty ``argv`` (the default).  Runs off the kill path, in worker threads
(``concurrency``), like every notifier that reaches outside the process.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import subprocess
import time
from collections.abc import Mapping
from typing import Annotated

import msgspec

from oomkit import Config, Decision, hookimpl

from ._notifier import NotifierSettings, Worker, brief_json

__all__ = ["Command", "CommandSettings", "decision_environ"]

log = logging.getLogger("oomkit.plugins.command")

_MAX_VALUE = 4096
"""Longest environment value passed (a plugin's detail text could be anything)."""


class CommandSettings(NotifierSettings, frozen=True):
    """``[plugins.command]``."""

    argv: tuple[str, ...] = ()
    """The program and its arguments (no shell); empty: the notifier is off."""
    stdin_json: bool = True
    """Write the decision as JSON to the program's standard input."""
    max_output_bytes: Annotated[int, msgspec.Meta(ge=0, le=1 << 20)] = 4096
    """How much of the program's output is logged; the rest is read and discarded."""
    oom_score_adj: Annotated[int, msgspec.Meta(ge=-1000, le=1000)] = 0
    """The program's ``oom_score_adj`` (the daemon's own, -1000, is not passed on)."""
    environment: dict[str, str] = msgspec.field(default_factory=dict)
    """Extra environment variables for the program (the decision's are added after)."""

    def __post_init__(self) -> None:
        if self.argv and not self.argv[0]:
            raise ValueError("`argv[0]` cannot be empty")
        if len(self.environment) > 64:
            raise ValueError("`environment` takes at most 64 variables")
        for key, value in self.environment.items():
            if not key or "=" in key or "\0" in key or "\0" in value:
                raise ValueError(f"`environment`: {key!r} is not a valid variable")


def _clean(value: object) -> str:
    return str(value).replace("\0", "")[:_MAX_VALUE]


def decision_environ(decision: Decision) -> dict[str, str]:
    """The variables that describe ``decision`` (victim ones only when there is a victim)."""
    ev = decision.event
    env = {
        "OOMKIT_DECISION_ID": str(decision.id),
        "OOMKIT_OUTCOME": decision.outcome,
        "OOMKIT_ACTION": _clean(decision.action),
        "OOMKIT_DETAIL": _clean(decision.detail),
        "OOMKIT_DRY_RUN": "1" if decision.dry_run else "0",
        "OOMKIT_SOURCE": _clean(ev.source),
        "OOMKIT_EVENT_KIND": ev.kind,
        "OOMKIT_SCOPE": _clean(ev.scope),
        "OOMKIT_WALL_TIME": f"{decision.wall_time:.6f}",
    }
    victim = decision.victim
    if victim is not None:
        env |= {
            "OOMKIT_PID": str(victim.pid),
            "OOMKIT_NAME": _clean(victim.name),
            "OOMKIT_UID": str(victim.uid),
            "OOMKIT_RSS_BYTES": str(victim.rss_bytes),
            "OOMKIT_CGROUP": _clean(victim.cgroup),
            # earlyoom -N's variables, so its hook scripts work as they are.
            "EARLYOOM_PID": str(victim.pid),
            "EARLYOOM_UID": str(victim.uid),
            "EARLYOOM_NAME": _clean(victim.name),
        }
    return env


class CommandFailed(Exception):
    pass


def run_bounded(
    argv: tuple[str, ...],
    env: Mapping[str, str],
    stdin: bytes | None,
    timeout: float,
    max_output: int,
    oom_score_adj: int,
    proc: str = "/proc",
) -> tuple[int, bytes, int]:
    """Run ``argv``; return its exit status, the first ``max_output`` bytes of its output and
    how many bytes it wrote in all.  Raises :class:`CommandFailed` past ``timeout``."""
    deadline = time.monotonic() + timeout
    stdin_fd = -1
    if stdin is not None:
        # A memfd, not a pipe: the whole input is there before the program starts, so it
        # never waits on us and we never wait on it to read.
        stdin_fd = os.memfd_create("oomkit-decision", os.MFD_CLOEXEC)
        os.write(stdin_fd, stdin)
        os.lseek(stdin_fd, 0, os.SEEK_SET)
    try:
        child = subprocess.Popen(
            argv,
            stdin=stdin_fd if stdin_fd >= 0 else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=dict(env),
            start_new_session=True,
            close_fds=True,
        )
    finally:
        if stdin_fd >= 0:
            os.close(stdin_fd)
    try:
        try:
            with open(f"{proc}/{child.pid}/oom_score_adj", "w") as f:
                f.write(str(oom_score_adj))
        except OSError:
            pass  # gone already, or a lower value refused: it keeps what it inherited
        assert child.stdout is not None
        out = bytearray()
        total = 0
        fd = child.stdout.fileno()
        # The program's exit, not the pipe's end, ends the run: something it left running
        # may hold the pipe open for ever.
        exited = os.pidfd_open(child.pid)

        def read(drain: bool) -> bool:
            """Read one chunk (or, with ``drain``, all there is); False at the pipe's end."""
            nonlocal out, total
            while True:
                try:
                    chunk = os.read(fd, 65536)
                except BlockingIOError:
                    return True
                if not chunk:
                    return False
                total += len(chunk)
                if len(out) < max_output:
                    out += chunk[: max_output - len(out)]
                if not drain:
                    return True

        try:
            poller = select.poll()
            poller.register(fd, select.POLLIN)
            poller.register(exited, select.POLLIN)
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise CommandFailed(f"{argv[0]}: not finished within {timeout:g} s; killed")
                ready = dict(poller.poll(left * 1000))
                if exited in ready:
                    os.set_blocking(fd, False)
                    read(drain=True)
                    break
                if fd in ready and not read(drain=False):
                    poller.unregister(fd)
        finally:
            os.close(exited)
        status = child.wait()
        return status, bytes(out), total
    finally:
        if child.returncode is None:
            try:
                os.killpg(child.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            child.wait()
        else:
            # The program exited; anything it left running in its session goes too.
            try:
                os.killpg(child.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        if child.stdout is not None:
            child.stdout.close()


class Command:
    """Runs ``argv`` for every decision whose outcome is in ``outcomes``."""

    name = "command"

    def __init__(self) -> None:
        self.settings = CommandSettings()
        self.worker = Worker(self.name, log)
        self._proc = "/proc"
        self._base_env: dict[str, str] = {}

    @hookimpl
    def oomkit_configure(self, config: Config) -> None:
        self.settings = config.plugin_settings(self.name, CommandSettings)
        self.worker.configure(self.settings)
        self._proc = config.paths.proc
        # The daemon's own environment minus what is not the program's (systemd's socket).
        self._base_env = {k: v for k, v in os.environ.items() if not k.startswith(("NOTIFY_SOCKET", "WATCHDOG_"))}
        self._base_env |= self.settings.environment

    @hookimpl
    async def oomkit_notify(self, decision: Decision) -> None:
        s = self.settings
        if not s.argv or decision.outcome not in s.outcomes:
            return
        env = self._base_env | decision_environ(decision)
        stdin = brief_json(decision, s.max_ranking) + b"\n" if s.stdin_json else None
        self.worker.submit(lambda: self._run(env, stdin))

    def _run(self, env: dict[str, str], stdin: bytes | None) -> None:
        s = self.settings
        status, out, total = run_bounded(s.argv, env, stdin, s.timeout_s, s.max_output_bytes, s.oom_score_adj,
                                         self._proc)
        if out:
            cut = f" ({total - len(out)} more bytes not shown)" if total > len(out) else ""
            log.info("command %s: %s%s", s.argv[0], out.decode(errors="replace").rstrip(), cut)
        if status != 0:
            raise CommandFailed(f"{s.argv[0]} exited with status {status}")
