"""The desktop notifier against a private `dbus-daemon --session` the test starts, with a test
client owning org.freedesktop.Notifications that receives the Notify call: on a bus of the
test's own user, and on a bus of another user (uid 65534), which root reaches only with
that user's credentials."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from oomkit import Candidate, ConfigError, Decision, Event, Scope
from oomkit.config import config_from_dict
from oomkit_plugins import desktop
from oomkit_plugins.desktop import Desktop, message

pytestmark = pytest.mark.anyio

NOBODY = 65534
VICTIM = Candidate(pid=4242, name="firefox", uid=1000, rss_bytes=3 << 30, start_ticks=1000)
KILLED = Decision(id=1, event=Event(source="takeover", kind="oom", scope=Scope("v1", "/user.slice")),
                  victim=VICTIM, action="kill", outcome="killed")

# Imports first, then drops to the bus owner's uid (no stdlib import is possible after that
# where the interpreter lives in a directory only root may read), then serves one Notify.
RECEIVER = """
import json, os, sys
from jeepney import HeaderFields, MessageType, new_method_return
from jeepney.bus_messages import message_bus
from jeepney.io.blocking import open_dbus_connection
address, uid = sys.argv[1], int(sys.argv[2])
if uid != os.geteuid():
    os.setgroups([]); os.setresgid(uid, uid, uid); os.setresuid(uid, uid, uid)
conn = open_dbus_connection(address)
reply = conn.send_and_get_reply(message_bus.RequestName("org.freedesktop.Notifications", 4))
print("ready", reply.body[0], flush=True)
while True:
    msg = conn.receive(timeout=120)
    h = msg.header
    if h.message_type == MessageType.method_call and h.fields.get(HeaderFields.member) == "Notify":
        conn.send(new_method_return(msg, "u", (42,)))
        app, replaces, icon, summary, body, actions, hints, expire = msg.body
        print(json.dumps({"app": app, "summary": summary, "body": body, "urgency": hints["urgency"][1],
                          "expire": expire, "sender_path": h.fields.get(HeaderFields.path)}), flush=True)
        break
conn.close()
"""


def dbus_daemon() -> str:
    found = shutil.which("dbus-daemon")
    if found is None:
        pytest.skip("dbus-daemon is not installed (Debian: apt-get install dbus-daemon)")
    return found


class Bus:
    def __init__(self, directory: Path, uid: int) -> None:
        self.directory = directory
        self.uid = uid
        self.socket = directory / "bus"
        self.address = f"unix:path={self.socket}"
        argv = [dbus_daemon(), "--session", "--nofork", "--print-address=1", f"--address={self.address}"]
        if uid != os.geteuid():
            setpriv = shutil.which("setpriv")
            if setpriv is None:
                pytest.skip("setpriv is not installed (Debian: util-linux) to run a bus as another user")
            argv = [setpriv, "--reuid", str(uid), "--regid", str(uid), "--clear-groups", *argv]
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().decode()
        assert line.startswith(self.address), (line, self.proc.stderr.read() if self.proc.stderr else "")
        self.receiver: subprocess.Popen[bytes] | None = None

    def serve_notifications(self) -> None:
        script = self.directory.parent / "receiver.py"
        script.write_text(RECEIVER)
        self.receiver = subprocess.Popen([sys.executable, "-I", str(script), self.address, str(self.uid)],
                                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert self.receiver.stdout is not None
        line = self.receiver.stdout.readline().decode()
        assert line == "ready 1\n", (line, self.receiver.stderr.read() if self.receiver.stderr else "")

    def received(self) -> dict[str, Any]:
        assert self.receiver is not None and self.receiver.stdout is not None
        return json.loads(self.receiver.stdout.readline())  # type: ignore[no-any-return]

    def close(self) -> None:
        for p in (self.receiver, self.proc):
            if p is not None and p.poll() is None:
                p.kill()
            if p is not None:
                p.wait()
                for stream in (p.stdout, p.stderr):
                    if stream is not None:
                        stream.close()


@pytest.fixture
def runtime_dir() -> Iterator[Path]:
    """A stand-in for /run/user that another user's bus daemon can write into (pytest's
    tmp_path is root's alone)."""
    top = Path(tempfile.mkdtemp(prefix=f"oomkit-test-dbus-{os.getpid()}-"))
    top.chmod(0o755)
    yield top
    shutil.rmtree(top, ignore_errors=True)


@pytest.fixture
def bus(runtime_dir: Path) -> Iterator[Callable[[int], Bus]]:
    made: list[Bus] = []

    def make(uid: int) -> Bus:
        directory = runtime_dir / str(uid)
        directory.mkdir(mode=0o700)
        os.chown(directory, uid, uid)
        b = Bus(directory, uid)
        made.append(b)
        return b

    yield make
    for b in made:
        b.close()


