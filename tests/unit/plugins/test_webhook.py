"""The webhook notifier against a local HTTP server the test runs: the decision POSTed as
JSON, retries on 5xx and timeouts bounded by `retries`, 4xx final."""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import anyio
import msgspec
import pytest

from oomkit import Candidate, ConfigError, Decision, Event, Ranked
from oomkit.config import config_from_dict
from oomkit_plugins.webhook import Webhook

pytestmark = pytest.mark.anyio

RANKING = tuple(Ranked(candidate=Candidate(pid=n, name=f"p{n}", start_ticks=1000), score=float(n), scores={}) for n in range(30))
KILLED = Decision(id=3, event=Event(source="meminfo", kind="low-memory"), victim=RANKING[0].candidate,
                  action="kill", outcome="killed", ranking=RANKING)


class Server:
    """Answers each POST with the next status in ``statuses`` (the last one repeats)."""

    def __init__(self) -> None:
        self.statuses = [200]
        self.delay = 0.0
        self.requests: list[tuple[dict[str, str], bytes]] = []
        self.release = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                server.requests.append((dict(self.headers), body))
                if server.delay:
                    server.release.wait(server.delay)
                n = len(server.requests) - 1
                status = server.statuses[min(n, len(server.statuses) - 1)]
                self.send_response(status)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


@pytest.fixture
def server() -> Iterator[Server]:
    s = Server()
    yield s
    s.close()


def webhook(**settings: Any) -> Webhook:
    cfg = config_from_dict({"sources": [], "plugins": {"webhook": settings}}, "/etc/oomkit/test.toml")
    plugin = Webhook()
    plugin.oomkit_configure(cfg)
    return plugin


async def wait_for(predicate: Callable[[], object], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await anyio.sleep(0.01)


async def test_the_decision_is_posted_as_json(server: Server) -> None:
    plugin = webhook(url=server.url, headers={"Authorization": "Bearer t0ken"}, max_ranking=2)
    await plugin.oomkit_notify(KILLED)
    await wait_for(lambda: plugin.worker.sent == 1, "the POST")
    ((headers, body),) = server.requests
    assert headers["Content-Type"] == "application/json" and headers["Authorization"] == "Bearer t0ken"
    assert headers["User-Agent"].startswith("oomkit/")
    got = msgspec.json.decode(body, type=Decision)
    assert got.id == 3 and got.victim == KILLED.victim and len(got.ranking) == 2


async def test_server_errors_are_retried_until_one_succeeds(server: Server) -> None:
    server.statuses = [503, 500, 200]
    plugin = webhook(url=server.url, retries=3, retry_backoff_s=0.01)
    await plugin.oomkit_notify(KILLED)
    await wait_for(lambda: plugin.worker.sent == 1, "the third attempt")
    assert len(server.requests) == 3 and plugin.worker.failed == 0


async def test_retries_are_bounded(server: Server) -> None:
    server.statuses = [500]
    plugin = webhook(url=server.url, retries=2, retry_backoff_s=0.01)
    await plugin.oomkit_notify(KILLED)
    await wait_for(lambda: plugin.worker.failed == 1, "the last attempt to fail")
    assert len(server.requests) == 3 and plugin.worker.sent == 0


async def test_a_client_error_is_not_retried(server: Server, caplog: pytest.LogCaptureFixture) -> None:
    server.statuses = [404]
    plugin = webhook(url=server.url, retries=5, retry_backoff_s=0.01)
    await plugin.oomkit_notify(KILLED)
    await wait_for(lambda: plugin.worker.failed == 1, "the failure")
    assert len(server.requests) == 1
    assert f"webhook: POST {server.url}: HTTP 404 Not Found" in caplog.text


async def test_a_failure_is_logged_before_it_is_counted(server: Server) -> None:
    # A handler slow to write widens the window a count made before the line would show in.
    server.statuses = [404]
    plugin = webhook(url=server.url, retries=0)
    lines: list[str] = []

    class Slow(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            time.sleep(0.2)
            lines.append(record.getMessage())

    slow = Slow()
    plugin.worker.log.addHandler(slow)
    try:
        await plugin.oomkit_notify(KILLED)
        await wait_for(lambda: plugin.worker.failed == 1, "the failure")
        assert any("HTTP 404" in line for line in lines)
    finally:
        plugin.worker.log.removeHandler(slow)


async def test_a_server_that_does_not_answer_times_out(server: Server) -> None:
    server.delay = 120.0  # released when the test ends
    plugin = webhook(url=server.url, timeout_s=0.2, retries=1, retry_backoff_s=0.01)
    await plugin.oomkit_notify(KILLED)
    await wait_for(lambda: plugin.worker.failed == 1, "two timed-out attempts")
    assert len(server.requests) == 2


async def test_nobody_listening_fails_after_the_retries() -> None:
    with socket.socket() as s:  # a port nobody listens on: bound, never listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        plugin = webhook(url=f"http://127.0.0.1:{port}/", retries=1, retry_backoff_s=0.01)
        await plugin.oomkit_notify(KILLED)
        await wait_for(lambda: plugin.worker.failed == 1, "the refused connections")


async def test_an_empty_url_or_another_outcome_posts_nothing(server: Server) -> None:
    off = webhook()
    await off.oomkit_notify(KILLED)
    picky = webhook(url=server.url, outcomes=["observed"])
    await picky.oomkit_notify(KILLED)
    assert off.worker.pending == picky.worker.pending == 0 and server.requests == []


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"url": "ftp://example.org/"}, "`url` must be an http:// or https:// URL, got 'ftp://example.org/'"),
        ({"url": "http://x/", "headers": {"X\r\nY": "1"}}, "`headers`: 'X\\r\\nY' is not a valid header"),
        ({"retries": 11}, "Expected `int` <= 10 - at `$.plugins.webhook.retries`"),
    ],
)
def test_bad_settings_name_their_key(settings: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        webhook(**settings)
    assert message in str(info.value)
