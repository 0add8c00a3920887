"""`oomkit top --watch` in a real terminal (tmux) on a fake tree: from a daemon serving the
same tree (a candidate appears, a decision is listed, `q` exits 0) and locally (the same,
with `d` deciding); the control socket's `history` op and its bounds; the pieces drawn."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import msgspec
import pytest

from oomkit import Engine, Event, Scope
from oomkit.cgroupfs import mounts_for
from oomkit.config import HistoryConfig
from oomkit.cli import main
from oomkit.control import MAX_HISTORY_PROCESSES, Request
from oomkit.liveview import View, read_scope_memory, render, sparkline
from oomkit.records import ProcessHistory, ScopeHistory
from oomkit.testing import FakeCgroups, FakeProc, config_for

from .. import terminal
from .test_control import running, sockdir  # noqa: F401  (the fixture, used by name)

MiB = 1 << 20


def _config(tmp: Path, proc: FakeProc) -> Path:
    p = tmp / "oomkit.toml"
    # The default meminfo source polls the fake meminfo: lowering MemAvailable there makes
    # the daemon decide (in dry-run: the fake pids may be anybody's on this machine).
    p.write_text(f'[paths]\nproc = "{proc.path}"\nrun_dir = "{tmp / "run"}"\n\n[engine]\ndry_run = true\n')
    return p


@pytest.fixture
def tree(fake_proc: FakeProc) -> FakeProc:
    fake_proc.set_meminfo(mem_total=8 << 30, mem_available=4 << 30)
    fake_proc.add_process(1, "init", rss=4 * MiB)
    fake_proc.add_process(100, "editor", rss=200 * MiB)
    fake_proc.add_process(200, "database", rss=900 * MiB)
    return fake_proc


@pytest.fixture
def tmux_ok() -> None:
    reason = terminal.skip_reason()
    if reason:
        pytest.skip(reason)


@pytest.fixture
def watch(tmp_path: Path, tmux_ok: None) -> Iterator[list[terminal.Tmux]]:
    made: list[terminal.Tmux] = []
    yield made
    for t in made:
        t.close()


def _top_watch(tmp: Path, cfg: Path, made: list[terminal.Tmux]) -> terminal.Tmux:
    t = terminal.Tmux([sys.executable, "-m", "oomkit", "top", "--watch", "-c", str(cfg), "--interval", "0.2",
                       "--rank-every", "0.5"], tmp)
    made.append(t)
    return t


def test_watch_shows_a_daemons_new_candidate_and_decision_and_quits_on_q(
    tmp_path: Path, tree: FakeProc, watch: list[terminal.Tmux]
) -> None:
    cfg = _config(tmp_path, tree)
    log = tmp_path / "serve.log"
    with open(log, "wb") as err:
        daemon = subprocess.Popen([sys.executable, "-m", "oomkit", "serve", "-c", str(cfg)],
                                  stdout=subprocess.DEVNULL, stderr=err)
    try:
        deadline = time.monotonic() + 60
        while b"oomkit ready" not in log.read_bytes():
            assert daemon.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        t = _top_watch(tmp_path, cfg, watch)
        shown = t.wait_for(lambda s: "database" in s, 60, "the daemon's ranking")
        assert f"daemon on {tmp_path / 'run' / 'control.sock'}" in shown
        assert "newcomer" not in shown and "none yet" in shown
        assert "meminfo" in shown  # the sources panel: the daemon's source

        tree.add_process(300, "newcomer", rss=1500 * MiB)
        shown = t.wait_for(lambda s: "newcomer" in s, 60, "the new candidate")
        rows = [ln.split() for ln in shown.splitlines() if ln.split()[:2] in (["300", "newcomer"], ["200", "database"])]
        assert [r[1] for r in rows] == ["newcomer", "database"], "the largest ranks first"

        tree.set_meminfo(mem_total=8 << 30, mem_available=100 * MiB)
        shown = t.wait_for(lambda s: "low-memory from meminfo" in s, 60, "the daemon's decision")
        line = next(ln for ln in shown.splitlines() if "low-memory from meminfo" in ln)
        assert "dry-run" in line and "300 newcomer" in line and "1,500" in line

        t.send("q")
        assert t.exit_status(30) == 0
    finally:
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=30) == 0, log.read_text()


def test_watch_without_a_daemon_ranks_samples_and_decides_locally(
    tmp_path: Path, tree: FakeProc, watch: list[terminal.Tmux]
) -> None:
    t = _top_watch(tmp_path, _config(tmp_path, tree), watch)
    shown = t.wait_for(lambda s: "database" in s, 60, "the local ranking")
    assert "this process (no daemon answers)" in shown and "press d for a dry-run decision" in shown

    tree.add_process(300, "newcomer", rss=1500 * MiB)
    # Its memory history, sampled by the view's own engine, shows as its range.
    shown = t.wait_for(lambda s: "1500-1500" in s, 60, "the new candidate and its history")
    assert "newcomer" in shown

    t.send("d")
    shown = t.wait_for(lambda s: "oom from top" in s, 60, "the local decision")
    line = next(ln for ln in shown.splitlines() if "oom from top" in ln)
    assert "dry-run" in line and "300 newcomer" in line

    t.send("p")
    t.wait_for(lambda s: "[PAUSED]" in s, 30, "paused")
    t.send("q")
    assert t.exit_status(30) == 0
    assert tree.path.joinpath("300").exists(), "nothing was killed or changed"


def test_watch_needs_a_terminal(capsys: pytest.CaptureFixture[str], tree: FakeProc, tmp_path: Path) -> None:
    code = main(["top", "--watch", "-c", str(_config(tmp_path, tree))])
    assert code == 1
    assert capsys.readouterr().err == "oomkit: error: top --watch needs a terminal on standard input and output\n"


def test_watch_refuses_flags_that_do_not_apply(capsys: pytest.CaptureFixture[str], tree: FakeProc,
                                               tmp_path: Path) -> None:
    assert main(["top", "--watch", "--json", "-c", str(_config(tmp_path, tree))]) == 2
    assert "--json and --sample do not apply" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["top", "--watch", "--interval", "nan"])
    assert "not within 0.05 to 60 seconds" in capsys.readouterr().err


# --- the control socket's history op ----------------------------------------------------------

@pytest.mark.anyio
async def test_history_op_answers_bounded_samples_requested_pids_first(fake_proc: FakeProc, sockdir: Path) -> None:  # noqa: F811
    # The engine's own sampler does not run, so the only samples are this test's (whose
    # clock runs ahead of the real one).
    async with running(fake_proc, sockdir / "c.sock", history=HistoryConfig(enabled=False)) as r:
        history = r.engine.history
        cold = await anyio.to_thread.run_sync(r.client.request, Request(v=1, op="history"))
        assert cold["sampled"] is False and cold["history"] == []
        now = time.monotonic_ns()
        history.touch(Scope(), "oom", now)
        for i in range(40):
            fake_proc.add_process(4000, "hog", rss=(300 + i) * MiB)
            history.tick(now + i * 250_000_000)
        got = msgspec.convert(await anyio.to_thread.run_sync(
            r.client.request, Request(v=1, op="history", pids=(4001,), limit=1, points=5)), ScopeHistory)
        assert got.sampled and got.processes == 2
        (small,) = got.history
        assert small.pid == 4001 and small.name == "small" and len(small.rss_bytes) <= 5
        got = msgspec.convert(await anyio.to_thread.run_sync(
            r.client.request, Request(v=1, op="history", limit=2, points=4)), ScopeHistory)
        hog = got.history[0]
        assert [h.pid for h in got.history] == [4000, 4001], "then the largest"
        assert len(hog.rss_bytes) == 4 and hog.rss_bytes[-1] == 339 * MiB, "thinned, the newest kept"
        assert list(hog.times_ns) == sorted(hog.times_ns)
        assert got.rss_bytes == (339 + 10) * MiB
        big = await anyio.to_thread.run_sync(r.client.request, Request(v=1, op="history", limit=60000))
        assert len(big["history"]) <= MAX_HISTORY_PROCESSES


# --- the pieces drawn --------------------------------------------------------------------------


def test_sparkline_scales_to_the_range_and_draws_noise_flat() -> None:
    assert sparkline([1, 2, 3, 4, 5, 6, 7, 8], 8) == "▁▂▃▄▅▆▇█"
    assert sparkline([100, 100.5, 100], 8) == "▄▄▄"
    assert sparkline(range(100), 10) == sparkline(range(90, 100), 10) == "▁▁▂▃▄▅▆▇██", "the last ten"
    assert sparkline([], 5) == "" and sparkline([0, 0], 5) == "▁▁"


def test_scope_memory_is_read_from_the_scopes_files(fake_proc: FakeProc, fake_cgroups: FakeCgroups) -> None:
    fake_cgroups.mkdir_v1("/jobs", limit=256 * MiB, usage=100 * MiB)
    fake_cgroups.mkdir_v1("/free", usage=5 * MiB)
    fake_proc.set_pressure(some_avg10=1.5, full_avg10=0.5)
    mounts = mounts_for(config_for(fake_proc, fake_cgroups).paths)
    jobs = read_scope_memory(mounts, Scope("v1", "/jobs"))
    assert (jobs.usage_bytes, jobs.limit_bytes, jobs.some_avg10) == (100 * MiB, 256 * MiB, None)
    assert read_scope_memory(mounts, Scope("v1", "/free")).limit_bytes is None, "v1's huge number is no limit"
    system = read_scope_memory(mounts, Scope())
    assert system.limit_bytes == 8 << 30 and (system.some_avg10, system.full_avg10) == (1.5, 0.5)
    assert read_scope_memory(mounts, Scope("v1", "/gone")).usage_bytes is None


def test_render_shows_a_history_only_for_the_process_it_belongs_to(fake_proc: FakeProc) -> None:
    from rich.console import Console

    fake_proc.add_process(10, "grower", rss=50 * MiB, start_ticks=500)
    fake_proc.add_process(11, "reused", rss=40 * MiB, start_ticks=900)
    engine = Engine(config_for(fake_proc), dry_run=True)
    ranking = engine.rank(Event(source="t", kind="oom"))
    times = tuple(range(4))
    hist = ScopeHistory(scope=Scope(), sampled=True, window_s=8, interval_s=0.25, now_ns=10, processes=2, history=(
        ProcessHistory(pid=10, name="grower", start_ticks=500, times_ns=times,
                       rss_bytes=(10 * MiB, 20 * MiB, 30 * MiB, 50 * MiB)),
        ProcessHistory(pid=11, start_ticks=1, times_ns=times, rss_bytes=(MiB,) * 4),
    ))
    view = View(backend_label="test", scopes=[Scope()], status=engine.snapshot(), ranking=ranking, history=hist)
    console = Console(record=True, width=220)
    console.print(render(view))
    text = console.export_text()
    grower = next(ln for ln in text.splitlines() if " grower " in ln)
    reused = next(ln for ln in text.splitlines() if " reused " in ln)
    assert "▁▂▄█" in grower and "10-50" in grower
    assert "▁▁▁▁" not in reused, "another process's history (start time differs) is not drawn"
    assert "burst" in text and "kernel_badness" in text, "every scorer's column"
