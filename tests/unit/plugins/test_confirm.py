"""The confirmation gate: a low-memory report acts only once repeated (and lasting)."""

from __future__ import annotations

import pytest

from oomkit import Event, Scope
from oomkit.testing import FakeProc, harness
from oomkit_plugins.confirm import Confirm

from .support import config, configured

S = 1_000_000_000


def low(t_s: float, scope: Scope = Scope()) -> Event:
    return Event(source="t", kind="low-memory", scope=scope, monotonic_ns=int(t_s * S))


def gate(fake_proc: FakeProc, **settings: object) -> Confirm:
    return configured(Confirm(), config(fake_proc, confirm=settings))


def test_the_first_report_waits_and_the_second_acts(fake_proc: FakeProc) -> None:
    g = gate(fake_proc)
    assert g.oomkit_should_act(low(100.0)) is False
    assert g.oomkit_should_act(low(100.01)) is None  # confirmed: the engine's defaults decide


def test_reports_too_far_apart_do_not_confirm_each_other(fake_proc: FakeProc) -> None:
    g = gate(fake_proc, window_s=1.0)
    assert g.oomkit_should_act(low(100.0)) is False
    assert g.oomkit_should_act(low(102.0)) is False  # a new count
    assert g.oomkit_should_act(low(102.5)) is None


def test_the_condition_must_also_last(fake_proc: FakeProc) -> None:
    g = gate(fake_proc, repeats=3, persist_s=1.0)
    assert [g.oomkit_should_act(low(t)) for t in (100.0, 100.2, 100.4, 100.9, 101.3)] == [False] * 4 + [None]


def test_scopes_are_counted_apart_and_oom_is_never_held(fake_proc: FakeProc) -> None:
    g = gate(fake_proc, kinds=["low-memory", "threshold"])
    jobs = Scope("v1", "/jobs")
    assert g.oomkit_should_act(low(100.0)) is False
    assert g.oomkit_should_act(low(100.1, jobs)) is False
    assert g.oomkit_should_act(Event(source="t", kind="oom", scope=jobs)) is None
    up = Event(source="t", kind="threshold", scope=jobs, values={"direction": 1.0}, monotonic_ns=int(100.2 * S))
    assert g.oomkit_should_act(up) is None  # the second report for /jobs (any kind in `kinds`)
    down = Event(source="t", kind="threshold", scope=jobs, values={"direction": -1.0}, monotonic_ns=int(100.3 * S))
    assert g.oomkit_should_act(down) is None  # back below: the count starts again
    assert g.oomkit_should_act(low(100.4, jobs)) is False


def test_bad_settings_name_their_key(fake_proc: FakeProc) -> None:
    from oomkit import ConfigError

    with pytest.raises(ConfigError, match=r"\$\.plugins\.confirm\.repeats"):
        gate(fake_proc, repeats=0)


@pytest.mark.anyio
async def test_through_the_engine_a_blip_is_ignored_and_a_repeat_decided(fake_proc: FakeProc) -> None:
    fake_proc.add_process(10, "hog", rss=1 << 30)
    async with harness(proc=fake_proc) as h:
        assert await h.offer(h.event("low-memory")) is None
        d = await h.offer(h.event("low-memory"))
    assert d is not None and d.victim is not None and d.victim.name == "hog"
    assert h.engine.stats.ignored == 1
