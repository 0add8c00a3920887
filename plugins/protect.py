"""``protect``: the processes an operator says must not be killed, each with a reason.

Configured: ``names`` (globs on the process name, ``comm``) and ``cmdline`` (regular
expressions searched in the argument vector joined by spaces).  Unconfigured, it protects
nobody.

The protections no operator may switch off (pid 1, kernel threads, oomkit itself and its
ancestors, oomkit's watchdog, ``oom_score_adj == -1000``) are not this plugin's: they are
the engine's own (:mod:`oomkit.safety`), shown as vetoes by ``oomkit``, and they hold with
``[plugins] disable = ["protect"]``.

Reading ``cmdline`` takes the target's mmap lock, which a process deep in reclaim (or one
stuck behind a writer of its own mm) can hold for as long as the memory shortage lasts, so
it is read only when ``cmdline`` patterns are configured, at most once per process (cached by
pid and start time), by :class:`oomkit.cmdline.CmdlineReader`'s bounded threads, which the
decision waits for at most ``cmdline_timeout_s`` (one stuck read holds up neither the others
nor a thread per decision).  A candidate whose cmdline did not arrive in time is *protected*,
with a reason that says so: a veto that cannot judge must not let a protected process die
(the hook's contract).  Prefer ``names`` globs: they cost nothing and never stall.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Sequence
from typing import Annotated

import msgspec

from oomkit import Candidate, Config, Event, hookimpl
from oomkit.cmdline import CmdlineReader
from oomkit.urgency import LOOP_WAIT_MAX_S

from ._settings import Settings

__all__ = ["Protect", "ProtectSettings"]


class ProtectSettings(Settings, frozen=True):
    """``[plugins.protect]``."""

    names: tuple[str, ...] = ()
    """Globs matched against the process name (``comm``, at most 15 characters)."""
    cmdline: tuple[str, ...] = ()
    """Regular expressions searched in the command line (arguments joined by spaces)."""
    cmdline_timeout_s: Annotated[float, msgspec.Meta(ge=0.001, le=60.0)] = 0.05
    """How long one decision waits for the command lines it has not read before."""

    def __post_init__(self) -> None:
        for i, pattern in enumerate(self.cmdline):
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"`cmdline[{i}]` is not a regular expression: {exc}") from None


class Protect:
    """Vetoes the processes that must survive any decision."""

    name = "protect"

    @property
    def loop_safe(self) -> bool:
        """An urgent decision may call the veto on the event loop while its only wait, for
        the cmdlines being read, is short."""
        return self.settings.cmdline_timeout_s <= LOOP_WAIT_MAX_S

    def __init__(self) -> None:
        self.settings = ProtectSettings()
        self._patterns: tuple[re.Pattern[str], ...] = ()
        self._cmdlines = CmdlineReader()

    @hookimpl
    def oomkit_configure(self, config: Config) -> None:
        self.settings = config.plugin_settings(self.name, ProtectSettings)
        self._cmdlines.proc = config.paths.proc
        self._patterns = tuple(re.compile(p) for p in self.settings.cmdline)

    @hookimpl
    def oomkit_veto(self, event: Event, candidates: Sequence[Candidate]) -> dict[int, str]:
        out: dict[int, str] = {}
        for c in candidates:
            for glob in self.settings.names:
                if fnmatch.fnmatchcase(c.name, glob):
                    out[c.pid] = f"name {c.name!r} matches protect.names {glob!r}"
                    break
        if self._patterns:
            # Kernel threads have no command line to match (and the core protects them).
            out.update(self._cmdline_vetoes([c for c in candidates if c.pid not in out and not c.kthread]))
        return out

    def _cmdline_vetoes(self, candidates: list[Candidate]) -> dict[int, str]:
        known = self._cmdlines.get(candidates, self.settings.cmdline_timeout_s)
        out: dict[int, str] = {}
        for c in candidates:
            if c.pid not in known:
                out[c.pid] = (
                    f"cmdline not readable within {self.settings.cmdline_timeout_s:g} s"
                    " (the process may hold its mmap lock); protected as protect.cmdline may match"
                )
                continue
            argv = known[c.pid]
            if argv is None:
                continue  # gone: nothing to protect
            joined = " ".join(argv)
            for pattern in self._patterns:
                if pattern.search(joined):
                    out[c.pid] = f"cmdline matches protect.cmdline {pattern.pattern!r}"
                    break
        return out
