"""Every probe on fake /proc, cgroupfs and tracefs trees: what it reports, and that it leaves
nothing behind.  The system calls probed (pidfd, process_mrelease, mlockall) are the real
ones: they change nothing; their real answers are checked in tests/integration."""

from __future__ import annotations

import dataclasses
import errno
import mmap
import os
import struct
from pathlib import Path

import pytest

from oomkit import probes
from oomkit.probes import PREFIX, PROBES, Machine, find_oom_daemons, run_all, run_probe, syscall_verdict
from oomkit.testing import FakeCgroups, FakeProc, FakeTracefs, probe_machine

OWN_MEMCG = "/jobs/me"


@pytest.fixture
def tracefs(tmp_path: Path) -> FakeTracefs:
    return FakeTracefs(tmp_path / "tracefs")


@pytest.fixture
def freezer(fake_cgroups: FakeCgroups) -> Path:
    return fake_cgroups.mount_v1("freezer")


@pytest.fixture
def machine(fake_proc: FakeProc, fake_cgroups: FakeCgroups, tracefs: FakeTracefs, freezer: Path) -> Machine:
    fake_cgroups.mkdir_v1(OWN_MEMCG)
    fake_proc.set_mounts(
        str(fake_cgroups.memory_v1), str(fake_cgroups.unified), v1={"freezer": str(freezer)}, tracefs=tracefs.path
    )
    fake_proc.set_self_cgroup(OWN_MEMCG, "/", freezer="/")
    return probe_machine(fake_proc, fake_cgroups, tracefs)


def leftovers(*roots: Path) -> list[Path]:
    return [p for root in roots for p in root.rglob(f"{PREFIX}*")]


def test_every_probe_answers_on_fake_trees_and_leaves_nothing(
    machine: Machine, fake_cgroups: FakeCgroups, tracefs: FakeTracefs
) -> None:
    results = run_all(machine)
    assert [p.name for p in results] == [spec.name for spec in PROBES]
    unsure = [p.reason for p in results if p.ok is None]
    assert not unsure
    assert leftovers(fake_cgroups.root, tracefs.root) == []


def test_probe_names_are_unique() -> None:
    names = [spec.name for spec in PROBES]
    assert len(names) == len(set(names))


# --- cgroups --------------------------------------------------------------------------------


def test_layout_hybrid_v1_v2_and_none(machine: Machine, fake_proc: FakeProc, fake_cgroups: FakeCgroups) -> None:
    p = run_probe("cgroup-layout", machine)
    assert p.ok and p.detail["layout"] == "hybrid"
    assert p.detail["v1"] == {"memory": str(fake_cgroups.memory_v1), "freezer": str(fake_cgroups.root / "freezer")}
    assert p.detail["v2_root_controllers"] == ["cpu", "io", "memory", "pids"]
    assert p.summary.startswith("hybrid: v1 freezer, memory; v2 at ")

    fake_proc.set_mounts(str(fake_cgroups.memory_v1))
    v1_only = probe_machine(fake_proc)
    assert run_probe("cgroup-layout", dataclasses.replace(v1_only, unified=None)).detail["layout"] == "v1"
    fake_proc.set_mounts(unified=str(fake_cgroups.unified))
    v2_only = dataclasses.replace(probe_machine(fake_proc, fake_cgroups), memory_v1=None)
    assert run_probe("cgroup-layout", v2_only).detail["layout"] == "v2"
    fake_proc.set_mounts()
    none = dataclasses.replace(v2_only, unified=None)
    p = run_probe("cgroup-layout", none)
    assert p.ok is False and p.summary == "no cgroup hierarchy is mounted"


