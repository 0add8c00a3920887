"""The rate-limited log: one line per key per interval, and no count lost in between."""

from __future__ import annotations

import logging
import re

import pytest

from oomkit.ratelog import RateLog

S = 1_000_000_000


def counts(caplog: pytest.LogCaptureFixture) -> list[int]:
    return [int(m[1]) for r in caplog.records if (m := re.search(r"(\d+) record", r.getMessage()))]


def test_a_burst_is_reported_whole(caplog: pytest.LogCaptureFixture) -> None:
    log = RateLog(logging.getLogger("t"), 10.0)
    with caplog.at_level(logging.WARNING):
        for i in range(10):
            log.note("ring", "ring r: %d record(s) rejected", latest=f"record {i}", now_ns=i * 1000)
        assert counts(caplog) == [1]  # the first at once, the other nine held back
        assert log.pending() == 9 and log.due_in(now_ns=10_000) == pytest.approx(10.0, abs=0.01)
        log.flush(now_ns=5 * S)
        assert counts(caplog) == [1]  # not due yet
        log.flush(now_ns=11 * S)
    assert counts(caplog) == [1, 9]
    assert caplog.records[-1].getMessage().endswith("latest: record 9")
    assert log.pending() == 0 and log.due_in(now_ns=12 * S) is None


def test_counts_carry_into_the_next_line_and_keys_are_apart(caplog: pytest.LogCaptureFixture) -> None:
    log = RateLog(logging.getLogger("t"), 1.0)
    with caplog.at_level(logging.WARNING):
        log.note("a", "a: %d record(s)", 3, now_ns=0)
        log.note("b", "b: %d record(s)", 1, now_ns=1)
        log.note("a", "a: %d record(s)", 4, now_ns=2)
        log.note("a", "a: %d record(s)", 5, now_ns=2 * S)
        log.note("b", "b: %d record(s)", 2, now_ns=2 * S)
        log.flush(force=True, now_ns=2 * S)
    assert [r.getMessage().split(":")[0] for r in caplog.records] == ["a", "b", "a", "b"]
    assert counts(caplog) == [3, 1, 9, 2]
