"""``pageout``: page the victim's memory out (``process_madvise(MADV_PAGEOUT)``) before it is
killed.

``process_madvise(2)`` (Linux 5.10) advises another process's memory through a pidfd;
``MADV_PAGEOUT`` (5.4) reclaims the given ranges at once.  What that frees, measured on
this machine's kernel (``../shared/KERNEL.md``): file-backed pages always (clean ones are
dropped, dirty ones written back first); private anonymous memory only where swap or zram
exists (without it the pages cannot go anywhere and stay); pages mapped by more than one
process are skipped by the kernel (``MADV_PAGEOUT`` leaves shared pages alone).  So this
rescuer advises the file-backed mappings of ``/proc/PID/maps`` always, and the anonymous
ones only when ``/proc/meminfo`` shows swap (``SwapTotal`` > 0; ``anonymous = "never"`` or
``"always"`` to decide yourself).

The calls: at most 1024 ranges each (``UIO_MAXIOV``); the kernel may advise fewer bytes
than asked (a partial return), and the next call then resumes where it stopped.  What was
freed is the fall of the victim's resident size (``VmRSS``) across the calls; for a unit,
over its members.  Reading ``maps`` takes the victim's mmap lock, so it runs in a worker
thread under the engine's rescue deadline.  Off by default: ``scopes`` names where.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
from collections.abc import Iterable
from typing import Literal

import anyio

from oomkit import Candidate, Config, Event, hookimpl
from oomkit.procfs import read_meminfo, read_small

from ._globs import matches
from ._settings import Settings

__all__ = ["PageOut", "PageOutSettings", "page_out", "ranges"]

SYS_process_madvise = 440  # the generic syscall table: every architecture
MADV_PAGEOUT = 21
UIO_MAXIOV = 1024

_libc = ctypes.CDLL(None, use_errno=True)


class _Iovec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


class PageOutSettings(Settings, frozen=True):
    """``[plugins.pageout]``."""

    scopes: tuple[str, ...] = ()
    """Scopes whose victims are paged out before the kill (globs, ``system`` for the
    machine); empty: nowhere."""
    anonymous: Literal["auto", "never", "always"] = "auto"
    """Advise anonymous mappings too: ``auto`` when swap exists (zram included)."""


_MAPS = re.compile(rb"^([0-9a-f]+)-([0-9a-f]+) (\S{4}) \S+ \S+ (\d+)[ \t]*(.*)$", re.MULTILINE)


def ranges(maps: bytes, anonymous: bool) -> list[tuple[int, int]]:
    """``(start, length)`` of every mapping worth advising: file-backed ones, and private
    anonymous ones (the heap and stacks included) when ``anonymous``.  The kernel's special
    mappings (``[vdso]``, ``[vvar]``, ``[vsyscall]``) never."""
    out = []
    for m in _MAPS.finditer(maps):
        start, end, _perms, inode, name = int(m[1], 16), int(m[2], 16), m[3], int(m[4]), m[5].strip()
        if name.startswith(b"[") and name not in (b"[heap]", b"[stack]") and not name.startswith(b"[anon"):
            continue
        if inode != 0 or (anonymous and not name.startswith(b"/")):
            out.append((start, end - start))
    return out


def _rss(proc: str, pid: int) -> int | None:
    try:
        status = read_small(f"{proc}/{pid}/status", 8192)
    except OSError:
        return None
    m = re.search(rb"^VmRSS:\s+(\d+)", status, re.MULTILINE)
    return int(m[1]) * 1024 if m else None


def _madvise(pidfd: int, chunk: list[tuple[int, int]]) -> int:
    """One ``process_madvise`` call; bytes advised, or ``-errno``."""
    vec = (_Iovec * len(chunk))(*[_Iovec(start, length) for start, length in chunk])
    n = _libc.syscall(ctypes.c_long(SYS_process_madvise), ctypes.c_int(pidfd), vec, ctypes.c_size_t(len(chunk)),
                      ctypes.c_int(MADV_PAGEOUT), ctypes.c_uint(0))
    return int(n) if n >= 0 else -ctypes.get_errno()


def page_out(proc: str, pid: int, start_ticks: int, anonymous: bool) -> tuple[int, int, str]:
    """Advise every range of ``pid`` (after checking it is still the process with
    ``start_ticks``); ``(bytes advised, resident bytes freed, problem)``."""
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return 0, 0, "gone"
    try:
        raw = read_small(f"{proc}/{pid}/stat", 1024)
        if int(raw[raw.rindex(b")") + 2 :].split()[19]) != start_ticks:
            return 0, 0, "gone"
        with open(f"{proc}/{pid}/maps", "rb") as f:  # may be longer than a page: read it all
            todo = ranges(f.read(1 << 24), anonymous)
        before = _rss(proc, pid)
        advised = 0
        problem = ""
        while todo:
            chunk = todo[:UIO_MAXIOV]
            n = _madvise(pidfd, chunk)
            if n < 0:
                if -n in (errno.EINTR, errno.EAGAIN):
                    continue
                # ENOMEM: a range went away meanwhile; skip the first range and go on.
                if -n == errno.ENOMEM and len(todo) > 1:
                    todo = todo[1:]
                    continue
                problem = os.strerror(-n)
                break
            advised += n
            # A partial return: resume inside the first range that was not advised whole.
            done = n
            while todo and done >= todo[0][1]:
                done -= todo[0][1]
                todo.pop(0)
            if todo and done:
                start, length = todo[0]
                todo[0] = (start + done, length - done)
            if n == 0:
                break
        after = _rss(proc, pid)
        freed = max(0, before - after) if before is not None and after is not None else 0
        return advised, freed, problem
    except (OSError, ValueError, IndexError) as exc:
        return 0, 0, str(exc)
    finally:
        os.close(pidfd)


class PageOut:
    """Pages out the chosen victim (each member of a unit)."""

    name = "pageout"

    def __init__(self) -> None:
        self.settings = PageOutSettings()
        self._proc = "/proc"

    @hookimpl
    def oomkit_configure(self, config: Config) -> None:
        self.settings = config.plugin_settings(self.name, PageOutSettings)
        self._proc = config.paths.proc

    def _anonymous(self) -> bool:
        if self.settings.anonymous != "auto":
            return self.settings.anonymous == "always"
        try:
            return read_meminfo(self._proc, ("SwapTotal",)).get("SwapTotal", 0) > 0
        except OSError:
            return False

    @hookimpl
    async def oomkit_rescue(self, event: Event, victim: Candidate,
                            candidates: Iterable[Candidate]) -> tuple[str, int, str] | None:
        if not matches(str(event.scope), self.settings.scopes):
            return None
        anonymous = self._anonymous()
        targets = [(m.pid, m.start_ticks) for m in victim.members] or [(victim.pid, victim.start_ticks)]

        def work() -> tuple[int, int, list[str]]:
            advised = freed = 0
            problems = []
            for pid, start in targets:
                a, f, problem = page_out(self._proc, pid, start, anonymous)
                advised, freed = advised + a, freed + f
                if problem:
                    problems.append(f"pid {pid}: {problem}")
            return advised, freed, problems

        advised, freed, problems = await anyio.to_thread.run_sync(work, abandon_on_cancel=True)
        what = "file-backed and anonymous" if anonymous else "file-backed (no swap: anonymous stays)"
        detail = f"advised {advised} bytes ({what}), resident size fell by {freed}"
        if problems:
            detail += "; " + "; ".join(problems[:3])
        if freed:
            return "freed", freed, detail
        return ("failed" if problems and not advised else "nothing"), 0, detail
