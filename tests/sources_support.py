"""Running one source in a test: start it, collect what it emits, stop it.

Shared by the unit tests (fake trees) and the integration tests (real cgroups) of the
event-driven sources.
"""

from __future__ import annotations

import math
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream

from oomkit.events import Event
from oomkit.sources.base import Source


class Running:
    """A source running in a task group; :meth:`next` waits for its next event."""

    def __init__(self, source: Source, recv: MemoryObjectReceiveStream[Event]) -> None:
        self.source = source
        self._recv = recv

    async def next(self, timeout: float = 5.0) -> Event:
        with anyio.fail_after(timeout):
            return await self._recv.receive()

    async def until(self, kind: str, timeout: float = 5.0) -> Event:
        """The next event of ``kind``, skipping others."""
        with anyio.fail_after(timeout):
            while True:
                ev = await self._recv.receive()
                if ev.kind == kind:
                    return ev

    async def quiet(self, seconds: float) -> list[Event]:
        """Everything emitted within ``seconds`` (the test expects little or nothing)."""
        out: list[Event] = []
        with anyio.move_on_after(seconds):
            while True:
                out.append(await self._recv.receive())
        return out

    def pending(self) -> list[Event]:
        out: list[Event] = []
        while True:
            try:
                out.append(self._recv.receive_nowait())
            except anyio.WouldBlock:
                return out


@asynccontextmanager
async def running(source: Source) -> AsyncIterator[Running]:
    send, recv = anyio.create_memory_object_stream[Event](math.inf)

    async def emit(event: Event) -> None:
        await send.send(event)

    async with anyio.create_task_group() as tg:
        await tg.start(source.run, emit)
        try:
            yield Running(source, recv)
        finally:
            tg.cancel_scope.cancel()
    send.close()
    recv.close()


class Collected:
    """Everything a source emitted, in order, for tests that look at the whole list."""

    def __init__(self) -> None:
        self.events: list[Event] = []

    async def emit(self, event: Event) -> None:
        self.events.append(event)

    def kinds(self, kind: str) -> list[Event]:
        return [e for e in self.events if e.kind == kind]


@asynccontextmanager
async def collecting(source: Source) -> AsyncIterator[Collected]:
    """``source`` running in a task group, its events collected; cancelled at the end."""
    got = Collected()
    async with anyio.create_task_group() as tg:
        await tg.start(source.run, got.emit)
        yield got
        tg.cancel_scope.cancel()


async def until(pred: Callable[[], bool], timeout: float = 30.0) -> None:
    """Wait until ``pred()`` holds (a TimeoutError after ``timeout``: generous, for busy machines)."""
    with anyio.fail_after(timeout):
        while not pred():
            await anyio.sleep(0.005)


async def eventually(check: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    """Wait until ``check()`` holds, polling while the source runs; fail naming ``what``.

    For state a source reaches in its own time (a scope watched or dropped): the suite runs
    on busy machines, so the deadline is generous and nothing waits a fixed time instead.
    """
    with anyio.move_on_after(timeout):
        while not check():
            await anyio.sleep(0.01)
        return
    raise AssertionError(f"not within {timeout:g} s: {what}")


def cpu_ns(pid: int | str = "self") -> int:
    """CPU time of every thread of ``pid`` so far, in ns (first field of each thread's
    ``schedstat``; the process-level file counts the main thread only)."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        except (FileNotFoundError, ProcessLookupError):
            pass  # a thread that ended meanwhile
    return total


def fire(efd: int, n: int = 1) -> None:
    """Signal an eventfd as the kernel would."""
    os.eventfd_write(efd, n)
