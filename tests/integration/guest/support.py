"""Host-side helpers for the guest tests: sources run by ``watch.py``, hogs in guest cgroups.

Emulation is 5-10x slower than this machine and the machine itself may be busy: every wait
here is a poll with a generous deadline, and tests assert on counters and outcomes only.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.guest import Guest, GuestCgroup, Process

CHECKOUT = Path(__file__).resolve().parents[3]
WATCH = Path(__file__).with_name("watch.py")
DECIDE = Path(__file__).with_name("decide.py")
HOG = CHECKOUT / "tests" / "hog.py"
MiB = 1 << 20
START_S = 90.0
"""Deadline for a guest Python process importing oomkit to be up (~5 s on a quiet host)."""


class Watch:
    """``watch.py`` running in the guest: the sources' events and watched scopes so far."""

    def __init__(self, proc: Process) -> None:
        self.proc = proc

    def lines(self) -> list[dict[str, Any]]:
        self.proc.poll()
        return self.proc.json()

    def events(self, kind: str | None = None, source: str | None = None) -> list[dict[str, Any]]:
        return [
            ln["event"] for ln in self.lines()
            if "event" in ln and (kind is None or ln["event"]["kind"] == kind)
            and (source is None or ln["event"]["source"] == source)
        ]

    def state(self) -> dict[str, Any]:
        """The last ``{"watching": ..., "faults": ...}`` line."""
        return [ln for ln in self.lines() if "watching" in ln][-1]

    def wait(self, until: Callable[[Watch], bool], what: str, timeout: float = 60.0) -> None:
        self.proc.wait_for(lambda _: until(self), timeout=timeout, what=what)

    def __repr__(self) -> str:
        return f"<Watch {self.proc!r}>"

    def log(self) -> str:
        self.proc.poll()
        return self.proc.stderr.decode(errors="replace")

    def stop(self) -> None:
        rc = self.proc.stop()
        assert rc in (0, -15), f"watch.py ended with {rc}:\n{self.log()}"


def watch(guest: Guest, *specs: dict[str, Any], mlock: bool = False) -> Watch:
    """Start ``watch.py`` with these ``[[sources]]`` tables; returns once every source runs.

    ``mlock`` locks it in memory, as the daemon locks itself, for tests of a global shortage."""
    env = {"OOMKIT_WATCH_MLOCK": "1"} if mlock else {}
    proc = guest.spawn([guest.interpreter, str(WATCH), *map(json.dumps, specs)], cwd=str(CHECKOUT), env=env)
    proc.wait_for(lambda p: any("watching" in ln for ln in p.json()), timeout=START_S, what="sources started")
    return Watch(proc)


def hog(cg: GuestCgroup, mib: int, *args: str) -> Process:
    """``tests/hog.py`` in ``cg``: touches ``mib`` MiB of anonymous memory."""
    return cg.spawn([cg.guest.interpreter, str(HOG), str(mib), *args], cwd=str(CHECKOUT))


_READ = r"""
import sys, time
with open(sys.argv[1], "rb") as f:
    while f.read(1 << 20):
        pass
print("done", flush=True)
time.sleep(600)
"""


def read_into_cache(cg: GuestCgroup, path: Path) -> Process:
    """A process in ``cg`` that read ``path`` (a host file, over 9p) into page cache charged
    to ``cg``, and waits; returned once the whole file is read."""
    reader = cg.spawn([cg.guest.interpreter, "-c", _READ, str(path)], cwd=str(CHECKOUT))
    touched(reader)
    return reader


def decide(guest: Guest, scope: GuestCgroup, plugins: dict[str, Any], *extra: str) -> dict[str, Any]:
    """One real decision on ``scope`` in the guest (``decide.py``, its extra arguments too)."""
    out = guest.run([guest.interpreter, str(DECIDE), scope.rel, json.dumps(plugins), *extra], cwd=str(CHECKOUT),
                    timeout=3 * START_S)
    decision: dict[str, Any] = json.loads(out.text.splitlines()[-1])  # after "grow" when it warms
    return decision


def touched(proc: Process) -> None:
    """Wait until a ``--hold`` hog has touched all its memory."""
    proc.wait_for(lambda p: "done" in p.lines(), timeout=START_S, what="the hog touched its memory")


def total(events: list[dict[str, Any]], key: str) -> float:
    """The sum of ``values[key]`` over events (a counter's deltas add up to its growth)."""
    return sum(float(e["values"].get(key, 0.0)) for e in events)
