"""The takeover journal and ``oomkit restore`` on fake trees."""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest

from oomkit import journal as journal_mod
from oomkit.cli import main
from oomkit.config import PathsConfig
from oomkit.journal import MAX_ENTRY_BYTES, Entry, Journal, JournalError
from oomkit.restore import restore_journal
from oomkit.testing import FakeCgroups, FakeProc, paths_for

CG = "/jobs/a"


@pytest.fixture
def paths(tmp_path: Path, fake_proc: FakeProc, fake_cgroups: FakeCgroups) -> PathsConfig:
    fake_cgroups.mkdir_v1("/jobs")
    fake_cgroups.mkdir_v1(CG)
    return msgspec.structs.replace(paths_for(fake_proc, fake_cgroups), run_dir=str(tmp_path / "run"))


@pytest.fixture
def journal(paths: PathsConfig) -> Journal:
    j = Journal(paths.run_dir)
    j.ensure()
    return j


def v1_entry(d: Path, path: str = CG, original: str = "0", written: str = "1") -> Entry:
    return Journal.entry("v1", path, original, written, os.stat(d).st_ino, "takeover")


# --- the journal --------------------------------------------------------------------------


def test_an_entry_is_written_whole_and_read_back(journal: Journal, fake_cgroups: FakeCgroups) -> None:
    d = fake_cgroups.memory_v1 / "jobs" / "a"
    entry = v1_entry(d)
    name = journal.write(entry)
    assert name.startswith("v1-") and name.endswith(".json") and len(name) == 48
    assert journal.read(name) == entry
    assert journal.find("v1", CG, "memory.oom_control", entry.ino) == (name, entry)
    assert journal.find("v1", CG, "memory.oom_control", entry.ino + 1) is None  # another cgroup
    assert os.listdir(journal.dir) == [name]  # no temporary file left
    assert os.stat(journal.dir).st_mode & 0o777 == 0o700
    assert os.stat(journal.dir / name).st_mode & 0o777 == 0o600
    assert journal.write(msgspec.structs.replace(entry, pid=1)) == name  # one value, one entry
    assert journal.read(name).pid == 1 and journal.names() == [name]
    journal.remove(name)
    journal.remove(name)  # already gone: no error
    assert journal.names() == []


def test_a_long_path_gives_a_short_name(journal: Journal) -> None:
    entry = Journal.entry("v1", "/" + "n" * 200 + "/" + "m" * 3000, "0", "1", 7, "")
    name = journal.write(entry)
    assert len(name) == 48 and journal.read(name).path == entry.path


def test_a_dead_writers_temporary_file_is_swept(journal: Journal) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = journal.dir / f".tmp-{int(dead.stdout)}-v1-x.json"
    live = journal.dir / f".tmp-{os.getpid()}-v1-y.json"
    stale.write_text("{")
    live.write_text("{")
    assert journal.names() == []
    assert not stale.exists() and live.exists()


@pytest.mark.parametrize(
    ("content", "why"),
    [
        (b"{not json", "malformed"),
        (b'{"tree": "v1", "path": "/a", "file": "memory.oom_control", "original": "0; rm -rf", '
         b'"written": "1", "ino": 1, "pid": 1}', "original"),
        (b'{"tree": "v1", "path": "/a", "file": "memory.high", "original": "0", "written": "1", "ino": 1, "pid": 1}',
         "a v1 entry journals memory.oom_control"),
        (b'{"tree": "v1", "path": "/a", "file": "memory.oom_control", "original": "0", "written": "1", '
         b'"ino": 1, "pid": 1, "extra": 1}', "unknown field"),
        (b'{"tree": "v1", "path": "/a", "file": "memory.oom_control", "original": "0", "written": "1", '
         b'"ino": -1, "pid": 1}', "ino"),
        (b"x" * (MAX_ENTRY_BYTES + 1), "larger than"),
    ],
)
def test_a_bad_entry_is_an_error_naming_its_file(journal: Journal, content: bytes, why: str) -> None:
    (journal.dir / "v1-bad.json").write_bytes(content)
    ((name, result),) = list(journal.entries())
    assert isinstance(result, JournalError)
    assert str(result).startswith(f"journal entry {journal.dir / 'v1-bad.json'}: ") and why in str(result)
    assert "\n" not in str(result)


