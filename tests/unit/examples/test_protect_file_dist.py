"""The example third-party plugin (examples/protect-file) as an operator meets it: installed
beside oomkit (``example_env``: on PYTHONPATH, never in the user's venv), listed by `oomkit
plugins`, changing `oomkit top`'s answer only when configured, and gone again when disabled
by name."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from oomkit.plugins import AUTOLOAD_ENV
from oomkit.testing import FakeProc

from .conftest import EXAMPLE

MiB = 1 << 20
ENV: dict[str, str] = {}


@pytest.fixture(autouse=True)
def _installed(example_env: dict[str, str]) -> None:
    ENV.clear()
    ENV.update(example_env)


def oomkit(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "oomkit", *args], capture_output=True, text=True, timeout=60, env=env or ENV
    )


def test_oomkit_plugins_lists_it_with_its_distribution() -> None:
    done = oomkit("plugins")
    assert done.returncode == 0, done.stderr
    row = next(ln for ln in done.stdout.splitlines() if ln.startswith("protect_file "))
    assert row.split()[1:4] == ["configure,", "score,", "veto"]
    assert row.endswith("entry point oomkit_protect_file:ProtectFile (oomkit-protect-file 1.0.0)")


def test_autoload_off_hides_it() -> None:
    done = oomkit("plugins", env={**ENV, AUTOLOAD_ENV: "1"})
    assert done.returncode == 0, done.stderr
    assert "protect_file" not in done.stdout


@pytest.fixture
def machine(fake_proc: FakeProc, tmp_path: Path) -> Path:
    """A fake /proc, and the [paths] table that points oomkit at it."""
    fake_proc.add_process(10, "postgres", rss=900 * MiB, start_ticks=100)
    fake_proc.add_process(11, "batch", rss=300 * MiB, start_ticks=5000)
    (tmp_path / "protected").write_text("postgres\n")
    return tmp_path


def top(directory: Path, fake_proc: FakeProc, toml: str) -> list[tuple[str, list[str]]]:
    cfg = directory / "oomkit.toml"
    cfg.write_text(f'sources = []\n{toml}\n[paths]\nproc = "{fake_proc.path}"\nmemory_v1 = "/none"\nunified = "/none"\n'
                   # never the default run_dir: a daemon running on this machine would answer `top`
                   f'run_dir = "{directory / "run"}"\n')
    done = oomkit("top", "--json", "-c", str(cfg))
    assert done.returncode == 0, done.stderr
    rows = [json.loads(ln) for ln in done.stdout.splitlines()]
    return [(r["candidate"]["name"], [v["plugin"] for v in r["vetoes"]]) for r in rows]


def test_configured_it_changes_the_decision_and_disabled_it_is_gone(machine: Path, fake_proc: FakeProc) -> None:
    default = top(machine, fake_proc, "")
    assert default == [("batch", []), ("postgres", [])]  # postgres is critical by default
    configured = top(machine, fake_proc, f'[plugins.protect_file]\npath = "{machine / "protected"}"')
    assert configured == [("batch", []), ("postgres", ["protect_file"])]
    assert top(machine, fake_proc, '[plugins]\ndisable = ["protect_file"]') == default


def test_its_own_test_suite_passes() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"], cwd=EXAMPLE, capture_output=True,
        text=True, timeout=120, env=ENV,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert " passed" in done.stdout.splitlines()[-1] and "skipped" not in done.stdout
