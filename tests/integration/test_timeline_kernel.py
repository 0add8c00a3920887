"""A real memcg OOM under ``oomkit serve --takeover`` leaves a log that ``oomkit plot`` draws:
memory samples of the memcg before the OOM (bounded in rate), the decision that killed the
leak, its stage times; the benchmark that draws docs/bench-oom-timeline.png runs end to end."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import oom_timeline, scenarios
from oomkit.cli import main
from oomkit.events import Decision
from oomkit.records import MemorySample, read_log

pytestmark = pytest.mark.kernel


def test_a_real_ooms_log_holds_samples_and_the_kill_and_is_drawn(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    reason = scenarios.skip_reason()
    if reason:
        pytest.skip(reason)
    log, png = tmp_path / "events.jsonl", tmp_path / "timeline.png"
    oom_timeline.main(["--plot", str(png), "--log", str(log)])
    out = capsys.readouterr().out
    assert "died first: leak" in out, out
    records = [rec for _, rec in read_log(log)]
    samples = [r for r in records if isinstance(r, MemorySample) and r.scope.tree == "v1"]
    kill = next(r for r in records if isinstance(r, Decision) and r.kill is not None and r.kill.sent_ns)
    assert kill.victim is not None and kill.victim.name == "leak" and kill.outcome == "killed"
    before = [s for s in samples if s.monotonic_ns < kill.event.monotonic_ns]
    assert len(before) >= 8, "the pre-roll was sampled"
    assert all(s.limit_bytes == scenarios.LIMIT_MIB << 20 and s.scope == kill.event.scope for s in samples)
    assert before[-1].usage_bytes > (scenarios.LIMIT_MIB << 20) * 3 // 4, "near the limit just before the OOM"
    assert any(p.name == "leak" for p in before[-1].top)
    gaps = [b.monotonic_ns - a.monotonic_ns for a, b in zip(samples, samples[1:])]
    assert min(gaps) >= 0.25e9 * 0.99, "at most one sample per sample_interval_s"
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert main(["plot", str(log), "-o", str(tmp_path / "again.svg")]) == 0
    said = capsys.readouterr().out
    assert f"{kill.event.scope}, {len(samples)} memory samples" in said, "the memcg's, chosen by its decisions"
