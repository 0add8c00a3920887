"""``python -m bench rescue``: how often an embedding service's rescue (``oomkit.Rescuer``)
ends a memory shortage with nobody dead, on the real v1 memory controller.

Each run starts examples/shedding-service in a fresh memcg limited to 192 MiB (threshold
60 %, one 8 MiB worker), drives it with 300 requests of 1 MiB each over loopback, and
counts its decisions: *rescued* (the re-check found usage back under the threshold after
the cache was dropped) or not, and any death in the memcg.  A run succeeds when every
decision was rescued and nobody died.

    python -m bench.rescue [--runs N]
"""

from __future__ import annotations

import argparse
import select
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from oomkit.cgroupfs import find_mounts
from tests import kernel

SERVICE = Path(__file__).resolve().parents[1] / "examples" / "shedding-service" / "shedding_service.py"
MiB = 1 << 20
LIMIT = 192 * MiB
ITEMS = 300


def one(tmp: Path, n: int) -> tuple[int, int, int, bool]:
    """(decisions, rescued, deaths in the memcg, the service alive) for one run."""
    parent = kernel.v1_parent()
    root = find_mounts("/proc")[0]
    assert parent is not None and root is not None
    cg = kernel.make(parent, root, "rescue")
    try:
        cg.write("memory.limit_in_bytes", LIMIT)
        with open(tmp / f"service-{n}.log", "wb") as err:
            proc = cg.spawn([sys.executable, str(SERVICE), "--threshold", "60%", "--hold", "0.2"],
                            stdout=subprocess.PIPE, stderr=err)
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 60)
        line = proc.stdout.readline().decode() if ready else ""
        if not line.startswith("ready port "):
            raise RuntimeError(f"the service did not start: {line!r}")
        port = int(line.split()[2])
        pids = set(cg.procs())
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            for i in range(ITEMS):
                try:
                    if client.get(f"/item/k{i}").status_code == 503:
                        time.sleep(0.02)
                except httpx.TransportError:
                    break
            try:
                decisions = client.get("/decisions").json()
            except httpx.TransportError:
                decisions = []
        alive = proc.poll() is None
        deaths = len(pids - set(cg.procs())) + cg.keyed("memory.oom_control")["oom_kill"]
        proc.kill()
        proc.wait()
        proc.stdout.close()
        return len(decisions), sum(1 for d in decisions if d["outcome"] == "rescued"), deaths, alive
    finally:
        cg.remove()


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=10)
    args = ap.parse_args(argv)
    reason = kernel.v1_skip_reason()
    if reason:
        print(f"rescue: skipped: {reason}")
        return
    ok = decided = rescued = deaths = 0
    with tempfile.TemporaryDirectory(prefix="oomkit-bench-rescue-") as tmp:
        for n in range(args.runs):
            d, r, dead, alive = one(Path(tmp), n)
            decided, rescued, deaths = decided + d, rescued + r, deaths + dead
            ok += int(d > 0 and d == r and dead == 0 and alive)
    print("rescue by an embedding service (oomkit.Rescuer), v1 memcg 192 MiB, threshold 60 %")
    print(f"| method | runs | runs rescued, nobody dead | decisions | rescued | deaths |")
    print(f"|---|---|---|---|---|---|")
    print(f"| embedding service (shed-cache) | {args.runs} | {ok} ({100 * ok / max(1, args.runs):.0f} %) "
          f"| {decided} | {rescued} ({100 * rescued / max(1, decided):.0f} %) | {deaths} |")
    print(f"command: python -m bench rescue  (python -m bench.rescue --runs {args.runs})")


if __name__ == "__main__":
    main(sys.argv[1:])
