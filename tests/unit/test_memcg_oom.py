"""MemcgOomSource on fake trees: the test plays the kernel.

The fake ``memory.oom_control`` holds the state the test sets; what the source's watchdog
writes is appended to it and read back with ``FakeCgroups.written``.  A fake OOM
notification is a write to the eventfd the source registered (the first line of the fake
``cgroup.event_control``: the source registers before it hands the memcg to its watchdog,
which registers its own).  Nothing signals the watchdog's eventfd on a fake tree, so the
tests that need it to see an OOM give it a short ``rescan_s``: it reads every memcg then.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import anyio
import msgspec
import pytest

from oomkit.config import Config, ConfigError, PathsConfig
from oomkit.errors import SourceError
from oomkit.events import Event, Scope
from oomkit.journal import Journal
from oomkit.sources import guarded
from oomkit.sources.memcg_oom import MemcgOomSource, MemcgOomSourceConfig, WatchdogError
from oomkit.testing import FakeCgroups, FakeProc, paths_for
from tests.sources_support import Collected, collecting, until

CG = "/jobs/a"
SCOPE = Scope("v1", CG)


@pytest.fixture
def paths(tmp_path: Path, fake_proc: FakeProc, fake_cgroups: FakeCgroups) -> PathsConfig:
    (fake_proc.root / "self" / "cgroup").write_text("4:memory:/daemon\n0::/\n")
    fake_cgroups.mkdir_v1("/daemon")
    fake_cgroups.mkdir_v1("/jobs")
    fake_cgroups.mkdir_v1(CG, limit=64 << 20, usage=64 << 20)
    return msgspec.structs.replace(paths_for(fake_proc, fake_cgroups), run_dir=str(tmp_path / "run"))


@pytest.fixture
def memdir(fake_cgroups: FakeCgroups) -> Path:
    return fake_cgroups.memory_v1 / CG.lstrip("/")


def spec(**kw: object) -> MemcgOomSourceConfig:
    kw.setdefault("cgroups", (CG,))
    kw.setdefault("poll_interval_s", 0.01)
    kw.setdefault("deadline_s", 0.2)
    return MemcgOomSourceConfig(**kw)  # type: ignore[arg-type]


def source_for(paths: PathsConfig, **kw: object) -> MemcgOomSource:
    return MemcgOomSource(spec(**kw), Config(paths=paths))


def fire(d: Path) -> None:
    """What the kernel does at the start of an OOM: signal the registered eventfd (ours)."""
    efd = int((d / "cgroup.event_control").read_text().split()[0])
    os.eventfd_write(efd, 1)


def journal_files(paths: PathsConfig) -> list[str]:
    return Journal(paths.run_dir).names()


# --- takeover -----------------------------------------------------------------------------


@pytest.mark.anyio
async def test_arms_reports_oom_and_restores_on_cancel(paths: PathsConfig, memdir: Path) -> None:
    source = source_for(paths)
    async with collecting(source) as run:
        assert FakeCgroups.written(memdir) == ["1"]
        assert run.events == []
        (name,) = journal_files(paths)  # journalled before it was armed
        entry = Journal(paths.run_dir).read(name)
        assert (entry.path, entry.original, entry.written, entry.pid) == (CG, "0", "1", os.getpid())
        FakeCgroups.set_oom_control(memdir, oom_kill_disable=1, under_oom=1)
        fire(memdir)
        await until(lambda: bool(run.kinds("oom")))
        ev = run.kinds("oom")[0]
        assert (ev.source, ev.scope) == ("memcg-oom", SCOPE)
        assert ev.values == {"under_oom": 1, "oom_kill_total": 0, "usage_bytes": 64 << 20, "limit_bytes": 64 << 20}
        assert source.still_holds(ev)
        assert source.protected_pids() and source.protected_pids()[0] != os.getpid()
        FakeCgroups.set_oom_control(memdir, oom_kill_disable=1, under_oom=0)
        assert not source.still_holds(ev)
    assert FakeCgroups.written(memdir) == ["0"]  # the watchdog's restore, the only writer
    assert len(run.kinds("oom")) == 1  # one OOM, one event, however long it was polled
    assert journal_files(paths) == []
    assert os.listdir(Path(paths.run_dir) / "journal") == []  # nothing left behind
    assert source.protected_pids() == ()


@pytest.mark.anyio
async def test_the_watchdog_hands_back_at_the_deadline_and_the_source_takes_over_again(
    paths: PathsConfig, memdir: Path
) -> None:
    source = source_for(paths, deadline_s=0.2, rescan_s=0.02)
    async with collecting(source) as run:
        FakeCgroups.set_oom_control(memdir, oom_kill_disable=1, under_oom=1)
        t0 = time.monotonic()
        fire(memdir)
        await until(lambda: FakeCgroups.written(memdir) == ["0"])
        assert time.monotonic() - t0 >= 0.2
        oom = run.kinds("oom")[0]
        FakeCgroups.set_oom_control(memdir, oom_kill_disable=0, under_oom=1)  # the kernel took it
        assert not source.still_holds(oom)  # the kernel decides now: the engine must not kill too
        await anyio.sleep(0.1)  # still under OOM: no takeover while the kernel works on it
        assert FakeCgroups.written(memdir) == []
        FakeCgroups.set_oom_control(memdir, oom_kill_disable=0, under_oom=0, oom_kill=1)
        await until(lambda: FakeCgroups.written(memdir) == ["1"])
        await until(lambda: bool(run.kinds("kernel-kill")))
        assert run.kinds("kernel-kill")[0].values == {"oom_kill_delta": 1, "oom_kill_total": 1}
        # A new OOM after the takeover is ours again, with a deadline of its own.
        FakeCgroups.set_oom_control(memdir, oom_kill_disable=1, under_oom=1, oom_kill=1)
        fire(memdir)
        await until(lambda: len(run.kinds("oom")) == 2)
        assert source.still_holds(run.kinds("oom")[1])
        FakeCgroups.set_oom_control(memdir, oom_kill_disable=1, under_oom=0, oom_kill=1)
    assert len(run.kinds("oom")) == 2


@pytest.mark.anyio
async def test_the_deadline_holds_while_the_daemon_is_blocked(paths: PathsConfig, memdir: Path) -> None:
    """A plugin that blocks the event loop (here: the test) cannot hold a memcg past its deadline."""
    source = source_for(paths, deadline_s=0.2, rescan_s=0.02)
    async with collecting(source) as run:
        FakeCgroups.set_oom_control(memdir, oom_kill_disable=1, under_oom=1)
        fire(memdir)
        await until(lambda: bool(run.kinds("oom")))
        t0 = time.monotonic()
        while FakeCgroups.written(memdir) != ["0"]:  # no await: nothing of the source runs
            assert time.monotonic() - t0 < 10, FakeCgroups.written(memdir)
            time.sleep(0.01)
        FakeCgroups.set_oom_control(memdir, oom_kill_disable=0, under_oom=0)
        await until(lambda: FakeCgroups.written(memdir) == ["1"])  # asked for again once it can


@pytest.mark.anyio
async def test_an_oom_resolved_in_time_is_not_handed_back(paths: PathsConfig, memdir: Path) -> None:
    source = source_for(paths, deadline_s=0.3, rescan_s=0.02)
    async with collecting(source) as run:
        FakeCgroups.set_oom_control(memdir, oom_kill_disable=1, under_oom=1)
        fire(memdir)
        await until(lambda: bool(run.kinds("oom")))
        await anyio.sleep(0.1)  # the watchdog has seen it
        FakeCgroups.set_oom_control(memdir, oom_kill_disable=1, under_oom=0)  # our kill worked
        await anyio.sleep(0.5)
        assert FakeCgroups.written(memdir) == []
    assert FakeCgroups.written(memdir) == ["0"]


@pytest.mark.anyio
async def test_an_oom_already_under_way_at_start_is_reported(paths: PathsConfig, memdir: Path) -> None:
    FakeCgroups.set_oom_control(memdir, oom_kill_disable=1, under_oom=1)
    async with collecting(source_for(paths, deadline_s=5)) as run:
        await until(lambda: bool(run.kinds("oom")))


@pytest.mark.anyio
async def test_restores_when_run_fails(paths: PathsConfig, memdir: Path) -> None:
    source = source_for(paths)

    async def broken(event: Event) -> None:
        raise RuntimeError("engine is broken")

    with pytest.raises(ExceptionGroup) as info:
        async with anyio.create_task_group() as tg:
            await tg.start(source.run, broken)
            FakeCgroups.set_oom_control(memdir, oom_kill_disable=1, under_oom=1)
            fire(memdir)
    assert info.group_contains(RuntimeError, match="engine is broken", depth=None)
    assert FakeCgroups.written(memdir) == ["0"]
    assert journal_files(paths) == []
    async with collecting(source_for(paths)):  # and the lock is released
        pass


@pytest.mark.anyio
async def test_a_removed_memcg_waits_to_come_back_and_is_taken_over_again(
    paths: PathsConfig, fake_cgroups: FakeCgroups, memdir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    source = source_for(paths)
    async with collecting(source):
        efd = int((memdir / "cgroup.event_control").read_text().split()[0])
        shutil.rmtree(memdir)
        os.eventfd_write(efd, 1)  # the kernel signals a removal too
        await until(lambda: source.watching == [])
        assert "was removed; waiting for it to come back" in caplog.text
        assert journal_files(paths) == []  # nothing left to restore
        fake_cgroups.mkdir_v1(CG)
        await until(lambda: source.watching == [SCOPE] and FakeCgroups.written(memdir) == ["1"])
        await until(lambda: "is back; taken over again" in caplog.text)
        assert len(journal_files(paths)) == 1
        FakeCgroups.set_oom_control(memdir, oom_kill_disable=1)  # what the kernel shows after the "1"
    assert source.faults == 0
    assert FakeCgroups.written(memdir) == ["0"]


@pytest.mark.anyio
async def test_a_memcg_made_again_at_once_is_taken_over_again(
    paths: PathsConfig, fake_cgroups: FakeCgroups, memdir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    source = source_for(paths)
    async with collecting(source):
        efd = int((memdir / "cgroup.event_control").read_text().split()[0])
        before = os.stat(memdir).st_ino
        shutil.rmtree(memdir)
        fake_cgroups.mkdir_v1(CG)  # same path, another cgroup, before the source looked
        assert os.stat(memdir).st_ino != before
        os.eventfd_write(efd, 1)
        await until(lambda: FakeCgroups.written(memdir) == ["1"])
        assert "was removed and made again; taking the new one over" in caplog.text
        assert source.watching == [SCOPE]
        FakeCgroups.set_oom_control(memdir, oom_kill_disable=1, under_oom=1)
        assert source.still_holds(Event(source="memcg-oom", kind="oom", scope=SCOPE))


@pytest.mark.anyio
async def test_many_memcgs_are_watched_apart(paths: PathsConfig, fake_cgroups: FakeCgroups) -> None:
    other = fake_cgroups.mkdir_v1("/jobs/b")
    source = MemcgOomSource(spec(cgroups=(CG, str(other))), Config(paths=paths))
    async with collecting(source) as run:
        assert FakeCgroups.written(other) == ["1"]
        FakeCgroups.set_oom_control(other, oom_kill_disable=1, under_oom=1)
        fire(other)
        await until(lambda: bool(run.kinds("oom")))
        assert [e.scope for e in run.events] == [Scope("v1", "/jobs/b")]
        FakeCgroups.set_oom_control(other, oom_kill_disable=1, under_oom=0)


# --- globs and descendants ----------------------------------------------------------------


@pytest.mark.anyio
async def test_a_glob_takes_over_memcgs_as_they_appear(paths: PathsConfig, fake_cgroups: FakeCgroups) -> None:
    source = source_for(paths, cgroups=("/pods/*",))
    async with collecting(source):
        assert source.watching == []
        pod = fake_cgroups.mkdir_v1("/pods/p1")
        await until(lambda: FakeCgroups.written(pod) == ["1"])
        assert source.watching == [Scope("v1", "/pods/p1")]
        shutil.rmtree(pod)
        await until(lambda: source.watching == [])
    assert journal_files(paths) == []


def stage_child(fake_cgroups: FakeCgroups, tmp_path: Path, parent: Path, name: str, disable: int) -> Path:
    """A child memcg appearing whole under ``parent`` (renamed in, as one inotify event)."""
    staged = FakeCgroups(tmp_path / f"stage-{name}").mkdir_v1(f"/{name}", oom_kill_disable=disable)
    os.rename(staged, parent / name)
    return parent / name


@pytest.mark.anyio
async def test_a_child_that_inherited_the_takeover_is_reset_at_once(
    paths: PathsConfig, fake_cgroups: FakeCgroups, memdir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    source = source_for(paths, rescan_s=3600)  # inotify alone: the watchdog's rescan never runs
    async with collecting(source):
        kid = stage_child(fake_cgroups, tmp_path, memdir, "kid", 1)
        # Reset by inotify's scan, and again by the watchdog's scan right after the takeover
        # when the kid came in that window (a fake file keeps showing 1 after a write).
        await until(lambda: bool(FakeCgroups.written(kid)))
        assert set(FakeCgroups.written(kid)) == {"0"}
        await until(lambda: "its child kid inherited oom_kill_disable=1" in caplog.text)
        assert source.watching == [SCOPE]  # reset, not taken over: the config does not name it
        calm = stage_child(fake_cgroups, tmp_path, memdir, "calm", 0)
        await anyio.sleep(0.2)
        assert FakeCgroups.written(calm) == []


@pytest.mark.anyio
async def test_a_child_the_config_names_is_taken_over_not_reset(
    paths: PathsConfig, fake_cgroups: FakeCgroups, memdir: Path, tmp_path: Path
) -> None:
    source = source_for(paths, cgroups=(CG, f"{CG}/*"), rescan_s=3600)
    async with collecting(source):
        kid = stage_child(fake_cgroups, tmp_path, memdir, "kid", 1)
        await until(lambda: Scope("v1", f"{CG}/kid") in source.watching)
        # The watchdog scans the parent's subtree just after taking it over, without knowing
        # the config's globs: a kid made in that window is reset first, then taken over.
        await until(lambda: FakeCgroups.written(kid)[-1:] == ["1"])
        assert set(FakeCgroups.written(kid)) <= {"0", "1"} and FakeCgroups.written(kid).count("1") == 1
        entries = [Journal(paths.run_dir).read(n) for n in journal_files(paths)]
        # Its 1 came from our takeover of the parent: what goes back is the parent's original.
        assert {(e.path, e.original) for e in entries} == {(CG, "0"), (f"{CG}/kid", "0")}
        FakeCgroups.set_oom_control(kid, oom_kill_disable=1)
    assert FakeCgroups.written(kid) == ["0"]


@pytest.mark.anyio
async def test_the_watchdog_rescan_resets_children_inotify_did_not_report(
    paths: PathsConfig, fake_cgroups: FakeCgroups, memdir: Path
) -> None:
    source = source_for(paths, rescan_s=0.05)
    async with collecting(source):
        deep = fake_cgroups.mkdir_v1(f"{CG}/a/b", oom_kill_disable=1)  # a grandchild: no watch there
        await until(lambda: "0" in FakeCgroups.written(deep))
        assert set(FakeCgroups.written(deep)) == {"0"}  # once per rescan: a fake keeps showing 1


@pytest.mark.anyio
async def test_children_still_at_1_are_reset_on_exit(paths: PathsConfig, fake_cgroups: FakeCgroups) -> None:
    source = source_for(paths, rescan_s=3600)
    async with collecting(source):
        pass
    late = fake_cgroups.mkdir_v1(f"{CG}/late/x", oom_kill_disable=1)
    # Made after the exit: left alone.
    assert FakeCgroups.written(late) == []
    async with collecting(source_for(paths, rescan_s=3600)):
        kid = fake_cgroups.mkdir_v1(f"{CG}/kid/grandkid", oom_kill_disable=1)
    # Reset (by inotify's scan if it came in time, and by the exit's: a fake keeps showing 1).
    assert set(FakeCgroups.written(kid)) == {"0"}


# --- observe mode and kernel kills ----------------------------------------------------------


@pytest.mark.anyio
async def test_observe_mode_touches_nothing_and_reports_kernel_kills(paths: PathsConfig, memdir: Path) -> None:
    (Path(paths.proc) / "self" / "cgroup").write_text(f"4:memory:{CG}\n0::/\n")  # watching our own memcg is fine
    source = source_for(paths, takeover=False)
    async with collecting(source) as run:
        FakeCgroups.set_oom_control(memdir, under_oom=1)
        fire(memdir)
        await anyio.sleep(0.05)
        FakeCgroups.set_oom_control(memdir, under_oom=0, oom_kill=2)  # the kernel killed, just after
        await until(lambda: bool(run.kinds("kernel-kill")))
        assert run.kinds("kernel-kill")[0].values == {"oom_kill_delta": 2, "oom_kill_total": 2}
        assert run.kinds("oom") == []  # the kernel decides: nothing for the engine to act on
        assert FakeCgroups.written(memdir) == []
        assert source.protected_pids() == ()  # no watchdog
    assert FakeCgroups.written(memdir) == []
    assert not (Path(paths.run_dir)).exists()  # no journal


@pytest.mark.anyio
async def test_kernel_kills_without_a_signal_are_found_by_the_idle_poll(paths: PathsConfig, memdir: Path) -> None:
    FakeCgroups.set_oom_control(memdir, oom_kill=5)  # kills before we started are not reported
    async with collecting(source_for(paths, idle_poll_s=0.05)) as run:
        FakeCgroups.set_oom_control(memdir, oom_kill_disable=1, oom_kill=6)
        await until(lambda: len(run.kinds("kernel-kill")) == 1)
        FakeCgroups.set_oom_control(memdir, oom_kill_disable=1, oom_kill=9)
        await until(lambda: len(run.kinds("kernel-kill")) == 2)
    assert [e.values["oom_kill_delta"] for e in run.events] == [1, 3]


# --- refusals: one line each, naming the cgroup -----------------------------------------------


def test_refuses_a_missing_memcg(paths: PathsConfig) -> None:
    with pytest.raises(ConfigError, match=r"^cgroup '/jobs/nope': no such cgroup"):
        source_for(paths, cgroups=("/jobs/nope",))


@pytest.mark.parametrize(
    ("own", "configured", "what"),
    [
        ("/jobs/a", "/jobs/a", "runs in it;"),
        ("/jobs/a/x", "/jobs", "runs in its descendant /jobs/a/x;"),
        ("/x", "/", "runs in its descendant /x;"),
        # Spellings that name the same memcg are checked as the memcg, not as text.
        ("/jobs/a", "/jobs/a/b/..", "runs in it;"),
        ("/jobs/a", "//jobs/./a/", "runs in it;"),
        ("/jobs/a", "jobs/a", "runs in it;"),
        ("/jobs/a/x", "/jobs/b/../a/", "runs in its descendant /jobs/a/x;"),
    ],
)
def test_refuses_its_own_memcg_and_ancestors(
    paths: PathsConfig, fake_cgroups: FakeCgroups, own: str, configured: str, what: str
) -> None:
    fake_cgroups.mkdir_v1(own)
    fake_cgroups.mkdir_v1("/jobs/a/b")
    fake_cgroups.mkdir_v1("/jobs/b")
    (Path(paths.proc) / "self" / "cgroup").write_text(f"4:memory:{own}\n0::/\n")
    with pytest.raises(ConfigError, match=rf"^cgroup '{configured}': oomkit {what}.*pause oomkit too$"):
        source_for(paths, cgroups=(configured,))


def test_refuses_its_own_memcg_reached_through_a_symlink(
    paths: PathsConfig, fake_cgroups: FakeCgroups, tmp_path: Path
) -> None:
    (Path(paths.proc) / "self" / "cgroup").write_text(f"4:memory:{CG}\n0::/\n")
    link = tmp_path / "link"
    link.symlink_to(fake_cgroups.memory_v1 / "jobs")
    with pytest.raises(ConfigError, match=r"oomkit runs in it;"):
        source_for(paths, cgroups=(f"{link}/a",))


@pytest.mark.anyio
async def test_refuses_a_memcg_another_oomkit_holds_whatever_the_spelling(
    paths: PathsConfig, memdir: Path, tmp_path: Path
) -> None:
    other_run_dir = msgspec.structs.replace(paths, run_dir=str(tmp_path / "elsewhere"))
    async with collecting(source_for(paths)):
        for spelling in (str(memdir), f"{CG}/b/..", f"/{CG}//", CG.lstrip("/")):
            # Building one takes no lock (oomkit check, top and plugins run beside a daemon)...
            second = source_for(other_run_dir, cgroups=(spelling,))
            # ...running it is refused, before anything is changed.
            with pytest.raises(ConfigError, match=rf"^cgroup '{spelling}': another oomkit \(pid {os.getpid()}\) holds it$"):
                await second.run(Collected().emit)
            assert FakeCgroups.written(memdir) == ["1"]  # the first's takeover, untouched
        assert journal_files(other_run_dir) == []
    async with collecting(source_for(other_run_dir)):
        pass


@pytest.mark.anyio
async def test_building_a_source_changes_nothing(paths: PathsConfig, memdir: Path) -> None:
    before = (memdir / "memory.oom_control").read_text()
    source = source_for(paths)
    assert (memdir / "memory.oom_control").read_text() == before
    assert not Path(paths.run_dir).exists()  # no journal yet
    async with collecting(source):
        async with collecting(source_for(paths, takeover=False)):  # observing beside it is fine
            pass


def test_refuses_a_memcg_named_twice(paths: PathsConfig, memdir: Path) -> None:
    with pytest.raises(ConfigError, match=rf"^cgroup '{memdir}/.': named twice \(also as '{CG}'\)$"):
        source_for(paths, cgroups=(CG, f"{memdir}/."))


@pytest.mark.anyio
async def test_refuses_an_unusable_run_dir(paths: PathsConfig, tmp_path: Path, memdir: Path) -> None:
    (tmp_path / "file").write_text("")
    bad = msgspec.structs.replace(paths, run_dir=str(tmp_path / "file" / "run"))
    with pytest.raises(ConfigError, match=r"^\[paths\] run_dir '.*/file/run': Not a directory$"):
        await source_for(bad).run(Collected().emit)
    assert FakeCgroups.written(memdir) == []


@pytest.mark.parametrize(
    ("configured", "msg"),
    [
        ("/" + "x/" * 2100, r"^cgroup '/x/x/x.*' \(4201 characters\): 4201 bytes, longer than PATH_MAX allows \(4095\)$"),
        ("/jobs/" + "y" * 256, r"^cgroup '/jobs/y.*' \(262 characters\): the name 'y.*' \(256 characters\) is longer than NAME_MAX"),
        ("/../jobs", r"^cgroup '/\.\./jobs': '\.\.' climbs out of the cgroup v1 memory hierarchy"),
        ("/jobs/a\0b", r"^cgroup '/jobs/a\\x00b': contains a NUL byte$"),
    ],
)
def test_bad_paths_are_one_line_errors(paths: PathsConfig, configured: str, msg: str) -> None:
    with pytest.raises(ConfigError, match=msg) as info:
        source_for(paths, cgroups=(configured,))
    assert "\n" not in str(info.value) and len(str(info.value)) < 400


@pytest.mark.anyio
async def test_a_200_character_memcg_name_is_taken_over(paths: PathsConfig, fake_cgroups: FakeCgroups) -> None:
    long = fake_cgroups.mkdir_v1("/jobs/" + "n" * 200)
    source = source_for(paths, cgroups=(str(long),))
    async with collecting(source):
        assert FakeCgroups.written(long) == ["1"]
        assert len(journal_files(paths)) == 1
        FakeCgroups.set_oom_control(long, oom_kill_disable=1)
    assert FakeCgroups.written(long) == ["0"]
    assert journal_files(paths) == []


@pytest.mark.parametrize(
    ("bad", "msg"),
    [
        ({"cgroups": []}, "`cgroups` needs at least one cgroup"),
        ({"deadline_s": 0}, "Expected `float` >= 0.001"),
        ({"idle_poll_s": -1}, "Expected `float` >= 0.001"),
        ({"poll_interval_s": 2.0}, "`poll_interval_s` cannot be longer than `deadline_s`"),
        ({"watchdog_restarts": -1}, "Expected `int` >= 0"),
    ],
)
def test_config_checks(bad: dict[str, object], msg: str) -> None:
    with pytest.raises(msgspec.ValidationError, match=msg):
        msgspec.convert({"kind": "memcg-oom", "cgroups": ["/a"]} | bad, MemcgOomSourceConfig)


# --- the watchdog -------------------------------------------------------------------------


def _children(name: str) -> list[int]:
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == os.getpid() and name.encode() in cmd:
            out.append(int(pid))
    return out


@pytest.mark.anyio
@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM])
async def test_a_dead_watchdog_is_replaced(
    paths: PathsConfig, memdir: Path, how: signal.Signals, caplog: pytest.LogCaptureFixture
) -> None:
    source = source_for(paths)
    async with collecting(source):
        FakeCgroups.set_oom_control(memdir, oom_kill_disable=1)  # as the kernel shows it once armed
        (dog,) = source.protected_pids()
        os.kill(dog, how)
        await until(lambda: source.restarts == 1 and source.protected_pids() not in ((), (dog,)))
        # Restored meanwhile (by the dying watchdog on SIGTERM, and by the source), armed again.
        await until(lambda: FakeCgroups.written(memdir)[-2:] == ["0", "1"])
        lines = [r.getMessage() for r in caplog.records if "watchdog" in r.getMessage() and r.levelname == "ERROR"]
        assert len(lines) == 1, lines
        why = "killed by SIGKILL" if how == signal.SIGKILL else "exited on SIGTERM after restoring every cgroup"
        assert f"the takeover watchdog (pid {dog}) {why}" in lines[0]
        assert "restart 1 of 3" in lines[0]
        assert len(journal_files(paths)) == 1
        FakeCgroups.set_oom_control(memdir, oom_kill_disable=1)
    assert FakeCgroups.written(memdir) == ["0"]
    assert journal_files(paths) == []


@pytest.mark.anyio
async def test_a_watchdog_that_keeps_dying_ends_the_takeover(paths: PathsConfig, memdir: Path) -> None:
    source = source_for(paths, watchdog_restarts=0)
    with pytest.raises(ExceptionGroup) as info:
        async with anyio.create_task_group() as tg:
            await tg.start(source.run, Collected().emit)
            FakeCgroups.set_oom_control(memdir, oom_kill_disable=1)
            (dog,) = source.protected_pids()
            os.kill(dog, signal.SIGKILL)
            await anyio.sleep(10)
    assert info.group_contains(
        WatchdogError,
        match=r"killed by SIGKILL, 1 death\(s\) in 10 minutes \(0 restart\(s\) allowed\): the takeover ends",
        depth=None,
    )
    assert FakeCgroups.written(memdir) == ["0"]  # restored by the source itself
    assert journal_files(paths) == []


@pytest.mark.anyio
async def test_a_stopped_watchdog_is_replaced(
    paths: PathsConfig, memdir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(guarded, "PING_MIN_S", 0.1)  # three unanswered pings: 0.3 s, not 6
    source = source_for(paths, rescan_s=0.05)
    async with collecting(source):
        (dog,) = source.protected_pids()
        os.kill(dog, signal.SIGSTOP)
        await until(lambda: source.restarts == 1)
        assert source.protected_pids() != (dog,)
        await until(lambda: FakeCgroups.written(memdir)[-1:] == ["1"])
        assert f"the takeover watchdog (pid {dog}) has not answered for 0.3 s; replacing it" in caplog.text


@pytest.mark.anyio
async def test_the_watchdog_ignores_sighup(paths: PathsConfig, memdir: Path) -> None:
    source = source_for(paths)
    async with collecting(source):
        (dog,) = source.protected_pids()
        os.kill(dog, signal.SIGHUP)
        await anyio.sleep(0.3)
        assert source.protected_pids() == (dog,) and source.restarts == 0
        assert FakeCgroups.written(memdir) == ["1"]


@pytest.mark.anyio
async def test_watchdog_refusal_stops_the_start(paths: PathsConfig, memdir: Path) -> None:
    source = source_for(paths)
    # Moved into the memcg after the checks: the watchdog is the last line of defence.
    (Path(paths.proc) / "self" / "cgroup").write_text(f"4:memory:{CG}/x\n0::/\n")
    with pytest.raises(SourceError, match=rf"^cgroup '{CG}': the watchdog refused it: refused: the watchdog runs in cgroup {CG}/x, inside guarded {CG}$"):
        await source.run(Collected().emit)
    assert FakeCgroups.written(memdir) == []
    assert journal_files(paths) == []


_RUN_AND_WAIT = """
import sys, anyio, msgspec
from oomkit.config import Config, PathsConfig
from oomkit.sources.memcg_oom import MemcgOomSource, MemcgOomSourceConfig
async def main():
    paths = msgspec.json.decode(sys.argv[2], type=PathsConfig)
    src = MemcgOomSource(MemcgOomSourceConfig(cgroups=(sys.argv[1],)), Config(paths=paths))
    async def emit(e): pass
    async with anyio.create_task_group() as tg:
        await tg.start(src.run, emit)
        print("armed", flush=True)
        await anyio.sleep_forever()
