"""Fixtures of the first-party plugin tests only."""

from __future__ import annotations

import pytest


@pytest.fixture(
    params=[
        pytest.param(("asyncio", {}), id="asyncio"),
        pytest.param(("asyncio", {"use_uvloop": True}), id="uvloop"),
        pytest.param(("trio", {}), id="trio"),
    ]
)
def anyio_backend(request: pytest.FixtureRequest) -> tuple[str, dict[str, object]]:
    """The plugins' async paths (pidfd waits, worker threads, sleeps) must work on all three."""
    return request.param  # type: ignore[no-any-return]
