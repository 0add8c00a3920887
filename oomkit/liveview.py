"""``oomkit top --watch``: a live terminal view of what oomkit sees and does (``rich``).

Each refresh (``--interval``, 0.5 s by default) shows every scope's memory, limit and
pressure, the selected scope's ranking with each scorer's column, the tier or veto and
each candidate's memory history as a sparkline, the recent decisions with their outcome
and latency, and every source's mode, cgroups and takeover state.

Where the numbers come from:

* **A daemon** answering on the control socket: ``status`` (sources, takeover state,
  counters, the last decisions) and ``history`` (the shown candidates' samples, bounded in
  processes and points) on every refresh; ``rank`` only every ``--rank-every`` seconds
  (2 s by default) and for the shown rows only, because a ranking costs the daemon what a
  decision's ranking costs (docs/operations.md says how much a refresh costs it).
* **No daemon** (or ``--local``): an engine of this process, in dry-run, with no source
  started, no lock taken and no cgroup changed; its memory history samples the selected
  scope (kept warm, as ``top --sample`` does), and ``d`` runs a dry-run decision for it
  through the whole chain (no notifier sees it: plugins that only notify are left out).

Either way the scope panel's memory, limit and pressure are read here, from cgroupfs and
/proc, which costs the daemon nothing.  Keys: ``q`` quits, ``tab`` (or ``s``) selects the
next scope, ``p`` pauses and resumes, ``r`` ranks now, ``d`` decides (local only).
"""

from __future__ import annotations

import contextlib
import os
import select
import sys
import termios
import time
import tty
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import anyio
import msgspec

from .cgroupfs import Mounts, mounts_for, scope_dir
from .config import Config
from .errors import OomkitError
from .events import Decision, Event, Ranked, Scope
from .procfs import read_meminfo, read_small
from .psi import read_pressure
from .records import ProcessHistory, ScopeHistory
from .status import EngineStatus, brief

__all__ = ["ScopeMemory", "View", "WatchError", "read_scope_memory", "render", "run", "sparkline"]

_BLOCKS = "▁▂▃▄▅▆▇█"
_SERIES = 120  # scope readings kept per scope for its sparkline (about a minute)
_MiB = 1 << 20


class WatchError(OomkitError):
    """The live view cannot run here (no terminal, rich missing); the message says why."""


def sparkline(values: Sequence[float], width: int) -> str:
    """The last ``width`` values as block characters, lowest to highest; flat when they
    differ by less than 1 % of the highest (noise is not drawn as growth)."""
    vals = list(values)[-width:]
    if not vals:
        return ""
    low, high = min(vals), max(vals)
    if high <= 0 or high - low < 0.01 * high:
        return _BLOCKS[0 if high <= 0 else 3] * len(vals)
    span = high - low
    return "".join(_BLOCKS[min(7, int((v - low) / span * 7.999))] for v in vals)


# --- what the view reads itself ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ScopeMemory:
    """A scope's memory now, as this process read it (None: not readable)."""

    scope: Scope
    usage_bytes: int | None
    limit_bytes: int | None
    """None: unlimited or unknown."""
    some_avg10: float | None = None
    full_avg10: float | None = None


def _int_file(path: str) -> int | None:
    try:
        text = read_small(path, 64).strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _pressure(path: str) -> tuple[float | None, float | None]:
    try:
        p = read_pressure(path)
    except (OSError, ValueError):
        return None, None
    return p.get("some_avg10_pct"), p.get("full_avg10_pct")


def read_scope_memory(mounts: Mounts, scope: Scope) -> ScopeMemory:
    """The scope's charge, limit and memory pressure (avg10), read from its files."""
    if scope.tree == "system":
        usage: int | None = None
        limit: int | None = None
        try:
            info = read_meminfo(mounts.proc, ("MemTotal", "MemAvailable"))
            usage, limit = max(0, info["MemTotal"] - info["MemAvailable"]), info["MemTotal"]
        except (OSError, ValueError, KeyError):
            pass
        return ScopeMemory(scope, usage, limit, *_pressure(f"{mounts.proc}/pressure/memory"))
    try:
        d = str(scope_dir(mounts, scope))
    except LookupError:
        return ScopeMemory(scope, None, None)
    if scope.tree == "v1":
        v1_limit = _int_file(f"{d}/memory.limit_in_bytes")
        # v1 has no per-cgroup pressure file (memory.pressure_level only notifies).
        return ScopeMemory(scope, _int_file(f"{d}/memory.usage_in_bytes"),
                           None if v1_limit is None or v1_limit >= 1 << 60 else v1_limit)
    return ScopeMemory(scope, _int_file(f"{d}/memory.current"), _int_file(f"{d}/memory.max"),
                       *_pressure(f"{d}/memory.pressure"))


