"""``units``: cgroups and process groups ranked as wholes, as oomd and systemd-oomd rank.

For a scope named in ``cgroups`` (globs over the scope, ``v2:/jobs`` or ``v1:/svc/*``),
each child cgroup of the scope with processes in it (in it or below it) is offered as one
candidate, a unit with ``unit = "cgroup"``: its sizes are the sums of its processes', so
every scorer (``freed``, ``kernel_badness``, ``growth`` through the history, ``preference``)
ranks the child as a whole, and a kill ends all of it (``unit_killer``:
:mod:`oomkit_plugins.unitkill`).  Processes directly in the scope stay candidates of their
own (the ``candidates`` plugin offers them; the engine drops the ones a unit covers).

For a scope named in ``process_groups`` (``system`` is the machine), processes sharing a
process group become one ``process-group`` unit (a ``make -j`` and its compilers, a shell
pipeline); a process alone in its group stays a process.

With ``recursive = true`` a chosen cgroup unit is not killed at once: the engine ranks the
unit's own children the same way (and their processes), down to a cgroup without
children with processes, and kills what wins there (oomd's ``recursive``), so a pod that
holds the most memory loses its biggest container, not all of them.

A unit's ``oom_score_adj`` is its members' adj weighted by their resident memory (each
byte carries its process's wish); its key ``pid`` is its largest member's.  What the core
does with a unit holding a protected process is in :mod:`oomkit.safety`.

Reads: the same cheap files as ``candidates`` (``stat``, ``status``, ``oom_score_adj``) for
every process of the units, once per decision.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from typing import Annotated

import msgspec

from oomkit import Candidate, Config, Event, HookContext, Member, hookimpl
from oomkit.cgroupfs import Mounts, mounts_for, read_procs, read_subtree_procs, scope_dir
from oomkit.events import Unit
from oomkit.procfs import list_pids, read_process

from ._globs import matches
from ._settings import Settings

__all__ = ["Units", "UnitsSettings", "make_unit"]

log = logging.getLogger("oomkit.plugins.units")


class UnitsSettings(Settings, frozen=True):
    """``[plugins.units]``."""

    cgroups: tuple[str, ...] = ()
    """Scopes whose child cgroups are offered as units: globs over the scope as it prints
    (``v2:/jobs``, ``v2:/kubepods/*``, ``*`` for every cgroup scope).  Empty: none."""
    process_groups: tuple[str, ...] = ()
    """Scopes whose processes are grouped by process group (``system`` for the machine)."""
    recursive: bool = False
    """A chosen cgroup unit with child cgroups is ranked again inside, down to a leaf."""
    max_members: Annotated[int, msgspec.Meta(ge=1, le=65536)] = 4096
    """A unit with more processes is not offered whole (its processes are, one by one)."""


def make_unit(kind: Unit, members: list[Candidate], *, name: str, cgroup: str, pgid: int = 0,
              descend: bool = False) -> Candidate:
    """One unit standing for ``members`` (at least one): sizes summed, the largest member's
    pid as its key."""
    key = max(members, key=lambda c: (c.rss_bytes, -c.pid))
    weights = [max(c.rss_bytes, 1) for c in members]
    adj = round(sum(c.oom_score_adj * w for c, w in zip(members, weights)) / sum(weights))

    def total(attr: str) -> int | None:
        values = [getattr(c, attr) for c in members]
        return None if all(v is None for v in values) else sum(v or 0 for v in values)

    return Candidate(
        pid=key.pid,
        name=name,
        ppid=key.ppid,
        uid=key.uid,
        rss_bytes=sum(c.rss_bytes for c in members),
        swap_bytes=sum(c.swap_bytes for c in members),
        pgtables_bytes=sum(c.pgtables_bytes for c in members),
        oom_score_adj=max(-1000, min(1000, adj)),
        start_ticks=key.start_ticks,
        cgroup=cgroup,
        rss_anon_bytes=total("rss_anon_bytes"),
        rss_file_bytes=total("rss_file_bytes"),
        rss_shmem_bytes=total("rss_shmem_bytes"),
        unit=kind,
        members=tuple(
            Member(pid=c.pid, name=c.name, start_ticks=c.start_ticks, oom_score_adj=c.oom_score_adj,
                   kthread=c.kthread, rss_bytes=c.rss_bytes)
            for c in members
        ),
        pgid=pgid,
        descend=descend,
    )


class Units:
    """Offers cgroups and process groups as units."""

    name = "units"
    loop_safe = True
    """An urgent decision may call its sync hooks on the event loop: it reads cgroupfs and /proc files only."""

    def __init__(self) -> None:
        self.settings = UnitsSettings()
        self._proc = "/proc"
        self._mounts: Mounts | None = None
        self._too_big: set[str] = set()

    @hookimpl
    def oomkit_configure(self, config: Config) -> None:
        self.settings = config.plugin_settings(self.name, UnitsSettings)
        self._proc = config.paths.proc
        self._mounts = mounts_for(config.paths)

    @hookimpl(tryfirst=True)
    def oomkit_candidates(self, event: Event, context: HookContext) -> list[Candidate] | None:
        scope = str(event.scope)
        settings = self.settings
        # Inside a chosen unit (recursive), its children are units whatever the globs say.
        inside = bool(context.descent) and settings.recursive
        by_cgroup = event.scope.tree != "system" and (inside or matches(scope, settings.cgroups))
        by_group = matches(scope, settings.process_groups)
        if not (by_cgroup or by_group):
            return None
        assert self._mounts is not None, "oomkit_configure runs first"
        out: list[Candidate] = []
        covered: set[int] = set()
        if by_cgroup:
            top = scope_dir(self._mounts, event.scope)
            for unit in self._children(top, event.scope.path):
                out.append(unit)
                covered.update(m.pid for m in unit.members)
        if by_group:
            if event.scope.tree == "system":
                pids = list_pids(self._proc)
            else:
                pids = read_subtree_procs(scope_dir(self._mounts, event.scope))
            out.extend(self._groups([p for p in pids if p not in covered], event.scope.path))
        return out

    def _read(self, pids: Iterable[int], cgroup: str = "") -> list[Candidate]:
        out = []
        for pid in pids:
            c = read_process(self._proc, pid, cgroup, skip_kthreads=True)
            if c is not None:
                out.append(c)
        return out

    def _children(self, top: os.PathLike[str], top_rel: str) -> list[Candidate]:
        try:
            with os.scandir(top) as entries:
                names = sorted(e.name for e in entries if e.is_dir(follow_symlinks=False))
        except OSError:
            return []  # the scope went away: nothing to offer
        base = top_rel.rstrip("/")
        out: list[Candidate] = []
        for name in names:
            d = os.path.join(top, name)
            rel = f"{base}/{name}"
            pids = read_subtree_procs(d, self.settings.max_members + 1)
            if len(pids) > self.settings.max_members:
                if rel not in self._too_big:
                    self._too_big.add(rel)
                    log.warning("units: cgroup %s has more than %d processes; offered one by one, not whole",
                                rel, self.settings.max_members)
                continue
            members = self._read(pids, rel)
            if members:
                out.append(make_unit("cgroup", members, name=name, cgroup=rel,
                                     descend=self.settings.recursive and _has_child_with_tasks(d)))
        return out

    def _groups(self, pids: list[int], cgroup: str) -> list[Candidate]:
        by_pgid: dict[int, list[Candidate]] = {}
        for c in self._read(pids):
            if c.pgid > 0:
                by_pgid.setdefault(c.pgid, []).append(c)
        out = []
        for pgid, members in sorted(by_pgid.items()):
            if len(members) < 2 or len(members) > self.settings.max_members:
                continue  # a process alone in its group is offered as itself
            leader = next((c for c in members if c.pid == pgid), None)
            name = leader.name if leader is not None else max(members, key=lambda c: c.rss_bytes).name
            where = leader.cgroup if leader is not None and leader.cgroup else cgroup
            out.append(make_unit("process-group", members, name=name, cgroup=where, pgid=pgid))
        return out


def _has_child_with_tasks(d: str) -> bool:
    try:
        with os.scandir(d) as entries:
            children = [e.path for e in entries if e.is_dir(follow_symlinks=False)]
    except OSError:
        return False
    return any(read_procs(c) or _has_child_with_tasks(c) for c in children)
