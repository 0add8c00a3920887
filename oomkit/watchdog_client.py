"""The daemon's end of the takeover watchdog (:mod:`oomkit.watchdog`): start it, talk to it
in its line protocol, notice that it died, stop it.

Used by the memcg-oom source; written for any source that changes a cgroup value the kernel
must get back when oomkit dies (the v2 ``memory.high`` brake's ``KIND`` is reserved in the
protocol).
"""

from __future__ import annotations

import array
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import final

import anyio

from . import watchdog
from .errors import SourceError

__all__ = ["WATCHDOG_START_S", "WatchdogError", "WatchdogGone", "WatchdogLink", "quote"]

WATCHDOG_START_S = 5.0
"""How long a watchdog may take to say ``ready`` (and to say ``bye`` when told to quit)."""

quote = watchdog.quote


class WatchdogError(SourceError):
    """The takeover watchdog could not start, or kept dying: the takeover ends."""


class WatchdogGone(Exception):
    """The watchdog closed its socket (it died or exited) or stopped reading it."""


@final
class WatchdogLink:
    """One running watchdog process and our end of its socket."""

    __slots__ = ("_proc", "_sock", "_eof", "_bye")

    def __init__(self, proc: subprocess.Popen[bytes], sock: socket.socket) -> None:
        self._proc = proc
        self._sock = sock
        self._eof = False
        self._bye = ""
        """Why it said it exits (``quit``, ``eof``, ``SIGTERM``, ``SIGINT``), once it did."""

    @property
    def pid(self) -> int:
        return self._proc.pid

    @property
    def alive(self) -> bool:
        """Still running (it may have exited without our having read its end of file yet)."""
        return self._proc.poll() is None

    def fileno(self) -> int:
        """Readable when the watchdog said something or went away."""
        return self._sock.fileno()

    @classmethod
    async def start(cls, proc_root: str, journal_dir: Path, rescan_s: float) -> WatchdogLink:
        """Start a watchdog and wait for its ``ready``; :class:`WatchdogError` if it does not come."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        argv = [sys.executable, "-I", "-S", str(watchdog.__file__), proc_root, str(journal_dir)]
        argv.append(str(max(1, round(rescan_s * 1000))))
        try:
            proc = subprocess.Popen(
                argv,
                stdin=theirs.fileno(),
                stdout=subprocess.DEVNULL,
                # A Ctrl-C or a kill of the daemon's process group must not end it first.
                start_new_session=True,
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        ours.setblocking(False)
        link = cls(proc, ours)
        try:
            with anyio.fail_after(WATCHDOG_START_S):
                said = await link.until(lambda m: True)
        except TimeoutError:
            said = ["silent", f"for {WATCHDOG_START_S:g} s"]
        except WatchdogGone:
            said = []
        except BaseException:
            with anyio.CancelScope(shield=True):
                await link.kill()
            raise
        if said[:1] != ["ready"]:
            with anyio.CancelScope(shield=True):
                await link.kill()
            why = " ".join(said) or link.exit_status()
            raise WatchdogError(f"the takeover watchdog did not start: {why}")
        return link

    # --- the protocol -------------------------------------------------------------------------

    def send(self, *words: str, fds: Sequence[int] = ()) -> None:
        """Send one command; :class:`WatchdogGone` if it is gone or not reading."""
        if self._eof:
            raise WatchdogGone("closed")
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        try:
            self._sock.sendmsg([" ".join(words).encode()], anc, socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)
        except BlockingIOError:
            raise WatchdogGone("not reading its commands") from None
        except OSError as exc:
            self._eof = True
            raise WatchdogGone(exc.strerror or str(exc)) from None

    def messages(self) -> list[list[str]]:
        """Every message queued now, as words; :class:`WatchdogGone` at end of file."""
        out: list[list[str]] = []
        while not self._eof:
            try:
                data = self._sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                data = b""
            if not data:
                self._eof = True
                break
            words = data.decode("ascii", "replace").split()
            if words[:1] == ["bye"] and len(words) > 1:
                self._bye = words[1]
            out.append(words)
        if self._eof and not out:
            raise WatchdogGone("end of file")
        return out

    async def until(
        self, match: Callable[[list[str]], bool], other: Callable[[list[str]], None] | None = None
    ) -> list[str]:
        """Wait for the first message ``match`` accepts; hand the others to ``other``."""
        while True:
            for words in self.messages():
                if words and match(words):
                    return words
                if other is not None and words:
                    other(words)
            await anyio.wait_readable(self._sock.fileno())

    # --- the process --------------------------------------------------------------------------

    def exit_status(self) -> str:
        """How it ended, in words (``killed by SIGKILL``, ``exited on SIGTERM after restoring
        every cgroup``), or ``still running``."""
        code = self._proc.poll()
        if code is None:
            return "still running"
        if code == 0 and self._bye:
            return f"exited on {self._bye} after restoring every cgroup"
        if code < 0:
            try:
                return f"killed by {signal.Signals(-code).name}"
            except ValueError:
                return f"killed by signal {-code}"
        return f"exited with status {code}"

    async def reap(self, timeout: float = 1.0) -> str:
        """Wait for it to exit (SIGKILL after ``timeout``); return :meth:`exit_status`."""
        with anyio.move_on_after(timeout):
            while self._proc.poll() is None:
                await anyio.sleep(0.005)
        if self._proc.poll() is None:
            await self.kill()
        self.close()
        return self.exit_status()

    async def kill(self) -> None:
        if self._proc.poll() is None:
            try:
                self._proc.kill()
            except ProcessLookupError:
                pass
            with anyio.move_on_after(5):
                while self._proc.poll() is None:
                    await anyio.sleep(0.005)
        self.close()

    async def stop(self) -> list[list[str]] | None:
        """Tell it to restore everything and exit; its ``restored``/``kept`` messages, or None
        if it did not confirm (it was gone, stopped or stuck: it is killed then)."""
        seen: list[list[str]] = []
        try:
            self.send("quit")
            with anyio.fail_after(WATCHDOG_START_S):
                await self.until(lambda m: m[0] == "bye", seen.append)
        except (WatchdogGone, TimeoutError):
            await self.kill()
            return None
        await self.reap()
        return seen

    def close(self) -> None:
        if self._sock.fileno() >= 0:
            self._sock.close()
        self._eof = True

    def __repr__(self) -> str:
        return f"<WatchdogLink pid={self._proc.pid} {self.exit_status()}>"
