"""Source kinds register through the ``oomkit.sources`` entry-point group, first-party and
third-party alike, or are named ``module:Class``; a kind is looked up without importing the
others, and every way a registration can be wrong is one line naming the entry point."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from importlib.metadata import EntryPoint
from pathlib import Path

import anyio
import msgspec
import pytest

from oomkit import Source, SourceSettings
from oomkit.cli import main
from oomkit.config import ConfigError, load_config
from oomkit.plugins import AUTOLOAD_ENV
from oomkit.sources import build_sources
from oomkit.sources.memcg_oom import MemcgOomSource, MemcgOomSourceConfig
from oomkit.sources.meminfo import MeminfoSource, MeminfoSourceConfig
from oomkit.sources.registry import ENTRY_POINT_GROUP, SourceKindError, SourceRegistry, UnknownSourceKind, default_registry
from oomkit.testing import FakeCgroups, FakeProc, harness, paths_for
from tests.tick_source import TickSettings, TickSource

ROOT = Path(__file__).resolve().parents[3]
FIRST_PARTY = ["memcg-oom", "memcg-pressure", "memcg-threshold", "meminfo", "memory-events", "memory-high", "psi", "shared-page"]


def ep(name: str, value: str) -> EntryPoint:
    return EntryPoint(name=name, value=value, group=ENTRY_POINT_GROUP)


def python(code: str, *, path: Path | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != AUTOLOAD_ENV}
    env["PYTHONPATH"] = os.pathsep.join([*([str(path)] if path else []), str(ROOT)])
    return subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=cwd or ROOT, capture_output=True, text=True, timeout=120
    )


# --- first-party kinds, from the installed metadata ----------------------------------------


def test_every_first_party_kind_is_an_entry_point_of_its_own_module() -> None:
    registry = default_registry()
    assert set(FIRST_PARTY) <= set(registry.kinds())
    for kind in FIRST_PARTY:
        cls = registry.resolve(kind)
        assert cls.__module__ == f"oomkit.sources.{kind.replace('-', '_')}"
        assert cls.settings_type.__module__ == cls.__module__, "the module owns its settings"
        assert cls.settings_type.__struct_config__.tag == kind


def test_listing_kinds_imports_no_source_and_a_config_imports_only_its_kinds(tmp_path: Path) -> None:
    cfg = tmp_path / "oomkit.toml"
    cfg.write_text("[[sources]]\nkind = 'psi'\n")
    done = python(
        "import sys\n"
        "from oomkit.sources.registry import default_registry\n"
        "default_registry().kinds()\n"
        "def loaded(): return sorted(m.rsplit('.', 1)[1] for m in sys.modules if m.startswith('oomkit.sources.'))\n"
        "print(loaded())\n"
        f"from oomkit.config import load_config; load_config({str(cfg)!r})\n"
        "print(loaded())\n"
    )
    assert done.returncode == 0, done.stderr
    before, after = done.stdout.splitlines()
    assert before == "['base', 'registry']"
    assert after == "['base', 'psi', 'registry', 'scopes', 'watching']"


# --- what a bad registration says -----------------------------------------------------------


def test_unknown_kind_lists_the_known_ones() -> None:
    registry = SourceRegistry([ep("b", "x:B"), ep("a", "x:A")])
    with pytest.raises(UnknownSourceKind, match=r"^unknown source kind 'c' \(known: a, b\)$"):
        registry.resolve("c")
    with pytest.raises(UnknownSourceKind, match=r"\(known: none\)"):
        SourceRegistry([]).resolve("meminfo")


@pytest.mark.parametrize(
    ("entry_points", "kind", "message"),
    [
        (
            [ep("tick", "tests.tick_source:TickSource"), ep("tick", "tests.tick_source:OtherTick")],
            "tick",
            r"^source kind 'tick' is registered twice: entry point tick = tests\.tick_source:TickSource and"
            r" entry point tick = tests\.tick_source:OtherTick$",
        ),
        (
            [ep("tock", "tests.tick_source:TickSource")],
            "tock",
            r"^source kind 'tock' \(entry point tock = tests\.tick_source:TickSource\): TickSettings has tag 'tick';"
            r" an entry point's name must be its settings' tag$",
        ),
        (
            [ep("untagged", "tests.tick_source:Untagged")],
            "untagged",
            r"^source kind 'untagged' \(entry point untagged = tests\.tick_source:Untagged\): Untagged has no"
            r" settings_type \(a subclass of oomkit\.sources\.base\.SourceSettings\)$",
        ),
        (
            [ep("x", "tests.tick_source:TickSettings")],
            "x",
            r"^source kind 'x' \(entry point x = tests\.tick_source:TickSettings\): <class .*TickSettings'> is not"
            r" a subclass of oomkit\.Source$",
        ),
        (
            [ep("x", "tests.no_such_module:Source")],
            "x",
            r"^source kind 'x' \(entry point x = tests\.no_such_module:Source\): import failed: ModuleNotFoundError:"
            r" No module named 'tests\.no_such_module'$",
        ),
    ],
)
def test_a_bad_registration_is_one_line_naming_the_entry_point(
    entry_points: list[EntryPoint], kind: str, message: str
) -> None:
    registry = SourceRegistry(entry_points)
    with pytest.raises(SourceKindError, match=message):
        registry.resolve(kind)
    with pytest.raises(SourceKindError, match=message):
        registry.load_all()


def test_the_same_registration_found_twice_is_one() -> None:
    # One distribution seen on two sys.path entries (an editable install beside a build).
    registry = SourceRegistry([ep("tick", "tests.tick_source:TickSource")] * 2)
    assert registry.resolve("tick") is TickSource


class BorrowsMeminfoSettings(MeminfoSource):
    """Reuses another kind's Struct: a table of its kind would decode as `meminfo`."""


