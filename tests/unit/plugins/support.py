"""Building a configured first-party plugin on fake trees."""

from __future__ import annotations

from typing import Any, TypeVar

from oomkit import Config
from oomkit.config import config_from_dict
from oomkit.testing import FakeCgroups, FakeProc, paths_for

P = TypeVar("P")

ORIGIN = "/etc/oomkit/test.toml"


def config(proc: FakeProc, cgroups: FakeCgroups | None = None, **plugins: dict[str, Any]) -> Config:
    """A config as decoded from a file named ``ORIGIN``, with ``[plugins.<name>]`` tables."""
    paths = paths_for(proc, cgroups)
    raw: dict[str, Any] = {
        "paths": {"proc": paths.proc, "memory_v1": paths.memory_v1, "unified": paths.unified},
        "sources": [],
        "plugins": dict(plugins),
    }
    return config_from_dict(raw, ORIGIN)


def configured(plugin: P, cfg: Config) -> P:
    plugin.oomkit_configure(cfg)  # type: ignore[attr-defined]
    return plugin
