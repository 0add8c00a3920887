"""The ``meminfo`` source: earlyoom's condition on ``/proc/meminfo``, made event-like.

Memory is low when MemAvailable is under its threshold *and* SwapFree is under its own; a
machine without swap counts as swap exhausted, so there the first test decides alone.  While
memory is low, every poll emits a ``low-memory`` event for the system scope (the engine
coalesces and cools them down); values are in bytes.  How often it polls is described on
:class:`MeminfoSourceConfig`.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Annotated

import anyio
import msgspec
from anyio.abc import TaskStatus

from ..config import Config
from ..errors import SourceError
from ..events import SYSTEM, Event, Scope
from ..procfs import read_meminfo
from ..units import MAX_SIZE, Interval, Size, Threshold, parse_size, parse_threshold
from .base import Emit, Source, SourceSettings

__all__ = ["MeminfoError", "MeminfoSource", "MeminfoSourceConfig", "Reading"]

log = logging.getLogger("oomkit.sources.meminfo")


class MeminfoSourceConfig(SourceSettings, frozen=True, tag="meminfo", kw_only=True):
    """Acts when MemAvailable and SwapFree are both low, as earlyoom does.

    A machine without swap counts as swap exhausted.  The poll interval adapts: after each
    reading the source sleeps for as long as the fastest plausible allocation would need to
    close the distance to the thresholds,
    ``(MemAvailable - mem threshold + SwapFree - swap threshold) / fill_rate_per_s``
    (distances below 0 count as 0), clamped to ``[interval_min_s, interval_max_s]``.  So it
    polls every ``interval_min_s`` near the thresholds (and while under them) and every
    ``interval_max_s`` far from them.
    """

    mem_available: str | Size = "10%"
    """Threshold on MemAvailable: a percentage of MemTotal or a size (``"512M"``, at most 1 PiB)."""
    swap_free: str | Size = "10%"
    """Threshold on SwapFree: a percentage of SwapTotal or a size."""
    interval_min_s: Interval = 0.01
    """The shortest wait between two readings (near or under the thresholds).  A reading
    costs 0.02 to 0.25 ms of CPU (warm to cold caches), so polling this often only while
    close to the threshold is cheap; at 1 GiB/s a poll every 10 ms lets at most about 10 MiB
    through before it sees the crossing (earlyoom and nohang wait at least 100 ms)."""
    interval_max_s: Interval = 3.0
    """The longest wait between two readings (far from the thresholds).  The fill-rate bound
    already wakes the source before the assumed worst case could close the distance; this
    cap (nohang's default too; earlyoom's is 1 s) only bounds the sleep on machines far
    from their thresholds, where each wake-up is pure idle cost."""
    fill_rate_per_s: str | Annotated[int, msgspec.Meta(ge=1, le=MAX_SIZE)] = "6G"
    """The worst-case allocation rate assumed, as a size per second (earlyoom assumes
    6 GiB/s; freshly touched memory on a VM is often far slower, recently freed memory
    faster)."""

    def __post_init__(self) -> None:
        parse_threshold(self.mem_available)
        parse_threshold(self.swap_free)
        if self.interval_min_s > self.interval_max_s:
            raise ValueError("`interval_min_s` cannot be longer than `interval_max_s`")
        if parse_size(self.fill_rate_per_s) <= 0:
            raise ValueError("`fill_rate_per_s` must be positive")


_KEYS = ("MemTotal", "MemAvailable", "SwapTotal", "SwapFree")


class MeminfoError(SourceError):
    """``/proc/meminfo`` cannot be read or lacks a line the source needs."""


@dataclass(frozen=True, slots=True)
class Reading:
    """One reading of meminfo against the thresholds, all in bytes."""

    mem_total: int
    mem_available: int
    mem_threshold: int
    swap_total: int
    swap_free: int
    swap_threshold: int

    @property
    def low(self) -> bool:
        swap_exhausted = self.swap_total == 0 or self.swap_free < self.swap_threshold
        return self.mem_available < self.mem_threshold and swap_exhausted

    @property
    def distance(self) -> int:
        """Bytes still to be allocated before memory is low (0 when it is)."""
        if self.low:
            return 0
        mem = max(0, self.mem_available - self.mem_threshold)
        swap = 0 if self.swap_total == 0 else max(0, self.swap_free - self.swap_threshold)
        return mem + swap

    def values(self) -> dict[str, float]:
        return {
            "mem_total_bytes": self.mem_total,
            "mem_available_bytes": self.mem_available,
            "mem_threshold_bytes": self.mem_threshold,
            "swap_total_bytes": self.swap_total,
            "swap_free_bytes": self.swap_free,
            "swap_threshold_bytes": self.swap_threshold,
        }


class MeminfoSource(Source):
    """Polls ``PROC/meminfo``; see the module docstring."""

    settings_type = MeminfoSourceConfig

    def __init__(self, spec: MeminfoSourceConfig, config: Config) -> None:
        paths = config.paths
        self.name = spec.source_name
        self.spec = spec
        self.path = f"{paths.proc}/meminfo"
        self._proc = paths.proc
        self._mem: Threshold = parse_threshold(spec.mem_available)
        self._swap: Threshold = parse_threshold(spec.swap_free)
        self._rate = parse_size(spec.fill_rate_per_s)
        self.read_failures = 0
        """Polls that could not read meminfo (the first of a run of them is logged)."""
        self._failing = False

    def read(self) -> Reading:
        """Read meminfo now.  Raises :class:`MeminfoError` naming the file."""
        try:
            info = read_meminfo(self._proc, _KEYS)
        except OSError as exc:
            raise MeminfoError(f"{self.path}: cannot read: {exc.strerror or exc}") from None
        except ValueError as exc:
            raise MeminfoError(f"{self.path}: unexpected content: {exc}") from None
        for key in ("MemTotal", "MemAvailable"):
            if key not in info:
                raise MeminfoError(f"{self.path}: no {key} line (MemAvailable needs Linux 3.14)")
        swap_total = info.get("SwapTotal", 0)
        return Reading(
            mem_total=info["MemTotal"],
            mem_available=info["MemAvailable"],
            mem_threshold=self._mem.bytes_of(info["MemTotal"]),
            swap_total=swap_total,
            swap_free=info.get("SwapFree", 0),
            swap_threshold=self._swap.bytes_of(swap_total),
        )

    def interval(self, reading: Reading) -> float:
        """Seconds until the next poll: the distance over the assumed fill rate, clamped."""
        return min(self.spec.interval_max_s, max(self.spec.interval_min_s, reading.distance / self._rate))

    async def run(self, emit: Emit, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        reading: Reading | None = self.read()  # unreadable at start: refuse to start, say why
        task_status.started()
        # Held while the source runs; released, it wakes the poller thread at once.  A bare
        # lock's timed acquire is one futex wait, the cheapest timed sleep that can be cut short.
        stop = threading.Lock()
        stop.acquire()
        try:
            while True:
                if reading is None or not reading.low:
                    # Polls until memory is low in a worker thread: a plain thread's timed wait
                    # costs the idle daemon about half of what a timer through the event loop
                    # does per wake-up (``python -m bench idle``), and the loop itself then
                    # sleeps without a timeout.
                    reading = await anyio.to_thread.run_sync(self._until_low, reading, stop, abandon_on_cancel=True)
                    continue
                await emit(Event(source=self.name, kind="low-memory", values=reading.values()))
                await anyio.sleep(self.interval(reading))
                reading = self._poll()
        finally:
            stop.release()  # ends an abandoned poller thread at once instead of after its sleep

    def _until_low(self, reading: Reading | None, stop: threading.Lock) -> Reading | None:
        """Poll until memory is low (that reading) or ``stop`` is released (the last reading)."""
        while not stop.acquire(timeout=self.spec.interval_max_s if reading is None else self.interval(reading)):
            reading = self._poll()
            if reading is not None and reading.low:
                return reading
        return reading

    def _poll(self) -> Reading | None:
        try:
            reading = self.read()
        except MeminfoError as exc:
            self.read_failures += 1
            if not self._failing:
                self._failing = True
                log.error("source %s: %s (retrying every %g s)", self.name, exc, self.spec.interval_max_s)
            return None
        if self._failing:
            self._failing = False
            log.warning("source %s: %s readable again", self.name, self.path)
        return reading

    def scopes(self) -> tuple[Scope, ...]:
        return (SYSTEM,)

    def still_holds(self, event: Event) -> bool:
        return self.read().low
