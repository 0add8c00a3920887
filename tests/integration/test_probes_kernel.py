"""The probes on the real kernel: each answer checked against doing the thing by hand (or
against what the kernel version and our capabilities imply), and nothing left behind.

The machine is discovered, never assumed: on this project's host (hybrid, v1 memory, v2
without memory, Linux 6.18, no CAP_SYS_RESOURCE) the assertions below are what
/work/shared/KERNEL.md says; on a v2-only guest the same assertions pick the other branch.
"""

from __future__ import annotations

import errno
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from oomkit.probes import PREFIX, PROBES, capabilities, kernel_version, run_all, run_probe
from oomkit.psi import read_pressure

from .. import kernel

pytestmark = pytest.mark.kernel

VERSION = kernel_version() or (0, 0)
CAPS = capabilities()


def doctor_leftovers(pid: int) -> list[str]:
    """Whatever a doctor with ``pid`` made and did not remove: cgroups, tracefs instances,
    temporary mount points and mounts."""
    mine = f"{PREFIX}{pid}-"
    places = [kernel.v1_parent(), kernel.v2_parent()]
    freezer = run_probe("freezer-v1")
    if "dir" in freezer.detail:
        places.append(Path(freezer.detail["dir"]))
    with open("/proc/self/mounts") as f:
        mounts = [line.split()[1] for line in f]
    places += [Path(m) / "instances" for m in mounts if Path(m, "instances").is_dir()]
    left = [str(p) for d in places if d is not None and d.is_dir() for p in d.iterdir() if p.name.startswith(mine)]
    left += [str(p) for p in Path(tempfile.gettempdir()).glob(f"{mine}*")]
    left += [m for m in mounts if mine in m]
    return left


def test_every_probe_answers_and_leaves_nothing_behind() -> None:
    adj = Path("/proc/self/oom_score_adj").read_text()
    results = run_all()
    assert [p.name for p in results] == [s.name for s in PROBES]
    assert [p.reason for p in results if p.ok is None] == []
    assert doctor_leftovers(os.getpid()) == []
    assert Path("/proc/self/oom_score_adj").read_text() == adj
    status = Path("/proc/self/status").read_text()
    assert "VmLck:\t       0 kB" in status  # mlockall undone


