"""``confirm``: act on a low-memory report only once it is confirmed (seed 002: the 2.4
kernel refused to kill unless allocation failures repeated within a window).

A single poll that finds memory low may be a blip: a page-cache burst the kernel is about to
reclaim, a short-lived allocation.  For the event kinds in ``kinds`` (``low-memory`` by
default: the ``meminfo`` source reports it on every poll while memory stays low), this gate
answers ``oomkit_should_act`` with *no* until, for the event's scope, the condition has been
reported at least ``repeats`` times within the last ``window_s`` *and* has lasted at least
``persist_s`` (from the first report of the run to this one).  Once confirmed it has no
opinion (``None``), so the engine's defaults and the other gates decide as before.  A report
that arrives more than ``window_s`` after the previous one starts the count again.

Never for ``oom`` events: a v1 memcg under takeover is paused until someone acts, so it is
never made to wait.  Pressure events have their own gate (``pressure``).  An edge-triggered
kind (``threshold``: one event per crossing) can be added to ``kinds``, where only the
repeats count (crossings within the window): its condition is not reported while it lasts.
The hold-off after a kill is the engine's (``[engine] cooldown_s``), not this gate's.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Annotated, Literal

import msgspec

from oomkit import Config, Event, Scope, hookimpl
from oomkit.units import Duration

from ._settings import Settings

__all__ = ["Confirm", "ConfirmSettings"]


class ConfirmSettings(Settings, frozen=True):
    """``[plugins.confirm]``."""

    kinds: tuple[Literal["low-memory", "threshold", "memory-events"], ...] = ("low-memory",)
    """The event kinds this gate holds back until confirmed."""
    repeats: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 2
    """Reports needed within ``window_s`` (1: the first report is enough, ``persist_s`` alone
    decides)."""
    persist_s: Duration = 0.0
    """How long the condition must have lasted, from the first counted report to this one."""
    window_s: Annotated[float, msgspec.Meta(ge=0.01, le=3600.0)] = 5.0
    """Reports further apart than this do not confirm each other."""


@dataclass(slots=True)
class _Streak:
    since_ns: int
    """The first report of an unbroken run (no gap longer than the window)."""
    times: deque[int]
    """The latest reports, at most ``repeats``."""


class Confirm:
    """The confirmation gate described in the module docstring."""

    name = "confirm"
    loop_safe = True
    """An urgent decision may call its sync hooks on the event loop: it only counts reports."""

    def __init__(self) -> None:
        self.settings = ConfirmSettings()
        self._seen: dict[Scope, _Streak] = {}

    @hookimpl
    def oomkit_configure(self, config: Config) -> None:
        self.settings = config.plugin_settings(self.name, ConfirmSettings)

    @hookimpl
    def oomkit_should_act(self, event: Event) -> bool | None:
        s = self.settings
        if event.kind not in s.kinds:
            return None
        if event.kind == "threshold" and event.values.get("direction", 1.0) < 0:
            self._seen.pop(event.scope, None)  # back below: the condition is gone
            return None
        now = event.monotonic_ns
        window = int(s.window_s * 1e9)
        streak = self._seen.get(event.scope)
        if streak is None or now - streak.times[-1] > window:
            streak = self._seen[event.scope] = _Streak(since_ns=now, times=deque(maxlen=s.repeats))
        streak.times.append(now)
        while now - streak.times[0] > window:
            streak.times.popleft()
        if len(streak.times) >= s.repeats and now - streak.since_ns >= s.persist_s * 1e9:
            return None  # confirmed: no objection
        return False

    def __repr__(self) -> str:
        return f"<Confirm scopes={len(self._seen)} {self.settings}>"