def test_v1_memory_ours_and_why_not(machine: Machine, fake_proc: FakeProc) -> None:
    p = run_probe("cgroup-v1-memory", machine)
    assert p.ok, p.reason
    assert p.summary == f"our memory cgroup {OWN_MEMCG}: children can be made there"

    gone = dataclasses.replace(machine, memory_v1=None)
    p = run_probe("cgroup-v1-memory", gone)
    assert p.ok is False
    assert p.summary == f"no cgroup v1 memory hierarchy is mounted (see {fake_proc.path}/self/mounts)"

    fake_proc.set_self_cgroup("/elsewhere")
    p = run_probe("cgroup-v1-memory", machine)
    assert p.ok is False and p.summary.startswith("our cgroup v1 memory cgroup /elsewhere is not visible at ")


def test_v1_memory_refused_mkdir_names_the_parent(machine: Machine, fake_cgroups: FakeCgroups) -> None:
    def refuse(path: Path) -> None:
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))

    p = run_probe("cgroup-v1-memory", dataclasses.replace(machine, mkdir=refuse))
    assert p.ok is False
    assert p.summary == (
        f"cannot create a cgroup v1 memory cgroup under {fake_cgroups.memory_v1}/jobs/me: Permission denied (EACCES)"
    )


def test_takeover_v1_writes_disable_then_enable_and_arms_an_eventfd(
    machine: Machine, fake_cgroups: FakeCgroups
) -> None:
    made: list[Path] = []
    seen: dict[str, list[str]] = {}

    def rmdir(path: Path) -> None:
        seen["oom_control"] = FakeCgroups.written(path)
        seen["event_control"] = (path / "cgroup.event_control").read_text().split()
        fake_cgroups.rmdir(path)

    def mkdir(path: Path) -> None:
        made.append(path)
        fake_cgroups.mkdir(path)

    p = run_probe("takeover-v1", dataclasses.replace(machine, mkdir=mkdir, rmdir=rmdir))
    assert p.ok, p.reason
    assert made and made[0].parent == fake_cgroups.memory_v1 / "jobs" / "me"
    assert made[0].name.startswith(f"{PREFIX}{os.getpid()}-")
    assert seen["oom_control"] == ["1", "0"]  # set, then restored
    assert len(seen["event_control"]) == 2  # "<eventfd> <fd of memory.oom_control>"
    assert not made[0].exists()


def test_takeover_v1_names_the_step_that_failed(machine: Machine, fake_cgroups: FakeCgroups) -> None:
    def mkdir(path: Path) -> None:
        fake_cgroups.mkdir(path)
        (path / "memory.oom_control").unlink()
        (path / "memory.oom_control").mkdir()  # writing it fails with EISDIR

    def rmdir(path: Path) -> None:
        (path / "memory.oom_control").rmdir()
        fake_cgroups.rmdir(path)

    p = run_probe("takeover-v1", dataclasses.replace(machine, mkdir=mkdir, rmdir=rmdir))
    assert p.ok is False
    assert p.summary.startswith("writing oom_kill_disable=1 to ")
    assert p.summary.endswith("/memory.oom_control: Is a directory (EISDIR)")


def test_freezer_v1(machine: Machine, fake_proc: FakeProc, fake_cgroups: FakeCgroups) -> None:
    p = run_probe("freezer-v1", machine)
    assert p.ok and p.summary == "our freezer cgroup /: children can be made there"
    fake_proc.set_mounts(str(fake_cgroups.memory_v1), str(fake_cgroups.unified))
    p = run_probe("freezer-v1", machine)
    assert p.ok is False
    assert p.summary == f"no cgroup v1 freezer hierarchy is mounted (see {fake_proc.path}/self/mounts)"


def test_v2_ours_with_controllers(machine: Machine) -> None:
    p = run_probe("cgroup-v2", machine)
    assert p.ok
    assert p.summary == "our cgroup /: controllers cpu io memory pids; enabled for its children: memory"
    assert p.detail["parent_subtree_control"] is None  # the root has no parent


def test_v2_memory_and_brake_in_a_child(machine: Machine) -> None:
    p = run_probe("cgroup-v2-memory", machine)
    assert p.ok, p.reason
    assert p.detail["memory_events"]["oom_kill"] == 0
    p = run_probe("brake-v2", machine)
    assert p.ok, p.reason
    assert p.summary == "memory.high and memory.max writable in a child of our cgroup /"


