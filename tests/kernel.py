"""Real cgroups for integration tests: created under our own memcg, always removed.

Every cgroup a test makes is named ``oomkit-test-<pid>-<n>`` after the pytest process that
made it, so a later run can tell a stale one (its pid is gone) from one that a concurrent
run still uses, and sweep only the stale ones (and so are a killed ``oomkit doctor``'s,
``oomkit-doctor-<pid>-<n>``).

Whether a kind of test can run here is what :mod:`oomkit.probes` says, so a skip reason is
the line ``oomkit doctor`` prints for that probe.  Removal first hands OOM decisions back to
the kernel (``oom_kill_disable=0``) and SIGKILLs whatever is inside: a cgroup left paused
with a process in it must never hang CI.
"""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from oomkit import probes
from oomkit.cgroupfs import find_mounts
from oomkit.procfs import own_cgroup

PREFIX = "oomkit-test-"
HOG = Path(__file__).with_name("hog.py")
_counter = itertools.count()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def v1_parent() -> Path | None:
    """Our own v1 memcg directory, where test memcgs are made; None without v1 memory."""
    memory, _ = find_mounts("/proc")
    if memory is None:
        return None
    own = own_cgroup("/proc", "memory")
    return None if own is None else memory / own.lstrip("/")


def v2_parent() -> Path | None:
    """Our own v2 cgroup directory; None without a v2 mount."""
    _, unified = find_mounts("/proc")
    if unified is None:
        return None
    own = own_cgroup("/proc", "")
    return None if own is None else unified / own.lstrip("/")


def skip_reason(probe: str) -> str | None:
    """Why tests that need what ``probe`` checks cannot run here (its ``oomkit doctor``
    line), or None when they can.  A probe that could not tell is a reason too."""
    result = probes.run_probe(probe)
    return None if result.ok else result.reason


def v1_skip_reason() -> str | None:
    """Why real v1 memcg tests cannot run here, or None when they can."""
    return skip_reason("cgroup-v1-memory")


def v2_skip_reason() -> str | None:
    """Why real v2 cgroup tests cannot run here, or None when they can."""
    return skip_reason("cgroup-v2")


class Cgroup:
    """One real cgroup directory made for a test (v1 memcg or v2 cgroup)."""

    def __init__(self, path: Path, root: Path) -> None:
        self.path = path
        self.root = root  # the hierarchy's mount point

    @property
    def rel(self) -> str:
        """The path relative to the hierarchy's mount, as scopes and configs name it."""
        return "/" + str(self.path.relative_to(self.root))

    def write(self, name: str, value: str | int) -> None:
        fd = os.open(self.path / name, os.O_WRONLY)
        try:
            os.write(fd, str(value).encode())
        finally:
            os.close(fd)

    def read(self, name: str) -> str:
        return (self.path / name).read_text()

    def keyed(self, name: str) -> dict[str, int]:
        return {k: int(v) for k, v in (ln.split() for ln in self.read(name).splitlines() if ln)}

    def procs(self) -> list[int]:
        return [int(p) for p in self.read("cgroup.procs").split()]

    def add(self, pid: int) -> None:
        self.write("cgroup.procs", pid)

    def spawn(self, argv: list[str], **kwargs: object) -> subprocess.Popen[bytes]:
        """Start ``argv`` already inside this cgroup (it joins before exec)."""
        procs = str(self.path / "cgroup.procs")

        def join() -> None:
            with open(procs, "w") as f:
                f.write(str(os.getpid()))

        return subprocess.Popen(argv, preexec_fn=join, **kwargs)  # type: ignore[call-overload,no-any-return]

    def hog(self, mib: int, *, chunk_mib: int = 1, hold: bool = True, **kwargs: object) -> subprocess.Popen[bytes]:
        """A Python process in this cgroup that touches ``mib`` MiB, then waits."""
        argv = [sys.executable, str(HOG), str(mib), "--chunk", str(chunk_mib)] + (["--hold"] if hold else [])
        return self.spawn(argv, **kwargs)

    def remove(self) -> None:
        remove_tree(self.path)


def remove_tree(path: Path) -> None:
    """Hand OOMs back to the kernel, kill everything inside, and rmdir, children first."""
    if not path.is_dir():
        return
    for child in [p for p in path.iterdir() if p.is_dir()]:
        remove_tree(child)
    oom = path / "memory.oom_control"
    if oom.exists():
        try:
            oom.write_text("0")
        except OSError:
            pass
    deadline = time.monotonic() + 10
    while True:
        try:
            pids = [int(p) for p in (path / "cgroup.procs").read_text().split()]
        except OSError:
            pids = []
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{path}: processes {pids} survive SIGKILL")
        time.sleep(0.01)
    for _ in range(200):
        try:
            path.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.01)  # the last exiting task may still hold the cgroup for a moment
    path.rmdir()


def make(parent: Path, root: Path, tag: str = "") -> Cgroup:
    name = f"{PREFIX}{os.getpid()}-{next(_counter)}{'-' + tag if tag else ''}"
    path = parent / name
    path.mkdir()
    return Cgroup(path, root)


def sweep_stale() -> list[Path]:
    """Remove test cgroups whose creating pytest process is gone; return what was removed."""
    removed = []
    for parent in (v1_parent(), v2_parent()):
        if parent is None or not parent.is_dir():
            continue
        for d in parent.iterdir():
            prefix = next((p for p in (PREFIX, probes.PREFIX) if d.name.startswith(p)), None)
            if prefix is None or not d.is_dir():
                continue
            owner = d.name[len(prefix) :].split("-", 1)[0]
            if owner.isdigit() and not _alive(int(owner)):
                remove_tree(d)
                removed.append(d)
    return removed
