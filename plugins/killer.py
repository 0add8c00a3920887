"""``killer``: SIGTERM, a grace period, SIGKILL, then the victim's memory reaped at once.

It kills one process and declines a unit (a cgroup or a process group as a whole), which is
``unit_killer``'s (:mod:`oomkit_plugins.unitkill`).

Every step goes through a pidfd opened first, so a pid that is reused while we work can
never be signalled: right after opening, the process's start time is compared with the
candidate's, and a mismatch means the candidate is gone (outcome ``exited``).  ``ESRCH`` at
any step before a signal landed is ``exited`` too, never an exception.

After SIGKILL, ``process_mrelease(2)`` (Linux 5.15) tears down the victim's address space in
our thread instead of waiting for the victim to run its own exit, which is where the time to
free memory goes when the victim cannot get a CPU or is frozen.  It only helps if it reaches
the victim's memory before the victim's own exit does (then it fails with ESRCH, and the
victim frees its memory itself).  Measured here (bench/memcg_oom.py, 2 GiB victim): called
on the event loop right after the signal it wins, and the victim is reaped about a quarter
sooner (113 ms against 155 ms: the two tear down in parallel), but the loop is blocked for
the whole teardown and every other scope's decision waits.  Off the loop it loses the race
every time, whether in anyio's worker pool, in a thread of our own parked on a queue, or
with the GIL yielded right after the hand-off (155, 154 and 152 ms).  We keep the loop free:
it runs in a worker thread, and still reaps victims that cannot run.  ``memory_released``
says whether the call reaped the memory itself.

The path up to the first signal is the latency that matters (a paused memcg waits on it), so
it does no logging above debug level and no disk I/O: ``pidfd_open``, one read of
``/proc/PID/stat``, the signal.

``oom`` events (a v1 takeover memcg: its tasks are paused inside the kernel and cannot run a
SIGTERM handler) use ``oom_grace_s``, 0 by default: straight SIGKILL.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import signal
import time
from typing import Annotated

import anyio
import msgspec

from oomkit import Candidate, Config, ConfigError, Event, KillResult, hookimpl
from oomkit.procfs import start_ticks

from ._settings import Settings

__all__ = ["KillerSettings", "SignalKiller", "process_mrelease"]

log = logging.getLogger("oomkit.plugins.killer")

ACTION = "kill"
SYS_process_mrelease = 448  # same number on every architecture (generic syscall table)

_libc = ctypes.CDLL(None, use_errno=True)


class KillerSettings(Settings, frozen=True):
    """``[plugins.killer]``."""

    grace_s: Annotated[float, msgspec.Meta(ge=0.0, le=600.0)] = 1.0
    """Between SIGTERM and SIGKILL for every event but ``oom``; 0 sends SIGKILL at once."""
    oom_grace_s: Annotated[float, msgspec.Meta(ge=0.0, le=600.0)] = 0.0
    """The same for ``oom`` events, whose tasks are paused and cannot handle SIGTERM."""
    death_timeout_s: Annotated[float, msgspec.Meta(ge=0.001, le=600.0)] = 5.0
    """How long to wait for the victim to be gone after SIGKILL before reporting failure."""
    release_memory: bool = True
    """Reap the victim's memory with ``process_mrelease`` right after SIGKILL."""


def process_mrelease(pidfd: int) -> int:
    """Reap the memory of the (SIGKILLed) process behind ``pidfd``; 0 or an errno."""
    if _libc.syscall(ctypes.c_long(SYS_process_mrelease), ctypes.c_int(pidfd), ctypes.c_uint(0)) == 0:
        return 0
    return ctypes.get_errno()


