"""A cgroup directory held open: one cgroup, however it is spelled, and its lock.

A path names whatever cgroup sits there *now*: after ``rmdir`` and ``mkdir`` it names
another one, and ``A/B/..``, ``A//.`` and a symlink into the mount all name ``A``.  The
directory's fd names exactly one cgroup for as long as it is open, so oomkit reads and
writes a cgroup it holds through that fd (``openat``), and a cgroup removed under it
fails with ``ENOENT`` instead of reaching its successor.

The lock is ``flock`` on that fd.  Checked on this machine's kernel (Linux 6.18, cgroup
v1 and cgroupfs directories alike): it conflicts across processes and across open file
descriptions whatever the spelling of the path that opened the directory, it is shared with
a process the fd is passed to (the takeover watchdog), and a cgroup made again at the same
path starts unlocked.  So no lock file exists to be left behind, to outgrow ``NAME_MAX`` or
to differ between two ``run_dir`` settings.

Every write oomkit makes to a memcg's ``oom_kill_disable`` happens under this lock: the
long-held one of the oomkit that took the memcg over, or a short one taken to reset a
descendant (:func:`oomkit.watchdog.reset_descendants`), so one oomkit's reset never lands
between another's read of the original and its takeover.
"""

from __future__ import annotations

import errno
import fcntl
import os
import time
from pathlib import Path
from typing import final

from .cgroupfs import read_keyed_bytes
from .events import Scope

__all__ = ["CgroupDir", "NotACgroup", "flock_holder", "open_below"]

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
LOCK_ATTEMPTS = 20
"""How often a lock that another oomkit process holds for a moment is tried (every 5 ms)."""


class NotACgroup(OSError):
    """A path component that is not a plain directory (a symlink or a file on a fake tree)."""


def open_below(root: str | os.PathLike[str], rel: str) -> int:
    """The fd of ``root/rel``, opened one component at a time without following symlinks.

    ``rel`` is a canonical path (:func:`oomkit.cgroupfs.canonical_path`).  Raises
    FileNotFoundError when a component is missing and :class:`NotACgroup` when one is not a
    directory.
    """
    fd = os.open(root, _DIR_FLAGS)
    try:
        for part in (p for p in rel.split("/") if p):
            try:
                nxt = os.open(part, _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=fd)
            except OSError as exc:
                if exc.errno in (errno.ENOTDIR, errno.ELOOP):
                    raise NotACgroup(exc.errno, f"{part!r} is not a cgroup directory") from None
                raise
            os.close(fd)
            fd = nxt
    except BaseException:
        os.close(fd)
        raise
    return fd


def flock_holder(fd: int, locks: str = "/proc/locks") -> int | None:
    """The pid ``/proc/locks`` names for an ``flock`` on ``fd``'s file, or None.

    The kernel's record of who took the lock (it outlives that process while a watchdog that
    shares the lock lives on).  The real ``/proc/locks``, also for a fake tree in tmp_path:
    the lock on its directory is a real one.
    """
    st = os.fstat(fd)
    want = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        with open(locks, "rb") as f:
            for raw in f:
                fields = raw.split()
                # "1: FLOCK  ADVISORY  WRITE 22327 00:20:82964 0 EOF"; "1: -> FLOCK ..." waits.
                if len(fields) >= 6 and fields[1] == b"FLOCK" and fields[5].decode() == want:
                    return int(fields[4])
    except (OSError, ValueError):
        return None
    return None


@final
class CgroupDir:
    """One cgroup's directory, open: its scope (canonical path), its fd and identity."""

    __slots__ = ("scope", "root", "fd", "dev", "ino", "locked")

    def __init__(self, scope: Scope, root: Path, fd: int) -> None:
        self.scope = scope
        self.root = root
        self.fd = fd
        st = os.fstat(fd)
        self.dev, self.ino = st.st_dev, st.st_ino
        self.locked = False

    @classmethod
    def open(cls, root: Path, scope: Scope) -> CgroupDir:
        """Open the cgroup at ``scope.path`` under the mount ``root``; see :func:`open_below`."""
        return cls(scope, root, open_below(root, scope.path))

    @property
    def path(self) -> Path:
        """Where it was opened (another cgroup may sit there by now: see :meth:`replaced`)."""
        return self.root / self.scope.path.lstrip("/")

    # --- files, through the fd ----------------------------------------------------------------

    def read(self, name: str, size: int = 4096) -> bytes:
        """One read of a small file.  FileNotFoundError once the cgroup is removed."""
        fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC, dir_fd=self.fd)
        try:
            return os.read(fd, size)
        finally:
            os.close(fd)

    def keyed(self, name: str) -> dict[str, int]:
        """A flat-keyed file (``memory.oom_control``) of this cgroup."""
        return read_keyed_bytes(self.read(name, 65536))

    def write(self, name: str, value: str | int, *, truncate: bool = False) -> None:
        """Write one value (``O_APPEND`` as :func:`oomkit.cgroupfs.write_value`; ``truncate``
        for a single-value file such as ``memory.high``, so a fake tree holds the value)."""
        flags = os.O_WRONLY | os.O_CLOEXEC | (os.O_TRUNC if truncate else os.O_APPEND)
        fd = os.open(name, flags, dir_fd=self.fd)
        try:
            os.write(fd, f"{value}\n".encode())
        finally:
            os.close(fd)

    def exists(self) -> bool:
        """Is this cgroup still there (not removed)?"""
        try:
            os.stat("cgroup.procs", dir_fd=self.fd)
        except FileNotFoundError:
            return False
        except OSError:
            return True  # unreadable is not gone
        return True

    def replaced(self) -> bool:
        """Does the path now name another directory (this cgroup removed, another made)?"""
        try:
            st = os.stat(self.path, follow_symlinks=False)
        except OSError:
            return False
        return (st.st_dev, st.st_ino) != (self.dev, self.ino)

    # --- the lock -----------------------------------------------------------------------------

    def lock(self, attempts: int = LOCK_ATTEMPTS) -> bool:
        """Take the exclusive lock, kept until :meth:`close`; False if another process holds it.

        Retried a few times over ~0.1 s: another oomkit may hold it for a moment while it
        checks a descendant (:meth:`probe_lock`).
        """
        for attempt in range(attempts):
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if attempt + 1 < attempts:
                    time.sleep(0.005)
                continue
            self.locked = True
            return True
        return False

    def holder(self) -> int | None:
        """The pid holding the lock, as the kernel recorded it (None if unknown)."""
        return flock_holder(self.fd)

    def close(self) -> None:
        """Close the fd, which releases the lock unless a watchdog still shares it."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
            self.locked = False

    def __repr__(self) -> str:
        lock = " locked" if self.locked else ""
        return f"<CgroupDir {self.scope} fd={self.fd} ino={self.ino}{lock}>"