# --- where the rest comes from ------------------------------------------------------------------


class Backend(Protocol):
    """A daemon over its control socket, or an engine of this process."""

    label: str
    can_decide: bool

    async def status(self) -> EngineStatus: ...

    async def rank(self, scope: Scope, limit: int) -> list[Ranked]: ...

    async def history(self, scope: Scope, pids: tuple[int, ...], limit: int, points: int) -> ScopeHistory | None: ...

    async def decide(self, scope: Scope) -> Decision: ...


class DaemonBackend:
    """A running daemon: every request is one connection, served on its event loop."""

    can_decide = False

    def __init__(self, client: Any) -> None:
        self._client = client
        self.label = f"daemon on {client.path}"
        self._history_refused = ""

    async def _ask(self, **request: Any) -> Any:
        from .control import Request

        return await anyio.to_thread.run_sync(self._client.request, Request(v=1, **request))

    async def status(self) -> EngineStatus:
        return msgspec.convert(await self._ask(op="status"), EngineStatus)

    async def rank(self, scope: Scope, limit: int) -> list[Ranked]:
        return msgspec.convert(await self._ask(op="rank", scope=scope, limit=limit), list[Ranked])

    async def history(self, scope: Scope, pids: tuple[int, ...], limit: int, points: int) -> ScopeHistory | None:
        from .control import ControlError

        if self._history_refused:
            return None
        try:
            raw = await self._ask(op="history", scope=scope, pids=pids[:256], limit=limit, points=points)
        except ControlError as exc:
            if "bad request" not in str(exc):
                raise
            self._history_refused = str(exc)  # an older daemon: no history op; ask no more
            return None
        return msgspec.convert(raw, ScopeHistory)

    async def decide(self, scope: Scope) -> Decision:
        raise WatchError("the daemon decides by itself: no decision is made from here")


class LocalBackend:
    """An engine of this process, running (dry-run, no sources) so it can decide."""

    can_decide = True

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.label = "this process (no daemon answers): dry-run, nothing is killed"

    async def status(self) -> EngineStatus:
        st: EngineStatus = self.engine.snapshot()
        return st

    async def rank(self, scope: Scope, limit: int) -> list[Ranked]:
        ranked: list[Ranked] = self.engine.rank(Event(source="top", kind="oom", scope=scope))[:limit]
        return ranked

    async def history(self, scope: Scope, pids: tuple[int, ...], limit: int, points: int) -> ScopeHistory | None:
        # Keep the selected scope warm, so the sampler reads it whatever its size.
        self.engine.history.touch(scope, "pressure", time.monotonic_ns())
        h: ScopeHistory = self.engine.history.scope_history(scope, pids=pids, limit=limit, points=points)
        return h

    async def decide(self, scope: Scope) -> Decision:
        d: Decision = await self.engine.decide(Event(source="top", kind="oom", scope=scope))
        return d


# --- the view's state -------------------------------------------------------------------------


@dataclass
class View:
    """What the screen shows, kept between refreshes."""

    backend_label: str
    scopes: list[Scope]
    selected: int = 0
    rows: int = 15
    points: int = 24
    rank_every_s: float = 2.0
    paused: bool = False
    can_decide: bool = False
    status: EngineStatus | None = None
    memory: dict[Scope, ScopeMemory] = field(default_factory=dict)
    series: dict[Scope, deque[int]] = field(default_factory=dict)
    ranking: list[Ranked] = field(default_factory=list)
    ranked_scope: Scope | None = None
    ranked_at: float = 0.0
    rank_ms: float = 0.0
    history: ScopeHistory | None = None
    refresh_ms: float = 0.0
    message: str = ""

    @property
    def scope(self) -> Scope:
        return self.scopes[self.selected]

    def add_scopes(self, scopes: Sequence[Scope]) -> None:
        for s in scopes:
            if s not in self.scopes:
                self.scopes.append(s)

    def next_scope(self) -> None:
        self.selected = (self.selected + 1) % len(self.scopes)
        self.ranking, self.ranked_scope, self.history = [], None, None


