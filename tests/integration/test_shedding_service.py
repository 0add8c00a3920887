"""examples/shedding-service for real: in a memcg with a limit, driven over loopback with more
work than fits.  Without oomkit the kernel's OOM killer kills it; with the engine embedded
(the memcg-threshold source on its own memcg, the default policy, the service's
``oomkit.Rescuer``) each crossing is a decision whose rescue drops the cache: the re-check
finds usage back under the threshold, the decision ends ``rescued``, the service answers 503
with Retry-After meanwhile, and nobody dies, neither the service nor its worker."""

from __future__ import annotations

import collections
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any
from pathlib import Path

import httpx
import pytest

from .. import kernel

pytestmark = pytest.mark.kernel

SERVICE = Path(__file__).resolve().parents[2] / "examples" / "shedding-service" / "shedding_service.py"
MiB = 1 << 20
LIMIT = 192 * MiB  # the interpreter, Starlette and uvicorn take ~45 MiB of it
ITEMS = 300  # 1 MiB each: more than the limit holds


class Service:
    def __init__(self, proc: subprocess.Popen[bytes], port: int, log: Path) -> None:
        self.proc = proc
        self.port = port
        self.log = log

    def stats(self) -> dict[str, object]:
        return httpx.get(f"http://127.0.0.1:{self.port}/stats", timeout=5).json()  # type: ignore[no-any-return]

    def decisions(self) -> list[dict[str, Any]]:
        return httpx.get(f"http://127.0.0.1:{self.port}/decisions", timeout=5).json()  # type: ignore[no-any-return]

    def pids(self) -> list[int]:
        """The service and its workers, as started."""
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
        return [self.proc.pid, *map(int, children)]


@pytest.fixture
def start(memcg: Callable[..., kernel.Cgroup], tmp_path: Path) -> Iterator[Callable[..., tuple[Service, kernel.Cgroup]]]:
    started: list[Service] = []

    def run(*args: str) -> tuple[Service, kernel.Cgroup]:
        cg = memcg(limit=LIMIT)
        log = tmp_path / f"service-{len(started)}.log"
        with open(log, "wb") as err:
            proc = cg.spawn([sys.executable, str(SERVICE), *args], stdout=subprocess.PIPE, stderr=err)
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 30)
        line = proc.stdout.readline().decode() if ready else ""
        assert line.startswith("ready port "), f"no 'ready' line: {line!r}\n{log.read_text()}"
        svc = Service(proc, int(line.split()[2]), log)
        started.append(svc)
        return svc, cg

    yield run
    for svc in started:
        if svc.proc.poll() is None:
            svc.proc.kill()
            svc.proc.wait()
        assert svc.proc.stdout is not None
        svc.proc.stdout.close()


def drive(port: int) -> collections.Counter[str]:
    """ITEMS requests for new keys, one at a time; a 503 makes the client back off briefly."""
    seen: collections.Counter[str] = collections.Counter()
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
        for i in range(ITEMS):
            try:
                r = client.get(f"/item/k{i}")
            except httpx.TransportError:
                seen["connection lost"] += 1
                break
            seen[str(r.status_code)] += 1
            if r.status_code == 503:
                assert r.headers["Retry-After"] == "1"
                time.sleep(0.02)
    return seen


def oom_kills(cg: kernel.Cgroup) -> int:
    return cg.keyed("memory.oom_control")["oom_kill"]


def test_without_oomkit_the_kernel_kills_it(start: Callable[..., tuple[Service, kernel.Cgroup]]) -> None:
    svc, cg = start("--without-oomkit")
    seen = drive(svc.port)
    assert seen["connection lost"] == 1 and seen["200"] < ITEMS, seen
    assert svc.proc.wait(timeout=10) == -signal.SIGKILL
    assert oom_kills(cg) == 1


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_with_oomkit_it_sheds_load_and_survives(start: Callable[..., tuple[Service, kernel.Cgroup]], loop: str) -> None:
    svc, cg = start("--threshold", "60%", "--loop", loop, "--hold", "0.2")
    seen = drive(svc.port)
    assert seen["connection lost"] == 0 and seen["200"] + seen["503"] == ITEMS, seen
    assert seen["503"] >= 1 and seen["200"] >= ITEMS // 2, seen
    stats = svc.stats()
    assert isinstance(stats["drops"], int) and stats["drops"] >= 1 and stats["shed"] == seen["503"]
    assert svc.proc.poll() is None, svc.log.read_text()
    assert oom_kills(cg) == 0
    assert int(cg.read("memory.max_usage_in_bytes")) < LIMIT
    decisions = svc.decisions()
    assert decisions, "no decision: the threshold never made one"
    for d in decisions:
        assert d["outcome"] == "rescued", d
        (attempt,) = d["rescues"]
        assert attempt["plugin"] == "shed-cache" and attempt["result"] == "freed" and attempt["cleared"], attempt
        assert attempt["freed_bytes"] > 0 and d["killed"] == []
        assert d["victim"]["pid"] != svc.proc.pid and d["victim"]["pid"] in svc.pids()  # a worker, never the service
    assert len(decisions) == stats["drops"]
    assert sorted(cg.procs()) == sorted(svc.pids()), "a process of the memcg died"
