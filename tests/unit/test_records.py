"""The JSON-lines log's reader: decisions and memory samples in file order, other record
types skipped, a torn last line skipped, any other bad line an error naming file and line."""

from __future__ import annotations

from pathlib import Path

import pytest

from oomkit import Decision, Event, Scope, to_json
from oomkit.explain import read_decisions
from oomkit.records import LogError, MemorySample, read_log

DECISION = Decision(id=7, event=Event(source="t", kind="oom"), outcome="no-candidates")
SAMPLE = MemorySample(scope=Scope("v1", "/jobs"), monotonic_ns=5, wall_time=1.7e9, usage_bytes=10, limit_bytes=20)


def test_decisions_and_samples_come_back_in_file_order_and_unknown_types_are_skipped(tmp_path: Path) -> None:
    log = tmp_path / "events.jsonl"
    log.write_bytes(to_json(SAMPLE) + b"\n" + b'{"type":"from-the-future","x":1}\n\n' + to_json(DECISION) + b"\n")
    assert list(read_log(log)) == [(1, SAMPLE), (4, DECISION)]
    assert list(read_decisions(log)) == [DECISION]


def test_a_torn_last_line_is_skipped(tmp_path: Path) -> None:
    log = tmp_path / "events.jsonl"
    log.write_bytes(to_json(DECISION) + b"\n" + to_json(SAMPLE)[:20])
    assert list(read_log(log)) == [(1, DECISION)]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (b"not json\n", "line 2: not a JSON record: "),
        (b'{"type": "memory-sample", "scope": {"tree": "system"}}\n', "line 2: not a memory sample: Object missing required field `monotonic_ns`"),
        (b'{"type": "memory-sample", "scope": {"tree": "system"}, "monotonic_ns": 1, "wall_time": 1e300}\n',
         "line 2: not a memory sample: Expected `float` <= 100000000000.0 - at `$.wall_time`"),
        (b'{"id": "seven"}\n', "line 2: not a decision: Expected `int`, got `str` - at `$.id`"),
        (b'{"type": 3}\n', "line 2: not a JSON record: Expected `str`, got `int` - at `$.type`"),
    ],
)
def test_a_bad_line_is_named_by_file_and_line(tmp_path: Path, line: bytes, message: str) -> None:
    log = tmp_path / "events.jsonl"
    log.write_bytes(to_json(DECISION) + b"\n" + line + to_json(DECISION) + b"\n")
    with pytest.raises(LogError) as info:
        list(read_log(log))
    assert str(info.value).startswith(f"{log}, {message}")


def test_a_missing_log_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(LogError, match=r"^.*/missing.jsonl: No such file or directory$"):
        list(read_log(tmp_path / "missing.jsonl"))
