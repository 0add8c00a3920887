"""The ``oomkit`` command: ``serve``, ``check``, ``plugins``, ``top``, ``explain``, ``plot``,
``doctor``, ``restore``, and the control-socket clients ``status``, ``events`` and ``reload``.

``check``, ``plugins`` and ``top`` inspect: they build the plugins and sources of a
configuration but start nothing, take no takeover lock and change no cgroup, so they run
beside a daemon; ``top`` asks the running daemon for its ranking when one answers on the
control socket (``--local`` to rank in this process instead).  ``explain`` and ``plot``
read the JSON-lines log.

Exit status: 0 success, 2 bad configuration or plugin (one line on stderr naming the file
and key or the plugin and hook), 1 any other failure oomkit reports (a source that cannot
start or that died: one line naming it).  ``oomkit restore``: 0 when every journalled value
is back or needed nothing (those a running oomkit holds are left to it), 1 when one could
not be restored (its entry is kept), 2 for a bad configuration.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgspec

from .config import Config, ConfigError, load_config
from .errors import OomkitError
from .events import Event, Ranked, Scope
from .plugins import PluginLoadError
from .sources.registry import default_registry
from .tomlout import dump_toml

__all__ = ["main"]


def _config_args(p: argparse.ArgumentParser, *, runs: bool = False) -> None:
    """``-c`` everywhere; the flags that shape a running daemon only where they mean
    something (``serve``, and ``check``, which validates what ``serve`` would run)."""
    p.add_argument("-c", "--config", metavar="FILE", help="TOML configuration (default: built-in defaults)")
    if not runs:
        return
    p.add_argument("--dry-run", action="store_true", default=None, help="run every stage but send no signal")
    p.add_argument(
        "--takeover",
        metavar="CGROUP",
        action="append",
        default=[],
        help="take over the OOM decisions of this cgroup: a v1 memcg is paused at its limit (memcg-oom), a v2 "
        "cgroup is braked at memory.high under its memory.max (memory-high).  'v2:PATH' or a path under the v2 "
        "mount brakes, 'v1:PATH' or a path under the v1 memory mount pauses; a bare relative path means v1 where "
        "the v1 memory controller is mounted, else v2.  Globs allowed; repeatable",
    )
    p.add_argument("--events", metavar="FILE", help="decision log as JSON lines ('-' for stdout)")
    p.add_argument("--loop", choices=["auto", "asyncio", "uvloop", "trio"], help="event loop (default: auto)")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"])


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="oomkit", description="User-space out-of-memory handling.")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the daemon in the foreground (logs to stderr)")
    _config_args(serve, runs=True)

    check = sub.add_parser("check", help="validate a configuration and print the effective one, defaults included")
    _config_args(check, runs=True)

    plugins = sub.add_parser("plugins", help="list loaded plugins, the hooks each implements, and disabled ones")
    _config_args(plugins)

    top = sub.add_parser("top", help="dry-run ranking: who would be killed now, and why")
    _config_args(top)
    top.add_argument(
        "--scope",
        default="system",
        metavar="CGROUP",
        help="'system' (default), a v1 memcg path, or 'v2:PATH' for a cgroup v2 path",
    )
    top.add_argument(
        "--sample",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="sample the scope's memory history this long first, so growth shows (default: 0, no history)",
    )
    top.add_argument("--json", action="store_true", help="one JSON object per candidate")
    top.add_argument("-n", "--limit", type=int, default=0, help="show only the first N (default: all)")
    top.add_argument("--local", action="store_true", help="rank in this process even when a daemon runs")
    top.add_argument("--socket", metavar="PATH", help="the daemon's control socket (default: from the config)")
    top.add_argument(
        "-w", "--watch", action="store_true",
        help="a live view (needs oomkit[watch]): scopes, ranking with history sparklines, decisions, sources; "
        "keys: q quit, tab or s next scope, p pause, r rank now, d dry-run decision (without a daemon)",
    )
    top.add_argument("--interval", type=_seconds(0.05, 60), default=0.5, metavar="SECONDS",
                     help="--watch: refresh this often (default 0.5)")
    top.add_argument("--rank-every", type=_seconds(0.1, 3600), default=2.0, metavar="SECONDS",
                     help="--watch: rank this often (default 2; a ranking costs the daemon what a decision's does)")

    status = sub.add_parser("status", help="what the running daemon is doing (over its control socket)")
    _socket_args(status)
    status.add_argument("--json", action="store_true", help="the daemon's status as one JSON document")

    events = sub.add_parser("events", help="the running daemon's recent decisions; --follow for new ones")
    _socket_args(events)
    events.add_argument("-f", "--follow", action="store_true", help="print each new decision as it is made")
    events.add_argument("-n", "--limit", type=int, default=20, help="how many recent decisions (default 20)")
    events.add_argument("--json", action="store_true", help="one JSON decision per line (ranking cut to 10)")

    reload = sub.add_parser("reload", help="make the running daemon re-read its configuration (as SIGHUP)")
    _socket_args(reload)

    explain = sub.add_parser("explain", help="why a logged decision's victim won and why the next ones lost")
    explain.add_argument("--events", metavar="FILE", required=True, help="the decision log (JSON lines)")
    which = explain.add_mutually_exclusive_group(required=True)
    which.add_argument("id", nargs="?", type=int, help="the decision's id")
    which.add_argument("--last", action="store_true", help="the last decision that ranked anyone")
    explain.add_argument("-n", "--next", type=int, default=5, metavar="N", help="explain the next N (default: 5)")

    plot = sub.add_parser("plot", help="draw a scope's memory, decisions, victims and stage times from the JSON-lines log")
    plot.add_argument("events", metavar="EVENTS.jsonl", help="the log ([plugins.jsonl] path, serve --events)")
    plot.add_argument("-o", "--output", metavar="FILE", required=True, help="the picture (.png, .svg or .pdf)")
    plot.add_argument("--scope", metavar="SCOPE",
                      help="system, v1:/path, v2:/path or a path (default: the scope with the most decisions)")
    plot.add_argument("--title", default="", help="the picture's title (default: the scope)")

    doctor = sub.add_parser("doctor", help="what this kernel and machine offer oomkit, and which features work here")
    doctor.add_argument("-c", "--config", metavar="FILE", help="TOML configuration whose [paths] to probe")
    doctor.add_argument("--json", action="store_true", help="one JSON document (layout: oomkit/doctor.py)")
    doctor.add_argument(
        "--probe", metavar="NAME", action="append", default=[], help="run only this probe; repeatable"
    )
    restore = sub.add_parser(
        "restore", help="put back every cgroup value a dead oomkit journalled (for ExecStopPost=); one line each"
    )
    restore.add_argument("-c", "--config", metavar="FILE", help="TOML configuration whose [paths] run_dir to read")
    return ap


def _seconds(low: float, high: float) -> Any:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
        if not low <= value <= high:  # NaN fails both
            raise argparse.ArgumentTypeError(f"{text} is not within {low:g} to {high:g} seconds")
        return value

    return parse


def _socket_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--config", metavar="FILE", help="the daemon's configuration, for its socket's path")
    p.add_argument("--socket", metavar="PATH", help="the control socket (default: [control] path, or run_dir's)")


def _client(args: argparse.Namespace) -> Any:
    from .control import Client, socket_path

    path = Path(args.socket) if args.socket else socket_path(load_config(args.config))
    return Client(path)


def _load(args: argparse.Namespace) -> Config:
    overrides: dict[str, Any] = {}
    if getattr(args, "dry_run", None):
        overrides.setdefault("engine", {})["dry_run"] = True
    if getattr(args, "loop", None):
        overrides.setdefault("daemon", {})["loop"] = args.loop
    if getattr(args, "log_level", None):
        overrides.setdefault("daemon", {})["log_level"] = args.log_level
    if getattr(args, "events", None):
        overrides["plugins"] = {"jsonl": {"path": args.events}}
    config = load_config(args.config, overrides)
    if getattr(args, "takeover", None):
        config = msgspec.structs.replace(config, sources=(*config.sources, *_takeover_sources(config, args.takeover)))
    return config


def _takeover_sources(config: Config, named: Sequence[str]) -> list[Any]:
    """``--takeover`` entries as sources: the v1 ones one ``memcg-oom`` source named
    ``takeover``, the v2 ones one ``memory-high`` source named ``brake``."""
    from .cgroupfs import mounts_for
    from .sources.memcg_oom import MemcgOomSourceConfig
    from .sources.memory_high import MemoryHighSourceConfig

    mounts = mounts_for(config.paths)
    trees: dict[str, list[str]] = {"v1": [], "v2": []}
    for entry in named:
        tree, path = _takeover_tree(mounts, entry)
        trees[tree].append(path)
    out: list[Any] = []
    try:
        if trees["v1"]:
            out.append(MemcgOomSourceConfig(name="takeover", cgroups=tuple(trees["v1"])))
        if trees["v2"]:
            out.append(MemoryHighSourceConfig(name="brake", cgroups=tuple(trees["v2"])))
    except ValueError as exc:
        raise ConfigError(f"--takeover: {exc}") from None
    return out


def _takeover_tree(mounts: Any, entry: str) -> tuple[str, str]:
    """Which tree a ``--takeover`` entry names, and its path there."""
    for tree in ("v1", "v2"):
        if entry.startswith(f"{tree}:"):
            return tree, entry[3:]
    if entry.startswith("/"):
        # The deeper mount wins: a v1 hierarchy may sit below a v2 one (/sys/fs/cgroup/memory).
        under = [(len(str(root)), tree) for tree, root in (("v1", mounts.memory_v1), ("v2", mounts.unified))
                 if root is not None and (entry == str(root) or entry.startswith(str(root).rstrip("/") + "/"))]
        if under:
            return max(under)[1], entry
    return ("v1" if mounts.memory_v1 is not None else "v2"), entry


def _engine(config: Config) -> Any:
    from .engine import Engine

    return Engine(config)


def _cmd_serve(args: argparse.Namespace) -> int:
    from .daemon import resolve_loop, serve

    config = _load(args)
    _logging(config.daemon.log_level)
    try:
        loop = resolve_loop(config.daemon.loop)
    except ImportError as exc:
        raise ConfigError(f"{config.origin}: event loop {config.daemon.loop!r} is not installed: {exc}") from None
    if config.metrics.listen or config.metrics.textfile:
        from .metrics import Exporter

        Exporter.check_available()
    serve(_engine(config), loop, lambda: _load(args))
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    config = _load(args)
    engine = _engine(config)  # loads and configures plugins, builds sources: every check there is
    sys.stdout.write(f"# effective configuration ({config.origin}); valid\n")
    sys.stdout.write(f"# plugins: {', '.join(engine.plugins.loaded) or 'none'}\n")
    doc = _config_doc(config, _effective_settings(engine))
    # Every scorer's weight as the engine uses it: a plugin's declared default shows too.
    doc["weights"] = {impl.plugin_name: engine.weight(impl.plugin_name)
                      for impl in sorted(engine.pm.hook.oomkit_score.get_hookimpls(), key=lambda i: i.plugin_name)}
    sys.stdout.write(dump_toml(doc))
    return 0


def _effective_settings(engine: Any) -> dict[str, dict[str, Any]]:
    """Each loaded plugin's table as it decoded it, defaults included: a plugin that keeps
    its settings Struct in ``self.settings`` (every first-party one does) shows it here."""
    out: dict[str, dict[str, Any]] = {}
    for name in engine.plugins.loaded:
        settings = getattr(engine.pm.get_plugin(name), "settings", None)
        if isinstance(settings, msgspec.Struct):
            out[name] = msgspec.to_builtins(settings)
    return out


def _config_doc(config: Config, effective: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    doc = msgspec.to_builtins(config)
    doc.pop("origin", None)
    for table, settings in zip(doc["sources"], config.sources):
        table["kind"] = default_registry().kind_of(settings)  # reads back, `module:Class` too
    section = doc.pop("plugins")
    tables = {**section["settings"], **(effective or {})}
    doc["plugins"] = {"load": section["load"], "disable": section["disable"], **dict(sorted(tables.items()))}
    return dict(doc)


def _cmd_plugins(args: argparse.Namespace) -> int:
    engine = _engine(_load(args))
    rows = []
    for name, where in engine.plugins.loaded.items():
        plugin = engine.pm.get_plugin(name)
        hook_names = sorted(c.name.removeprefix("oomkit_") for c in engine.pm.get_hookcallers(plugin) or ())
        rows.append((name, ", ".join(hook_names) or "-", where))
    width = max([len(r[0]) for r in rows] + [6])
    hwidth = max([len(r[1]) for r in rows] + [5])
    print(f"{'PLUGIN':<{width}}  {'HOOKS':<{hwidth}}  FROM")
    for name, hooks, where in rows:
        print(f"{name:<{width}}  {hooks:<{hwidth}}  {where}")
    print(f"disabled: {', '.join(engine.plugins.disabled) or 'none'}")
    return 0


def _scope(engine: Any, text: str) -> Scope:
    from .cgroupfs import mounts_for

    return _scope_in(mounts_for(engine.config.paths), text)


def _scope_in(mounts: Any, text: str) -> Scope:
    from .cgroupfs import resolve_cgroup

    if text == "system":
        return Scope()
    if text.startswith("v2:"):
        return resolve_cgroup(mounts, text[3:], tree="v2")
    return resolve_cgroup(mounts, text, tree="v1")


def _cmd_top(args: argparse.Namespace) -> int:
    from .control import Client, Request, socket_path

    config = _load(args)
    client = Client(Path(args.socket) if args.socket else socket_path(config))
    if args.watch:
        from .cgroupfs import mounts_for
        from .liveview import run

        if args.json or args.sample:
            raise ConfigError("--watch shows a live view: --json and --sample do not apply")
        live = not args.local and client.available()
        return run(config, _scope_in(mounts_for(config.paths), args.scope), client if live else None,
                   interval=args.interval, rank_every=args.rank_every, rows=args.limit if args.limit > 0 else 15)
    engine = None
    if not args.local and client.available():
        from .cgroupfs import mounts_for

        scope = _scope_in(mounts_for(config.paths), args.scope)
        raw = client.request(Request(v=1, op="rank", scope=scope, limit=1 << 16))
        ranking = msgspec.convert(raw, list[Ranked])
        print(f"# ranked by the running daemon ({client.path}), with its memory history")
    else:
        engine = _engine(config)
        scope = _scope(engine, args.scope)
        if args.sample > 0:
            _sample(engine, scope, args.sample)
        ranking = engine.rank(Event(source="top", kind="oom", scope=scope))
    if args.limit > 0:
        ranking = ranking[: args.limit]
    if args.json:
        enc = msgspec.json.Encoder()
        for r in ranking:
            sys.stdout.buffer.write(enc.encode(r) + b"\n")
        return 0
    if engine is None:
        _print_ranking(ranking, scope, None, 0.0)
        return 0
    _print_ranking(ranking, scope, engine.history, args.sample)
    scorers = sorted({name for r in ranking for name in r.scores})
    print("# score = " + " + ".join(f"{engine.weight(s):g} x {s}" for s in scorers)
          + f"; ties: {engine.config.engine.tiebreak or 'RSS'}; policy {engine.config.engine.policy}")
    return 0


def _sample(engine: Any, scope: Scope, seconds: float) -> None:
    """Fill the memory history of ``scope`` for ``seconds``, as the daemon's sampler would."""
    history = engine.history
    deadline = time.monotonic() + seconds
    while True:
        history.touch(scope, "pressure", time.monotonic_ns())
        history.tick()
        if time.monotonic() >= deadline:
            return
        time.sleep(min(history.settings.interval_s, max(0.0, deadline - time.monotonic())))


