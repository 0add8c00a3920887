"""``freed``: the memory a kill would really release (principle 4).

Two processes mapping one shared buffer (a memfd, shmem, ``MAP_SHARED`` anonymous memory)
each show it in their RSS, but killing one frees none of it; page cache stays cached when
its reader dies.  So this scorer counts only private anonymous memory (``RssAnon`` of
``status``, which the candidates plugin already read), swap and page tables, on the shared
scale (1000 = the scope's whole limit).  Shared memory and file pages count 0.

``RssAnon`` still counts copy-on-write pages a forked child shares with its parent.  With
``smaps_rollup = true`` each candidate's ``/proc/PID/smaps_rollup`` is read too (in a
thread, waited for at most ``smaps_timeout_s`` per decision; ~7.5 us per resident MiB here,
so off by default: it is not a read for the OOM path) and the private part of its anonymous
memory is used instead.  A candidate whose file did not arrive in time keeps its ``status``
figure; what did arrive late is used by the next decision.

A unit (a cgroup or process group ranked whole) frees what its members free: its sizes are
already their sums; with ``smaps_rollup`` its members' files are read and added up, and the
unit keeps its ``status`` figure unless every member's arrived in time.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Annotated

import msgspec

from oomkit import Candidate, Config, Event, hookimpl
from oomkit.history import History
from oomkit.procfs import read_small
from oomkit.urgency import LOOP_WAIT_MAX_S, checkpointed

from ._scale import SCALE, ScopeTotal
from ._settings import Settings

__all__ = ["Freed", "FreedSettings", "freed_bytes"]


class FreedSettings(Settings, frozen=True):
    """``[plugins.freed]``."""

    smaps_rollup: bool = False
    """Also read ``smaps_rollup`` (copy-on-write sharing seen; costs a read per resident MiB)."""
    smaps_timeout_s: Annotated[float, msgspec.Meta(ge=0.0, le=10.0)] = 0.01
    """How long one decision waits for the ``smaps_rollup`` files it has not read before."""


def freed_bytes(c: Candidate) -> int:
    """Private anonymous memory, swap and page tables (``RssAnon`` unknown: all of RSS)."""
    anon = c.rss_anon_bytes if c.rss_anon_bytes is not None else c.rss_bytes
    return anon + c.swap_bytes + c.pgtables_bytes


def _private_anon(raw: bytes) -> int | None:
    """From ``smaps_rollup``: anonymous memory mapped by this process alone, in bytes."""
    fields: dict[bytes, int] = {}
    for line in raw.split(b"\n"):
        key, _, rest = line.partition(b":")
        value = rest.split()
        if value and value[0].isdigit():
            fields[key] = int(value[0]) * 1024
    if b"Anonymous" not in fields:
        return None
    private = fields.get(b"Private_Clean", 0) + fields.get(b"Private_Dirty", 0)
    return min(fields[b"Anonymous"], private)


class Freed:
    """Scores what a kill would free."""

    name = "freed"
    weight = 0.25
    """Default weight: what a kill frees matters, but a bigger stable process is not the cause."""

    @property
    def loop_safe(self) -> bool:
        """An urgent decision may call the score on the event loop while its only wait, for
        the ``smaps_rollup`` reader, is short."""
        return not self.settings.smaps_rollup or self.settings.smaps_timeout_s <= LOOP_WAIT_MAX_S

    def __init__(self) -> None:
        self.settings = FreedSettings()
        self._proc = "/proc"
        self._total = ScopeTotal()
        self._smaps: dict[tuple[int, int], int | None] = {}
        self._lock = threading.Lock()
        self._done = threading.Event()  # set: no reader thread running
        self._done.set()

    @hookimpl
    def oomkit_configure(self, config: Config) -> None:
        self.settings = config.plugin_settings(self.name, FreedSettings)
        self._proc = config.paths.proc
        self._total.configure(config)

    @hookimpl
    def oomkit_score(self, event: Event, candidates: Sequence[Candidate], history: History) -> list[float]:
        total = self._total(event, history)
        private = self._private(candidates) if self.settings.smaps_rollup else {}
        out: list[float] = []
        for c in checkpointed(candidates):
            freed = freed_bytes(c)
            anon = private.get(c.pid)
            if anon is not None:
                freed = anon + c.swap_bytes + c.pgtables_bytes
            out.append(freed * SCALE / total)
        return out

    def _private(self, candidates: Sequence[Candidate]) -> dict[int, int | None]:
        keys = {
            c.pid: [(m.pid, m.start_ticks) for m in c.members] if c.is_unit else [(c.pid, c.start_ticks)]
            for c in candidates
        }
        every = [k for ks in keys.values() for k in ks]
        with self._lock:
            missing = [k for k in every if k not in self._smaps]
            done = self._done
            if missing and done.is_set():
                # One reader at a time: one stuck on a process's mmap lock costs this thread
                # only, not one more per ranking; until it returns, rankings use the cache.
                done = self._done = threading.Event()
                threading.Thread(target=self._read, args=(missing, done), name="oomkit-freed-smaps",
                                 daemon=True).start()
        if missing:
            done.wait(self.settings.smaps_timeout_s)
        found: dict[int, int | None] = {}
        with self._lock:
            for pid, ks in keys.items():
                values = [self._smaps.get(k) for k in ks]
                found[pid] = None if any(v is None for v in values) else sum(v or 0 for v in values)
            if len(self._smaps) > 2 * len(every) + 1024:
                live = set(every)
                self._smaps = {k: v for k, v in self._smaps.items() if k in live}
        return found

    def _read(self, keys: list[tuple[int, int]], done: threading.Event) -> None:
        # Its own daemon thread: smaps_rollup walks every mapping under the mmap lock.
        for pid, start in keys:
            try:
                value = _private_anon(read_small(f"{self._proc}/{pid}/smaps_rollup", 4096))
            except OSError:
                value = None
            with self._lock:
                self._smaps[(pid, start)] = value
        done.set()
