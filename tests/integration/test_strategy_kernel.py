"""The whole default chain under ``oomkit serve --takeover`` picks the common-sense victim in
real memcg OOMs (the scenarios of ``bench/scenarios.py``, with a 2 s history window so each
takes a few seconds), where the kernel's own killer picks another."""

from __future__ import annotations

import pytest

from bench import scenarios

pytestmark = pytest.mark.kernel

# Shorter history so the pre-roll is 2.5 s; a burst's parent then leads by that much.
FAST = "[history]\nwindow_s = 2.0\ninterval_s = 0.1\n[plugins.burst]\nparent_lead_s = 1.0\n"


@pytest.fixture(autouse=True)
def _can_run() -> None:
    reason = scenarios.skip_reason()
    if reason:
        pytest.skip(reason)


@pytest.mark.parametrize("name", ["leak-beside-cache", "fork-burst", "critical-database", "shared-memfd"])
def test_the_default_policy_kills_the_cause(name: str) -> None:
    scenario = scenarios.BY_NAME[name]
    (run,) = scenarios.measure(scenario, "oomkit", 1, config=FAST, window_s=2.0)
    assert run.ooms, "the scenario never reached its limit"
    chose = [(d.outcome, d.victim and (d.victim.pid, d.victim.name), d.killed, d.detail[:160]) for d in run.decisions]
    assert run.first in scenario.right, f"{name}: {run.first} died first, deaths {run.deaths}; decisions {chose}"
    assert run.collateral(scenario.right) == 0, f"{name}: collateral deaths {run.deaths}"
    if name == "fork-burst":
        # The whole burst in one decision: more than one worker died right away.
        assert sum(1 for _, _, comm in run.deaths if comm == "worker") > 1


def test_a_scope_near_its_limit_sees_no_kill() -> None:
    (run,) = scenarios.measure(scenarios.BY_NAME["control-near-limit"], "oomkit", 1, config=FAST, window_s=2.0)
    assert run.deaths == []
