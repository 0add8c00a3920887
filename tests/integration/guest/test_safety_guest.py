"""The core's ``oom_score_adj == -1000`` protection against a real process, in the guest:
its root holds CAP_SYS_RESOURCE, which this host's root lacks, so only there can a test
lower a child's adj below 0 (tests/integration/test_safety_kernel.py skips it here)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.guest import Guest

from .support import CHECKOUT, START_S

pytestmark = pytest.mark.kernel


def test_a_real_child_with_adj_minus_1000_is_never_killed_even_when_a_plugin_lies(guest: Guest) -> None:
    script = Path(__file__).with_name("never_kill.py")
    out = guest.run([guest.interpreter, str(script)], cwd=str(CHECKOUT), timeout=3 * START_S).json_lines()
    honest, lied, alive = out
    assert honest["adj"] == -1000
    assert honest["outcome"] == "all-vetoed"
    assert any(plugin == "oomkit" and "oom_score_adj is -1000" in reason for plugin, reason in honest["vetoes"]), honest
    # Offered with adj 0, it passes the ranking; the re-read of /proc/PID/oom_score_adj
    # right before the kill refuses it.
    assert lied["outcome"] == "all-vetoed"
    assert any(plugin == "oomkit" and "re-verified in /proc" in reason and "-1000" in reason
               for plugin, reason in lied["vetoes"]), lied
    assert alive == {"alive": True}
