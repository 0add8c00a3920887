"""The host side of the runner: one QEMU guest and the client of its agent.

:class:`Guest` boots QEMU (software CPU, one vCPU) on a prepared :class:`~.image.Image`,
connects to the agent's virtio-serial port through a unix socket and sends it requests
(see :mod:`.agent` for the protocol).  Every failure is one of the :class:`GuestError`
classes below, with what was seen: the guest died (QEMU's exit status and the console's
last lines), no reply in time, or a reply that is not the protocol.

QEMU is killed when its parent dies (``PR_SET_PDEATHSIG``) and runs in its own session, so an
interrupted pytest never leaves one behind and a Ctrl-C reaches pytest only, whose teardown
powers the guest off.
"""

from __future__ import annotations

import base64
import ctypes
import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .image import Image

__all__ = [
    "AgentProtocolError",
    "CommandFailed",
    "CommandTimeout",
    "Guest",
    "GuestDied",
    "GuestError",
    "GuestTimeout",
    "Process",
    "Result",
]

AGENT = Path(__file__).with_name("agent.py")
_PR_SET_PDEATHSIG = 1
_FATAL = re.compile(r"Kernel panic - .*|oomkit-guest: FAILED .*|BUG: .*|Oops: .*")
_GRACE_S = 30.0
"""How much longer than a command's own timeout the host waits for the agent's reply: the
agent must still kill the command and answer, in an emulated CPU on a busy machine."""


class GuestError(Exception):
    """Anything that went wrong with the guest or a command in it."""


class GuestDied(GuestError):
    """QEMU exited or the agent's port closed; the message ends with the console's tail."""


class GuestTimeout(GuestError):
    """The agent did not answer in time (the guest hangs or is far too slow)."""


class AgentProtocolError(GuestError):
    """The agent sent something that is not a reply to the request (shown as received)."""


@dataclass(frozen=True)
class Result:
    """A finished command: exit status and output (each cut at the request's limit)."""

    argv: tuple[str, ...]
    rc: int
    stdout: bytes
    stderr: bytes
    truncated: bool = False

    @property
    def text(self) -> str:
        return self.stdout.decode(errors="replace")

    def json_lines(self) -> list[Any]:
        """stdout's lines as JSON values (the guest scripts print one object per line)."""
        return [json.loads(ln) for ln in self.text.splitlines() if ln.strip()]

    def describe(self) -> str:
        err = self.stderr.decode(errors="replace").strip()
        return f"{list(self.argv)} exited with {self.rc}" + (f"; stderr:\n{err[-4000:]}" if err else "")


class CommandFailed(GuestError):
    """A command run with ``check=True`` exited non-zero."""

    def __init__(self, result: Result) -> None:
        super().__init__(result.describe())
        self.result = result


class CommandTimeout(GuestError):
    """A command outlived its timeout; the agent killed its process group."""

    def __init__(self, result: Result, timeout: float) -> None:
        err = result.stderr.decode(errors="replace").strip()
        super().__init__(
            f"{list(result.argv)} did not finish within {timeout:g} s in the guest (killed)"
            + (f"; stderr so far:\n{err[-4000:]}" if err else "")
        )
        self.result = result


def _die_with_parent() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


