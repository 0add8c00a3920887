"""``jsonl``: every decision as one JSON line, to a file or to standard output.

The file is opened in append mode for each line and closed again: decisions are rare, a
rotated log file is picked up without a signal, and no descriptor is held between writes.
Writes run in a worker thread, so a slow disk or a full pipe never blocks the event loop
(and, since notifiers run off the kill path, never delays a kill).  A failing write is
logged once per run of failures, counted in ``failures``, and the line is lost.
"""

from __future__ import annotations

import logging
import sys

import anyio

from oomkit import Config, ConfigError, Decision, hookimpl, to_json

from ._settings import Settings

__all__ = ["JsonLines", "JsonLinesSettings"]

log = logging.getLogger("oomkit.plugins.jsonl")

STDOUT = "-"


class JsonLinesSettings(Settings, frozen=True):
    """``[plugins.jsonl]``."""

    path: str = STDOUT
    """Where lines go: a file (appended to, created if missing) or ``-`` for stdout."""

    def __post_init__(self) -> None:
        if not self.path:
            raise ValueError("`path` cannot be empty; use '-' for standard output")


class JsonLines:
    """Writes each decision as a line of JSON."""

    name = "jsonl"

    def __init__(self) -> None:
        self.settings = JsonLinesSettings()
        self.failures = 0
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
        line = to_json(decision) + b"\n"
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

    def _write(self, line: bytes) -> None:
        if self.settings.path == STDOUT:
            out = sys.stdout.buffer
            out.write(line)
            out.flush()
            return
        with open(self.settings.path, "ab") as f:
            f.write(line)
