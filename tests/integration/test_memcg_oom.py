"""MemcgOomSource against real v1 memcgs: real OOMs, paused hogs, kernel kills, SIGKILLed owners."""

from __future__ import annotations

import os
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
from oomkit.engine import Engine
from oomkit.events import Candidate, Event, KillResult, Scope
from oomkit.plugins import hookimpl
from oomkit.procfs import own_cgroup, read_process
from oomkit.sources.memcg_oom import MemcgOomSource, MemcgOomSourceConfig

from .. import kernel

pytestmark = pytest.mark.kernel

MiB = 1 << 20
Factory = Callable[..., kernel.Cgroup]


@pytest.fixture
def paths(tmp_path: Path) -> PathsConfig:
    return PathsConfig(run_dir=str(tmp_path / "run"))


def spec(cg: kernel.Cgroup, **kw: object) -> MemcgOomSourceConfig:
    kw.setdefault("deadline_s", 5.0)
    return MemcgOomSourceConfig(cgroups=(cg.rel,), **kw)  # type: ignore[arg-type]


async def until(pred: Callable[[], bool], timeout: float = 20.0) -> None:
    with anyio.fail_after(timeout):
        while not pred():
            await anyio.sleep(0.005)


def disabled(cg: kernel.Cgroup) -> int:
    return cg.keyed("memory.oom_control")["oom_kill_disable"]


def under_oom(cg: kernel.Cgroup) -> int:
    return cg.keyed("memory.oom_control")["under_oom"]


@asynccontextmanager
async def running(source: MemcgOomSource) -> AsyncIterator[list[Event]]:
    events: list[Event] = []

    async def emit(event: Event) -> None:
        events.append(event)

    async with anyio.create_task_group() as tg:
        await tg.start(source.run, emit)
        yield events
        tg.cancel_scope.cancel()


@pytest.mark.anyio
async def test_takeover_pauses_a_hog_and_reports_the_oom(memcg: Factory, paths: PathsConfig) -> None:
    cg = memcg(limit=32 * MiB)
    source = MemcgOomSource(spec(cg), Config(paths=paths))
    async with running(source) as events:
        assert disabled(cg) == 1
        hog = cg.hog(64)
        await until(lambda: any(e.kind == "oom" for e in events))
        (oom,) = [e for e in events if e.kind == "oom"]
        assert oom.scope == Scope("v1", cg.rel)
        assert oom.values["limit_bytes"] == 32 * MiB
        assert source.still_holds(oom)
        await anyio.sleep(0.2)
        assert hog.poll() is None  # paused at the limit, waiting for us
        assert under_oom(cg) == 1
        hog.kill()
        assert hog.wait(timeout=10) == -signal.SIGKILL
        await until(lambda: under_oom(cg) == 0)
        assert not source.still_holds(oom)
        assert cg.keyed("memory.oom_control")["oom_kill"] == 0  # the kernel killed nobody
    assert disabled(cg) == 0


@pytest.mark.anyio
async def test_deadline_hands_back_to_the_kernel_which_kills(memcg: Factory, paths: PathsConfig) -> None:
    cg = memcg(limit=32 * MiB)
    async with running(MemcgOomSource(spec(cg, deadline_s=0.3), Config(paths=paths))) as events:
        hog = cg.hog(64)
        await until(lambda: any(e.kind == "kernel-kill" for e in events))
        assert hog.wait(timeout=10) == -signal.SIGKILL
        kinds = [e.kind for e in events]
        assert kinds.index("oom") < kinds.index("kernel-kill")
        kill = next(e for e in events if e.kind == "kernel-kill")
        assert kill.values["oom_kill_delta"] >= 1
        await until(lambda: disabled(cg) == 1)  # taken over again once out of OOM
    assert disabled(cg) == 0


@pytest.mark.anyio
async def test_observe_mode_reports_kernel_kills_only(memcg: Factory, paths: PathsConfig) -> None:
    cg = memcg(limit=32 * MiB)
    async with running(MemcgOomSource(spec(cg, takeover=False), Config(paths=paths))) as events:
        assert disabled(cg) == 0
        hog = cg.hog(64)
        assert hog.wait(timeout=20) == -signal.SIGKILL
        await until(lambda: any(e.kind == "kernel-kill" for e in events))
        assert [e.kind for e in events] == ["kernel-kill"]
        assert disabled(cg) == 0