async def refresh(view: View, backend: Backend, mounts: Mounts, *, rank_now: bool = False) -> None:
    """Ask for everything one refresh shows; a failed request is a line on the screen."""
    t0 = time.perf_counter()
    try:
        view.status = await backend.status()
        view.add_scopes([sc.scope for src in view.status.sources for sc in src.scopes])
        scope = view.scope
        due = time.monotonic() - view.ranked_at >= view.rank_every_s
        if rank_now or due or view.ranked_scope != scope:
            r0 = time.perf_counter()
            view.ranking = await backend.rank(scope, view.rows)
            view.rank_ms = (time.perf_counter() - r0) * 1e3
            view.ranked_scope, view.ranked_at = scope, time.monotonic()
        pids = tuple(r.candidate.pid for r in view.ranking)
        view.history = await backend.history(scope, pids, view.rows, view.points)
        view.message = ""
    except OomkitError as exc:
        view.message = str(exc)
    for s in view.scopes:
        mem = view.memory[s] = read_scope_memory(mounts, s)
        if mem.usage_bytes is not None:
            view.series.setdefault(s, deque(maxlen=_SERIES)).append(mem.usage_bytes)
    view.refresh_ms = (time.perf_counter() - t0) * 1e3


# --- drawing ------------------------------------------------------------------------------------


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / _MiB:,.0f}"


def _bar(usage: int | None, limit: int | None, width: int = 12) -> Any:
    from rich.text import Text

    if usage is None or not limit:
        return Text("-")
    frac = max(0.0, min(1.0, usage / limit))
    style = "red" if frac >= 0.9 else "yellow" if frac >= 0.7 else "green"
    full = int(frac * width)
    return Text("█" * full + "·" * (width - full), style=style) + Text(f" {frac * 100:3.0f}%")


def _scopes_table(view: View) -> Any:
    from rich.table import Table

    states: dict[Scope, list[str]] = {}
    if view.status is not None:
        for src in view.status.sources:
            for sc in src.scopes:
                states.setdefault(sc.scope, []).append(f"{sc.state} ({src.name})")
    t = Table(title="scopes", title_justify="left", expand=True, box=None, header_style="bold")
    for col, just in (("", "left"), ("SCOPE", "left"), ("STATE", "left"), ("USED MiB", "right"),
                      ("LIMIT MiB", "right"), ("USE", "left"), ("PSI some/full avg10", "right"), ("USED", "left")):
        t.add_column(col, justify=just)  # type: ignore[arg-type]
    for i, s in enumerate(view.scopes):
        m = view.memory.get(s)
        psi = "-" if m is None or m.some_avg10 is None else f"{m.some_avg10:.1f}% / {m.full_avg10 or 0.0:.1f}%"
        t.add_row(
            "▶" if i == view.selected else "", str(s), ", ".join(states.get(s, [])) or "-",
            _mib(m.usage_bytes if m else None), _mib(m.limit_bytes if m else None),
            _bar(m.usage_bytes, m.limit_bytes) if m else "-", psi,
            sparkline(view.series.get(s, ()), 30),
        )
    return t


def _history_cell(h: ProcessHistory | None, width: int) -> str:
    if h is None or not h.rss_bytes:
        return "-"
    low, high = min(h.rss_bytes) / _MiB, max(h.rss_bytes) / _MiB
    return f"{sparkline(h.rss_bytes, width):<{width}} {low:.0f}-{high:.0f}"


