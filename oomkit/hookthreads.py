"""Sync hook implementations run in a bounded set of daemon threads, where a stuck one can be
abandoned.

A sync hook (``should_act``, ``candidates``, ``score``, ``tier``, ``veto``, ``group``) that
blocks on the event loop blocks everything: every other scope's decisions, the hand-back of
a paused memcg, SIGTERM.  So the engine runs each stretch of sync hooks of a decision (a
*job*: the candidates and the ranking, the group, a batch of ``should_act`` calls) in a worker
thread and waits for it on the loop.  The job says which implementation it is in
(:meth:`Job.enter`, :meth:`Job.leave`); one that has run longer than ``stall_s`` is *hung*:
the loop writes its worker off (it stays stuck, a daemon thread, counted in
:attr:`HookThreads.abandoned`), logs one line naming the plugin and the hook, and runs the
whole job again on another worker, where the hung implementation is skipped (it counts as
having failed) until its stuck call returns.  A job is pure work (it reads and ranks, it
kills nothing), so running its first part twice costs time only.

This is :class:`oomkit.cmdline.CmdlineReader`'s idea applied to plugins: at most
``max_threads`` threads exist at once, stuck ones included, and an implementation is never
called again while a call of it is stuck, so a hook that hangs every time costs one thread,
not one per decision, and one log line, not one per decision.  With every thread stuck a job
fails at once (:class:`HooksStuck`).

While a takeover's decision is in flight (:mod:`oomkit.urgency`), a job of any other decision
parks before its next implementation (:meth:`Job.enter`), and wherever its plugins call
:func:`oomkit.urgency.checkpoint`; the takeover's own jobs (``urgent``) never park.  A park
stops the clock of the implementation it happens in: it is the engine's doing, not a stall.
An urgent job that finds no free worker lets the parked ones go (they hold the workers it
waits for).  The loop takes a finished job's result out of it, so what a big ranking leaves
behind is not freed by its worker when it picks up its next job, perhaps a takeover's.

Why threads of our own rather than ``anyio.to_thread``: anyio's workers are not daemon
threads, so one stuck for good would keep the interpreter from exiting after SIGTERM.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Generic, TypeVar, final

import anyio
import sniffio

from . import urgency
from .errors import OomkitError

__all__ = ["Abandoned", "HookThreads", "HooksStuck", "Job"]

log = logging.getLogger("oomkit.hooks")

T = TypeVar("T")

Key = tuple[str, str]
"""``(plugin, hook)``."""


class HooksStuck(OomkitError):
    """No worker thread is free to run sync hooks: every one is stuck in a plugin (the
    message names them), or the engine is stopping."""


class Abandoned(BaseException):
    """Raised inside a worker when its job has been given up (its hook stalled, or the
    decision waiting for it was cancelled): unwinds the job without running more plugins.
    A BaseException, so that the caller's isolation of each plugin does not swallow it."""


def _waker() -> Callable[[Callable[[], object]], None]:
    """A thread-safe, non-blocking "run this on the current loop" for the running backend."""
    if sniffio.current_async_library() == "trio":
        import trio

        token = trio.lowlevel.current_trio_token()

        def soon_trio(fn: Callable[[], object]) -> None:
            try:
                token.run_sync_soon(fn)
            except trio.RunFinishedError:
                pass  # the loop has ended: nobody waits any more

        return soon_trio
    loop = asyncio.get_running_loop()

    def soon_asyncio(fn: Callable[[], object]) -> None:
        try:
            loop.call_soon_threadsafe(fn)
        except RuntimeError:
            pass  # the loop is closed

    return soon_asyncio


