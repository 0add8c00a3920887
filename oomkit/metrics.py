"""Prometheus metrics: the engine's snapshot as samples, over HTTP or as a node_exporter textfile.

Mechanism, not a plugin: what is exported is the engine's and the sources' own state
(events before any hook saw them, plugin failures, takeover and brake state, shared-page
losses), which no hook is shown, and no config should be able to hide it.  Which metrics
exist is fixed here; what to alert on is the operator's policy (docs/operations.md).

Nothing runs on the event path.  Counters and gauges are read from one
:meth:`Engine.snapshot() <oomkit.Engine.snapshot>` per scrape; the latency histograms are
fed from the engine's decision stream, after each decision has been made and published.
The exposition format comes from ``prometheus-client`` (``pip install oomkit[metrics]``).
The HTTP endpoint is a small responder on the engine's own event loop, not the library's
``start_http_server``: that one wakes its thread twice a second to poll for shutdown,
which would cost more than the whole idle daemon; this one costs nothing until scraped.
It answers ``GET /metrics`` and nothing else, one request per connection, at most
:data:`MAX_SCRAPERS` at a time.

Names follow Prometheus' conventions: the ``oomkit_`` prefix, ``_total`` on counters, base
units (seconds, bytes) in the name.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from collections.abc import AsyncIterator, Iterable, Iterator
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import anyio
from anyio.abc import SocketAttribute, SocketStream, TaskStatus

from .config import ConfigError
from .events import Decision
from .status import EngineStatus

if TYPE_CHECKING:
    from .config import MetricsConfig

__all__ = ["Exporter", "MetricsUnavailable", "STAGES", "samples"]

log = logging.getLogger("oomkit.metrics")

STAGES = ("queued", "candidates", "score", "veto", "recheck", "kill")
"""The decision stages whose latency is a histogram (``Decision.stage_ns``)."""

BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
"""Seconds: a memcg takeover decides in well under a millisecond, a graceful kill takes
seconds (bench/memcg_oom.py)."""

SCOPE_STATES = ("taken-over", "handed-back", "braked", "observed", "missing")
MAX_SCRAPERS = 4
MAX_REQUEST_BYTES = 8192
REQUEST_TIMEOUT_S = 5.0
DECISION_BUFFER = 256


class MetricsUnavailable(ConfigError):
    """``[metrics]`` is configured but prometheus-client is not installed."""


class Observed(Protocol):
    """What the exporter needs of an engine."""

    def snapshot(self) -> EngineStatus: ...

    def decisions(self, buffer: int) -> AbstractAsyncContextManager[AsyncIterator[Decision]]: ...


_UNSAFE = re.compile(r"[^a-zA-Z0-9_]")


def _metric_name(counter: str) -> str:
    return _UNSAFE.sub("_", counter).lower()


def samples(status: EngineStatus) -> Iterator[Any]:
    """The metric families of one snapshot (prometheus-client ``Metric`` objects)."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily

    yield InfoMetricFamily("oomkit", "oomkit's version", value={"version": status.version})
    yield GaugeMetricFamily("oomkit_start_time_seconds", "When the engine started (Unix time)", value=status.started)
    yield GaugeMetricFamily("oomkit_dry_run", "1 when no signal is sent (dry-run)", value=int(status.dry_run))
    yield GaugeMetricFamily("oomkit_stalled", "1 while the engine is not making progress (no watchdog keep-alive)",
                            value=int(bool(status.health)))
    yield GaugeMetricFamily("oomkit_config_generation", "Configurations run: 1, plus one per reload",
                            value=status.generation)
    yield CounterMetricFamily("oomkit_config_reload_failures", "Reloads refused (the old configuration kept running)",
                              value=status.reload_failures)
    yield GaugeMetricFamily("oomkit_events_queued", "Events waiting for the dispatcher", value=status.queued)
    yield GaugeMetricFamily("oomkit_events_queue_capacity", "Size of the event queue", value=status.queue_size)

    events = CounterMetricFamily("oomkit_events", "Events received, by source and kind", labels=["source", "kind"])
    for e in status.events:
        events.add_metric([e.source, e.kind], e.count)
    yield events
    c = status.counters
    for name, value, text in (
        ("oomkit_events_ignored", c.ignored, "Events no decision was made for"),
        ("oomkit_events_coalesced", c.coalesced, "Events replaced by a newer one for a busy scope"),
        ("oomkit_events_cooled", c.cooled, "Events dropped in a scope's cooldown after a kill"),
        ("oomkit_kills", c.kills, "Decisions that killed their victim"),
        ("oomkit_notify_dropped", c.notify_dropped, "Decisions that did not reach the notifiers (queue full)"),
        ("oomkit_source_failures", c.source_failures, "Sources that failed after they started"),
        ("oomkit_refused_at_recheck", c.refused_at_recheck,
         "Victims the core refused when it re-read them in /proc right before the kill"),
        ("oomkit_gone_at_recheck", c.gone_at_recheck,
         "Victims gone at that re-read while the condition held (the next candidate was the victim)"),
        ("oomkit_kills_unconfirmed", c.kills_unconfirmed,
         "Kills after which a process the killer said it signalled still ran [engine] kill_confirm_s later"),
        ("oomkit_events_held_off", c.held_off, "Events dropped in a scope's hold-off after a decision that killed nobody"),
        ("oomkit_hooks_abandoned", c.hooks_abandoned, "Sync hook calls given up as stuck (each left a thread behind)"),
        ("oomkit_hooks_stuck", c.hooks_stuck, "Decisions or event batches that found every hook thread stuck"),
        ("oomkit_urgent_on_loop", c.urgent_on_loop,
         "Stretches of a takeover decision's sync hooks run on the event loop, not in a hook thread"),
        ("oomkit_urgent_decisions", c.urgent_decisions, "Takeover decisions run as urgent (this process)"),
        ("oomkit_urgent_parks", c.urgent_parks, "Times a thread parked while an urgent decision ran"),
        ("oomkit_urgent_parked_seconds", c.urgent_parked_s, "Seconds threads spent parked for urgent decisions"),
        ("oomkit_urgent_realtime", c.urgent_realtime, "Times a thread was made real-time for a takeover's decision"),
        ("oomkit_urgent_realtime_refused", c.urgent_realtime_refused,
         "Times the kernel refused real-time scheduling for a takeover's decision"),
    ):
        yield CounterMetricFamily(name, text, value=value)
    outcomes = CounterMetricFamily("oomkit_decisions", "Decisions, by outcome", labels=["outcome"])
    for outcome, count in sorted(status.outcomes.items()):
        outcomes.add_metric([outcome], count)
    yield outcomes
    errors = CounterMetricFamily("oomkit_plugin_errors", "Plugin failures (raised, timed out, malformed result)",
                                 labels=["plugin", "hook"])
    for err in status.plugin_errors:
        errors.add_metric([err.plugin, err.hook], err.count)
    yield errors

    states = GaugeMetricFamily("oomkit_cgroup_state", "1 for the state each watched cgroup is in",
                               labels=["source", "tree", "cgroup", "state"])
    watchdogs = GaugeMetricFamily("oomkit_watchdog_up", "1 while a source's takeover watchdog runs", labels=["source"])
    per_source: dict[str, Any] = {}
    for src in status.sources:
        for sc in src.scopes:
            for state in SCOPE_STATES:
                states.add_metric([src.name, sc.scope.tree, sc.scope.path, state], int(sc.state == state))
        if src.watchdog is not None:
            watchdogs.add_metric([src.name], int(src.watchdog.alive))
        for counter, value in sorted(src.counters.items()):
            name = f"oomkit_source_{_metric_name(counter)}"
            if name not in per_source:
                per_source[name] = CounterMetricFamily(name, f"The {counter} counter of each source that has one",
                                                       labels=["source", "kind"])
            per_source[name].add_metric([src.name, src.kind], value)
    yield states
    yield watchdogs
    yield from per_source.values()


