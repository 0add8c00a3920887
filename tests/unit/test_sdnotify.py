"""sd_notify against a notify socket the test opens, as systemd would (path and abstract)."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from oomkit.sdnotify import Notifier


class FakeSystemd:
    """A bound datagram socket standing in for systemd's notify socket."""

    def __init__(self, sock: socket.socket, env_value: str) -> None:
        self.sock = sock
        self.env_value = env_value

    def env(self, **extra: str) -> dict[str, str]:
        return {"NOTIFY_SOCKET": self.env_value, **extra}

    def messages(self) -> list[dict[str, str]]:
        out = []
        while True:
            try:
                data = self.sock.recv(4096)
            except BlockingIOError:
                return out
            out.append(dict(line.split("=", 1) for line in data.decode().split("\n")))


@pytest.fixture(params=["path", "abstract"])
def systemd(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[FakeSystemd]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if request.param == "path":
        where = str(tmp_path / "notify.sock")
        sock.bind(where)
        env_value = where
    else:
        name = f"oomkit-test-notify-{os.getpid()}-{id(sock)}"
        sock.bind(b"\0" + name.encode())
        env_value = "@" + name
    sock.setblocking(False)
    yield FakeSystemd(sock, env_value)
    sock.close()


def test_messages_arrive_in_order(systemd: FakeSystemd) -> None:
    env = systemd.env()
    n = Notifier.from_environ(env)
    assert n.enabled and "NOTIFY_SOCKET" not in env, "the variable is not passed on to children"
    assert n.ready("sources: meminfo")
    assert n.status("1 decision")
    assert not n.status("1   decision"), "an unchanged status is not re-sent"
    assert n.watchdog()
    assert n.stopping("SIGTERM")
    got = systemd.messages()
    assert got == [
        {"READY": "1", "MAINPID": str(os.getpid()), "STATUS": "sources: meminfo"},
        {"STATUS": "1 decision"},
        {"WATCHDOG": "1"},
        {"STOPPING": "1", "STATUS": "SIGTERM"},
    ]
    assert n.sent == 4 and n.failures == 0
    n.close()


def test_without_notify_socket_nothing_is_sent() -> None:
    n = Notifier.from_environ({"WATCHDOG_USEC": "1000000"})
    assert not n.enabled and n.watchdog_usec == 0
    assert not n.ready() and n.sent == 0


def test_watchdog_for_another_pid_is_not_ours(systemd: FakeSystemd) -> None:
    n = Notifier.from_environ(systemd.env(WATCHDOG_USEC="2000000", WATCHDOG_PID=str(os.getpid() + 1)))
    assert n.watchdog_usec == 0
    n = Notifier.from_environ(systemd.env(WATCHDOG_USEC="2000000", WATCHDOG_PID=str(os.getpid())))
    assert n.watchdog_usec == 2_000_000


def test_a_vanished_supervisor_is_counted_not_raised(tmp_path: Path) -> None:
    n = Notifier.from_environ({"NOTIFY_SOCKET": str(tmp_path / "gone.sock")})
    assert not n.ready()
    assert not n.watchdog()
    assert n.failures == 2
    n.close()


@pytest.mark.anyio
async def test_keep_alive_withholds_pings_while_the_engine_is_stuck(systemd: FakeSystemd) -> None:
    # 2 ms period: the test counts messages per health check, never time.
    n = Notifier.from_environ(systemd.env(WATCHDOG_USEC="4000"))
    verdicts = ["", "", "dispatcher stalled", "dispatcher stalled", "", ""]
    calls = 0
    done = anyio.Event()

    def healthy() -> str:
        nonlocal calls
        calls += 1
        if calls == len(verdicts):
            done.set()
        return verdicts[min(calls, len(verdicts)) - 1]

    async with anyio.create_task_group() as tg:
        tg.start_soon(n.keep_alive, healthy, lambda: "ok")
        with anyio.fail_after(30):
            await done.wait()
        tg.cancel_scope.cancel()
    n.close()
    got = systemd.messages()
    # One keep-alive per healthy check, none while stalled, the reason shown once.
    assert got[:6] == [
        {"WATCHDOG": "1"},
        {"STATUS": "ok"},
        {"WATCHDOG": "1"},
        {"STATUS": "stalled: dispatcher stalled"},
        {"WATCHDOG": "1"},
        {"STATUS": "ok"},
    ]
    assert got[6:7] in ([], [{"WATCHDOG": "1"}])


@pytest.mark.anyio
async def test_keep_alive_returns_without_a_watchdog(systemd: FakeSystemd) -> None:
    n = Notifier.from_environ(systemd.env())
    with anyio.fail_after(30):
        await n.keep_alive(lambda: "")
    assert systemd.messages() == []
