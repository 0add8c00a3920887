"""The guest runner itself: the guest it boots, the agent's protocol, its errors, cleanup."""

from __future__ import annotations

import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.guest import (
    CommandFailed,
    CommandTimeout,
    Guest,
    GuestCgroup,
    GuestDied,
    GuestError,
    Image,
)

from .support import CHECKOUT

pytestmark = pytest.mark.kernel


def test_the_guest_has_a_v2_memory_controller_and_the_checkout(guest: Guest, guest_image: Image) -> None:
    assert guest.run(["uname", "-r"]).text.strip() == guest_image.release
    assert "memory" in guest.read_text("/sys/fs/cgroup/cgroup.controllers").split()
    assert "memory" in guest.read_text("/sys/fs/cgroup/cgroup.subtree_control").split()
    assert "0::/" in guest.read_text("/proc/self/cgroup")  # a cgroup2-only guest
    # The checkout is the host's, read-only underneath and writable through the overlay.
    assert guest.read(str(CHECKOUT / "pyproject.toml")) == (CHECKOUT / "pyproject.toml").read_bytes()
    guest.write(str(CHECKOUT / "guest-only.txt"), "x")
    assert not (CHECKOUT / "guest-only.txt").exists()
    guest.run(["rm", str(CHECKOUT / "guest-only.txt")])


def test_run_returns_status_output_and_takes_env_cwd_and_stdin(guest: Guest) -> None:
    r = guest.sh('echo out; echo err >&2; echo "$FOO"; pwd; cat; exit 3', env={"FOO": "bar"}, cwd="/tmp",
                 stdin=b"in\n", check=False)
    assert (r.rc, r.stdout, r.stderr) == (3, b"out\nbar\n/tmp\nin\n", b"err\n")
    with pytest.raises(CommandFailed, match=r"exited with 3; stderr:\nerr"):
        guest.sh("echo err >&2; exit 3")
    assert guest.run(["sh", "-c", "kill -9 $$"], check=False).rc == -9


def test_a_timeout_kills_the_whole_process_group(guest: Guest) -> None:
    with pytest.raises(CommandTimeout, match=r"did not finish within 1 s in the guest \(killed\)"):
        guest.sh("echo started >&2; sleep 1000 & sleep 1001", timeout=1)
    # The background sleep went with its group: no process is left sleeping.
    assert "sleep 100" not in guest.run(["ps", "-eo", "args"]).text


def test_output_is_cut_at_the_limit(guest: Guest) -> None:
    r = guest.run(["head", "-c", str(3 << 20), "/dev/zero"], limit=1 << 20)
    assert r.truncated and len(r.stdout) == 1 << 20


def test_background_processes_report_output_and_stop(guest: Guest) -> None:
    proc = guest.spawn(["sh", "-c", 'echo \'{"n": 1}\'; echo warm >&2; exec sleep 1000'])
    proc.wait_for(lambda p: p.json() == [{"n": 1}], timeout=30, what="its first line")
    assert proc.stop() == -signal.SIGTERM
    assert proc.stderr == b"warm\n"


def test_requests_that_fail_say_why(guest: Guest, guest_cgroup: Callable[[str], GuestCgroup]) -> None:
    with pytest.raises(GuestError, match=r"read /nonexistent: the agent says: FileNotFoundError"):
        guest.read("/nonexistent")
    with pytest.raises(CommandFailed, match=r"(?s)exited with 126.*cannot join /sys/fs/cgroup/none: .*No such file"):
        guest.run(["true"], cgroup="/sys/fs/cgroup/none")
    with pytest.raises(GuestError, match=r"the agent says: FileNotFoundError"):
        guest.run(["/nonexistent-program"])
    # The kernel refuses a process in a cgroup whose children have controllers enabled.
    parent = guest_cgroup("busy")
    parent.child("child")
    with pytest.raises(CommandFailed, match=r"(?s)exited with 126.*cannot join .*Device or resource busy"):
        parent.run(["true"])


def test_a_guest_that_dies_is_reported_with_its_console(fresh_guest: Guest) -> None:
    with pytest.raises(GuestDied, match=r"QEMU exited with status 0; the console says: Kernel panic - not syncing"):
        fresh_guest.sh("echo c > /proc/sysrq-trigger")  # a kernel panic; panic=-1 ends QEMU
    assert not fresh_guest.alive
    with pytest.raises(GuestDied):
        fresh_guest.run(["true"])


def test_a_guest_can_load_zram(guest_image: Image) -> None:
    with Guest(guest_image, zram=True) as g:
        assert g.read_text("/sys/block/zram0/comp_algorithm").strip()


def test_qemu_dies_with_the_process_that_started_it(guest_image: Image) -> None:
    # What happens when pytest is killed outright (its teardown never runs).
    code = "from tests.guest import Guest, prepare; g = Guest(prepare()); g.boot(); print(g.qemu_pid, flush=True); input()"
    with subprocess.Popen([sys.executable, "-c", code], cwd=CHECKOUT, stdin=subprocess.PIPE, stdout=subprocess.PIPE) as parent:
        try:
            assert parent.stdout is not None
            qemu = int(parent.stdout.readline())
            assert _running(qemu)
        finally:
            parent.kill()
    deadline = time.monotonic() + 30
    while _running(qemu):
        assert time.monotonic() < deadline, f"QEMU {qemu} outlived the process that started it"
        time.sleep(0.1)
    # The next guest sweeps away the run directory the killed process left behind.
    left = list(Path(tempfile.gettempdir()).glob(f"oomkit-guest-{parent.pid}-*"))
    assert left
    Guest(guest_image).shutdown()
    assert not any(d.exists() for d in left)


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
