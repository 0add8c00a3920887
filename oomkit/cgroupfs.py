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
    "NAME_MAX",
    "PATH_MAX",
    "Mounts",
    "V1Event",
    "canonical_path",
    "find_mounts",
    "mounts_for",
    "read_keyed",
    "read_keyed_bytes",
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


PATH_MAX = 4096
"""Linux's limit on a path given to a system call, the terminating NUL included."""
NAME_MAX = 255
"""Linux's limit on one path component (a cgroup's name), in bytes."""


def _shown(text: str) -> str:
    # An error line stays one readable line even for a path of thousands of characters.
    return repr(text) if len(text) <= 120 else repr(text[:60] + "...") + f" ({len(text)} characters)"


def _under(base: str, path: str) -> str | None:
    """``path`` below ``base`` (both absolute), compared component by component, or None."""
    b = [p for p in base.split("/") if p not in ("", ".")]
    q = [p for p in path.split("/") if p not in ("", ".")]
    return "/".join(q[len(b) :]) if q[: len(b)] == b else None


def canonical_path(root: Path, configured: str, label: str = "cgroup v1 memory hierarchy") -> str:
    """The one spelling of a configured cgroup inside the tree mounted at ``root``.

    ``configured`` is an absolute cgroupfs path (``/sys/fs/cgroup/memory/a/b``, or one that
    reaches the mount through a symlink) or a path relative to the mount (``/a/b``,
    ``a/b``).  Duplicate slashes and ``.`` go, ``..`` is applied (cgroupfs has no symlinks
    inside, so doing it on the text is what the kernel would do), and the result is
    ``/a/b`` (``/`` for the root).  Every check that compares cgroups (the daemon's own
    memcg, a cgroup named twice) runs on this form.  Works on glob patterns too, which it
    leaves unexpanded.  Raises :class:`ConfigError`, one line naming the cgroup, for a NUL
    byte, a path longer than ``PATH_MAX``, a name longer than ``NAME_MAX``, and a ``..``
    that climbs out of the mount.
    """
    where = f"cgroup {_shown(configured)}"
    if "\0" in configured:
        raise ConfigError(f"{where}: contains a NUL byte")
    size = len(os.fsencode(configured))
    if size >= PATH_MAX:
        raise ConfigError(f"{where}: {size} bytes, longer than PATH_MAX allows ({PATH_MAX - 1})")
    rel: str | None = None
    if configured.startswith("/"):
        bases = dict.fromkeys([str(root), os.path.realpath(root)])
        rel = next((r for r in (_under(b, configured) for b in bases) if r is not None), None)
        if rel is None:
            # A symlink elsewhere that leads into the mount names a cgroupfs path too.
            real = os.path.realpath(configured)
            rel = next((r for r in (_under(b, real) for b in bases) if r is not None), None)
    parts: list[str] = []
    for part in (configured if rel is None else rel).split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if not parts:
                raise ConfigError(f"{where}: '..' climbs out of the {label} (mounted at {root})")
            parts.pop()
            continue
        if len(os.fsencode(part)) > NAME_MAX:
            raise ConfigError(f"{where}: the name {_shown(part)} is longer than NAME_MAX allows ({NAME_MAX} bytes)")
        parts.append(part)
    return "/" + "/".join(parts)


def resolve_cgroup(mounts: Mounts, cgroup: str, tree: str = "v1") -> Scope:
    """The scope for a configured cgroup, in its canonical spelling (:func:`canonical_path`).

    Raises :class:`ConfigError` when the tree or the cgroup is missing."""
    root = mounts.memory_v1 if tree == "v1" else mounts.unified
    label = "cgroup v1 memory controller" if tree == "v1" else "cgroup v2 hierarchy"
    if root is None:
        raise ConfigError(f"cgroup {cgroup!r}: the {label} is not mounted on this machine")
    rel = canonical_path(root, cgroup, "cgroup v1 memory hierarchy" if tree == "v1" else "cgroup v2 hierarchy")
    d = root / rel.lstrip("/")
    try:
        found = d.is_dir()
    except OSError:
        found = False
    if not found:
        raise ConfigError(f"cgroup {_shown(cgroup)}: no such cgroup ({d} does not exist)")
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
    return read_keyed_bytes(read_small(path, 65536))


def read_keyed_bytes(raw: bytes) -> dict[str, int]:
    """The contents of a flat-keyed file, already read; lines without a value are skipped."""
    out: dict[str, int] = {}
    for line in raw.split(b"\n"):
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


def register_v1_event(cgroup_dir: Path | int, control: str, args: str = "") -> V1Event:
    """Register an eventfd on ``cgroup_dir/control`` (``memory.oom_control``,
    ``memory.pressure_level`` with ``args`` ``"medium"``, ``memory.usage_in_bytes`` with a
    threshold in bytes).  ``cgroup_dir`` is a path or the fd of the cgroup's directory
    (the fd names one cgroup even if another is made at the same path later).  Raises
    OSError with the kernel's errno on refusal.

    The line is appended (``O_APPEND``, ending in a newline, which the kernel strips): the
    kernel ignores the offset, and on a fake tree every registration, ours and a watchdog's,
    stays readable, one line each.
    """
    at = cgroup_dir if isinstance(cgroup_dir, int) else None
    base = "" if at is not None else f"{cgroup_dir}/"
    efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    try:
        cfd = os.open(base + control, os.O_RDONLY | os.O_CLOEXEC, dir_fd=at)
    except BaseException:
        os.close(efd)
        raise
    ev = V1Event(efd, cfd)
    try:
        line = f"{efd} {cfd}" + (f" {args}" if args else "") + "\n"
        fd = os.open(base + "cgroup.event_control", os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC, dir_fd=at)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)
    except BaseException:
        ev.close()
        raise
    return ev
