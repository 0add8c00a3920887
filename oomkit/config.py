"""Configuration: TOML decoded into frozen msgspec Structs.

Every error names the file and either the line (TOML syntax) or the key path (schema), and
what was expected.  Unknown keys are errors everywhere, including in plugin sections, which
each plugin decodes with its own Struct through :meth:`Config.plugin_settings`.

Each ``[[sources]]`` table is decoded by the settings Struct of its ``kind``, which the
source's own module declares and the ``oomkit.sources`` entry-point group registers
(:mod:`oomkit.sources.registry`); this module holds the other sections.

The defaults alone make a working configuration on any Linux machine: one ``meminfo``
source acting like earlyoom (MemAvailable and SwapFree both under 10 %).
"""

from __future__ import annotations

import json
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import msgspec

from .errors import OomkitError
from .sources.base import SourceSettings
from .sources.registry import SourceKindError, default_registry
from .units import Duration, Interval

__all__ = [
    "Config",
    "ConfigError",
    "ControlConfig",
    "DaemonConfig",
    "EngineConfig",
    "HistoryConfig",
    "MetricsConfig",
    "PathsConfig",
    "PluginsConfig",
    "config_from_dict",
    "validate",
    "load_config",
    "merge",
]

T = TypeVar("T")

Weight = Annotated[float, msgspec.Meta(ge=0.0, le=1000.0)]
"""A scorer's weight: 0 (its opinion left out) to 1000."""

DEFAULT_ORIGIN = "<defaults>"


class ConfigError(OomkitError, ValueError):
    """A configuration that cannot be used; the message names the file and where."""


