"""Configuring a first-party plugin against the real /proc and cgroupfs (integration tests)."""

from __future__ import annotations

from typing import Any, TypeVar

from oomkit.config import config_from_dict

P = TypeVar("P")


def configured_real(plugin: P, **plugins: dict[str, Any]) -> P:
    """``plugin`` configured with ``[plugins.<name>]`` tables and the real, discovered paths."""
    plugin.oomkit_configure(config_from_dict({"sources": [], "plugins": dict(plugins)}, "<test>"))  # type: ignore[attr-defined]
    return plugin