class SignalKiller:
    """Kills one process through a pidfd; claims every victim it is offered."""

    name = "killer"

    def __init__(self) -> None:
        self.settings = KillerSettings()
        self._proc = "/proc"

    @hookimpl
    def oomkit_configure(self, config: Config) -> None:
        settings = config.plugin_settings(self.name, KillerSettings)
        budget = config.engine.kill_timeout_s
        for key in ("grace_s", "oom_grace_s"):
            if getattr(settings, key) + settings.death_timeout_s >= budget:
                raise ConfigError(
                    f"{config.origin}: {key} + death_timeout_s must stay under engine.kill_timeout_s"
                    f" ({budget:g} s), or the engine gives up on the kill half-way"
                    f" - at `$.plugins.{self.name}.{key}`"
                )
        self.settings = settings
        self._proc = config.paths.proc

    @hookimpl
    async def oomkit_kill(self, event: Event, victim: Candidate) -> KillResult | None:
        if victim.unit != "process":
            return None  # a unit is all its members: the unit killer's (oomkit_plugins.unitkill)
        grace = self.settings.oom_grace_s if event.kind == "oom" else self.settings.grace_s
        try:
            pidfd = os.pidfd_open(victim.pid)
        except ProcessLookupError:
            return _exited(f"pid {victim.pid} had exited")
        try:
            return await self._kill(pidfd, victim, grace)
        finally:
            os.close(pidfd)

    async def _kill(self, pidfd: int, victim: Candidate, grace: float) -> KillResult:
        # The pidfd pins the process that held the pid when it was opened; if that is not
        # the candidate (its start time differs), the candidate is already gone.
        now = start_ticks(self._proc, victim.pid)
        if now is None:
            return _exited(f"pid {victim.pid} had exited")
        if now != victim.start_ticks:
            return _exited(
                f"pid {victim.pid} was reused (start time {now}, the candidate's {victim.start_ticks});"
                " not killed"
            )
        signals: list[str] = []
        sent_ns = 0
        if grace > 0:
            try:
                signal.pidfd_send_signal(pidfd, signal.SIGTERM)
            except ProcessLookupError:
                return _exited(f"pid {victim.pid} exited before SIGTERM")
            sent_ns = time.monotonic_ns()
            signals.append("SIGTERM")
            dead_ns = await _wait_dead(pidfd, grace)
            if dead_ns:
                return KillResult(
                    action=ACTION, outcome="killed", signals=tuple(signals), pids=(victim.pid,), sent_ns=sent_ns, dead_ns=dead_ns,
                    detail=f"pid {victim.pid} exited on SIGTERM",
                )
        try:
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        except ProcessLookupError:
            if not signals:
                return _exited(f"pid {victim.pid} exited before SIGKILL")
            return KillResult(
                action=ACTION, outcome="killed", signals=tuple(signals), pids=(victim.pid,), sent_ns=sent_ns,
                dead_ns=time.monotonic_ns(), detail=f"pid {victim.pid} exited on SIGTERM",
            )
        killed_ns = time.monotonic_ns()
        sent_ns = sent_ns or killed_ns
        signals.append("SIGKILL")
        released = False
        if self.settings.release_memory:
            err = await anyio.to_thread.run_sync(process_mrelease, pidfd)
            released = err == 0
            if err and err != errno.ESRCH:  # ESRCH: it finished exiting on its own first
                log.debug("process_mrelease(pid %d): %s", victim.pid, os.strerror(err))
        dead_ns = await _wait_dead(pidfd, self.settings.death_timeout_s)
        if not dead_ns:
            return KillResult(
                action=ACTION, outcome="failed", signals=tuple(signals), pids=(victim.pid,), sent_ns=sent_ns,
                memory_released=released,
                detail=f"pid {victim.pid} still alive {self.settings.death_timeout_s:g} s after SIGKILL",
            )
        return KillResult(
            action=ACTION, outcome="killed", signals=tuple(signals), pids=(victim.pid,), sent_ns=sent_ns, dead_ns=dead_ns,
            memory_released=released, detail=f"pid {victim.pid} killed",
        )


async def _wait_dead(pidfd: int, timeout: float) -> int:
    """When the process exited (monotonic ns), or 0 if it is still alive after ``timeout``."""
    with anyio.move_on_after(timeout):
        await anyio.wait_readable(pidfd)
        return time.monotonic_ns()
    return 0


def _exited(detail: str) -> KillResult:
    return KillResult(action=ACTION, outcome="exited", detail=detail)
