"""Runs inside the guest: one real decision (every first-party plugin, real kills) for an
``oom`` event on a v2 scope, with ``[plugins.*]`` tables from a JSON argument; prints the
decision as one JSON line.  The event's source is one whose re-check reads the scope's
``memory.events`` ``oom`` counter and ``memory.current`` against a bound, so a rescue that
freed memory shows as the condition cleared.

    python decide.py SCOPE_PATH PLUGINS_JSON [HOLDS_ABOVE_BYTES [WARM_S]]

With ``WARM_S`` the engine first samples the scope (a 3 s history window): it prints
``grow`` after ``WARM_S`` (everyone there by then is older than the window), samples 3 s
more, and decides.
"""

from __future__ import annotations

import json
import sys
import time

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
    warm = float(sys.argv[4]) if len(sys.argv) > 4 else 0.0
    raw: dict[str, object] = {"sources": [], "plugins": plugins}
    if warm:
        raw["history"] = {"window_s": 3.0, "interval_s": 0.1}
    config: Config = config_from_dict(raw, "<guest>")
    source = CurrentAbove(f"/sys/fs/cgroup{path}", bound)
    scope = Scope("v2", path)
    async with Engine(config, sources=[source]) as engine:
        if warm:
            engine.history.touch(scope, "threshold", time.monotonic_ns())  # as a source's event would
            await anyio.sleep(warm)
            print("grow", flush=True)
            await anyio.sleep(3.0)
        d = await engine.decide(Event(source="guest", kind="oom", scope=scope))
    sys.stdout.buffer.write(to_json(d) + b"\n")


if __name__ == "__main__":
    anyio.run(main)
