"""`oomkit serve` as operators run it: a real memcg, a real OOM, a real kill, a JSON log."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from .. import kernel

pytestmark = pytest.mark.kernel


def wait_for(predicate: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)


class Daemon:
    def __init__(self, proc: subprocess.Popen[bytes], log: Path) -> None:
        self.proc = proc
        self.log = log

    def stderr(self) -> str:
        return self.log.read_text()

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=10)


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    started: list[Daemon] = []

    def start(*args: str, config: str = "") -> Daemon:
        cfg = tmp_path / "oomkit.toml"
        # Its own run_dir: the default one may hold another daemon's socket and journal.
        cfg.write_text(f'{config}\n[paths]\nrun_dir = "{tmp_path / "run"}"\n')
        log = tmp_path / f"serve-{len(started)}.log"
        with open(log, "wb") as err:
            proc = subprocess.Popen(
                [sys.executable, "-m", "oomkit", "serve", "-c", str(cfg), *args],
                stdout=subprocess.DEVNULL,
                stderr=err,
            )
        d = Daemon(proc, log)
        started.append(d)
        wait_for(lambda: "oomkit ready" in d.stderr() or proc.poll() is not None, 20, "oomkit ready")
        assert proc.poll() is None, d.stderr()
        return d

    yield start
    for d in started:
        if d.proc.poll() is None:
            d.proc.kill()
            d.proc.wait()


# A memcg of its own for the daemon would be the production layout; here it stays in the
# test's memcg, which is never the one it takes over.
PROTECT_SLEEP = """
[[sources]]
kind = "meminfo"
mem_available = "0%"

[plugins.protect]
names = ["sleep"]
"""


def test_serve_takes_over_kills_the_hog_spares_the_sibling_and_restores(
    memcg: Callable[..., kernel.Cgroup], serve: Callable[..., Daemon], tmp_path: Path
) -> None:
    cg = memcg(limit=64 << 20)
    sibling = cg.spawn(["sleep", "600"])
    events = tmp_path / "decisions.jsonl"
    d = serve("--takeover", str(cg.path), "--events", str(events), config=PROTECT_SLEEP)
    assert cg.keyed("memory.oom_control")["oom_kill_disable"] == 1

    hog = cg.hog(256)
    assert hog.wait(timeout=20) == -signal.SIGKILL
    wait_for(lambda: events.exists() and events.read_text().strip(), 10, "the decision log")
    wait_for(lambda: cg.keyed("memory.oom_control")["under_oom"] == 0, 5, "under_oom back to 0")
    assert sibling.poll() is None, "the protected sibling was killed"

    decision = json.loads(events.read_text().splitlines()[0])
    assert decision["outcome"] == "killed"
    assert decision["victim"]["pid"] == hog.pid
    assert decision["event"]["kind"] == "oom" and decision["event"]["scope"] == {"tree": "v1", "path": cg.rel}
    assert decision["kill"]["sent_ns"] > decision["event"]["monotonic_ns"]
    assert decision["wall_time"] > 0 and decision["monotonic_ns"] > 0
    vetoed = {r["candidate"]["pid"]: r["vetoes"] for r in decision["ranking"]}
    assert vetoed[sibling.pid] and not vetoed[hog.pid]

    assert d.stop() == 0, d.stderr()
    assert cg.keyed("memory.oom_control")["oom_kill_disable"] == 0
    sibling.kill()
    sibling.wait()


def test_serve_dry_run_reports_and_kills_nothing(
    memcg: Callable[..., kernel.Cgroup], serve: Callable[..., Daemon], tmp_path: Path
) -> None:
    cg = memcg(limit=64 << 20)
    events = tmp_path / "decisions.jsonl"
    d = serve("--takeover", str(cg.path), "--events", str(events), "--dry-run", config=PROTECT_SLEEP)
    hog = cg.hog(256)
    wait_for(lambda: events.exists() and events.read_text().strip(), 10, "the decision log")
    first = json.loads(events.read_text().splitlines()[0])
    assert first["outcome"] == "dry-run" and first["victim"]["pid"] == hog.pid
    # Nobody killed it: after the deadline the kernel's own killer does.
    assert hog.wait(timeout=20) == -signal.SIGKILL
    assert "handing" in d.stderr().lower() or "kernel" in d.stderr().lower()
    assert d.stop() == 0


def test_serve_refuses_a_missing_cgroup_in_one_line(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[paths]\nrun_dir = "{tmp_path / "run"}"\n')
    out = subprocess.run(
        [sys.executable, "-m", "oomkit", "serve", "-c", str(cfg), "--takeover", "/no/such/cgroup-here"],
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert out.returncode == 2
    assert out.stderr.startswith("oomkit: error: ") and "no/such/cgroup-here" in out.stderr
    assert out.stderr.count("\n") == 1


def test_serve_stops_cleanly_on_sigint(serve: Callable[..., Daemon]) -> None:
    d = serve(config=PROTECT_SLEEP)
    d.proc.send_signal(signal.SIGINT)
    assert d.proc.wait(timeout=10) == 0
    assert "SIGINT received" in d.stderr()


def test_serve_default_config_runs(serve: Callable[..., Daemon]) -> None:
    d = serve(config="")
    assert "sources: meminfo" in d.stderr()
    assert os.path.exists(f"/proc/{d.proc.pid}")
    assert d.stop() == 0