def _history_cell(history: Any, r: Ranked) -> str:
    if history is None:
        return "(daemon's)"  # its growth scores used it; the samples stay in the daemon
    samples = history.of(r.candidate)
    if samples is None or not samples.times_ns:
        return "-"
    span = (samples.times_ns[-1] - samples.times_ns[0]) / 1e9
    low, high = min(samples.rss_bytes) / 2**20, max(samples.rss_bytes) / 2**20
    return f"{len(samples.times_ns)} over {span:.1f}s, {low:.0f}-{high:.0f} MiB"


def _print_ranking(ranking: Sequence[Ranked], scope: Scope, history: Any, sampled_s: float) -> None:
    scorers = sorted({name for r in ranking for name in r.scores})
    widths = [max(len(s), 8) for s in scorers]
    rows = []
    for r in ranking:
        c = r.candidate
        veto = "; ".join(f"{v.plugin}: {v.reason}" for v in r.vetoes)
        tier = r.tier + (f" ({r.tier_reason})" if r.tier_reason else "")
        rows.append((c, r, tier, _history_cell(history, r), veto))
    hwidth = max([len(row[3]) for row in rows] + [7])
    print(f"# scope {scope}: {len(ranking)} candidates, highest first; vetoed ones cannot be killed")
    if history is not None and sampled_s <= 0:
        print("# no memory history (growth is 0 for all but young processes): add --sample SECONDS")
    head = f"{'PID':>7} {'NAME':<16} {'SCORE':>9} " + " ".join(f"{s:>{w}}" for s, w in zip(scorers, widths))
    print(head + f" {'RSS MiB':>9} {'ADJ':>5} {'HISTORY':<{hwidth}}  TIER / VETO")
    for c, r, tier, hist, veto in rows:
        cols = " ".join(f"{r.scores.get(s, 0.0):>{w}.1f}" for s, w in zip(scorers, widths))
        print(
            f"{c.pid:>7} {c.name[:16]:<16} {r.score:>9.1f} {cols} {c.rss_bytes / 2**20:>9.1f}"
            f" {c.oom_score_adj:>5} {hist:<{hwidth}}  {veto or tier}"
        )


