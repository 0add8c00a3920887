"""ProcessCandidates on fake /proc and cgroupfs trees."""

from __future__ import annotations

import threading

import pytest

from oomkit import Config, ConfigError, Event, Scope, urgency
from oomkit.config import PathsConfig
from oomkit.proctable import FdBudget
from oomkit.testing import FakeCgroups, FakeProc
from oomkit_plugins.candidates import ProcessCandidates

from ...descriptors import descriptors_left
from ...takeover_support import wait_for
from .support import config, configured


def event(scope: Scope = Scope()) -> Event:
    return Event(source="test", kind="low-memory", scope=scope)


def offered(plugin: ProcessCandidates, scope: Scope = Scope()) -> dict[int, tuple[str, str]]:
    return {c.pid: (c.name, c.cgroup) for c in plugin.oomkit_candidates(event(scope))}


def test_system_scope_offers_every_process_but_kernel_threads(fake_proc: FakeProc, fake_cgroups: FakeCgroups) -> None:
    fake_proc.add_process(1, "init", ppid=0)
    fake_proc.add_process(2, "kthreadd", ppid=0, kthread=True)
    fake_proc.add_process(300, "db", rss=1 << 30, memcg="/db", cgroup2="/system.slice/db")
    fake_proc.add_process(301, "web", memcg="/web/worker")
    plugin = configured(ProcessCandidates(), config(fake_proc, fake_cgroups))
    assert offered(plugin) == {1: ("init", "/"), 300: ("db", "/db"), 301: ("web", "/web/worker")}


def test_system_scope_uses_v2_paths_where_no_v1_memory_controller_is_mounted(fake_proc: FakeProc) -> None:
    fake_proc.add_process(300, "db", memcg="/db", cgroup2="/system.slice/db")
    fake_proc.set_mounts(unified="/nowhere")
    cfg = Config(paths=PathsConfig(proc=fake_proc.path), sources=())
    plugin = configured(ProcessCandidates(), cfg)
    assert offered(plugin) == {300: ("db", "/system.slice/db")}


def test_include_cgroup_off_leaves_cgroup_empty(fake_proc: FakeProc, fake_cgroups: FakeCgroups) -> None:
    fake_proc.add_process(300, "db", memcg="/db")
    plugin = configured(ProcessCandidates(), config(fake_proc, fake_cgroups, candidates={"include_cgroup": False}))
    assert offered(plugin) == {300: ("db", "")}


def test_process_gone_between_listing_and_reading_is_skipped(fake_proc: FakeProc, fake_cgroups: FakeCgroups) -> None:
    fake_proc.add_process(300, "db")
    (fake_proc.root / "301").mkdir()  # listed, but its files are already gone
    plugin = configured(ProcessCandidates(), config(fake_proc, fake_cgroups))
    assert list(offered(plugin)) == [300]


def test_v1_scope_offers_the_whole_subtree_with_cgroup_paths(fake_proc: FakeProc, fake_cgroups: FakeCgroups) -> None:
    for pid in (10, 20, 21, 30, 40):
        fake_proc.add_process(pid, f"p{pid}")
    fake_cgroups.mkdir_v1("/jobs", pids=(10,))
    fake_cgroups.mkdir_v1("/jobs/a", pids=(20, 21, 20))  # v1 may list a pid twice
    fake_cgroups.mkdir_v1("/jobs/a/deep", pids=(30, 99))  # 99 has no /proc entry: exited
    fake_cgroups.mkdir_v1("/other", pids=(40,))
    plugin = configured(ProcessCandidates(), config(fake_proc, fake_cgroups))
    got = offered(plugin, Scope("v1", "/jobs"))
    assert got == {10: ("p10", "/jobs"), 20: ("p20", "/jobs/a"), 21: ("p21", "/jobs/a"), 30: ("p30", "/jobs/a/deep")}
    assert offered(plugin, Scope("v1", "/jobs/a/deep")) == {30: ("p30", "/jobs/a/deep")}


def test_v1_root_scope_paths_have_a_single_slash(fake_proc: FakeProc, fake_cgroups: FakeCgroups) -> None:
    fake_proc.add_process(10, "p10")
    fake_proc.add_process(20, "p20")
    fake_cgroups.mkdir_v1("/", pids=(10,))
    fake_cgroups.mkdir_v1("/a", pids=(20,))
    plugin = configured(ProcessCandidates(), config(fake_proc, fake_cgroups))
    assert offered(plugin, Scope("v1", "/")) == {10: ("p10", "/"), 20: ("p20", "/a")}


