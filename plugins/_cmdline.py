"""Command lines read off the hot path: in a daemon thread, cached by pid and start time, and
waited for at most a deadline per decision.

Reading ``/proc/PID/cmdline`` takes the target's mmap lock, which a process deep in reclaim
can hold for as long as the shortage lasts: the decision must never wait on it for long.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

from oomkit import Candidate
from oomkit.procfs import read_cmdline

__all__ = ["CmdlineCache"]

_UNREAD = object()


class CmdlineCache:
    """``get(candidates, timeout)``: pid to argv (None: gone) for those read in time."""

    def __init__(self) -> None:
        self.proc = "/proc"
        self._known: dict[tuple[int, int], tuple[str, ...] | None] = {}
        self._lock = threading.Lock()

    def get(self, candidates: Sequence[Candidate], timeout: float) -> dict[int, tuple[str, ...] | None]:
        keys = {c.pid: (c.pid, c.start_ticks) for c in candidates}
        with self._lock:
            missing = [k for k in keys.values() if k not in self._known]
        if missing:
            done = threading.Event()
            threading.Thread(target=self._read, args=(missing, done), name="oomkit-cmdline", daemon=True).start()
            done.wait(timeout)
        with self._lock:
            found = {pid: self._known[k] for pid, k in keys.items() if k in self._known}
            if len(self._known) > 2 * len(keys) + 1024:
                live = set(keys.values())  # entries of exited processes are dead weight
                self._known = {k: v for k, v in self._known.items() if k in live}
        return found

    def _read(self, keys: list[tuple[int, int]], done: threading.Event) -> None:
        # A read stalled on a mmap lock holds up this thread only; late results fill the
        # cache for the next decision.
        for pid, start in keys:
            argv = read_cmdline(self.proc, pid)
            with self._lock:
                self._known[(pid, start)] = argv
        done.set()