def _cmd_plot(args: argparse.Namespace) -> int:
    from .plot import load, plot

    timeline = load(args.events, args.scope)
    plot(timeline, args.output, title=args.title)
    left = []
    if timeline.other_scopes:
        left.append(f"{timeline.other_scopes} other scopes (--scope)")
    if timeline.earlier_boots:
        left.append(f"{timeline.earlier_boots} records of earlier boots")
    print(f"{args.output}: {timeline.scope}, {len(timeline.samples)} memory samples, {len(timeline.decisions)} decisions"
          + (f"; left out: {', '.join(left)}" if left else ""))
    return 0


def _cmd_explain(args: argparse.Namespace) -> int:
    from .explain import explain, find_decision

    print(explain(find_decision(args.events, None if args.last else args.id), next_n=max(0, args.next)))
    return 0


def _cmd_doctor(args: argparse.Namespace) -> int:
    from .doctor import render_json, render_table, report
    from .probes import PROBES, Machine

    known = [spec.name for spec in PROBES]
    unknown = [n for n in args.probe if n not in known]
    if unknown:
        raise ConfigError(f"--probe: no probe named {', '.join(unknown)} (probes: {', '.join(known)})")
    machine = Machine.from_paths(load_config(args.config).paths)
    results = report(machine, args.probe)
    if args.json:
        sys.stdout.buffer.write(render_json(results, machine))
    else:
        sys.stdout.write(render_table(results, machine))
    return 0


