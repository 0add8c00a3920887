"""Command lines, read off the hot path with a deadline and a bounded number of threads.

Reading ``/proc/PID/cmdline`` takes the target's mmap lock, which a process deep in reclaim
(or one stuck behind a writer of its own mm) can hold for as long as the shortage lasts, so a
decision must never wait on it for long, and one stuck read must neither hold up the reads
of every other process nor cost a thread per decision.

:class:`CmdlineReader` reads in daemon threads, caches each argv by pid and start time (a
reused pid is another process), and lets a caller wait for a batch at most a deadline.  A
read that has not returned after ``stall_s`` marks its pid as *stalled*: the worker stuck on
it is written off, and a fresh worker takes the rest of the queue.  At most ``max_workers``
threads exist at once (stuck ones included), so a machine full of stuck processes costs a
bounded number of threads; a stalled pid is not asked again until its read returns.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Iterable, Sequence
from typing import final

from .events import Candidate
from .procfs import read_cmdline

__all__ = ["CmdlineReader"]

Key = tuple[int, int]
"""``(pid, start_ticks)``."""


@final
class CmdlineReader:
    """Argument vectors of candidates, for plugins that match on them (``protect``,
    ``preference``); see the module docstring."""

    def __init__(self, proc: str = "/proc", *, max_workers: int = 4, stall_s: float = 0.1) -> None:
        self.proc = proc
        self.max_workers = max_workers
        self.stall_s = stall_s
        self._known: dict[Key, tuple[str, ...] | None] = {}
        self._queue: deque[Key] = deque()
        self._queued: set[Key] = set()
        self._reading: dict[int, tuple[Key, float]] = {}  # worker id -> (key, monotonic start)
        self._stalled: set[Key] = set()
        self._workers = 0
        self._next_worker = 0
        self._cond = threading.Condition()

    def get(self, candidates: Sequence[Candidate], timeout: float) -> dict[int, tuple[str, ...] | None]:
        """pid to argv (None: the process is gone) for the candidates read within ``timeout``
        seconds; those missing are still being read (or stalled) and left out."""
        keys = {c.pid: (c.pid, c.start_ticks) for c in candidates}
        deadline = time.monotonic() + timeout
        with self._cond:
            self._ask(k for k in keys.values() if k not in self._known)
            while True:
                if all(k in self._known or k in self._stalled for k in keys.values()):
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                # Wake to look for a read that has stalled meanwhile, and hand the rest of
                # the queue to a fresh worker.
                self._cond.wait(min(left, self.stall_s))
                self._ask(())
            found = {pid: self._known[k] for pid, k in keys.items() if k in self._known}
            if len(self._known) > 2 * len(keys) + 1024:
                live = set(keys.values())  # entries of exited processes are dead weight
                self._known = {k: v for k, v in self._known.items() if k in live}
        return found

    @property
    def threads(self) -> int:
        """Worker threads alive now, stuck ones included (at most ``max_workers``)."""
        with self._cond:
            return self._workers

    @property
    def stalled(self) -> list[int]:
        """Pids whose read has not returned after ``stall_s``."""
        with self._cond:
            return sorted(pid for pid, _ in self._stalled)

    def __repr__(self) -> str:
        return f"<CmdlineReader known={len(self._known)} queued={len(self._queue)} threads={self._workers}>"

    # --- workers (called with the condition held unless said otherwise) -----------------------

    def _ask(self, keys: Iterable[Key]) -> None:
        for key in keys:
            if key not in self._queued and key not in self._stalled:
                self._queued.add(key)
                self._queue.append(key)
        self._mark_stalls()
        if self._queue and self._workers - self._stuck() < 1 and self._workers < self.max_workers:
            self._workers += 1
            self._next_worker += 1
            threading.Thread(
                target=self._work, args=(self._next_worker,), name="oomkit-cmdline", daemon=True
            ).start()

    def _stuck(self) -> int:
        return sum(1 for key, _ in self._reading.values() if key in self._stalled)

    def _mark_stalls(self) -> None:
        now = time.monotonic()
        for key, since in self._reading.values():
            if now - since >= self.stall_s:
                self._stalled.add(key)

    def _work(self, me: int) -> None:
        # Runs unlocked while reading: a read stuck on a mmap lock holds this thread only.
        with self._cond:
            while self._queue:
                key = self._queue.popleft()
                self._reading[me] = (key, time.monotonic())
                self._cond.release()
                try:
                    argv = read_cmdline(self.proc, key[0])
                except OSError:
                    argv = None  # unreadable counts as gone: nothing to match on
                finally:
                    self._cond.acquire()
                del self._reading[me]
                self._queued.discard(key)
                self._stalled.discard(key)
                self._known[key] = argv
                self._cond.notify_all()
            self._workers -= 1
