"""Configuration: TOML decoded into frozen msgspec Structs.

Every error names the file and either the line (TOML syntax) or the key path (schema), and
what was expected.  Unknown keys are errors everywhere, including in plugin sections, which
each plugin decodes with its own Struct through :meth:`Config.plugin_settings`.

The defaults alone make a working configuration on any Linux machine: one ``meminfo``
source acting like earlyoom (MemAvailable and SwapFree both under 10 %).
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar

import msgspec

from .units import parse_size, parse_threshold

__all__ = [
    "Config",
    "ConfigError",
    "DaemonConfig",
    "EngineConfig",
    "MeminfoSourceConfig",
    "MemcgOomSourceConfig",
    "MemcgPressureSourceConfig",
    "MemcgThresholdSourceConfig",
    "MemoryEventsSourceConfig",
    "PsiSourceConfig",
    "PathsConfig",
    "PluginsConfig",
    "SharedPageSourceConfig",
    "SourceConfig",
    "config_from_dict",
    "load_config",
    "merge",
]

T = TypeVar("T")

DEFAULT_ORIGIN = "<defaults>"


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the file and where."""


class _Strict(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    pass


class EngineConfig(_Strict, frozen=True):
    """``[engine]``: how decisions are made, whatever the sources."""

    dry_run: bool = False
    """Run every stage, report the kill, send no signal."""
    cooldown_s: float = 5.0
    """After a kill, ignore further events for the same scope this long (never ``oom``
    events: a cgroup paused at its limit is always handled)."""
    queue_size: int = 1024
    """Events buffered between sources and the dispatcher; a full queue slows sources."""
    notify_queue_size: int = 256
    """Decisions buffered for notifiers; when full the newest is dropped and counted."""
    hook_timeout_s: float = 1.0
    """Deadline for each async hook implementation other than kills."""
    kill_timeout_s: float = 10.0
    """Deadline for each killer (it includes the grace period between SIGTERM and SIGKILL)."""
    recent_decisions: int = 100
    """How many decisions the engine keeps for status queries."""

    def __post_init__(self) -> None:
        for name in ("cooldown_s", "hook_timeout_s", "kill_timeout_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"`{name}` cannot be negative")
        for name in ("queue_size", "notify_queue_size", "recent_decisions"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be at least 1")


class DaemonConfig(_Strict, frozen=True):
    """``[daemon]``: settings of ``oomkit serve`` only (an embedding program ignores them)."""

    loop: Literal["auto", "asyncio", "uvloop", "trio"] = "auto"
    """``auto`` is uvloop when installed, else asyncio."""
    mlockall: bool = True
    """Lock the daemon's pages as they are touched (MCL_ONFAULT) so it is never paged out."""
    oom_score_adj: int = -1000
    """What the daemon sets for itself; without CAP_SYS_RESOURCE only raising works."""
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    """Lowest level logged to stderr."""

    def __post_init__(self) -> None:
        if not -1000 <= self.oom_score_adj <= 1000:
            raise ValueError("`oom_score_adj` must be between -1000 and 1000")


class PathsConfig(_Strict, frozen=True):
    """``[paths]``: where the kernel's files are.  Tests point these at fake trees."""

    proc: str = "/proc"
    """The proc filesystem."""
    memory_v1: str = ""
    """The cgroup v1 memory mount; empty means: find it in ``/proc/self/mounts``."""
    unified: str = ""
    """The cgroup v2 mount; empty means: find it in ``/proc/self/mounts``."""
    run_dir: str = "/run/oomkit"
    """Where lock files live: one per memcg taken over, so two oomkits never hold the same one."""


# --- sources --------------------------------------------------------------------------------


class _Source(_Strict, frozen=True, tag_field="kind", kw_only=True):
    name: str = ""
    """Unique name of this source; defaults to its kind."""

    @property
    def source_name(self) -> str:
        return self.name or str(type(self).__struct_config__.tag)


class MeminfoSourceConfig(_Source, frozen=True, tag="meminfo", kw_only=True):
    """Acts when MemAvailable and SwapFree are both low, as earlyoom does.

    A machine without swap counts as swap exhausted.  The poll interval adapts: after each
    reading the source sleeps for as long as the fastest plausible allocation would need to
    close the distance to the thresholds,
    ``(MemAvailable - mem threshold + SwapFree - swap threshold) / fill_rate_per_s``
    (distances below 0 count as 0), clamped to ``[interval_min_s, interval_max_s]``.  So it
    polls every ``interval_min_s`` near the thresholds (and while under them) and every
    ``interval_max_s`` far from them.
    """

    mem_available: str | int = "10%"
    """Threshold on MemAvailable: a percentage of MemTotal or a size (``"512M"``)."""
    swap_free: str | int = "10%"
    """Threshold on SwapFree: a percentage of SwapTotal or a size."""
    interval_min_s: float = 0.01
    """The shortest wait between two readings (near or under the thresholds).  A reading
    costs 0.02 to 0.25 ms of CPU (warm to cold caches), so polling this often only while
    close to the threshold is cheap; at 1 GiB/s a poll every 10 ms lets at most about 10 MiB
    through before it sees the crossing (earlyoom and nohang wait at least 100 ms)."""
    interval_max_s: float = 3.0
    """The longest wait between two readings (far from the thresholds).  The fill-rate bound
    already wakes the source before the assumed worst case could close the distance; this
    cap (nohang's default too; earlyoom's is 1 s) only bounds the sleep on machines far
    from their thresholds, where each wake-up is pure idle cost."""
    fill_rate_per_s: str | int = "6G"
    """The worst-case allocation rate assumed, as a size per second (earlyoom assumes
    6 GiB/s; freshly touched memory on a VM is often far slower, recently freed memory
    faster)."""

    def __post_init__(self) -> None:
        parse_threshold(self.mem_available)
        parse_threshold(self.swap_free)
        if not 0 < self.interval_min_s <= self.interval_max_s:
            raise ValueError("need 0 < `interval_min_s` <= `interval_max_s`")
        if parse_size(self.fill_rate_per_s) <= 0:
            raise ValueError("`fill_rate_per_s` must be positive")


class MemcgOomSourceConfig(_Source, frozen=True, tag="memcg-oom", kw_only=True):
    """Takes over the OOM decision of cgroup v1 memory cgroups (``oom_kill_disable=1``).

    ``cgroups`` are absolute cgroupfs paths or paths relative to the v1 memory mount.
    With ``takeover = false`` the source only watches them and reports the kernel's kills.
    """

    cgroups: tuple[str, ...]
    """The memcgs: absolute cgroupfs paths or paths relative to the v1 memory mount."""
    takeover: bool = True
    """Set ``oom_kill_disable=1`` and decide; false only reports the kernel's own kills."""
    deadline_s: float = 1.0
    """If no kill resolved an OOM by then, hand it back to the kernel's own killer."""
    poll_interval_s: float = 0.02
    """How often ``under_oom`` is re-read while a cgroup is out of memory: the kernel signals
    the start of an OOM but not its end."""
    idle_poll_s: float = 1.0
    """How often the ``oom_kill`` counter is read when nothing is signalled: a global OOM
    that kills inside the cgroup notifies nobody."""

    def __post_init__(self) -> None:
        if not self.cgroups:
            raise ValueError("`cgroups` needs at least one cgroup")
        for name in ("deadline_s", "poll_interval_s", "idle_poll_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"`{name}` must be positive")
        if self.poll_interval_s > self.deadline_s:
            raise ValueError("`poll_interval_s` cannot be longer than `deadline_s`")


class SharedPageSourceConfig(_Source, frozen=True, tag="shared-page", kw_only=True):
    """Reads OOM events that other processes write into shared-page rings
    (``docs/shared-page.md``).

    ``directory`` holds one ring per producer (``*.ring``) and the doorbell socket; it is
    created with ``directory_mode`` when missing.  Rings owned by root or by the daemon's
    own user are trusted, and those owned by ``allowed_uids``; a ring writable by others,
    or by a group not in ``allowed_gids``, is refused, and so is a directory that someone
    else could write into without the sticky bit.
    """

    directory: str
    """Where producers' rings (``*.ring``) and the doorbell socket live."""
    directory_mode: int = 0o755
    """Mode of the directory when the source creates it (TOML: ``0o755``)."""
    doorbell: bool = True
    """Bind ``DIRECTORY/doorbell`` so publishers can wake the reader at once; without it
    only the slow poll finds new records."""
    doorbell_mode: int = 0o660
    """Mode of the doorbell socket: who may ring it."""
    poll_interval_s: float = 1.0
    """The slow poll: how often rings are read, and the directory rescanned, with no ring."""
    max_age_s: float = 10.0
    """Records older than this when read are skipped (counted as stale), not acted on."""
    max_ring_bytes: int = 16 << 20
    """A ring larger than this is refused rather than mapped."""
    allowed_uids: tuple[int, ...] = ()
    """Users besides root and the daemon's own whose rings are trusted."""
    allowed_gids: tuple[int, ...] = ()
    """Groups that may have write access to a trusted ring."""
    log_interval_s: float = 10.0
    """At most one log line per ring and kind of trouble this often; counts go on."""

    def __post_init__(self) -> None:
        if not self.directory.startswith("/"):
            raise ValueError("`directory` must be an absolute path")
        for name in ("directory_mode", "doorbell_mode"):
            if not 0 <= getattr(self, name) <= 0o7777:
                raise ValueError(f"`{name}` must be a file mode (0 to 0o7777)")
        for name in ("poll_interval_s", "max_age_s", "log_interval_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"`{name}` must be positive")
        if self.max_ring_bytes < 4096:
            raise ValueError("`max_ring_bytes` must be at least 4096")



class PsiSourceConfig(_Source, frozen=True, tag="psi", kw_only=True):
    """PSI triggers on ``/proc/pressure/memory`` or on v2 cgroups' ``memory.pressure``.

    Emits ``pressure`` each time the kernel reports more than ``stall_ms`` of ``line``
    stall within ``window_s`` (at most once per window), and ``pressure-cleared`` once two
    windows pass without a report.  ``cgroups`` are v2 paths or glob patterns followed as
    cgroups come and go; empty means the whole system.  Where the kernel refuses a trigger
    the source falls back: a window rounded up to 2 s multiples (needed without
    CAP_SYS_RESOURCE), the v2 root's ``memory.pressure`` for the system, and last polling
    the file every ``poll_interval_s``.
    """

    cgroups: tuple[str, ...] = ()
    """v2 cgroup paths or glob patterns; empty watches the whole system."""
    line: Literal["some", "full"] = "some"
    """Which PSI line: ``some`` (at least one task stalled) or ``full`` (all stalled)."""
    stall_ms: float = 100.0
    """Stall time within a window that fires the trigger."""
    window_s: float = 2.0
    """The trigger's window (0.5 to 10 s; rounded up to 2 s multiples when unprivileged)."""
    poll_interval_s: float = 1.0
    """How often the file is read when no trigger can be armed (the last fallback)."""

    def __post_init__(self) -> None:
        # The kernel's own limits for a trigger (kernel/sched/psi.c).
        if not 0.5 <= self.window_s <= 10.0:
            raise ValueError("`window_s` must be between 0.5 and 10 seconds")
        if not 0 < self.stall_ms <= self.window_s * 1000:
            raise ValueError("`stall_ms` must be positive and at most the window")
        if self.poll_interval_s <= 0:
            raise ValueError("`poll_interval_s` must be positive")


PressureLevel = Literal["low", "medium", "critical"]


class MemcgPressureSourceConfig(_Source, frozen=True, tag="memcg-pressure", kw_only=True):
    """cgroup v1 ``memory.pressure_level`` notifications.

    The kernel can send thousands a second under page-cache thrashing; this source emits at
    most one ``pressure`` event per scope per ``min_interval_s`` (the kernel's counters add
    up meanwhile and are reported in the event), and ``pressure-cleared`` after
    ``clear_after_s`` without a notification.  ``cgroups`` are v1 memcg paths or globs.
    """

    cgroups: tuple[str, ...]
    """v1 memcg paths or glob patterns."""
    levels: tuple[PressureLevel, ...] = ("medium", "critical")
    """Which levels to register, one eventfd each."""
    mode: Literal["default", "hierarchy", "local"] = "default"
    """The kernel's propagation mode for notifications from descendant memcgs."""
    min_interval_s: float = 1.0
    """At most one ``pressure`` event per scope this often, whatever the storm."""
    clear_after_s: float = 5.0
    """``pressure-cleared`` after this long without a notification."""

    def __post_init__(self) -> None:
        if not self.cgroups:
            raise ValueError("`cgroups` needs at least one cgroup")
        if not self.levels or len(set(self.levels)) != len(self.levels):
            raise ValueError("`levels` needs one or more distinct levels")
        if self.min_interval_s < 0:
            raise ValueError("`min_interval_s` cannot be negative")
        if self.clear_after_s <= self.min_interval_s:
            raise ValueError("`clear_after_s` must be longer than `min_interval_s`")


class MemcgThresholdSourceConfig(_Source, frozen=True, tag="memcg-threshold", kw_only=True):
    """cgroup v1 usage thresholds: a ``threshold`` event each time usage crosses one,
    upwards (``direction`` 1) or back down (``direction`` -1).

    ``thresholds`` are sizes (``"900M"``) or percentages of the memcg's limit (``"90%"``).
    """

    cgroups: tuple[str, ...]
    """v1 memcg paths or glob patterns."""
    thresholds: tuple[str | int, ...]
    """Sizes or percentages of the memcg's limit; each fires on every crossing."""
    file: Literal["memory.usage_in_bytes", "memory.memsw.usage_in_bytes"] = "memory.usage_in_bytes"
    """Memory alone, or memory plus swap."""

    def __post_init__(self) -> None:
        if not self.cgroups:
            raise ValueError("`cgroups` needs at least one cgroup")
        if not self.thresholds:
            raise ValueError("`thresholds` needs at least one threshold")
        for t in self.thresholds:
            parse_threshold(t)


class MemoryEventsSourceConfig(_Source, frozen=True, tag="memory-events", kw_only=True):
    """cgroup v2 ``memory.events`` (or ``memory.events.local``) counters, watched with inotify.

    Emits ``memory-events`` with each changed counter's increase, and ``kernel-kill`` when
    ``oom_kill`` grew.  ``cgroups`` are v2 paths or globs.
    """

    cgroups: tuple[str, ...]
    """v2 cgroup paths or glob patterns."""
    local: bool = False
    """Watch ``memory.events.local`` (this cgroup only) instead of ``memory.events``."""

    def __post_init__(self) -> None:
        if not self.cgroups:
            raise ValueError("`cgroups` needs at least one cgroup")


SourceConfig = (
    MeminfoSourceConfig
    | MemcgOomSourceConfig
    | SharedPageSourceConfig
    | PsiSourceConfig
    | MemcgPressureSourceConfig
    | MemcgThresholdSourceConfig
    | MemoryEventsSourceConfig
)


# --- plugins --------------------------------------------------------------------------------


class PluginsConfig(_Strict, frozen=True):
    """``[plugins]``: which plugins load, which are disabled, and each one's own table.

    ``load`` adds plugins by ``module:object`` (or a module); ``disable`` names plugins
    (entry-point names, or the ``load`` strings) that must not be registered; every other
    key is a ``[plugins.<name>]`` table for that plugin.
    """

    load: tuple[str, ...] = ()
    """Plugins to load beside the entry-point group: ``"module:object"`` or ``"module"``."""
    disable: tuple[str, ...] = ()
    """Plugins that must not be registered, by name; a name that matches nothing is an error."""
    settings: dict[str, dict[str, Any]] = msgspec.field(default_factory=dict)


_PLUGINS_RESERVED = frozenset({"load", "disable"})


class Config(_Strict, frozen=True):
    """The whole configuration.  ``origin`` is the file it came from (not a TOML key)."""

    engine: EngineConfig = EngineConfig()
    daemon: DaemonConfig = DaemonConfig()
    paths: PathsConfig = PathsConfig()
    sources: tuple[SourceConfig, ...] = (MeminfoSourceConfig(),)
    weights: dict[str, float] = msgspec.field(default_factory=dict)
    """Scorer weights by plugin name (default 1.0 each)."""
    plugins: PluginsConfig = PluginsConfig()
    origin: str = DEFAULT_ORIGIN

    def __post_init__(self) -> None:
        names = [s.source_name for s in self.sources]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"source names must be unique; repeated: {', '.join(dupes)}")

    def plugin_settings(self, name: str, type_: type[T]) -> T:
        """Decode ``[plugins.<name>]`` (empty when absent) with ``type_``.

        Raises :class:`ConfigError` naming the file and the key path.
        """
        raw = self.plugins.settings.get(name, {})
        try:
            return msgspec.convert(raw, type_)
        except msgspec.ValidationError as exc:
            raise ConfigError(
                f"{self.origin}: {_relocate(str(exc), f'$.plugins.{name}')}"
            ) from None


def _relocate(message: str, prefix: str) -> str:
    # msgspec paths start at `$`; a plugin's table sits at `$.plugins.<name>` in the file.
    return message.replace("`$", f"`{prefix}", 1) if "`$" in message else f"{message} - at `{prefix}`"


def _split_plugins(raw: Mapping[str, Any], origin: str) -> dict[str, Any]:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{origin}: Expected `table`, got `{type(raw).__name__}` - at `$.plugins`")
    out: dict[str, Any] = {k: raw[k] for k in _PLUGINS_RESERVED if k in raw}
    settings: dict[str, Any] = {}
    for key, value in raw.items():
        if key in _PLUGINS_RESERVED:
            continue
        if not isinstance(value, Mapping):
            raise ConfigError(
                f"{origin}: Expected `table` for plugin settings, got `{type(value).__name__}`"
                f" - at `$.plugins.{key}`"
            )
        settings[key] = dict(value)
    out["settings"] = settings
    return out


def config_from_dict(raw: Mapping[str, Any], origin: str = DEFAULT_ORIGIN) -> Config:
    """Decode an already-parsed TOML document (a dict) into a :class:`Config`."""
    data = dict(raw)
    if "origin" in data:
        raise ConfigError(f"{origin}: Object contains unknown field `origin`")
    if "plugins" in data:
        data["plugins"] = _split_plugins(data["plugins"], origin)
    data["origin"] = origin
    try:
        return msgspec.convert(data, Config)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{origin}: {exc}") from None


def load_config(path: str | Path | None, overrides: Mapping[str, Any] | None = None) -> Config:
    """Read ``path`` (or the defaults when None), apply ``overrides``, and validate.

    ``overrides`` is merged into the document before validation, so a command-line flag is
    checked exactly like the same key in the file.
    """
    origin = DEFAULT_ORIGIN
    raw: dict[str, Any] = {}
    if path is not None:
        origin = str(path)
        try:
            with open(path, "rb") as f:
                raw = tomllib.load(f)
        except FileNotFoundError:
            raise ConfigError(f"{origin}: no such file") from None
        except IsADirectoryError:
            raise ConfigError(f"{origin}: is a directory, not a TOML file") from None
        except PermissionError:
            raise ConfigError(f"{origin}: permission denied") from None
        except tomllib.TOMLDecodeError as exc:
            # tomllib (3.11) gives the line only inside its message: "... (at line 3, column 7)"
            raise ConfigError(f"{origin}: invalid TOML: {exc}") from None
    if overrides:
        raw = merge(raw, overrides)
    return config_from_dict(raw, origin)


def merge(base: Mapping[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    """Deep-merge ``extra`` into a copy of ``base``: tables merge, everything else replaces."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out
