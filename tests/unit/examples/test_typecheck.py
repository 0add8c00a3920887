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
    cache = ROOT / ".mypy_cache" / "examples"
    done = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--cache-dir", str(cache), *targets],
        cwd=ROOT / directory, env=_without_mypypath(), capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def _without_mypypath() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "MYPYPATH"}


def test_a_package_outside_the_tree_finds_oomkit_through_the_install(tmp_path: Path) -> None:
    # What a plugin author's package sees: oomkit as installed (make setup: an editable
    # install mypy can follow), no MYPYPATH, nothing of this checkout on the path.
    pkg = tmp_path / "myplugin"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(
        "import oomkit\nfrom oomkit.testing import FakeProc\n\n\n"
        "def first(c: oomkit.Candidate, proc: FakeProc) -> int:\n    return c.pid + len(str(proc.path))\n"
    )
    done = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", "myplugin"],
        cwd=tmp_path, env=_without_mypypath(), capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
