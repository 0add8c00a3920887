"""Every number a config takes is finite and in a documented range: NaN, infinities, huge,
tiny and negative values are refused with the file and the key, and a walk over every config
Struct fails for a number without both bounds."""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Annotated, Any

import msgspec
import pytest

from oomkit import Engine
from oomkit.config import Config, ConfigError, EngineConfig, load_config
from oomkit.sources.memcg_oom import MemcgOomSourceConfig
from oomkit.sources.registry import default_registry
from oomkit.testing import unbounded_numbers
from oomkit_plugins.killer import KillerSettings
from oomkit_plugins.pressure import PressureSettings

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "docs"))
import gen_config  # noqa: E402

# --- one test per bad-number class, on representative settings, through a real TOML file ----

BAD = {"nan": "nan", "inf": "inf", "huge": "1e308", "tiny": "1e-300", "negative": "-0.5"}
BAD_INT = {"nan": "nan", "inf": "inf", "huge": "9223372036854775807", "tiny": "0", "negative": "-1"}

TAKEOVER = "[[sources]]\nkind = 'memcg-oom'\ncgroups = ['/a']\n"
PSI = "[[sources]]\nkind = 'psi'\n"

# (table text before the key, the key, its path, lower bound text, upper bound text)
FLOATS = [
    ("[engine]\n", "cooldown_s", "$.engine.cooldown_s", "0.0", "3600.0"),
    (TAKEOVER, "deadline_s", "$.sources[0].deadline_s", "0.001", "3600.0"),
    (TAKEOVER, "poll_interval_s", "$.sources[0].poll_interval_s", "0.001", "3600.0"),
    (PSI, "stall_ms", "$.sources[0].stall_ms", "0.001", "10000.0"),
    ("[weights]\n", "kernel_badness", "$.weights.kernel_badness", "0.0", "1000.0"),
]
INTS = [
    ("[engine]\n", "queue_size", "$.engine.queue_size", "1", "1048576"),
    ("[daemon]\n", "oom_score_adj", "$.daemon.oom_score_adj", "-1000", "1000"),
    ("[[sources]]\nkind = 'shared-page'\ndirectory = '/run/x'\n", "max_ring_bytes", "$.sources[0].max_ring_bytes",
     "4096", "1073741824"),
]


def load(tmp_path: Path, text: str) -> tuple[Path, Config | str]:
    path = tmp_path / "oomkit.toml"
    path.write_text(text)
    try:
        return path, load_config(path)
    except ConfigError as exc:
        return path, str(exc)


def expected_float(kind: str, low: str, high: str) -> str | None:
    if kind in ("inf", "huge"):
        return f"Expected `float` <= {high}"
    if kind == "tiny" and float(low) == 0:
        return None  # 1e-300 is in [0, high]: legal, and taken as given
    return f"Expected `float` >= {low}"  # NaN fails the first comparison


@pytest.mark.parametrize("kind", BAD)
@pytest.mark.parametrize(("before", "key", "where", "low", "high"), FLOATS, ids=[f[2] for f in FLOATS])
def test_a_bad_float_is_refused_naming_file_and_key(
    tmp_path: Path, kind: str, before: str, key: str, where: str, low: str, high: str
) -> None:
    path, got = load(tmp_path, f"{before}{key} = {BAD[kind]}\n")
    expected = expected_float(kind, low, high)
    if expected is None:
        assert isinstance(got, Config), got
        return
    assert got == f"{path}: {expected} - at `{where}`"


@pytest.mark.parametrize("kind", BAD_INT)
@pytest.mark.parametrize(("before", "key", "where", "low", "high"), INTS, ids=[i[2] for i in INTS])
def test_a_bad_int_is_refused_naming_file_and_key(
    tmp_path: Path, kind: str, before: str, key: str, where: str, low: str, high: str
) -> None:
    path, got = load(tmp_path, f"{before}{key} = {BAD_INT[kind]}\n")
    if kind in ("nan", "inf"):
        expected = "Expected `int`, got `float`"
    elif kind == "huge":
        expected = f"Expected `int` <= {high}"
    elif int(BAD_INT[kind]) >= int(low):
        assert isinstance(got, Config), got  # 0 where 0 is allowed... never in these three
        return
    else:
        expected = f"Expected `int` >= {low}"
    assert got == f"{path}: {expected} - at `{where}`"