class _Strict(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    pass


class EngineConfig(_Strict, frozen=True):
    """``[engine]``: how decisions are made, whatever the sources."""

    dry_run: bool = False
    """Run every stage, report the kill, send no signal."""
    cooldown_s: Duration = 5.0
    """After a kill (outcome ``killed`` or ``exited``), ignore further events for the same
    scope this long (never ``oom`` events: a cgroup paused at its limit is always handled)."""
    holdoff_s: Duration = 1.0
    """After a decision that ended nothing (dry-run, all-vetoed, failed, condition-cleared,
    no candidates), ignore further events for the same scope this long, doubled after each
    such decision in a row up to ``holdoff_max_s``: a shortage nobody can end costs a few
    rankings, not one per event (never ``oom`` events).  A ``rescued`` decision holds
    nothing off: the next crossing is decided at once."""
    holdoff_max_s: Duration = 30.0
    """The longest hold-off ``holdoff_s`` grows to; a quiet spell as long as this (or a
    kill, or a rescue) starts the doubling again from ``holdoff_s``."""
    queue_size: Annotated[int, msgspec.Meta(ge=1, le=1 << 20)] = 1024
    """Events buffered between sources and the dispatcher; a full queue slows sources."""
    notify_queue_size: Annotated[int, msgspec.Meta(ge=1, le=1 << 20)] = 256
    """Decisions buffered for notifiers; when full the newest is dropped and counted."""
    hook_timeout_s: Interval = 1.0
    """Deadline for each async hook implementation other than kills and rescues (it is
    cancelled then)."""
    sync_hook_timeout_s: Interval = 10.0
    """Deadline for each sync hook implementation (they run in worker threads,
    ``hook_threads``): past it the call is given up, its thread left stuck and written off,
    one line logged, and the implementation skipped (as if it had failed: a veto then
    protects everyone) until that call returns.  Generous, because a candidates hook over
    ten thousand processes on a loaded machine takes seconds; a takeover's watchdog hands a
    memcg back at its own deadline meanwhile."""
    hook_threads: Annotated[int, msgspec.Meta(ge=1, le=64)] = 4
    """Worker threads that run sync hooks (candidates, score, tier, veto, group,
    should_act) off the event loop, stuck ones included: with all of them stuck in plugins,
    decisions fail (and hand a takeover back) instead of waiting."""
    urgent_switch_interval_s: Annotated[float, msgspec.Meta(ge=0.0, le=0.1)] = 0.0001
    """While a takeover's decision is in flight (an ``oom`` event: the kernel holds the
    scope's tasks paused until oomkit acts), the interpreter's thread switch interval is
    lowered to this, and put back when the last such decision ends (:mod:`oomkit.urgency`):
    each time the decision's path gives the GIL up (every file read, the hand-over to a hook
    thread, the signal) it gets it back within this, not within ``[daemon]
    switch_interval_s``, behind a ranking in another thread.  0 leaves the interval alone
    (it is process-wide: an embedding program may want that)."""
    urgent_park_s: Annotated[float, msgspec.Meta(ge=0.0, le=10.0)] = 0.5
    """While a takeover's decision is in flight, hook threads working for other decisions
    (and the history sampler's thread) wait at their next checkpoint (before each sync hook
    implementation, in the engine's loops over candidates, wherever a plugin calls
    ``oomkit.urgency.checkpoint()``) until it ends, each at most this long per spell of
    takeovers, so a storm of them slows a ranking but never starves it.  0: nobody waits."""
    urgent_realtime_priority: Annotated[int, msgspec.Meta(ge=0, le=99)] = 1
    """While a takeover's decision is in flight, the threads running it (the event loop's:
    the source's wake-up, the decision, the kill) are scheduled ``SCHED_FIFO`` at this
    priority, and put back when it ends (:mod:`oomkit.urgency`): runnable, they run before
    every ordinary thread on the machine, the daemon's own ranking threads included, instead
    of waiting for a CPU.  1, the lowest real-time priority, is above every ordinary thread
    and below the kernel's own real-time threads.  Needs ``CAP_SYS_NICE`` or an
    ``RLIMIT_RTPRIO`` at least this high (systemd ``LimitRTPRIO=``); refused, it is counted
    (``urgent_realtime_refused``), logged once, and the decision goes on.  The kernel's
    real-time throttling (``kernel.sched_rt_runtime_us``, 95 % by default) leaves the rest of
    the machine its share even if a loop-safe plugin spins.  0: never real-time."""
    urgent_on_loop: bool = True
    """A takeover's decision calls the sync hooks (should_act, candidates, score, tier, veto,
    group) on the event loop itself, with no hook thread, when every plugin implementing
    one of them says it is safe there (an attribute ``loop_safe`` that is true: every
    first-party plugin does).  Each hand-over to a hook thread and back waits for the GIL
    behind whatever ranking runs in another thread; on the loop there is none (``python -m
    bench loop_stall``).  Such a call has no ``sync_hook_timeout_s``: a loop-safe plugin that
    hung would hold the loop (the watchdog still hands the memcg back at its deadline).
    false: always in hook threads."""
    urgent_on_loop_max_candidates: Annotated[int, msgspec.Meta(ge=0, le=1_000_000)] = 256
    """``urgent_on_loop`` only for a scope whose last ranking (a decision's, or the warm-up's
    at start) offered at most this many candidates, and a unit's descent or group of at most
    this many: a ranking on the loop holds everything else the loop does, the sources and
    the other scopes, for its whole length (~30 µs a process here).  A scope not ranked yet
    goes to hook threads."""
    kill_timeout_s: Interval = 10.0
    """Deadline for each killer (it includes the grace period between SIGTERM and SIGKILL)."""
    warm_up: bool = True
    """At start, offer each watched scope's candidates once (a preview, in a hook thread,
    while the sources already run; the first 64 scopes, as many as the first-party plugin
    keeps tables for): a candidates plugin that keeps what it read (the first-party one
    holds every process's ``stat`` open) then makes the first decision's ranking warm, not
    the cold read of every process (bench: ``selection``).  A warm-up given up (a hook
    thread stuck) is logged and leaves the engine running."""
    kill_confirm_s: Interval = 5.0
    """How long after a kill the engine waits for every process the killer says it signalled
    to be gone (exited, a zombie, or its pid taken by a new process); one still running then
    is logged with the killer's name and counted (``kills_unconfirmed``): a killer's word is
    checked, not believed.  Nothing else changes (the scope's cooldown stands: a process
    that dies slowly is not a reason to kill a second one)."""
    rescue_timeout_s: Interval = 0.5
    """Deadline for each rescuer (``oomkit_rescue``) before a kill; passing it counts as a
    failed rescue, and the next rescuer, or the kill, follows."""
    rescue_budget_s: Interval = 1.0
    """The whole rescue stage of one decision: once spent, the kill goes ahead.  Keep it
    well under a takeover's deadline (``memcg-oom`` ``deadline_s``, the brake's), or the
    kernel decides first."""
    recent_decisions: Annotated[int, msgspec.Meta(ge=1, le=1 << 16)] = 100
    """How many decisions the engine keeps for status queries, at most (``recent_bytes``
    bounds them too)."""
    recent_bytes: Annotated[int, msgspec.Meta(ge=1 << 16, le=1 << 30)] = 4 << 20
    """The decisions kept for status queries take at most this many bytes (counted as their
    JSON); the oldest go first, the newest is always kept."""
    record_ranking: Annotated[int, msgspec.Meta(ge=1, le=1 << 16)] = 20
    """How many of the ranked candidates a decision record keeps, best first, each with
    every scorer's score (enough for ``oomkit explain``); ``Decision.ranked`` says how many
    there were.  A system scope ranks every process of the machine."""
    policy: Literal["default", "kernel"] = "default"
    """How candidates are ranked (the tiers and the scale are documented with the score
    hook in :mod:`oomkit.hookspecs`): ``default`` is tiers (expendable, normal, critical),
    then the weighted scores, then ``tiebreak``; ``kernel`` ranks by the ``tiebreak``
    scorer alone, ignoring tiers, weights and groups: with ``kernel_badness``, exactly the
    victim the kernel's own OOM killer would choose."""
    tiebreak: str = "kernel_badness"
    """The scorer whose raw score breaks ties of the weighted sum (and ranks alone under
    ``policy = "kernel"``); empty: ties go to the larger RSS."""
    max_group: Annotated[int, msgspec.Meta(ge=0, le=4096)] = 64
    """At most this many candidates die together with a victim (``oomkit_group``: a fork
    burst); 0 turns group kills off."""
    on_source_failure: Literal["exit", "continue"] = "exit"
    """What a source dying after start does: ``exit`` stops the engine with that source's
    error (``oomkit serve`` exits with status 1 and one line saying why), ``continue`` logs
    it and runs on with the other sources, counted in the engine's stats.  A configured
    cgroup that vanishes is not a failure: the sources wait for it to come back."""

    def __post_init__(self) -> None:
        if self.holdoff_max_s < self.holdoff_s:
            raise ValueError("`holdoff_max_s` cannot be shorter than `holdoff_s`")


class DaemonConfig(_Strict, frozen=True):
    """``[daemon]``: settings of ``oomkit serve`` only (an embedding program ignores them)."""

    loop: Literal["auto", "asyncio", "uvloop", "trio"] = "auto"
    """``auto`` is uvloop when installed, else asyncio."""
    mlockall: bool = True
    """Lock the daemon's pages as they are touched (MCL_ONFAULT) so it is never paged out."""
    oom_score_adj: Annotated[int, msgspec.Meta(ge=-1000, le=1000)] = -1000
    """What the daemon sets for itself (the kernel's range); without CAP_SYS_RESOURCE only
    raising works."""
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    """Lowest level logged to stderr."""
    switch_interval_s: Annotated[float, msgspec.Meta(ge=0.0001, le=0.1)] = 0.001
    """The interpreter's thread switch interval (``sys.setswitchinterval``): how long the
    event loop may wait for the GIL while a hook worker thread ranks a big scope, so a part
    of a paused memcg's wake-to-kill time (Python's default is 5 ms; ``python -m bench
    loop_stall`` measures both)."""
    shutdown_timeout_s: Interval = 5.0
    """After SIGTERM or SIGINT, how long the daemon waits for its sources to restore what
    they changed and for plugins to stop; past it (an async plugin that shields itself from
    cancellation) it logs what is still running and exits with status 3 at once (a
    takeover's watchdog then restores the memcgs)."""


class PathsConfig(_Strict, frozen=True):
    """``[paths]``: where the kernel's files are.  Tests point these at fake trees."""

    proc: str = "/proc"
    """The proc filesystem."""
    memory_v1: str = ""
    """The cgroup v1 memory mount; empty means: find it in ``/proc/self/mounts``."""
    unified: str = ""
    """The cgroup v2 mount; empty means: find it in ``/proc/self/mounts``."""
    run_dir: str = "/run/oomkit"
    """Where the takeover journal lives (``RUN_DIR/journal``): each cgroup value oomkit
    changes, with its original, written before the change, for ``oomkit restore``."""

    def __post_init__(self) -> None:
        # Built in code (tests, embedding programs), a field may be a Path: keep strings.
        for name in ("proc", "memory_v1", "unified", "run_dir"):
            value = getattr(self, name)
            if not isinstance(value, str):
                msgspec.structs.force_setattr(self, name, os.fspath(value))


class HistoryConfig(_Strict, frozen=True):
    """``[history]``: the per-process memory history that scorers read (:mod:`oomkit.history`).

    At a takeover OOM the scope's tasks are already paused, so who was growing must have been
    seen before.  The sampler reads each process's ``stat`` (one small read: its resident
    size and start time) in the scopes the sources watch, every ``interval_s``, and keeps
    the last ``window_s`` of it.  A scope is sampled only while it is *warm* (usage at or
    above ``warm_fraction`` of its limit, ``system_warm_fraction`` of RAM for the system
    scope, or an event for it in the last ``warm_hold_s``) or, with ``small_scopes``, while
    a cgroup has at most ``small_scope_processes`` processes; any other scope costs its
    usage and limit reads (and a cgroup's process list) per tick and nothing more.
    """

    enabled: bool = True
    """Sample at all.  Off: scorers that need a history (``growth``) see none and score 0."""
    interval_s: Annotated[float, msgspec.Meta(ge=0.05, le=60.0)] = 0.25
    """Time between two samples of a process."""
    window_s: Annotated[float, msgspec.Meta(ge=0.5, le=3600.0)] = 8.0
    """How much history is kept: a process younger than this counts from its start."""
    warm_fraction: Annotated[float, msgspec.Meta(ge=0.0, le=1.0)] = 0.5
    """A cgroup whose usage reaches this share of its limit is sampled (0: always)."""
    system_warm_fraction: Annotated[float, msgspec.Meta(ge=0.0, le=1.0)] = 0.8
    """The system scope (which a ``meminfo`` source watches) is sampled while this share of
    RAM is in use (MemAvailable under the rest): most machines run above half all day, and
    every process of the machine is sampled then."""
    warm_hold_s: Duration = 30.0
    """An event for a scope (pressure, threshold, low memory, OOM) keeps it sampled this long."""
    small_scopes: bool = True
    """Sample cgroups with few processes all the time, warm or not."""
    small_scope_processes: Annotated[int, msgspec.Meta(ge=1, le=4096)] = 32
    """What "few" means for ``small_scopes``."""
    max_processes: Annotated[int, msgspec.Meta(ge=1, le=1 << 16)] = 4096
    """At most this many processes are tracked per scope (about 0.6 KiB each at the
    defaults); the rest of a bigger scope goes unsampled and is counted."""
    open_files: Annotated[int, msgspec.Meta(ge=0, le=1 << 16)] = 256
    """Processes whose ``stat`` file stays open between ticks (one ``pread`` a sample
    instead of open, read and close: less than half the CPU); they count against the
    daemon's open-file limit.  0: none."""
    tick_budget: Annotated[int, msgspec.Meta(ge=1, le=1 << 16)] = 256
    """At most this many processes are read per tick, over all scopes; a bigger set is
    sampled round-robin over several ticks, so one tick's work stays bounded (about 3 ms at
    the default, 7 to 13 us a process here: on the loop, an OOM's wake waits at most that)."""
    thread: bool = False
    """Sample in a worker thread instead of on the event loop (``bench history``
    measures which hurts the OOM path less)."""


class ControlConfig(_Strict, frozen=True):
    """``[control]``: the daemon's control socket (``oomkit status``, ``events``, ``reload``).

    A Unix socket that answers one JSON request per line (the protocol: docs/operations.md).
    Every peer's credentials are checked (``SO_PEERCRED``): root and the daemon's own uid
    are always let in, ``allow_uids`` and ``allow_gids`` add others; the file mode is a
    first fence, not the only one.
    """

    enabled: bool = True
    """Serve the control socket (``oomkit serve`` only)."""
    path: str = ""
    """The socket's path; empty means ``control.sock`` in ``[paths] run_dir``."""
    mode: Annotated[int, msgspec.Meta(ge=0, le=0o777)] = 0o600
    """The socket file's permissions (TOML takes ``0o660``); others cannot even connect."""
    allow_uids: tuple[Annotated[int, msgspec.Meta(ge=0, le=0xFFFFFFFE)], ...] = ()
    """Further users allowed to ask (root and the daemon's own uid always are)."""
    allow_gids: tuple[Annotated[int, msgspec.Meta(ge=0, le=0xFFFFFFFE)], ...] = ()
    """Groups whose members (by the peer's primary gid) are allowed to ask."""
    max_clients: Annotated[int, msgspec.Meta(ge=1, le=256)] = 8
    """Connections served at once; more are answered with an error and closed."""
    max_request_bytes: Annotated[int, msgspec.Meta(ge=256, le=1 << 20)] = 65536
    """Longest request line; a longer one is refused."""
    client_timeout_s: Interval = 10.0
    """A client that does not send its request, or does not read an answer, within this
    is disconnected."""
    follow_buffer: Annotated[int, msgspec.Meta(ge=1, le=4096)] = 64
    """Decisions queued for each ``events --follow`` client; a slower client loses the
    newest ones and is told how many."""


class MetricsConfig(_Strict, frozen=True):
    """``[metrics]``: Prometheus metrics (needs ``pip install oomkit[metrics]``).

    Served over HTTP on ``listen``, or written to ``textfile`` for node_exporter's textfile
    collector, or both; neither is on by default.
    """

    listen: str = ""
    """``HOST:PORT`` to serve ``/metrics`` on (``127.0.0.1:9465``, ``[::1]:9465``; port 0 picks a free
    one, logged); empty: off."""
    textfile: str = ""
    """A ``.prom`` file to rewrite (atomically, mode 0644) every ``textfile_interval_s``; empty: off."""
    textfile_interval_s: Annotated[float, msgspec.Meta(ge=1.0, le=3600.0)] = 15.0
    """How often the textfile is rewritten."""

    def __post_init__(self) -> None:
        if self.listen:
            host, sep, port = self.listen.rpartition(":")
            if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
                raise ValueError(f"`listen` must be HOST:PORT, got {self.listen!r}")
        if self.textfile and not self.textfile.endswith(".prom"):
            raise ValueError(f"`textfile` must end in .prom (node_exporter reads only those), got {self.textfile!r}")


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


def _default_sources() -> tuple[SourceSettings, ...]:
    # Imported when first needed: the source modules import this one.
    from .sources.meminfo import MeminfoSourceConfig

    return (MeminfoSourceConfig(),)


class Config(_Strict, frozen=True):
    """The whole configuration.  ``origin`` is the file it came from (not a TOML key)."""

    engine: EngineConfig = EngineConfig()
    daemon: DaemonConfig = DaemonConfig()
    paths: PathsConfig = PathsConfig()
    history: HistoryConfig = HistoryConfig()
    control: ControlConfig = ControlConfig()
    metrics: MetricsConfig = MetricsConfig()
    sources: tuple[SourceSettings, ...] = msgspec.field(default_factory=_default_sources)
    weights: dict[str, Weight] = msgspec.field(default_factory=dict)
    """Scorer weights by plugin name (default 1.0 each); 0 leaves a scorer's opinion out."""
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


def _check_weights(weights: Mapping[Any, Any], origin: str) -> None:
    # msgspec locates a bad dict value as `$.weights[...]`; the operator wants the key.
    for key, value in weights.items():
        try:
            msgspec.convert(value, Weight)
        except msgspec.ValidationError as exc:
            where = f"$.weights.{key}" if str(key).isidentifier() else f"$.weights[{json.dumps(str(key))}]"
            raise ConfigError(f"{origin}: {_relocate(str(exc), where)}") from None


def _decode_source(table: dict[str, Any], at: str) -> SourceSettings:
    """One ``[[sources]]`` table, by its kind's Struct; errors say ``- at `<at>...```."""
    if "kind" not in table:
        raise ValueError(f"Object missing required field `kind` - at `{at}`")
    try:
        kind = msgspec.convert(table["kind"], str)
    except msgspec.ValidationError as exc:
        raise ValueError(_relocate(str(exc), f"{at}.kind")) from None
    try:
        settings_type = default_registry().resolve(kind).settings_type
    except SourceKindError as exc:
        raise ValueError(f"{exc} - at `{at}.kind`") from None
    # The kind chose the Struct; its tag may differ from a `module:Class` kind, so the
    # Struct decodes the rest of the table.
    body = {key: value for key, value in table.items() if key != "kind"}
    try:
        return msgspec.convert(body, settings_type)
    except msgspec.ValidationError as exc:
        raise ValueError(_relocate(str(exc), at)) from None


def _decode_sources(raw: Any) -> tuple[SourceSettings, ...]:
    try:
        tables = msgspec.convert(raw, tuple[dict[str, Any], ...])
    except msgspec.ValidationError as exc:
        raise ValueError(_relocate(str(exc), "$.sources")) from None
    return tuple(_decode_source(table, f"$.sources[{i}]") for i, table in enumerate(tables))


def validate(config: Config) -> Config:
    """Check a :class:`Config` built in Python as a decoded file is checked, and return it.

    msgspec enforces ``Meta`` bounds only while decoding, so ``EngineConfig(cooldown_s=nan)``
    would otherwise reach the engine.  Each section and source is encoded and decoded again
    by its own Struct; errors name the key path as for a file.
    """
    origin = config.origin
    try:
        for section in ("engine", "daemon", "paths", "plugins"):
            value = getattr(config, section)
            _redecode(value, f"$.{section}")
        for i, settings in enumerate(config.sources):
            _redecode(settings, f"$.sources[{i}]")
    except ValueError as exc:
        raise ConfigError(f"{origin}: {exc}") from None
    _check_weights(config.weights, origin)
    return config


def _redecode(value: msgspec.Struct, at: str) -> None:
    try:
        msgspec.convert(msgspec.to_builtins(value), type(value))
    except msgspec.ValidationError as exc:
        raise ValueError(_relocate(str(exc), at)) from None


def config_from_dict(raw: Mapping[str, Any], origin: str = DEFAULT_ORIGIN) -> Config:
    """Decode an already-parsed TOML document (a dict) into a :class:`Config`.

    Each ``[[sources]]`` table imports the module of its kind only.
    """
    data = dict(raw)
    if "origin" in data:
        raise ConfigError(f"{origin}: Object contains unknown field `origin`")
    if "plugins" in data:
        data["plugins"] = _split_plugins(data["plugins"], origin)
    data["origin"] = origin
    if isinstance(data.get("weights"), Mapping):
        _check_weights(data["weights"], origin)
    sources = None
    if "sources" in data:
        try:
            sources = _decode_sources(data["sources"])
        except ValueError as exc:
            raise ConfigError(f"{origin}: {exc}") from None
        data["sources"] = ()
    try:
        config = msgspec.convert(data, Config)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{origin}: {exc}") from None
    if sources is None:
        return config
    try:
        return msgspec.structs.replace(config, sources=sources)
    except ValueError as exc:  # Config.__post_init__: the checks across sources
        raise ConfigError(f"{origin}: {exc} - at `$.sources`") from None


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