def _ranking_table(view: View) -> Any:
    from rich.table import Table

    scorers = sorted({name for r in view.ranking for name in r.scores})
    age = time.monotonic() - view.ranked_at if view.ranked_at else 0.0
    hist = view.history
    where = "" if hist is None else (
        f"; history: {hist.processes} processes tracked over {hist.window_s:g} s" if hist.sampled
        else "; history: this scope is not sampled now (cold and big)")
    title = (f"ranking of {view.scope}: top {len(view.ranking)}, ranked {age:.0f} s ago"
             f" (every {view.rank_every_s:g} s, {view.rank_ms:.0f} ms){where}")
    t = Table(title=title, title_justify="left", expand=True, box=None, header_style="bold")
    t.add_column("PID", justify="right")
    t.add_column("NAME")
    t.add_column("SCORE", justify="right")
    for s in scorers:
        t.add_column(s, justify="right")
    t.add_column("RSS MiB", justify="right")
    t.add_column("ADJ", justify="right")
    t.add_column(f"HISTORY (RSS, {view.points} pts, MiB)")
    t.add_column("TIER / VETO")
    by_pid = {h.pid: h for h in hist.history} if hist is not None else {}
    for r in view.ranking:
        c = r.candidate
        veto = "; ".join(f"{v.plugin}: {v.reason}" for v in r.vetoes)
        tier = r.tier + (f" ({r.tier_reason})" if r.tier_reason else "")
        h = by_pid.get(c.pid)
        if h is not None and h.start_ticks != c.start_ticks:
            h = None  # a reused pid: not this process's history
        t.add_row(
            str(c.pid), c.name[:16], f"{r.score:.1f}", *(f"{r.scores.get(s, 0.0):.1f}" for s in scorers),
            f"{c.rss_bytes / _MiB:.1f}", str(c.oom_score_adj), _history_cell(h, view.points),
            f"[red]{veto}[/red]" if veto else tier,
        )
    return t


def _decisions_table(view: View) -> Any:
    from rich.table import Table

    briefs = list(view.status.recent) if view.status is not None else []
    t = Table(title="recent decisions (newest first)", title_justify="left", expand=True, box=None,
              header_style="bold")
    for col in ("TIME", "#", "OUTCOME", "EVENT", "SCOPE", "VICTIM", "RSS MiB", "LATENCY ms", "DETAIL"):
        t.add_column(col, justify="right" if col in ("#", "RSS MiB", "LATENCY ms") else "left")
    if not briefs:
        t.add_row("-", "", "none yet" + ("; press d for a dry-run decision" if view.can_decide else ""))
    for d in reversed(briefs[-8:]):
        style = {"killed": "bold red", "failed": "red", "all-vetoed": "yellow", "dry-run": "cyan"}.get(d.outcome, "")
        victim = f"{d.victim_pid} {d.victim_name}" if d.victim_pid else "-"
        t.add_row(
            time.strftime("%H:%M:%S", time.localtime(d.wall_time)), str(d.id),
            f"[{style}]{d.outcome}[/{style}]" if style else d.outcome, f"{d.kind} from {d.source}", str(d.scope),
            victim, _mib(d.victim_rss_bytes) if d.victim_pid else "-", f"{d.decide_ns / 1e6:.1f}", d.detail[:60],
        )
    return t


def _sources_table(view: View) -> Any:
    from rich.table import Table

    t = Table(title="sources", title_justify="left", expand=True, box=None, header_style="bold")
    for col in ("NAME", "KIND", "MODE", "CGROUPS", "WATCHDOG", "COUNTERS"):
        t.add_column(col)
    if view.status is None:
        return t
    for src in view.status.sources:
        wd = "-" if src.watchdog is None else f"pid {src.watchdog.pid} {'running' if src.watchdog.alive else 'GONE'}"
        t.add_row(
            src.name, src.kind, src.mode or "-", ", ".join(f"{sc.scope} {sc.state}" for sc in src.scopes) or "-",
            wd, ", ".join(f"{k} {v}" for k, v in sorted(src.counters.items()) if v) or "-",
        )
    return t


def render(view: View) -> Any:
    """The whole screen for ``view`` (a rich renderable)."""
    from rich.console import Group
    from rich.text import Text

    st = view.status
    head = Text(f"oomkit top --watch: {view.backend_label}", style="bold")
    if st is not None:
        c = st.counters
        head.append(f"\noomkit {st.version} pid {st.pid}, generation {st.generation}"
                    f"{', DRY RUN' if st.dry_run else ''}; health: {st.health or 'making progress'};"
                    f" events {c.events}, decisions {c.decisions}, kills {c.kills}, plugin errors {c.plugin_errors}",
                    style="")
    if view.paused:
        head.append("  [PAUSED]", style="bold yellow")
    parts: list[Any] = [head, Text(""), _scopes_table(view), Text(""), _ranking_table(view), Text(""),
                        _decisions_table(view), Text(""), _sources_table(view), Text("")]
    if view.message:
        parts.append(Text(view.message, style="bold red"))
    keys = "q quit · tab/s next scope · p pause · r rank now" + (" · d dry-run decision" if view.can_decide else "")
    parts.append(Text(f"{keys}    (refresh {view.refresh_ms:.0f} ms)", style="dim"))
    return Group(*parts)


