"""Operating costs: what the control socket and metrics cost an idle daemon, a status round
trip, a reload, and how long events wait while one happens.

* idle: ``oomkit serve`` on its default source three ways, side by side for ``--seconds``:
  control socket and metrics off, the control socket on (the default), and the socket plus
  a metrics endpoint and a textfile every 15 s; CPU over every thread (``schedstat``) as a
  percentage of one core, and Rss, RssAnon and Pss at the end.
* status: ``--requests`` ``status`` requests over the socket from this process (the
  blocking client the command uses), and ``oomkit status`` as a command (a Python start).
* reload: ``--reloads`` reloads of an unchanged file over the socket, each answered once
  the new configuration runs.
* events during reloads: an engine in this process with a source emitting an event every
  millisecond for a new scope (so nothing coalesces); the wait of each event from its
  creation to the start of its decision (``stage_ns["queued"]``), without and with a reload
  every 200 ms.  A reload builds the new plugins on the event loop, so events wait for it.

    python -m bench ops            # or: python -m bench.ops --seconds 60
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import anyio

from .idle import rollup_mib
from .stats import table
from tests.sources_support import cpu_ns


def _serve(tmp: Path, name: str, extra: str) -> tuple[subprocess.Popen[bytes], Path, Path]:
    cfg = tmp / f"{name}.toml"
    run = tmp / f"run-{name}"
    cfg.write_text(f'[paths]\nrun_dir = "{run}"\n{extra}')
    log = tmp / f"{name}.log"
    with open(log, "wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "oomkit", "serve", "-c", str(cfg)],
                                stdout=subprocess.DEVNULL, stderr=err)
    deadline = time.monotonic() + 60
    while "oomkit ready" not in log.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"oomkit serve ({name}) did not start: {log.read_text()}")
        time.sleep(0.05)
    return proc, cfg, run / "control.sock"


def idle(args: argparse.Namespace, tmp: Path) -> None:
    variants = {
        "no socket, no metrics": "[control]\nenabled = false\n",
        "control socket (default)": "",
        "socket + metrics endpoint + textfile": (
            f'[metrics]\nlisten = "127.0.0.1:0"\ntextfile = "{tmp / "oomkit.prom"}"\n'
        ),
    }
    procs = {name: _serve(tmp, f"idle{i}", extra)[0] for i, (name, extra) in enumerate(variants.items())}
    try:
        time.sleep(args.settle)
        before = {n: cpu_ns(p.pid) for n, p in procs.items()}
        t0 = time.monotonic_ns()
        time.sleep(args.seconds)
        elapsed = time.monotonic_ns() - t0
        rows = []
        for name, p in procs.items():
            mem = rollup_mib(p.pid)
            rows.append((name, (cpu_ns(p.pid) - before[name]) / elapsed * 100, mem["Rss"], mem["Anonymous"], mem["Pss"]))
    finally:
        for p in procs.values():
            p.send_signal(signal.SIGTERM)
            p.wait()
    print(table(f"oomkit serve at rest over {args.seconds:g} s (default meminfo source)",
                ("variant", "CPU % of one core", "RSS MiB", "RssAnon MiB", "PSS MiB"), rows))


def _ms(samples: list[float]) -> tuple[float, float, float]:
    samples = sorted(samples)
    return (samples[len(samples) // 2] * 1e3, samples[min(len(samples) - 1, int(len(samples) * 0.99))] * 1e3,
            samples[-1] * 1e3)


def round_trips(args: argparse.Namespace, tmp: Path) -> None:
    from oomkit.control import Client, Request

    proc, cfg, sock = _serve(tmp, "rt", "")
    try:
        client = Client(sock)
        status = []
        for _ in range(args.requests):
            t = time.perf_counter()
            client.request(Request(v=1, op="status"))
            status.append(time.perf_counter() - t)
        command = []
        for _ in range(5):
            t = time.perf_counter()
            subprocess.run([sys.executable, "-m", "oomkit", "status", "--socket", str(sock)],
                           check=True, stdout=subprocess.DEVNULL)
            command.append(time.perf_counter() - t)
        reloads = []
        for _ in range(args.reloads):
            t = time.perf_counter()
            client.request(Request(v=1, op="reload"))
            reloads.append(time.perf_counter() - t)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait()
    print(table("control socket round trips (ms)", ("request", "n", "p50", "p99", "max"), [
        ("status (in-process client)", len(status), *_ms(status)),
        ("`oomkit status` (a new Python)", len(command), *_ms(command)),
        ("reload (unchanged file)", len(reloads), *_ms(reloads)),
    ]))


async def _event_waits(reload_every_s: float | None, seconds: float) -> tuple[list[float], int, int]:
    from oomkit import Engine, Scope
    from oomkit.config import config_from_dict
    from oomkit.testing import FakeSource

    cfg = config_from_dict({"sources": [], "engine": {"cooldown_s": 0}, "plugins": {"jsonl": {"path": os.devnull}}})
    source = FakeSource("bench")
    async with Engine(cfg, sources=[source], dry_run=True) as engine:
        async with engine.decisions(1 << 16) as feed, anyio.create_task_group() as tg:
            n = int(seconds * 1000)

            async def emit() -> None:
                for i in range(n):
                    await source.inject(source.event("oom", Scope("v1", f"/bench-{i}")))
                    await anyio.sleep(0.001)

            async def reload() -> None:
                assert reload_every_s is not None
                while True:
                    await anyio.sleep(reload_every_s)
                    await engine.reload(cfg)

            tg.start_soon(emit)
            if reload_every_s:
                tg.start_soon(reload)
            waits: list[float] = []
            async for d in feed:
                waits.append(d.stage_ns["queued"] / 1e9)
                if len(waits) == n:
                    break
            tg.cancel_scope.cancel()
        return waits, engine.snapshot().generation - 1, engine.stats.events


def event_waits(args: argparse.Namespace) -> None:
    rows = []
    for label, every in (("no reload", None), ("a reload every 200 ms", 0.2)):
        waits, reloads, events = anyio.run(_event_waits, every, args.event_seconds)
        rows.append((label, reloads, events, len(waits), *_ms(waits)))
    print(table(f"events during reloads: one event a millisecond for {args.event_seconds:g} s, wait before its decision (ms)",
                ("run", "reloads", "events", "decisions", "p50", "p99", "max"), rows))


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.ops")
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--settle", type=float, default=5.0)
    ap.add_argument("--requests", type=int, default=500)
    ap.add_argument("--reloads", type=int, default=20)
    ap.add_argument("--event-seconds", type=float, default=5.0)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix=f"oomkit-bench-ops-{os.getpid()}-") as tmp:
        round_trips(args, Path(tmp))
        event_waits(args)
        idle(args, Path(tmp))


if __name__ == "__main__":
    main(sys.argv[1:])