def test_v2_memory_why_not_no_controller_at_all(tmp_path: Path, fake_proc: FakeProc) -> None:
    cg = FakeCgroups(tmp_path / "hybrid", v2_controllers=("hugetlb",), v2_enabled=())
    fake_proc.set_mounts(str(cg.memory_v1), str(cg.unified))
    m = probe_machine(fake_proc, cg)
    for name in ("cgroup-v2-memory", "brake-v2"):
        p = run_probe(name, m)
        assert p.ok is False
        assert p.summary == (
            f"cgroup v2 has no memory controller ({cg.unified}/cgroup.controllers: hugetlb; "
            f"it is bound to the v1 hierarchy at {cg.memory_v1})"
        )


def test_v2_memory_why_not_disabled_for_our_cgroup_or_its_children(
    machine: Machine, fake_proc: FakeProc, fake_cgroups: FakeCgroups
) -> None:
    FakeCgroups.set_subtree_control(fake_cgroups.unified, ())
    fake_cgroups.mkdir_v2("/svc")
    fake_proc.set_self_cgroup(OWN_MEMCG, "/svc")
    p = run_probe("cgroup-v2-memory", machine)
    assert p.ok is False
    assert p.summary == (
        f"the memory controller is not enabled for our cgroup /svc ({fake_cgroups.unified}/cgroup.subtree_control: none)"
    )
    assert p.detail["parent_subtree_control"] == []

    FakeCgroups.set_subtree_control(fake_cgroups.unified, ("memory",))
    fake_cgroups.mkdir_v2("/svc2")
    fake_proc.set_self_cgroup(OWN_MEMCG, "/svc2")
    p = run_probe("brake-v2", machine)
    assert p.ok is False
    assert p.summary.startswith(
        f"the memory controller is not enabled for children of our cgroup /svc2 ({fake_cgroups.unified}/svc2/"
        "cgroup.subtree_control: none;"
    )


def test_v2_missing(machine: Machine, fake_proc: FakeProc) -> None:
    m = dataclasses.replace(machine, unified=None)
    for name in ("cgroup-v2", "cgroup-v2-memory", "brake-v2", "cgroup-kill", "psi-trigger-cgroup"):
        p = run_probe(name, m)
        assert p.ok is False and p.summary == f"no cgroup v2 hierarchy is mounted (see {fake_proc.path}/self/mounts)"
    fake_proc.set_self_cgroup(OWN_MEMCG, None)
    p = run_probe("cgroup-v2", machine)
    assert p.ok is False and p.summary == f"we are in no cgroup v2 cgroup ({fake_proc.path}/self/cgroup has no 0:: line)"


def test_cgroup_kill(machine: Machine, fake_cgroups: FakeCgroups) -> None:
    p = run_probe("cgroup-kill", machine)
    assert p.ok and p.summary == "cgroup.kill and cgroup.freeze in a child of our v2 cgroup"

    def old_kernel(path: Path) -> None:
        fake_cgroups.mkdir(path)
        (path / "cgroup.kill").unlink()

    p = run_probe("cgroup-kill", dataclasses.replace(machine, mkdir=old_kernel))
    assert p.ok is False and p.summary == "no cgroup.kill in a new v2 cgroup (Linux >= 5.14 has it)"


# --- PSI ------------------------------------------------------------------------------------


def test_psi_readable_missing_and_malformed(machine: Machine, fake_proc: FakeProc) -> None:
    fake_proc.set_pressure(some_avg10=1.5, full_avg10=0.25)
    p = run_probe("psi", machine)
    assert p.ok and p.summary == f"{fake_proc.path}/pressure/memory readable: some avg10 1.50 %, full avg10 0.25 %"
    (fake_proc.root / "pressure" / "memory").write_text("garbage\n")
    p = run_probe("psi", machine)
    assert p.ok is False and "unreadable: not a pressure line: 'garbage'" in p.summary
    (fake_proc.root / "pressure" / "memory").unlink()
    p = run_probe("psi", machine)
    assert p.ok is False and "CONFIG_PSI" in p.summary


