"""cgroup v1 memcg OOMs: take the decision over from the kernel, or watch the kernel make it.

Takeover (the default) sets ``oom_kill_disable=1`` on each configured memcg, so a task that
hits the limit is paused instead of killed, and emits an ``oom`` event for the engine to act
on.  The kernel signals the *start* of an OOM on an eventfd but never its end, so while a
memcg is under OOM the source re-reads ``under_oom`` every ``poll_interval_s``.  An OOM that
no kill resolved within ``deadline_s`` goes back to the kernel (``oom_kill_disable=0``); once
the memcg is out of OOM the source takes it over again.

Nothing is left disabled when oomkit ends: every exit path this process controls restores
``oom_kill_disable=0``, and a watchdog child (:mod:`oomkit.watchdog`) does it when the
process dies by SIGKILL.  A lock file per memcg under ``[paths] run_dir``, held by the source
and by its watchdog, keeps a second oomkit away from a memcg the first still holds.

Observe mode (``takeover = false``) touches nothing.  In both modes an increase of the
``oom_kill`` counter becomes a ``kernel-kill`` event, so notifiers report the kernel's own
kills, including those after a deadline handback.
"""

from __future__ import annotations

import fcntl
import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import final
from urllib.parse import quote

import anyio
from anyio.abc import TaskStatus

from .. import watchdog
from ..cgroupfs import V1Event, mounts_for, read_keyed, register_v1_event, resolve_cgroup, scope_dir, write_value
from ..config import Config, ConfigError
from ..errors import SourceError
from ..events import Event, Scope
from ..procfs import own_cgroup, read_small
from ..units import Interval
from .base import Emit, Source, SourceSettings

__all__ = ["MemcgOomSource", "MemcgOomSourceConfig", "WatchdogError"]

log = logging.getLogger("oomkit.sources.memcg_oom")


class MemcgOomSourceConfig(SourceSettings, frozen=True, tag="memcg-oom", kw_only=True):
    """Takes over the OOM decision of cgroup v1 memory cgroups (``oom_kill_disable=1``).

    ``cgroups`` are absolute cgroupfs paths or paths relative to the v1 memory mount.
    With ``takeover = false`` the source only watches them and reports the kernel's kills.
    """

    cgroups: tuple[str, ...]
    """The memcgs: absolute cgroupfs paths or paths relative to the v1 memory mount."""
    takeover: bool = True
    """Set ``oom_kill_disable=1`` and decide; false only reports the kernel's own kills."""
    deadline_s: Interval = 1.0
    """If no kill resolved an OOM by then, hand it back to the kernel's own killer."""
    poll_interval_s: Interval = 0.02
    """How often ``under_oom`` is re-read while a cgroup is out of memory: the kernel signals
    the start of an OOM but not its end."""
    idle_poll_s: Interval = 1.0
    """How often the ``oom_kill`` counter is read when nothing is signalled: a global OOM
    that kills inside the cgroup notifies nobody."""

    def __post_init__(self) -> None:
        if not self.cgroups:
            raise ValueError("`cgroups` needs at least one cgroup")
        if self.poll_interval_s > self.deadline_s:
            raise ValueError("`poll_interval_s` cannot be longer than `deadline_s`")


OOM_CONTROL = "memory.oom_control"
WATCHDOG_START_S = 5.0


class WatchdogError(SourceError):
    """The takeover watchdog could not start, or died while the source held memcgs."""


@dataclass(slots=True, eq=False)
class _Memcg:
    configured: str
    scope: Scope
    dir: Path
    lock_path: Path
    event: V1Event | None = None
    lock_fd: int = -1
    oom_kills: int = 0
    woke_ns: int = 0
    """When the eventfd last woke us (0: the OOM was found by polling, not signalled)."""
    armed: bool = False
    """We set ``oom_kill_disable=1`` and have not handed the memcg back."""
    refused: bool = False
    """The last attempt to take it over again failed (logged once, retried quietly)."""

    @property
    def control(self) -> Path:
        return self.dir / OOM_CONTROL


def _lock_name(scope: Scope) -> str:
    return f"memcg-{scope.tree}{quote(scope.path, safe='')}.lock"


