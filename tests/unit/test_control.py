"""The control socket on a real engine (fake trees, a fake source): peers checked by their
credentials (a client run as uid 65534), malformed and oversized requests refused, status,
decisions, rank and follow answered, a slow follower never stalls the engine, and the
metrics exporter's counters moving after a real decision."""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest
from prometheus_client.parser import text_string_to_metric_families

from oomkit import Engine, Scope
from oomkit.config import ControlConfig, HistoryConfig, MetricsConfig
from oomkit.control import Client, ControlError, ControlServer, Request
from oomkit.metrics import Exporter
from oomkit.testing import FakeCgroups, FakeProc, FakeSource, config_for

pytestmark = pytest.mark.anyio

NOBODY = 65534


@pytest.fixture
def sockdir() -> Iterator[Path]:
    """A directory another uid can reach (pytest's tmp_path is root's alone)."""
    d = Path(tempfile.mkdtemp(prefix=f"oomkit-test-control-{os.getpid()}-"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


class Running:
    def __init__(self, engine: Engine, server: ControlServer, source: FakeSource) -> None:
        self.engine = engine
        self.server = server
        self.source = source
        self.client = Client(server.path)
        self.reloads = 0


@asynccontextmanager
async def running(fake_proc: FakeProc, path: Path, *, history: HistoryConfig | None = None,
                  **control: Any) -> AsyncIterator[Running]:
    fake_proc.add_process(4000, "hog", rss=300 << 20)
    fake_proc.add_process(4001, "small", rss=10 << 20)
    source = FakeSource("test")
    engine = Engine(config_for(fake_proc, history=history or HistoryConfig()), sources=[source], dry_run=True)

    async def reload() -> str:
        r.reloads += 1
        return "reloaded"

    server = ControlServer(ControlConfig(**control), path, engine, reload)
    r = Running(engine, server, source)
    async with engine, anyio.create_task_group() as tg:
        await tg.start(server.run)
        yield r
        tg.cancel_scope.cancel()


def raw_request(path: Path, line: bytes) -> dict[str, Any]:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(30)
        s.connect(str(path))
        s.sendall(line)
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    return json.loads(data)  # type: ignore[no-any-return]


async def test_status_answers_with_the_engines_snapshot(fake_proc: FakeProc, sockdir: Path) -> None:
    async with running(fake_proc, sockdir / "c.sock") as r:
        await r.engine.decide(r.source.event("oom"))
        st = await anyio.to_thread.run_sync(r.client.request, Request(v=1, op="status"))
        assert st["pid"] == os.getpid() and st["counters"]["decisions"] == 1
        assert st["outcomes"] == {"dry-run": 1}
        (brief,) = st["recent"]
        assert brief["victim_name"] == "hog" and brief["outcome"] == "dry-run"
        assert [s["name"] for s in st["sources"]] == ["test"]
        decisions = await anyio.to_thread.run_sync(r.client.request, Request(v=1, op="decisions", max_ranking=1))
        assert len(decisions) == 1 and len(decisions[0]["ranking"]) == 1
        ranked = await anyio.to_thread.run_sync(r.client.request, Request(v=1, op="rank", limit=1))
        assert [x["candidate"]["name"] for x in ranked] == ["hog"]
        assert await anyio.to_thread.run_sync(r.client.request, Request(v=1, op="reload")) == "reloaded"


async def test_the_socket_is_root_only_by_mode(fake_proc: FakeProc, sockdir: Path) -> None:
    async with running(fake_proc, sockdir / "c.sock") as r:
        assert stat.S_IMODE(r.server.path.stat().st_mode) == 0o600
        assert [p.name for p in sockdir.iterdir()] == ["c.sock"], "bound under a temporary name, renamed into place"
    assert not (sockdir / "c.sock").exists(), "removed on the way out"


def _as_nobody(path: Path) -> subprocess.CompletedProcess[str]:
    """A client run as uid 65534: connect, ask for status, print what came back."""
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("setpriv is not installed (Debian: util-linux) to run a client as another user")
    code = (
        "import socket, sys\n"
        "s = socket.socket(socket.AF_UNIX)\n"
        "s.settimeout(30)\n"
        "try:\n"
        f"    s.connect({str(path)!r})\n"
        "except OSError as e:\n"
        "    print('connect:', e.strerror); sys.exit(0)\n"
        "try:\n"
        "    s.sendall(b'{\"v\": 1, \"op\": \"status\"}\\n')\n"
        "except BrokenPipeError:\n"
        "    pass  # refused before it asked: the answer is already there\n"
        "data = b''\n"
        "while True:\n"
        "    chunk = s.recv(65536)\n"
        "    if not chunk: break\n"
        "    data += chunk\n"
        "print(data.decode())\n"
    )
    # /bin/sh -c exec: the test's own interpreter may live where uid 65534 cannot read.
    python = shutil.which("python3", path="/usr/bin:/usr/local/bin:/bin")
    if python is None:
        pytest.skip("no system python3 for the uid 65534 client")
    return subprocess.run(
        [setpriv, "--reuid", str(NOBODY), "--regid", str(NOBODY), "--clear-groups", python, "-I", "-c", code],
        capture_output=True, text=True, timeout=60,
    )


async def test_a_non_root_peer_is_refused_by_its_credentials(fake_proc: FakeProc, sockdir: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to run a client as uid 65534")
    # The mode lets anyone connect: what refuses is the SO_PEERCRED check.
    async with running(fake_proc, sockdir / "c.sock", mode=0o666) as r:
        done = await anyio.to_thread.run_sync(_as_nobody, r.server.path)
        assert done.returncode == 0, done.stderr
        answer = json.loads(done.stdout)
        assert answer["v"] == 1 and answer["ok"] is False
        assert answer["error"].startswith(f"uid {NOBODY} (pid ") and "may not use this socket" in answer["error"]
        assert "result" not in answer and r.server.refused == 1
    async with running(fake_proc, sockdir / "d.sock", mode=0o666, allow_uids=(NOBODY,)) as r:
        done = await anyio.to_thread.run_sync(_as_nobody, r.server.path)
        assert json.loads(done.stdout)["ok"] is True, "allowed by [control] allow_uids"


async def test_with_the_default_mode_another_user_cannot_even_connect(fake_proc: FakeProc, sockdir: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to run a client as uid 65534")
    async with running(fake_proc, sockdir / "c.sock") as r:
        done = await anyio.to_thread.run_sync(_as_nobody, r.server.path)
        assert done.stdout.strip() == "connect: Permission denied"


@pytest.mark.parametrize(
    ("line", "error"),
    [
        (b"not json\n", "bad request: JSON is malformed"),
        (b'{"v": 1, "op": "format-disk"}\n', "bad request: Invalid enum value 'format-disk' - at `$.op`"),
        (b'{"v": 1, "op": "status", "extra": 1}\n', "bad request: Object contains unknown field `extra`"),
        (b'{"op": "status"}\n', "bad request: Object missing required field `v`"),
        (b'{"v": 2, "op": "status"}\n', "protocol 2 is not spoken here (this daemon speaks 1)"),
        (b'{"v": 1, "op": "decisions", "limit": 0}\n', "bad request: Expected `int` >= 1 - at `$.limit`"),
        (b'{"v": 1, "op": "status", "pad": "' + b"x" * 70000 + b'"}\n', "request longer than 65536 bytes"),
    ],
)
async def test_a_malformed_request_is_refused_in_one_line(
    fake_proc: FakeProc, sockdir: Path, line: bytes, error: str
) -> None:
    async with running(fake_proc, sockdir / "c.sock") as r:
        answer = await anyio.to_thread.run_sync(raw_request, r.server.path, line)
        assert answer["ok"] is False and answer["error"].startswith(error), answer
        assert r.server.refused == 1 and r.server.served == 0
        # ...and the server goes on serving.
        ok = await anyio.to_thread.run_sync(raw_request, r.server.path, b'{"v": 1, "op": "status"}\n')
        assert ok["ok"] is True


async def test_a_silent_client_is_disconnected_and_others_are_served(fake_proc: FakeProc, sockdir: Path) -> None:
    async with running(fake_proc, sockdir / "c.sock", client_timeout_s=0.2, max_clients=2) as r:
        with socket.socket(socket.AF_UNIX) as idle:
            idle.connect(str(r.server.path))
            ok = await anyio.to_thread.run_sync(raw_request, r.server.path, b'{"v": 1, "op": "status"}\n')
            assert ok["ok"] is True
            idle.settimeout(30)
            assert await anyio.to_thread.run_sync(idle.recv, 10) == b"", "hung up on after client_timeout_s"


async def test_too_many_clients_are_told_so(fake_proc: FakeProc, sockdir: Path) -> None:
    async with running(fake_proc, sockdir / "c.sock", max_clients=1) as r:
        with socket.socket(socket.AF_UNIX) as first:
            first.connect(str(r.server.path))
            for _ in range(1000):  # until the server has accepted the first one
                if r.server._clients.value == 0:
                    break
                await anyio.sleep(0.01)
            answer = await anyio.to_thread.run_sync(raw_request, r.server.path, b'{"v": 1, "op": "status"}\n')
            assert answer == {"v": 1, "ok": False, "error": "busy: 1 clients already"}
            first.sendall(b'{"v": 1, "op": "status"}\n')
            first.settimeout(30)
            assert b'"ok":true' in await anyio.to_thread.run_sync(first.recv, 65536)


async def test_follow_sees_each_new_decision(fake_proc: FakeProc, sockdir: Path) -> None:
    async with running(fake_proc, sockdir / "c.sock") as r:
        lines: list[dict[str, Any]] = []
        got = anyio.Event()
        token = anyio.lowlevel.current_token()

        def follow() -> None:
            for line in r.client.follow(Request(v=1, op="follow")):
                lines.append(line)
                anyio.from_thread.run_sync(got.set, token=token)
                return

        async with anyio.create_task_group() as tg:
            tg.start_soon(anyio.to_thread.run_sync, follow)
            with anyio.fail_after(30):
                while not r.engine._feeds:
                    await anyio.sleep(0.01)
                await r.engine.decide(r.source.event("oom"))
                await got.wait()
        (line,) = lines
        assert line["v"] == 1 and line["decision"]["victim"]["name"] == "hog"
        with anyio.fail_after(30):
            while r.engine._feeds:  # the follower hung up: its feed is gone
                await anyio.sleep(0.01)


async def test_a_follower_that_does_not_read_never_stalls_the_engine(fake_proc: FakeProc, sockdir: Path) -> None:
    for pid in range(5000, 5300):  # big decisions: a few fill the socket's buffer
        fake_proc.add_process(pid, f"p{pid}", rss=pid << 10)
    async with running(fake_proc, sockdir / "c.sock", follow_buffer=2, client_timeout_s=0.5) as r:
        with socket.socket(socket.AF_UNIX) as lazy:
            lazy.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
            lazy.connect(str(r.server.path))
            lazy.sendall(b'{"v": 1, "op": "follow", "max_ranking": 1000}\n')
            with anyio.fail_after(30):
                while not r.engine._feeds:
                    await anyio.sleep(0.01)
            (feed,) = r.engine._feeds
            for _ in range(200):  # every decision is published at once, read or not
                await r.engine.decide(r.source.event("oom"))
            assert r.engine.stats.decisions == 200
            assert feed.dropped > 0, "the follower's backlog is bounded"
            with anyio.fail_after(30):
                # Disconnected once a write timed out.  A takeover decides on the loop without
                # yielding ([engine] urgent_on_loop), so the burst may have handed the follower
                # only what the socket's buffers hold: more decisions fill them.
                while r.engine._feeds:
                    await r.engine.decide(r.source.event("oom"))
                    await anyio.sleep(0.01)


async def test_a_live_daemons_socket_is_never_taken_over(fake_proc: FakeProc, sockdir: Path) -> None:
    async with running(fake_proc, sockdir / "c.sock") as r:
        second = ControlServer(ControlConfig(), r.server.path, r.engine, lambda: anyio.sleep(0))  # type: ignore[arg-type]
        with pytest.raises(ControlError, match="another oomkit serves its control socket here"):
            await second.run()
        assert (await anyio.to_thread.run_sync(r.client.request, Request(v=1, op="status")))["pid"] == os.getpid()


async def test_a_dead_daemons_socket_is_replaced(fake_proc: FakeProc, sockdir: Path) -> None:
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(sockdir / "c.sock"))
    stale.close()  # bound, never listening: what a SIGKILLed daemon leaves
    async with running(fake_proc, sockdir / "c.sock") as r:
        assert r.client.available()
        assert (await anyio.to_thread.run_sync(r.client.request, Request(v=1, op="status")))["pid"] == os.getpid()


def test_the_client_says_when_no_daemon_runs(tmp_path: Path) -> None:
    with pytest.raises(ControlError, match="no control socket \\(is oomkit serve running\\?\\)"):
        Client(tmp_path / "none.sock").request(Request(v=1, op="status"))


async def test_metrics_counters_move_after_a_real_decision(fake_proc: FakeProc, fake_cgroups: FakeCgroups) -> None:
    import urllib.request

    fake_proc.add_process(4000, "hog", rss=300 << 20)
    source = FakeSource("test")
    async with Engine(config_for(fake_proc, fake_cgroups), sources=[source], dry_run=True) as engine:
        exporter = Exporter(MetricsConfig(listen="127.0.0.1:0"), engine)
        async with anyio.create_task_group() as tg:
            await tg.start(exporter.run)
            assert exporter.address is not None
            url = f"http://127.0.0.1:{exporter.address[1]}/metrics"

            def scrape() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
                with urllib.request.urlopen(url, timeout=30) as answer:
                    text = answer.read().decode()
                return {(s.name, tuple(sorted(s.labels.items()))): s.value
                        for f in text_string_to_metric_families(text) for s in f.samples}

            before = await anyio.to_thread.run_sync(scrape)
            assert ("oomkit_decisions_total", (("outcome", "dry-run"),)) not in before
            await source.inject(source.event("oom"))
            with anyio.fail_after(30):
                while engine.stats.decisions < 1:
                    await anyio.sleep(0.01)
            after: dict[Any, float] = {}
            for _ in range(3000):
                after = await anyio.to_thread.run_sync(scrape)
                if after.get(("oomkit_decision_seconds_count", ())) == 1:
                    break
                await anyio.sleep(0.01)
            assert after[("oomkit_events_total", (("kind", "oom"), ("source", "test")))] == 1
            assert after[("oomkit_decisions_total", (("outcome", "dry-run"),))] == 1
            assert after[("oomkit_decision_stage_seconds_count", (("stage", "candidates"),))] == 1
            assert after[("oomkit_decision_seconds_count", ())] == 1
            tg.cancel_scope.cancel()


def test_request_structs_encode_as_the_protocol_documents() -> None:
    assert msgspec.json.decode(msgspec.json.encode(Request(v=1, op="rank", scope=Scope("v1", "/a")))) == {
        "v": 1, "op": "rank", "limit": 20, "replay": False, "max_ranking": 10, "scope": {"tree": "v1", "path": "/a"},
        "pids": [], "points": 32,
    }
    assert sys.version_info >= (3, 11)