@pytest.mark.parametrize("kind", BAD)
def test_a_bad_plugin_setting_is_refused_naming_file_and_key(tmp_path: Path, kind: str) -> None:
    path, cfg = load(tmp_path, f"[plugins.killer]\ngrace_s = {BAD[kind]}\n[plugins.pressure]\nstale_s = {BAD[kind]}\n")
    assert isinstance(cfg, Config)
    for name, settings_type, key, low, high in [
        ("killer", KillerSettings, "grace_s", "0.0", "600.0"),
        ("pressure", PressureSettings, "stale_s", "0.001", "3600.0"),
    ]:
        expected = expected_float(kind, low, high)
        if expected is None:
            cfg.plugin_settings(name, settings_type)
            continue
        with pytest.raises(ConfigError) as info:
            cfg.plugin_settings(name, settings_type)
        assert str(info.value) == f"{path}: {expected} - at `$.plugins.{name}.{key}`"


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("fill_rate_per_s = '2000000T'", "a size must be at most 1 PiB (1125899906842624 bytes), got '2000000T'"),
        ("fill_rate_per_s = '" + "9" * 400 + "G'", "a size must be at most 1 PiB"),  # was an OverflowError
        ("fill_rate_per_s = 1125899906842625", "Expected `int` <= 1125899906842624 - at `$.sources[0].fill_rate_per_s`"),
        ("mem_available = 'nan%'", "a percentage must be between 0 and 100, got 'nan%'"),
        ("mem_available = 'inf%'", "a percentage must be between 0 and 100, got 'inf%'"),
        ("mem_available = -1", "Expected `int` >= 0 - at `$.sources[0].mem_available`"),
        ("swap_free = 1e308", "Expected `int | str`, got `float` - at `$.sources[0].swap_free`"),
    ],
)
def test_sizes_and_thresholds_are_bounded_after_parsing(tmp_path: Path, line: str, message: str) -> None:
    path, got = load(tmp_path, f"[[sources]]\nkind = 'meminfo'\n{line}\n")
    assert isinstance(got, str) and got.startswith(f"{path}: ") and message in got, got
    assert "\n" not in got


def test_numbers_inside_arrays_are_bounded_with_their_index(tmp_path: Path) -> None:
    path, got = load(tmp_path, "[[sources]]\nkind = 'shared-page'\ndirectory = '/run/x'\nallowed_uids = [0, -1]\n")
    assert got == f"{path}: Expected `int` >= 0 - at `$.sources[0].allowed_uids[1]`"
    path, got = load(tmp_path, "[[sources]]\nkind = 'memcg-threshold'\ncgroups = ['/a']\nthresholds = ['1G', -5]\n")
    assert got == f"{path}: Expected `int` >= 0 - at `$.sources[0].thresholds[1]`"


# --- the field walk -------------------------------------------------------------------------


def config_structs() -> list[type[msgspec.Struct]]:
    """Config (its sections through it), every registered kind's settings, and every
    first-party plugin's settings."""
    kinds = [cls.settings_type for cls in default_registry().load_all().values()]
    return [Config, *kinds, *gen_config.first_party_plugin_settings().values()]


def test_the_walk_sees_every_kind_and_plugin() -> None:
    names = {cls.__name__ for cls in config_structs()}
    assert {"Config", "MemcgOomSourceConfig", "SharedPageSourceConfig", "KillerSettings", "ProtectSettings"} <= names
    assert len(names) >= 1 + 7 + 6


@pytest.mark.parametrize("struct", config_structs(), ids=lambda c: c.__qualname__)
def test_every_number_has_a_lower_and_an_upper_bound(struct: type[msgspec.Struct]) -> None:
    assert unbounded_numbers(struct) == []


class _Inner(msgspec.Struct, frozen=True):
    ok: Annotated[int, msgspec.Meta(ge=0, le=9)] = 0
    free: int = 0


class _Unbounded(msgspec.Struct, frozen=True):
    fine: Annotated[float, msgspec.Meta(gt=0, lt=1)] = 0.5
    plain: float = 1.0
    half: Annotated[float, msgspec.Meta(ge=0)] = 1.0
    in_tuple: tuple[int, ...] = ()
    in_union: str | float | None = None
    in_dict: dict[str, Annotated[float, msgspec.Meta(le=1)]] = msgspec.field(default_factory=dict)
    keys: dict[int, str] = msgspec.field(default_factory=dict)
    pair: tuple[Annotated[int, msgspec.Meta(ge=0, le=1)], float] = (0, 0.0)
    inner: _Inner = _Inner()
    flag: bool = False
    anything: Any = None


def test_the_walk_fails_for_every_unbounded_number() -> None:
    assert unbounded_numbers(_Unbounded) == [
        "_Unbounded.plain",
        "_Unbounded.half",
        "_Unbounded.in_tuple[]",
        "_Unbounded.in_union",
        "_Unbounded.in_dict[]",
        "_Unbounded.keys{key}",
        "_Unbounded.pair[1]",
        "_Unbounded.inner.free",
    ]


# --- a Config built in Python meets the same bounds when an engine takes it ----------------


@pytest.mark.parametrize(
    ("config", "where"),
    [
        (lambda: Config(sources=(), engine=EngineConfig(cooldown_s=float("nan"))), "$.engine.cooldown_s"),
        (lambda: Config(sources=(), engine=EngineConfig(queue_size=1 << 62)), "$.engine.queue_size"),
        (lambda: Config(sources=(MemcgOomSourceConfig(cgroups=("/a",), deadline_s=float("inf")),)), "$.sources[0].deadline_s"),
        (lambda: Config(sources=(), weights={"kernel_badness": 1e300}), "$.weights.kernel_badness"),
    ],
)
def test_an_engine_checks_a_config_built_in_python(config: Any, where: str) -> None:
    # msgspec checks Meta bounds only while decoding: without the engine's own check, these
    # reached it (cooldown_s = nan crashed the daemon after its first kill).
    with pytest.raises(ConfigError, match=rf"^<defaults>: .* - at `{re.escape(where)}`$"):
        Engine(config(), autoload=False)
