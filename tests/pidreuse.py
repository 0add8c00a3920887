"""A pid reused on purpose: scripts run in a pid namespace of their own, where writing
``ns_last_pid`` makes the kernel hand a dead process's pid to the next one."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent


def spawn_with_pid(pid: int, argv: list[str], **popen: Any) -> subprocess.Popen[bytes]:
    """Start ``argv`` as process ``pid`` (free, in a pid namespace we own); exits the script if
    the kernel will not give that pid."""
    for _ in range(20):
        with open("/proc/sys/kernel/ns_last_pid", "w") as f:
            f.write(str(pid - 1))
        new = subprocess.Popen(argv, **popen)
        if new.pid == pid:
            return new
        new.kill()
        new.wait()
    sys.exit("ns_last_pid did not give the pid back")


def run_in_pid_namespace(script: str, *args: str) -> Any:
    """Run ``script`` (Python that prints one JSON document; ``tests`` importable) as pid 1 of
    a new pid namespace with its own /proc; what it printed.  Skips where that cannot be."""
    if os.geteuid() != 0:
        pytest.skip("needs root: a pid namespace of our own and ns_last_pid")
    if shutil.which("unshare") is None:
        pytest.skip("no unshare(1) to make a pid namespace")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    run = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-c", script, *args],
                         capture_output=True, text=True, timeout=60, env=env)
    if run.returncode != 0 and "unshare failed" in run.stderr:
        pytest.skip(f"no pid namespace here: {run.stderr.strip()}")
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout)
