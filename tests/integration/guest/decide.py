"""Runs inside the guest: one real decision (every first-party plugin, real kills) for an
``oom`` event on a v2 scope, with ``[plugins.*]`` tables from a JSON argument; prints the
decision as one JSON line.  The event's source is one whose re-check reads the scope's
``memory.events`` ``oom`` counter and ``memory.current`` against a bound, so a rescue that
freed memory shows as the condition cleared.

    python decide.py SCOPE_PATH PLUGINS_JSON [HOLDS_ABOVE_BYTES]
"""

from __future__ import annotations

import json
import sys

import anyio

from oomkit import Config, Engine, Event, Scope, to_json
from oomkit.config import config_from_dict
from oomkit.testing import FakeSource


class CurrentAbove(FakeSource):
    """Holds while the cgroup's memory.current is above ``bound`` bytes (0: always)."""

    def __init__(self, directory: str, bound: int) -> None:
        super().__init__("guest")
        self.directory = directory
        self.bound = bound

    def still_holds(self, event: Event) -> bool:
        if not self.bound:
            return True
        with open(f"{self.directory}/memory.current") as f:
            return int(f.read()) > self.bound


async def main() -> None:
    path, plugins = sys.argv[1], json.loads(sys.argv[2])
    bound = int(sys.argv[3]) if len(sys.argv) > 3 else 0
    config: Config = config_from_dict({"sources": [], "plugins": plugins}, "<guest>")
    source = CurrentAbove(f"/sys/fs/cgroup{path}", bound)
    async with Engine(config, sources=[source]) as engine:
        d = await engine.decide(Event(source="guest", kind="oom", scope=Scope("v2", path)))
    sys.stdout.buffer.write(to_json(d) + b"\n")


if __name__ == "__main__":
    anyio.run(main)
