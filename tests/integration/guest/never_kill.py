"""Runs inside the guest, where root holds CAP_SYS_RESOURCE: a real child with
``oom_score_adj -1000`` offered to the real killer with ``protect`` out of the chain, honestly
and by a candidates plugin that lies about its adj.  Prints one JSON object per decision.

    python never_kill.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence

import anyio
import msgspec

from oomkit import Candidate, Config, Engine, Event, hookimpl
from oomkit.procfs import read_process
from oomkit_plugins.killer import SignalKiller


class Offer:
    name = "offer"

    def __init__(self, cands: Sequence[Candidate]) -> None:
        self.cands = list(cands)

    @hookimpl
    def oomkit_candidates(self) -> list[Candidate]:
        return self.cands


async def decide(offered: Candidate) -> dict[str, object]:
    async with Engine(Config(sources=()), plugins=[Offer([offered]), SignalKiller()], autoload=False) as e:
        d = await e.decide(Event(source="guest", kind="oom"))
    return {"outcome": d.outcome, "vetoes": [[v.plugin, v.reason] for r in d.ranking for v in r.vetoes]}


async def main() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    try:
        fd = os.open(f"/proc/{child.pid}/oom_score_adj", os.O_WRONLY)
        try:
            os.write(fd, b"-1000")
        finally:
            os.close(fd)
        honest = read_process("/proc", child.pid)
        assert honest is not None
        print(json.dumps({"adj": honest.oom_score_adj, **await decide(honest)}), flush=True)
        print(json.dumps(await decide(msgspec.structs.replace(honest, oom_score_adj=0))), flush=True)
        print(json.dumps({"alive": child.poll() is None}), flush=True)
    finally:
        child.kill()
        child.wait()


if __name__ == "__main__":
    anyio.run(main)