def test_v2_scope_reads_the_v2_tree_not_the_v1_tree_of_the_same_path(fake_proc: FakeProc, fake_cgroups: FakeCgroups) -> None:
    fake_proc.add_process(10, "in-v1")
    fake_proc.add_process(20, "in-v2")
    fake_cgroups.mkdir_v1("/svc", pids=(10,))
    fake_cgroups.mkdir_v2("/svc", pids=())
    fake_cgroups.mkdir_v2("/svc/child", pids=(20,))
    plugin = configured(ProcessCandidates(), config(fake_proc, fake_cgroups))
    assert offered(plugin, Scope("v2", "/svc")) == {20: ("in-v2", "/svc/child")}


def test_kernel_threads_in_a_cgroup_are_not_offered(fake_proc: FakeProc, fake_cgroups: FakeCgroups) -> None:
    fake_proc.add_process(10, "worker", kthread=True)
    fake_proc.add_process(11, "app")
    fake_cgroups.mkdir_v1("/jobs", pids=(10, 11))
    plugin = configured(ProcessCandidates(), config(fake_proc, fake_cgroups))
    assert list(offered(plugin, Scope("v1", "/jobs"))) == [11]


def test_scope_in_an_unmounted_tree_raises_lookup_error(fake_proc: FakeProc) -> None:
    cfg = Config(paths=PathsConfig(proc=fake_proc.path), sources=())  # mounts: none found
    plugin = configured(ProcessCandidates(), cfg)
    with pytest.raises(LookupError, match="no cgroup directory for scope v1:/jobs"):
        plugin.oomkit_candidates(event(Scope("v1", "/jobs")))


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"include_cgroups": True}, "Object contains unknown field `include_cgroups` - at `$.plugins.candidates`"),
        ({"include_cgroup": "yes"}, "Expected `bool`, got `str` - at `$.plugins.candidates.include_cgroup`"),
    ],
)
def test_bad_settings_name_the_file_and_key(fake_proc: FakeProc, table: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        configured(ProcessCandidates(), config(fake_proc, candidates=table))
    assert str(info.value) == f"/etc/oomkit/test.toml: {message}"


def test_running_out_of_descriptors_is_said_once_per_ranking_and_nobody_is_left_out(
    fake_proc: FakeProc, fake_cgroups: FakeCgroups, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    for pid in range(300, 340):
        fake_proc.add_process(pid, "p", memcg="/svc")
    plugin = configured(ProcessCandidates(), config(fake_proc, fake_cgroups))
    expected = offered(plugin)
    plugin.close()
    # Its own budget, not the process's: the shared one would stay capped for later tests.
    budget = FdBudget(1000)
    monkeypatch.setattr(FdBudget, "shared", classmethod(lambda cls: budget))
    with descriptors_left(12):
        assert offered(plugin) == expected
    [warning] = [r for r in caplog.records if "ran out of file descriptors" in r.getMessage()]
    assert "nobody left out" in warning.getMessage() and warning.levelname == "WARNING"
    plugin.close()


def test_an_urgent_ranking_lets_go_a_parked_one_that_holds_its_scope_table(
    fake_proc: FakeProc, fake_cgroups: FakeCgroups
) -> None:
    # A preview (a hook thread that may park) reads the table while a takeover begins: it
    # parks inside offer(), holding the table's lock.  The takeover's own ranking of that
    # scope must not wait out the park budget (an hour here) behind it.
    for pid in range(300, 310):
        fake_proc.add_process(pid, "p", memcg="/svc")
    plugin = configured(ProcessCandidates(), config(fake_proc, fake_cgroups))
    previewed: list[int] = []
    ranked: list[int] = []

    def preview() -> None:
        with urgency.parkable():
            previewed.extend(c.pid for c in plugin.oomkit_candidates(event()))

    def takeover() -> None:
        ranked.extend(c.pid for c in plugin.oomkit_candidates(event()))

    before = urgency.stats().released
    with urgency.urgent(park_s=3600.0):
        parked = threading.Thread(target=preview, daemon=True)
        parked.start()
        try:
            wait_for(lambda: urgency.stats().parked_now >= 1, 30.0, "the preview to park")
            urgent_one = threading.Thread(target=takeover, daemon=True)
            urgent_one.start()
            urgent_one.join(60.0)
            assert not urgent_one.is_alive(), "the takeover waited behind the parked preview"
        finally:
            urgency.release_parked()
            parked.join(60.0)
    assert sorted(ranked) == sorted(previewed) == list(range(300, 310))
    assert urgency.stats().released == before + 1
    plugin.close()
