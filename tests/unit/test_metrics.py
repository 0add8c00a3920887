"""The metrics exporter: samples named by Prometheus' conventions, parsed back with
prometheus-client's own parser, over the HTTP endpoint and the textfile.

These use a stand-in that hands the exporter snapshots and decisions; the exporter on a
real engine, whose counters move after a real decision, is in tests/unit/test_control.py
and tests/integration/test_operations_kernel.py."""

from __future__ import annotations

import os
import stat
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from prometheus_client.parser import text_string_to_metric_families

from oomkit import Decision, Event, Scope
from oomkit.config import MetricsConfig
from oomkit.metrics import Exporter
from oomkit.status import Counters, EngineStatus, EventCount, PluginErrorCount, ScopeStatus, SourceStatus, WatchdogStatus

pytestmark = pytest.mark.anyio

STATUS = EngineStatus(
    version="9.9", pid=1, started=1700000000.0, uptime_s=5.0, dry_run=False, config="/etc/o.toml", generation=2,
    reload_failures=1, last_reload_error="bad", queued=3, queue_size=1024, deciding=(), health="", feeds=0,
    plugins=("killer",),
    sources=(
        SourceStatus(name="takeover", kind="memcg-oom", mode="takeover",
                     scopes=(ScopeStatus(scope=Scope("v1", "/a"), state="taken-over"),
                             ScopeStatus(scope=Scope("v1", "/b"), state="handed-back")),
                     counters={"handbacks": 4}, watchdog=WatchdogStatus(pid=99, alive=True)),
        SourceStatus(name="ring", kind="shared-page", counters={"lost": 7, "rejected": 2, "refused_rings": 1}),
    ),
    counters=Counters(events=12, ignored=5, coalesced=2, cooled=1, decisions=4, kills=3, notify_dropped=0,
                      source_failures=0, plugin_errors=2),
    events=(EventCount("takeover", "oom", 10), EventCount("ring", "low-memory", 2)),
    outcomes={"killed": 3, "failed": 1},
    plugin_errors=(PluginErrorCount("badscore", "oomkit_score", 2),),
    recent=(),
)


class StandIn:
    def __init__(self) -> None:
        self.status = STATUS
        self.subscribed = anyio.Event()
        self.send: MemoryObjectSendStream[Decision] | None = None

    def snapshot(self) -> EngineStatus:
        return self.status

    @asynccontextmanager
    async def decisions(self, buffer: int) -> AsyncIterator[MemoryObjectReceiveStream[Decision]]:
        send, recv = anyio.create_memory_object_stream[Decision](buffer)
        self.send = send
        self.subscribed.set()
        async with send, recv:
            yield recv


def parse(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=30) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read().decode()


async def with_exporter(config: MetricsConfig, body: Callable[[Exporter, StandIn], Any]) -> None:
    engine = StandIn()
    exporter = Exporter(config, engine)
    async with anyio.create_task_group() as tg:
        await tg.start(exporter.run)
        await body(exporter, engine)
        tg.cancel_scope.cancel()


async def test_the_endpoint_serves_every_family_by_the_conventions() -> None:
    async def body(exporter: Exporter, engine: StandIn) -> None:
        assert exporter.address is not None
        status, text = await anyio.to_thread.run_sync(get, f"http://127.0.0.1:{exporter.address[1]}/metrics")
        assert status == 200
        m = parse(text)
        assert m[("oomkit_info", (("version", "9.9"),))] == 1
        assert m[("oomkit_events_total", (("kind", "oom"), ("source", "takeover")))] == 10
        assert m[("oomkit_decisions_total", (("outcome", "killed"),))] == 3
        assert m[("oomkit_kills_total", ())] == 3
        assert m[("oomkit_plugin_errors_total", (("hook", "oomkit_score"), ("plugin", "badscore")))] == 2
        assert m[("oomkit_events_ignored_total", ())] == 5
        assert m[("oomkit_config_reload_failures_total", ())] == 1
        assert m[("oomkit_refused_at_recheck_total", ())] == 0
        a = (("cgroup", "/a"), ("source", "takeover"), ("tree", "v1"))
        assert m[("oomkit_cgroup_state", tuple(sorted(a + (("state", "taken-over"),))))] == 1
        assert m[("oomkit_cgroup_state", tuple(sorted(a + (("state", "handed-back"),))))] == 0
        assert m[("oomkit_source_handbacks_total", (("kind", "memcg-oom"), ("source", "takeover")))] == 4
        assert m[("oomkit_source_lost_total", (("kind", "shared-page"), ("source", "ring")))] == 7
        assert m[("oomkit_source_refused_rings_total", (("kind", "shared-page"), ("source", "ring")))] == 1
        assert m[("oomkit_watchdog_up", (("source", "takeover"),))] == 1
        for (name, _), _value in m.items():
            assert name.startswith("oomkit_"), name

    await with_exporter(MetricsConfig(listen="127.0.0.1:0"), body)


