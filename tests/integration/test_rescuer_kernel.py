"""An embedded ``oomkit.Rescuer`` that hangs, on the real v1 memory controller: a usage
threshold crossing in a real memcg is decided, the rescue passes its deadline, and the kill
goes ahead (the hog dies by oomkit's signal), every attempt recorded."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import anyio
import pytest

from oomkit import Engine, Event, Rescuer, Scope, hookimpl
from oomkit.config import config_from_dict
from oomkit.events import Decision
from oomkit.testing import EARLY_TIMER_NS

from .. import kernel

pytestmark = pytest.mark.kernel

MiB = 1 << 20


class ActOnThreshold:
    name = "act_on_threshold"

    def __init__(self, scope: Scope) -> None:
        self.scope = scope

    @hookimpl(tryfirst=True)
    def oomkit_should_act(self, event: Event) -> bool | None:
        if event.kind == "threshold" and event.scope == self.scope:
            return event.values.get("direction", 0.0) > 0
        return None


@pytest.mark.anyio
async def test_a_rescuer_that_hangs_costs_its_deadline_then_the_kill(
    memcg: Callable[..., kernel.Cgroup], tmp_path: Path
) -> None:
    cg = memcg(limit=128 * MiB, tag="rhang")
    scope = Scope("v1", cg.rel)
    calls: list[Event] = []

    async def hangs(event: Event) -> int:
        calls.append(event)
        await anyio.sleep_forever()
        return 0

    raw = {
        "paths": {"run_dir": str(tmp_path / "run")},
        "sources": [{"kind": "memcg-threshold", "cgroups": [cg.rel], "thresholds": ["32M"]}],
        "engine": {"rescue_timeout_s": 0.5},
    }
    plugins = [ActOnThreshold(scope), Rescuer(hangs, name="hangs", scopes=[scope])]
    hog = None
    try:
        async with Engine(config_from_dict(raw, "<test>"), plugins=plugins) as engine:
            hog = cg.hog(48)
            done: list[Decision] = []
            with anyio.fail_after(60):
                while not done:
                    done = [d for d in engine.recent if d.outcome != "dry-run"]
                    await anyio.sleep(0.02)
        d = done[0]
        assert d.outcome == "killed", d.detail
        assert [(r.plugin, r.result, r.cleared) for r in d.rescues] == [("hangs", "timeout", False)]
        assert d.rescues[0].elapsed_ns >= 0.5e9 - EARLY_TIMER_NS and "rescue" in d.stage_ns
        assert d.victim is not None and d.victim.pid == hog.pid and d.killed == (hog.pid,)
        assert hog.wait(timeout=20) in (-15, -9) and len(calls) == 1  # the killer: SIGTERM, then SIGKILL after grace
        assert cg.keyed("memory.oom_control")["oom_kill"] == 0  # oomkit killed, not the kernel
    finally:
        if hog is not None and hog.poll() is None:
            hog.kill()
            hog.wait()
