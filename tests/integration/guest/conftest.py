"""Fixtures for tests in the guest kernel (see :mod:`tests.guest`).

``guest`` is booted once per session, at the first test that asks for it; ``guest_cgroup``
makes fresh cgroups under the guest's root for one test and removes them after it, pass or
fail; ``fresh_guest`` boots a guest of its own for a test that may wreck it.  Every one
skips, with the reason, where QEMU, busybox or the kernel package cannot be had.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from tests.guest import Guest, GuestCgroup, Image, Unavailable, prepare


@pytest.fixture(scope="session")
def guest_image() -> Image:
    try:
        return prepare()
    except Unavailable as exc:
        pytest.skip(f"no guest kernel: {exc}")


@pytest.fixture(scope="session")
def guest(guest_image: Image) -> Iterator[Guest]:
    """One guest for the whole session (its state is shared: tests clean up after themselves)."""
    with Guest(guest_image) as g:
        yield g


@pytest.fixture
def fresh_guest(guest_image: Image) -> Iterator[Guest]:
    """A guest booted for this test alone (for tests that may crash or wreck it)."""
    with Guest(guest_image) as g:
        yield g


@pytest.fixture
def guest_cgroup(guest: Guest) -> Iterator[Callable[[str], GuestCgroup]]:
    """A factory of new cgroups under the guest's root, removed after the test."""
    made: list[GuestCgroup] = []

    def make(tag: str = "t") -> GuestCgroup:
        cg = GuestCgroup.make(guest, tag)
        made.append(cg)
        return cg

    yield make
    if guest.alive:
        for cg in reversed(made):
            cg.remove()