class Guest:
    """One booted guest.  ``with Guest(image) as g: g.run(["uname", "-r"])``."""

    def __init__(self, image: Image, *, memory_mib: int = 512, cpus: int = 1, zram: bool = False,
                 python: str | None = None) -> None:
        self.image = image
        self.memory_mib = memory_mib
        self.cpus = cpus
        self.zram = zram
        self.interpreter = python or sys.executable
        """The interpreter guest scripts run with: this one (it imports oomkit), seen through
        the 9p root."""
        self._qemu: subprocess.Popen[bytes] | None = None
        self._sock: socket.socket | None = None
        self._buf = b""
        self._next_id = 1
        _sweep_stale()
        self._dir = Path(tempfile.mkdtemp(prefix=f"{_PREFIX}{os.getpid()}-"))
        self.boot_s: float | None = None

    def __repr__(self) -> str:
        state = "running" if self.alive else "stopped"
        return f"<Guest {self.image.release} {self.memory_mib} MiB {state}>"

    # --- lifetime ---------------------------------------------------------------------------

    def argv(self) -> list[str]:
        sock = self._dir / "agent.sock"
        append = [
            "console=ttyS0", "panic=-1", "quiet",
            f"oomkit_python={self.interpreter}", f"oomkit_agent={AGENT}", f"oomkit_zram={int(self.zram)}",
        ]
        return [
            self.image.qemu, "-accel", "tcg,thread=multi", "-cpu", "max", "-machine", "pc",
            "-m", f"{self.memory_mib}M", "-smp", str(self.cpus),
            "-nodefaults", "-display", "none", "-no-reboot", "-net", "none",
            "-serial", f"file:{self._dir / 'console.log'}",
            "-kernel", str(self.image.kernel), "-initrd", str(self.image.initrd),
            "-append", " ".join(append),
            "-fsdev", "local,id=hostroot,path=/,readonly=on,security_model=none,multidevs=remap",
            "-device", "virtio-9p-pci,fsdev=hostroot,mount_tag=hostroot",
            "-device", "virtio-serial-pci",
            "-chardev", f"socket,id=agent,path={sock},server=on,wait=off",
            "-device", "virtserialport,chardev=agent,name=oomkit.agent",
        ]

    def boot(self, timeout: float = 180.0) -> None:
        """Start QEMU and wait for the agent's greeting.  Raises :class:`GuestError`."""
        for part in (self.interpreter, str(AGENT)):
            if " " in part:
                raise GuestError(f"{part!r}: a path with a space cannot go on the kernel command line")
        start = time.monotonic()
        with open(self._dir / "qemu.log", "wb") as log:
            self._qemu = subprocess.Popen(
                self.argv(), stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                start_new_session=True, preexec_fn=_die_with_parent,
            )
        deadline = start + timeout
        sock_path = str(self._dir / "agent.sock")
        while self._sock is None:
            self._check_alive()
            try:
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.connect(sock_path)
                self._sock = s
            except (FileNotFoundError, ConnectionRefusedError):
                s.close()
                if time.monotonic() > deadline:
                    raise GuestTimeout(f"QEMU made no agent socket within {timeout:g} s" + self._tail()) from None
                time.sleep(0.05)
        hello = self._receive(0, deadline, "the agent's greeting")
        if not hello.get("ready"):
            raise AgentProtocolError(f"expected the agent's greeting, received {hello!r}")
        self.boot_s = time.monotonic() - start

    @property
    def qemu_pid(self) -> int | None:
        return None if self._qemu is None else self._qemu.pid

    @property
    def alive(self) -> bool:
        return self._qemu is not None and self._qemu.poll() is None

    def shutdown(self, timeout: float = 30.0) -> None:
        """Power off (the agent kills its background processes first); kill QEMU if that
        does not end it within ``timeout``.  Safe to call twice."""
        try:
            if self.alive and self._sock is not None:
                try:
                    self._request("poweroff", min(timeout, 10.0))
                except GuestError:
                    pass  # killed below
            if self._qemu is not None:
                try:
                    self._qemu.wait(timeout)
                except subprocess.TimeoutExpired:
                    self._qemu.kill()
                    self._qemu.wait()
        finally:
            if self._sock is not None:
                self._sock.close()
                self._sock = None
            shutil.rmtree(self._dir, ignore_errors=True)

    def kill(self) -> None:
        """End QEMU at once (for a guest a test wrecked)."""
        if self._qemu is not None and self._qemu.poll() is None:
            self._qemu.kill()
            self._qemu.wait()
        self.shutdown(0)

    def __enter__(self) -> Guest:
        try:
            self.boot()
        except BaseException:
            self.kill()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    # --- the protocol -----------------------------------------------------------------------

    def console(self) -> str:
        """What the guest printed on its serial console so far."""
        try:
            return (self._dir / "console.log").read_text(errors="replace")
        except OSError:
            return ""

    def _tail(self, lines: int = 25) -> str:
        console = self.console().rstrip().splitlines()
        # The line that says what happened scrolls away under a panic's register dump.
        fatal = next((m[0] for ln in console if (m := _FATAL.search(ln))), None)
        out = f"; the console says: {fatal}" if fatal else ""
        tail = console[-lines:]
        out += "\n--- guest console (last lines) ---\n" + "\n".join(tail) if tail else "\n(the guest console is empty)"
        try:
            qemu = (self._dir / "qemu.log").read_text(errors="replace").strip()
        except OSError:
            qemu = ""
        return out + (f"\n--- qemu ---\n{qemu[-2000:]}" if qemu else "")

    def _check_alive(self) -> None:
        if self._qemu is None:
            raise GuestDied("the guest was never booted")
        rc = self._qemu.poll()
        if rc is not None:
            raise GuestDied(f"QEMU exited with status {rc}" + self._tail())

    def _receive(self, req_id: int, deadline: float, what: str) -> dict[str, Any]:
        assert self._sock is not None
        while b"\n" not in self._buf:
            self._check_alive()
            left = deadline - time.monotonic()
            if left <= 0:
                raise GuestTimeout(f"no reply to {what} within the deadline" + self._tail())
            ready, _, _ = select.select([self._sock], [], [], min(left, 0.5))
            if ready:
                chunk = self._sock.recv(1 << 20)
                if not chunk:
                    # The port closed: the guest is going down.  Give QEMU a moment to exit
                    # so the message carries its status.
                    if self._qemu is not None:
                        try:
                            self._qemu.wait(5)
                        except subprocess.TimeoutExpired:
                            pass
                    self._check_alive()
                    raise GuestDied(f"the agent's port closed while waiting for {what}" + self._tail())
                self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        try:
            reply = json.loads(line)
        except ValueError:
            raise AgentProtocolError(f"waiting for {what}, received a line that is not JSON: {line[:500]!r}") from None
        if not isinstance(reply, dict) or reply.get("id") != req_id:
            raise AgentProtocolError(f"waiting for the reply to {what} (id {req_id}), received {line[:500]!r}")
        return reply

    def _request(self, op: str, wait: float, /, **fields: Any) -> dict[str, Any]:
        if self._sock is None:
            raise GuestDied("the guest is not running")
        req_id = self._next_id
        self._next_id += 1
        what = f"{op} {fields.get('argv') or fields.get('path') or fields.get('pid') or ''}".strip()
        self._check_alive()
        self._sock.sendall(json.dumps({"id": req_id, "op": op, **fields}).encode() + b"\n")
        reply = self._receive(req_id, time.monotonic() + wait, what)
        if not reply.get("ok"):
            raise GuestError(f"{what}: the agent says: {reply.get('error')}")
        return reply

    # --- commands ---------------------------------------------------------------------------

    def run(self, argv: Sequence[str], *, timeout: float = 120.0, env: Mapping[str, str] | None = None,
            cwd: str | None = None, cgroup: str | None = None, stdin: bytes = b"", check: bool = True,
            limit: int = 1 << 20) -> Result:
        """Run ``argv`` in the guest (inside ``cgroup``, a directory, if given) and wait for it.
        Raises :class:`CommandTimeout` past ``timeout``, :class:`CommandFailed` for a non-zero
        exit when ``check``; ``env`` adds to the agent's environment; output beyond ``limit``
        bytes is cut (``Result.truncated``)."""
        reply = self._request(
            "run", timeout + _GRACE_S, argv=list(argv), env=dict(env or {}), cwd=cwd,
            cgroup=cgroup, timeout=timeout, stdin=base64.b64encode(stdin).decode(), limit=limit,
        )
        result = Result(
            tuple(argv), reply["rc"], base64.b64decode(reply["stdout"]), base64.b64decode(reply["stderr"]),
            reply["truncated"],
        )
        if reply["timed_out"]:
            raise CommandTimeout(result, timeout)
        if check and result.rc != 0:
            raise CommandFailed(result)
        return result

    def sh(self, script: str, **kwargs: Any) -> Result:
        """``run(["sh", "-c", script])``."""
        return self.run(["sh", "-c", script], **kwargs)

    def python(self, code: str, *args: str, **kwargs: Any) -> Result:
        """Run Python ``code`` (the text of a script) with the host's interpreter, from the
        checkout, so ``import oomkit`` finds the code under test."""
        kwargs.setdefault("cwd", str(_checkout()))
        return self.run([self.interpreter, "-c", code, *args], **kwargs)

    def spawn(self, argv: Sequence[str], *, env: Mapping[str, str] | None = None, cwd: str | None = None,
              cgroup: str | None = None) -> Process:
        """Start ``argv`` in the background (inside ``cgroup`` if given); see :class:`Process`."""
        reply = self._request("spawn", _GRACE_S, argv=list(argv), env=dict(env or {}), cwd=cwd, cgroup=cgroup)
        return Process(self, tuple(argv), reply["pid"])

    def read(self, path: str) -> bytes:
        return base64.b64decode(self._request("read", _GRACE_S, path=path)["data"])

    def read_text(self, path: str) -> str:
        return self.read(path).decode()

    def write(self, path: str, data: str | bytes | int) -> None:
        raw = data if isinstance(data, bytes) else str(data).encode()
        self._request("write", _GRACE_S, path=path, data=base64.b64encode(raw).decode())


