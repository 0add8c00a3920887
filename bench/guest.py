"""The guest runner's costs (tests/guest): boot to the agent, one command, one file read.

* **boot**: from starting QEMU (software CPU, 1 vCPU, 512 MiB) to the agent's greeting,
  then power-off; a new guest each time.
* **command**: ``run(["true"])`` round trips through the agent (fork and exec in the guest).
* **read**: ``read("/sys/fs/cgroup/cgroup.controllers")``, a request the agent serves itself.
* **python**: a guest script with the checkout's interpreter over 9p, bare and importing what
  a source script imports (``oomkit.sources.memory_events`` pulls in anyio, asyncio, ssl).

    python -m bench guest         # or: python -m bench.guest --boots 5 --commands 50
"""

from __future__ import annotations

import argparse
import sys
import time

from tests.guest import Guest, Unavailable, prepare

from .stats import summary, table


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.guest")
    ap.add_argument("--boots", type=int, default=5)
    ap.add_argument("--commands", type=int, default=50)
    ap.add_argument("--scripts", type=int, default=5)
    args = ap.parse_args(argv)
    try:
        image = prepare()
    except Unavailable as exc:
        print(f"## guest runner\n\nnot measured: {exc}\n")
        return
    boots: list[float] = []
    commands: list[float] = []
    reads: list[float] = []
    bare: list[float] = []
    sources: list[float] = []
    for i in range(args.boots):
        with Guest(image) as g:
            assert g.boot_s is not None
            boots.append(g.boot_s)
            if i:
                continue  # the rest is measured in the first guest only
            for samples, call in (
                (commands, lambda: g.run(["true"])),
                (reads, lambda: g.read("/sys/fs/cgroup/cgroup.controllers")),
            ):
                for _ in range(args.commands):
                    t0 = time.perf_counter()
                    call()
                    samples.append(time.perf_counter() - t0)
            for samples, code in ((bare, "pass"), (sources, "import oomkit.sources.memory_events")):
                for _ in range(args.scripts):
                    t0 = time.perf_counter()
                    g.python(code)
                    samples.append(time.perf_counter() - t0)
    rows = []
    for label, values in (
        ("boot to agent, s", boots),
        ("run(['true']), s", commands),
        ("read(a cgroup file), s", reads),
        ("python -c pass, s", bare),
        ("python importing a source, s", sources),
    ):
        s = summary(values)
        rows.append((label, s["n"], s["p50"], s["p99"], s["min"], s["max"]))
    print(table(f"guest runner (kernel {image.release}, QEMU TCG, 1 vCPU)", ("what", "n", "p50", "p99", "min", "max"), rows))


if __name__ == "__main__":
    main(sys.argv[1:])
