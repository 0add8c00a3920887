"""An event storm: 10 000 events a second for 30 s over 5 000 fake processes, in dry-run.

A fake source submits ``low-memory`` events for the system scope at the given rate (paced in
batches of 100), and every ``--oom-every``-th event is an ``oom`` of that scope instead (a
takeover's paused memcg must always be decided: never held off, never displaced by a lesser
event).  The system scope's ranking reads every one of the 5 000 processes of a fake /proc
(the default plugins), so a decision costs what a real one does at that size; the engine's
defaults bound the rest (the hold-off after each decision that killed nobody, the top 20 of
each ranking kept, ``recent`` in 4 MiB).  Measured in the same process: RSS (``VmRSS``
every 0.25 s) before the storm, at its peak and after, the engine's counters, decisions that
overlapped another of the same scope (must be 0), whether the last ``oom`` sent was decided,
and the worker threads alive at the peak.  ``tests/integration/test_storm.py`` runs this and
asserts on the counters.

    python -m bench storm            # or: python -m bench.storm --seconds 30 --rate 10000 --processes 5000
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import anyio

from oomkit import Decision, Engine, Event, hookimpl
from oomkit.config import EngineConfig, PluginsConfig
from oomkit.testing import FakeSource, config_for

from .selection import fake_tree
from .stats import table


def rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


class Record:
    """Every decision's scope, start and end, and the seq of each ``oom`` decided."""

    name = "bench_record"

    def __init__(self) -> None:
        self.spans: list[tuple[str, int, int]] = []
        self.oom_seqs: list[int] = []

    @hookimpl
    async def oomkit_notify(self, decision: Decision) -> None:
        ev = decision.event
        start = ev.monotonic_ns + decision.stage_ns.get("queued", 0)
        self.spans.append((str(ev.scope), start, decision.monotonic_ns))
        if ev.kind == "oom":
            self.oom_seqs.append(int(ev.values.get("seq", -1)))


def overlaps(spans: list[tuple[str, int, int]]) -> int:
    """Decisions that began before the previous one of the same scope had ended."""
    out = 0
    last: dict[str, int] = {}
    for scope, start, end in sorted(spans, key=lambda s: s[1]):
        if start < last.get(scope, 0):
            out += 1
        last[scope] = max(last.get(scope, 0), end)
    return out


async def storm(proc_root: Path, seconds: float, rate: int, oom_every: int) -> dict[str, Any]:
    from oomkit.testing import FakeProc

    proc = FakeProc(proc_root)
    config = config_for(proc, engine=EngineConfig(notify_queue_size=4096),
                        plugins=PluginsConfig(disable=("jsonl", "killer", "confirm")))
    src = FakeSource()
    record = Record()
    samples: list[int] = []
    threads: list[int] = []
    sent = ooms = last_oom = 0
    async with Engine(config, plugins=[record], sources=[src], dry_run=True) as engine:
        before = rss_kib()

        async def sample() -> None:
            while True:
                samples.append(rss_kib())
                threads.append(threading.active_count())
                await anyio.sleep(0.25)

        async with anyio.create_task_group() as tg:
            tg.start_soon(sample)
            t0 = time.monotonic()
            batch = 100
            while (elapsed := time.monotonic() - t0) < seconds:
                due = int(elapsed * rate)
                while sent < due:
                    for _ in range(min(batch, due - sent)):
                        sent += 1
                        if sent % oom_every == 0:
                            ooms += 1
                            last_oom = sent
                            await src.inject(src.event("oom", seq=sent))
                        else:
                            await src.inject(src.event("low-memory"))
                    await anyio.sleep(0)
                await anyio.sleep(batch / rate)
            took = time.monotonic() - t0
            with anyio.fail_after(600):
                while engine.stats.events < sent or engine.snapshot(recent=0).deciding:
                    await anyio.sleep(0.05)
            tg.cancel_scope.cancel()
        st = engine.stats
        recent_bytes = engine.recent_bytes
        recent = len(engine.recent)
        outcomes = engine.snapshot(recent=0).outcomes
        while len(record.spans) < st.decisions - st.notify_dropped:
            await anyio.sleep(0.01)
    return {
        "seconds": took, "rate": sent / took, "sent": sent, "oom_sent": ooms, "last_oom": last_oom,
        "last_oom_decided": last_oom in record.oom_seqs, "oom_decisions": len(record.oom_seqs),
        "events": st.events, "decisions": st.decisions, "coalesced": st.coalesced, "held_off": st.held_off,
        "cooled": st.cooled, "ignored": st.ignored, "notify_dropped": st.notify_dropped,
        "overlaps": overlaps(record.spans), "recent": recent, "recent_bytes": recent_bytes,
        "rss_before_kib": before, "rss_peak_kib": max(samples, default=before),
        "rss_after_kib": rss_kib(), "threads_peak": max(threads, default=0), "outcomes": outcomes,
        "ranked": max((d.ranked for d in engine.recent), default=0),
    }


def run(seconds: float, rate: int, processes: int, oom_every: int) -> dict[str, Any]:
    base = "/dev/shm" if os.path.isdir("/dev/shm") else None
    with tempfile.TemporaryDirectory(prefix=f"oomkit-storm-{os.getpid()}-", dir=base) as tmp:
        fake_tree(Path(tmp) / "proc", processes)
        result = anyio.run(storm, Path(tmp) / "proc", seconds, rate, oom_every)
    result["processes"] = processes
    return result


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.storm")
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--rate", type=int, default=10_000, help="events per second")
    ap.add_argument("--processes", type=int, default=5000)
    ap.add_argument("--oom-every", type=int, default=100, help="every Nth event is an oom (0: none)")
    ap.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    args = ap.parse_args(argv)
    r = run(args.seconds, args.rate, args.processes, args.oom_every or 1 << 62)
    if args.json:
        print(json.dumps(r))
        return
    mib = 1024.0
    print(table(
        "storm: memory and accounting (asyncio, dry-run)",
        ["processes", "events/s", "s", "events", "oom events", "decisions", "oom decided", "coalesced", "held off",
         "overlaps", "last oom decided", "RSS before MiB", "peak MiB", "after MiB", "recent KiB", "threads peak"],
        [[r["processes"], round(r["rate"]), round(r["seconds"], 1), r["events"], r["oom_sent"], r["decisions"],
          r["oom_decisions"], r["coalesced"], r["held_off"], r["overlaps"], "yes" if r["last_oom_decided"] else "NO",
          r["rss_before_kib"] / mib, r["rss_peak_kib"] / mib, r["rss_after_kib"] / mib,
          r["recent_bytes"] // 1024, r["threads_peak"]]],
    ))


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
