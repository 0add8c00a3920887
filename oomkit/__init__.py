"""oomkit: write your own out-of-memory handler as a few small plugins.

The public API is what this module exports, plus three modules plugin authors use directly:
``oomkit.procfs`` and ``oomkit.cgroupfs`` (reading the kernel's process and cgroup files the
way the first-party plugins do) and ``oomkit.testing`` (fake trees, a fake source, an engine
harness).  Everything else is private and may change.
"""

from .config import Config, ConfigError, load_config
from .engine import Engine, EngineNotRunning, Stats
from .errors import OomkitError, SourceError
from .events import (
    Candidate,
    Decision,
    Event,
    KillResult,
    Outcome,
    PluginError,
    Ranked,
    Scope,
    Veto,
    to_json,
)
from .plugins import PluginLoadError, hookimpl
from .sources.base import Emit, Source, SourceSettings

__version__ = "0.1.0.dev0"

__all__ = [
    "Candidate",
    "Config",
    "ConfigError",
    "Decision",
    "Emit",
    "Engine",
    "EngineNotRunning",
    "Event",
    "KillResult",
    "OomkitError",
    "Outcome",
    "PluginError",
    "PluginLoadError",
    "Ranked",
    "Scope",
    "Source",
    "SourceError",
    "SourceSettings",
    "Stats",
    "Veto",
    "hookimpl",
    "load_config",
    "to_json",
]
