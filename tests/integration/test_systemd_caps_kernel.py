"""The systemd unit's capabilities are enough, and CAP_KILL is needed: `oomkit serve` run with
exactly the unit's bounding set (through setpriv, as root's uid) takes a memcg over, locks its
memory and kills a hog owned by uid 65534; without CAP_KILL the same kill is refused and the
OOM goes back to the kernel at the deadline."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from oomkit.probes import capabilities

from .. import kernel
from ..unit.examples.test_systemd_unit import settings

pytestmark = pytest.mark.kernel

NOBODY = 65534


def unit_caps() -> list[str]:
    return settings()["CapabilityBoundingSet"][0].split()


def run_serve(cg: kernel.Cgroup, caps: list[str], tmp_path: Path, tag: str) -> tuple[subprocess.Popen[bytes], Path, Path]:
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("setpriv is not installed (Debian: util-linux)")
    ours = capabilities()
    caps = [c for c in caps if c in ours]  # a capability we lack cannot be granted here
    cfg = tmp_path / f"{tag}.toml"
    events = tmp_path / f"{tag}.jsonl"
    cfg.write_text(f'[paths]\nrun_dir = "{tmp_path / tag}"\n[[sources]]\nkind = "meminfo"\nmem_available = "0%"\n'
                   f'[plugins.jsonl]\npath = "{events}"\n')
    bounding = ",".join(["-all"] + [f"+{c.removeprefix('CAP_').lower()}" for c in caps])
    log = tmp_path / f"{tag}.log"
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            [setpriv, f"--bounding-set={bounding}", "--inh-caps=-all", "--",
             sys.executable, "-m", "oomkit", "serve", "-c", str(cfg), "--takeover", str(cg.path)],
            stdout=subprocess.DEVNULL, stderr=err,
        )
    deadline = time.monotonic() + 30
    while "oomkit ready" not in log.read_text():
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.02)
    return proc, log, events


def hog_as_nobody(cg: kernel.Cgroup) -> subprocess.Popen[bytes]:
    setpriv = shutil.which("setpriv")
    assert setpriv is not None
    python = shutil.which("python3", path="/usr/bin:/usr/local/bin:/bin")
    if python is None:
        pytest.skip("no system python3 to run the hog as uid 65534")
    return cg.spawn([setpriv, "--reuid", str(NOBODY), "--regid", str(NOBODY), "--clear-groups",
                     python, "-I", "-c", "import mmap\nm = [mmap.mmap(-1, 1 << 20) for _ in range(256)]\n"
                     "for x in m:\n    for o in range(0, len(x), 4096): x[o] = 1\nimport time; time.sleep(600)"])


def test_the_units_capabilities_are_enough(memcg: Callable[..., kernel.Cgroup], tmp_path: Path) -> None:
    cg = memcg(limit=64 << 20)
    proc, log, events = run_serve(cg, unit_caps(), tmp_path, "unit")
    try:
        status = Path(f"/proc/{proc.pid}/status").read_text()
        bounding = int(next(ln for ln in status.splitlines() if ln.startswith("CapBnd:")).split()[1], 16)
        assert bin(bounding).count("1") <= 3
        assert cg.keyed("memory.oom_control")["oom_kill_disable"] == 1
        assert "mlockall" not in log.read_text(), log.read_text()
        hog = hog_as_nobody(cg)
        assert hog.wait(timeout=30) == -signal.SIGKILL
        deadline = time.monotonic() + 30
        while not (events.exists() and events.read_text().strip()):
            assert time.monotonic() < deadline
            time.sleep(0.02)
        decision = json.loads(events.read_text().splitlines()[0])
        assert decision["outcome"] == "killed" and decision["victim"]["uid"] == NOBODY
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    assert cg.keyed("memory.oom_control")["oom_kill_disable"] == 0


def test_without_cap_kill_another_users_hog_cannot_be_killed(memcg: Callable[..., kernel.Cgroup], tmp_path: Path) -> None:
    cg = memcg(limit=64 << 20)
    proc, log, events = run_serve(cg, [c for c in unit_caps() if c != "CAP_KILL"], tmp_path, "nokill")
    try:
        hog = hog_as_nobody(cg)
        # Refused by the kernel (EPERM); the OOM goes back to the kernel, whose killer acts.
        assert hog.wait(timeout=60) == -signal.SIGKILL
        deadline = time.monotonic() + 30
        while not (events.exists() and events.read_text().strip()):
            assert time.monotonic() < deadline
            time.sleep(0.02)
        first = json.loads(events.read_text().splitlines()[0])
        assert first["outcome"] != "killed", first
        assert "Operation not permitted" in events.read_text() + log.read_text()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
