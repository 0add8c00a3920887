"""``desktop``: a desktop notification for each decision, over D-Bus.

It calls ``org.freedesktop.Notifications.Notify`` (the freedesktop notification spec, which
GNOME, KDE, XFCE, dunst and mako implement) on each session bus it finds: ``addresses`` when
given, else ``$DBUS_SESSION_BUS_ADDRESS`` when the daemon has one, else every logged-in
user's ``<user_runtime_dir>/<uid>/bus``.  Kills and failures are sent as critical.

A session bus admits only its own user, and root is not its user: the daemon connects to a
user's bus with that user's uid and gid, set for the worker thread that connects alone (the
``setresuid`` system call, not the C library's, which would change every thread), and goes
back to its own right after the connection is authenticated.  That needs Linux on x86-64 or
an architecture with the generic system-call table (arm64, riscv64, loongarch64); elsewhere
only buses of the daemon's own user are reached.

Off unless ``enabled``.  Needs the ``jeepney`` library (``pip install oomkit[desktop]``),
imported only when enabled.  Runs off the kill path, in worker threads (``concurrency``),
like every notifier that reaches outside the process.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import platform
import stat
from collections.abc import Iterator
from typing import Annotated, Any

import msgspec

from oomkit import Config, ConfigError, Decision, hookimpl

from ._notifier import NotifierSettings, Worker

__all__ = ["Desktop", "DesktopSettings", "message"]

log = logging.getLogger("oomkit.plugins.desktop")

_URGENCY_NORMAL, _URGENCY_CRITICAL = 1, 2
_SETRES = {"x86_64": (117, 119), "aarch64": (147, 149), "riscv64": (147, 149), "loongarch64": (147, 149)}
"""(setresuid, setresgid) system-call numbers: x86-64's own table, and the generic one."""


class DesktopSettings(NotifierSettings, frozen=True):
    """``[plugins.desktop]``."""

    enabled: bool = False
    """Send desktop notifications (off by default: a server has no desktop)."""
    addresses: tuple[str, ...] = ()
    """D-Bus addresses (``unix:path=/run/user/1000/bus``); empty: the daemon's session bus,
    else every user's bus under ``user_runtime_dir``."""
    user_runtime_dir: str = "/run/user"
    """Where the users' runtime directories are (``<uid>/bus`` in each)."""
    expire_ms: Annotated[int, msgspec.Meta(ge=-1, le=3_600_000)] = -1
    """How long the notification stays: -1 lets the desktop decide, 0 keeps it until dismissed."""
    app_name: str = "oomkit"
    """The application name the desktop shows."""

    def __post_init__(self) -> None:
        if len(self.addresses) > 64:
            raise ValueError("`addresses` takes at most 64 buses")


def message(decision: Decision) -> tuple[str, str, int]:
    """The notification for ``decision``: summary, body and urgency."""
    ev = decision.event
    where = str(ev.scope)
    v = decision.victim
    who = f"{v.name} (pid {v.pid}, {v.rss_bytes / 2**20:.0f} MiB)" if v is not None else ""
    if decision.outcome == "killed":
        return f"oomkit killed {who}", f"Out of memory in {where} ({ev.kind} from {ev.source}).", _URGENCY_CRITICAL
    if decision.outcome == "observed":
        return f"The kernel killed a process in {where}", "Its own out-of-memory killer acted.", _URGENCY_CRITICAL
    if decision.outcome == "failed":
        return f"oomkit could not free memory in {where}", decision.detail, _URGENCY_CRITICAL
    body = decision.detail or (f"Victim: {who}" if who else "")
    return f"oomkit: {decision.outcome} in {where}", body, _URGENCY_NORMAL


@contextlib.contextmanager
def _credentials(uid: int, gid: int) -> Iterator[None]:
    """This thread alone acts as ``uid``/``gid`` inside the block (the connection's peer
    credentials are taken at ``connect()``); the daemon's other threads stay as they are."""
    if uid == os.geteuid():
        yield
        return
    calls = _SETRES.get(platform.machine())
    if calls is None:
        raise OSError(f"cannot connect as uid {uid} on {platform.machine()} (no per-thread setresuid known)")
    set_uid, set_gid = calls
    libc = ctypes.CDLL(None, use_errno=True)
    own_uid, own_gid = os.geteuid(), os.getegid()

    def call(nr: int, value: int) -> None:
        if libc.syscall(nr, -1, value, -1) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setres{'uid' if nr == set_uid else 'gid'}({value}): {os.strerror(err)}")

    call(set_gid, gid)
    try:
        call(set_uid, uid)
        try:
            yield
        finally:
            call(set_uid, own_uid)
    finally:
        call(set_gid, own_gid)


