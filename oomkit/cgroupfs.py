"""cgroupfs: finding the hierarchies, naming cgroups, reading their files, v1 event control.

A hybrid machine has the v1 memory controller at one mount and the v2 tree at another, and
the same path string can exist in both; a :class:`~oomkit.events.Scope` says which tree.
Never hard-code mount points: read them from ``/proc/self/mounts`` (:func:`find_mounts`)
or take them from ``[paths]``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .config import ConfigError, PathsConfig
from .events import Scope
from .procfs import read_small

__all__ = [
    "Mounts",
    "V1Event",
    "find_mounts",
    "mounts_for",
    "read_keyed",
    "read_procs",
    "read_subtree_procs",
    "register_v1_event",
    "resolve_cgroup",
    "scope_dir",
    "write_value",
]


@dataclass(frozen=True, slots=True)
class Mounts:
    """Where the v1 memory controller and the v2 tree are mounted (None: not mounted)."""

    proc: str
    memory_v1: Path | None
    unified: Path | None


def find_mounts(proc: str = "/proc") -> tuple[Path | None, Path | None]:
    """``(v1 memory mount, v2 mount)`` from ``PROC/self/mounts``."""
    memory: Path | None = None
    unified: Path | None = None
    try:
        text = Path(f"{proc}/self/mounts").read_text()
    except OSError:
        return None, None
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 4:
            continue
        fstype, opts = parts[2], parts[3].split(",")
        if fstype == "cgroup" and "memory" in opts and memory is None:
            memory = Path(parts[1])
        elif fstype == "cgroup2" and unified is None:
            unified = Path(parts[1])
    return memory, unified


def mounts_for(paths: PathsConfig) -> Mounts:
    """The mounts ``[paths]`` names, discovering the ones it leaves empty."""
    memory, unified = (None, None)
    if not (paths.memory_v1 and paths.unified):
        memory, unified = find_mounts(paths.proc)
    return Mounts(
        proc=paths.proc,
        memory_v1=Path(paths.memory_v1) if paths.memory_v1 else memory,
        unified=Path(paths.unified) if paths.unified else unified,
    )


def resolve_cgroup(mounts: Mounts, cgroup: str, tree: str = "v1") -> Scope:
    """The scope for a configured cgroup: an absolute cgroupfs path, or one relative to the
    tree's mount.  Raises :class:`ConfigError` when the tree or the cgroup is missing."""
    root = mounts.memory_v1 if tree == "v1" else mounts.unified
    label = "cgroup v1 memory controller" if tree == "v1" else "cgroup v2 hierarchy"
    if root is None:
        raise ConfigError(f"cgroup {cgroup!r}: the {label} is not mounted on this machine")
    p = Path(cgroup)
    # "/sys/fs/cgroup/memory/a/b" is a cgroupfs path; "/a/b" and "a/b" are relative to it.
    inside = root in p.parents
    rel = "/" if p == root else "/" + str(p.relative_to(root) if inside else cgroup.strip("/"))
    rel = rel.rstrip("/") or "/"
    d = root / rel.lstrip("/")
    if not d.is_dir():
        raise ConfigError(f"cgroup {cgroup!r}: no such cgroup ({d} does not exist)")
    return Scope(tree="v1" if tree == "v1" else "v2", path=rel)


def scope_dir(mounts: Mounts, scope: Scope) -> Path:
    """The directory of a v1 or v2 scope.  Raises LookupError when its tree is not mounted."""
    root = mounts.memory_v1 if scope.tree == "v1" else mounts.unified if scope.tree == "v2" else None
    if root is None:
        raise LookupError(f"no cgroup directory for scope {scope}")
    return root / scope.path.lstrip("/")


def read_procs(cgroup_dir: str | os.PathLike[str]) -> list[int]:
    """The pids in ``cgroup.procs`` (empty if the cgroup is gone).

    Raw reads until end of file rather than a buffered file object: this sits on the path
    from an OOM's wake-up to its kill, and a big cgroup's list spans several pages.
    """
    chunks: list[bytes] = []
    try:
        fd = os.open(os.path.join(cgroup_dir, "cgroup.procs"), os.O_RDONLY | os.O_CLOEXEC)
        try:
            while chunk := os.read(fd, 65536):
                chunks.append(chunk)
        finally:
            os.close(fd)
    except OSError:
        return []
    return [int(x) for x in b"".join(chunks).split()]


def read_subtree_procs(top: str | os.PathLike[str], limit: int = 1 << 22) -> list[int]:
    """Every pid in the cgroup ``top`` and in every cgroup below it (what a memcg's limit
    and a unit kill cover), each once; at most ``limit`` (Linux's ``PID_MAX_LIMIT``)."""
    out: dict[int, None] = {}
    stack = [os.fspath(top)]
    while stack and len(out) < limit:
        d = stack.pop()
        out.update(dict.fromkeys(read_procs(d)))
        try:
            with os.scandir(d) as entries:
                stack.extend(e.path for e in entries if e.is_dir(follow_symlinks=False))
        except OSError:
            continue  # removed while we walk: its tasks are gone too
    return list(out)[:limit]


def read_keyed(path: str | os.PathLike[str]) -> dict[str, int]:
    """A flat-keyed file (``memory.oom_control``, ``memory.events``, ``memory.stat``)."""
    out: dict[str, int] = {}
    for line in read_small(path, 65536).split(b"\n"):
        key, _, value = line.partition(b" ")
        if value:
            out[key.decode()] = int(value)
    return out


def write_value(path: str | os.PathLike[str], value: str | int) -> None:
    """Write one value to a cgroup control file (``memory.oom_control``, ``cgroup.procs``).

    Opened ``O_APPEND``: the kernel ignores the offset of a cgroupfs write, and on a fake tree
    the file keeps its state lines and gains one line per write, which a test can read back
    (:meth:`oomkit.testing.FakeCgroups.written`).
    """
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
    try:
        os.write(fd, f"{value}\n".encode())
    finally:
        os.close(fd)


@dataclass(slots=True)
class V1Event:
    """A cgroup v1 notification registered through ``cgroup.event_control``.

    ``efd`` becomes readable when the event fires; its 8-byte counter adds up between reads.
    Closing it (``close()``) unregisters the event.  ``control_fd`` is the watched file, kept
    open for as long as the registration lives.
    """

    efd: int
    control_fd: int

    def close(self) -> None:
        for fd in (self.efd, self.control_fd):
            try:
                os.close(fd)
            except OSError:
                pass

    def drain(self) -> int:
        """Read and return the counter (0 if nothing is pending)."""
        try:
            return int.from_bytes(os.read(self.efd, 8), "little")
        except BlockingIOError:
            return 0


def register_v1_event(cgroup_dir: Path, control: str, args: str = "") -> V1Event:
    """Register an eventfd on ``cgroup_dir/control`` (``memory.oom_control``,
    ``memory.pressure_level`` with ``args`` ``"medium"``, ``memory.usage_in_bytes`` with a
    threshold in bytes).  Raises OSError with the kernel's errno on refusal."""
    efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    try:
        cfd = os.open(cgroup_dir / control, os.O_RDONLY | os.O_CLOEXEC)
    except BaseException:
        os.close(efd)
        raise
    ev = V1Event(efd, cfd)
    try:
        line = f"{efd} {cfd}" + (f" {args}" if args else "")
        fd = os.open(cgroup_dir / "cgroup.event_control", os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)
    except BaseException:
        ev.close()
        raise
    return ev
