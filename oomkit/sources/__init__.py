"""Event sources: kernel signals in, :class:`~oomkit.events.Event`s out."""

from __future__ import annotations

from ..config import (
    Config,
    MemcgOomSourceConfig,
    MemcgPressureSourceConfig,
    MemcgThresholdSourceConfig,
    MeminfoSourceConfig,
    MemoryEventsSourceConfig,
    PsiSourceConfig,
    SharedPageSourceConfig,
    SourceConfig,
)
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
    if isinstance(spec, PsiSourceConfig):
        from .psi import PsiSource

        return PsiSource(spec, config)
    if isinstance(spec, MemcgPressureSourceConfig):
        from .memcg_pressure import MemcgPressureSource

        return MemcgPressureSource(spec, config)
    if isinstance(spec, MemcgThresholdSourceConfig):
        from .memcg_threshold import MemcgThresholdSource

        return MemcgThresholdSource(spec, config)
    if isinstance(spec, MemoryEventsSourceConfig):
        from .memory_events import MemoryEventsSource

        return MemoryEventsSource(spec, config)
    raise TypeError(f"no source for {type(spec).__name__}")  # unreachable while the union is covered


def build_sources(config: Config) -> list[Source]:
    return [build_source(spec, config) for spec in config.sources]
