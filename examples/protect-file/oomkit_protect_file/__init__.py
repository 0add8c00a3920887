"""Protect the processes listed in a file; prefer killing the youngest process.

Configured in oomkit's TOML file; with no ``[plugins.protect_file]`` table it changes nothing::

    [plugins.protect_file]
    path = "/etc/oomkit/protected"   # one process name (or glob) per line, '#' comments
    prefer_youngest = 300            # points for the youngest candidate, 0 for the oldest

The file is read again whenever it changes (one ``stat`` per decision otherwise), so an
operator edits it without restarting oomkit.  If it cannot be read during a decision the veto
raises, and oomkit then protects every candidate this plugin was asked about: a veto that
cannot judge must not let a protected process die.
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Sequence
from typing import Annotated

import msgspec

from oomkit import Candidate, Config, ConfigError, hookimpl

__all__ = ["ProtectFile", "Settings", "read_names"]


class Settings(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """``[plugins.protect_file]``; the defaults change no decision."""

    path: str = ""
    """The file of protected process names (``comm``, globs allowed); empty: protect nobody."""
    prefer_youngest: Annotated[float, msgspec.Meta(ge=0, le=1000)] = 0.0
    """Score, on oomkit's 0-1000 scale, for the most recently started candidate, falling
    linearly to 0 for the oldest one; 0 gives no score at all."""


def read_names(path: str) -> tuple[str, ...]:
    """The names in ``path``: one per line, blank lines and ``#`` comments skipped."""
    with open(path, encoding="utf-8") as f:
        lines = (line.split("#", 1)[0].strip() for line in f)
        return tuple(line for line in lines if line)


class ProtectFile:
    """The plugin: a veto from a file and a scorer by age."""

    name = "protect_file"

    def __init__(self) -> None:
        self.settings = Settings()
        self._names: tuple[str, ...] = ()
        self._stamp: tuple[int, int, int] | None = None

    @hookimpl
    def oomkit_configure(self, config: Config) -> None:
        self.settings = config.plugin_settings(self.name, Settings)
        if self.settings.path:
            try:
                self._reload()
            except OSError as exc:
                # Refuse to start rather than run without the protection the operator asked for.
                raise ConfigError(
                    f"{config.origin}: cannot read {self.settings.path}: {exc.strerror}"
                    f" - at `$.plugins.{self.name}.path`"
                ) from None

    def _reload(self) -> tuple[str, ...]:
        st = os.stat(self.settings.path)
        stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
        if stamp != self._stamp:
            self._names, self._stamp = read_names(self.settings.path), stamp
        return self._names

    @hookimpl
    def oomkit_veto(self, candidates: Sequence[Candidate]) -> dict[int, str] | None:
        if not self.settings.path:
            return None
        names = self._reload()  # raising here protects everyone: see the module docstring
        out: dict[int, str] = {}
        for c in candidates:
            for pattern in names:
                if fnmatch.fnmatchcase(c.name, pattern):
                    out[c.pid] = f"{c.name!r} is listed in {self.settings.path} as {pattern!r}"
                    break
        return out

    @hookimpl
    def oomkit_score(self, candidates: Sequence[Candidate]) -> list[float] | None:
        points = self.settings.prefer_youngest
        if not points or not candidates:
            return None
        oldest = min(c.start_ticks for c in candidates)
        span = max(c.start_ticks for c in candidates) - oldest
        if span == 0:
            return None  # all started together: age says nothing
        return [points * (c.start_ticks - oldest) / span for c in candidates]
