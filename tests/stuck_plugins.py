"""Plugins that never finish, for the daemon tests that a stuck plugin cannot hold
(tests/integration/test_stuck_plugins.py).  Loaded by ``[plugins] load``."""

from __future__ import annotations

import threading
from collections.abc import Sequence

import anyio

from oomkit import Candidate, Event, KillResult, hookimpl

_NEVER = threading.Event()  # nobody sets it: a call that waits on it never returns


class NeverVeto:
    """A sync veto that never returns (a plugin stuck in a blocking call for good)."""

    name = "never_veto"

    @hookimpl
    def oomkit_veto(self, event: Event, candidates: Sequence[Candidate]) -> dict[int, str]:
        _NEVER.wait()
        return {}


class ShieldedKiller:
    """An async killer that claims every victim and shields itself from cancellation forever."""

    name = "shielded_killer"

    @hookimpl(tryfirst=True)
    async def oomkit_kill(self, event: Event, victim: Candidate) -> KillResult:
        with anyio.CancelScope(shield=True):
            await anyio.sleep_forever()
        return KillResult(action="none", outcome="failed")