def notifier(**settings: Any) -> Desktop:
    cfg = config_from_dict({"sources": [], "plugins": {"desktop": {"enabled": True, **settings}}}, "/etc/o.toml")
    plugin = Desktop()
    plugin.oomkit_configure(cfg)
    return plugin


async def wait_for(predicate: Callable[[], object], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await anyio.sleep(0.01)


async def test_the_notify_call_reaches_the_desktop_on_our_own_bus(bus: Callable[[int], Bus]) -> None:
    b = bus(os.geteuid())
    b.serve_notifications()
    plugin = notifier(addresses=[b.address], expire_ms=5000)
    await plugin.oomkit_notify(KILLED)
    got = b.received()
    assert got == {
        "app": "oomkit", "summary": "oomkit killed firefox (pid 4242, 3072 MiB)",
        "body": "Out of memory in v1:/user.slice (oom from takeover).", "urgency": 2, "expire": 5000,
        "sender_path": "/org/freedesktop/Notifications",
    }
    await wait_for(lambda: plugin.worker.sent == 1, "the reply")
    assert plugin.worker.failed == 0


async def test_another_users_bus_is_reached_with_that_users_credentials(
    bus: Callable[[int], Bus], runtime_dir: Path
) -> None:
    if os.geteuid() != 0:
        pytest.skip("only root can connect as another user")
    if os.uname().machine not in desktop._SETRES:
        pytest.skip(f"no per-thread setresuid known on {os.uname().machine}")
    b = bus(NOBODY)
    b.serve_notifications()
    plugin = notifier(user_runtime_dir=str(runtime_dir))  # found, not configured
    assert plugin.buses() == ([(b.address, NOBODY, NOBODY)], True)
    await plugin.oomkit_notify(KILLED)
    assert b.received()["summary"] == "oomkit killed firefox (pid 4242, 3072 MiB)"
    await wait_for(lambda: plugin.worker.sent == 1, "the reply")
    assert os.geteuid() == 0 and os.getegid() == 0, "the worker thread went back to root"


async def test_root_without_the_users_credentials_is_refused(bus: Callable[[int], Bus]) -> None:
    """Why the credentials are switched: the bus itself refuses root."""
    if os.geteuid() != 0:
        pytest.skip("the refusal of root is what this checks")
    from jeepney.io.blocking import DBusConnection, get_bus, prep_socket

    b = bus(NOBODY)
    sock = prep_socket(get_bus(b.address))
    try:
        with pytest.raises(OSError):
            DBusConnection(sock).close()
    finally:
        sock.close()


async def test_a_bus_without_a_notification_service_counts_a_failure(
    bus: Callable[[int], Bus], caplog: pytest.LogCaptureFixture
) -> None:
    b = bus(os.geteuid())
    plugin = notifier(addresses=[b.address])
    await plugin.oomkit_notify(KILLED)
    await wait_for(lambda: plugin.worker.failed == 1, "the refused call")
    assert "Notify refused" in caplog.text and "org.freedesktop.Notifications" in caplog.text


async def test_no_bus_at_all_is_one_failure_saying_so(runtime_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    (runtime_dir / "1000").mkdir()  # a logged-in user without a D-Bus session: skipped quietly
    plugin = notifier(user_runtime_dir=str(runtime_dir))
    plugin._session = ""
    await plugin.oomkit_notify(KILLED)
    await wait_for(lambda: plugin.worker.failed == 1, "the failure")
    assert "no session bus to notify" in caplog.text


async def test_off_by_default_and_for_other_outcomes() -> None:
    cfg = config_from_dict({"sources": []}, "/etc/o.toml")
    off = Desktop()
    off.oomkit_configure(cfg)
    await off.oomkit_notify(KILLED)
    picky = notifier(outcomes=["failed"])
    await picky.oomkit_notify(KILLED)
    assert off.worker.pending == picky.worker.pending == 0


def test_messages_say_what_happened() -> None:
    observed = Decision(id=2, event=Event(source="takeover", kind="kernel-kill", scope=Scope("v1", "/a")),
                        outcome="observed")
    failed = Decision(id=3, event=Event(source="meminfo", kind="low-memory"), outcome="failed",
                      detail="no killer claimed the victim")
    dry = Decision(id=4, event=Event(source="meminfo", kind="low-memory"), victim=VICTIM, outcome="dry-run")
    assert message(observed) == ("The kernel killed a process in v1:/a", "Its own out-of-memory killer acted.", 2)
    assert message(failed) == ("oomkit could not free memory in system", "no killer claimed the victim", 2)
    assert message(dry) == ("oomkit: dry-run in system", "Victim: firefox (pid 4242, 3072 MiB)", 1)


def test_bad_settings_name_their_key() -> None:
    with pytest.raises(ConfigError) as info:
        notifier(expire_ms=-2)
    assert "Expected `int` >= -1 - at `$.plugins.desktop.expire_ms`" in str(info.value)
