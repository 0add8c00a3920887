"""The example plugin, installed for the tests that need it without touching the user's venv.

``make`` no longer installs examples/protect-file: its tests put a directory on PYTHONPATH
holding what pip would install (a ``dist-info`` with the name, version and entry points of
its ``pyproject.toml``) beside the example's own source, so oomkit finds the plugin exactly as
it finds an installed one, in subprocesses only.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[3] / "examples" / "protect-file"


@pytest.fixture(scope="session")
def example_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """``os.environ`` plus a PYTHONPATH on which the example plugin is installed."""
    project = tomllib.loads((EXAMPLE / "pyproject.toml").read_text())["project"]
    site = tmp_path_factory.mktemp("example-site")
    info = site / f"{project['name'].replace('-', '_')}-{project['version']}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {project['name']}\nVersion: {project['version']}\n")
    groups = project.get("entry-points", {})
    (info / "entry_points.txt").write_text(
        "".join(f"[{group}]\n" + "".join(f"{k} = {v}\n" for k, v in eps.items()) for group, eps in groups.items())
    )
    path = os.pathsep.join(filter(None, [str(site), str(EXAMPLE), os.environ.get("PYTHONPATH", "")]))
    return {**os.environ, "PYTHONPATH": path}
