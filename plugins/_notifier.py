"""What the notifiers that reach outside the process share (``command``, ``webhook``,
``desktop``): which decisions they report, and the worker threads their work runs in.

Their hook only queues: the engine awaits each notifier in turn under
``engine.hook_timeout_s``, so a command that runs for 5 s, a webhook retrying a dead server
or a D-Bus call to a hung session would otherwise time out and hold up every notifier after
it.  Work goes to at most ``concurrency`` worker threads (threads, not tasks: the same code
runs on asyncio, uvloop and trio, and a blocking call never blocks the event loop); at most
``max_pending`` items wait or run, and the newest beyond that is dropped and counted.
Failures are logged once per run of failures and counted.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated

import msgspec

from oomkit import Decision, Outcome, to_json

from ._settings import Settings

__all__ = ["NotifierSettings", "Worker", "brief_json"]


class NotifierSettings(Settings, frozen=True):
    """Keys every outside notifier has."""

    outcomes: tuple[Outcome, ...] = ("killed", "failed", "observed")
    """Which decisions to report, by outcome (``observed``: the kernel's own kills)."""
    timeout_s: Annotated[float, msgspec.Meta(ge=0.01, le=600.0)] = 10.0
    """How long one notification may take (a command's run, one HTTP request, a D-Bus call)."""
    concurrency: Annotated[int, msgspec.Meta(ge=1, le=16)] = 1
    """Notifications of this plugin in flight at once (each in a worker thread)."""
    max_pending: Annotated[int, msgspec.Meta(ge=1, le=1024)] = 32
    """Notifications waiting or in flight; beyond that the newest is dropped and counted."""
    max_ranking: Annotated[int, msgspec.Meta(ge=0, le=1000)] = 10
    """How many ranked candidates the decision JSON keeps (the rest are cut: a system
    scope's ranking holds every process)."""


def brief_json(decision: Decision, max_ranking: int) -> bytes:
    """The decision as JSON, its ranking cut to the first ``max_ranking`` entries."""
    if len(decision.ranking) > max_ranking:
        decision = msgspec.structs.replace(decision, ranking=decision.ranking[:max_ranking])
    return to_json(decision)


class Worker:
    """A notifier's worker threads and its counters (read them; the plugin writes them)."""

    def __init__(self, name: str, log: logging.Logger) -> None:
        self.name = name
        self.log = log
        self.sent = 0
        """Notifications delivered."""
        self.failed = 0
        """Notifications that raised or timed out."""
        self.dropped = 0
        """Notifications not attempted because ``max_pending`` were already queued."""
        self._pending = 0
        self._limit = 1
        self._threads = 1
        self._lock = threading.Lock()
        self._executor: ThreadPoolExecutor | None = None
        self._failing = False
        self._dropping = False

    def configure(self, settings: NotifierSettings) -> None:
        self._limit = settings.max_pending
        self._threads = settings.concurrency

    @property
    def pending(self) -> int:
        return self._pending

    def __repr__(self) -> str:
        return (f"<Worker {self.name} sent={self.sent} failed={self.failed} dropped={self.dropped}"
                f" pending={self._pending}>")

    def submit(self, job: Callable[[], None]) -> bool:
        """Queue ``job`` (it raises to fail); False when it was dropped."""
        executor: ThreadPoolExecutor | None = None
        with self._lock:
            if self._pending >= self._limit:
                self.dropped += 1
                first_drop = not self._dropping
                self._dropping = True
            else:
                self._pending += 1
                self._dropping = first_drop = False
                if self._executor is None:
                    # Threads start on the first notification only: an idle daemon has none.
                    self._executor = ThreadPoolExecutor(self._threads, thread_name_prefix=f"oomkit-{self.name}")
                executor = self._executor
        if executor is None:
            if first_drop:
                self.log.warning("%s: %d notifications pending; dropping new ones (counted)", self.name, self._limit)
            return False
        executor.submit(self._run, job)
        return True

    def _run(self, job: Callable[[], None]) -> None:
        # Each outcome is logged before it is counted: whoever sees the count (a test, the
        # status) finds its log line written.
        try:
            job()
        except Exception as exc:
            with self._lock:
                first = not self._failing
                self._failing = True
            if first:
                self.log.error("%s: %s (further failures are counted, not logged)", self.name, exc)
            with self._lock:
                self.failed += 1
        else:
            with self._lock:
                recovered = self._failing
                self._failing = False
                failed = self.failed
            if recovered:
                self.log.warning("%s: notifications work again (%d failed so far)", self.name, failed)
            with self._lock:
                self.sent += 1
        finally:
            with self._lock:
                self._pending -= 1
