"""``oomkit serve``: the engine as a long-running daemon.

What the daemon adds to an embedded engine: self-protection (its pages locked, its own
``oom_score_adj`` lowered so the kernel spares it), logging to stderr, a clean shutdown on
SIGTERM and SIGINT (every source restores what it changed in the kernel on the way out)
that no plugin can hold up past ``[daemon] shutdown_timeout_s`` (then the exit status is
:data:`EXIT_STUCK`),
the choice of event loop, at start the restore of what a crashed oomkit journalled
(:mod:`oomkit.restore`), and operating it (docs/operations.md): the control socket
(:mod:`oomkit.control`), Prometheus metrics (:mod:`oomkit.metrics`), systemd's readiness
and watchdog (:mod:`oomkit.sdnotify`), a reload on SIGHUP, and one warning at start when
another OOM daemon runs.
"""

from __future__ import annotations

import ctypes
import errno
import gc
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Literal

import anyio

from .config import Config, ConfigError
from .control import ControlError, ControlServer, socket_path
from .engine import Engine
from .errors import OomkitError
from .sdnotify import Notifier

__all__ = ["EXIT_STUCK", "protect_self", "resolve_loop", "restore_after_crash", "serve", "warn_about_other_daemons"]

log = logging.getLogger("oomkit.daemon")

EXIT_STUCK = 3
"""``oomkit serve``'s exit status when it stopped without waiting for everything to end:
after SIGTERM or SIGINT, something (an async plugin that shields itself from cancellation,
a thread that will not end) was still running ``[daemon] shutdown_timeout_s`` later."""

_MCL_CURRENT, _MCL_FUTURE, _MCL_ONFAULT = 1, 2, 4

Loop = Literal["asyncio", "uvloop", "trio"]


def resolve_loop(choice: str) -> Loop:
    """``auto`` is uvloop when it imports, else asyncio; an explicit choice must import."""
    if choice == "auto":
        try:
            import uvloop  # noqa: F401
        except ImportError:
            return "asyncio"
        return "uvloop"
    if choice == "uvloop":
        import uvloop  # noqa: F401
    elif choice == "trio":
        import trio  # noqa: F401
    elif choice != "asyncio":
        raise ValueError(f"unknown loop {choice!r}: expected auto, asyncio, uvloop or trio")
    return choice  # type: ignore[return-value]


def protect_self(config: Config) -> list[str]:
    """Lock our pages and lower our own OOM score; return what could not be done (logged).

    ``MCL_ONFAULT`` locks pages only as they are touched: plain ``mlockall`` would fault in
    every mapped library (KERNEL.md: +6 MiB of RSS for nothing).  Lowering ``oom_score_adj``
    below 0 needs CAP_SYS_RESOURCE; without it the write fails and we say so once.
    """
    refused: list[str] = []
    if config.daemon.mlockall:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.mlockall(_MCL_CURRENT | _MCL_FUTURE | _MCL_ONFAULT) != 0:
            err = ctypes.get_errno()
            refused.append(f"mlockall: {os.strerror(err)}")
    adj = config.daemon.oom_score_adj
    try:
        fd = os.open(f"{config.paths.proc}/self/oom_score_adj", os.O_WRONLY)
        try:
            # os.write reports EACCES here; a buffered file object would hide it until close.
            os.write(fd, str(adj).encode())
        finally:
            os.close(fd)
    except OSError as exc:
        hint = " (needs CAP_SYS_RESOURCE to go below 0)" if exc.errno in (errno.EACCES, errno.EPERM) else ""
        refused.append(f"oom_score_adj {adj}: {exc.strerror}{hint}")
    for item in refused:
        log.warning("self-protection refused: %s", item)
    return refused


_FIND_DAEMONS = """
import json, sys
from oomkit.probes import find_oom_daemons
found = find_oom_daemons(sys.argv[1], exclude=frozenset({int(sys.argv[2])}))
print(json.dumps([f"{d.name} (pid {d.pid})" for d in found]))
"""


def restore_after_crash(config: Config) -> None:
    """Put back what a dead oomkit journalled (:mod:`oomkit.restore`), logging each line.

    Before the engine starts, so a memcg a crashed daemon left paused is the kernel's again
    before this one takes it over; values a running oomkit holds are left to it.
    """
    from .restore import restore_journal

    result = restore_journal(config.paths)
    for line in result.lines:
        (log.warning if result.ok else log.error)("journal left by an oomkit that did not exit cleanly: %s", line)


async def warn_about_other_daemons(config: Config) -> list[str]:
    """Say once, at start, which other user-space OOM killers run here (``oomkit doctor``'s
    other-oom-daemons probe): two handlers may each kill for one shortage.

    The probe runs in a child process: the probes module costs the daemon 2 MiB of memory
    for good, for a look it takes once."""
    import json

    try:
        done = await anyio.run_process(
            [sys.executable, "-c", _FIND_DAEMONS, config.paths.proc, str(os.getpid())], check=False
        )
        names: list[str] = json.loads(done.stdout) if done.returncode == 0 else []
    except (OSError, ValueError) as exc:
        log.debug("could not look for other OOM daemons: %s", exc)
        return []
    if names:
        log.warning(
            "another OOM daemon runs here: %s; it acts on the whole machine, so it and oomkit may each kill"
            " for the same shortage (stop it, or see oomkit doctor)", ", ".join(names),
        )
    return names


