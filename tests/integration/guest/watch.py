"""Runs inside the guest: oomkit sources, their events as JSON lines on stdout.

    python watch.py '{"kind": "memory-events", "cgroups": ["/t"]}' ['{"kind": "psi", ...}' ...]

Each argument is one ``[[sources]]`` table as JSON, decoded as a config file's would be.
With ``OOMKIT_WATCH_MLOCK=1`` in its environment it locks itself in memory first, as the
daemon does.  Prints ``{"watching": {source: [scopes]}, "faults": {source: N}}`` once every source runs and
again whenever that changes, and ``{"event": {...}}`` for every event.  Ends on SIGTERM.
The sources' log goes to stderr (INFO and up).
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import sys
from typing import Any

import anyio
import msgspec

from oomkit.config import config_from_dict
from oomkit.daemon import protect_self
from oomkit.events import Event
from oomkit.sources import build_sources


def say(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


async def main(specs: list[dict[str, Any]]) -> None:
    sources = build_sources(config_from_dict({"sources": specs}, "<guest watch.py>"))
    send, recv = anyio.create_memory_object_stream[Event](math.inf)

    async def emit(event: Event) -> None:
        await send.send(event)

    def state() -> dict[str, Any]:
        return {
            "watching": {s.name: [str(x) for x in getattr(s, "watching", [])] for s in sources},
            "faults": {s.name: getattr(s, "faults", 0) for s in sources},
        }

    async with anyio.create_task_group() as tg:
        for source in sources:
            await tg.start(source.run, emit)
        last = state()
        say(last)

        async def report() -> None:
            async for event in recv:
                say({"event": msgspec.to_builtins(event)})

        async def follow() -> None:
            nonlocal last
            while True:
                await anyio.sleep(0.1)
                if state() != last:
                    last = state()
                    say(last)

        async def stop() -> None:
            with anyio.open_signal_receiver(signal.SIGTERM) as signals:
                async for _ in signals:
                    tg.cancel_scope.cancel()

        tg.start_soon(report)
        tg.start_soon(follow)
        tg.start_soon(stop)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    if os.environ.get("OOMKIT_WATCH_MLOCK"):
        # As `oomkit serve` does: a watcher under global memory pressure must not thrash.
        protect_self(config_from_dict({}, "<guest watch.py>"))
    anyio.run(main, [json.loads(a) for a in sys.argv[1:]])
