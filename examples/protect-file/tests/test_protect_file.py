"""The plugin as oomkit loads it: from its entry point, configured by a TOML-like table.

``fake_proc`` and ``harness`` come from ``oomkit.testing`` (a pytest plugin installed with
oomkit); the harness runs the whole chain (oomkit's first-party plugins and this one) in
dry-run and returns the decision.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from oomkit import ConfigError
from oomkit.testing import (
    FakeProc,
    assert_not_vetoed,
    assert_outcome,
    assert_vetoed,
    assert_victim,
    decide,
    harness,
    unbounded_numbers,
)
from oomkit_protect_file import Settings

MiB = 1 << 20


@pytest.fixture
def proc(fake_proc: FakeProc) -> FakeProc:
    fake_proc.add_process(10, "postgres", rss=900 * MiB, start_ticks=100)
    fake_proc.add_process(11, "batch", rss=300 * MiB, start_ticks=5000)
    fake_proc.add_process(12, "cron-job", rss=200 * MiB, start_ticks=9000)
    return fake_proc


def plugin_table(**settings: object) -> dict[str, object]:
    return {"plugins": {"protect_file": settings}}


def test_with_no_table_it_changes_nothing(proc: FakeProc) -> None:
    loaded = decide(proc=proc)
    without = decide(proc=proc, config={"plugins": {"disable": ["protect_file"]}})
    assert loaded.ranking == without.ranking
    assert_victim(loaded, "batch")  # oomkit's default policy ranks databases critical


def test_listed_processes_are_vetoed(proc: FakeProc, tmp_path: Path) -> None:
    listed = tmp_path / "protected"
    listed.write_text("# our database\npostgres\n\ncron-*  # every cron job\n")
    d = decide(proc=proc, config=plugin_table(path=str(listed)))
    assert_vetoed(d, "postgres", by="protect_file", reason=f"listed in {listed} as 'postgres'")
    assert_vetoed(d, "cron-job", by="protect_file", reason="as 'cron-*'")
    assert_victim(d, "batch")


def test_the_youngest_is_preferred(proc: FakeProc) -> None:
    d = decide(proc=proc, config=plugin_table(prefer_youngest=1000))
    assert_victim(d, "cron-job")
    assert [r.scores["protect_file"] for r in d.ranking] == [1000.0, pytest.approx(1000 * 4900 / 8900), 0.0]


@pytest.mark.anyio
async def test_edits_are_picked_up_and_a_vanished_file_protects_everyone(proc: FakeProc, tmp_path: Path) -> None:
    listed = tmp_path / "protected"
    listed.write_text("postgres\n")
    async with harness(proc=proc, config=plugin_table(path=str(listed))) as h:
        assert_victim(await h.decide(), "batch")
        listed.write_text("postgres\nbatch\n")
        assert_victim(await h.decide(), "cron-job")
        listed.unlink()
        d = await h.decide()
    assert_outcome(d, "all-vetoed")
    assert_vetoed(d, "cron-job", by="protect_file", reason="veto plugin failed; protecting")
    assert [e.error.split(":")[0] for e in d.errors] == ["FileNotFoundError"]


def test_an_unreadable_file_refuses_to_start(proc: FakeProc, tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(ConfigError, match=rf"cannot read {missing}: No such file or directory - at `\$.plugins.protect_file.path`"):
        decide(proc=proc, config=plugin_table(path=str(missing)))


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"pth": "x"}, r"Object contains unknown field `pth` - at `\$.plugins.protect_file`"),
        ({"prefer_youngest": -1}, r"Expected `float` >= 0.0 - at `\$.plugins.protect_file.prefer_youngest`"),
        ({"prefer_youngest": float("nan")}, r"Expected `float` >= 0.0 - at `\$.plugins.protect_file.prefer_youngest`"),
        ({"prefer_youngest": 1e308}, r"Expected `float` <= 1000.0 - at `\$.plugins.protect_file.prefer_youngest`"),
    ],
)
def test_bad_settings_name_the_key(proc: FakeProc, table: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        decide(proc=proc, config=plugin_table(**table))


def test_every_number_in_the_settings_is_bounded() -> None:
    assert unbounded_numbers(Settings) == []


def test_the_default_chain_still_protects_what_it_protects(proc: FakeProc, tmp_path: Path) -> None:
    proc.add_process(13, "sshd", rss=2000 * MiB, oom_score_adj=-1000, start_ticks=9999)
    listed = tmp_path / "protected"
    listed.write_text("postgres\n")
    d = decide(proc=proc, config=plugin_table(path=str(listed), prefer_youngest=1000))
    assert_vetoed(d, "sshd", by="oomkit")  # the core's protection, whatever the plugins
    assert_not_vetoed(d, "batch")
    assert_victim(d, "cron-job")