@final
class Job(Generic[T]):
    """One run of a stretch of sync hooks in a worker thread."""

    __slots__ = ("_fn", "_pool", "_done", "_wake", "urgent", "started", "finished", "current", "since_ns", "hung",
                 "gone", "parked_ns", "result", "error")

    def __init__(
        self, pool: HookThreads, fn: Callable[[Job[T]], T], wake: Callable[[Callable[[], object]], None],
        urgent: bool = False,
    ) -> None:
        self._fn = fn
        self.urgent = urgent
        self._pool = pool
        self._done = anyio.Event()
        self._wake = wake
        self.started = False
        self.finished = False
        self.current: Key | None = None
        self.since_ns = 0
        self.hung: Key | None = None  # set by the loop: this job's worker is written off, stuck here
        self.gone = False  # set by the loop: nobody waits for this job any more
        self.parked_ns = 0  # when it parked for an urgent decision (oomkit.urgency), while it does
        self.result: T | None = None
        self.error: BaseException | None = None

    def enter(self, plugin: str, hook: str) -> str | None:
        """Before an implementation is called (in the worker): None to go ahead, or why it
        is skipped (a call of it is stuck).  Raises :class:`Abandoned` if the job was given up.

        First, a job that is not urgent parks here while an urgent decision is in flight
        (:func:`oomkit.urgency.checkpoint`)."""
        urgency.checkpoint()
        pool = self._pool
        key = (plugin, hook)
        with pool._lock:
            if self.gone or self.hung is not None:
                raise Abandoned
            since = pool._hung.get(key)
            if since is not None:
                return f"skipped: a call of it made {(time.monotonic_ns() - since) / 1e9:.0f} s ago has not returned"
            self.current, self.since_ns = key, time.monotonic_ns()
        return None

    def leave(self) -> None:
        """After the implementation returned or raised (in the worker)."""
        pool = self._pool
        with pool._lock:
            key, self.current = self.current, None
            if self.hung is None:
                if self.gone:
                    raise Abandoned
                return
            # This worker was written off while in `key`, whose call has only now returned:
            # the worker is a live one again, and the implementation may be called again.
            pool._hung.pop(self.hung, None)
            pool._stuck -= 1
            took = (time.monotonic_ns() - self.since_ns) / 1e9
        log.warning("plugin %s, hook %s returned after %.1f s; calling it again from now on", key and key[0],
                    key and key[1], took)
        raise Abandoned

    def _park(self, begins: bool) -> None:
        # A park inside an implementation (it called urgency.checkpoint) is the engine's
        # doing: it does not count towards that call's stall.
        with self._pool._lock:
            now = time.monotonic_ns()
            if begins:
                self.parked_ns = now
                return
            if self.current is not None:
                self.since_ns += now - self.parked_ns
            self.parked_ns = 0

    def _run(self) -> None:
        # In the worker, outside the pool's lock.
        try:
            if self.urgent:
                self.result = self._fn(self)
            else:
                with urgency.parkable(self._park):
                    self.result = self._fn(self)
        except Abandoned:
            return
        except BaseException as exc:  # handed to the loop, which re-raises it in the decision
            self.error = exc
        with self._pool._lock:
            self.finished = True
            if self.gone:
                return
        self._wake(self._done.set)


