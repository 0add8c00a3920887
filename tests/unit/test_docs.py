"""Generated reference pages stay true to the code, and every config key is documented."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import msgspec
import pytest

from oomkit import config

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "docs"))
import gen_config  # noqa: E402


@pytest.mark.parametrize("script", ["gen_config.py", "gen_hooks.py", "gen_features.py"])
def test_generated_page_is_up_to_date(script: str) -> None:
    done = subprocess.run([sys.executable, str(ROOT / "docs" / script), "--check"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


CONFIG_STRUCTS = [
    config.EngineConfig,
    config.DaemonConfig,
    config.PathsConfig,
    config.PluginsConfig,
    *gen_config.first_party_kinds().values(),
    *gen_config.first_party_plugin_settings().values(),
]


@pytest.mark.parametrize("cls", CONFIG_STRUCTS, ids=lambda c: c.__name__)
def test_every_config_key_is_documented(cls: type) -> None:
    assert cls.__doc__, f"{cls.__name__} has no docstring"
    info = msgspec.inspect.type_info(cls)
    assert isinstance(info, msgspec.inspect.StructType)
    documented = gen_config._field_docs(cls) | gen_config._field_docs(cls.__mro__[1])
    missing = [f.name for f in info.fields if f.name not in documented and f.name != "settings"]
    assert not missing, f"{cls.__name__}: keys without a docstring under them: {missing}"


def test_the_shared_page_events_example_is_a_decision_line() -> None:
    """docs/shared-page.md shows what `--events` writes for a record: it must decode as a
    Decision and carry exactly the keys one encodes to, at every level."""
    import json
    import re

    from oomkit.events import Decision, to_json

    text = (ROOT / "docs" / "shared-page.md").read_text()
    block = re.search(r"## What comes out.*?```json\n(.*?)```", text, re.S)
    assert block is not None
    raw = json.loads(block[1])
    decision = msgspec.json.decode(block[1].encode(), type=Decision)
    assert decision.event.source == "shared-page" and decision.event.kind == "oom"

    def keys(obj: object) -> object:
        if isinstance(obj, dict):
            return {k: keys(v) for k, v in obj.items() if k not in ("values", "scores", "stage_ns")}
        if isinstance(obj, list):
            return [keys(v) for v in obj]
        return None

    assert keys(raw) == keys(json.loads(to_json(decision)))