anyio.run(main)
"""


def test_watchdog_restores_after_sigkill(paths: PathsConfig, memdir: Path) -> None:
    owner = subprocess.Popen(
        [sys.executable, "-c", _RUN_AND_WAIT, CG, msgspec.json.encode(paths).decode()],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert owner.stdout is not None and owner.stdout.readline() == b"armed\n"
        assert FakeCgroups.written(memdir) == ["1"]
        FakeCgroups.set_oom_control(memdir, oom_kill_disable=1)
        with pytest.raises(ConfigError, match=rf"another oomkit \(pid {owner.pid}\)"):
            anyio.run(source_for(paths).run, Collected().emit)
        owner.kill()
        owner.wait()
        deadline = time.monotonic() + 10
        while FakeCgroups.written(memdir) != ["0"]:
            assert time.monotonic() < deadline, FakeCgroups.written(memdir)
            time.sleep(0.01)
        while True:  # the watchdog shares the lock until it has restored and exited
            fd = os.open(memdir, os.O_RDONLY | os.O_DIRECTORY)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            finally:
                os.close(fd)
        assert journal_files(paths) == []
        assert owner.stderr is not None
        err = owner.stderr.read().decode()
        assert f"{CG} (eof): oom_kill_disable 1 -> 0, the original" in err  # said in the service's log
    finally:
        owner.kill()
        owner.wait()
        for stream in (owner.stdout, owner.stderr):
            if stream is not None:
                stream.close()


# --- status ---------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_status_shows_each_memcg_and_the_watchdog(paths: PathsConfig, memdir: Path) -> None:
    source = source_for(paths, deadline_s=0.2, rescan_s=0.02)
    async with collecting(source):
        st = source.status()
        assert (st.kind, st.mode) == ("memcg-oom", "takeover")
        assert [(s.scope, s.state, s.detail) for s in st.scopes] == [(SCOPE, "taken-over", CG)]
        assert st.watchdog is not None and st.watchdog.alive and (st.watchdog.pid,) == source.protected_pids()
        assert st.counters == {"handbacks": 0, "faults": 0, "dropped": 0, "watchdog_restarts": 0}
        FakeCgroups.set_oom_control(memdir, oom_kill_disable=1, under_oom=1)
        fire(memdir)
        await until(lambda: source.status().counters["handbacks"] == 1)
        assert [s.state for s in source.status().scopes] == ["handed-back"]
        FakeCgroups.set_oom_control(memdir, oom_kill_disable=0, under_oom=0)
        await until(lambda: [s.state for s in source.status().scopes] == ["taken-over"])
        shutil.rmtree(memdir)  # the idle poll finds it gone
        await until(lambda: [s.state for s in source.status().scopes] == ["missing"])
    assert source.status().watchdog is None


@pytest.mark.anyio
async def test_a_watchdog_that_misses_a_deadline_is_replaced_and_the_memcg_handed_back(
    paths: PathsConfig, memdir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    source = source_for(paths, deadline_s=0.2, rescan_s=3600)
    async with collecting(source) as run:
        (dog,) = source.protected_pids()
        # Stopped before the OOM begins, it cannot see it (it looks at the memcg once more
        # right after taking it over, which would race with the OOM set below).
        os.kill(dog, signal.SIGSTOP)
        FakeCgroups.set_oom_control(memdir, oom_kill_disable=1, under_oom=1)
        fire(memdir)
        await until(lambda: bool(run.kinds("oom")))
        await until(lambda: source.restarts == 1)
        assert "0" in FakeCgroups.written(memdir)  # handed back by the source, with no watchdog left
        assert f"the takeover watchdog (pid {dog}) has not handed it back" in caplog.text
        FakeCgroups.set_oom_control(memdir, oom_kill_disable=0, under_oom=0)
        await until(lambda: source.protected_pids() not in ((), (dog,)))


@pytest.mark.anyio
async def test_an_engine_that_kills_nobody_hands_back_at_once(paths: PathsConfig, memdir: Path) -> None:
    source = source_for(paths, deadline_s=30.0)
    async with collecting(source) as run:
        FakeCgroups.set_oom_control(memdir, oom_kill_disable=1, under_oom=1)
        fire(memdir)
        await until(lambda: bool(run.kinds("oom")))
        oom = run.kinds("oom")[0]
        assert source.hand_back(oom)  # asked of the watchdog, the only writer
        await until(lambda: FakeCgroups.written(memdir) == ["0"])  # long before the 30 s deadline
        await until(lambda: [s.state for s in source.status().scopes] == ["handed-back"])
        FakeCgroups.set_oom_control(memdir, oom_kill_disable=0, under_oom=1)
        assert not source.still_holds(oom)
        assert not source.hand_back(oom)  # already the kernel's
        FakeCgroups.set_oom_control(memdir, oom_kill_disable=0, under_oom=0, oom_kill=1)
        await until(lambda: FakeCgroups.written(memdir) == ["1"])  # taken over again after
    assert source.handbacks == 1


@pytest.mark.anyio
async def test_nothing_to_hand_back_outside_an_oom(paths: PathsConfig, memdir: Path) -> None:
    source = source_for(paths)
    async with collecting(source):
        assert not source.hand_back(Event(source="memcg-oom", kind="oom", scope=SCOPE))
        assert not source.hand_back(Event(source="memcg-oom", kind="oom", scope=Scope("v1", "/other")))
        assert source.scopes() == [SCOPE]
    assert FakeCgroups.written(memdir) == ["1"]
