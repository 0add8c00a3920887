"""Readable: one fd registered with the loop for many waits; wake-ups never lost."""

from __future__ import annotations

import os

import anyio
import pytest
import sniffio

from oomkit.readiness import Readable

pytestmark = pytest.mark.anyio


class EventFd:
    """A non-blocking eventfd and a drain that counts what it took."""

    def __init__(self) -> None:
        self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.drains = 0

    def ring(self) -> None:
        os.eventfd_write(self.fd, 1)

    def drain(self) -> int:
        self.drains += 1
        try:
            return os.eventfd_read(self.fd)
        except BlockingIOError:
            return 0

    def close(self) -> None:
        os.close(self.fd)


@pytest.fixture
def efd() -> EventFd:
    e = EventFd()
    yield e  # type: ignore[misc]
    e.close()


async def test_a_ring_before_the_wait_is_not_lost(efd: EventFd) -> None:
    async with Readable(efd.fd, efd.drain) as r:
        efd.ring()
        await anyio.sleep(0.01)  # the loop's callback may take it before anyone waits
        assert await r.wait(30) is True
        await r.wait(0.01)  # trio drains at the wait after a wake-up
        assert r.drained == 1


async def test_a_ring_while_the_caller_handles_a_wake_up_is_not_lost(efd: EventFd) -> None:
    """The drain after a wake-up comes at the next wait: it takes the ring that woke the
    caller and any that came while the caller looked, so that wait returns at once."""
    async with Readable(efd.fd, efd.drain) as r:
        efd.ring()
        assert await r.wait(30) is True
        efd.ring()  # the caller has looked; this one is news
        with anyio.fail_after(5):
            assert await r.wait(60) is True
        assert r.drained == 2
        assert await r.wait(0.01) is False  # nothing owed, nothing rung


async def test_one_ring_wakes_once(efd: EventFd) -> None:
    """The drain after a wake-up that takes only the ring that woke the caller is no news."""
    async with Readable(efd.fd, efd.drain) as r:
        efd.ring()
        assert await r.wait(30) is True
        assert await r.wait(0.05) is False
        assert r.drained == 1


async def test_the_timeout_says_false_and_a_later_ring_true(efd: EventFd) -> None:
    async with Readable(efd.fd, efd.drain) as r:
        assert await r.wait(0.01) is False
        assert await r.wait(0.01) is False

        async def ring_soon() -> None:
            await anyio.sleep(0.05)
            efd.ring()

        async with anyio.create_task_group() as tg:
            tg.start_soon(ring_soon)
            assert await r.wait(30) is True


async def test_many_rings_many_waits_every_wake_seen(efd: EventFd) -> None:
    woke = 0
    async with Readable(efd.fd, efd.drain) as r:
        for _ in range(200):
            efd.ring()
            woke += await r.wait(30)
    assert woke == 200


async def test_a_ready_fd_nobody_waits_for_is_drained_once_not_spun_on(efd: EventFd) -> None:
    async with Readable(efd.fd, efd.drain) as r:
        efd.ring()
        for _ in range(50):
            await anyio.sleep(0)  # loop iterations with nobody waiting
        # asyncio drains in the loop's callback, once (the fd is then no longer readable, so
        # the callback does not run on every iteration); trio only when someone waits.
        assert efd.drains == (1 if sniffio.current_async_library() == "asyncio" else 0)
        assert await r.wait(30) is True
        await r.wait(0.01)  # trio drains at the wait after a wake-up
        assert r.drained == 1
        assert efd.drains <= 2


async def test_cancelling_a_wait_leaves_it_usable(efd: EventFd) -> None:
    async with Readable(efd.fd, efd.drain) as r:
        with anyio.move_on_after(0.01):
            await r.wait(60)
        efd.ring()
        assert await r.wait(30) is True


async def test_leaving_unregisters_so_the_fd_can_be_waited_on_again(efd: EventFd) -> None:
    async with Readable(efd.fd, efd.drain):
        pass
    efd.ring()
    with anyio.fail_after(30):
        await anyio.wait_readable(efd.fd)  # would be BusyResourceError/EEXIST if still registered
