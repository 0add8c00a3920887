"""Event sources: kernel signals in, :class:`~oomkit.events.Event`s out."""

from __future__ import annotations

from ..config import Config, MemcgOomSourceConfig, MeminfoSourceConfig, SharedPageSourceConfig, SourceConfig
from .base import Emit, Source

__all__ = ["Emit", "Source", "build_sources"]


def build_source(spec: SourceConfig, config: Config) -> Source:
    """The source for one ``[[sources]]`` table."""
    # Imported here so that an engine pays only for the sources its config names.
    if isinstance(spec, MeminfoSourceConfig):
        from .meminfo import MeminfoSource

        return MeminfoSource(spec, config.paths)
    if isinstance(spec, MemcgOomSourceConfig):
        from .memcg_oom import MemcgOomSource

        return MemcgOomSource(spec, config.paths)
    if isinstance(spec, SharedPageSourceConfig):
        from .shared_page import SharedPageSource

        return SharedPageSource(spec, config.paths)
    raise TypeError(f"no source for {type(spec).__name__}")  # unreachable while the union is covered


def build_sources(config: Config) -> list[Source]:
    return [build_source(spec, config) for spec in config.sources]
