"""The ``pressure`` should_act gate: threshold, duration, hysteresis, rising, reclaim."""

from __future__ import annotations


import anyio
import pytest

from oomkit import ConfigError, Engine, Event, Scope
from oomkit.config import Config, PluginsConfig
from oomkit.testing import FakeCgroups, FakeProc, config_for
from oomkit_plugins.pressure import Pressure

S = 1_000_000_000
JOB = Scope(tree="v2", path="/job")


def gate(fake_proc: FakeProc, cgroups: FakeCgroups | None = None, **settings: object) -> Pressure:
    set_vmstat(fake_proc, 0)
    cfg = config_for(fake_proc, cgroups, plugins=PluginsConfig(settings={"pressure": dict(settings)}))
    p = Pressure()
    p.oomkit_configure(cfg)
    return p


def set_vmstat(proc: FakeProc, scanned: int) -> None:
    (proc.root / "vmstat").write_text(
        f"nr_free_pages 1000\npgscan_kswapd {scanned}\npgscan_direct {scanned}\npgsteal_kswapd 0\n"
    )


def ev(t_s: float, kind: str = "pressure", scope: Scope = JOB, **values: float) -> Event:
    return Event(source="psi", kind=kind, scope=scope, values=values, monotonic_ns=int(t_s * S))  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", ["oom", "low-memory", "threshold", "memory-events", "kernel-kill"])
def test_no_opinion_on_other_kinds(fake_proc: FakeProc, kind: str) -> None:
    assert gate(fake_proc).oomkit_should_act(ev(0, kind, some_avg10_pct=99)) is None


def test_no_opinion_on_pressure_without_a_known_measure(fake_proc: FakeProc) -> None:
    assert gate(fake_proc).oomkit_should_act(ev(0, quiet_s=1)) is None


def test_acts_once_above_for_the_duration_with_reclaim(fake_proc: FakeProc) -> None:
    g = gate(fake_proc, threshold_pct=20, duration_s=10)
    assert g.oomkit_should_act(ev(0, some_avg10_pct=10)) is False
    assert g.oomkit_should_act(ev(2, some_avg10_pct=30)) is False  # the clock starts
    assert g.oomkit_should_act(ev(8, some_avg10_pct=30)) is False
    set_vmstat(fake_proc, 5)
    assert g.oomkit_should_act(ev(12, some_avg10_pct=30)) is True


def test_no_reclaim_no_action(fake_proc: FakeProc) -> None:
    g = gate(fake_proc, duration_s=0)
    assert g.oomkit_should_act(ev(0, some_avg10_pct=90)) is False
    assert g.oomkit_should_act(ev(5, some_avg10_pct=90)) is False
    set_vmstat(fake_proc, 1)
    assert g.oomkit_should_act(ev(6, some_avg10_pct=90)) is True


def test_reclaim_not_required(fake_proc: FakeProc) -> None:
    g = gate(fake_proc, duration_s=0, require_reclaim=False)
    assert g.oomkit_should_act(ev(0, some_avg10_pct=90)) is True


def test_uses_the_cgroups_own_scan_counter(fake_proc: FakeProc, fake_cgroups: FakeCgroups) -> None:
    d = fake_cgroups.mkdir_v2("/job")
    (d / "memory.stat").write_text("anon 0\npgscan 10\npgsteal 0\n")
    g = gate(fake_proc, fake_cgroups, duration_s=1)
    assert g.oomkit_should_act(ev(0, some_avg10_pct=90)) is False
    set_vmstat(fake_proc, 1000)  # the system reclaims; this cgroup does not
    assert g.oomkit_should_act(ev(2, some_avg10_pct=90)) is False
    (d / "memory.stat").write_text("anon 0\npgscan 11\npgsteal 0\n")
    assert g.oomkit_should_act(ev(3, some_avg10_pct=90)) is True


def test_hysteresis_keeps_the_clock_running(fake_proc: FakeProc) -> None:
    g = gate(fake_proc, threshold_pct=20, clear_pct=10, duration_s=5, require_reclaim=False)
    assert g.oomkit_should_act(ev(0, some_avg10_pct=25)) is False
    assert g.oomkit_should_act(ev(3, some_avg10_pct=15)) is False  # below 20, above 10: still on
    assert g.oomkit_should_act(ev(5, some_avg10_pct=15)) is True
    assert g.oomkit_should_act(ev(6, some_avg10_pct=5)) is False  # below 10: cleared
    assert g.oomkit_should_act(ev(7, some_avg10_pct=15)) is False  # 15 < 20 starts nothing


