"""A decision timeline from a real memcg OOM: ``oomkit plot`` on what ``oomkit serve
--takeover`` logged.

The ``leak-beside-cache`` scenario of :mod:`bench.scenarios` (a 150 MiB cache holding still,
a leak growing 20 MiB/s after the 8.5 s pre-roll, a real v1 memcg with a 256 MiB limit
under this process's own) runs once under ``oomkit serve --takeover`` with the default
policy, the ``jsonl`` log writing a memory sample of the memcg every 0.25 s
(``[plugins.jsonl] sample_interval_s = 0.25``, ``[history] warm_fraction = 0``: the scope
is sampled from the start, not only near its limit).  The log is then drawn with ``oomkit
plot`` into the picture below: the memcg's charge against its limit, the leak's own size
(the victim), the decision at the OOM and its stage times.

    python -m bench oom_timeline                     # or: python -m bench.oom_timeline --plot FILE.png --log FILE.jsonl
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from oomkit.events import Decision
from oomkit.plot import load, plot
from oomkit.records import MemorySample, read_log

from . import scenarios
from .stats import table

CONFIG = "[history]\nwarm_fraction = 0.0\n\n[plugins.jsonl]\nsample_interval_s = 0.25\n"
SCENARIO = "leak-beside-cache"


def main(argv: Sequence[str]) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.oom_timeline")
    ap.add_argument("--plot", metavar="FILE", help="draw the timeline here (default: a temporary file)")
    ap.add_argument("--log", metavar="FILE", help="keep the JSON-lines log here")
    args = ap.parse_args(argv)
    reason = scenarios.skip_reason()
    if reason:
        print(f"oom_timeline benchmark skipped: {reason}\n")
        return
    with tempfile.TemporaryDirectory(prefix=f"oomkit-timeline-{os.getpid()}-") as tmp:
        log = Path(args.log) if args.log else Path(tmp) / "events.jsonl"
        (run,) = scenarios.measure(scenarios.BY_NAME[SCENARIO], "oomkit", 1, config=CONFIG, keep_log=log)
        records = [rec for _, rec in read_log(log)]
        out = args.plot or str(Path(tmp) / "timeline.png")
        timeline = load(log, f"v1:{_scope_path(records)}")
        plot(timeline, out, title=f"{SCENARIO}: a real memcg OOM under oomkit serve --takeover (256 MiB limit)")
    samples = [r for r in records if isinstance(r, MemorySample)]
    kills = [d for d in timeline.decisions if d.kill is not None and d.kill.sent_ns]
    rows: list[tuple[object, ...]] = []
    for d in kills:
        assert d.kill is not None
        before = [s for s in timeline.samples if s.monotonic_ns <= d.event.monotonic_ns]
        rows.append((d.id, d.outcome, f"{d.victim.pid} {d.victim.name}" if d.victim else "-",
                     before[-1].usage_bytes >> 20 if before else "-",
                     (d.kill.sent_ns - d.event.monotonic_ns) / 1e6, sum(d.stage_ns.values()) / 1e6))
    print(table(f"{SCENARIO}, one run: {len(samples)} memory samples and {len(timeline.decisions)} decisions logged;"
                f" died first: {run.first}",
                ("decision", "outcome", "victim", "charge at the last sample before, MiB", "event → kill sent ms",
                 "decision ms"), rows))
    if args.plot:
        print(f"![{SCENARIO} timeline]({Path(args.plot).name})")


def _scope_path(records: Sequence[Decision | MemorySample]) -> str:
    """The scenario's memcg path, as the daemon named it (its name carries this pid)."""
    for r in records:
        scope = r.event.scope if isinstance(r, Decision) else r.scope
        if scope.tree == "v1":
            return scope.path
    raise RuntimeError("the log names no v1 memcg: no samples and no decisions were written")


if __name__ == "__main__":
    main(sys.argv[1:])