def test_psi_triggers_on_plain_files_are_refused_on_every_rung(machine: Machine, fake_cgroups: FakeCgroups) -> None:
    # A regular file cannot be polled, so the trigger is refused before anything is written
    # (EPERM); the real kernel's answers are checked in tests/integration.
    p = run_probe("psi-trigger-system", machine)
    assert p.ok is False
    assert list(p.detail["tried"]) == [f"{machine.proc}/pressure/memory", f"{fake_cgroups.unified}/memory.pressure"]
    assert all(a == {"1 s": "EPERM", "2 s": "EPERM"} for a in p.detail["tried"].values())
    assert p.detail["cap_sys_resource"] is False
    p = run_probe("psi-trigger-cgroup", machine)
    assert p.ok is False and "EPERM" in p.summary
    assert leftovers(fake_cgroups.root) == []


# --- tracefs --------------------------------------------------------------------------------


def test_tracefs_mounted_or_not_mountable(machine: Machine, fake_proc: FakeProc, tracefs: FakeTracefs) -> None:
    p = run_probe("tracefs", machine)
    assert p.ok and p.summary == f"mounted at {tracefs.root}"
    fake_proc.set_mounts()  # nothing mounted: the fake machine's mount fails with EPERM
    p = run_probe("tracefs", machine)
    assert p.ok is False
    assert p.summary == (
        "not mounted, and mounting it failed: Operation not permitted (EPERM) (needs CONFIG_TRACING and CAP_SYS_ADMIN)"
    )
    for name in ("trace-oom-events", "trace-ring-buffer-mmap"):
        p = run_probe(name, machine)
        assert p.ok is None and p.summary == "tracefs unavailable: Operation not permitted (EPERM)"
    assert not [p for p in Path("/tmp").glob(f"{PREFIX}{os.getpid()}-tracefs-*")]


def test_oom_events_and_mark_victim_fields(machine: Machine, tracefs: FakeTracefs) -> None:
    p = run_probe("trace-oom-events", machine)
    assert p.ok and "mark_victim" in p.summary
    assert p.detail["mark_victim_fields"] == ["pid", "comm", "total_vm", "anon_rss", "oom_score_adj"]
    for f in (tracefs.root / "events" / "oom" / "mark_victim").iterdir():
        f.unlink()
    (tracefs.root / "events" / "oom" / "mark_victim").rmdir()
    p = run_probe("trace-oom-events", machine)
    assert p.ok is False and p.summary.startswith("no oom:mark_victim event (oom events: compact_retry, ")


def test_ring_buffer_meta_page_read_from_a_private_instance(machine: Machine, tracefs: FakeTracefs) -> None:
    p = run_probe("trace-ring-buffer-mmap", machine)
    assert p.ok, p.reason
    assert p.detail == {
        "tracefs": False, "meta_page_size": mmap.PAGESIZE, "meta_struct_len": 80, "subbuf_size": 4096, "nr_subbufs": 8,
    }
    assert list((tracefs.root / "instances").iterdir()) == []


def test_ring_buffer_refusals(tmp_path: Path, fake_proc: FakeProc, fake_cgroups: FakeCgroups) -> None:
    empty = FakeTracefs(tmp_path / "old", mappable=False)
    fake_proc.set_mounts(tracefs=empty.path)
    p = run_probe("trace-ring-buffer-mmap", probe_machine(fake_proc, fake_cgroups, empty))
    assert p.ok is False and p.summary == "trace_pipe_raw is not on tracefs"

    garbage = FakeTracefs(tmp_path / "garbage")
    fake_proc.set_mounts(tracefs=garbage.path)
    m = probe_machine(fake_proc, fake_cgroups, garbage)

    def mkdir(path: Path) -> None:
        garbage.mkdir(path)
        raw = path / "per_cpu" / "cpu0" / "trace_pipe_raw"
        raw.write_bytes(struct.pack("<4I", 12345, 80, 0, 0).ljust(mmap.PAGESIZE, b"\0"))

    p = run_probe("trace-ring-buffer-mmap", dataclasses.replace(m, mkdir=mkdir))
    assert p.ok is False and p.summary.startswith("mapped, but the meta page makes no sense: ")