def _give_up_after(engine: Engine, seconds: float) -> threading.Timer:
    """Exit with :data:`EXIT_STUCK` if the process has not ended ``seconds`` from now.

    A daemon thread, so it runs on while the loop waits on a plugin that ignores
    cancellation, and while the interpreter's exit waits on a thread that never ends; the
    sources' restores are done by then (they are cancelled first and take milliseconds),
    and a takeover's watchdog restores its memcgs when the daemon is gone anyway."""

    def give_up() -> None:
        busy = engine.busy_calls()
        log.error("still not stopped %.1f s after the signal%s: exiting now (status %d)", seconds,
                  f", waiting on {'; '.join(busy)}" if busy else "", EXIT_STUCK)
        for handler in logging.getLogger().handlers:
            handler.flush()
        sys.stderr.flush()
        os._exit(EXIT_STUCK)

    timer = threading.Timer(seconds, give_up)
    timer.name, timer.daemon = "oomkit-shutdown", True
    timer.start()
    return timer


def _summary(engine: Engine) -> str:
    st = engine.stats
    return (f"{len(engine.sources)} sources; {st.decisions} decisions, {st.kills} kills"
            f"{'; DRY RUN' if engine.dry_run else ''}")


class _Daemon:
    """What runs beside the engine in ``oomkit serve``."""

    def __init__(self, engine: Engine, load: Callable[[], Config], notifier: Notifier) -> None:
        self.engine = engine
        self.load = load
        self.notifier = notifier
        self.started = engine.config

    async def reload(self) -> str:
        """Read the configuration again and put it in place; a refusal keeps the old one."""
        self.notifier.reloading()
        t0 = time.monotonic()
        try:
            line = await self.engine.reload(self.load)
        except OomkitError as exc:
            log.error("reload refused; the running configuration stays: %s", exc)
            self.notifier.ready(_summary(self.engine))
            raise
        config = self.engine.config
        restart = [t for t in ("daemon", "control", "metrics") if getattr(config, t) != getattr(self.started, t)]
        if restart:
            log.warning("reload: [%s] changed and apply only after a restart", "], [".join(restart))
        log.info("%s (in %.1f ms)", line, (time.monotonic() - t0) * 1e3)
        self.notifier.ready(_summary(self.engine))
        return line

    async def run(self) -> None:
        engine, cfg = self.engine, self.engine.config
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async with engine, anyio.create_task_group() as tg:
                if cfg.control.enabled:
                    server = ControlServer(cfg.control, socket_path(cfg), engine, self.reload)
                    try:
                        await tg.start(server.run)
                    except (ControlError, OSError) as exc:
                        log.warning("no control socket: %s", exc)
                if cfg.metrics.listen or cfg.metrics.textfile:
                    from .metrics import Exporter

                    try:
                        await tg.start(Exporter(cfg.metrics, engine).run)
                    except OSError as exc:
                        where = cfg.metrics.listen or cfg.metrics.textfile
                        raise ConfigError(f"{cfg.origin}: [metrics] {where}: {exc.strerror or exc}") from None
                names = ", ".join(s.name for s in engine.sources) or "none"
                log.info(
                    "oomkit ready: pid %d, sources: %s; plugins: %s%s",
                    os.getpid(),
                    names,
                    ", ".join(engine.plugins.loaded) or "none",
                    "; DRY RUN (no signal will be sent)" if engine.dry_run else "",
                )
                self.notifier.ready(_summary(engine))
                tg.start_soon(self.notifier.keep_alive, engine.health, lambda: _summary(engine))
                tg.start_soon(warn_about_other_daemons, cfg)
                async for signum in signals:
                    if signum == signal.SIGHUP:
                        try:
                            await self.reload()
                        except OomkitError:
                            pass  # said in reload(); the old configuration runs on
                        continue
                    name = signal.Signals(signum).name
                    log.info("%s received: shutting down", name)
                    _give_up_after(engine, cfg.daemon.shutdown_timeout_s)
                    self.notifier.stopping(f"{name}: restoring and stopping")
                    break
                tg.cancel_scope.cancel()
        log.info("oomkit stopped: %s", engine.stats)


def serve(engine: Engine, loop: Loop, load: Callable[[], Config] | None = None) -> None:
    """Run ``engine`` until SIGTERM or SIGINT, on ``loop``; SIGHUP re-reads the
    configuration with ``load`` (without it, SIGHUP reloads the configuration it has)."""
    notifier = Notifier.from_environ()
    restore_after_crash(engine.config)
    protect_self(engine.config)
    # The process is ours: a shorter GIL hand-over bounds what a ranking thread costs the loop.
    sys.setswitchinterval(engine.config.daemon.switch_interval_s)
    # Everything is imported and every plugin loaded: none of it is garbage, so the cyclic
    # collector need not walk it again.  A full collection walks every tracked object with the
    # GIL held (about 30 ms here with this left in, under 7 ms without: a paused memcg waits
    # for one that a ranking thread started; python -m bench loop_stall).
    gc.freeze()
    log.info("event loop: %s", loop)
    daemon = _Daemon(engine, load or (lambda: engine.config), notifier)
    try:
        if loop == "trio":
            anyio.run(daemon.run, backend="trio")
        else:
            anyio.run(daemon.run, backend="asyncio", backend_options={"use_uvloop": loop == "uvloop"})
    finally:
        notifier.close()
        sys.stderr.flush()
