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
    HookContext,
    KillResult,
    Outcome,
    Member,
    PluginError,
    Ranked,
    Rescue,
    Scope,
    Tier,
    Veto,
    to_json,
)
from .history import History, Samples
from .plugins import PluginLoadError, hookimpl
from .ranking import Ranking
from .rescuer import Rescuer
from .safety import Guard
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
    "Guard",
    "History",
    "HookContext",
    "KillResult",
    "Member",
    "OomkitError",
    "Outcome",
    "PluginError",
    "PluginLoadError",
    "Ranked",
    "Ranking",
    "Rescue",
    "Rescuer",
    "Samples",
    "Scope",
    "Source",
    "SourceError",
    "SourceSettings",
    "Stats",
    "Tier",
    "Veto",
    "hookimpl",
    "load_config",
    "to_json",
]
