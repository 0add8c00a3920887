"""The benchmarks cannot rot: every module imports, and the cheap ones run in a tiny size."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.__main__ import ALL


@pytest.mark.parametrize("name", [*ALL, "report", "peers", "native", "tracing", "stats"])
def test_imports(name: str) -> None:
    importlib.import_module(f"bench.{name}")


def test_selection_runs_tiny(capsys: pytest.CaptureFixture[str]) -> None:
    from bench import selection

    selection.main(["--sizes", "5", "--repeat", "2"])
    out = capsys.readouterr().out
    assert "fake /proc, 5" in out and "real /proc" in out


def test_shared_page_runs_tiny_with_both_producers(capsys: pytest.CaptureFixture[str]) -> None:
    from bench import native, shared_page

    if native.skip_reason():
        pytest.skip(native.skip_reason() or "")
    shared_page.main(["--rounds", "20", "--runs", "1", "--burst", "200"])
    out = capsys.readouterr().out
    # Every latency row has its numbers (a producer that failed to start would time out).
    rows = [line for line in out.splitlines() if line.startswith("publish -> event, uvloop")]
    placements = 2 if len(os.sched_getaffinity(0)) > 1 else 1  # as the scheduler picks, and pinned
    assert len(rows) == 4 * 2 * placements, out  # 4 rows per loop, in the run's table and the summary
    assert "uvloop, C producer, reader idle" in out


def test_bus_runs_tiny(capsys: pytest.CaptureFixture[str]) -> None:
    from bench import bus

    bus.main(["--events", "300", "--decisions", "2"])
    out = capsys.readouterr().out
    assert all(loop in out for loop in ("asyncio", "uvloop", "trio"))


def test_nohang_patch_is_generated_not_kept(tmp_path: Path) -> None:
    from bench import peers

    if peers.skip_reason("nohang"):
        pytest.skip(str(peers.skip_reason("nohang")))
    argv = peers.nohang_command(tmp_path, 1 << 20)
    patched = Path(argv[1]).read_text()
    assert "mem_total * 1.0" in patched and "mem_total * 0.5 or mem_min_kb" not in patched
    assert "@BADNESS_ADJ_RE_NAME 1000 /// ^benchhog$" in Path(argv[-1]).read_text()


def test_report_update_replaces_or_inserts_one_section() -> None:
    from bench.report import update

    doc = "# Benchmarks\n\nheader\n\n# `memcg_oom`\n\nold oom\n# inner heading\n\n# `threshold`\n\nold threshold\n"
    new = update(doc, {"memcg_oom": "# `memcg_oom`\n\nnew oom\n", "kernel_page": "# `kernel_page`\n\nkp\n"})
    header, sections = new.split("<!-- /costs -->\n")
    assert header.startswith("# Benchmarks\n\nheader\n\n<!-- costs -->\n")
    assert sections == ("\n# `memcg_oom`\n\nnew oom\n\n# `kernel_page`\n\nkp\n\n"
                        "# `threshold`\n\nold threshold\n")
    assert "| `threshold` | not recorded | - |" in header


def test_each_section_says_its_cost_and_the_header_sums_them(capsys: pytest.CaptureFixture[str]) -> None:
    from bench.report import QUICK, run_section, update

    section = run_section("selection", ["--sizes", "5", "--repeat", "1"])
    assert section.startswith("# `selection`\n\nVictim selection cost")
    cost = section.splitlines()[-1]
    assert cost.startswith("Cost: ") and cost.endswith("(`python -m bench selection`).")
    seconds = int(cost.split()[1])
    doc = update("# Benchmarks\n\n", {"selection": section})
    again = update(doc, {"bus": "# `bus`\n\nCost: 61 s of wall time on 2026-12-02 (`python -m bench bus`).\n"})
    assert again.count("<!-- costs -->") == 1, "the table is replaced, not added again"
    assert f"| `selection` | {seconds} s | `--sizes 100 1000 --repeat 10` |" in again
    assert "| `bus` | 61 s | `--events 50000 --decisions 100` |" in again
    assert f"{(seconds + 61) / 60:.0f} minutes for the sections that recorded theirs" in again
    assert set(QUICK) <= set(ALL)


def test_the_scenarios_decision_time_comes_from_each_runs_first_kill() -> None:
    from oomkit import Candidate, Decision, Event, KillResult

    from bench.scenarios import DECISION_COLUMNS, Run, decision_times

    def killed(ev_ns: int, stage_ms: float) -> Decision:
        return Decision(id=1, event=Event(source="m", kind="oom", monotonic_ns=ev_ns), outcome="killed",
                        victim=Candidate(pid=5, name="leak", start_ticks=1000),
                        kill=KillResult(action="signal", outcome="killed", sent_ns=ev_ns + 2_000_000),
                        stage_ns={"candidates": int(stage_ms * 1e6), "kill": 30_000_000})

    runs = [Run(decisions=[Decision(id=0, event=Event(source="m", kind="oom"), outcome="all-vetoed"),
                           killed(10, 1.0), killed(99, 9.0)]),
            Run(decisions=[killed(20, 3.0)]), Run()]
    row = decision_times("leak-beside-cache", runs)
    assert row is not None and len(row) == len(DECISION_COLUMNS)
    assert row[:4] == ("leak-beside-cache", 2, "leak", 2.0), "the median of the first kills, 1 and 3 ms"
    assert row[6] == 2.0 and row[7] == 32.0
    assert decision_times("control", [Run()]) is None


def test_loop_stall_other_process_ranks_and_says_how_long(tmp_path: Path) -> None:
    from bench.selection import fake_tree

    fake = fake_tree(tmp_path / "proc", 5)
    child = subprocess.Popen([sys.executable, "-m", "bench.loop_stall", "--rank-forever", str(fake.root), "5"],
                             stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[2])
    try:
        assert child.stdout is not None
        # Every line but the rankings' is the decision's own output (its JSON line): skipped.
        timings: list[float] = []
        for line in iter(child.stdout.readline, ""):
            if line.startswith("ms "):
                timings.append(float(line[3:]))
                break
        assert timings and timings[0] > 0
    finally:
        child.terminate()
        child.communicate(timeout=60)
    assert child.returncode == 0  # SIGTERM ends it cleanly