async def test_histograms_move_with_each_decision_and_counters_with_each_snapshot() -> None:
    async def body(exporter: Exporter, engine: StandIn) -> None:
        assert exporter.address is not None and engine.send is not None
        url = f"http://127.0.0.1:{exporter.address[1]}/metrics"
        event = Event(source="takeover", kind="oom", scope=Scope("v1", "/a"), monotonic_ns=1_000_000)
        await engine.send.send(Decision(id=1, event=event, outcome="killed", monotonic_ns=3_000_000,
                                        stage_ns={"queued": 500_000, "candidates": 200_000, "kill": 1_000_000}))
        engine.status = STATUS.__class__(**{**{f: getattr(STATUS, f) for f in STATUS.__struct_fields__},
                                            "outcomes": {"killed": 4, "failed": 1}})
        m: dict[Any, float] = {}
        for _ in range(1000):  # the exporter reads the stream in a task of its own
            m = parse((await anyio.to_thread.run_sync(get, url))[1])
            if m.get(("oomkit_decision_seconds_count", ())) == 1:
                break
            await anyio.sleep(0.01)
        assert m[("oomkit_decision_seconds_count", ())] == 1
        assert m[("oomkit_decision_seconds_sum", ())] == pytest.approx(0.002)
        assert m[("oomkit_decision_stage_seconds_count", (("stage", "kill"),))] == 1
        assert m[("oomkit_decision_stage_seconds_bucket", (("le", "0.001"), ("stage", "kill")))] == 1
        assert m[("oomkit_decision_stage_seconds_bucket", (("le", "0.0005"), ("stage", "kill")))] == 0
        assert ("oomkit_decision_stage_seconds_count", (("stage", "veto"),)) not in m
        assert m[("oomkit_decisions_total", (("outcome", "killed"),))] == 4

    await with_exporter(MetricsConfig(listen="127.0.0.1:0"), body)


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GET /other HTTP/1.1\r\n\r\n", b"404"),
        (b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n", b"405"),
        (b"nonsense\r\n\r\n", b"400"),
        (b"GET /metrics HTTP/1.1\r\nX: " + b"y" * 20000 + b"\r\n\r\n", b"431"),
    ],
)
async def test_the_endpoint_answers_only_get_metrics(request_bytes: bytes, status: bytes) -> None:
    async def body(exporter: Exporter, engine: StandIn) -> None:
        assert exporter.address is not None
        async with await anyio.connect_tcp("127.0.0.1", exporter.address[1]) as client:
            await client.send(request_bytes)
            answer = b""
            with anyio.fail_after(30):
                try:
                    while True:
                        answer += await client.receive()
                except (anyio.EndOfStream, anyio.BrokenResourceError):
                    pass
        assert answer.split(b" ")[1] == status
        assert exporter.scrapes == 0

    await with_exporter(MetricsConfig(listen="127.0.0.1:0"), body)


async def test_the_textfile_is_written_whole_and_readable_by_node_exporter(tmp_path: Path) -> None:
    target = tmp_path / "oomkit.prom"

    async def body(exporter: Exporter, engine: StandIn) -> None:
        assert target.exists(), "written once before the exporter says it started"
        m = parse(target.read_text())
        assert m[("oomkit_kills_total", ())] == 3
        assert stat.S_IMODE(target.stat().st_mode) == 0o644
        assert sorted(os.listdir(tmp_path)) == ["oomkit.prom"], "no temporary file left beside it"

    old = os.umask(0o077)  # the systemd unit's UMask
    try:
        await with_exporter(MetricsConfig(textfile=str(target)), body)
    finally:
        os.umask(old)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"listen": "9465"}, "`listen` must be HOST:PORT, got '9465'"),
        ({"listen": "localhost:70000"}, "`listen` must be HOST:PORT"),
        ({"textfile": "/var/lib/x.txt"}, "`textfile` must end in .prom"),
        ({"textfile_interval_s": 0.5}, "Expected `float` >= 1.0 - at `$.metrics.textfile_interval_s`"),
    ],
)
def test_bad_metrics_settings_name_their_key(settings: dict[str, Any], message: str) -> None:
    from oomkit.config import ConfigError, config_from_dict

    with pytest.raises(ConfigError) as info:
        config_from_dict({"metrics": settings}, "/etc/o.toml")
    assert message in str(info.value)
