"""The `oomkit` command on fake trees: check, plugins, top, and one-line errors."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest

from oomkit.cli import main
from oomkit.testing import FakeCgroups, FakeProc


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def cfg(tmp_path: Path, fake_proc: FakeProc, fake_cgroups: FakeCgroups) -> Path:
    """A config pointing at fake trees, with three processes in /proc and two in a memcg."""
    fake_proc.set_meminfo(mem_total=8 << 30, mem_available=4 << 30)
    fake_proc.add_process(1, "init", rss=4 << 20)
    fake_proc.add_process(100, "editor", rss=200 << 20, memcg="/web")
    fake_proc.add_process(200, "database", rss=900 << 20)
    fake_proc.add_process(300, "worker", rss=300 << 20, oom_score_adj=500, memcg="/web")
    fake_cgroups.mkdir_v1("/web", limit=1 << 30, pids=(100, 300))
    p = tmp_path / "oomkit.toml"
    p.write_text(
        f"""
[paths]
proc = "{fake_proc.path}"
memory_v1 = "{fake_cgroups.memory_v1}"
unified = "{fake_cgroups.unified}"
run_dir = "{tmp_path / 'run'}"  # never the default: a daemon running here would answer `top`

[plugins.protect]
names = ["data*"]
"""
    )
    return p


def test_check_prints_an_effective_config_that_reads_back(
    capsys: pytest.CaptureFixture[str], cfg: Path, tmp_path: Path
) -> None:
    code, out, err = run(capsys, "check", "-c", str(cfg), "--dry-run")
    assert code == 0, err
    assert out.startswith(f"# effective configuration ({cfg}); valid\n")
    doc = tomllib.loads(out)
    assert doc["engine"]["dry_run"] is True
    # Every plugin's table, with its defaults filled in.
    assert doc["plugins"]["protect"] == {"names": ["data*"], "cmdline": [], "cmdline_timeout_s": 0.05}
    assert doc["plugins"]["growth"] == {"buckets": 4, "noise_bytes": 1 << 20}
    # Every scorer's weight, the plugins' declared defaults included.
    first_party = {"burst": 1.0, "freed": 0.25, "growth": 1.0, "kernel_badness": 0.0, "preference": 0.1, "trigger": 0.1}
    assert {name: doc["weights"][name] for name in first_party} == first_party
    assert doc["sources"] == [
        {"kind": "meminfo", "name": "", "mem_available": "10%", "swap_free": "10%", "interval_min_s": 0.01,
         "interval_max_s": 3.0, "fill_rate_per_s": "6G"}
    ]
    again = tmp_path / "again.toml"
    again.write_text(out)
    assert run(capsys, "check", "-c", str(again))[0] == 0


def test_plugins_lists_first_party_plugins_and_their_hooks(capsys: pytest.CaptureFixture[str], cfg: Path) -> None:
    code, out, _ = run(capsys, "plugins", "-c", str(cfg))
    assert code == 0
    rows = {line.split()[0]: line for line in out.splitlines()[1:-1]}
    assert {"candidates", "kernel_badness", "protect", "killer", "jsonl"} <= rows.keys()
    assert "kill" in rows["killer"] and "entry point oomkit_plugins.killer:SignalKiller" in rows["killer"]
    assert out.splitlines()[-1] == "disabled: none"


def test_plugins_reports_what_is_disabled(capsys: pytest.CaptureFixture[str], cfg: Path) -> None:
    cfg.write_text(cfg.read_text() + '\n[plugins]\ndisable = ["jsonl"]\n')
    code, out, _ = run(capsys, "plugins", "-c", str(cfg))
    assert code == 0 and out.splitlines()[-1] == "disabled: jsonl"
    assert not any(line.startswith("jsonl ") for line in out.splitlines())


def test_top_ranks_the_system_highest_first_with_vetoes(capsys: pytest.CaptureFixture[str], cfg: Path) -> None:
    code, out, _ = run(capsys, "top", "-c", str(cfg))
    assert code == 0
    lines = out.splitlines()
    assert lines[0].startswith("# scope system: 4 candidates")
    assert lines[1].startswith("# no memory history")
    header = lines[2].split()
    assert "kernel_badness" in header and "preference" in header  # full names, never cut
    assert lines[-1].startswith("# score = ") and "0 x kernel_badness" in lines[-1]
    pids = [int(line.split()[0]) for line in lines[3:-1]]
    # worker declared itself expendable (adj 500); the database and init are protected.
    assert pids[:2] == [300, 100] and set(pids[2:]) == {1, 200}
    assert "protect: name 'database' matches protect.names 'data*'" in out


def test_top_scope_and_json(capsys: pytest.CaptureFixture[str], cfg: Path) -> None:
    code, out, _ = run(capsys, "top", "-c", str(cfg), "--scope", "/web", "--json", "-n", "1")
    assert code == 0
    rows = [json.loads(line) for line in out.splitlines()]
    assert len(rows) == 1 and rows[0]["candidate"]["pid"] == 300 and rows[0]["candidate"]["cgroup"] == "/web"
    assert {"kernel_badness", "growth", "freed"} <= set(rows[0]["scores"])


@pytest.mark.parametrize(
    ("extra", "args", "message"),
    [
        ("[engine]\nfoo = 1\n", (), "Object contains unknown field `foo` - at `$.engine`"),
        ('[plugins]\ndisable = ["nosuch"]\n', (), "cannot disable unknown plugin(s) 'nosuch'"),
        ('[plugins]\nload = ["nosuch.module:X"]\n', (), "plugin 'nosuch.module:X' (from [plugins] load): import failed"),
        ("[plugins.nosuch]\nx = 1\n", (), "section [plugins.nosuch] names no loaded plugin"),
        ("[plugins.killer]\ngrace_s = 'x'\n", (), "Expected `float`, got `str` - at `$.plugins.killer.grace_s`"),
        ("", ("--scope", "/nope"), "cgroup '/nope': no such cgroup"),
    ],
)
def test_bad_input_is_one_line_with_exit_2(
    capsys: pytest.CaptureFixture[str], cfg: Path, extra: str, args: tuple[str, ...], message: str
) -> None:
    cfg.write_text(cfg.read_text() + "\n" + extra)
    code, out, err = run(capsys, "top", "-c", str(cfg), *args)
    assert code == 2 and out == ""
    assert err.startswith("oomkit: error: ") and message in err
    assert err.count("\n") == 1


def test_missing_config_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, err = run(capsys, "check", "-c", str(tmp_path / "none.toml"))
    assert code == 2 and err == f"oomkit: error: {tmp_path / 'none.toml'}: no such file\n"


def test_top_samples_a_history_first(capsys: pytest.CaptureFixture[str], cfg: Path) -> None:
    code, out, _ = run(capsys, "top", "-c", str(cfg), "--scope", "/web", "--sample", "0.3")
    assert code == 0
    assert "no memory history" not in out
    row = next(line for line in out.splitlines() if line.split()[0] == "300")
    assert " over " in row and "MiB" in row and "expendable (preference: oom_score_adj 500 > 0" in row


@pytest.mark.parametrize(("command", "flag"), [("top", "--takeover"), ("plugins", "--dry-run"), ("top", "--events")])
def test_subcommands_refuse_flags_they_do_not_use(
    capsys: pytest.CaptureFixture[str], command: str, flag: str
) -> None:
    with pytest.raises(SystemExit) as exit_:
        main([command, flag, "x"])
    assert exit_.value.code == 2
    assert "unrecognized arguments" in capsys.readouterr().err


def test_explain_says_why_the_victim_won_and_the_next_lost(
    capsys: pytest.CaptureFixture[str], cfg: Path, fake_proc: FakeProc, tmp_path: Path
) -> None:
    from oomkit.testing import decide

    log = tmp_path / "decisions.jsonl"
    config = {"plugins": {"protect": {"names": ["data*"]}, "jsonl": {"path": str(log)}}}
    d = decide(proc=fake_proc, config=config)  # returns once the notifiers have it

    code, out, err = run(capsys, "explain", "--events", str(log), "--last")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith(f"decision {d.id} at ") and "outcome dry-run" in lines[0]
    assert lines[2].startswith("victim pid 300 (worker) won: in the expendable tier (preference: oom_score_adj 500")
    assert any(ln.startswith("  2. pid 100 (editor): in the normal tier, after the expendable tier of the victim")
               for ln in lines)
    assert any("pid 200 (database): protected: protect says name 'database' matches" in ln for ln in lines)
    assert run(capsys, "explain", "--events", str(log), str(d.id))[1] == out
    code, _, err = run(capsys, "explain", "--events", str(log), "999")
    assert code == 1 and err.strip() == f"oomkit: error: {log}: no decision 999"


def test_takeover_pauses_on_v1_and_brakes_on_v2(
    capsys: pytest.CaptureFixture[str], cfg: Path, fake_cgroups: FakeCgroups
) -> None:
    fake_cgroups.mkdir_v2("/pods")
    for pod in ("a", "b"):
        (fake_cgroups.mkdir_v2(f"/pods/{pod}") / "memory.max").write_text(f"{64 << 20}\n")
    under_v2 = f"{fake_cgroups.unified}/pods/b"
    code, out, err = run(capsys, "check", "-c", str(cfg), "--takeover", "/web", "--takeover", "v2:/pods/a",
                         "--takeover", under_v2, "--takeover", f"{fake_cgroups.memory_v1}/web2")
    assert code == 2 and "cgroup '" in err and "/web2" in err  # a v1 path, checked as a memcg
    code, out, err = run(capsys, "check", "-c", str(cfg), "--takeover", "/web", "--takeover", "v2:/pods/a",
                         "--takeover", under_v2)
    assert code == 0, err
    sources = {s["name"]: s for s in tomllib.loads(out)["sources"] if s["name"] in ("takeover", "brake")}
    assert sources["takeover"]["kind"] == "memcg-oom" and sources["takeover"]["cgroups"] == ["/web"]
    assert sources["brake"]["kind"] == "memory-high" and sources["brake"]["cgroups"] == ["/pods/a", under_v2]
    assert sources["brake"]["margin"] == "16M"


def test_takeover_of_a_v2_cgroup_without_a_limit_is_one_line(
    capsys: pytest.CaptureFixture[str], cfg: Path, fake_cgroups: FakeCgroups
) -> None:
    fake_cgroups.mkdir_v2("/free")
    code, _, err = run(capsys, "check", "-c", str(cfg), "--takeover", "v2:/free")
    assert code == 2
    assert err == "oomkit: error: cgroup '/free': its memory.max is 'max': there is no limit to brake under\n"
