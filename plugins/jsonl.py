"""``jsonl``: every decision as one JSON line, to a file or to standard output.

The file is opened in append mode for each line and closed again: decisions are rare, a
rotated log file is picked up without a signal, and no descriptor is held between writes.
Writes run in a worker thread, so a slow disk or a full pipe never blocks the event loop
(and, since notifiers run off the kill path, never delays a kill).  A failing write is
logged once per run of failures, counted in ``failures``, and the line is lost.

A line is at most ``max_line_bytes``: a longer decision loses the tail of its ranking (then
its plugin errors and group) until it fits, and says so in ``ranked`` (how many there were);
one that cannot be made to fit is not written, and is counted in ``too_long``.
"""

from __future__ import annotations

import logging
import sys
from typing import Annotated

import anyio
import msgspec

from oomkit import Config, ConfigError, Decision, hookimpl, to_json

from ._settings import Settings

__all__ = ["JsonLines", "JsonLinesSettings"]

log = logging.getLogger("oomkit.plugins.jsonl")

STDOUT = "-"


class JsonLinesSettings(Settings, frozen=True):
    """``[plugins.jsonl]``."""

    path: str = STDOUT
    """Where lines go: a file (appended to, created if missing) or ``-`` for stdout."""
    max_line_bytes: Annotated[int, msgspec.Meta(ge=4096, le=16 << 20)] = 64 << 10
    """The longest line written; a longer decision keeps fewer of its ranked candidates."""

    def __post_init__(self) -> None:
        if not self.path:
            raise ValueError("`path` cannot be empty; use '-' for standard output")


class JsonLines:
    """Writes each decision as a line of JSON."""

    name = "jsonl"

    def __init__(self) -> None:
        self.settings = JsonLinesSettings()
        self.failures = 0
        self.too_long = 0
        self._failing = False

    @hookimpl
    def oomkit_configure(self, config: Config) -> None:
        self.settings = config.plugin_settings(self.name, JsonLinesSettings)
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

    def _write(self, line: bytes) -> None:
        if self.settings.path == STDOUT:
            out = sys.stdout.buffer
            out.write(line)
            out.flush()
            return
        with open(self.settings.path, "ab") as f:
            f.write(line)