class Process:
    """A background process in the guest: its output so far, signals, its exit."""

    def __init__(self, guest: Guest, argv: tuple[str, ...], pid: int) -> None:
        self.guest = guest
        self.argv = argv
        self.pid = pid
        self.rc: int | None = None
        self.stdout = b""
        self.stderr = b""

    def __repr__(self) -> str:
        return f"<guest Process {self.pid} {list(self.argv)[:3]} rc={self.rc}>"

    def poll(self) -> int | None:
        """Collect new output; the exit status once it ended."""
        if self.rc is None:
            reply = self.guest._request("poll", _GRACE_S, pid=self.pid,
                                        out_offset=len(self.stdout), err_offset=len(self.stderr))
            self.stdout += base64.b64decode(reply["stdout"])
            self.stderr += base64.b64decode(reply["stderr"])
            self.rc = reply["rc"]
        return self.rc

    def lines(self) -> list[str]:
        """stdout's complete lines so far."""
        done = self.stdout[: self.stdout.rfind(b"\n") + 1]
        return done.decode(errors="replace").splitlines()

    def json(self) -> list[Any]:
        """stdout's complete lines so far, as JSON values (for scripts that print them)."""
        return [json.loads(ln) for ln in self.lines() if ln.strip()]

    def wait_for(self, until: Callable[[Process], bool], *, timeout: float, what: str, every: float = 0.2) -> None:
        """Poll until ``until(self)`` holds; raises GuestTimeout naming ``what`` (with the
        output so far) if it does not within ``timeout``, or if the process ends first."""
        deadline = time.monotonic() + timeout
        while True:
            rc = self.poll()
            if until(self):
                return
            if rc is not None or time.monotonic() > deadline:
                why = f"exited with {rc}" if rc is not None else f"not within {timeout:g} s"
                raise GuestTimeout(f"{list(self.argv)}: {what}: {why}" + self._output())
            time.sleep(every)

    def signal(self, sig: int = signal.SIGTERM) -> None:
        """Send ``sig`` to its process group (nothing if it already ended)."""
        if self.rc is None:
            self.guest._request("signal", _GRACE_S, pid=self.pid, signal=int(sig))

    def wait(self, timeout: float = 60.0) -> int:
        deadline = time.monotonic() + timeout
        while (rc := self.poll()) is None:
            if time.monotonic() > deadline:
                raise GuestTimeout(f"{list(self.argv)} still runs after {timeout:g} s" + self._output())
            time.sleep(0.1)
        return rc

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, then SIGKILL if it is still there after ``timeout``; the exit status."""
        self.signal(signal.SIGTERM)
        try:
            return self.wait(timeout)
        except GuestTimeout:
            self.signal(signal.SIGKILL)
            return self.wait(timeout)

    def _output(self) -> str:
        out = self.stdout.decode(errors="replace")[-3000:]
        err = self.stderr.decode(errors="replace")[-3000:]
        return f"\n--- stdout ---\n{out}\n--- stderr ---\n{err}"


_PREFIX = "oomkit-guest-"


def _sweep_stale() -> None:
    """Remove the run directories (socket, console log) of guests whose process is gone:
    a killed pytest never ran its teardown, and QEMU died with it."""
    for d in Path(tempfile.gettempdir()).glob(f"{_PREFIX}*-*"):
        owner = d.name.removeprefix(_PREFIX).split("-", 1)[0]
        if owner.isdigit() and not Path(f"/proc/{owner}").exists():
            shutil.rmtree(d, ignore_errors=True)


def _checkout() -> Path:
    return Path(__file__).resolve().parents[2]
