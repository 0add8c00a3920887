"""``jsonl``: every decision as one JSON line, to a file or to standard output, and the
memory samples of warm scopes beside them.

Two kinds of line (:mod:`oomkit.records`, docs/operations.md): each decision as the engine
made it (no ``type`` key), and, with ``sample_interval_s`` set, while a scope is warm, at
most one memory sample per scope that often (``"type": "memory-sample"``): the history
sampler's reading of the scope's charge, limit and largest processes, what ``oomkit plot``
draws.  Samples are off by default (0), so a reader that expects decisions alone keeps
working, and while they are off the sampler builds none (:attr:`JsonLines.memory_samples`).
They cost no read of their own (the sampler made them) and about 400 bytes a line: a scope
warm all day at 1 s is ~35 MB a day.

The file is opened in append mode for each line and closed again: decisions are rare, a
rotated log file is picked up without a signal, and no descriptor is held between writes.
Writes run in worker threads, so a slow disk or a full pipe never blocks the event loop
(and, since notifiers run off the kill path, never delays a kill); one lock keeps lines
whole.  At most ``max_pending_samples`` samples wait for the disk; newer ones are dropped
and counted in ``samples_dropped``.  A failing write is logged once per run of failures,
counted in ``failures``, and the line is lost.

A decision's line is at most ``max_line_bytes``: a longer decision loses the tail of its
ranking (then its plugin errors and group) until it fits, and says so in ``ranked`` (how
many there were); one that cannot be made to fit is not written, and is counted in
``too_long``.
"""

from __future__ import annotations

import logging
import sys
import threading
from typing import Annotated

import anyio
import msgspec

from oomkit import Config, ConfigError, Decision, Scope, hookimpl, to_json
from oomkit.records import MemorySample

from ._notifier import NotifierSettings, Worker
from ._settings import Settings

__all__ = ["JsonLines", "JsonLinesSettings"]

log = logging.getLogger("oomkit.plugins.jsonl")

STDOUT = "-"
_SCOPES = 4096  # scopes whose last sample time is remembered; beyond that all are forgotten


class JsonLinesSettings(Settings, frozen=True):
    """``[plugins.jsonl]``."""

    path: str = STDOUT
    """Where lines go: a file (appended to, created if missing) or ``-`` for stdout."""
    max_line_bytes: Annotated[int, msgspec.Meta(ge=4096, le=16 << 20)] = 64 << 10
    """The longest line written; a longer decision keeps fewer of its ranked candidates."""
    sample_interval_s: Annotated[float, msgspec.Meta(ge=0.0, le=3600.0)] = 0.0
    """At most one memory sample per warm scope this often, for ``oomkit plot`` (0, the
    default: none; 1 is a good start).  Samples come from the history's ticks, so an interval
    under ``[history] interval_s`` gives one per tick."""
    sample_processes: Annotated[int, msgspec.Meta(ge=0, le=8)] = 5
    """The largest processes named in each sample."""
    max_pending_samples: Annotated[int, msgspec.Meta(ge=1, le=4096)] = 64
    """Samples waiting for the disk; beyond that new ones are dropped and counted."""

    def __post_init__(self) -> None:
        if not self.path:
            raise ValueError("`path` cannot be empty; use '-' for standard output")


class JsonLines:
    """Writes each decision, and the memory samples of warm scopes, as lines of JSON."""

    name = "jsonl"

    def __init__(self) -> None:
        self.settings = JsonLinesSettings()
        self.failures = 0
        self.too_long = 0
        self.samples = 0
        """Memory samples handed to the writer."""
        self._failing = False
        self._lock = threading.Lock()
        self._last: dict[Scope, int] = {}
        self._writer = Worker("jsonl samples", log)

    @property
    def memory_samples(self) -> bool:
        """Whether this plugin wants memory samples now (the engine asks before building any)."""
        return self.settings.sample_interval_s > 0

    @property
    def samples_dropped(self) -> int:
        """Memory samples not written because ``max_pending_samples`` were waiting."""
        return self._writer.dropped

    @hookimpl
    def oomkit_configure(self, config: Config) -> None:
        self.settings = config.plugin_settings(self.name, JsonLinesSettings)
        self._writer.configure(NotifierSettings(max_pending=self.settings.max_pending_samples))
        if self.settings.path != STDOUT:
            # Fail at start-up, not at the first decision, when the file cannot be written.
            try:
                with open(self.settings.path, "ab"):
                    pass
            except OSError as exc:
                raise ConfigError(
                    f"{config.origin}: cannot append to {self.settings.path}: {exc.strerror}"
                    f" - at `$.plugins.{self.name}.path`"
                ) from None

    @hookimpl
    async def oomkit_notify(self, decision: Decision) -> None:
        line = self.line(decision)
        if line is None:
            self.too_long += 1
            if self.too_long == 1:
                log.error("jsonl: decision %d does not fit in %d bytes even without its ranking; not written"
                          " (further ones are counted, not logged)", decision.id, self.settings.max_line_bytes)
            return
        try:
            await anyio.to_thread.run_sync(self._write, line)
        except OSError as exc:
            self.failures += 1
            if not self._failing:
                self._failing = True
                log.error("jsonl: cannot write to %s: %s (further failures are counted, not logged)",
                          self.settings.path, exc)
            return
        if self._failing:
            self._failing = False
            log.warning("jsonl: writing to %s works again after %d lost lines", self.settings.path, self.failures)

    def line(self, decision: Decision) -> bytes | None:
        """The decision's line (newline included), cut to ``max_line_bytes``, or None."""
        limit = self.settings.max_line_bytes
        line = to_json(decision) + b"\n"
        if len(line) <= limit:
            return line
        keep = len(decision.ranking)
        ranked = decision.ranked or keep
        while keep:
            keep //= 2
            line = to_json(msgspec.structs.replace(decision, ranking=decision.ranking[:keep], ranked=ranked)) + b"\n"
            if len(line) <= limit:
                return line
        bare = msgspec.structs.replace(decision, ranking=(), ranked=ranked, errors=(), group=(), group_kills=())
        line = to_json(bare) + b"\n"
        return line if len(line) <= limit else None

    @hookimpl
    def oomkit_memory_sample(self, sample: MemorySample) -> None:
        every_ns = int(self.settings.sample_interval_s * 1e9)
        if not every_ns or not sample.warm:
            return
        last = self._last.get(sample.scope)
        if last is not None and sample.monotonic_ns - last < every_ns:
            return
        if last is None and len(self._last) >= _SCOPES:
            self._last.clear()
        self._last[sample.scope] = sample.monotonic_ns
        if len(sample.top) > self.settings.sample_processes:
            sample = msgspec.structs.replace(sample, top=sample.top[: self.settings.sample_processes])
        line = to_json(sample) + b"\n"
        if self._writer.submit(lambda: self._write(line)):
            self.samples += 1

    def _write(self, line: bytes) -> None:
        with self._lock:  # a decision's line and a sample's, from two threads, never interleave
            if self.settings.path == STDOUT:
                out = sys.stdout.buffer
                out.write(line)
                out.flush()
                return
            with open(self.settings.path, "ab") as f:
                f.write(line)
