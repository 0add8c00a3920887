"""``candidates``: the processes that may be killed for an event's scope.

The system scope offers every process but kernel threads.  A cgroup scope offers the tasks of
that cgroup *and of every cgroup below it*: the kernel's memcg OOM killer considers the whole
subtree, because a parent's limit is charged by its children's tasks.

Only cheap files are read (``stat``, ``status``, ``oom_score_adj``, ``cgroup``), never
``cmdline``: see :mod:`oomkit.procfs`.  Each scope keeps a :class:`~oomkit.proctable.ProcessTable`
from one ranking to the next: a process is read in full once, and then on each ranking only
its ``stat`` and ``oom_score_adj`` through descriptors held open, and its ``status`` again
only when its ``stat`` shows its memory changed.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager

from oomkit import Candidate, Config, Event, Scope, hookimpl, urgency
from oomkit.cgroupfs import Mounts, mounts_for, read_procs, scope_dir
from oomkit.procfs import list_pids
from oomkit.proctable import FdBudget, ProcessTable

from ._settings import Settings

__all__ = ["CandidatesSettings", "ProcessCandidates"]

log = logging.getLogger("oomkit.plugins.candidates")

_TABLES = 64
"""Scopes whose tables are kept; the least recently ranked one beyond that is closed."""
_RELEASE_EVERY_S = 0.01
"""How often a caller that may not park, waiting for a table, lets parked threads go again."""


class CandidatesSettings(Settings, frozen=True):
    """``[plugins.candidates]``."""

    include_cgroup: bool = True
    """For the system scope, fill each candidate's ``cgroup`` (one more small read per
    process when it is first seen, of ``/proc/PID/cgroup``).  Cgroup scopes always fill it:
    it is known for free."""


class ProcessCandidates:
    """Offers processes, one :class:`~oomkit.Candidate` each."""

    name = "candidates"
    loop_safe = True
    """An urgent decision may call its sync hooks on the event loop: file reads in /proc and cgroupfs only; a table held by a parked ranking is released (see _held)."""

    def __init__(self) -> None:
        self.settings = CandidatesSettings()
        self._proc = "/proc"
        self._mounts: Mounts | None = None
        self._tables: OrderedDict[Scope, tuple[ProcessTable, threading.Lock]] = OrderedDict()
        self._lock = threading.Lock()

    @hookimpl
    def oomkit_configure(self, config: Config) -> None:
        self.settings = config.plugin_settings(self.name, CandidatesSettings)
        self._proc = config.paths.proc
        self._mounts = mounts_for(config.paths)
        self.close()  # another tree or other settings: nothing kept is known to hold

    def close(self) -> None:
        """Close every table's descriptors (they are opened again as needed)."""
        with self._lock:
            tables = list(self._tables.values())
            self._tables.clear()
        for table, lock in tables:
            with lock:
                table.close()

    @hookimpl
    def oomkit_candidates(self, event: Event) -> list[Candidate]:
        assert self._mounts is not None, "oomkit_configure runs first"
        table, lock = self._table(event.scope)
        with _held(lock):
            short, unread = table.stats.emfile, table.stats.unread
            if event.scope.tree == "system":
                offered = table.offer(list_pids(self._proc))
            else:
                pids: list[int] = []
                cgroups: list[str] = []
                for pid, rel in self._subtree(event.scope):
                    pids.append(pid)
                    cgroups.append(rel)
                offered = table.offer(pids, cgroups)
            if table.stats.emfile > short:
                left = table.stats.unread - unread
                log.warning("candidates: this process ran out of file descriptors while reading %s for %s; "
                            "holding fewer open from now on (%s)", self._proc, event.scope,
                            f"{left} processes left out of this ranking" if left else "nobody left out")
            return offered

    def _table(self, scope: Scope) -> tuple[ProcessTable, threading.Lock]:
        with self._lock:
            found = self._tables.get(scope)
            if found is not None:
                self._tables.move_to_end(scope)
                return found
            assert self._mounts is not None
            # The memory controller's path says the most about memory; v2 where v1 has none.
            controller = ("memory" if self._mounts.memory_v1 is not None else "") if self.settings.include_cgroup else None
            found = self._tables[scope] = (ProcessTable(self._proc, FdBudget.shared(), controller), threading.Lock())
            evicted = self._tables.popitem(last=False)[1] if len(self._tables) > _TABLES else None
        if evicted is not None:
            with _held(evicted[1]):
                evicted[0].close()
        return found

    def _subtree(self, scope: Scope) -> Iterator[tuple[int, str]]:
        assert self._mounts is not None
        # v1 cgroup.procs may list a pid twice, and a task moving between two cgroups of the
        # subtree while we walk may show up in both: the table offers each pid once.
        for directory, rel in _walk(str(scope_dir(self._mounts, scope)), scope.path):
            for pid in read_procs(directory):
                yield pid, rel


@contextmanager
def _held(lock: threading.Lock) -> Iterator[None]:
    """Hold a table's lock for the block.  Whoever holds it reads the table through
    checkpoints: parked there for an urgent decision, it would keep that decision (which never
    parks) waiting here for up to ``urgent_park_s``.  So a caller that may not park, finding the lock taken, lets the
    parked threads go (:func:`oomkit.urgency.release_parked`, for the rest of the spell) and
    again at each short wait: a holder between checkpoints parks only after the first
    release, and a second urgent decision may start a new spell meanwhile."""
    if not lock.acquire(blocking=False):
        if urgency.may_park():
            lock.acquire()
        else:
            urgency.release_parked()
            while not lock.acquire(timeout=_RELEASE_EVERY_S):
                urgency.release_parked()
    try:
        yield
    finally:
        lock.release()


def _walk(directory: str, rel: str) -> Iterator[tuple[str, str]]:
    """Every cgroup directory of the subtree, top first, with its path relative to the mount.

    ``os.scandir`` by hand rather than ``os.walk`` plus ``os.path.relpath``: the relative
    path is built as it goes down, with no string arithmetic per directory on the way from
    an OOM to its kill.
    """
    yield directory, rel
    try:
        with os.scandir(directory) as entries:
            subdirs = [e.name for e in entries if e.is_dir(follow_symlinks=False)]
    except OSError:
        return  # removed while we walk: its tasks are gone too
    base = rel.rstrip("/")
    for name in subdirs:
        yield from _walk(f"{directory}/{name}", f"{base}/{name}")