# --- system calls and our own process -------------------------------------------------------


@pytest.mark.parametrize(
    ("err", "verdict"),
    [(errno.EBADF, True), (errno.EINVAL, True), (errno.ENOSYS, False), (errno.EPERM, False), (errno.EFAULT, None)],
)
def test_syscall_verdict(err: int, verdict: bool | None) -> None:
    assert syscall_verdict(err) is verdict


def test_capabilities_decoded_by_name(machine: Machine, fake_proc: FakeProc) -> None:
    fake_proc.set_self(cap_eff=(1 << 21) | (1 << 5) | (1 << 14) | (1 << 45))
    assert probes.capabilities(fake_proc.path) == {"CAP_SYS_ADMIN", "CAP_KILL", "CAP_IPC_LOCK", "CAP_45"}
    p = run_probe("capabilities", machine)
    assert p.summary == "has CAP_SYS_ADMIN CAP_KILL CAP_IPC_LOCK; lacks CAP_SYS_RESOURCE CAP_SYS_PTRACE CAP_DAC_OVERRIDE"
    assert p.detail["cap_eff"] == "0000200000204020"


def test_a_privileged_process_tries_the_short_window(machine: Machine, fake_proc: FakeProc) -> None:
    fake_proc.set_self(cap_eff=1 << 24)
    assert run_probe("psi-trigger-system", machine).detail["cap_sys_resource"] is True


def test_mlockall_not_called_again_in_a_locked_process(machine: Machine, fake_proc: FakeProc) -> None:
    fake_proc.set_self(vm_lck_kb=2048)
    p = run_probe("mlockall", machine)
    assert p.ok and p.summary == "this process has locked memory already (2048 kB)"


def test_oom_score_adj(machine: Machine, fake_proc: FakeProc) -> None:
    # The refusal (EACCES without CAP_SYS_RESOURCE) only the real kernel gives: see
    # tests/integration/test_probes_kernel.py.
    p = run_probe("oom-score-adj", machine)
    assert p.ok and p.summary == "can be lowered to -1000 (ours is 0)"
    fake_proc.set_self(oom_score_adj=-1000)
    assert run_probe("oom-score-adj", machine).summary == "already -1000"


# --- memory ---------------------------------------------------------------------------------


def test_swap(machine: Machine, fake_proc: FakeProc) -> None:
    p = run_probe("swap", machine)
    assert p.ok is False and p.summary == "no swap (SwapTotal 0): anonymous memory can only be freed by a kill"
    fake_proc.set_meminfo(mem_total=8 << 30, mem_available=4 << 30, swap_total=2 << 30, swap_free=2 << 30)
    fake_proc.set_swaps(("/dev/zram0", 2 << 30))
    p = run_probe("swap", machine)
    assert p.ok and p.summary == "2.0 GiB of swap: /dev/zram0"
    assert p.detail["areas"] == [{"name": "/dev/zram0", "type": "partition", "size_bytes": 2 << 30}]


def test_zram(machine: Machine, fake_proc: FakeProc, tmp_path: Path) -> None:
    block = tmp_path / "sys" / "block"
    p = run_probe("zram", machine)
    assert p.ok is False and p.summary == f"no zram device in {block}"
    (block / "zram0").mkdir(parents=True)
    (block / "zram0" / "disksize").write_text("0\n")
    assert run_probe("zram", machine).summary == "zram0 not set up (disksize 0)"
    (block / "zram0" / "disksize").write_text(f"{4 << 30}\n")
    assert run_probe("zram", machine).summary == "zram0 4.0 GiB, not swap"
    fake_proc.set_swaps(("/dev/zram0", 4 << 30))
    p = run_probe("zram", machine)
    assert p.ok and p.summary == "zram0 4.0 GiB as swap"


