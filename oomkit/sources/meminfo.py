"""The ``meminfo`` source: earlyoom's condition on ``/proc/meminfo``, made event-like.

Memory is low when MemAvailable is under its threshold *and* SwapFree is under its own; a
machine without swap counts as swap exhausted, so there the first test decides alone.  While
memory is low, every poll emits a ``low-memory`` event for the system scope (the engine
coalesces and cools them down); values are in bytes.  How often it polls is described on
:class:`~oomkit.config.MeminfoSourceConfig`.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

import anyio
from anyio.abc import TaskStatus

from ..config import MeminfoSourceConfig, PathsConfig
from ..events import Event
from ..procfs import read_meminfo
from ..units import Threshold, parse_size, parse_threshold
from .base import Emit, Source

__all__ = ["MeminfoError", "MeminfoSource", "Reading"]

log = logging.getLogger("oomkit.sources.meminfo")

_KEYS = ("MemTotal", "MemAvailable", "SwapTotal", "SwapFree")


class MeminfoError(RuntimeError):
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

    def __init__(self, spec: MeminfoSourceConfig, paths: PathsConfig) -> None:
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

    def still_holds(self, event: Event) -> bool:
        return self.read().low
