"""``pressure``: act on memory pressure only once it is high, lasting, and reclaim is running.

A pressure report is not an out-of-memory condition: a burst of page-cache refaults passes
by itself.  This gate answers ``oomkit_should_act`` for ``pressure`` and
``pressure-cleared`` events (``None`` for every other kind) and says yes only when, for the
event's scope:

* the configured PSI average (``metric``, ``some_avg10_pct`` by default) is at or above
  ``threshold_pct`` (for v1 ``memory.pressure_level`` events: the level is at least
  ``min_level``), as oomd's ``pressure_above`` and systemd-oomd's
  ``ManagedOOMMemoryPressureLimit`` compare;
* and it has stayed there for ``duration_s`` (systemd-oomd's
  ``ManagedOOMMemoryPressureDurationSec``; oomd's ``duration``).  Once above, the scope
  counts as above until the metric falls below ``clear_pct`` (hysteresis, so a value
  wobbling around the threshold does not restart the clock), a ``pressure-cleared`` event
  arrives, or no pressure event came for ``stale_s``;
* with ``rising``, the 10 s average is also at or above the 60 s one (oomd's
  ``pressure_rising_beyond``: pressure that is already falling resolves itself);
* with ``require_reclaim``, the kernel scanned pages for reclaim since the pressure began
  (systemd-oomd acts only if reclaim happened): the scope's own ``pgscan`` counter in a v2
  ``memory.stat`` where the memory controller provides one, else the sum of the
  ``pgscan*`` counters in ``/proc/vmstat`` (v1 ``memory.stat`` has no scan counters).

Times come from the events' monotonic clocks, so the gate judges the events, not the moment
the engine got round to them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import msgspec

from oomkit import Config, Event, Scope, hookimpl
from oomkit.cgroupfs import mounts_for, read_keyed
from oomkit.units import Duration, Interval

from ._settings import Settings

__all__ = ["Pressure", "PressureSettings"]

log = logging.getLogger("oomkit.plugins.pressure")

_LEVELS = {"low": 1, "medium": 2, "critical": 3}


class PressureSettings(Settings, frozen=True):
    """``[plugins.pressure]``."""

    metric: Literal[
        "some_avg10_pct", "full_avg10_pct", "some_avg60_pct", "full_avg60_pct"
    ] = "some_avg10_pct"
    """Which PSI average of a ``pressure`` event is compared."""
    threshold_pct: Annotated[float, msgspec.Meta(gt=0.0, le=100.0)] = 20.0
    """At or above this the scope is under pressure."""
    clear_pct: Annotated[float, msgspec.Meta(ge=0.0, le=100.0)] | None = None
    """Below this the scope stops counting as under pressure (at most ``threshold_pct``);
    default: 80 % of the threshold."""
    duration_s: Duration = 10.0
    """How long the pressure must last before the gate says yes."""
    min_level: Literal["low", "medium", "critical"] = "critical"
    """For v1 ``memory.pressure_level`` events, which carry a level instead of a percentage."""
    rising: bool = False
    """Also require the 10 s average to be at or above the 60 s one."""
    require_reclaim: bool = True
    """Also require the kernel to have scanned pages for reclaim since the pressure began."""
    stale_s: Interval = 10.0
    """No pressure event for this long resets the clock (the source went quiet)."""

    def __post_init__(self) -> None:
        if self.clear_pct is not None and self.clear_pct > self.threshold_pct:
            raise ValueError("`clear_pct` cannot be above `threshold_pct`")


@dataclass(slots=True)
class _State:
    since_ns: int
    last_ns: int
    pgscan: int | None


class Pressure:
    """The pressure gate described in the module docstring."""

    name = "pressure"
    loop_safe = True
    """An urgent decision may call its sync hooks on the event loop: it reads PSI files only."""

    def __init__(self) -> None:
        self.settings = PressureSettings()
        self._proc = "/proc"
        self._unified: Path | None = None
        self._above: dict[Scope, _State] = {}
        self._scan_fault_logged = False

    @hookimpl
    def oomkit_configure(self, config: Config) -> None:
        self.settings = config.plugin_settings(self.name, PressureSettings)
        self._proc = config.paths.proc
        self._unified = mounts_for(config.paths).unified

    # --- reclaim ------------------------------------------------------------------------------

    def pgscan(self, scope: Scope) -> int | None:
        """Pages scanned for reclaim so far, for ``scope`` where it has its own counter."""
        try:
            if scope.tree == "v2" and self._unified is not None:
                stat = self._unified / scope.path.lstrip("/") / "memory.stat"
                if stat.exists():
                    own = read_keyed(stat)
                    if "pgscan" in own:
                        return own["pgscan"]
            vmstat = read_keyed(f"{self._proc}/vmstat")
        except (OSError, ValueError) as exc:
            if not self._scan_fault_logged:
                self._scan_fault_logged = True
                log.warning("pressure: cannot read reclaim counters (%s); treating reclaim as unknown", exc)
            return None
        return sum(v for k, v in vmstat.items() if k.startswith("pgscan"))

    def _reclaimed(self, state: _State, scope: Scope) -> bool:
        if not self.settings.require_reclaim:
            return True
        now = self.pgscan(scope)
        if now is None or state.pgscan is None:
            return True  # unknown is not "no reclaim": fall back to the pressure alone
        return now > state.pgscan

    # --- the gate -----------------------------------------------------------------------------

    def _is_above(self, event: Event, was_above: bool) -> bool | None:
        s = self.settings
        values = event.values
        if s.metric in values:
            limit = s.threshold_pct
            if was_above:
                limit = s.clear_pct if s.clear_pct is not None else 0.8 * s.threshold_pct
            above = values[s.metric] >= limit
            if above and s.rising:
                line = s.metric.split("_", 1)[0]
                above = values.get(f"{line}_avg10_pct", 0.0) >= values.get(f"{line}_avg60_pct", 0.0)
            return above
        if "pressure_level" in values:
            return values["pressure_level"] >= _LEVELS[s.min_level]
        return None

    @hookimpl
    def oomkit_should_act(self, event: Event) -> bool | None:
        if event.kind == "pressure-cleared":
            self._above.pop(event.scope, None)
            return False
        if event.kind != "pressure":
            return None
        scope, now = event.scope, event.monotonic_ns
        state = self._above.get(scope)
        if state is not None and now - state.last_ns > self.settings.stale_s * 1e9:
            state = None
        above = self._is_above(event, state is not None)
        if above is None:
            return None
        if not above:
            self._above.pop(scope, None)
            return False
        if state is None:
            state = self._above[scope] = _State(since_ns=now, last_ns=now, pgscan=self.pgscan(scope))
        state.last_ns = now
        if now - state.since_ns < self.settings.duration_s * 1e9:
            return False
        return self._reclaimed(state, scope)

    def __repr__(self) -> str:
        return f"<Pressure scopes_above={len(self._above)} {self.settings}>"
