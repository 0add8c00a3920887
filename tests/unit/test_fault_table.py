"""docs/operations.md's fault table names tests that exist, and a row for every plugin fault
the suite injects."""

from __future__ import annotations

import re
from pathlib import Path

from tests import fault_plugins

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "operations.md"


def table() -> str:
    text = DOC.read_text()
    start = text.index("### The fault table")
    return text[start : text.index("\n### ", start + 1)]


def defined_tests() -> set[str]:
    names: set[str] = set()
    for path in (ROOT / "tests").rglob("test_*.py"):
        names.update(re.findall(r"(?m)^(?:async )?def (test_\w+)\(", path.read_text()))
    return names


def test_every_test_the_fault_table_names_exists() -> None:
    named = set(re.findall(r"\b(test_\w+)\b(?!\.py)", table()))
    assert named, "the table names no test"
    assert named <= defined_tests(), named - defined_tests()


def test_every_plugin_fault_of_the_suite_has_a_row() -> None:
    rows = set(re.findall(r"(?m)^\| `([\w-]+)` \|", table()))
    assert set(fault_plugins.CASES) <= rows, set(fault_plugins.CASES) - rows