def _try_lock(path: Path) -> tuple[int, str]:
    """``(fd, "")`` holding an exclusive flock on ``path``, or ``(-1, holder pid)``."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        return -1, holder
    except BaseException:
        os.close(fd)
        raise
    return fd, ""


@final
class MemcgOomSource(Source):
    """OOM takeover (or observation) for the v1 memcgs of one ``memcg-oom`` source.

    The constructor refuses, with a :class:`~oomkit.config.ConfigError` naming the cgroup, a
    memcg that does not exist and, in takeover mode, the memcg oomkit runs in or any of its
    ancestors (an OOM there would pause oomkit itself) and a memcg another oomkit holds.
    """

    settings_type = MemcgOomSourceConfig

    def __init__(self, spec: MemcgOomSourceConfig, config: Config) -> None:
        paths = config.paths
        self.spec = spec
        self.name = spec.source_name
        self.faults = 0
        """Runtime failures (a memcg lost, a restore refused), each logged once."""
        self.dropped = 0
        """Events not delivered because the engine's queue stayed full."""
        self._proc = paths.proc
        self._run_dir = Path(paths.run_dir)
        self._full = False
        self._dog: _Watchdog | None = None
        mounts = mounts_for(paths)
        own = own_cgroup(paths.proc, "memory") if spec.takeover else None
        self._memcgs: dict[Scope, _Memcg] = {}
        for configured in spec.cgroups:
            scope = resolve_cgroup(mounts, configured)
            if scope in self._memcgs:
                first = self._memcgs[scope].configured
                raise ConfigError(f"cgroup {configured!r}: named twice (also as {first!r})")
            cg = _Memcg(configured, scope, scope_dir(mounts, scope), self._run_dir / _lock_name(scope))
            if spec.takeover:
                if own is not None and watchdog.inside(own, scope.path):
                    what = "it" if own == scope.path else f"its descendant {own}"
                    raise ConfigError(
                        f"cgroup {configured!r}: oomkit runs in {what}; an OOM there would pause oomkit too"
                    )
                self._check_lock(cg)
            self._memcgs[scope] = cg

    def _check_lock(self, cg: _Memcg) -> None:
        # Checked here so a bad config fails at once; run() takes the lock for real.
        try:
            self._run_dir.mkdir(parents=True, exist_ok=True)
            fd, holder = _try_lock(cg.lock_path)
        except OSError as exc:
            raise ConfigError(f"[paths] run_dir {str(self._run_dir)!r}: {exc.strerror}") from None
        if fd < 0:
            raise ConfigError(
                f"cgroup {cg.configured!r}: another oomkit (pid {holder}) holds it (lock {cg.lock_path})"
            )
        os.close(fd)

    def __repr__(self) -> str:
        mode = "takeover" if self.spec.takeover else "observe"
        paths = ",".join(cg.scope.path for cg in self._memcgs.values())
        return f"<MemcgOomSource {self.name!r} {mode} {paths} faults={self.faults}>"

    # --- lifecycle ----------------------------------------------------------------------------

    async def run(self, emit: Emit, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        memcgs = list(self._memcgs.values())
        dog: _Watchdog | None = None
        try:
            if self.spec.takeover:
                for cg in memcgs:
                    self._lock(cg)
                # Before anything is disabled, so there is no moment a SIGKILL would strand.
                dog = self._dog = await _Watchdog.start(self._proc, memcgs)
            for cg in memcgs:
                self._arm(cg)
            task_status.started()
            async with anyio.create_task_group() as tg:
                if dog is not None:
                    tg.start_soon(dog.watch)
                async with anyio.create_task_group() as watchers:
                    for cg in memcgs:
                        watchers.start_soon(self._watch, cg, emit)
                tg.cancel_scope.cancel()  # every memcg is gone: the watchdog has nothing to guard
        finally:
            with anyio.CancelScope(shield=True):
                for cg in memcgs:
                    self._disarm(cg)
                if dog is not None:
                    await dog.stop()
                    self._dog = None
                for cg in memcgs:
                    if cg.lock_fd >= 0:
                        os.close(cg.lock_fd)
                        cg.lock_fd = -1

    def _lock(self, cg: _Memcg) -> None:
        fd, holder = _try_lock(cg.lock_path)
        if fd < 0:
            raise ConfigError(
                f"cgroup {cg.configured!r}: another oomkit (pid {holder}) holds it (lock {cg.lock_path})"
            )
        cg.lock_fd = fd
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)

    def _arm(self, cg: _Memcg) -> None:
        try:
            cg.event = register_v1_event(cg.dir, OOM_CONTROL)
            state = read_keyed(cg.control)
            cg.oom_kills = state.get("oom_kill", 0)
            if self.spec.takeover:
                if state.get("oom_kill_disable"):
                    log.warning("cgroup %s already had oom_kill_disable=1; taking it over", cg.configured)
                write_value(cg.control, 1)
                cg.armed = True
        except OSError as exc:
            raise OSError(exc.errno, f"cgroup {cg.configured!r}: cannot watch {OOM_CONTROL}: {exc.strerror}") from None

    def _disarm(self, cg: _Memcg) -> None:
        if cg.armed:
            self._restore(cg)
        if cg.event is not None:
            cg.event.close()
            cg.event = None

    def _restore(self, cg: _Memcg) -> None:
        cg.armed = False
        try:
            write_value(cg.control, 0)
        except OSError as exc:
            if cg.dir.is_dir():  # a removed memcg has nothing left to restore
                self.faults += 1
                log.error("cgroup %s: cannot restore oom_kill_disable=0: %s", cg.configured, exc.strerror)

    # --- watching -----------------------------------------------------------------------------

    async def _watch(self, cg: _Memcg, emit: Emit) -> None:
        assert cg.event is not None
        signalled = True  # look once right after arming: an OOM may already be under way
        while await self._follow(cg, emit, signalled):
            with anyio.move_on_after(self.spec.idle_poll_s):
                await anyio.wait_readable(cg.event.efd)
            # The event's time is the wake itself, so the reads below count as latency.
            cg.woke_ns = time.monotonic_ns()
            signalled = cg.event.drain() > 0

    async def _follow(self, cg: _Memcg, emit: Emit, signalled: bool) -> bool:
        """Follow one OOM to its end (or just read the counters when nothing is signalled).

        Returns False when the memcg can no longer be read: it is disarmed and not watched.
        """
        assert cg.event is not None
        spec = self.spec
        since: float | None = None  # when this OOM was first seen under takeover
        while True:
            try:
                state = read_keyed(cg.control)
            except OSError as exc:
                self._lost(cg, exc)
                return False
            await self._report_kills(cg, state, emit)
            now = anyio.current_time()
            if state.get("under_oom"):
                if cg.armed and (since is None or signalled):
                    since = now if since is None else since
                    await self._send(emit, self._oom_event(cg, state))
                if cg.armed and since is not None and now - since >= spec.deadline_s:
                    self._hand_back(cg)
            else:
                since = None
                if spec.takeover and not cg.armed:
                    self._take_back(cg)
                if not signalled:
                    return True
            # One more read after every signal: in observe mode the kernel's kill lands just
            # after the notification, and its counter with it.
            await anyio.sleep(spec.poll_interval_s)
            signalled = cg.event.drain() > 0

    def _oom_event(self, cg: _Memcg, state: dict[str, int]) -> Event:
        values: dict[str, float] = {"under_oom": 1, "oom_kill_total": state.get("oom_kill", 0)}
        for key, name in (("usage_bytes", "memory.usage_in_bytes"), ("limit_bytes", "memory.limit_in_bytes")):
            try:
                values[key] = int(read_small(cg.dir / name, 64))
            except (OSError, ValueError):
                pass  # context only: the event matters more than its decoration
        woke, cg.woke_ns = cg.woke_ns or time.monotonic_ns(), 0
        return Event(source=self.name, kind="oom", scope=cg.scope, values=values, monotonic_ns=woke)

    async def _report_kills(self, cg: _Memcg, state: dict[str, int], emit: Emit) -> None:
        total = state.get("oom_kill", 0)
        delta, cg.oom_kills = total - cg.oom_kills, total
        if delta > 0:
            values: dict[str, float] = {"oom_kill_delta": delta, "oom_kill_total": total}
            await self._send(emit, Event(source=self.name, kind="kernel-kill", scope=cg.scope, values=values))

    async def _send(self, emit: Emit, event: Event) -> None:
        # A full engine queue must not stall the deadline of a paused memcg: wait one poll
        # interval at most, then drop the event (an OOM still pending signals again).
        with anyio.move_on_after(self.spec.poll_interval_s) as waited:
            await emit(event)
        if waited.cancelled_caught:
            self.dropped += 1
            if not self._full:
                log.warning("engine queue full: %s events from %s are being dropped", event.kind, self.name)
            self._full = True
        else:
            self._full = False

    def _hand_back(self, cg: _Memcg) -> None:
        log.warning(
            "cgroup %s: OOM not resolved within %g s; handing it back to the kernel",
            cg.configured,
            self.spec.deadline_s,
        )
        self._restore(cg)

    def _take_back(self, cg: _Memcg) -> None:
        try:
            write_value(cg.control, 1)
        except OSError as exc:
            # Left with the kernel, which is safe; every later read tries again.
            self.faults += 1
            if not cg.refused:
                log.error("cgroup %s: cannot take over again: %s", cg.configured, exc.strerror)
            cg.refused = True
            return
        cg.armed, cg.refused = True, False
        log.info("cgroup %s: out of OOM; taken over again", cg.configured)

    def _lost(self, cg: _Memcg, exc: OSError) -> None:
        if cg.dir.is_dir():
            self.faults += 1
            log.error("cgroup %s: cannot read %s (%s); no longer watched", cg.configured, OOM_CONTROL, exc.strerror)
        else:
            log.warning("cgroup %s was removed; no longer watched", cg.configured)
        self._disarm(cg)

    def scopes(self) -> list[Scope]:
        return list(self._memcgs)

    def hand_back(self, event: Event) -> bool:
        """The engine will not kill: let the kernel's own killer resolve this OOM now.

        Taken over again once the memcg is out of OOM, as after a deadline handback.
        """
        cg = self._memcgs.get(event.scope)
        if cg is None or not cg.armed or event.kind != "oom":
            return False
        log.warning("cgroup %s: oomkit kills nobody here; handing the OOM back to the kernel", cg.configured)
        self._restore(cg)
        return not cg.armed

    def protected_pids(self) -> tuple[int, ...]:
        return () if self._dog is None else (self._dog.pid,)

    def still_holds(self, event: Event) -> bool:
        """Is the memcg still paused at its limit, and still ours to decide?"""
        cg = self._memcgs.get(event.scope)
        if cg is None:
            return True
        try:
            under = bool(read_keyed(cg.control).get("under_oom"))
        except OSError:
            return False  # the memcg is gone, and everyone in it
        return under and (cg.armed or not self.spec.takeover)


