"""docs/writing-plugins.md cannot drift: every Python and TOML block in it is a file, and the
suite writes them all into one directory, runs the guide's own tests there (every async test
on asyncio, uvloop and trio, as oomkit's pytest plugin runs them), checks each configuration with
`oomkit check`, and resolves the published entry point."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from oomkit.plugins import AUTOLOAD_ENV

ROOT = Path(__file__).resolve().parents[2]
GUIDE = ROOT / "docs" / "writing-plugins.md"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```$", re.MULTILINE | re.DOTALL)
MARK = "# file: "


def blocks() -> list[tuple[int, str, str]]:
    """(line, language, body) of every fenced block."""
    text = GUIDE.read_text()
    return [(text.count("\n", 0, m.start()) + 1, m[1], m[2]) for m in FENCE.finditer(text)]


def files() -> dict[str, str]:
    out: dict[str, str] = {}
    for line, lang, body in blocks():
        if lang not in ("python", "toml"):
            continue
        first, _, rest = body.partition("\n")
        assert first.startswith(MARK), f"{GUIDE.name}:{line}: a {lang} block without '{MARK}NAME' is never tested"
        name = first.removeprefix(MARK).strip()
        assert name not in out, f"{GUIDE.name}:{line}: a second block for {name}"
        out[name] = rest
    return out


@pytest.fixture(scope="module")
def guide_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("guide")
    for name, body in files().items():
        (d / name).write_text(body)
    return d


def run(d: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != AUTOLOAD_ENV}
    env["PYTHONPATH"] = str(d)
    return subprocess.run([sys.executable, *argv], cwd=d, env=env, capture_output=True, text=True, timeout=120)


def test_every_block_is_a_file() -> None:
    names = files()
    tests = [n for n in names if n.startswith("test_")]
    assert len(tests) >= 8 and "conftest.py" not in names, sorted(names)  # oomkit's pytest plugin does it


def test_the_guides_tests_pass(guide_dir: Path) -> None:
    done = run(guide_dir, "-m", "pytest", "-v", "-W", "error", "-p", "no:cacheprovider")
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    for name in (n for n in files() if n.startswith("test_")):
        assert f"{name}::" in done.stdout, f"{name} ran no test\n{out}"
    assert re.search(r"\[trio\] PASSED", done.stdout), "async tests must run on trio too"
    assert not re.search(r"SKIPPED|XFAIL|XPASS", done.stdout), out


def test_the_guides_configurations_pass_oomkit_check(guide_dir: Path) -> None:
    for name in (n for n in files() if n.endswith(".toml") and n != "pyproject.toml"):
        done = run(guide_dir, "-m", "oomkit", "check", "-c", name)
        assert done.returncode == 0, f"{name}: {done.stderr}"


def test_the_published_entry_point_names_the_plugin(guide_dir: Path) -> None:
    project = tomllib.loads(files()["pyproject.toml"])
    (name, target), = project["project"]["entry-points"]["oomkit"].items()
    module, _, attr = target.partition(":")
    done = run(guide_dir, "-c", f"import {module}; print({module}.{attr}.name)")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == name, "the entry point's name is the plugin's name"


def test_the_published_source_kind_resolves_to_the_guides_source(guide_dir: Path) -> None:
    project = tomllib.loads(files()["pyproject.toml"])
    (kind, target), = project["project"]["entry-points"]["oomkit.sources"].items()
    done = run(
        guide_dir,
        "-c",
        "from importlib.metadata import EntryPoint\n"
        "from oomkit.sources.registry import SourceRegistry\n"
        f"registry = SourceRegistry([EntryPoint({kind!r}, {target!r}, 'oomkit.sources')])\n"
        f"print(registry.resolve({kind!r}).__name__)",
    )
    assert done.returncode == 0, done.stderr  # the registry checked the tag against the name
    assert done.stdout.strip() == target.partition(":")[2]


def test_the_guides_code_type_checks(guide_dir: Path) -> None:
    """What newcomers copy must pass the same `mypy --strict` as oomkit itself."""
    done = run(guide_dir, "-m", "mypy", "--strict", "--cache-dir", str(ROOT / ".mypy_cache" / "guide"), ".")
    assert done.returncode == 0, done.stdout + done.stderr
