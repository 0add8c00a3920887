"""``unit_killer``: a unit killed whole, and ``memory.oom.group`` honoured.

* A ``cgroup`` unit: v2 ``cgroup.kill`` when every process in it passes the core's check,
  else (and always on v1) every task killed through its own pidfd, again and again until
  ``cgroup.procs`` of the whole subtree holds only the spared (:mod:`oomkit.unitkill`).
* A ``process-group`` unit: one signal to the group through its leader's pidfd
  (``PIDFD_SIGNAL_PROCESS_GROUP``, Linux 6.9) when the whole group may die and lies inside
  the scope, else each member through a pidfd of its own.
* ``memory.oom.group`` (v2): when the victim, a process or a unit, sits in a cgroup with
  ``memory.oom.group = 1`` at or below the event's scope, the kernel's own rule applies: the
  highest such cgroup dies whole.  A process victim is claimed only then; any other is the
  ``killer``'s.

Whatever the way, a pid the core protects (:mod:`oomkit.safety`) is spared, and then the
unit is not killed whole: no ``cgroup.kill``, no group signal.  ``KillResult.pids`` lists
every pid signalled, ``spared`` the protected ones left alive.  The outcome is ``killed``
once nothing but the spared is left, ``failed`` when processes remained after ``rounds``
kills and ``timeout_s``.
"""

from __future__ import annotations

from typing import Annotated

import msgspec

from oomkit import Candidate, Config, Event, Guard, KillResult, Scope, hookimpl
from oomkit.events import Outcome
from oomkit.cgroupfs import Mounts, mounts_for, scope_dir
from oomkit.procfs import read_small
from oomkit.unitkill import UnitKill, kill_cgroup, kill_process_group

from ._settings import Settings

__all__ = ["UnitKiller", "UnitKillerSettings", "oom_group_of"]


class UnitKillerSettings(Settings, frozen=True):
    """``[plugins.unit_killer]``."""

    oom_group: bool = True
    """Honour v2 ``memory.oom.group``: a victim in such a cgroup takes the group with it."""
    cgroup_kill: bool = True
    """Use v2 ``cgroup.kill`` when every process may die (else: the kill-each loop)."""
    group_signal: bool = True
    """Signal a process group through its leader's pidfd when the whole group may die."""
    rounds: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 16
    """Kill-each rounds at most: each lists the unit again and kills what is new."""
    timeout_s: Annotated[float, msgspec.Meta(ge=0.001, le=600.0)] = 5.0
    """How long a unit may take to be empty after its kill before the kill is a failure; at
    most nine tenths of ``[engine] kill_timeout_s`` is used, so the result is reported."""


def oom_group_of(unified: str, scope: str, cgroup: str) -> str | None:
    """The highest cgroup from ``scope`` down to ``cgroup`` (v2 paths, both included) whose
    ``memory.oom.group`` is 1, as the kernel picks it (``mem_cgroup_get_oom_group``)."""
    if not (cgroup == scope or scope == "/" or cgroup.startswith(scope.rstrip("/") + "/")):
        return None
    path = scope
    rest = [p for p in cgroup[len(scope):].split("/") if p] if scope != "/" else [p for p in cgroup.split("/") if p]
    while True:
        if path != "/":  # the root has no memory.oom.group
            try:
                if read_small(f"{unified}{path}/memory.oom.group", 16).strip() == b"1":
                    return path
            except OSError:
                pass
        if not rest:
            return None
        path = f"{path.rstrip('/')}/{rest.pop(0)}"


class UnitKiller:
    """Kills cgroups and process groups whole; claims process victims only for oom.group."""

    name = "unit_killer"

    def __init__(self) -> None:
        self.settings = UnitKillerSettings()
        self._proc = "/proc"
        self._mounts: Mounts | None = None
        self._timeout_s = self.settings.timeout_s

    @hookimpl
    def oomkit_configure(self, config: Config) -> None:
        self.settings = config.plugin_settings(self.name, UnitKillerSettings)
        # The engine abandons a killer at kill_timeout_s: finish (and report) before it.
        self._timeout_s = min(self.settings.timeout_s, 0.9 * config.engine.kill_timeout_s)
        self._proc = config.paths.proc
        self._mounts = mounts_for(config.paths)

    @hookimpl(tryfirst=True)
    async def oomkit_kill(self, event: Event, victim: Candidate, guard: Guard) -> KillResult | None:
        assert self._mounts is not None, "oomkit_configure runs first"
        s = self.settings
        group = self._oom_group(event, victim)
        if group is not None:
            done = await self._cgroup(Scope(tree="v2", path=group), guard)
            return _result("kill-oom-group", done, f"memory.oom.group=1 at {group}: the whole group")
        if victim.unit == "cgroup":
            if event.scope.tree == "system":
                return None  # a cgroup unit needs its tree, which only a cgroup scope names
            done = await self._cgroup(Scope(tree=event.scope.tree, path=victim.cgroup), guard)
            return _result("kill-cgroup", done, f"cgroup {victim.cgroup}")
        if victim.unit == "process-group":
            where = None if event.scope.tree == "system" else (event.scope.tree, event.scope.path)
            done = await kill_process_group(
                self._proc, victim.pgid, [m.pid for m in victim.members], guard, where,
                rounds=s.rounds, timeout_s=self._timeout_s, use_group_signal=s.group_signal,
            )
            return _result("kill-process-group", done, f"process group {victim.pgid}")
        return None

    def _oom_group(self, event: Event, victim: Candidate) -> str | None:
        assert self._mounts is not None
        unified = self._mounts.unified
        if not self.settings.oom_group or unified is None or not victim.cgroup:
            return None
        if event.scope.tree == "v2":
            scope = event.scope.path
        elif event.scope.tree == "system" and self._mounts.memory_v1 is None:
            scope = "/"  # the candidates' cgroups are v2 paths only where v1 has no memory controller
        else:
            return None
        return oom_group_of(str(unified), scope, victim.cgroup)

    async def _cgroup(self, scope: Scope, guard: Guard) -> UnitKill:
        assert self._mounts is not None
        s = self.settings
        return await kill_cgroup(
            self._proc, scope_dir(self._mounts, scope), scope.tree, scope.path, guard,
            rounds=s.rounds, timeout_s=self._timeout_s, use_cgroup_kill=s.cgroup_kill,
        )


def _result(action: str, done: UnitKill, what: str) -> KillResult:
    outcome: Outcome
    spared = f", sparing {len(done.spared)} protected ({'; '.join(done.refusals)})" if done.spared else ""
    detail = f"{what}: {done.how}, {len(done.pids)} pids in {done.rounds} round(s){spared}"
    if not done.emptied:
        outcome = "failed"
        detail += "; processes were still left"
    elif done.pids:
        outcome = "killed"
    else:
        outcome = "exited"
        detail = f"{what}: nobody left to kill{spared}"
    return KillResult(
        action=action, outcome=outcome, detail=detail, signals=("SIGKILL",) if done.pids else (),
        sent_ns=done.sent_ns, dead_ns=done.dead_ns if outcome == "killed" else 0,
        pids=tuple(done.pids), spared=tuple(done.spared),
    )
