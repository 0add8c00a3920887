"""An epoll of our own, awaitable from any anyio backend.

One task and one await cover hundreds of fds (eventfds, trigger fds, an inotify fd), each
registered with a key.  Two ways to wait:

* ``threaded=False``: await the epoll fd's readability in the event loop.  Right for fds
  whose ``poll`` only *reports* readiness (eventfds, inotify).
* ``threaded=True``: block in ``epoll_wait`` in a worker thread.  Needed for PSI triggers:
  their ``poll`` *consumes* the event (``cmpxchg(&t->event, 1, 0)`` in ``psi_trigger_poll``),
  and when the loop's own epoll checks our epoll fd the kernel polls the ready trigger on
  the way (``__ep_eventpoll_poll``), so the event is gone before we read it.  Measured here
  with three triggers on one v2 cgroup: the nested wait reported two of three every time,
  the threaded one all three.
"""

from __future__ import annotations

import math
import os
import select
import threading
from typing import Generic, TypeVar, final

import anyio

__all__ = ["Poller"]

K = TypeVar("K")


@final
class Poller(Generic[K]):
    """fds registered with a key; :meth:`wait` returns ``(key, events)`` for those that fired."""

    __slots__ = ("_ep", "_keys", "_threaded", "_wake", "_lock", "_inflight", "_closing")

    def __init__(self, *, threaded: bool = False) -> None:
        self._ep = select.epoll()
        self._keys: dict[int, K] = {}
        self._threaded = threaded
        self._wake = -1
        self._lock = threading.Lock()
        self._inflight = False
        self._closing = False
        if threaded:
            # Written when a threaded wait is cancelled, so the worker returns at once.
            self._wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            self._ep.register(self._wake, select.EPOLLIN)

    def register(self, fd: int, events: int, key: K) -> None:
        self._ep.register(fd, events)
        self._keys[fd] = key

    def unregister(self, fd: int) -> None:
        """Stop watching ``fd``; call it before closing the fd (harmless if not registered)."""
        if self._keys.pop(fd, None) is not None:
            try:
                self._ep.unregister(fd)
            except (OSError, ValueError):
                pass

    def __contains__(self, fd: int) -> bool:
        return fd in self._keys

    def __len__(self) -> int:
        return len(self._keys)

    def _keyed(self, ready: list[tuple[int, int]]) -> list[tuple[K, int]]:
        return [(self._keys[fd], ev) for fd, ev in ready if fd in self._keys]

    async def wait(self, timeout: float | None = None) -> list[tuple[K, int]]:
        """Wait until a registered fd fires or ``timeout`` seconds pass (then: empty list)."""
        if self._threaded:
            return await self._wait_threaded(timeout)
        ready = self._ep.poll(0)
        if not ready:
            with anyio.move_on_after(math.inf if timeout is None else max(0.0, timeout)):
                await anyio.wait_readable(self._ep.fileno())
            ready = self._ep.poll(0)
        return self._keyed(ready)

    async def _wait_threaded(self, timeout: float | None) -> list[tuple[K, int]]:
        t = -1.0 if timeout is None else max(0.0, timeout)
        try:
            ready = await anyio.to_thread.run_sync(self._poll_in_worker, t, abandon_on_cancel=True)
        except BaseException:
            with self._lock:
                if self._inflight:
                    os.eventfd_write(self._wake, 1)  # let the abandoned worker go
            raise
        return self._keyed(ready)

    def _poll_in_worker(self, timeout: float) -> list[tuple[int, int]]:
        with self._lock:
            if self._closing:
                return []
            self._inflight = True
        try:
            ready = self._ep.poll(timeout)
            if any(fd == self._wake for fd, _ in ready):
                try:
                    os.eventfd_read(self._wake)
                except BlockingIOError:
                    pass
            return ready
        finally:
            with self._lock:
                self._inflight = False
                if self._closing:
                    self._release()

    def close(self) -> None:
        """Release the epoll; a worker still waiting in it is woken and releases it instead
        (closing the fds under it could leave it asleep forever, and its thread with it)."""
        with self._lock:
            self._keys.clear()
            self._closing = True
            if self._inflight:
                os.eventfd_write(self._wake, 1)
                return
        self._release()

    def _release(self) -> None:
        self._ep.close()
        if self._wake >= 0:
            os.close(self._wake)
            self._wake = -1

    def __repr__(self) -> str:
        mode = " threaded" if self._threaded else ""
        return f"<Poller fds={len(self._keys)}{mode}>"