class TakesNoConfig(Source):
    settings_type = TickSettings

    def __init__(self, settings: TickSettings) -> None:
        self.name = "x"

    async def run(self, emit: object, *, task_status: object = None) -> None:
        raise NotImplementedError


def test_a_module_class_kind_needs_settings_of_its_own_and_the_uniform_constructor() -> None:
    registry = SourceRegistry([ep("meminfo", "oomkit.sources.meminfo:MeminfoSource")])
    with pytest.raises(SourceKindError, match=r"its settings' tag 'meminfo' is the kind of another source$"):
        registry.resolve(f"{__name__}:BorrowsMeminfoSettings")
    with pytest.raises(SourceKindError, match=r"TakesNoConfig cannot be built as TakesNoConfig\(settings, config\)$"):
        registry.resolve(f"{__name__}:TakesNoConfig")
    # Naming a registered source by its class is the same source.
    assert registry.resolve("oomkit.sources.meminfo:MeminfoSource") is MeminfoSource
    assert registry.kind_of(MeminfoSourceConfig()) == "meminfo"


def test_settings_built_in_python_find_their_source() -> None:
    registry = SourceRegistry([ep("meminfo", "oomkit.sources.meminfo:MeminfoSource")])
    assert registry.source_class_for(MeminfoSourceConfig()) is MeminfoSource
    with pytest.raises(UnknownSourceKind, match="unknown source kind 'tick'"):
        registry.source_class_for(TickSettings())  # never named by a config in this registry
    registry.resolve("tests.tick_source:TickSource")
    assert registry.source_class_for(TickSettings()) is TickSource
    assert registry.kind_of(TickSettings()) == "tests.tick_source:TickSource"


