"""examples/systemd/oomkit.service: systemd's own checker accepts it, and it says what the
README and docs/operations.md promise (notify, watchdog, mixed kill mode, restore after stop)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from oomkit.config import EngineConfig

UNIT = Path(__file__).resolve().parents[3] / "examples" / "systemd" / "oomkit.service"
INSTALLED = "/usr/local/bin/oomkit"


def settings() -> dict[str, list[str]]:
    """``Key`` to every value it is given in ``[Service]`` (keys may repeat in a unit)."""
    out: dict[str, list[str]] = {}
    section = ""
    for raw in UNIT.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        if section == "Service":
            out.setdefault(key, []).append(value)
    return out


def test_the_unit_promises_what_the_docs_say() -> None:
    s = settings()
    assert s["Type"] == ["notify"] and s["NotifyAccess"] == ["main"]
    assert s["KillMode"] == ["mixed"] and s["OOMScoreAdjust"] == ["-1000"]
    assert s["WatchdogSec"] and s["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert s["ExecStopPost"][0].split()[:2] == [INSTALLED, "restore"]
    assert s["ExecStart"][0].split()[:2] == [INSTALLED, "serve"]
    assert s["CapabilityBoundingSet"] == ["CAP_KILL CAP_SYS_RESOURCE CAP_IPC_LOCK"]


def test_the_unit_lets_a_takeover_decision_run_real_time() -> None:
    # Without CAP_SYS_NICE, RLIMIT_RTPRIO is what lets the loop's thread become SCHED_FIFO at
    # [engine] urgent_realtime_priority; RestrictRealtime= would refuse it whatever the limit.
    s = settings()
    default = EngineConfig().urgent_realtime_priority
    assert default >= 1 and s["LimitRTPRIO"] == [str(default)]
    assert "RestrictRealtime" not in s


def test_systemd_analyze_verify_accepts_it(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (Debian: apt-get install systemd)")
    oomkit = Path(sys.executable).with_name("oomkit")
    assert oomkit.exists(), "the test venv installs the oomkit script"
    # verify checks that ExecStart= names an executable: point it at this checkout's.
    unit = tmp_path / "oomkit.service"
    unit.write_text(UNIT.read_text().replace(INSTALLED, str(oomkit)))
    done = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    # verify exits 0 on unknown keys and bad values too, and only says so on stderr.
    assert done.returncode == 0 and done.stderr == "", done.stderr


def test_systemd_analyze_finds_a_misspelt_setting(tmp_path: Path) -> None:
    """The check above can fail: a wrong value is reported."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (Debian: apt-get install systemd)")
    oomkit = Path(sys.executable).with_name("oomkit")
    unit = tmp_path / "oomkit.service"
    unit.write_text(UNIT.read_text().replace(INSTALLED, str(oomkit)).replace("KillMode=mixed", "KillMode=mixd"))
    done = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert "kill mode" in done.stderr


def test_process_mrelease_is_allowed_by_the_syscall_filter() -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (Debian: apt-get install systemd)")
    allowed: set[str] = set()
    for item in settings()["SystemCallFilter"][0].split():
        if item.startswith("@"):
            out = subprocess.run([analyze, "syscall-filter", item], capture_output=True, text=True, timeout=60)
            assert out.returncode == 0, out.stderr
            groups = [ln.strip() for ln in out.stdout.splitlines()[1:] if ln.strip() and not ln.strip().startswith("#")]
            pending = list(groups)
            while pending:
                name = pending.pop()
                if name.startswith("@"):
                    sub = subprocess.run([analyze, "syscall-filter", name], capture_output=True, text=True, timeout=60)
                    pending += [ln.strip() for ln in sub.stdout.splitlines()[1:]
                                if ln.strip() and not ln.strip().startswith("#")]
                else:
                    allowed.add(name)
        else:
            allowed.add(item)
    # What the daemon calls beyond plain file and socket I/O.
    needed = {"process_mrelease", "pidfd_open", "pidfd_send_signal", "mlockall", "eventfd2",
              "epoll_wait", "inotify_init1", "flock", "kill", "process_madvise", "sched_setscheduler",
              "sched_getscheduler", "sched_getparam"}
    assert needed <= allowed, sorted(needed - allowed)