class Exporter:
    """Serves ``[metrics]`` for one engine; run :meth:`run` in the daemon's task group."""

    @staticmethod
    def check_available() -> None:
        """Raise :class:`MetricsUnavailable` (one line) when prometheus-client is missing."""
        try:
            import prometheus_client  # noqa: F401
        except ImportError:
            raise MetricsUnavailable(
                "[metrics] is configured but prometheus-client is not installed (pip install 'oomkit[metrics]')"
            ) from None

    def __init__(self, config: MetricsConfig, engine: Observed) -> None:
        self.check_available()
        from prometheus_client import CollectorRegistry, Histogram

        self.config = config
        self._engine = engine
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Snapshot(engine))
        self._stage = Histogram(
            "oomkit_decision_stage_seconds", "Time each decision stage took", ["stage"],
            registry=self.registry, buckets=BUCKETS,
        )
        self._total = Histogram(
            "oomkit_decision_seconds", "From the event to the end of its decision (queueing included)",
            registry=self.registry, buckets=BUCKETS,
        )
        self.scrapes = 0
        self.address: tuple[str, int] | None = None
        """Where the endpoint listens, once :meth:`run` has started (the port 0 resolves)."""

    def render(self) -> bytes:
        """The exposition text now (one snapshot)."""
        from prometheus_client import generate_latest

        return generate_latest(self.registry)

    def observe(self, decision: Decision) -> None:
        for stage in STAGES:
            ns = decision.stage_ns.get(stage)
            if ns is not None:
                self._stage.labels(stage).observe(ns / 1e9)
        self._total.observe(max(0, decision.monotonic_ns - decision.event.monotonic_ns) / 1e9)

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        async with self._engine.decisions(DECISION_BUFFER) as decisions, anyio.create_task_group() as tg:
            tg.start_soon(self._feed, decisions)
            if self.config.listen:
                await tg.start(self._serve)
            if self.config.textfile:
                await tg.start(self._write_textfile)
            task_status.started()

    async def _feed(self, decisions: AsyncIterator[Decision]) -> None:
        async for decision in decisions:
            self.observe(decision)

    # --- HTTP ------------------------------------------------------------------------------

    async def _serve(self, *, task_status: TaskStatus[None]) -> None:
        host, _, port = self.config.listen.rpartition(":")
        host = host.strip("[]")
        listener = await anyio.create_tcp_listener(local_host=host, local_port=int(port))
        sockname = listener.listeners[0].extra(SocketAttribute.local_address)
        self.address = (str(sockname[0]), int(sockname[1]))
        log.info("metrics on http://%s/metrics", self.config.listen if port != "0" else f"{host}:{self.address[1]}")
        limiter = anyio.Semaphore(MAX_SCRAPERS)
        task_status.started()

        async def handle(client: SocketStream) -> None:
            async with client:
                if limiter.value == 0:
                    await _respond(client, 503, b"too many scrapers\n")
                    return
                async with limiter:
                    await self._answer(client)

        async with listener:
            await listener.serve(handle)

    async def _answer(self, client: SocketStream) -> None:
        head = b""
        try:
            with anyio.fail_after(REQUEST_TIMEOUT_S):
                while b"\r\n\r\n" not in head and b"\n\n" not in head:
                    if len(head) > MAX_REQUEST_BYTES:
                        await _respond(client, 431, b"request too long\n")
                        return
                    head += await client.receive(4096)
        except (TimeoutError, anyio.EndOfStream, anyio.BrokenResourceError, OSError):
            return
        parts = head.split(b"\r\n", 1)[0].split(b"\n", 1)[0].split()
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/"):
            await _respond(client, 400, b"bad request\n")
            return
        method, target = parts[0], parts[1].split(b"?", 1)[0]
        if target != b"/metrics":
            await _respond(client, 404, b"only /metrics here\n")
            return
        if method not in (b"GET", b"HEAD"):
            await _respond(client, 405, b"GET /metrics\n")
            return
        self.scrapes += 1
        from prometheus_client import CONTENT_TYPE_LATEST

        body = self.render()
        await _respond(client, 200, b"" if method == b"HEAD" else body, CONTENT_TYPE_LATEST, len(body))

    # --- textfile ---------------------------------------------------------------------------

    async def _write_textfile(self, *, task_status: TaskStatus[None]) -> None:
        target = Path(self.config.textfile)
        await anyio.to_thread.run_sync(_write_atomically, target, self.render())
        log.info("metrics to %s every %g s", target, self.config.textfile_interval_s)
        task_status.started()
        while True:
            await anyio.sleep(self.config.textfile_interval_s)
            try:
                await anyio.to_thread.run_sync(_write_atomically, target, self.render())
            except OSError as exc:
                log.warning("metrics textfile %s: %s", target, exc)


class _Snapshot:
    """A prometheus-client collector: one engine snapshot per collection."""

    def __init__(self, engine: Observed) -> None:
        self._engine = engine

    def collect(self) -> Iterable[Any]:
        return list(samples(self._engine.snapshot()))


_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            431: "Request Header Fields Too Large", 503: "Service Unavailable"}


async def _respond(client: SocketStream, status: int, body: bytes, content_type: str = "text/plain",
                   length: int | None = None) -> None:
    head = (f"HTTP/1.1 {status} {_REASONS[status]}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body) if length is None else length}\r\nConnection: close\r\n\r\n")
    try:
        with anyio.fail_after(REQUEST_TIMEOUT_S):
            await client.send(head.encode() + body)
    except (TimeoutError, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
        pass


def _write_atomically(target: Path, data: bytes) -> None:
    """Write ``data`` beside ``target`` and rename it over, so node_exporter never reads half."""
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            os.fchmod(f.fileno(), 0o644)  # node_exporter runs as another user
        os.replace(tmp, target)
    except BaseException:
        os.unlink(tmp)
        raise