def test_a_bad_kind_in_a_file_names_file_key_and_entry_point(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    registry = SourceRegistry([ep("tick", "tests.tick_source:TickSource"), ep("tick", "tests.tick_source:OtherTick")])
    monkeypatch.setattr("oomkit.config.default_registry", lambda: registry)
    cfg = tmp_path / "oomkit.toml"
    cfg.write_text("[[sources]]\nkind = 'tick'\n")
    with pytest.raises(ConfigError) as info:
        load_config(cfg)
    assert str(info.value) == (
        f"{cfg}: source kind 'tick' is registered twice: entry point tick = tests.tick_source:TickSource and"
        " entry point tick = tests.tick_source:OtherTick - at `$.sources[0].kind`"
    )


# --- a source from outside oomkit, configured and running ----------------------------------


TICK = """
[[sources]]
kind = "{kind}"
name = "ticker"
interval_s = 0.01
count = 3
"""


@pytest.mark.anyio
async def test_a_module_class_source_is_configured_and_runs(tmp_path: Path, fake_proc: FakeProc) -> None:
    fake_proc.add_process(10, "hog", rss=1 << 30)
    cfg = tmp_path / "oomkit.toml"
    cfg.write_text(TICK.format(kind="tests.tick_source:TickSource"))
    config = load_config(cfg)
    assert config.sources == (TickSettings(name="ticker", interval_s=0.01, count=3),)
    async with harness(proc=fake_proc, config=config) as h:
        (ticker,) = [s for s in h.engine.sources if s.name == "ticker"]
        assert isinstance(ticker, TickSource) and ticker.proc == str(fake_proc.path)
        with anyio.fail_after(30):
            while not any(d.event.source == "ticker" for d in h.engine.recent):
                await anyio.sleep(0.01)
    decision = next(d for d in h.engine.recent if d.event.source == "ticker")
    assert decision.event.kind == "low-memory" and decision.victim is not None and decision.victim.name == "hog"


def test_a_module_class_source_has_the_same_key_path_errors(tmp_path: Path) -> None:
    cfg = tmp_path / "oomkit.toml"
    for text, where in [
        ("interval_s = 'soon'", "Expected `float`, got `str` - at `$.sources[1].interval_s`"),
        ("interval_s = nan", "Expected `float` >= 0.001 - at `$.sources[1].interval_s`"),
        ("intervals = 1", "Object contains unknown field `intervals` - at `$.sources[1]`"),
    ]:
        cfg.write_text(f"[[sources]]\nkind = 'meminfo'\n[[sources]]\nkind = 'tests.tick_source:TickSource'\n{text}\n")
        with pytest.raises(ConfigError) as info:
            load_config(cfg)
        assert str(info.value) == f"{cfg}: {where}"


def test_check_prints_a_module_class_kind_as_written(
    tmp_path: Path, fake_proc: FakeProc, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tmp_path / "oomkit.toml"
    cfg.write_text(f"[paths]\nproc = '{fake_proc.path}'\n" + TICK.format(kind="tests.tick_source:TickSource"))
    assert main(["check", "-c", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert tomllib.loads(out)["sources"][0]["kind"] == "tests.tick_source:TickSource"
    again = tmp_path / "again.toml"
    again.write_text(out)
    assert load_config(again).sources == load_config(cfg).sources


def test_takeover_flag_still_adds_a_memcg_oom_source(
    tmp_path: Path, fake_proc: FakeProc, fake_cgroups: FakeCgroups, capsys: pytest.CaptureFixture[str]
) -> None:
    (fake_proc.root / "self" / "cgroup").write_text("4:memory:/daemon\n0::/\n")
    fake_cgroups.mkdir_v1("/daemon")
    fake_cgroups.mkdir_v1("/jobs", limit=64 << 20)
    paths = msgspec.structs.replace(paths_for(fake_proc, fake_cgroups), run_dir=str(tmp_path / "run"))
    cfg = tmp_path / "oomkit.toml"
    cfg.write_text("[paths]\n" + "".join(f"{k} = {v!r}\n" for k, v in msgspec.to_builtins(paths).items()))
    assert main(["check", "-c", str(cfg), "--takeover", "/jobs"]) == 0, capsys.readouterr().err
    kinds = [(s["kind"], s["name"]) for s in tomllib.loads(capsys.readouterr().out)["sources"]]
    assert kinds == [("meminfo", ""), ("memcg-oom", "takeover")]
    built = build_sources(msgspec.structs.replace(
        load_config(cfg), sources=(MemcgOomSourceConfig(name="takeover", cgroups=("/jobs",)),)
    ))
    assert [type(s) for s in built] == [MemcgOomSource]


# --- an installed distribution's entry point -------------------------------------------------


def install(site: Path, dist: str, version: str, entry_points: str) -> None:
    """What pip leaves behind for importlib.metadata: a dist-info directory on a path."""
    info = site / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\n{entry_points}\n")


RUN_UNTIL_DECIDED = """
import sys, anyio
from pathlib import Path
from oomkit.config import load_config
from oomkit.testing import FakeProc, harness

async def main():
    proc = FakeProc(Path(sys.argv[1])); proc.add_process(10, "hog", rss=1 << 30)
    async with harness(proc=proc, config=load_config(sys.argv[2])) as h:
        with anyio.fail_after(30):
            while not any(d.event.source == "ticker" for d in h.engine.recent):
                await anyio.sleep(0.01)
        print(type(h.engine.sources[0]).__name__, h.engine.recent[0].victim.name)

anyio.run(main)
"""


def test_an_installed_distribution_registers_a_kind(tmp_path: Path) -> None:
    site = tmp_path / "site"
    install(site, "ticker-dist", "1.0", "tick = tests.tick_source:TickSource")
    cfg = tmp_path / "oomkit.toml"
    cfg.write_text(TICK.format(kind="tick"))
    done = python(
        "from oomkit.sources.registry import default_registry; print(default_registry().kinds())", path=site
    )
    assert done.returncode == 0, done.stderr
    assert "'tick'" in done.stdout
    code = f"import sys; sys.argv[1:] = [{str(tmp_path / 'proc')!r}, {str(cfg)!r}]\n" + RUN_UNTIL_DECIDED
    done = python(code, path=site)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1].split() == ["TickSource", "hog"]  # after jsonl's lines


def test_two_distributions_registering_one_kind_are_refused(tmp_path: Path) -> None:
    site = tmp_path / "site"
    install(site, "ticker-dist", "1.0", "tick = tests.tick_source:TickSource")
    install(site, "other-ticker", "2.0", "tick = tests.tick_source:OtherTick")
    cfg = tmp_path / "oomkit.toml"
    cfg.write_text(TICK.format(kind="tick"))
    done = python(f"import sys; from oomkit.cli import main; sys.exit(main(['check', '-c', {str(cfg)!r}]))", path=site)
    assert done.returncode == 2
    (line,) = done.stderr.splitlines()
    assert line.startswith(f"oomkit: error: {cfg}: source kind 'tick' is registered twice: ")
    assert "entry point tick = tests.tick_source:TickSource (ticker-dist 1.0)" in line
    assert "entry point tick = tests.tick_source:OtherTick (other-ticker 2.0)" in line
    assert line.endswith(" - at `$.sources[0].kind`")


def test_settings_subclass_the_public_base() -> None:
    assert issubclass(TickSettings, SourceSettings)
    assert TickSettings(name="").source_name == "tick"
