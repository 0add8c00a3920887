"""The memcg OOM benchmark runs end to end in a tiny size: one OOM each for the kernel and the floor."""

from __future__ import annotations

import pytest

from bench import memcg_oom

pytestmark = pytest.mark.kernel


def test_memcg_oom_runs_tiny(capsys: pytest.CaptureFixture[str]) -> None:
    reason = memcg_oom.skip_reason()
    if reason:
        pytest.skip(reason)
    memcg_oom.main(["--runs", "1", "--limits", "32", "--handlers", "kernel", "floor (C)"])
    out = capsys.readouterr().out
    assert "limit→reaped" in out and "floor (C)" in out