def test_an_entry_renamed_to_another_cgroups_name_is_refused(journal: Journal) -> None:
    name = journal.write(Journal.entry("v1", "/a", "0", "1", 5, ""))
    os.rename(journal.dir / name, journal.dir / "v1-0000000000000000000000000000000000000000.json")
    ((_, result),) = list(journal.entries())
    assert isinstance(result, JournalError) and "does not match its cgroup v1:/a" in str(result)


def test_the_journal_is_bounded(journal: Journal, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(journal_mod, "MAX_ENTRIES", 2)
    journal.write(Journal.entry("v1", "/a", "0", "1", 1, ""))
    journal.write(Journal.entry("v1", "/b", "0", "1", 2, ""))
    with pytest.raises(JournalError, match=r"full \(2 entries\); v1:/c not taken over"):
        journal.write(Journal.entry("v1", "/c", "0", "1", 3, ""))
    journal.write(Journal.entry("v1", "/b", "0", "1", 2, "again"))  # replacing one is fine


def test_an_unwritable_journal_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "run").write_text("")  # a file where the directory should be
    with pytest.raises(JournalError, match=r"Not a directory$"):
        Journal(tmp_path / "run").write(Journal.entry("v1", "/a", "0", "1", 1, ""))


# --- restore ------------------------------------------------------------------------------


def test_restore_puts_the_original_back_and_drops_the_entry(
    paths: PathsConfig, journal: Journal, fake_cgroups: FakeCgroups
) -> None:
    d = fake_cgroups.memory_v1 / "jobs" / "a"
    journal.write(v1_entry(d))
    FakeCgroups.set_oom_control(d, oom_kill_disable=1)  # left at 1 by a dead oomkit
    report = restore_journal(paths)
    assert report.lines == [f"v1:{CG}: oom_kill_disable 1 -> 0 (the original, journalled by pid {os.getpid()})"]
    assert report.ok and report.restored == 1
    assert FakeCgroups.written(d) == ["0"]
    assert journal.names() == []
    assert restore_journal(paths).lines == []


def test_restore_leaves_a_value_someone_else_wrote(paths: PathsConfig, journal: Journal, fake_cgroups: FakeCgroups) -> None:
    d = fake_cgroups.memory_v1 / "jobs" / "a"
    journal.write(v1_entry(d))
    report = restore_journal(paths)  # still 0: the watchdog restored it, or it was handed back
    assert report.lines == [f"v1:{CG}: oom_kill_disable is 0, the original already"]
    assert FakeCgroups.written(d) == [] and journal.names() == []


def test_restore_of_a_v2_brake_only_while_the_value_is_still_oomkits(
    paths: PathsConfig, journal: Journal, fake_cgroups: FakeCgroups
) -> None:
    ours = fake_cgroups.mkdir_v2("/pod-a")
    theirs = fake_cgroups.mkdir_v2("/pod-b")
    for d, now in ((ours, "1040187392"), (theirs, "2147483648")):
        (d / "memory.high").write_text(f"{now}\n")
        rel = "/" + d.name
        journal.write(Journal.entry("v2", rel, "max", "1040187392", os.stat(d).st_ino, "brake"))
    report = restore_journal(paths)
    assert sorted(report.lines) == [
        f"v2:/pod-a: memory.high 1040187392 -> max (the original, journalled by pid {os.getpid()})",
        "v2:/pod-b: memory.high is 2147483648, not the 1040187392 oomkit wrote; left alone",
    ]
    assert (ours / "memory.high").read_text() == "max\n"
    assert (theirs / "memory.high").read_text() == "2147483648\n"  # systemd's or the kubelet's
    assert journal.names() == []


def test_restore_skips_a_removed_and_a_recreated_cgroup(
    paths: PathsConfig, journal: Journal, fake_cgroups: FakeCgroups
) -> None:
    gone = fake_cgroups.mkdir_v1("/jobs/gone")
    journal.write(v1_entry(gone, "/jobs/gone"))
    shutil.rmtree(gone)
    again = fake_cgroups.mkdir_v1("/jobs/again", oom_kill_disable=1)
    # The journalled cgroup had another inode: this one was made since (kernfs never reuses one).
    journal.write(Journal.entry("v1", "/jobs/again", "0", "1", os.stat(again).st_ino + 10**6, "takeover"))
    report = restore_journal(paths)
    assert sorted(report.lines) == [
        "v1:/jobs/again: made again since it was journalled (another cgroup now); left alone",
        f"v1:/jobs/gone: removed since oomkit (pid {os.getpid()}) journalled it; nothing to restore",
    ]
    assert report.ok and FakeCgroups.written(again) == [] and journal.names() == []


