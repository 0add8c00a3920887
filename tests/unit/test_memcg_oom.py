"""MemcgOomSource on fake trees: the test plays the kernel.

The fake ``memory.oom_control`` holds the state the test sets; what the source writes is
appended to it and read back with ``FakeCgroups.written``.  A fake OOM notification is a
write to the eventfd the source registered (its number is in the fake ``cgroup.event_control``).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import msgspec
import pytest

from oomkit.config import Config, ConfigError, PathsConfig
from oomkit.events import Event, Scope
from oomkit.sources.memcg_oom import MemcgOomSource, MemcgOomSourceConfig, WatchdogError
from oomkit.testing import FakeCgroups, FakeProc, paths_for

CG = "/jobs/a"
SCOPE = Scope("v1", CG)


@pytest.fixture
def paths(tmp_path: Path, fake_proc: FakeProc, fake_cgroups: FakeCgroups) -> PathsConfig:
    (fake_proc.root / "self" / "cgroup").write_text("4:memory:/daemon\n0::/\n")
    fake_cgroups.mkdir_v1("/daemon")
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


def fire(d: Path) -> None:
    """What the kernel does at the start of an OOM: signal the registered eventfd."""
    efd = int((d / "cgroup.event_control").read_text().split()[0])
    os.eventfd_write(efd, 1)


async def until(pred: Callable[[], bool], timeout: float = 5.0) -> None:
    with anyio.fail_after(timeout):
        while not pred():
            await anyio.sleep(0.005)


class Run:
    def __init__(self) -> None:
        self.events: list[Event] = []

    async def emit(self, event: Event) -> None:
        self.events.append(event)

    def kinds(self, kind: str) -> list[Event]:
        return [e for e in self.events if e.kind == kind]


@asynccontextmanager
async def running(source: MemcgOomSource) -> AsyncIterator[Run]:
    run = Run()
    async with anyio.create_task_group() as tg:
        await tg.start(source.run, run.emit)
        yield run
        tg.cancel_scope.cancel()


# --- takeover -----------------------------------------------------------------------------


@pytest.mark.anyio
async def test_arms_reports_oom_and_restores_on_cancel(paths: PathsConfig, memdir: Path) -> None:
    source = MemcgOomSource(spec(), Config(paths=paths))
    async with running(source) as run:
        assert FakeCgroups.written(memdir) == ["1"]
        assert run.events == []
        FakeCgroups.set_oom_control(memdir, oom_kill_disable=1, under_oom=1)
        fire(memdir)
        await until(lambda: bool(run.kinds("oom")))
        ev = run.kinds("oom")[0]
        assert (ev.source, ev.scope) == ("memcg-oom", SCOPE)
        assert ev.values == {"under_oom": 1, "oom_kill_total": 0, "usage_bytes": 64 << 20, "limit_bytes": 64 << 20}
        assert source.still_holds(ev)
        FakeCgroups.set_oom_control(memdir, oom_kill_disable=1, under_oom=0)
        assert not source.still_holds(ev)
    assert FakeCgroups.written(memdir) == ["0", "0"]  # the source's restore, then its watchdog's
    assert len(run.kinds("oom")) == 1  # one OOM, one event, however long it was polled


@pytest.mark.anyio
async def test_deadline_hands_back_then_takes_over_again(paths: PathsConfig, memdir: Path) -> None:
    source = MemcgOomSource(spec(deadline_s=0.2), Config(paths=paths))
    async with running(source) as run:
        FakeCgroups.set_oom_control(memdir, oom_kill_disable=1, under_oom=1)
        t0 = time.monotonic()
        fire(memdir)
        await until(lambda: FakeCgroups.written(memdir) == ["0"])
        assert time.monotonic() - t0 >= 0.2
        oom = run.kinds("oom")[0]
        assert not source.still_holds(oom)  # the kernel decides now: the engine must not kill too
        await anyio.sleep(0.1)  # still under OOM: no takeover while the kernel works on it
        assert FakeCgroups.written(memdir) == ["0"]
        FakeCgroups.set_oom_control(memdir, oom_kill_disable=0, under_oom=0, oom_kill=1)
        await until(lambda: FakeCgroups.written(memdir) == ["1"])
        await until(lambda: bool(run.kinds("kernel-kill")))
        assert run.kinds("kernel-kill")[0].values == {"oom_kill_delta": 1, "oom_kill_total": 1}
        # A new OOM after the takeover is ours again, with a deadline of its own.
        FakeCgroups.set_oom_control(memdir, oom_kill_disable=1, under_oom=1, oom_kill=1)
        fire(memdir)
        await until(lambda: len(run.kinds("oom")) == 2)
        assert source.still_holds(run.kinds("oom")[1])
    assert len(run.kinds("oom")) == 2


@pytest.mark.anyio
async def test_an_engine_that_kills_nobody_hands_back_at_once(paths: PathsConfig, memdir: Path) -> None:
    source = MemcgOomSource(spec(deadline_s=30.0), Config(paths=paths))
    async with running(source) as run:
        FakeCgroups.set_oom_control(memdir, oom_kill_disable=1, under_oom=1)
        fire(memdir)
        await until(lambda: bool(run.kinds("oom")))
        oom = run.kinds("oom")[0]
        assert source.hand_back(oom)
        assert FakeCgroups.written(memdir) == ["0"]  # long before the 30 s deadline
        assert not source.still_holds(oom)
        assert not source.hand_back(oom)  # already the kernel's
        FakeCgroups.set_oom_control(memdir, oom_kill_disable=0, under_oom=0, oom_kill=1)
        await until(lambda: FakeCgroups.written(memdir) == ["1"])  # taken over again after


@pytest.mark.anyio
async def test_an_oom_resolved_in_time_is_not_handed_back(paths: PathsConfig, memdir: Path) -> None:
    source = MemcgOomSource(spec(deadline_s=0.3), Config(paths=paths))
    async with running(source) as run:
        FakeCgroups.set_oom_control(memdir, oom_kill_disable=1, under_oom=1)
        fire(memdir)
        await until(lambda: bool(run.kinds("oom")))
        FakeCgroups.set_oom_control(memdir, oom_kill_disable=1, under_oom=0)  # our kill worked
        await anyio.sleep(0.5)
        assert FakeCgroups.written(memdir) == []
    assert FakeCgroups.written(memdir) == ["0", "0"]


@pytest.mark.anyio
async def test_an_oom_already_under_way_at_start_is_reported(paths: PathsConfig, memdir: Path) -> None:
    FakeCgroups.set_oom_control(memdir, oom_kill_disable=1, under_oom=1)
    async with running(MemcgOomSource(spec(deadline_s=5), Config(paths=paths))) as run:
        await until(lambda: bool(run.kinds("oom")))


@pytest.mark.anyio
async def test_restores_when_run_fails(paths: PathsConfig, memdir: Path) -> None:
    source = MemcgOomSource(spec(), Config(paths=paths))

    async def broken(event: Event) -> None:
        raise RuntimeError("engine is broken")

    with pytest.raises(ExceptionGroup) as info:
        async with anyio.create_task_group() as tg:
            await tg.start(source.run, broken)
            FakeCgroups.set_oom_control(memdir, oom_kill_disable=1, under_oom=1)
            fire(memdir)
    assert info.group_contains(RuntimeError, match="engine is broken", depth=None)
    assert FakeCgroups.written(memdir) == ["0", "0"]
    MemcgOomSource(spec(), Config(paths=paths))  # and the lock is released


@pytest.mark.anyio
async def test_removed_memcg_ends_its_watch_without_error(paths: PathsConfig, memdir: Path) -> None:
    source = MemcgOomSource(spec(), Config(paths=paths))
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            await tg.start(source.run, Run().emit)
            efd = int((memdir / "cgroup.event_control").read_text().split()[0])
            shutil.rmtree(memdir)
            os.eventfd_write(efd, 1)  # the kernel signals a removal too
    assert source.faults == 0


@pytest.mark.anyio
async def test_many_memcgs_are_watched_apart(paths: PathsConfig, fake_cgroups: FakeCgroups) -> None:
    other = fake_cgroups.mkdir_v1("/jobs/b")
    source = MemcgOomSource(spec(cgroups=(CG, str(other))), Config(paths=paths))
    async with running(source) as run:
        assert FakeCgroups.written(other) == ["1"]
        FakeCgroups.set_oom_control(other, oom_kill_disable=1, under_oom=1)
        fire(other)
        await until(lambda: bool(run.kinds("oom")))
        assert [e.scope for e in run.events] == [Scope("v1", "/jobs/b")]


# --- observe mode and kernel kills ----------------------------------------------------------


@pytest.mark.anyio
async def test_observe_mode_touches_nothing_and_reports_kernel_kills(paths: PathsConfig, memdir: Path) -> None:
    (Path(paths.proc) / "self" / "cgroup").write_text(f"4:memory:{CG}\n0::/\n")  # watching our own memcg is fine
    source = MemcgOomSource(spec(takeover=False), Config(paths=paths))
    async with running(source) as run:
        FakeCgroups.set_oom_control(memdir, under_oom=1)
        fire(memdir)
        await anyio.sleep(0.05)
        FakeCgroups.set_oom_control(memdir, under_oom=0, oom_kill=2)  # the kernel killed, just after
        await until(lambda: bool(run.kinds("kernel-kill")))
        assert run.kinds("kernel-kill")[0].values == {"oom_kill_delta": 2, "oom_kill_total": 2}
        assert run.kinds("oom") == []  # the kernel decides: nothing for the engine to act on
        assert FakeCgroups.written(memdir) == []
    assert FakeCgroups.written(memdir) == []
    assert not (Path(paths.run_dir)).exists()  # no lock taken


@pytest.mark.anyio
async def test_kernel_kills_without_a_signal_are_found_by_the_idle_poll(paths: PathsConfig, memdir: Path) -> None:
    FakeCgroups.set_oom_control(memdir, oom_kill=5)  # kills before we started are not reported
    async with running(MemcgOomSource(spec(idle_poll_s=0.05), Config(paths=paths))) as run:
        FakeCgroups.set_oom_control(memdir, oom_kill_disable=1, oom_kill=6)
        await until(lambda: len(run.kinds("kernel-kill")) == 1)
        FakeCgroups.set_oom_control(memdir, oom_kill_disable=1, oom_kill=9)
        await until(lambda: len(run.kinds("kernel-kill")) == 2)
    assert [e.values["oom_kill_delta"] for e in run.events] == [1, 3]


# --- refusals -------------------------------------------------------------------------------


def test_refuses_a_missing_memcg(paths: PathsConfig) -> None:
    with pytest.raises(ConfigError, match=r"^cgroup '/jobs/nope': no such cgroup"):
        MemcgOomSource(spec(cgroups=("/jobs/nope",)), Config(paths=paths))


@pytest.mark.parametrize(
    ("own", "configured", "what"),
    [("/jobs/a", "/jobs/a", "runs in it;"), ("/jobs/a/x", "/jobs", "runs in its descendant /jobs/a/x;"), ("/x", "/", "runs in its descendant /x;")],
)
def test_refuses_its_own_memcg_and_ancestors(
    paths: PathsConfig, fake_cgroups: FakeCgroups, own: str, configured: str, what: str
) -> None:
    fake_cgroups.mkdir_v1(own)
    (Path(paths.proc) / "self" / "cgroup").write_text(f"4:memory:{own}\n0::/\n")
    with pytest.raises(ConfigError, match=rf"^cgroup '{configured}': oomkit {what}.*pause oomkit too$"):
        MemcgOomSource(spec(cgroups=(configured,)), Config(paths=paths))


@pytest.mark.anyio
async def test_refuses_a_memcg_another_oomkit_holds(paths: PathsConfig, memdir: Path) -> None:
    async with running(MemcgOomSource(spec(), Config(paths=paths))):
        with pytest.raises(ConfigError, match=rf"^cgroup '{memdir}': another oomkit \(pid {os.getpid()}\) holds it"):
            MemcgOomSource(spec(cgroups=(str(memdir),)), Config(paths=paths))  # the same memcg, named differently
    MemcgOomSource(spec(), Config(paths=paths))


def test_refuses_a_memcg_named_twice(paths: PathsConfig, memdir: Path) -> None:
    with pytest.raises(ConfigError, match=rf"^cgroup '{memdir}': named twice \(also as '{CG}'\)$"):
        MemcgOomSource(spec(cgroups=(CG, str(memdir))), Config(paths=paths))


def test_refuses_an_unusable_run_dir(paths: PathsConfig, tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    bad = msgspec.structs.replace(paths, run_dir=str(tmp_path / "file" / "run"))
    with pytest.raises(ConfigError, match=r"^\[paths\] run_dir '.*/file/run': Not a directory$"):
        MemcgOomSource(spec(), Config(paths=bad))


@pytest.mark.parametrize(
    ("bad", "msg"),
    [
        ({"cgroups": []}, "`cgroups` needs at least one cgroup"),
        ({"deadline_s": 0}, r"Expected `float` >= 0.001 - at `\$.deadline_s`"),
        ({"idle_poll_s": -1}, r"Expected `float` >= 0.001 - at `\$.idle_poll_s`"),
        ({"poll_interval_s": 2.0}, "`poll_interval_s` cannot be longer than `deadline_s`"),
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
async def test_a_dead_watchdog_ends_the_takeover(paths: PathsConfig, memdir: Path) -> None:
    source = MemcgOomSource(spec(), Config(paths=paths))
    with pytest.raises(ExceptionGroup) as info:
        async with anyio.create_task_group() as tg:
            await tg.start(source.run, Run().emit)
            (dog,) = _children("watchdog.py")
            os.kill(dog, signal.SIGKILL)
            await anyio.sleep(5)
    assert info.group_contains(WatchdogError, match="died", depth=None)
    assert FakeCgroups.written(memdir) == ["1", "0"]  # armed, then restored by the source alone


@pytest.mark.anyio
async def test_watchdog_refusal_stops_the_start(paths: PathsConfig, memdir: Path) -> None:
    source = MemcgOomSource(spec(), Config(paths=paths))
    # Moved into the memcg after the checks: the watchdog is the last line of defence.
    (Path(paths.proc) / "self" / "cgroup").write_text(f"4:memory:{CG}/x\n0::/\n")
    with pytest.raises(WatchdogError, match=rf"did not start: refused: the watchdog runs in memcg {CG}/x, inside guarded {CG}"):
        await source.run(Run().emit)
    assert FakeCgroups.written(memdir) == []


_RUN_AND_WAIT = """
import sys, anyio, msgspec
from oomkit.config import Config, PathsConfig
from oomkit.sources.memcg_oom import MemcgOomSource, MemcgOomSourceConfig
async def main():
    src = MemcgOomSource(MemcgOomSourceConfig(cgroups=(sys.argv[1],)), Config(paths=msgspec.json.decode(sys.argv[2], type=PathsConfig)))
    async def emit(e): pass
    async with anyio.create_task_group() as tg:
        await tg.start(src.run, emit)
        print("armed", flush=True)
        await anyio.sleep_forever()
anyio.run(main)
"""


def test_watchdog_restores_after_sigkill(paths: PathsConfig, memdir: Path) -> None:
    owner = subprocess.Popen(
        [sys.executable, "-c", _RUN_AND_WAIT, CG, msgspec.json.encode(paths).decode()], stdout=subprocess.PIPE
    )
    try:
        assert owner.stdout is not None and owner.stdout.readline() == b"armed\n"
        assert FakeCgroups.written(memdir) == ["1"]
        with pytest.raises(ConfigError, match=rf"another oomkit \(pid {owner.pid}\)"):
            MemcgOomSource(spec(), Config(paths=paths))
        owner.kill()
        owner.wait()
        deadline = time.monotonic() + 5
        while FakeCgroups.written(memdir) != ["1", "0"]:
            assert time.monotonic() < deadline, FakeCgroups.written(memdir)
            time.sleep(0.01)
        while True:  # the watchdog shares the lock until it has restored and exited
            try:
                MemcgOomSource(spec(), Config(paths=paths))
                break
            except ConfigError:
                assert time.monotonic() < deadline
                time.sleep(0.01)
    finally:
        owner.kill()
        owner.wait()
        assert owner.stdout is not None
        owner.stdout.close()
