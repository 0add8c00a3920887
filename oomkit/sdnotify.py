"""systemd's notify protocol: readiness, status, watchdog keep-alives and stopping.

The protocol is one datagram per message on the ``AF_UNIX`` socket named by
``$NOTIFY_SOCKET`` (a path, or an abstract address written ``@name``), each message
``KEY=VALUE`` lines; see sd_notify(3).  That is a few lines of standard library, so no
dependency.  Outside systemd (no ``$NOTIFY_SOCKET``) every call does nothing.

The watchdog (``WatchdogSec=`` in the unit, seen here as ``$WATCHDOG_USEC``) is fed at half
its period by :meth:`Notifier.keep_alive`, and only while the ``healthy`` predicate it is
given says the engine is making progress: a daemon whose event loop is blocked sends
nothing because the task cannot run, and one whose dispatcher is stuck sends nothing because
the predicate says so.  Then systemd kills and restarts it, which is the point.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable, Mapping
from typing import Final, final

import anyio

__all__ = ["Notifier"]

log = logging.getLogger("oomkit.sdnotify")

_MAX_STATUS: Final = 200
"""STATUS= is shown by ``systemctl status`` on one line; longer ones are cut."""


def _address(raw: str) -> str | bytes | None:
    """The socket address ``$NOTIFY_SOCKET`` names: ``@`` starts an abstract one."""
    if raw.startswith("@"):
        return b"\0" + raw[1:].encode()
    if raw.startswith("/"):
        return raw
    return None  # vsock: and relative names are not for a system service


def _watchdog_usec(env: Mapping[str, str]) -> int:
    """``$WATCHDOG_USEC`` when it is meant for this process (``$WATCHDOG_PID`` unset or ours)."""
    try:
        usec = int(env.get("WATCHDOG_USEC", "0"))
        pid = int(env.get("WATCHDOG_PID", "0") or "0")
    except ValueError:
        return 0
    if usec <= 0 or (pid and pid != os.getpid()):
        return 0
    return usec


@final
class Notifier:
    """Sends notify messages; build it with :meth:`from_environ` once, early.

    Send failures are logged once and counted in :attr:`failures`: a daemon must not stop
    because its supervisor went away.
    """

    __slots__ = ("_address", "_sock", "watchdog_usec", "failures", "sent", "_failing", "_status")

    def __init__(self, address: str | bytes | None, watchdog_usec: int = 0) -> None:
        self._address = address
        self._sock: socket.socket | None = None
        self.watchdog_usec = watchdog_usec if address is not None else 0
        """The watchdog period systemd expects keep-alives within (0: no watchdog)."""
        self.failures = 0
        self.sent = 0
        self._failing = False
        self._status = ""

    @classmethod
    def from_environ(cls, environ: dict[str, str] | None = None, *, unset: bool = True) -> Notifier:
        """Read ``$NOTIFY_SOCKET`` and ``$WATCHDOG_USEC``; ``unset`` removes them (as
        sd_notify's ``unset_environment``) so children such as notifier commands do not
        inherit a socket that is not theirs."""
        env = os.environ if environ is None else environ
        raw = env.get("NOTIFY_SOCKET", "")
        notifier = cls(_address(raw) if raw else None, _watchdog_usec(env))
        if raw and notifier._address is None:
            log.warning("NOTIFY_SOCKET=%r is not a path or an abstract address; not notifying systemd", raw)
        if unset:
            for key in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
                env.pop(key, None)
        return notifier

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def __repr__(self) -> str:
        where = "off" if self._address is None else repr(self._address)
        return f"<Notifier {where} watchdog={self.watchdog_usec}us sent={self.sent} failures={self.failures}>"

    def send(self, **fields: str | int) -> bool:
        """Send one message of ``KEY=VALUE`` lines (keyword names as the keys); True if sent."""
        if self._address is None:
            return False
        payload = "\n".join(f"{key}={value}" for key, value in fields.items()).encode()
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                # A full socket buffer (systemd busy) must not block the event loop.
                self._sock.setblocking(False)
            self._sock.sendto(payload, self._address)
        except OSError as exc:
            self.failures += 1
            if not self._failing:
                self._failing = True
                log.warning("sd_notify to %r failed: %s (further failures are counted)", self._address, exc)
            return False
        self._failing = False
        self.sent += 1
        return True

    def ready(self, status: str = "") -> bool:
        """``READY=1`` (with ``MAINPID``, so the supervisor knows whom to watch)."""
        if status:
            self._status = status[:_MAX_STATUS]
            return self.send(READY=1, MAINPID=os.getpid(), STATUS=self._status)
        return self.send(READY=1, MAINPID=os.getpid())

    def status(self, text: str) -> bool:
        """``STATUS=``, sent only when it changed."""
        text = " ".join(text.split())[:_MAX_STATUS]
        if text == self._status:
            return False
        self._status = text
        return self.send(STATUS=text)

    def stopping(self, status: str = "") -> bool:
        if status:
            return self.send(STOPPING=1, STATUS=status[:_MAX_STATUS])
        return self.send(STOPPING=1)

    def reloading(self) -> bool:
        return self.send(RELOADING=1)

    def watchdog(self) -> bool:
        return self.send(WATCHDOG=1)

    async def keep_alive(self, healthy: Callable[[], str], status: Callable[[], str] | None = None) -> None:
        """Send ``WATCHDOG=1`` every half period while ``healthy()`` returns ``""``.

        ``healthy`` returns why the engine is not making progress, or ``""``; a reason
        is sent as STATUS= once and no keep-alive goes out until it clears.  ``status``, if
        given, is sent (when it changed) at the same pace.  Returns at once without a watchdog.
        """
        if not self.watchdog_usec:
            return
        period = self.watchdog_usec / 2e6
        stalled = ""
        while True:
            reason = healthy()
            if not reason:
                self.watchdog()
                if stalled:
                    log.warning("engine making progress again; watchdog keep-alives resume")
            elif reason != stalled:
                log.error("engine not making progress (%s): withholding watchdog keep-alives", reason)
                self.status(f"stalled: {reason}")
            stalled = reason
            if status is not None and not reason:
                self.status(status())
            await anyio.sleep(period)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
