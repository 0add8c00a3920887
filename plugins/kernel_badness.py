"""``kernel_badness``: the kernel's own OOM badness, on the ``oom_score`` scale.

The formula is ``oom_badness()`` of ``mm/oom_kill.c`` (Linux 5.9 and later, unchanged in
6.x)::

    points = rss pages + swap entries + page-table pages
    points += oom_score_adj * (totalpages / 1000)     # integer division, as the kernel does

``totalpages`` is what the scope may use:

* system: RAM + swap (``MemTotal + SwapTotal``), as ``constrained_alloc()`` sets it;
* cgroup: ``mem_cgroup_get_max()``: the memcg's limit plus the swap it may use, that swap
  part capped at the machine's swap (v1: ``memsw.limit - limit``, only when ``swappiness``
  is not 0; v2: ``memory.swap.max``).

We return ``points * 1000 / totalpages``: 1000 means "holds all the memory the scope may
use", and an ``oom_score_adj`` of 100 is worth a tenth of it.  ``/proc/PID/oom_score`` shows
the same number for the system scope, squeezed as ``(1000 + score) * 2 / 3``, so the order is
the same (our score is not rounded, so it breaks some of the kernel's ties).

A cgroup whose limit exceeds RAM + swap (unlimited, usually) is scaled by RAM + swap instead:
its limit can never be hit, so what the kernel would run there is a system OOM, which scales
by exactly that.  A v2 cgroup without the memory controller has no limit and is treated the
same way.  Tasks with ``oom_score_adj == -1000``, which the kernel never kills, still get a
(very negative) score here; the ``protect`` plugin is what keeps them alive.
"""

from __future__ import annotations

import mmap
from collections.abc import Sequence
from pathlib import Path

from oomkit import Candidate, Config, Event, Scope, hookimpl
from oomkit.cgroupfs import Mounts, mounts_for, scope_dir
from oomkit.procfs import read_meminfo, read_small
from oomkit.urgency import checkpointed

from ._settings import Settings

__all__ = ["KernelBadness", "KernelBadnessSettings", "PAGE"]

PAGE = mmap.PAGESIZE


class KernelBadnessSettings(Settings, frozen=True):
    """``[plugins.kernel_badness]``."""

    honour_oom_score_adj: bool = True
    """Add ``oom_score_adj`` as the kernel does.  Off: rank by memory alone (the adjustment
    is still shown in the candidate, and ``-1000`` is still never killed: the engine protects it)."""


class KernelBadness:
    """Scores candidates exactly as the kernel's OOM killer would, scope by scope."""

    name = "kernel_badness"
    loop_safe = True
    """An urgent decision may call its sync hooks on the event loop: it only computes over the candidates it is given."""
    weight = 0.0
    """Default weight: the kernel's formula breaks ties (``[engine] tiebreak``) and ranks alone
    under ``policy = "kernel"``; give it a weight to mix it into the sum."""

    def __init__(self) -> None:
        self.settings = KernelBadnessSettings()
        self._proc = "/proc"
        self._mounts: Mounts | None = None

    @hookimpl
    def oomkit_configure(self, config: Config) -> None:
        self.settings = config.plugin_settings(self.name, KernelBadnessSettings)
        self._proc = config.paths.proc
        self._mounts = mounts_for(config.paths)

    @hookimpl
    def oomkit_score(self, event: Event, candidates: Sequence[Candidate]) -> list[float]:
        total = self.total_pages(event.scope)
        adj_unit = total // 1000 if self.settings.honour_oom_score_adj else 0
        return [(badness_pages(c) + c.oom_score_adj * adj_unit) * 1000 / total for c in checkpointed(candidates)]

    def total_pages(self, scope: Scope) -> int:
        """The kernel's ``totalpages`` for an OOM in ``scope`` (at least 1)."""
        info = read_meminfo(self._proc, ("MemTotal", "SwapTotal"))
        ram, swap = info["MemTotal"] // PAGE, info.get("SwapTotal", 0) // PAGE
        if scope.tree == "system":
            return max(1, ram + swap)
        assert self._mounts is not None, "oomkit_configure runs first"
        d = scope_dir(self._mounts, scope)
        limit = _v1_max(d, swap) if scope.tree == "v1" else _v2_max(d, swap)
        return max(1, min(ram + swap, limit if limit is not None else ram + swap))


def badness_pages(c: Candidate) -> int:
    """The kernel's points before ``oom_score_adj``: pages the task would free."""
    return c.rss_bytes // PAGE + c.swap_bytes // PAGE + c.pgtables_bytes // PAGE


def _read_int(path: Path) -> int | None:
    """A one-number cgroup file; ``max`` (v2 unlimited) and a missing file give None."""
    try:
        text = read_small(path, 64).strip()
    except FileNotFoundError:
        return None
    return None if text == b"max" else int(text)


def _v1_max(d: Path, swap_total: int) -> int:
    limit = _read_int(d / "memory.limit_in_bytes")
    if limit is None:
        raise FileNotFoundError(f"{d}: no memory.limit_in_bytes; not a v1 memory cgroup")
    pages = limit // PAGE
    if swap_total == 0 or _read_int(d / "memory.swappiness") == 0:  # no swap: skip two reads
        return pages
    memsw = _read_int(d / "memory.memsw.limit_in_bytes")
    # Without swap accounting the kernel lets a memcg swap as much as the machine has.
    swap = swap_total if memsw is None else min(memsw // PAGE - pages, swap_total)
    return pages + swap


def _v2_max(d: Path, swap_total: int) -> int | None:
    if not (d / "memory.max").exists():
        return None  # no memory controller in this v2 tree: nothing limits the cgroup
    limit = _read_int(d / "memory.max")
    if limit is None:
        return None
    if swap_total == 0:
        return limit // PAGE
    swap_max = _read_int(d / "memory.swap.max")
    return limit // PAGE + min(swap_total, swap_total if swap_max is None else swap_max // PAGE)