def _cmd_restore(args: argparse.Namespace) -> int:
    from .restore import restore_journal

    config = load_config(args.config)
    result = restore_journal(config.paths)
    for line in result.lines or [f"nothing to restore: the journal under {config.paths.run_dir} is empty"]:
        print(line)
    return 0 if result.ok else 1


def _cmd_status(args: argparse.Namespace) -> int:
    from .control import Request
    from .status import EngineStatus

    raw = _client(args).request(Request(v=1, op="status"))
    if args.json:
        sys.stdout.buffer.write(msgspec.json.encode(raw) + b"\n")
        return 0
    sys.stdout.write(render_status(msgspec.convert(raw, EngineStatus)))
    return 0


def render_status(st: Any) -> str:
    """``oomkit status`` as a person reads it."""
    import time as _time

    up = int(st.uptime_s)
    lines = [
        f"oomkit {st.version}, pid {st.pid}, up {up // 3600}h {up % 3600 // 60:02d}m {up % 60:02d}s;"
        f" config {st.config} (generation {st.generation}){'; DRY RUN' if st.dry_run else ''}",
        f"health: {st.health or 'making progress'}; queue {st.queued}/{st.queue_size};"
        f" deciding: {', '.join(map(str, st.deciding)) or 'nothing'}",
    ]
    if st.reload_failures:
        lines.append(f"reloads refused: {st.reload_failures} (last: {st.last_reload_error})")
    lines.append("sources:")
    for src in st.sources:
        extra = [f"{sc.scope} {sc.state}" for sc in src.scopes]
        if src.watchdog is not None:
            extra.append(f"watchdog pid {src.watchdog.pid} {'running' if src.watchdog.alive else 'GONE'}")
        extra += [f"{k} {v}" for k, v in sorted(src.counters.items()) if v]
        if src.detail:
            extra.append(src.detail)
        lines.append(f"  {src.name:<14} {src.kind:<15} {src.mode or '-':<9} {'; '.join(extra)}".rstrip())
    c = st.counters
    outcomes = ", ".join(f"{k} {v}" for k, v in st.outcomes.items())
    lines.append(
        f"events {c.events} (ignored {c.ignored}, coalesced {c.coalesced}, cooled {c.cooled},"
        f" held off {c.held_off});"
        f" decisions {c.decisions}{f' ({outcomes})' if outcomes else ''}; kills {c.kills};"
        f" plugin errors {c.plugin_errors}; notify dropped {c.notify_dropped}"
        + (f"; sync hook calls given up {c.hooks_abandoned}" if c.hooks_abandoned else "")
        + (f"; decisions with every hook thread stuck {c.hooks_stuck}" if c.hooks_stuck else "")
    )
    if st.plugin_errors:
        lines.append("plugin errors: " + ", ".join(f"{e.plugin} in {e.hook}: {e.count}" for e in st.plugin_errors))
    lines.append("recent decisions:" if st.recent else "recent decisions: none")
    for d in st.recent:
        lines.append("  " + _brief_line(d, _time))
    return "\n".join(lines) + "\n"


