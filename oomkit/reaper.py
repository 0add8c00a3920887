"""Big rankings are freed off the event loop, a slice at a time.

A system-scope decision over 10 000 processes leaves about 100 000 objects behind (each
candidate, its ranking entry, its scores, its vetoes).  CPython frees them where the last
reference goes, all at once and with the GIL held: 30-40 ms here on a loaded machine.  Left to
itself that is the event loop, when the decision record is trimmed to ``[engine]
record_ranking``, or a hook worker picking up its next job, which may be a takeover's; either
way a paused memcg waits for it (``python -m bench loop_stall`` found its worst cases there).
So the engine hands the whole ranking to a :class:`Reaper`: one daemon thread that frees it in
slices, each short enough for the GIL to change hands between them.  It parks between slices
while a takeover's decision is in flight (:mod:`oomkit.urgency`): it would take the GIL at
each of the decision's system calls.  Its park budget is the same per spell as every other
thread's (``[engine] urgent_park_s``), so in a storm of takeovers it falls behind by at most
that much per spell; what it holds meanwhile is memory (``tests/integration/test_storm.py``
bounds it).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable
from typing import final

from . import urgency

__all__ = ["Reaper"]

SLICE = 256
"""Ranking entries freed in one go: well under a millisecond."""


@final
class Reaper:
    """Frees what it is given in its own thread (started on first use)."""

    __slots__ = ("_queue", "_thread", "_lock", "reaped")

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[Iterable[object] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.reaped = 0
        """Rankings (or other iterables) freed so far."""

    def __repr__(self) -> str:
        return f"<Reaper reaped={self.reaped}>"

    def drop(self, items: Iterable[object]) -> None:
        """Free ``items`` (and whatever only it holds) in the reaper's thread.  The caller
        must drop its own references right after, or they are the last ones."""
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="oomkit-reaper", daemon=True)
                self._thread.start()
        self._queue.put(items)

    def close(self) -> None:
        """Let the thread end once it has freed what it was given."""
        with self._lock:
            if self._thread is not None:
                self._queue.put(None)
                self._thread = None

    def _run(self) -> None:
        with urgency.parkable():
            while True:
                items = self._queue.get()
                if items is None:
                    return
                rest = list(items)
                del items  # the sequence itself goes now; its members go a slice at a time
                while rest:
                    urgency.checkpoint()
                    del rest[-SLICE:]
                self.reaped += 1
