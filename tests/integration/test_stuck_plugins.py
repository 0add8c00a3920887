"""A plugin stuck for good cannot hold a taken-over memcg nor keep ``oomkit serve`` from
exiting, against the real kernel (real v1 memcgs, real OOMs, a real daemon and watchdog).

Waits are generous; the times are printed (``-s``) and measured in ``python -m bench storm``,
never asserted.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from oomkit.daemon import EXIT_STUCK
from oomkit.journal import Journal

from .. import kernel
from ..takeover_support import Daemon, oom_control, takeover_config, wait_for

pytestmark = pytest.mark.kernel

MiB = 1 << 20
Make = Callable[..., kernel.Cgroup]
LONG = 60.0


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    started: list[Daemon] = []

    def start(config: str) -> Daemon:
        d = Daemon(tmp_path, config, tag=str(len(started)))
        started.append(d)
        return d.wait_ready()

    yield start
    for d in started:
        d.cleanup()


def _config(cg: kernel.Cgroup, run_dir: Path, plugin: str) -> str:
    # The engine's own give-up is an hour away: only the watchdog's deadline can act.
    extra = (
        "\n[engine]\nsync_hook_timeout_s = 3600\nkill_timeout_s = 3600\n"
        f'\n[daemon]\nshutdown_timeout_s = 2\n\n[plugins]\nload = ["tests.stuck_plugins:{plugin}"]\n'
    )
    return takeover_config([cg.rel], run_dir, deadline_s=1.0, extra=extra)


def _stop(d: Daemon) -> tuple[int, float]:
    t0 = time.monotonic()
    d.signal(signal.SIGTERM)
    status = d.proc.wait(timeout=LONG)
    return status, time.monotonic() - t0


def test_a_sync_veto_that_never_returns_holds_neither_the_memcg_nor_the_daemon(
    memcg: Make, daemons: Callable[..., Daemon], tmp_path: Path
) -> None:
    cg = memcg(limit=32 * MiB)
    run_dir = tmp_path / "run"
    d = daemons(_config(cg, run_dir, "NeverVeto"))
    hog = cg.hog(64)
    # The watchdog hands the memcg back at its deadline; the kernel kills the hog.
    assert hog.wait(timeout=LONG) == -signal.SIGKILL
    assert oom_control(cg.path)["oom_kill"] >= 1
    status, took = _stop(d)
    print(f"\nSIGTERM with a sync veto stuck for good: exit {status} after {took * 1e3:.0f} ms")
    # The veto's thread is abandoned, not waited for: a clean exit, with one line naming it.
    assert status == 0, d.stderr()
    assert "plugin never_veto, hook oomkit_veto is still running" in d.stderr()
    assert oom_control(cg.path)["oom_kill_disable"] == 0 and Journal(run_dir).names() == []


def test_an_async_killer_that_shields_itself_cannot_keep_the_daemon_from_exiting(
    memcg: Make, daemons: Callable[..., Daemon], tmp_path: Path
) -> None:
    cg = memcg(limit=32 * MiB)
    run_dir = tmp_path / "run"
    d = daemons(_config(cg, run_dir, "ShieldedKiller"))
    hog = cg.hog(64)
    assert hog.wait(timeout=LONG) == -signal.SIGKILL  # the watchdog's hand-back, then the kernel
    status, took = _stop(d)
    print(f"\nSIGTERM with an async killer shielded for good: exit {status} after {took * 1e3:.0f} ms"
          " (shutdown_timeout_s = 2)")
    assert status == EXIT_STUCK, d.stderr()
    assert "waiting on shielded_killer.oomkit_kill" in d.stderr()
    # Gone without its clean-up finishing: the watchdog (or the source before it) restored.
    wait_for(lambda: oom_control(cg.path)["oom_kill_disable"] == 0, LONG, "oom_kill_disable back to 0")
