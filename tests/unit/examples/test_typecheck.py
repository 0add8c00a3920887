"""The examples are code to copy: they pass the same `mypy --strict` as oomkit itself."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]


@pytest.mark.parametrize(
    ("directory", "targets"),
    [
        ("examples/protect-file", ["oomkit_protect_file", "tests"]),
        ("examples/shedding-service", ["shedding_service.py"]),
    ],
)
def test_example_type_checks(directory: str, targets: list[str]) -> None:
    # mypy cannot follow an editable install's import hook: point it at the checkout.
    env = {**os.environ, "MYPYPATH": str(ROOT)}
    cache = ROOT / ".mypy_cache" / "examples"
    done = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--cache-dir", str(cache), *targets],
        cwd=ROOT / directory, env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
