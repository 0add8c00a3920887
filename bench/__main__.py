"""``python -m bench [NAME ...]``: run the named benchmarks (default: all) with their defaults.

Each one also runs alone with its own options: ``python -m bench.NAME --help``.
"""

from __future__ import annotations

import importlib
import sys

# In the order a reader wants them: the decision path first, then costs at rest.
ALL = ["memcg_oom", "takeover_faults", "scenarios", "oom_timeline", "history", "kernel_page", "threshold",
       "selection", "bus", "idle", "idle_sources", "ops", "kill_latency", "shared_page", "v2brake", "guest", "rescue", "rescue_guest",
       "storm", "loop_stall"]


def selected(argv: list[str]) -> list[str] | None:
    """The benchmarks ``argv`` names (all when empty), or None after saying which are unknown."""
    names = argv or ALL
    unknown = [n for n in names if n not in ALL]
    if unknown:
        print(f"unknown benchmark(s): {', '.join(unknown)}; known: {', '.join(ALL)}", file=sys.stderr)
        return None
    return names


def main(argv: list[str]) -> int:
    names = selected(argv)
    if names is None:
        return 2
    for name in names:
        importlib.import_module(f"bench.{name}").main([])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
