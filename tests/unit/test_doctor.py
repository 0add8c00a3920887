"""`oomkit doctor`: the features registry against the probes, the table, the JSON document."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from oomkit.cli import main
from oomkit.doctor import FEATURES, FORMAT, Feature, feature_status, render_json, render_table, report
from oomkit.probes import PROBES, Machine, Probe
from oomkit.testing import FakeCgroups, FakeProc, probe_machine

PROBE_NAMES = [spec.name for spec in PROBES]


def test_every_feature_names_existing_probes() -> None:
    for f in FEATURES:
        unknown = [p for p in f.requires + f.related if p not in PROBE_NAMES]
        assert not unknown, f"{f.name}: no such probe {unknown}"


def test_every_probe_belongs_to_a_feature() -> None:
    # So a new probe cannot be left out of README.md's feature table.
    used = {p for f in FEATURES for p in f.requires + f.related}
    assert [p for p in PROBE_NAMES if p not in used] == []


def test_feature_names_are_unique() -> None:
    names = [f.name for f in FEATURES]
    assert len(names) == len(set(names))


def probe(name: str, ok: bool | None, summary: str = "s") -> Probe:
    return Probe(name=name, ok=ok, summary=summary)


def test_feature_status_takes_the_first_failure_then_the_first_unknown() -> None:
    f = Feature("f", "n", ("a", "b", "c"))
    assert feature_status(f, {"a": probe("a", True), "b": probe("b", True), "c": probe("c", True)}) == (True, "")
    results = {"a": probe("a", None, "hm"), "b": probe("b", False, "gone"), "c": probe("c", False, "also")}
    assert feature_status(f, results) == (False, "b: gone")
    results = {"a": probe("a", True), "b": probe("b", None, "hm"), "c": probe("c", True)}
    assert feature_status(f, results) == (None, "b: hm")
    assert feature_status(f, {"a": probe("a", True)}) == (None, "b: not probed")
    assert feature_status(Feature("g", "n", ()), {}) == (True, "")


@pytest.fixture
def machine(fake_proc: FakeProc, fake_cgroups: FakeCgroups) -> Machine:
    fake_cgroups.mkdir_v1("/me")
    fake_proc.set_self_cgroup("/me", "/")
    return probe_machine(fake_proc, fake_cgroups)


def test_json_document_layout(machine: Machine) -> None:
    results = report(machine)
    doc = json.loads(render_json(results, machine))
    assert list(doc) == ["format", "oomkit", "kernel", "probes", "features"]
    assert doc["format"] == FORMAT
    assert doc["kernel"] == "6.18.0-fake"
    assert [p["name"] for p in doc["probes"]] == PROBE_NAMES
    assert all(list(p) == ["name", "ok", "summary", "detail"] for p in doc["probes"])
    assert [f["name"] for f in doc["features"]] == [f.name for f in FEATURES]
    assert all(list(f) == ["name", "needs", "planned", "requires", "related", "ok", "why"] for f in doc["features"])
    takeover = next(f for f in doc["features"] if f["requires"] == ["cgroup-v1-memory", "takeover-v1"])
    assert takeover["ok"] is True and takeover["why"] == ""
    # No tracefs in the fake mounts, and the fake machine refuses to mount one.
    mapped = next(f for f in doc["features"] if "trace-ring-buffer-mmap" in f["requires"])
    assert mapped["ok"] is False and mapped["why"].startswith("tracefs: not mounted, and mounting it failed: ")


def test_only_some_probes_and_the_features_they_decide(machine: Machine) -> None:
    results = report(machine, ["swap", "process-madvise"])
    assert [p.name for p in results] == ["process-madvise", "swap"]  # registry order
    doc = json.loads(render_json(results, machine))
    # The features these probes decide, and those that need no probe (shared-page, kmsg).
    assert [f["requires"] for f in doc["features"]] == [[], ["process-madvise"], []]


def test_table_lists_every_probe_then_the_features(machine: Machine) -> None:
    text = render_table(report(machine), machine)
    lines = text.splitlines()
    assert lines[0].startswith("oomkit doctor: Linux 6.18.0-fake, Python ")
    head = lines.index(next(ln for ln in lines if ln.startswith("PROBE ")))
    rows = lines[head + 1 : head + 1 + len(PROBES)]
    assert [r.split()[0] for r in rows] == PROBE_NAMES
    assert rows[PROBE_NAMES.index("swap")].split()[1] == "no"
    features = lines[lines.index(next(ln for ln in lines if ln.startswith("FEATURE "))) + 1 :]
    assert len(features) == len(FEATURES)
    assert features[0].startswith("meminfo source (the default) ")
    assert any(ln.startswith("memory-high takeover (cgroup v2): a brake") for ln in features)
    assert "`" not in "\n".join(features)


@pytest.fixture
def cfg(tmp_path: Path, fake_proc: FakeProc, fake_cgroups: FakeCgroups) -> Path:
    p = tmp_path / "oomkit.toml"
    p.write_text(
        f'[paths]\nproc = "{fake_proc.path}"\nmemory_v1 = "{fake_cgroups.memory_v1}"\nunified = "{fake_cgroups.unified}"\n'
    )
    return p


def test_cli_reads_paths_from_the_config(capsys: pytest.CaptureFixture[str], cfg: Path, fake_proc: FakeProc) -> None:
    fake_proc.set_kernel("5.10.0-cli")
    fake_proc.add_process(4242, "earlyoom")
    code = main(["doctor", "-c", str(cfg), "--json", "--probe", "kernel", "--probe", "other-oom-daemons"])
    out, err = capsys.readouterr()
    assert code == 0, err
    doc = json.loads(out)
    assert [p["summary"] for p in doc["probes"]] == ["Linux 5.10.0-cli", "running: earlyoom (pid 4242)"]
    code = main(["doctor", "-c", str(cfg), "--probe", "kernel"])
    out, _ = capsys.readouterr()
    assert code == 0 and "kernel  yes  Linux 5.10.0-cli" in out


def test_cli_unknown_probe_is_a_one_line_error(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["doctor", "--probe", "kernal"])
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert err.startswith("oomkit: error: --probe: no probe named kernal (probes: kernel, cgroup-layout, ")
    assert err.count("\n") == 1
