"""``reclaim``: ask the kernel to reclaim a v2 cgroup's memory before anyone is killed.

``memory.reclaim`` (Linux 5.19) is write-only: writing a byte count makes the kernel
reclaim that much from the cgroup, synchronously; the write succeeds once it has, and fails
with EAGAIN when it could not (after trying).  What it can take back is page cache, slab,
and, only where swap (or zram as swap) exists, anonymous memory: **without swap it frees
nothing a process holds**, and right after an OOM the cache is often already gone (the
kernel reclaimed it before it gave up).  Measured in the guest: see docs/benchmarks.md
(``python -m bench v2brake``).  So the result reported is the write's (``freed`` or
``nothing``) together with the change of ``memory.current`` across it, which is what the
engine's re-check of the condition then looks at.

Off by default: ``scopes`` (globs over ``v2:/path``) says where to try.  The write runs in a
worker thread (it blocks while the kernel reclaims) under the engine's rescue deadline.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterable
from typing import Annotated

import anyio
import msgspec

from oomkit import Candidate, Config, Event, hookimpl
from oomkit.cgroupfs import Mounts, mounts_for, scope_dir
from oomkit.procfs import read_small

from ._globs import matches
from ._settings import Settings

__all__ = ["Reclaim", "ReclaimSettings", "reclaim"]


class ReclaimSettings(Settings, frozen=True):
    """``[plugins.reclaim]``."""

    scopes: tuple[str, ...] = ()
    """v2 scopes to reclaim in before a kill (globs: ``v2:/jobs/*``); empty: nowhere."""
    fraction: Annotated[float, msgspec.Meta(ge=0.001, le=1.0)] = 0.05
    """How much to ask for: this share of the cgroup's ``memory.max`` (or ``memory.high``
    where ``max`` is unlimited), at least ``min_bytes``."""
    min_bytes: Annotated[int, msgspec.Meta(ge=4096, le=1 << 40)] = 1 << 20
    """The least asked for, in bytes."""


def _read_int(path: str) -> int | None:
    try:
        text = read_small(path, 64).strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def reclaim(directory: str, amount: int) -> tuple[str, int, str]:
    """Write ``amount`` to ``directory/memory.reclaim``; ``(result, freed, detail)`` with the
    fall of ``memory.current`` across the write."""
    before = _read_int(f"{directory}/memory.current")
    try:
        fd = os.open(f"{directory}/memory.reclaim", os.O_WRONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return "failed", 0, "no memory.reclaim here (Linux >= 5.19, the memory controller)"
    word = "freed"
    why = ""
    try:
        os.write(fd, f"{amount}".encode())
    except OSError as exc:
        if exc.errno != errno.EAGAIN:
            return "failed", 0, f"memory.reclaim: {exc.strerror}"
        word, why = "nothing", "; EAGAIN: the kernel could not reclaim that much"
    finally:
        os.close(fd)
    after = _read_int(f"{directory}/memory.current")
    fell = max(0, before - after) if before is not None and after is not None else 0
    if word == "nothing" and fell:
        word = "freed"
    return word, fell, f"asked {amount} bytes, memory.current fell by {fell}{why}"


class Reclaim:
    """Writes ``memory.reclaim`` of the event's v2 scope."""

    name = "reclaim"

    def __init__(self) -> None:
        self.settings = ReclaimSettings()
        self._mounts: Mounts | None = None

    @hookimpl
    def oomkit_configure(self, config: Config) -> None:
        self.settings = config.plugin_settings(self.name, ReclaimSettings)
        self._mounts = mounts_for(config.paths)

    @hookimpl
    async def oomkit_rescue(self, event: Event, victim: Candidate,
                            candidates: Iterable[Candidate]) -> tuple[str, int, str] | None:
        if event.scope.tree != "v2" or not matches(str(event.scope), self.settings.scopes):
            return None
        assert self._mounts is not None, "oomkit_configure runs first"
        d = str(scope_dir(self._mounts, event.scope))
        limit = _read_int(f"{d}/memory.max") or _read_int(f"{d}/memory.high") or 0
        amount = max(self.settings.min_bytes, int(limit * self.settings.fraction))
        # abandon_on_cancel: the write cannot be interrupted; the deadline must still hold.
        return await anyio.to_thread.run_sync(reclaim, d, amount, abandon_on_cancel=True)
