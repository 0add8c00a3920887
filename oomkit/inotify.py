"""inotify through ctypes: the standard library has no binding.

The inotify fd is readable when events are queued, so ``anyio.wait_readable`` (or an epoll)
can wait on it.  kernfs (cgroupfs) reports a changed ``memory.events`` or ``cgroup.events``
as ``IN_MODIFY`` on the file, and ``mkdir``/``rmdir`` of a cgroup as ``IN_CREATE`` and
``IN_DELETE`` on its parent, as any filesystem does, so the same code watches real cgroups
and fake trees under ``tmp_path``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import struct
from dataclasses import dataclass
from typing import Final, final

__all__ = [
    "IN_CREATE",
    "IN_DELETE",
    "IN_DELETE_SELF",
    "IN_IGNORED",
    "IN_ISDIR",
    "IN_MODIFY",
    "IN_MOVED_FROM",
    "IN_MOVED_TO",
    "IN_ONLYDIR",
    "IN_Q_OVERFLOW",
    "Inotify",
    "InotifyEvent",
]

IN_MODIFY: Final = 0x00000002
IN_MOVED_FROM: Final = 0x00000040
IN_MOVED_TO: Final = 0x00000080
IN_CREATE: Final = 0x00000100
IN_DELETE: Final = 0x00000200
IN_DELETE_SELF: Final = 0x00000400
IN_Q_OVERFLOW: Final = 0x00004000
IN_IGNORED: Final = 0x00008000
IN_ONLYDIR: Final = 0x01000000
IN_ISDIR: Final = 0x40000000

_IN_NONBLOCK: Final = os.O_NONBLOCK
_IN_CLOEXEC: Final = os.O_CLOEXEC
_HEADER = struct.Struct("iIII")  # wd, mask, cookie, len

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.inotify_init1.argtypes = [ctypes.c_int]
_libc.inotify_init1.restype = ctypes.c_int
_libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
_libc.inotify_add_watch.restype = ctypes.c_int
_libc.inotify_rm_watch.argtypes = [ctypes.c_int, ctypes.c_int]
_libc.inotify_rm_watch.restype = ctypes.c_int


def _check(result: int, what: str, path: str | None = None) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}", path)
    return result


@dataclass(frozen=True, slots=True)
class InotifyEvent:
    wd: int
    mask: int
    cookie: int
    name: str


@final
class Inotify:
    """One non-blocking inotify instance; close it to drop every watch."""

    __slots__ = ("_fd",)

    def __init__(self) -> None:
        self._fd = _check(_libc.inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC), "inotify_init1")

    def fileno(self) -> int:
        return self._fd

    def add_watch(self, path: str | os.PathLike[str], mask: int) -> int:
        """Watch ``path``; returns the watch descriptor (the same one again for the same inode)."""
        p = os.fsencode(path)
        return _check(_libc.inotify_add_watch(self._fd, p, mask), "inotify_add_watch", os.fsdecode(p))

    def rm_watch(self, wd: int) -> None:
        """Remove a watch; a watch the kernel already dropped (its file is gone) is no error."""
        if _libc.inotify_rm_watch(self._fd, wd) < 0 and ctypes.get_errno() != errno.EINVAL:
            _check(-1, "inotify_rm_watch")

    def read(self) -> list[InotifyEvent]:
        """Every queued event; empty when none is queued."""
        try:
            buf = os.read(self._fd, 65536)
        except BlockingIOError:
            return []
        out: list[InotifyEvent] = []
        off = 0
        while off + _HEADER.size <= len(buf):
            wd, mask, cookie, length = _HEADER.unpack_from(buf, off)
            off += _HEADER.size
            name = buf[off : off + length].rstrip(b"\0").decode(errors="surrogateescape")
            off += length
            out.append(InotifyEvent(wd, mask, cookie, name))
        return out

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __repr__(self) -> str:
        return f"<Inotify fd={self._fd}>"
