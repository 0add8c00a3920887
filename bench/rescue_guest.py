"""``python -m bench rescue_guest``: how often the kernel-side rescuers end a v2 cgroup's
shortage with nobody dead, in the guest kernel (tests/guest: QEMU TCG, 1 vCPU, 512 MiB).

Each run is one real decision (``tests/integration/guest/decide.py``: every first-party
plugin, real kills) for an ``oom`` event on a fresh cgroup, whose source holds while the
cgroup's ``memory.current`` is above a bound 16 MiB under what it was at the start:

* **reclaim** (``memory.reclaim``): the cgroup holds 48 MiB of page cache (a host file read
  over 9p, a new file each run so no cache is warm) and an 8 MiB anonymous hog; the
  rescuer asks the kernel to reclaim the cgroup's usage.  No swap.
* **pageout** (``process_madvise(MADV_PAGEOUT)``): zram (128 MiB) is the guest's swap; the
  cgroup holds one 32 MiB anonymous hog, which the rescuer pages out.

A run is *rescued* when the decision's outcome is ``rescued`` (the re-check after the
rescue found usage under the bound) and every process in the cgroup is still alive;
``rescuer said`` is its own word per run (``timeout``: it had not answered within the
engine's ``rescue_timeout_s`` when the re-check ran, yet what it did so far may have cleared
the condition), ``freed`` what it said it freed (0 when it did not say), ``rescue ms`` its
elapsed time as the engine counted it, ``decision ms`` the sum of the decision's stages.  The guest is emulated (5-10x slower than this machine):
the rates are the figures to keep, the milliseconds only beside each other.

    python -m bench rescue_guest     # or: python -m bench.rescue_guest --runs 10
"""

from __future__ import annotations

import argparse
from collections import Counter
import sys
import tempfile
from pathlib import Path
from typing import Any

from tests.guest import Guest, GuestCgroup, Image, Process, Unavailable, prepare
from tests.integration.guest.support import MiB, decide, hog, read_into_cache, touched

from .stats import summary, table



def _held(cg: GuestCgroup, mib: int) -> Process:
    p = hog(cg, mib, "--hold")
    touched(p)
    return p


def _decide(g: Guest, cg: GuestCgroup, plugins: dict[str, Any]) -> dict[str, Any]:
    return decide(g, cg, plugins, str(int(cg.read("memory.current")) - 16 * MiB))


def _row(g: Guest, cg: GuestCgroup, procs: list[Process], d: dict[str, Any]) -> dict[str, Any]:
    alive = all(p.poll() is None for p in procs)
    rescues = d.get("rescues", [])
    stages = d.get("stage_ns", {})
    row = {
        "rescued": d["outcome"] == "rescued" and alive, "outcome": d["outcome"],
        "said": ",".join(r["result"] for r in rescues) or "-",
        "freed": sum(r.get("freed_bytes", 0) for r in rescues) / MiB,
        "rescue_ms": sum(r.get("elapsed_ns", 0) for r in rescues) / 1e6,
        "decision_ms": sum(stages.values()) / 1e6,
    }
    for p in procs:
        if p.poll() is None:
            p.signal(9)
            p.wait()
    cg.wait_empty()
    cg.remove()
    return row


def reclaim_runs(image: Image, runs: int, tmp: Path) -> list[dict[str, Any]]:
    rows = []
    with Guest(image) as g:
        for n in range(runs):
            data = tmp / f"cache-{n}" / "cache.bin"
            data.parent.mkdir()
            with data.open("wb") as f:
                for _ in range(48):
                    f.write(bytes(range(256)) * 4096)
            cg = GuestCgroup.make(g, f"bench-reclaim-{n}")
            procs = [read_into_cache(cg, data), _held(cg, 8)]
            plugins = {"reclaim": {"scopes": [f"v2:{cg.rel}"], "fraction": 1.0, "min_bytes": 32 * MiB}}
            rows.append(_row(g, cg, procs, _decide(g, cg, plugins)))
            data.unlink()
    return rows


def pageout_runs(image: Image, runs: int) -> list[dict[str, Any]]:
    rows = []
    with Guest(image, zram=True) as g:
        g.sh("echo 128M > /sys/block/zram0/disksize && mkswap /dev/zram0 >/dev/null && swapon /dev/zram0")
        for n in range(runs):
            cg = GuestCgroup.make(g, f"bench-pageout-{n}")
            procs = [_held(cg, 32)]
            plugins = {"pageout": {"scopes": [f"v2:{cg.rel}"]}}
            rows.append(_row(g, cg, procs, _decide(g, cg, plugins)))
            g.sh("swapoff /dev/zram0 && swapon /dev/zram0")  # the next run starts with empty swap
    return rows


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.rescue_guest")
    ap.add_argument("--runs", type=int, default=10)
    args = ap.parse_args(argv)
    try:
        image = prepare()
    except Unavailable as exc:
        print(f"## rescues in the guest kernel\n\nnot measured: {exc}\n")
        return
    with tempfile.TemporaryDirectory(prefix="oomkit-bench-rescue-") as tmp:
        results = {"reclaim (memory.reclaim, page cache)": reclaim_runs(image, args.runs, Path(tmp)),
                   "pageout (MADV_PAGEOUT, zram)": pageout_runs(image, args.runs)}
    rows: list[tuple[object, ...]] = []
    for what, got in results.items():
        ok = [r for r in got if r["rescued"]]
        others = sorted({r["outcome"] for r in got if not r["rescued"]})
        said = Counter(r["said"] for r in got)
        freed, rescue, decision = (summary([r[k] for r in ok]) for k in ("freed", "rescue_ms", "decision_ms"))
        rows.append((what, len(got), len(ok), ", ".join(others) or "-", ", ".join(f"{k} {n}" for k, n in said.items()),
                     freed["p50"], rescue["p50"], rescue["p99"], decision["p50"]))
    print(table("rescues in the guest kernel: one decision per run, nobody may die (guest 6.1, TCG 1 vCPU)",
                ("rescuer", "runs", "rescued", "other outcomes", "rescuer said", "freed MiB p50", "rescue ms p50", "p99",
                 "decision ms p50"), rows))


if __name__ == "__main__":
    main(sys.argv[1:])
