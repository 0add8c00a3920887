"""Event sources: kernel signals in, :class:`~oomkit.events.Event`s out.

Each source module holds its source and the settings Struct of its ``[[sources]]`` table;
:mod:`oomkit.sources.registry` finds the module for a kind.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import Emit, Source, SourceSettings
from .registry import SourceKindError, default_registry

if TYPE_CHECKING:
    from ..config import Config

__all__ = ["Emit", "Source", "SourceSettings", "build_source", "build_sources"]


def build_source(settings: SourceSettings, config: Config) -> Source:
    """The source for one ``[[sources]]`` table (decoded, or built in Python)."""
    # Not at the top: oomkit.config imports this package.
    from ..config import ConfigError

    try:
        return default_registry().build(settings, config)
    except SourceKindError as exc:
        raise ConfigError(f"{config.origin}: source {settings.source_name!r}: {exc}") from None


def build_sources(config: Config) -> list[Source]:
    return [build_source(settings, config) for settings in config.sources]