@final
class HookThreads:
    """The engine's worker threads for sync hooks; see the module docstring."""

    def __init__(self, max_threads: int = 4, stall_s: float = 1.0) -> None:
        self.max_threads = max_threads
        self.stall_s = stall_s
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._jobs: deque[Job[object]] = deque()
        self._threads = 0
        self._idle = 0
        self._stuck = 0
        self._hung: dict[Key, int] = {}  # implementation -> monotonic ns its stuck call began
        self._running: set[Job[object]] = set()
        self._closed = False
        self._soon: Callable[[Callable[[], object]], None] | None = None
        self.abandoned = 0
        """Workers written off since the start (each was stuck in a hook past ``stall_s``)."""

    def __repr__(self) -> str:
        return f"<HookThreads threads={self._threads}/{self.max_threads} stuck={self._stuck} abandoned={self.abandoned}>"

    @property
    def threads(self) -> int:
        """Worker threads alive now, stuck ones included (at most ``max_threads``)."""
        with self._lock:
            return self._threads

    @property
    def stuck(self) -> list[tuple[str, str, float]]:
        """``(plugin, hook, seconds)`` for each implementation a worker is stuck in now."""
        now = time.monotonic_ns()
        with self._lock:
            return sorted((p, h, (now - since) / 1e9) for (p, h), since in self._hung.items())

    @property
    def busy(self) -> list[tuple[str, str, float]]:
        """``(plugin, hook, seconds)`` for every implementation a worker is in now, given up
        as stuck or not (what is left behind when the engine stops)."""
        now = time.monotonic_ns()
        with self._lock:
            calls = {job.current: job.since_ns for job in self._running if job.current is not None}
            calls.update(self._hung)
            return sorted((p, h, (now - since) / 1e9) for (p, h), since in calls.items())

    def close(self) -> None:
        """Let idle workers end (stuck ones end when their call returns)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    async def run(self, fn: Callable[[Job[T]], T], urgent: bool = False) -> T:
        """Run ``fn`` in a worker and return what it returns (or raise what it raised).

        ``fn`` calls :meth:`Job.enter` and :meth:`Job.leave` around each plugin call; when
        one stalls, ``fn`` is run again from the start on another worker.  Raises
        :class:`HooksStuck` when no worker can be had.  An ``urgent`` job (an urgent
        decision's, :mod:`oomkit.urgency`) never parks; the others park at checkpoints while
        one is in flight."""
        if self._soon is None:
            self._soon = _waker()
        while True:
            job: Job[T] = Job(self, fn, self._soon, urgent)
            self._submit(job)
            try:
                finished = await self._watch(job)
            except BaseException:
                with self._lock:
                    job.gone = True
                    if not job.started and job in self._jobs:
                        self._jobs.remove(job)  # type: ignore[arg-type]
                raise
            if finished:
                # Taken out of the job, which its worker keeps until its next one: what a big
                # ranking leaves behind must not be freed there, in an urgent job's time.
                result, error, job.result, job.error = job.result, job.error, None, None
                if error is not None:
                    raise error
                return result  # type: ignore[return-value]

    def _submit(self, job: Job[T]) -> None:
        with self._cond:
            if self._closed:
                raise HooksStuck("the engine is stopping")
            if self._idle <= len(self._jobs):
                if self._threads < self.max_threads:
                    self._spawn()
                elif self._threads - self._stuck <= 0:
                    raise HooksStuck(self._stuck_text())
                elif job.urgent:
                    # It waits for a worker to finish a job; one parked for it would never.
                    urgency.release_parked()
            self._jobs.append(job)  # type: ignore[arg-type]
            self._cond.notify()

    def _stuck_text(self) -> str:
        names = ", ".join(f"{p}.{h}" for p, h in sorted(self._hung)) or "none"
        return f"all {self._threads} hook threads are stuck in plugins ({names})"

    def _spawn(self) -> None:
        self._threads += 1
        threading.Thread(target=self._work, name="oomkit-hooks", daemon=True).start()

    async def _watch(self, job: Job[T]) -> bool:
        """Wait for ``job``: True once it finished, False when it was written off as hung."""
        stall_ns = int(self.stall_s * 1e9)
        while True:
            with self._lock:
                if job.finished:
                    return True
                now = time.monotonic_ns()
                current, since = job.current, job.since_ns
                if job.parked_ns:
                    since += now - job.parked_ns  # parked: its clock is stopped
                if current is not None and now - since >= stall_ns:
                    job.hung = current
                    self._hung[current] = since
                    self._stuck += 1
                    self.abandoned += 1
                    if self._jobs and self._idle <= len(self._jobs) and self._threads < self.max_threads:
                        self._spawn()  # a replacement for the queue's sake
                    hung_now = True
                    stalled: Key = current
                else:
                    hung_now = False
                    if not job.started and self._threads - self._stuck <= 0:
                        if self._threads >= self.max_threads:
                            self._jobs.remove(job)  # type: ignore[arg-type]
                            raise HooksStuck(self._stuck_text())
                        self._spawn()
                    wait_s = (since + stall_ns - now) / 1e9 if current is not None else self.stall_s
            if hung_now:
                log.error(
                    "plugin %s, hook %s has not returned after %.1f s: given up (its thread is left stuck, %d"
                    " written off so far); it is skipped until that call returns", stalled[0], stalled[1],
                    (now - since) / 1e9, self.abandoned,
                )
                return False
            with anyio.move_on_after(max(wait_s, 0.001)):
                await job._done.wait()

    def _work(self) -> None:
        with self._cond:
            while True:
                while not self._jobs:
                    if self._closed:
                        self._threads -= 1
                        return
                    self._idle += 1
                    self._cond.wait()
                    self._idle -= 1
                job = self._jobs.popleft()
                job.started = True
                self._running.add(job)
                self._cond.release()
                try:
                    job._run()
                finally:
                    self._cond.acquire()
                    self._running.discard(job)
