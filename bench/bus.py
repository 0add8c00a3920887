"""Bus throughput: events per second through coalescing, decisions per second through the chain.

* **coalescing**: one scope is kept busy by a decision whose kill waits (a plugin that holds
  it), so every further event for that scope lands in the one-slot pending box; events per
  second from the first ``submit`` to the dispatcher having taken the last one.
* **decisions**: ``Engine.decide`` in dry-run, one after another (each followed by one
  checkpoint, so notifiers run as they would), over a fake /proc of 100 processes and over
  the real /proc; the default plugins.

On asyncio, uvloop and trio.

    python -m bench bus           # or: python -m bench.bus --events 200000 --decisions 300
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio

from oomkit import Candidate, Config, Engine, Event, hookimpl
from oomkit.config import EngineConfig, PluginsConfig
from oomkit.testing import config_for

from .selection import fake_tree
from .stats import table

BACKENDS: list[tuple[str, str, dict[str, Any]]] = [
    ("asyncio", "asyncio", {}),
    ("uvloop", "asyncio", {"use_uvloop": True}),
    ("trio", "trio", {}),
]


class Hold:
    """A killer that claims the victim and waits to be released: the scope stays busy."""

    name = "bench_hold"

    def __init__(self) -> None:
        self.release: anyio.Event | None = None

    @hookimpl
    async def oomkit_kill(self, event: Event, victim: Candidate) -> None:
        assert self.release is not None
        await self.release.wait()


async def coalesce(config: Config, n: int) -> float:
    hold = Hold()
    async with Engine(config, plugins=[hold]) as engine:
        hold.release = anyio.Event()
        event = Event(source="bench", kind="low-memory")
        t0 = time.perf_counter()
        for _ in range(n):
            await engine.submit(event)
        while engine.stats.events < n:
            await anyio.sleep(0)
        rate = n / (time.perf_counter() - t0)
        assert engine.stats.coalesced >= n - 2, engine.stats
        hold.release.set()
        # Let the decision and the pending event finish before leaving (it is dropped in
        # the hold-off of a decision that killed nobody, or decided).
        while engine.stats.decisions < 1 or engine.snapshot(recent=0).deciding:
            await anyio.sleep(0)
    return rate


async def decisions(config: Config, n: int) -> float:
    async with Engine(config, dry_run=True) as engine:
        event = Event(source="bench", kind="low-memory")
        t0 = time.perf_counter()
        for _ in range(n):
            await engine.decide(event)
            await anyio.sleep(0)
        return n / (time.perf_counter() - t0)


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.bus")
    ap.add_argument("--events", type=int, default=200_000)
    ap.add_argument("--decisions", type=int, default=300)
    args = ap.parse_args(argv)
    rows = []
    base = "/dev/shm" if os.path.isdir("/dev/shm") else None
    with tempfile.TemporaryDirectory(dir=base) as tmp:
        fake = fake_tree(Path(tmp) / "proc", 100)
        # The confirmation gate holds back a first low-memory report: the bus is measured here.
        held = config_for(fake, engine=EngineConfig(kill_timeout_s=600),
                          plugins=PluginsConfig(disable=("killer", "jsonl", "confirm")))
        for label, backend, options in BACKENDS:
            ev = anyio.run(coalesce, held, args.events, backend=backend, backend_options=options)
            # jsonl would print every decision to stdout: a notifier, off the chain measured here.
            quiet = PluginsConfig(disable=("jsonl",))
            dec_fake = anyio.run(decisions, config_for(fake, plugins=quiet), args.decisions,
                                 backend=backend, backend_options=options)
            dec_real = anyio.run(decisions, Config(sources=(), plugins=quiet), args.decisions,
                                 backend=backend, backend_options=options)
            rows.append((label, f"{ev:,.0f}", f"{dec_fake:,.0f}", f"{dec_real:,.0f}"))
    print(table(
        f"bus throughput ({args.events:,} events; {args.decisions} dry-run decisions)",
        ("loop", "events/s through coalescing", "decisions/s, 100 fake processes", "decisions/s, real /proc"),
        rows,
    ))


if __name__ == "__main__":
    main(sys.argv[1:])
