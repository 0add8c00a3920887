"""Fixtures shared by the whole suite.  The fake-tree fixtures and ``anyio_backend`` (asyncio,
uvloop, trio) come from oomkit.testing, the pytest plugin plugin authors get too."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from . import kernel


def pytest_sessionstart(session: pytest.Session) -> None:
    # A crashed earlier run may have left test cgroups behind, possibly paused at OOM.
    kernel.sweep_stale()


@pytest.fixture
def memcg() -> Iterator[Callable[..., kernel.Cgroup]]:
    """A factory for real v1 memcgs under our own; each is removed after the test, pass or fail.

    Skips, with the reason, where the machine does not allow making memcgs.
    """
    reason = kernel.v1_skip_reason()
    if reason:
        pytest.skip(reason)
    parent = kernel.v1_parent()
    assert parent is not None
    made: list[kernel.Cgroup] = []

    def make(limit: int | None = None, tag: str = "") -> kernel.Cgroup:
        root = kernel.find_mounts("/proc")[0]
        assert root is not None
        cg = kernel.make(parent, root, tag)
        made.append(cg)
        if limit is not None:
            cg.write("memory.limit_in_bytes", limit)
        return cg

    yield make
    for cg in reversed(made):
        cg.remove()


@pytest.fixture
def cgroup2() -> Iterator[Callable[..., kernel.Cgroup]]:
    """A factory for real v2 cgroups under our own; removed after the test, pass or fail."""
    reason = kernel.v2_skip_reason()
    if reason:
        pytest.skip(reason)
    parent = kernel.v2_parent()
    assert parent is not None
    made: list[kernel.Cgroup] = []

    def make(tag: str = "") -> kernel.Cgroup:
        root = kernel.find_mounts("/proc")[1]
        assert root is not None
        cg = kernel.make(parent, root, tag)
        made.append(cg)
        return cg

    yield make
    for cg in reversed(made):
        cg.remove()
