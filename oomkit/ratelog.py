"""Rate-limited log lines that lose no count.

A source that reads untrusted input logs what it rejects, but a producer writing garbage in
a loop must not flood the log.  :class:`RateLog` writes at most one line per key every
``interval_s``.  What happens in between is summed, not dropped: the next line for that key
says how many there were since the last one and what the latest was, and it is written as
soon as the interval has passed, by the next :meth:`note` or by :meth:`flush`, which the
source calls on its next wake-up (:meth:`due_in` says when that should be at the latest) and
when it stops.  So the last rejection of a burst is reported too, with the right count.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Hashable
from dataclasses import dataclass
from typing import final

__all__ = ["RateLog"]

_NEVER = 1 << 62


@dataclass(slots=True)
class _Pending:
    level: int
    what: str
    count: int = 0
    latest: str = ""
    last_ns: int = -(1 << 62)


@final
class RateLog:
    """One line per key per interval; counts in between are carried into the next line."""

    __slots__ = ("_log", "_interval_ns", "_keys", "_due_ns")

    def __init__(self, logger: logging.Logger, interval_s: float) -> None:
        self._log = logger
        self._interval_ns = int(interval_s * 1e9)
        self._keys: dict[Hashable, _Pending] = {}
        self._due_ns = _NEVER
        """No pending count is due before this: a flush before it looks at nothing (the
        shared-page source flushes at every wake-up)."""

    def note(self, key: Hashable, what: str, count: int = 1, latest: str = "", *, level: int = logging.WARNING,
             now_ns: int | None = None) -> None:
        """Count ``count`` occurrences of ``what`` (``"ring x: %d record(s) rejected"``: one
        ``%d`` for the count) under ``key``; log now if the key's interval has passed."""
        if count <= 0:
            return
        p = self._keys.get(key)
        if p is None:
            p = self._keys[key] = _Pending(level, what)
        p.level, p.what = level, what
        p.count += count
        p.latest = latest or p.latest
        now = time.monotonic_ns() if now_ns is None else now_ns
        if now - p.last_ns >= self._interval_ns:
            self._emit(p, now)
        else:
            self._due_ns = min(self._due_ns, p.last_ns + self._interval_ns)

    def _emit(self, p: _Pending, now: int) -> None:
        line = p.what % p.count
        if p.latest:
            line += f"; latest: {p.latest}"
        self._log.log(p.level, "%s", line)
        p.count = 0
        p.latest = ""
        p.last_ns = now

    def flush(self, *, force: bool = False, now_ns: int | None = None) -> None:
        """Write every pending count whose interval has passed (all of them with ``force``)."""
        now = time.monotonic_ns() if now_ns is None else now_ns
        if now < self._due_ns and not force:
            return
        due = _NEVER
        for p in self._keys.values():
            if p.count and (force or now - p.last_ns >= self._interval_ns):
                self._emit(p, now)
            elif p.count:
                due = min(due, p.last_ns + self._interval_ns)
        self._due_ns = due

    def due_in(self, now_ns: int | None = None) -> float | None:
        """Seconds until a pending count is due (0 if one is), or None when nothing is pending."""
        now = time.monotonic_ns() if now_ns is None else now_ns
        due = [p.last_ns + self._interval_ns - now for p in self._keys.values() if p.count]
        return max(0.0, min(due) / 1e9) if due else None

    def pending(self) -> int:
        """Occurrences counted but not yet written."""
        return sum(p.count for p in self._keys.values())
