"""Config decoding: defaults, every error names the file and the line or key path."""

from __future__ import annotations

import tomllib
from pathlib import Path

import msgspec
import pytest

from oomkit.config import Config, ConfigError, load_config, merge
from oomkit.sources.memcg_oom import MemcgOomSourceConfig
from oomkit.sources.meminfo import MeminfoSourceConfig
from oomkit.tomlout import dump_toml


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "oomkit.toml"
    p.write_text(text)
    return p


def test_defaults_need_no_file() -> None:
    cfg = load_config(None)
    assert cfg.origin == "<defaults>"
    assert cfg.sources == (MeminfoSourceConfig(),)
    assert cfg.engine.dry_run is False


def test_full_file_decodes(tmp_path: Path) -> None:
    cfg = load_config(
        write(
            tmp_path,
            """
[engine]
dry_run = true
cooldown_s = 2.5

[[sources]]
kind = "meminfo"
mem_available = "512M"
swap_free = "5%"

[[sources]]
kind = "memcg-oom"
name = "web"
cgroups = ["/web"]

[weights]
kernel_badness = 2.0

[plugins]
load = ["mypkg.mod:Plugin"]
disable = ["jsonl"]

[plugins.killer]
grace_s = 3
""",
        )
    )
    assert cfg.engine.dry_run and cfg.engine.cooldown_s == 2.5
    assert cfg.sources[1] == MemcgOomSourceConfig(name="web", cgroups=("/web",))
    assert cfg.plugins.load == ("mypkg.mod:Plugin",)
    assert cfg.plugins.disable == ("jsonl",)
    assert cfg.plugins.settings == {"killer": {"grace_s": 3}}
    assert cfg.weights == {"kernel_badness": 2.0}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[engine\n", "invalid TOML: Expected ']' at the end of a table declaration (at line 1, column 8)"),
        ("[engine]\ncooldown_s = 'x'\n", "Expected `float`, got `str` - at `$.engine.cooldown_s`"),
        ("[engine]\nfoo = 1\n", "Object contains unknown field `foo` - at `$.engine`"),
        ("[engine]\nqueue_size = 0\n", "Expected `int` >= 1 - at `$.engine.queue_size`"),
        (
            "[[sources]]\nkind = 'meminfo'\n[[sources]]\nkind = 'nope'\n",
            "unknown source kind 'nope' (known: kernel-page, memcg-oom, memcg-pressure, memcg-threshold, meminfo,"
            " memory-events, memory-high, memory-threshold, psi, shared-page) - at `$.sources[1].kind`",
        ),
        ("[[sources]]\nname = 'x'\n", "Object missing required field `kind` - at `$.sources[0]`"),
        ("[[sources]]\nkind = 3\n", "Expected `str`, got `int` - at `$.sources[0].kind`"),
        ("sources = 3\n", "Expected `array`, got `int` - at `$.sources`"),
        ("sources = [3]\n", "Expected `object`, got `int` - at `$.sources[0]`"),
        ("[[sources]]\nkind = 'no.such.module:Source'\n", "source kind 'no.such.module:Source': import failed: "
         "ModuleNotFoundError: No module named 'no' - at `$.sources[0].kind`"),
        ("[[sources]]\nkind = 'oomkit.config:Config'\n", "is not a subclass of oomkit.Source - at `$.sources[0].kind`"),
        (
            "[[sources]]\nkind = 'meminfo'\n[[sources]]\nkind = 'memcg-oom'\ncgroups = ['/a']\ndeadline_s = 'x'\n",
            "Expected `float`, got `str` - at `$.sources[1].deadline_s`",
        ),
        ("[[sources]]\nkind = 'meminfo'\nmem_available = '200%'\n", "between 0 and 100, got '200%' - at `$.sources[0]`"),
        ("[[sources]]\nkind = 'meminfo'\nswap_free = '12 parsecs'\n", "expected a size such as"),
        ("[[sources]]\nkind = 'memcg-oom'\n", "Object missing required field `cgroups` - at `$.sources[0]`"),
        ("[[sources]]\nkind='meminfo'\n[[sources]]\nkind='meminfo'\n", "source names must be unique; repeated: meminfo - at `$.sources`"),
        ("[plugins]\nkiller = 3\n", "Expected `table` for plugin settings, got `int` - at `$.plugins.killer`"),
        ("[daemon]\nloop = 'tokio'\n", "Invalid enum value 'tokio' - at `$.daemon.loop`"),
        ("origin = 'x'\n", "unknown field `origin`"),
    ],
)
def test_errors_name_file_and_place(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    msg = str(info.value)
    assert msg.startswith(f"{path}: ")
    assert expected in msg
    assert "\n" not in msg


def test_missing_file_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope.toml: no such file$"):
        load_config(tmp_path / "nope.toml")


def test_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(tmp_path)


def test_overrides_are_validated_like_the_file(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, "[engine]\ncooldown_s = 1.0\n"), {"engine": {"dry_run": True}})
    assert cfg.engine.dry_run and cfg.engine.cooldown_s == 1.0
    with pytest.raises(ConfigError, match=r"\$\.engine\.dry_run"):
        load_config(None, {"engine": {"dry_run": "yes"}})


def test_merge_is_deep_and_copies() -> None:
    base = {"a": {"b": 1, "c": 2}, "x": [1]}
    out = merge(base, {"a": {"b": 9}, "x": [2]})
    assert out == {"a": {"b": 9, "c": 2}, "x": [2]}
    assert base == {"a": {"b": 1, "c": 2}, "x": [1]}


class KillerSettings(msgspec.Struct, forbid_unknown_fields=True):
    grace_s: float = 1.0


def test_plugin_settings_errors_carry_the_plugin_path(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, "[plugins.killer]\ngrace_s = 'soon'\n"))
    with pytest.raises(ConfigError) as info:
        cfg.plugin_settings("killer", KillerSettings)
    assert str(info.value) == f"{tmp_path / 'oomkit.toml'}: Expected `float`, got `str` - at `$.plugins.killer.grace_s`"
    assert Config().plugin_settings("killer", KillerSettings) == KillerSettings()


def test_check_output_reads_back_to_the_same_config(tmp_path: Path) -> None:
    src = write(
        tmp_path,
        "[[sources]]\nkind='memcg-oom'\ncgroups=['/a', '/b']\n[plugins]\ndisable=['jsonl']\n"
        "[plugins.killer]\ngrace_s = 2.0\nnames = ['x y']\n[weights]\n'odd name' = 0.5\n",
    )
    cfg = load_config(src)
    from oomkit.cli import _config_doc

    text = dump_toml(_config_doc(cfg))
    again = tmp_path / "again.toml"
    again.write_text(text)
    assert tomllib.loads(text)  # valid TOML
    assert msgspec.structs.replace(load_config(again), origin=cfg.origin) == cfg