def test_doctor_cold_start_json(tmp_path: Path) -> None:
    # What the guest runner will do: a fresh interpreter, nothing but the checkout.
    proc = subprocess.Popen(
        [sys.executable, "-m", "oomkit", "doctor", "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        cwd=tmp_path,
    )
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err.decode()
    doc = json.loads(out)
    assert [p["name"] for p in doc["probes"]] == [s.name for s in PROBES]
    assert [p["summary"] for p in doc["probes"] if p["ok"] is None] == []
    assert doc["kernel"] == os.uname().release
    assert doctor_leftovers(proc.pid) == []


def test_kernel_and_layout() -> None:
    assert run_probe("kernel").summary == f"Linux {os.uname().release}"
    with open("/proc/self/mounts") as f:
        fstypes = {line.split()[2] for line in f}
    layout = run_probe("cgroup-layout").detail["layout"]
    want = {(True, True): "hybrid", (True, False): "v1", (False, True): "v2", (False, False): "none"}
    assert layout == want["cgroup" in fstypes, "cgroup2" in fstypes]


@contextmanager
def by_hand_child(parent: Path | None) -> Iterator[Path | None]:
    """A test cgroup made without the probes (None: it cannot be made here)."""
    if parent is None:
        yield None
        return
    try:
        cg = kernel.make(parent, parent, "oracle")
    except OSError:
        yield None
        return
    try:
        yield cg.path
    finally:
        cg.remove()


def test_takeover_v1_matches_doing_it_by_hand() -> None:
    probe = run_probe("takeover-v1")
    with by_hand_child(kernel.v1_parent()) as child:
        if child is None:
            assert probe.ok is False
            return
        try:
            (child / "memory.oom_control").write_text("1")
            by_hand = "oom_kill_disable 1" in (child / "memory.oom_control").read_text()
            (child / "memory.oom_control").write_text("0")
        except OSError:
            by_hand = False
        assert probe.ok is by_hand, probe.reason


def test_v2_memory_and_brake_match_doing_it_by_hand() -> None:
    memory, brake = run_probe("cgroup-v2-memory"), run_probe("brake-v2")
    with by_hand_child(kernel.v2_parent()) as child:
        if child is None:
            assert memory.ok is False and brake.ok is False
            return
        has_memory = (child / "memory.events").exists()
        assert memory.ok is has_memory, memory.reason
        if not has_memory:
            root = Path(memory.detail["mount"])
            assert brake.ok is False and brake.summary == memory.summary
            if "memory" not in (root / "cgroup.controllers").read_text().split():
                assert memory.summary.startswith("cgroup v2 has no memory controller (")
            return
        try:
            (child / "memory.max").write_text(str(64 << 20))
            (child / "memory.high").write_text(str(48 << 20))
            by_hand = True
        except OSError:
            by_hand = False
        assert brake.ok is by_hand, brake.reason


def test_cgroup_kill_matches_the_kernel_version() -> None:
    probe = run_probe("cgroup-kill")
    if run_probe("cgroup-v2").ok:
        assert probe.ok is (VERSION >= (5, 14)), probe.reason
    else:
        assert probe.ok is False


def _trigger_by_hand(path: Path, window_us: int) -> bool:
    try:
        fd = os.open(path, os.O_RDWR | os.O_NONBLOCK)
    except OSError:
        return False
    try:
        os.write(fd, f"some 100000 {window_us}\0".encode())
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def test_psi_system_trigger_matches_doing_it_by_hand() -> None:
    probe = run_probe("psi-trigger-system")
    system = Path("/proc/pressure/memory")
    by_hand = _trigger_by_hand(system, 2_000_000)
    answers = probe.detail["tried"][str(system)]
    assert (answers["2 s"] == "accepted") is by_hand
    if by_hand:
        assert probe.ok and probe.detail["path"] == str(system)
        # The unprivileged rule: a window that is not a 2 s multiple is refused.
        assert (answers["1 s"] == "accepted") is ("CAP_SYS_RESOURCE" in CAPS)
        if "CAP_SYS_RESOURCE" not in CAPS:
            assert "no CAP_SYS_RESOURCE: windows must be 2 s multiples" in probe.summary


def test_psi_cgroup_trigger_matches_doing_it_by_hand() -> None:
    probe = run_probe("psi-trigger-cgroup")
    with by_hand_child(kernel.v2_parent()) as child:
        if child is None:
            assert probe.ok is False
            return
        assert probe.ok is _trigger_by_hand(child / "memory.pressure", 2_000_000), probe.reason


def test_psi_readable() -> None:
    try:
        read_pressure("/proc/pressure/memory")
        readable = True
    except (OSError, ValueError):
        readable = False
    assert run_probe("psi").ok is readable


def test_tracefs_mounted_or_mountable_with_cap_sys_admin() -> None:
    probe = run_probe("tracefs")
    with open("/proc/self/mounts") as f:
        mounted = [line.split()[1] for line in f if line.split()[2] == "tracefs"]
    if mounted:
        assert probe.ok and probe.summary == f"mounted at {mounted[0]}"
    elif "CAP_SYS_ADMIN" in CAPS:
        assert probe.ok and probe.summary.startswith("not mounted, but mountable"), probe.reason
    else:
        assert probe.ok is False


def test_ring_buffer_mapping_where_the_kernel_has_it() -> None:
    if not run_probe("tracefs").ok:
        pytest.skip(run_probe("tracefs").reason)
    probe = run_probe("trace-ring-buffer-mmap")
    if VERSION >= (6, 10):
        assert probe.ok, probe.reason
        assert probe.detail["tracefs"] is True
        assert probe.detail["nr_subbufs"] >= 1 and probe.detail["subbuf_size"] >= 4096
    else:
        assert probe.ok is False and "needs Linux >= 6.10" in probe.summary


def test_mark_victim_carries_what_kernel_md_says() -> None:
    probe = run_probe("trace-oom-events")
    if not run_probe("tracefs").ok:
        assert probe.ok is None
        return
    assert probe.ok, probe.reason
    fields = set(probe.detail["mark_victim_fields"])
    assert {"pid", "comm", "total_vm", "anon_rss", "file_rss", "shmem_rss", "uid", "pgtables", "oom_score_adj"} <= fields


@pytest.mark.parametrize(
    ("name", "since"), [("pidfd", (5, 3)), ("process-mrelease", (5, 15)), ("process-madvise", (5, 10))]
)
def test_syscalls_match_the_kernel_version(name: str, since: tuple[int, int]) -> None:
    probe = run_probe(name)
    assert probe.ok is (VERSION >= since), probe.reason


def test_process_mrelease_reaps_a_killed_child_when_the_probe_says_so() -> None:
    import ctypes

    probe = run_probe("process-mrelease")
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        pidfd = os.pidfd_open(child.pid)
        os.kill(child.pid, signal.SIGKILL)
        libc = ctypes.CDLL(None, use_errno=True)
        ret = libc.syscall(448, pidfd, 0)
        err = ctypes.get_errno() if ret else 0
        os.close(pidfd)
    finally:
        child.kill()
        child.wait()
    # ESRCH: the victim's own exit won the race; the call exists all the same.
    assert probe.ok is (err in (0, errno.ESRCH)), (probe.reason, errno.errorcode.get(err))


def test_oom_score_adj_can_be_lowered_exactly_with_cap_sys_resource() -> None:
    probe = run_probe("oom-score-adj")
    current = int(Path("/proc/self/oom_score_adj").read_text())
    if current > -1000:
        assert probe.ok is ("CAP_SYS_RESOURCE" in CAPS), probe.reason
    if not probe.ok:
        assert probe.summary.endswith("(below 0 needs CAP_SYS_RESOURCE)")


def test_mlockall_allowed_with_cap_ipc_lock_or_no_limit() -> None:
    probe = run_probe("mlockall")
    soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    if "CAP_IPC_LOCK" in CAPS or soft == resource.RLIM_INFINITY:
        assert probe.ok, probe.reason


def test_swap_zram_and_meminfo_match_the_files() -> None:
    swaps = Path("/proc/swaps").read_text().splitlines()[1:]
    assert run_probe("swap").ok is bool(swaps)
    zram = [d for d in Path("/sys/block").glob("zram*") if int((d / "disksize").read_text() or 0)]
    assert run_probe("zram").ok is bool(zram)
    assert run_probe("meminfo-available").ok is ("MemAvailable:" in Path("/proc/meminfo").read_text())


def test_other_oom_daemons_found_by_name_and_command_line(tmp_path: Path) -> None:
    # Other OOM daemons may run here too (the benchmarks start earlyoom and nohang): assert
    # on our own stand-ins only.
    sleep = shutil.which("sleep")
    assert sleep is not None
    fake_earlyoom = tmp_path / "earlyoom"
    shutil.copy(sleep, fake_earlyoom)
    earlyoom = subprocess.Popen([str(fake_earlyoom), "60"])
    serve = subprocess.Popen(
        [sys.executable, "-c", "import time; print('up', flush=True); time.sleep(60)", "oomkit", "serve"],
        stdout=subprocess.PIPE,
    )
    try:
        assert serve.stdout is not None and serve.stdout.readline() == b"up\n"  # exec'd: its own cmdline
        deadline = time.monotonic() + 30
        while Path(f"/proc/{earlyoom.pid}/comm").read_text() != "earlyoom\n":
            assert time.monotonic() < deadline, "the stand-in never exec'd"
            time.sleep(0.01)
        probe = run_probe("other-oom-daemons")
        found = {(d["pid"], d["name"]) for d in probe.detail["daemons"]}
        assert {(earlyoom.pid, "earlyoom"), (serve.pid, "oomkit serve")} <= found
        assert probe.ok is False and f"earlyoom (pid {earlyoom.pid})" in probe.summary
    finally:
        for p in (earlyoom, serve):
            p.kill()
            p.wait()
        assert serve.stdout is not None
        serve.stdout.close()
    after = {d["pid"] for d in run_probe("other-oom-daemons").detail["daemons"]}
    assert not {earlyoom.pid, serve.pid} & after
