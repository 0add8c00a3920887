"""Plugin loading: entry points, config `load`, embedder objects; every refusal is one line."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path

import msgspec
import pytest

from oomkit import Candidate, Config, ConfigError, Engine, Event, PluginLoadError, hookimpl
from oomkit.config import PluginsConfig
from oomkit.plugins import AUTOLOAD_ENV


def make_dist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, body: str, name: str = "thirdparty") -> None:
    """Install a throwaway distribution with one `oomkit` entry point, on sys.path."""
    (tmp_path / f"{name}_mod.py").write_text(textwrap.dedent(body))
    info = tmp_path / f"{name}-1.2.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.2\n")
    (info / "entry_points.txt").write_text(f"[oomkit]\n{name} = {name}_mod:Plugin\n")
    monkeypatch.syspath_prepend(str(tmp_path))


PLUGIN = """
    import oomkit

    class Plugin:
        def __init__(self):
            self.configured = None

        @oomkit.hookimpl
        def oomkit_configure(self, config):
            self.configured = config.plugin_settings("thirdparty", dict)

        @oomkit.hookimpl
        def oomkit_veto(self, candidates):
            return {c.pid: "third party says no" for c in candidates}
"""


def only_thirdparty(**plugins: object) -> Config:
    return Config(sources=(), plugins=PluginsConfig(**plugins))  # type: ignore[arg-type]


def test_entry_point_plugin_loads_configures_and_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_dist(tmp_path, monkeypatch, PLUGIN)
    cfg = only_thirdparty(settings={"thirdparty": {"level": 3}})
    e = Engine(cfg)
    assert e.plugins.loaded["thirdparty"] == "entry point thirdparty_mod:Plugin (thirdparty 1.2)"
    assert e.pm.get_plugin("thirdparty").configured == {"level": 3}
    ranked = e.rank(Event(source="t", kind="oom"), [Candidate(pid=5, name="x", start_ticks=1000)])
    assert ranked[0].vetoes[0].reason == "third party says no"


def test_disable_by_name_and_unknown_names(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_dist(tmp_path, monkeypatch, PLUGIN)
    e = Engine(only_thirdparty(disable=("thirdparty",)))
    assert "thirdparty" not in e.plugins.loaded and e.plugins.disabled == ["thirdparty"]
    with pytest.raises(PluginLoadError, match=r"cannot disable unknown plugin\(s\) 'nosuch'"):
        Engine(only_thirdparty(disable=("nosuch",)))


def test_autoload_env_turns_entry_points_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_dist(tmp_path, monkeypatch, PLUGIN)
    monkeypatch.setenv(AUTOLOAD_ENV, "1")
    assert "thirdparty" not in Engine(only_thirdparty()).plugins.loaded
    monkeypatch.delenv(AUTOLOAD_ENV)
    assert "thirdparty" in Engine(only_thirdparty()).plugins.loaded


def test_section_for_a_disabled_plugin_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_dist(tmp_path, monkeypatch, PLUGIN)
    cfg = only_thirdparty(disable=("thirdparty",), settings={"thirdparty": {}})
    with pytest.raises(ConfigError, match=r"section \[plugins.thirdparty\] names no loaded plugin .*disabled: thirdparty"):
        Engine(cfg)


def test_broken_entry_point_names_the_plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_dist(tmp_path, monkeypatch, "import no_such_module_anywhere\n", name="brokenplug")
    with pytest.raises(PluginLoadError) as info:
        Engine(only_thirdparty())
    assert str(info.value) == (
        "plugin 'brokenplug' (entry point brokenplug_mod:Plugin): import failed: "
        "ModuleNotFoundError: No module named 'no_such_module_anywhere'"
    )


def test_config_load_spec(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "localplug.py").write_text(
        "import oomkit\nclass P:\n    @oomkit.hookimpl\n    def oomkit_score(self, candidates):\n"
        "        return [1.0] * len(candidates)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    e = Engine(only_thirdparty(load=("localplug:P",)), autoload=False)
    assert e.plugins.loaded == {"localplug:P": "config [plugins] load localplug:P"}
    with pytest.raises(PluginLoadError, match=r"plugin 'localplug:Nope' \(from \[plugins\] load\): import failed: AttributeError"):
        Engine(only_thirdparty(load=("localplug:Nope",)), autoload=False)


class SyncKill:
    @hookimpl
    def oomkit_kill(self, victim: Candidate) -> None:
        return None


class AsyncScore:
    @hookimpl
    async def oomkit_score(self, candidates: Sequence[Candidate]) -> list[float]:
        return []


class WrongArg:
    @hookimpl
    def oomkit_veto(self, candidates: Sequence[Candidate], victim: Candidate) -> None:
        return None


class Unmarked:
    def oomkit_veto(self, candidates: Sequence[Candidate]) -> None:
        return None


class Wrapper:
    @hookimpl(wrapper=True)
    def oomkit_veto(self, candidates: Sequence[Candidate]):  # type: ignore[no-untyped-def]
        return (yield)


class UnknownHook:
    @hookimpl
    def oomkit_sccore(self, candidates: Sequence[Candidate]) -> None:
        return None


class ConfigureRaises:
    @hookimpl
    def oomkit_configure(self, config: Config) -> None:
        raise KeyError("needs a setting")


@pytest.mark.parametrize(
    ("plugin", "message"),
    [
        (SyncKill(), "plugin 'p', hook oomkit_kill: must be `async def`"),
        (AsyncScore(), "plugin 'p', hook oomkit_score: must be a plain `def`, not `async def`"),
        (WrongArg(), "plugin 'p': Plugin 'p' for hook 'oomkit_veto'"),
        (Unmarked(), "plugin 'p', hook oomkit_veto: not marked with @oomkit.hookimpl, so it would never run"),
        (Wrapper(), "plugin 'p', hook oomkit_veto: hook wrappers are not supported"),
        (UnknownHook(), "plugin 'p': unknown hook 'oomkit_sccore' in plugin"),
        (ConfigureRaises(), "plugin 'p', hook oomkit_configure: KeyError: 'needs a setting'"),
    ],
)
def test_bad_plugins_are_refused_in_one_line(plugin: object, message: str) -> None:
    with pytest.raises(PluginLoadError) as info:
        Engine(Config(sources=()), plugins=[("p", plugin)], autoload=False)
    assert str(info.value).startswith(message)
    assert "\n" not in str(info.value)


def test_wrong_argument_error_says_which_argument() -> None:
    with pytest.raises(PluginLoadError, match=r"\{'victim'\} are declared in the hookimpl but can not be found"):
        Engine(Config(sources=()), plugins=[("p", WrongArg())], autoload=False)


class NeedsArgs:
    def __init__(self, path: str) -> None:
        self.path = path


def test_a_plugin_class_that_cannot_be_created_is_named() -> None:
    with pytest.raises(PluginLoadError) as info:
        Engine(Config(sources=()), plugins=[("needs", NeedsArgs)], autoload=False)
    assert str(info.value) == (
        "plugin 'needs': creating NeedsArgs() failed: TypeError: "
        "NeedsArgs.__init__() missing 1 required positional argument: 'path'"
    )


def test_weights_must_name_a_scorer() -> None:
    cfg = msgspec.structs.replace(Config(sources=()), weights={"nosuch": 1.0})
    with pytest.raises(ConfigError, match=r"\[weights\] names 'nosuch', which is not a loaded scorer"):
        Engine(cfg, autoload=False)


def test_classes_are_instantiated_per_engine() -> None:
    class Counter:
        @hookimpl
        def oomkit_configure(self) -> None:
            self.n = getattr(self, "n", 0) + 1

    a = Engine(Config(sources=()), plugins=[("c", Counter)], autoload=False)
    b = Engine(Config(sources=()), plugins=[("c", Counter)], autoload=False)
    assert a.pm.get_plugin("c") is not b.pm.get_plugin("c")
    assert a.pm.get_plugin("c").n == 1


def test_a_loaded_plugin_that_declares_a_name_is_known_by_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "namedplug.py").write_text(
        "import msgspec, oomkit\n"
        "class S(msgspec.Struct, forbid_unknown_fields=True):\n    level: int = 0\n"
        "class P:\n    name = 'tidy'\n"
        "    @oomkit.hookimpl\n    def oomkit_configure(self, config):\n"
        "        self.settings = config.plugin_settings('tidy', S)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    e = Engine(only_thirdparty(load=("namedplug:P",), settings={"tidy": {"level": 2}}), autoload=False)
    assert e.plugins.loaded == {"tidy": "config [plugins] load namedplug:P"}
    assert e.pm.get_plugin("tidy").settings.level == 2
    for name in ("tidy", "namedplug:P"):
        assert Engine(only_thirdparty(load=("namedplug:P",), disable=(name,)), autoload=False).plugins.disabled == [name]


def test_an_instance_under_test_replaces_the_installed_copy_of_the_same_plugin() -> None:
    from oomkit import Config, Engine
    from oomkit_plugins.growth import Growth

    mine = Growth()
    engine = Engine(Config(sources=()), plugins=[mine])
    assert engine.pm.get_plugin("growth") is mine
    assert engine.plugins.loaded["growth"].startswith(
        "passed to Engine(plugins=...), replacing the entry point oomkit_plugins.growth:Growth"
    )


def test_a_clash_in_the_load_list_says_where_the_first_came_from() -> None:
    from oomkit import Engine
    from oomkit.config import config_from_dict
    from oomkit.plugins import PluginLoadError

    cfg = config_from_dict({"sources": [], "plugins": {"load": ["oomkit_plugins.growth:Growth"]}})
    with pytest.raises(PluginLoadError) as err:
        Engine(cfg)
    assert str(err.value) == (
        "plugin 'growth': a plugin of that name is already registered (from entry point"
        f" oomkit_plugins.growth:Growth (oomkit {__import__('oomkit').__version__})); give one of them another"
        " `name`, or disable the other with [plugins] disable = ['growth']"
    )