def test_restore_leaves_what_a_running_oomkit_holds(paths: PathsConfig, journal: Journal, fake_cgroups: FakeCgroups) -> None:
    d = fake_cgroups.memory_v1 / "jobs" / "a"
    journal.write(v1_entry(d))
    FakeCgroups.set_oom_control(d, oom_kill_disable=1)
    held = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(held, fcntl.LOCK_EX)
    try:
        report = restore_journal(paths)
    finally:
        os.close(held)
    assert report.lines == [f"v1:{CG}: held by a running oomkit (pid {os.getpid()}); left to it"]
    assert report.ok and report.held == 1
    assert FakeCgroups.written(d) == [] and len(journal.names()) == 1


def test_restore_resets_descendants_that_inherited_the_takeover(
    paths: PathsConfig, journal: Journal, fake_cgroups: FakeCgroups
) -> None:
    d = fake_cgroups.memory_v1 / "jobs" / "a"
    kid = fake_cgroups.mkdir_v1(f"{CG}/kid/grandkid", oom_kill_disable=1)
    other = fake_cgroups.mkdir_v1(f"{CG}/other", oom_kill_disable=1)
    journal.write(v1_entry(d))
    FakeCgroups.set_oom_control(d, oom_kill_disable=1)
    held = os.open(other, os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(held, fcntl.LOCK_EX)  # another oomkit's
    try:
        report = restore_journal(paths)
    finally:
        os.close(held)
    assert report.lines == [
        f"v1:{CG}: oom_kill_disable 1 -> 0 (the original, journalled by pid {os.getpid()})",
        f"v1:{CG}/kid/grandkid: oom_kill_disable 1 -> 0 (a descendant that inherited the takeover)",
    ]
    assert FakeCgroups.written(kid) == ["0"] and FakeCgroups.written(other) == []


def test_restore_keeps_what_it_could_not_do(paths: PathsConfig, journal: Journal, fake_cgroups: FakeCgroups) -> None:
    d = fake_cgroups.memory_v1 / "jobs" / "a"
    journal.write(v1_entry(d))
    (d / "memory.oom_control").unlink()
    (d / "memory.oom_control").mkdir()  # unreadable as a file
    (journal.dir / "v1-bad.json").write_text("{")
    report = restore_journal(paths)
    assert not report.ok and report.failed == 2
    assert any(ln.startswith(f"v1:{CG}: cannot read memory.oom_control: Is a directory; entry kept") for ln in report.lines)
    assert any(ln.endswith("; left in place") and "v1-bad.json" in ln for ln in report.lines)
    assert len(journal.names()) == 2


# --- oomkit restore ------------------------------------------------------------------------


def _config(tmp_path: Path, paths: PathsConfig) -> Path:
    cfg = tmp_path / "oomkit.toml"
    cfg.write_text(
        f'[paths]\nproc = "{paths.proc}"\nmemory_v1 = "{paths.memory_v1}"\nunified = "{paths.unified}"\n'
        f'run_dir = "{paths.run_dir}"\n'
    )
    return cfg


def test_oomkit_restore_says_one_line_per_cgroup_and_exits_0(
    paths: PathsConfig, journal: Journal, fake_cgroups: FakeCgroups, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    d = fake_cgroups.memory_v1 / "jobs" / "a"
    journal.write(v1_entry(d))
    FakeCgroups.set_oom_control(d, oom_kill_disable=1)
    cfg = _config(tmp_path, paths)
    assert main(["restore", "-c", str(cfg)]) == 0
    assert capsys.readouterr().out == f"v1:{CG}: oom_kill_disable 1 -> 0 (the original, journalled by pid {os.getpid()})\n"
    assert main(["restore", "-c", str(cfg)]) == 0
    assert capsys.readouterr().out.startswith("nothing to restore: the journal under ")


def test_oomkit_restore_exits_1_when_something_stays(
    paths: PathsConfig, journal: Journal, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (journal.dir / "v1-bad.json").write_text("{")
    assert main(["restore", "-c", str(_config(tmp_path, paths))]) == 1
    assert "left in place" in capsys.readouterr().out


def test_oomkit_restore_with_a_bad_config_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[paths]\nrun_dirr = 1\n")
    assert main(["restore", "-c", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("oomkit: error: ") and err.count("\n") == 1
