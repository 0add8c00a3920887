"""``oomkit serve``: the engine as a long-running daemon.

What the daemon adds to an embedded engine: self-protection (its pages locked, its own
``oom_score_adj`` lowered so the kernel spares it), logging to stderr, a clean shutdown on
SIGTERM and SIGINT (every source restores what it changed in the kernel on the way out),
and the choice of event loop.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import signal
import sys
from typing import Literal

import anyio

from .config import Config
from .engine import Engine

__all__ = ["protect_self", "resolve_loop", "restore_after_crash", "serve"]

log = logging.getLogger("oomkit.daemon")

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


async def _serve(engine: Engine) -> None:
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async with engine:
            names = ", ".join(s.name for s in engine.sources) or "none"
            log.info(
                "oomkit ready: pid %d, sources: %s; plugins: %s%s",
                os.getpid(),
                names,
                ", ".join(engine.plugins.loaded) or "none",
                "; DRY RUN (no signal will be sent)" if engine.dry_run else "",
            )
            async for signum in signals:
                if signum == signal.SIGHUP:
                    log.warning("SIGHUP ignored: configuration reload is not supported; restart instead")
                    continue
                log.info("%s received: shutting down", signal.Signals(signum).name)
                break
    log.info("oomkit stopped: %s", engine.stats)


def restore_after_crash(config: Config) -> None:
    """Put back what a dead oomkit journalled (:mod:`oomkit.restore`), logging each line.

    Before the engine starts, so a memcg a crashed daemon left paused is the kernel's again
    before this one takes it over; values a running oomkit holds are left to it.
    """
    from .restore import restore_journal

    result = restore_journal(config.paths)
    for line in result.lines:
        (log.warning if result.ok else log.error)("journal left by an oomkit that did not exit cleanly: %s", line)


def serve(engine: Engine, loop: Loop) -> None:
    """Run ``engine`` until SIGTERM or SIGINT, on ``loop``."""
    restore_after_crash(engine.config)
    protect_self(engine.config)
    log.info("event loop: %s", loop)
    if loop == "trio":
        anyio.run(_serve, engine, backend="trio")
    else:
        anyio.run(_serve, engine, backend="asyncio", backend_options={"use_uvloop": loop == "uvloop"})
    sys.stderr.flush()
