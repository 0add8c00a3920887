"""The cgroup v2 brake in the guest kernel (tests/guest: QEMU TCG, 1 vCPU, 512 MiB).

* **brake → victim dead**: ``oomkit serve`` with a ``memory-high`` source brakes a cgroup
  (``memory.max`` 64 MiB, ``memory.high`` 16 MiB under it, deadline 10 s, default plugins);
  one hog allocates 1 MiB chunks until it dies.  Timed in the guest from the inotify wake at
  which ``memory.events`` ``high`` first rose (the brake engaged) to the hog's pidfd saying it
  exited.  Every run must end by oomkit's kill (``kernel_kills`` 0), else it is reported.
* **kernel → victim dead**: the same hog in a cgroup with only ``memory.max`` 64 MiB, timed
  from the wake at which ``max`` first rose to the hog's exit: the kernel's own killer in the
  same guest.  The guest is emulated (5-10x slower than this machine), so the ratio is the
  figure to keep, not the milliseconds.
* **hold**: how long the kernel's throttle alone (``memory.high`` 16 MiB under a 128 MiB
  ``memory.max``, nobody deciding) keeps 1 and 20 allocating tasks from ``memory.max``: from
  the first ``high`` to the first ``max``.  The delay is per task, so 20 tasks climb faster.

    python -m bench v2brake          # or: python -m bench.v2brake --runs 20 --holds 3
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from tests.guest import Guest, GuestCgroup, Unavailable, prepare

from .stats import summary, table

CHECKOUT = Path(__file__).resolve().parents[1]
SCRIPT = Path(__file__).with_name("v2brake_guest.py")
MiB = 1 << 20


def _guest_script(g: Guest, *args: str, timeout: float) -> list[dict[str, Any]]:
    out = g.run([g.interpreter, str(SCRIPT), *args], cwd=str(CHECKOUT), timeout=timeout)
    return [json.loads(ln) for ln in out.text.splitlines() if ln.startswith("{")]


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.v2brake")
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--holds", type=int, default=3)
    args = ap.parse_args(argv)
    try:
        image = prepare()
    except Unavailable as exc:
        print(f"## cgroup v2 brake\n\nnot measured: {exc}\n")
        return
    with Guest(image) as g:
        kernel_cg = GuestCgroup.make(g, "bench-kernel")
        brake_cg = GuestCgroup.make(g, "bench-brake")
        hold_cg = GuestCgroup.make(g, "bench-hold")
        for cg, limit in ((kernel_cg, 64), (brake_cg, 64), (hold_cg, 128)):
            cg.write("memory.max", limit * MiB)
        timeout = 240.0 * args.runs
        kernel = _guest_script(g, "kill", kernel_cg.path, str(args.runs), "max", timeout=timeout)
        config = "/tmp/oomkit-bench-v2brake.toml"
        g.write(config, f'[paths]\nrun_dir = "/tmp/oomkit-bench-v2brake"\n\n[[sources]]\nkind = "memory-high"\n'
                        f'cgroups = ["{brake_cg.rel}"]\nmargin = "16M"\ndeadline_s = 10.0\n')
        daemon = g.spawn([str(Path(g.interpreter).with_name("oomkit")), "serve", "-c", config, "--log-level", "warning"])
        deadline = time.monotonic() + 120
        while g.read_text(f"{brake_cg.path}/memory.high").strip() == "max":
            if time.monotonic() > deadline or daemon.poll() is not None:
                raise SystemExit(f"oomkit serve did not brake {brake_cg.rel}: {daemon.stderr.decode(errors='replace')}")
            time.sleep(0.2)
        braked = _guest_script(g, "kill", brake_cg.path, str(args.runs), "high", timeout=timeout)
        daemon.stop()
        holds = {n: _guest_script(g, "hold", hold_cg.path, str(args.holds), str(n), timeout=400.0 * args.holds)
                 for n in (1, 20)}
        release = g.run(["uname", "-r"]).text.strip()
        for cg in (kernel_cg, brake_cg, hold_cg):
            cg.remove()
    ok_k = [r["ms"] for r in kernel if r["ms"] is not None]
    ok_b = [r["ms"] for r in braked if r["ms"] is not None and r["kernel_kills"] == 0]
    by_kernel = sum(1 for r in braked if r["kernel_kills"])
    sk, sb = summary(ok_k), summary(ok_b)
    rows: list[tuple[object, ...]] = [
        ("kernel: memory.max reached → victim dead", sk["n"], sk["p50"], sk["p99"], sk["min"], sk["max"]),
        ("oomkit: brake engaged → victim dead", sb["n"], sb["p50"], sb["p99"], sb["min"], sb["max"]),
        ("ratio oomkit / kernel", "", sb["p50"] / sk["p50"], sb["p99"] / sk["p99"], "", ""),
    ]
    title = f"v2 brake vs the kernel's memory.max killer, 64 MiB, 16 MiB margin (ms; guest {release}, TCG 1 vCPU)"
    print(table(title, ("what", "n", "p50", "p99", "min", "max"), rows))
    if by_kernel:
        print(f"{by_kernel} of {len(braked)} braked runs ended by the kernel's killer, not oomkit's (left out above)\n")
    hold_rows = []
    for n, results in holds.items():
        held = [r["s"] for r in results if r["s"] is not None]
        capped = sum(1 for r in results if r["capped"])
        s = summary(held)
        hold_rows.append((f"{n} task{'s' if n > 1 else ''}", s["n"], s["p50"], s["min"], s["max"], capped))
    print(table("how long memory.high (16 MiB under a 128 MiB memory.max) holds allocating tasks off memory.max (s)",
                ("tasks", "n", "p50", "min", "max", "capped at 150 s"), hold_rows))


if __name__ == "__main__":
    main(sys.argv[1:])
