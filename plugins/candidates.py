"""``candidates``: the processes that may be killed for an event's scope.

The system scope offers every process but kernel threads.  A cgroup scope offers the tasks of
that cgroup *and of every cgroup below it*: the kernel's memcg OOM killer considers the whole
subtree, because a parent's limit is charged by its children's tasks.

Only cheap files are read (``stat``, ``status``, ``oom_score_adj``, ``cgroup``), never
``cmdline``: see :mod:`oomkit.procfs`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import msgspec

from oomkit import Candidate, Config, Event, hookimpl
from oomkit.cgroupfs import Mounts, mounts_for, read_procs, scope_dir
from oomkit.procfs import list_pids, own_cgroup, read_process

from ._settings import Settings

__all__ = ["CandidatesSettings", "ProcessCandidates"]


class CandidatesSettings(Settings, frozen=True):
    """``[plugins.candidates]``."""

    include_cgroup: bool = True
    """For the system scope, fill each candidate's ``cgroup`` (one more small read per
    process, of ``/proc/PID/cgroup``).  Cgroup scopes always fill it: it is known for free."""


class ProcessCandidates:
    """Offers processes, one :class:`~oomkit.Candidate` each."""

    name = "candidates"

    def __init__(self) -> None:
        self.settings = CandidatesSettings()
        self._proc = "/proc"
        self._mounts: Mounts | None = None

    @hookimpl
    def oomkit_configure(self, config: Config) -> None:
        self.settings = config.plugin_settings(self.name, CandidatesSettings)
        self._proc = config.paths.proc
        self._mounts = mounts_for(config.paths)

    @hookimpl
    def oomkit_candidates(self, event: Event) -> list[Candidate]:
        if event.scope.tree == "system":
            return self._system()
        assert self._mounts is not None, "oomkit_configure runs first"
        return self._subtree(scope_dir(self._mounts, event.scope), event.scope.path)

    def _system(self) -> list[Candidate]:
        assert self._mounts is not None, "oomkit_configure runs first"
        # The memory controller's path says the most about memory; v2 where v1 has none.
        controller = "memory" if self._mounts.memory_v1 is not None else ""
        out: list[Candidate] = []
        for pid in list_pids(self._proc):
            cand = read_process(self._proc, pid, skip_kthreads=True)
            if cand is None:
                continue
            if self.settings.include_cgroup:
                try:
                    cgroup = own_cgroup(self._proc, controller, pid) or ""
                except OSError:
                    continue  # gone between the two reads
                cand = msgspec.structs.replace(cand, cgroup=cgroup)
            out.append(cand)
        return out

    def _subtree(self, top: Path, top_rel: str) -> list[Candidate]:
        out: list[Candidate] = []
        seen: set[int] = set()
        for directory, rel in _walk(str(top), top_rel):
            # v1 cgroup.procs may list a pid twice; a task moving between two cgroups of the
            # subtree while we walk may show up in both.
            for pid in read_procs(directory):
                if pid in seen:
                    continue
                seen.add(pid)
                cand = read_process(self._proc, pid, rel, skip_kthreads=True)
                if cand is not None:
                    out.append(cand)
        return out


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
