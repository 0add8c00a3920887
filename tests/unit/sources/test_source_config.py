"""``[[sources]]`` tables of the event-driven sources: decoding and errors that say where."""

from __future__ import annotations

from typing import Any

import pytest

from oomkit.config import ConfigError, config_from_dict
from oomkit.sources import build_sources
from oomkit.sources.memcg_pressure import MemcgPressureSourceConfig
from oomkit.sources.memcg_threshold import MemcgThresholdSourceConfig
from oomkit.sources.memory_events import MemoryEventsSourceConfig
from oomkit.sources.psi import PsiSourceConfig
from oomkit.testing import FakeCgroups, FakeProc, paths_for


def decode(*sources: dict[str, Any]) -> tuple[object, ...]:
    return config_from_dict({"sources": list(sources)}, "/etc/oomkit.toml").sources


def test_every_kind_decodes() -> None:
    got = decode(
        {"kind": "psi"},
        {"kind": "psi", "name": "jobs", "cgroups": ["/jobs/*"], "line": "full", "stall_ms": 150, "window_s": 4},
        {"kind": "memcg-pressure", "cgroups": ["/a"], "levels": ["critical"], "mode": "hierarchy"},
        {"kind": "memcg-threshold", "cgroups": ["/a"], "thresholds": ["512M", "90%", 4096]},
        {"kind": "memory-events", "cgroups": ["/"], "local": True},
    )
    assert got == (
        PsiSourceConfig(),
        PsiSourceConfig(name="jobs", cgroups=("/jobs/*",), line="full", stall_ms=150, window_s=4),
        MemcgPressureSourceConfig(cgroups=("/a",), levels=("critical",), mode="hierarchy"),
        MemcgThresholdSourceConfig(cgroups=("/a",), thresholds=("512M", "90%", 4096)),
        MemoryEventsSourceConfig(cgroups=("/",), local=True),
    )


@pytest.mark.parametrize(
    "table, message",
    [
        ({"kind": "psi", "window_s": 20}, r"Expected `float` <= 10.0 - at `\$\.sources\[0\]\.window_s`"),
        ({"kind": "psi", "stall_ms": 5000}, r"stall_ms"),
        ({"kind": "psi", "line": "most"}, r"at `\$\.sources\[0\]\.line`"),
        ({"kind": "psi", "interval": 1}, r"unknown field `interval`"),
        ({"kind": "memcg-pressure", "cgroups": []}, r"`cgroups` needs at least one"),
        ({"kind": "memcg-pressure", "cgroups": ["/a"], "levels": ["high"]}, r"\$\.sources\[0\]\.levels\[0\]"),
        ({"kind": "memcg-pressure", "cgroups": ["/a"], "clear_after_s": 0.5}, r"clear_after_s"),
        ({"kind": "memcg-threshold", "cgroups": ["/a"], "thresholds": ["lots"]}, r"expected a size"),
        ({"kind": "memcg-threshold", "cgroups": ["/a"], "thresholds": ["150%"]}, r"between 0 and 100"),
        ({"kind": "memory-events"}, r"missing required field `cgroups`"),
    ],
)
def test_errors_name_the_file_and_the_key(table: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=r"^/etc/oomkit\.toml: ") as info:
        decode(table)
    assert len(str(info.value).splitlines()) == 1
    assert info.match(message)


def test_a_tree_that_is_not_mounted_refuses_to_build(fake_proc: FakeProc) -> None:
    cfg = config_from_dict({"sources": [{"kind": "memcg-pressure", "cgroups": ["/a"]}]})
    cfg = type(cfg)(sources=cfg.sources, paths=paths_for(fake_proc))
    with pytest.raises(ConfigError, match="'memcg-pressure': the cgroup v1 memory controller is not mounted"):
        build_sources(cfg)


def test_sources_build_on_fake_trees(fake_proc: FakeProc, fake_cgroups: FakeCgroups) -> None:
    raw = config_from_dict(
        {
            "sources": [
                {"kind": "psi"},
                {"kind": "memcg-pressure", "cgroups": ["/"]},
                {"kind": "memcg-threshold", "cgroups": ["/"], "thresholds": ["1G"]},
                {"kind": "memory-events", "cgroups": ["/"]},
            ]
        }
    )
    cfg = type(raw)(sources=raw.sources, paths=paths_for(fake_proc, fake_cgroups))
    assert [s.name for s in build_sources(cfg)] == ["psi", "memcg-pressure", "memcg-threshold", "memory-events"]
