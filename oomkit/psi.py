"""Pressure stall information: reading pressure files and arming triggers.

A trigger is a line ``"some|full STALL_US WINDOW_US"`` written to an open pressure file; the
kernel then signals that fd with **POLLPRI** (not POLLIN) at most once per window while the
stall time within the window exceeds the threshold, and with POLLERR once the cgroup is
removed.  One trigger per open fd.  Without ``CAP_SYS_RESOURCE`` the window must be a
multiple of 2 s; see ``/work/shared/KERNEL.md`` for which files accept triggers where.
"""

from __future__ import annotations

import os
import select
from typing import Literal

from .procfs import read_small

__all__ = [
    "CAP_SYS_RESOURCE",
    "UNPRIVILEGED_WINDOW_US",
    "has_capability",
    "open_trigger",
    "parse_pressure",
    "read_pressure",
    "round_window_us",
]

Line = Literal["some", "full"]

CAP_SYS_RESOURCE = 24
UNPRIVILEGED_WINDOW_US = 2_000_000
"""Unprivileged triggers need windows that are multiples of this."""


_AVERAGES = ("avg10", "avg60", "avg300")


def parse_pressure(raw: bytes) -> dict[str, float]:
    """A pressure file's lines as ``some_avg10_pct`` ... ``some_total_us`` (and ``full_...``).

    Two formats are read: the kernel's since 4.20 (``some avg10=1.00 avg60=... total=123``)
    and the experimental one oomd still parses (``aggr N`` first, then ``some 0.00 0.03
    0.05`` with the three averages by position and no total).  ``full`` is optional: CPU
    pressure files and some old kernels have no such line.  Every number must be finite and
    non-negative.  Raises ValueError naming the bad line: a pressure file is never partly
    trusted.
    """
    out: dict[str, float] = {}
    for line in raw.decode(errors="replace").splitlines():
        if not line.strip():
            continue
        kind, *fields = line.split()
        if kind == "aggr" and len(fields) == 1:
            continue  # the experimental format's aggregate: no unit documented, not used
        if kind not in ("some", "full") or not fields:
            raise ValueError(f"not a pressure line: {line!r}")
        if "=" in fields[0]:
            pairs = [field.partition("=") for field in fields]
            if any(not sep for _, sep, _ in pairs):
                raise ValueError(f"not a pressure line: {line!r}")
            items = [(key, value) for key, _, value in pairs]
        elif len(fields) == len(_AVERAGES):
            items = list(zip(_AVERAGES, fields))
        else:
            raise ValueError(f"not a pressure line: {line!r}")
        for key, value in items:
            unit = "us" if key == "total" else "pct"
            try:
                number = float(value)
            except ValueError:
                raise ValueError(f"not a number in pressure line: {line!r}") from None
            if not 0 <= number < float("inf"):
                raise ValueError(f"not a finite non-negative number in pressure line: {line!r}")
            out[f"{kind}_{key}_{unit}"] = number
    if "some_avg10_pct" not in out and "some_total_us" not in out:
        raise ValueError("no `some` line")
    return out


def read_pressure(path: str | os.PathLike[str]) -> dict[str, float]:
    """:func:`parse_pressure` of one pressure file."""
    return parse_pressure(read_small(path))


def has_capability(proc: str, cap: int) -> bool:
    """Whether our effective capability set (``CapEff`` of ``PROC/self/status``) holds ``cap``."""
    for line in read_small(f"{proc}/self/status", 8192).split(b"\n"):
        if line.startswith(b"CapEff:"):
            return bool(int(line.split()[1], 16) >> cap & 1)
    return False


def round_window_us(window_us: int) -> int:
    """The smallest multiple of 2 s that is at least ``window_us``."""
    step = UNPRIVILEGED_WINDOW_US
    return max(step, -(-window_us // step) * step)


def open_trigger(path: str | os.PathLike[str], line: Line, stall_us: int, window_us: int) -> int:
    """Open ``path`` and arm one trigger on it; returns the fd to wait on for POLLPRI.

    Raises OSError with the kernel's errno (EINVAL: refused; ENOENT: no such file; EPERM:
    not a file that can be polled).
    """
    fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        # A file that cannot be polled cannot carry a trigger (EPERM: a plain file); find
        # out before writing, so such a file is never written to.
        with select.epoll() as probe:
            probe.register(fd, select.EPOLLPRI)
        os.write(fd, f"{line} {stall_us} {window_us}\0".encode())
    except BaseException:
        os.close(fd)
        raise
    return fd