class Desktop:
    """Sends each decision whose outcome is in ``outcomes`` as a desktop notification."""

    name = "desktop"

    def __init__(self) -> None:
        self.settings = DesktopSettings()
        self.worker = Worker(self.name, log)
        self._session = ""
        self._jeepney: Any = None

    @hookimpl
    def oomkit_configure(self, config: Config) -> None:
        self.settings = config.plugin_settings(self.name, DesktopSettings)
        self.worker.configure(self.settings)
        self._session = os.environ.get("DBUS_SESSION_BUS_ADDRESS", "")
        if self.settings.enabled:
            try:
                import jeepney.io.blocking
            except ImportError:
                raise ConfigError(
                    f"{config.origin}: the desktop notifier needs jeepney (pip install 'oomkit[desktop]')"
                    f" - at `$.plugins.{self.name}.enabled`"
                ) from None
            self._jeepney = jeepney

    @hookimpl
    async def oomkit_notify(self, decision: Decision) -> None:
        if not self.settings.enabled or decision.outcome not in self.settings.outcomes:
            return
        summary, body, urgency = message(decision)
        self.worker.submit(lambda: self._send_all(summary, body, urgency))

    def buses(self) -> tuple[list[tuple[str, int, int]], bool]:
        """``(address, uid, gid)`` of every bus to notify, and whether they were discovered
        (a discovered bus may not exist: a user logged in without a D-Bus session)."""
        if self.settings.addresses:
            return [(a, *_owner(a)) for a in self.settings.addresses], False
        if self._session:
            return [(self._session, *_owner(self._session))], False
        out = []
        try:
            entries = sorted(os.scandir(self.settings.user_runtime_dir), key=lambda e: e.name)
        except OSError:
            return [], True
        for entry in entries:
            try:
                # The directory, not the socket: a root without CAP_DAC_READ_SEARCH cannot look
                # inside another user's 0700 runtime directory, but the user can.
                st = entry.stat()
            except OSError:
                continue
            if entry.name.isdigit() and stat.S_ISDIR(st.st_mode):
                out.append((f"unix:path={entry.path}/bus", st.st_uid, st.st_gid))
        return out, True

    def _send_all(self, summary: str, body: str, urgency: int) -> None:
        buses, discovered = self.buses()
        reached = 0
        failed = []
        for address, uid, gid in buses:
            try:
                self._send(address, uid, gid, summary, body, urgency)
                reached += 1
            except (FileNotFoundError, ConnectionRefusedError) as exc:
                if not discovered:
                    failed.append(f"{address}: {exc.strerror}")
            except Exception as exc:
                failed.append(f"{address}: {type(exc).__name__}: {exc}")
        if failed:
            raise RuntimeError("; ".join(failed))
        if not reached:
            raise RuntimeError(
                f"no session bus to notify (none under {self.settings.user_runtime_dir}; "
                "set [plugins.desktop] addresses)"
            )

    def _send(self, address: str, uid: int, gid: int, summary: str, body: str, urgency: int) -> None:
        jeepney = self._jeepney
        s = self.settings
        target = jeepney.DBusAddress(
            "/org/freedesktop/Notifications",
            bus_name="org.freedesktop.Notifications",
            interface="org.freedesktop.Notifications",
        )
        call = jeepney.new_method_call(
            target, "Notify", "susssasa{sv}i",
            (s.app_name, 0, "dialog-warning", summary, body, [], {"urgency": ("y", urgency)}, s.expire_ms),
        )
        blocking = jeepney.io.blocking
        with _credentials(uid, gid):
            sock = blocking.prep_socket(blocking.get_bus(address), timeout=s.timeout_s)
        try:
            # Not open_dbus_connection: it leaks the socket when the bus hangs up on Hello.
            conn = blocking.DBusConnection(sock)
        except BaseException:
            sock.close()
            raise
        try:
            reply = conn.send_and_get_reply(call, timeout=s.timeout_s)
        finally:
            conn.close()
        if reply.header.message_type == jeepney.MessageType.error:
            raise RuntimeError(f"Notify refused: {reply.body[0] if reply.body else reply.header.fields}")


def _owner(address: str) -> tuple[int, int]:
    """The uid and gid owning a ``unix:path=`` bus socket (or, when we may not look at it,
    its directory); ours for any other address."""
    for part in address.split(";")[0].partition(":")[2].split(","):
        key, _, value = part.partition("=")
        if key == "path":
            for candidate in (value, os.path.dirname(value)):
                try:
                    st = os.stat(candidate)
                except OSError:
                    continue
                return st.st_uid, st.st_gid
    return os.geteuid(), os.getegid()