@final
class _Watchdog:
    """The running :mod:`oomkit.watchdog` child and our ends of its pipes."""

    __slots__ = ("_proc", "_feed")

    def __init__(self, proc: subprocess.Popen[bytes], feed: int) -> None:
        self._proc = proc
        self._feed = feed  # the write end of its stdin: closing it (or dying) ends it

    @property
    def pid(self) -> int:
        return self._proc.pid

    @classmethod
    async def start(cls, proc_root: str, memcgs: Iterable[_Memcg]) -> _Watchdog:
        memcgs = list(memcgs)
        controls: list[int] = []
        try:
            for cg in memcgs:
                controls.append(os.open(cg.control, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC))
            argv = [sys.executable, "-I", "-S", str(watchdog.__file__), proc_root]
            argv += [f"{fd}={cg.scope.path}" for fd, cg in zip(controls, memcgs)]
            read_end, feed = os.pipe()
            try:
                proc = subprocess.Popen(
                    argv,
                    stdin=read_end,
                    stdout=subprocess.PIPE,
                    pass_fds=controls + [cg.lock_fd for cg in memcgs],
                    start_new_session=True,  # a Ctrl-C meant for oomkit must not end it first
                )
            except BaseException:
                os.close(feed)
                raise
            finally:
                os.close(read_end)
        finally:
            for fd in controls:
                os.close(fd)
        dog = cls(proc, feed)
        assert proc.stdout is not None
        os.set_blocking(proc.stdout.fileno(), False)
        try:
            with anyio.fail_after(WATCHDOG_START_S):
                said = await dog._read()
        except BaseException:
            with anyio.CancelScope(shield=True):
                await dog.stop()
            raise
        if said.strip() != b"ready":
            with anyio.CancelScope(shield=True):
                await dog.stop()
            reason = said.decode(errors="replace").strip() or f"exited with status {proc.returncode}"
            raise WatchdogError(f"the takeover watchdog did not start: {reason}")
        return dog

    async def _read(self) -> bytes:
        assert self._proc.stdout is not None
        fd = self._proc.stdout.fileno()
        while True:
            await anyio.wait_readable(fd)
            try:
                return os.read(fd, 512)
            except BlockingIOError:
                continue

    async def watch(self) -> None:
        """Return never; raise :class:`WatchdogError` if the watchdog dies."""
        while await self._read():
            pass
        raise WatchdogError(
            f"the takeover watchdog (pid {self._proc.pid}) died; without it a crash would"
            " leave memcgs paused, so their OOMs go back to the kernel"
        )

    async def stop(self) -> None:
        """Close its stdin (it restores and exits, releasing the locks it shares) and reap it."""
        if self._feed >= 0:
            os.close(self._feed)
            self._feed = -1
        with anyio.move_on_after(WATCHDOG_START_S):
            while await self._read():
                pass
        try:
            self._proc.wait(timeout=0.5)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        assert self._proc.stdout is not None
        self._proc.stdout.close()