def test_cleared_event_and_silence_reset_the_clock(fake_proc: FakeProc) -> None:
    g = gate(fake_proc, duration_s=5, stale_s=4, require_reclaim=False)
    g.oomkit_should_act(ev(0, some_avg10_pct=50))
    assert g.oomkit_should_act(ev(1, "pressure-cleared", some_avg10_pct=0)) is False
    assert g.oomkit_should_act(ev(5, some_avg10_pct=50)) is False  # restarted at 5
    assert g.oomkit_should_act(ev(9, some_avg10_pct=50)) is False
    assert g.oomkit_should_act(ev(14, some_avg10_pct=50)) is False  # 5 s silence: restarted at 14
    assert g.oomkit_should_act(ev(17, some_avg10_pct=50)) is False
    assert g.oomkit_should_act(ev(19, some_avg10_pct=50)) is True


def test_scopes_are_judged_apart(fake_proc: FakeProc) -> None:
    g = gate(fake_proc, duration_s=5, require_reclaim=False)
    other = Scope(tree="v2", path="/other")
    g.oomkit_should_act(ev(0, some_avg10_pct=50))
    assert g.oomkit_should_act(ev(5, scope=other, some_avg10_pct=50)) is False
    assert g.oomkit_should_act(ev(5, some_avg10_pct=50)) is True


def test_rising_requires_avg10_over_avg60(fake_proc: FakeProc) -> None:
    g = gate(fake_proc, duration_s=0, rising=True, require_reclaim=False)
    assert g.oomkit_should_act(ev(0, some_avg10_pct=30, some_avg60_pct=40)) is False
    assert g.oomkit_should_act(ev(1, some_avg10_pct=45, some_avg60_pct=40)) is True


def test_metric_full(fake_proc: FakeProc) -> None:
    g = gate(fake_proc, metric="full_avg10_pct", duration_s=0, require_reclaim=False)
    assert g.oomkit_should_act(ev(0, some_avg10_pct=90, full_avg10_pct=5)) is False
    assert g.oomkit_should_act(ev(1, some_avg10_pct=90, full_avg10_pct=25)) is True


def test_pressure_levels(fake_proc: FakeProc) -> None:
    g = gate(fake_proc, min_level="medium", duration_s=0, require_reclaim=False)
    v1 = Scope(tree="v1", path="/job")
    assert g.oomkit_should_act(ev(0, scope=v1, pressure_level=1)) is False
    assert g.oomkit_should_act(ev(1, scope=v1, pressure_level=2)) is True


def test_unreadable_reclaim_counters_do_not_block(fake_proc: FakeProc, caplog: pytest.LogCaptureFixture) -> None:
    g = gate(fake_proc, duration_s=0)
    (fake_proc.root / "vmstat").unlink()
    assert g.oomkit_should_act(ev(0, some_avg10_pct=90)) is True
    assert g.oomkit_should_act(ev(1, some_avg10_pct=90)) is True
    assert sum("reclaim counters" in r.getMessage() for r in caplog.records) == 1


def test_bad_settings_name_the_file_and_key(fake_proc: FakeProc) -> None:
    cfg = Config(plugins=PluginsConfig(settings={"pressure": {"threshold_pct": 200}}), origin="/etc/oomkit.toml")
    with pytest.raises(ConfigError, match=r"^/etc/oomkit.toml: Expected `float` <= 100.0 - at `\$\.plugins\.pressure\.threshold_pct`$"):
        Engine(cfg, autoload=False, plugins=[Pressure()])


@pytest.mark.anyio
async def test_engine_decides_on_pressure_only_through_the_gate(fake_proc: FakeProc) -> None:
    set_vmstat(fake_proc, 0)
    settings = {"pressure": {"duration_s": 0.0, "require_reclaim": False, "threshold_pct": 10.0}}
    cfg = config_for(fake_proc, plugins=PluginsConfig(settings=settings))
    async with Engine(cfg, autoload=False, plugins=[Pressure()]) as engine:
        await engine.submit(Event(source="psi", kind="pressure", scope=JOB, values={"some_avg10_pct": 5.0}))
        await engine.submit(Event(source="psi", kind="pressure", scope=JOB, values={"some_avg10_pct": 50.0}))
        with anyio.fail_after(5):
            while engine.stats.decisions < 1:
                await anyio.sleep(0.01)
    assert engine.stats.ignored == 1 and engine.stats.decisions == 1