# --- the terminal -------------------------------------------------------------------------------


@contextlib.contextmanager
def _cbreak(fd: int) -> Iterator[None]:
    """Keys arrive one by one and are not echoed; the terminal is put back on the way out."""
    saved = termios.tcgetattr(fd)
    try:
        tty.setcbreak(fd)
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def _read_keys(fd: int, timeout: float) -> str:
    ready, _, _ = select.select([fd], [], [], max(0.0, timeout))
    if not ready:
        return ""
    return os.read(fd, 64).decode(errors="replace")


async def _loop(view: View, backend: Backend, mounts: Mounts, interval: float) -> None:
    from rich.console import Console
    from rich.live import Live

    fd = sys.stdin.fileno()
    console = Console()
    with _cbreak(fd), Live(console=console, screen=True, auto_refresh=False, transient=True,
                               vertical_overflow="crop") as live:
        rank_now = False
        while True:
            if not view.paused:
                await refresh(view, backend, mounts, rank_now=rank_now)
                rank_now = False
            live.update(render(view), refresh=True)
            deadline = time.monotonic() + interval
            while (left := deadline - time.monotonic()) > 0:
                keys = await anyio.to_thread.run_sync(_read_keys, fd, left)
                for key in keys:
                    if key in "qQ":
                        return
                    if key in "\ts":
                        view.next_scope()
                        rank_now = True
                    elif key == "p":
                        view.paused = not view.paused
                    elif key == "r":
                        rank_now = True
                    elif key == "d" and backend.can_decide:
                        try:
                            d = await backend.decide(view.scope)
                            view.message = f"decision #{d.id}: {brief(d).outcome}"
                        except OomkitError as exc:
                            view.message = str(exc)
                if keys:
                    break  # show what the key changed at once


def _local_engine(config: Config) -> Any:
    """An engine for this process: dry-run, no sources, and no plugin that only notifies
    (a decision made from here is nobody's business but this screen's)."""
    from .engine import Engine

    probe = Engine(msgspec.structs.replace(config, sources=()), dry_run=True)
    quiet = {"oomkit_configure", "oomkit_notify", "oomkit_memory_sample", "oomkit_sources"}
    notifiers = []
    for impl in probe.pm.hook.oomkit_notify.get_hookimpls():
        plugin = probe.pm.get_plugin(impl.plugin_name)
        hooks = {c.name for c in probe.pm.get_hookcallers(plugin) or ()}
        if hooks <= quiet:
            notifiers.append(impl.plugin_name)
    if not notifiers:
        return probe
    plugins = msgspec.structs.replace(
        config.plugins, disable=(*config.plugins.disable, *notifiers),
        settings={k: v for k, v in config.plugins.settings.items() if k not in notifiers},
    )
    return Engine(msgspec.structs.replace(config, sources=(), plugins=plugins), dry_run=True)


def check_available() -> None:
    """Raise :class:`WatchError` when the view cannot run: no rich, or no terminal."""
    try:
        import rich  # noqa: F401
    except ImportError:
        raise WatchError("top --watch needs the rich library (pip install 'oomkit[watch]')") from None
    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        raise WatchError("top --watch needs a terminal on standard input and output")


def run(config: Config, scope: Scope, client: Any | None, *, interval: float, rank_every: float, rows: int) -> int:
    """Show the view until ``q``: from the daemon behind ``client``, or locally when None."""
    check_available()
    mounts = mounts_for(config.paths)
    view = View(backend_label="", scopes=list(dict.fromkeys([Scope(), scope])), rows=rows,
                rank_every_s=rank_every)
    view.selected = view.scopes.index(scope)

    async def main() -> None:
        if client is not None:
            backend: Backend = DaemonBackend(client)
            view.backend_label = backend.label
            await _loop(view, backend, mounts, interval)
            return
        engine = _local_engine(config)
        local = LocalBackend(engine)
        view.backend_label, view.can_decide = local.label, True
        async with engine:
            await _loop(view, local, mounts, interval)

    anyio.run(main)
    return 0
