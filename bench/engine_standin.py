"""Runs ``oomkit.Engine`` on a config file until SIGTERM/SIGINT, then prints its stats as JSON.

    python -m bench.engine_standin -c CONFIG [--plugin MODULE:OBJECT ...]

A stand-in for ``python -m oomkit serve -c CONFIG`` for benchmarks that need the engine in a
process of its own; it logs to stderr at level info, as the daemon does (the engine logs
``engine ready`` once every source is armed).  Plugins are the ``--plugin`` ones, passed
to the engine as an embedding program would (so they keep their own names and
``[plugins.<name>]`` tables), plus the config's ``[plugins] load`` list; the entry-point
group is not loaded.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import signal
import sys
from typing import Any

import anyio

from oomkit import Engine, load_config


async def serve(path: str, plugins: list[str]) -> dict[str, object]:
    engine = Engine(load_config(path), plugins=[_import(spec)() for spec in plugins], autoload=False)
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with engine:
            async for _ in signals:
                break
    return {
        "events": engine.stats.events,
        "ignored": engine.stats.ignored,
        "coalesced": engine.stats.coalesced,
        "cooled": engine.stats.cooled,
        "decisions": engine.stats.decisions,
        "source_failures": engine.stats.source_failures,
    }


def _import(spec: str) -> Any:
    module, _, attr = spec.partition(":")
    return getattr(importlib.import_module(module), attr)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.engine_standin")
    ap.add_argument("-c", "--config", required=True)
    ap.add_argument("--plugin", action="append", default=[], metavar="MODULE:CLASS")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s: %(message)s")
    print(json.dumps(anyio.run(serve, args.config, args.plugin, backend_options={"use_uvloop": True})), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