def test_meminfo_available(machine: Machine, fake_proc: FakeProc) -> None:
    p = run_probe("meminfo-available", machine)
    assert p.ok and p.summary == "MemAvailable 4.0 GiB of 8.0 GiB"
    (fake_proc.root / "meminfo").write_text("MemTotal:  8388608 kB\nMemFree:  1024 kB\n")
    p = run_probe("meminfo-available", machine)
    assert p.ok is False and p.summary == f"no MemAvailable in {fake_proc.path}/meminfo (Linux < 3.14)"


# --- other OOM daemons ----------------------------------------------------------------------


def test_other_oom_daemons_by_comm_script_and_command_line(machine: Machine, fake_proc: FakeProc) -> None:
    assert run_probe("other-oom-daemons", machine).ok is True
    fake_proc.add_process(100, "earlyoom", cmdline=("/usr/bin/earlyoom", "-m", "10"))
    fake_proc.add_process(101, "python3", cmdline=("/usr/bin/python3", "/usr/sbin/nohang", "--monitor"))
    fake_proc.add_process(102, "python3", cmdline=("python3", "-m", "oomkit", "serve", "-c", "x.toml"))
    fake_proc.add_process(103, "oomkit", cmdline=("/venv/bin/python", "/venv/bin/oomkit", "--help"))
    fake_proc.add_process(104, "oomkit", cmdline=("/venv/bin/python", "/venv/bin/oomkit", "doctor"))
    fake_proc.add_process(105, "systemd-oomd")
    fake_proc.add_process(106, "python3", cmdline=("python3", "server.py", "earlyoom"))  # an argument, not the script
    fake_proc.add_process(107, "oomkit", cmdline=("/venv/bin/python", "/venv/bin/oomkit", "serve"))
    found = find_oom_daemons(fake_proc.path, exclude=frozenset({107}))
    assert [(d.pid, d.name) for d in found] == [
        (100, "earlyoom"), (101, "nohang"), (102, "oomkit serve"), (105, "systemd-oomd"),
    ]
    p = run_probe("other-oom-daemons", machine)
    assert p.ok is False
    assert p.summary.startswith("running: earlyoom (pid 100), nohang (pid 101), oomkit serve (pid 102), ")
    assert {"pid": 107, "name": "oomkit serve"} in p.detail["daemons"]  # not us: our pid is another


def test_own_pid_is_never_another_daemon(fake_proc: FakeProc) -> None:
    fake_proc.add_process(os.getpid(), "earlyoom")
    assert find_oom_daemons(fake_proc.path) == ()


# --- the runner -----------------------------------------------------------------------------


def test_an_unexpected_error_is_a_could_not_tell(machine: Machine, fake_proc: FakeProc) -> None:
    (fake_proc.root / "sys" / "kernel" / "osrelease").unlink()
    p = run_probe("kernel", machine)
    assert p.ok is None and p.summary.startswith("could not tell: FileNotFoundError: ")


def test_what_cannot_be_removed_is_reported(machine: Machine) -> None:
    def stuck(path: Path) -> None:
        raise OSError(errno.EBUSY, os.strerror(errno.EBUSY), str(path))

    p = run_probe("cgroup-v2", dataclasses.replace(machine, rmdir=stuck))
    assert p.ok is None
    assert p.summary.startswith("left something behind: could not remove ")
    assert p.summary.endswith(": Device or resource busy (EBUSY)")


def test_a_made_directory_is_removed_when_the_probe_body_fails(machine: Machine, fake_cgroups: FakeCgroups) -> None:
    parent = fake_cgroups.unified
    with pytest.raises(RuntimeError), machine.child(parent) as child:
        assert child.is_dir()
        raise RuntimeError("boom")
    assert not child.exists()


def test_unknown_probe_is_a_key_error(machine: Machine) -> None:
    with pytest.raises(KeyError):
        run_probe("no-such-probe", machine)