def _brief_line(d: Any, time_module: Any) -> str:
    when = time_module.strftime("%Y-%m-%d %H:%M:%S", time_module.localtime(d.wall_time))
    who = f" pid {d.victim_pid} {d.victim_name} ({d.victim_rss_bytes / 2**20:.0f} MiB)" if d.victim_pid else ""
    detail = f"  {d.detail}" if d.detail else ""
    return f"{when} #{d.id} {d.outcome:<17} {d.kind} {d.scope} from {d.source}{who} in {d.decide_ns / 1e6:.1f} ms{detail}"


def _cmd_events(args: argparse.Namespace) -> int:
    import time as _time

    from .control import Request
    from .events import Decision
    from .status import brief

    client = _client(args)
    limit = max(1, min(args.limit, 1 << 16))

    def show(raw: Any) -> None:
        if args.json:
            sys.stdout.buffer.write(msgspec.json.encode(raw) + b"\n")
        else:
            sys.stdout.write(_brief_line(brief(msgspec.convert(raw, Decision)), _time) + "\n")
        sys.stdout.flush()

    if not args.follow:
        for raw in client.request(Request(v=1, op="decisions", limit=limit)):
            show(raw)
        return 0
    for line in client.follow(Request(v=1, op="follow", replay=args.limit > 0, limit=limit)):
        if "dropped" in line:
            print(f"# {line['dropped']} decisions not shown: this client was too slow", file=sys.stderr)
        elif "decision" in line:
            show(line["decision"])
    return 0


def _cmd_reload(args: argparse.Namespace) -> int:
    from .control import ControlError, Request

    try:
        print(_client(args).request(Request(v=1, op="reload")))
    except ControlError as exc:
        # The daemon's refusal is a configuration problem, like `check`'s.
        raise ConfigError(str(exc)) from None
    return 0


def _logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command != "serve":
        _logging("warning")
    handler = {
        "serve": _cmd_serve,
        "check": _cmd_check,
        "plugins": _cmd_plugins,
        "top": _cmd_top,
        "explain": _cmd_explain,
        "plot": _cmd_plot,
        "doctor": _cmd_doctor,
        "restore": _cmd_restore,
        "status": _cmd_status,
        "events": _cmd_events,
        "reload": _cmd_reload,
    }[args.command]
    try:
        return handler(args)
    except (ConfigError, PluginLoadError) as exc:
        print(f"oomkit: error: {exc}", file=sys.stderr)
        return 2
    except OomkitError as exc:
        print(f"oomkit: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
