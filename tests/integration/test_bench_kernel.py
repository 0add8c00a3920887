"""The kernel benchmarks run end to end in a tiny size (memcg_oom: one OOM each for the kernel
and the floor; takeover_faults: one run per fault)."""

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


def test_takeover_faults_runs_tiny(capsys: pytest.CaptureFixture[str]) -> None:
    from bench import takeover_faults

    reason = takeover_faults.skip_reason()
    if reason:
        pytest.skip(reason)
    takeover_faults.main(["--runs", "1"])
    out = capsys.readouterr().out
    assert "Paused past the 1 s deadline" in out and "both SIGKILLed, then oomkit restore |    1 |" in out
    assert "Plugin faults: paused" in out and " kill-lies |" in out and "removed and made again |" in out