def test_refuses_the_memcg_it_runs_in_and_its_parent(paths: PathsConfig) -> None:
    reason = kernel.v1_skip_reason()
    if reason:
        pytest.skip(reason)
    own = own_cgroup("/proc", "memory")
    assert own is not None
    with pytest.raises(ConfigError, match=rf"^cgroup '{own}': oomkit runs in it;"):
        MemcgOomSource(MemcgOomSourceConfig(cgroups=(own,)), Config(paths=paths))
    parent = str(Path(own).parent)
    with pytest.raises(ConfigError, match=rf"^cgroup '{parent}': oomkit runs in its descendant {own};"):
        MemcgOomSource(MemcgOomSourceConfig(cgroups=(parent,)), Config(paths=paths))


_OWNER = """
import sys, anyio, msgspec
from oomkit.config import Config, PathsConfig
from oomkit.sources.memcg_oom import MemcgOomSource, MemcgOomSourceConfig
async def main():
    src = MemcgOomSource(MemcgOomSourceConfig(cgroups=(sys.argv[1],), deadline_s=3600),
                         Config(paths=msgspec.json.decode(sys.argv[2], type=PathsConfig)))
    async def emit(e): pass
    async with anyio.create_task_group() as tg:
        await tg.start(src.run, emit)
        print("armed", flush=True)
        await anyio.sleep_forever()
anyio.run(main)
"""


def test_watchdog_hands_a_paused_memcg_back_after_sigkill(memcg: Factory, paths: PathsConfig) -> None:
    cg = memcg(limit=32 * MiB)
    owner = subprocess.Popen(
        [sys.executable, "-c", _OWNER, cg.rel, msgspec.json.encode(paths).decode()], stdout=subprocess.PIPE
    )
    try:
        assert owner.stdout is not None and owner.stdout.readline() == b"armed\n"
        assert disabled(cg) == 1
        hog = cg.hog(64)
        deadline = time.monotonic() + 20
        while under_oom(cg) != 1:
            assert time.monotonic() < deadline, "the hog never reached its limit"
            time.sleep(0.01)
        owner.send_signal(signal.SIGKILL)
        owner.wait(timeout=10)
        # Nobody decides for the paused hog now: the watchdog gives it to the kernel.
        assert hog.wait(timeout=10) == -signal.SIGKILL
        assert disabled(cg) == 0
        assert cg.keyed("memory.oom_control")["oom_kill"] >= 1
    finally:
        owner.kill()
        owner.wait()
        assert owner.stdout is not None
        owner.stdout.close()


# --- end to end: an engine with the source, a candidates/veto plugin and a killer ------------


class _MemcgProcs:
    """Offers the processes of one memcg and protects one of them."""

    def __init__(self, cg: kernel.Cgroup, protected: int) -> None:
        self.cg = cg
        self.protected = protected

    @hookimpl
    def oomkit_candidates(self, event: Event) -> list[Candidate]:
        return [c for c in (read_process("/proc", pid, event.scope.path) for pid in self.cg.procs()) if c]

    @hookimpl
    def oomkit_veto(self, candidates: list[Candidate]) -> dict[int, str]:
        return {c.pid: "the test protects it" for c in candidates if c.pid == self.protected}


class _Sigkill:
    @hookimpl
    async def oomkit_kill(self, victim: Candidate) -> KillResult:
        t = time.monotonic_ns()
        os.kill(victim.pid, signal.SIGKILL)
        return KillResult(action="sigkill", outcome="killed", signals=("SIGKILL",), sent_ns=t)


@pytest.mark.anyio
async def test_engine_kills_the_hog_and_spares_the_protected_sibling(memcg: Factory, paths: PathsConfig) -> None:
    cg = memcg(limit=48 * MiB)
    sibling = cg.spawn([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        config = Config(paths=paths, sources=(spec(cg, deadline_s=10.0),))
        engine = Engine(config, plugins=[_MemcgProcs(cg, sibling.pid), _Sigkill()], autoload=False)
        async with engine:
            hog = cg.hog(96)
            await until(lambda: any(d.outcome == "killed" for d in engine.recent))
            (decision,) = [d for d in engine.recent if d.outcome == "killed"]
            assert decision.victim is not None and decision.victim.pid == hog.pid
            assert decision.event.kind == "oom"
            assert hog.wait(timeout=10) == -signal.SIGKILL
            await until(lambda: under_oom(cg) == 0)
            assert sibling.poll() is None
            assert [r.candidate.pid for r in decision.ranking if r.vetoed] == [sibling.pid]
            assert cg.keyed("memory.oom_control")["oom_kill"] == 0  # our killer, not the kernel's
        assert disabled(cg) == 0
    finally:
        sibling.kill()
        sibling.wait()
