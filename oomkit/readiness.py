"""One fd watched for readability across many waits, registered with the event loop once.

``anyio.wait_readable`` registers its fd with the loop for one wait and removes it after
(two ``epoll_ctl`` calls, a future and, under a timeout, a cancel scope and a timer each
turn).  A source that wakes a hundred thousand times a second (the shared page's doorbell)
spent more on that than on reading its records: profiled on uvloop, the registration, the
cancel scope and the timer were a third of the reader's time per event.

:class:`Readable` registers the fd for as long as it is entered and *consumes* readiness in
the loop's own callback (its ``drain``), so a level-triggered fd does not fire again and
again while nobody waits (the source may be busy handing events on), and a wake-up that
comes in between is remembered, never lost: the next :meth:`Readable.wait` returns at once.
Its timeout is one timer re-armed lazily, not one per wait.

On uvloop and on trio a waiter is woken *before* the drain: the drain's system calls (two
for the shared page's doorbell) were a sixth of the time from a record to its event.  The
fd is drained at the start of the next :meth:`Readable.wait` instead (or in the callback,
should the loop see the fd again first).  That drain takes the one wake-up that was there
(nothing took it since) and whatever came later: if it took more than one, a wake-up may
have come after the caller last looked, so the wait returns at once (never a lost wake-up);
if it took just the one, the wait waits.  asyncio's own loop polls again before it runs
what its last turn scheduled, so it would call back on a readiness the drain has just taken
away (a wake-up for nothing, each time): there the callback drains before it wakes.

On trio there is no persistent registration to be had (``trio.lowlevel.wait_readable``
arms the fd for one wait, one ``epoll_ctl``); the wait goes to trio directly, under a
cancel scope of trio's own, which costs a fraction of anyio's.

:func:`calling_back` is the same registration with no waiter at all: the loop calls a
function whenever the fd is readable (the shared page's cache of producers' start times
learns of an exit that way, instead of asking each producer's pidfd at every record).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from types import TracebackType
from typing import Self, final

import sniffio

__all__ = ["Readable", "calling_back"]


@asynccontextmanager
async def calling_back(fd: int, callback: Callable[[], object]) -> AsyncIterator[bool]:
    """While entered, the loop calls ``callback`` whenever ``fd`` is readable; yields True.

    ``callback`` must take away what made the fd readable (a level-triggered fd left readable
    is called back on every turn of the loop) and must not block or raise.  On trio, which
    has no persistent registration, nothing is registered and it yields False: the caller
    looks for itself.
    """
    if sniffio.current_async_library() != "asyncio":
        yield False
        return
    loop = asyncio.get_running_loop()
    loop.add_reader(fd, callback)
    try:
        yield True
    finally:
        loop.remove_reader(fd)


@final
class Readable:
    """Waits for ``fd`` to be readable; ``drain`` consumes what made it so and returns how
    much it took (0: nothing there).  Use as ``async with Readable(fd, drain) as r``, then
    ``await r.wait(timeout)``: True for a wake-up, False when ``timeout`` passed first.

    ``drain`` must not block (read with ``MSG_DONTWAIT`` or from a non-blocking fd): it runs
    at the start of the wait after a wake-up, and inside the loop's callback on asyncio when
    the fd is readable while nobody waits.
    """

    __slots__ = ("_fd", "_drain", "_lib", "_loop", "_defer", "_waiter", "_woken", "_owed", "_deadline",
                 "_timer", "drained")

    def __init__(self, fd: int, drain: Callable[[], int]) -> None:
        self._fd = fd
        self._drain = drain
        self._lib = ""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._defer = True
        """Wake a waiter before draining (see the module doc)."""
        self._waiter: asyncio.Future[bool] | None = None
        self._woken = False
        self._owed = False
        """A waiter was woken and the fd not drained yet."""
        self._deadline = math.inf
        self._timer: asyncio.TimerHandle | None = None
        self.drained = 0
        """What ``drain`` has taken in all, for the caller's counters."""

    async def __aenter__(self) -> Self:
        self._lib = sniffio.current_async_library()
        if self._lib == "asyncio":
            self._loop = asyncio.get_running_loop()
            self._defer = not isinstance(self._loop, asyncio.BaseEventLoop)
            self._loop.add_reader(self._fd, self._ready)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._loop is not None:
            self._loop.remove_reader(self._fd)
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self._loop = None

    def _ready(self) -> None:
        waiter = self._waiter
        if self._defer and waiter is not None and not waiter.done() and not self._owed:
            self._owed = True  # the drain waits for the next wait(): the waiter goes first
            # Until the waiter has it: one cancelled before it ran must not lose the wake-up.
            self._woken = True
            waiter.set_result(True)
            return
        # Nobody waits (or the loop does not allow waiting with the drain): take it now, or a
        # level-triggered fd fires on every turn of the loop.
        # Of a drain still owed, one is the wake-up given already.
        given = 1 if self._owed else 0
        self._owed = False
        if self._take() > given:
            self._woken = True
            if waiter is not None and not waiter.done():
                waiter.set_result(True)

    def _take(self) -> int:
        n = self._drain()
        self.drained += n
        return n

    def _expire(self) -> None:
        self._timer = None
        waiter = self._waiter
        if waiter is None or waiter.done():
            return
        assert self._loop is not None
        now = self._loop.time()
        if now >= self._deadline:
            waiter.set_result(False)
        else:
            self._timer = self._loop.call_at(self._deadline, self._expire)

    async def wait(self, timeout: float) -> bool:
        """Until the fd was readable (True) or ``timeout`` seconds passed (False).

        A wake-up that came since the last wait returns at once, after one pass of the
        loop: the wait is always a checkpoint, so a busy fd cannot starve the other tasks.
        """
        loop = self._loop
        if loop is None:
            if self._lib == "trio":
                return await self._wait_trio(timeout)
            raise RuntimeError("Readable.wait() outside `async with`")
        # asyncio inline, not in a coroutine of its own: one frame less per wake-up.
        if self._owed:
            self._owed = False
            if self._take() > 1:
                self._woken = True
        if self._woken:
            self._woken = False
            await asyncio.sleep(0)
            return True
        self._deadline = loop.time() + timeout
        # One timer for many waits: it fires at the latest deadline it was armed for and,
        # when the wait it was for ended early, re-arms itself for the current one.
        if self._timer is None or self._timer.when() > self._deadline:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = loop.call_at(self._deadline, self._expire)
        waiter: asyncio.Future[bool] = loop.create_future()
        self._waiter = waiter
        try:
            woke = await waiter
        finally:
            self._waiter = None
        if woke:
            self._woken = False
        return woke

    async def _wait_trio(self, timeout: float) -> bool:
        import trio

        if self._owed:
            self._owed = False
            if self._take() > 1:
                await trio.lowlevel.checkpoint()
                return True
        with trio.move_on_after(timeout):
            await trio.lowlevel.wait_readable(self._fd)
            self._owed = True
            return True
        return False

    def __repr__(self) -> str:
        return f"<Readable fd={self._fd} {self._lib or 'not entered'} drained={self.drained}>"
