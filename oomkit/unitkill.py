"""Killing a unit whole: every process of a cgroup (and below it), or of a process group.

Three kernel interfaces, each used only when every pid it would reach passes the core's
check (:class:`oomkit.safety.Guard`), since each of them kills protected processes too:

* cgroup v2 ``cgroup.kill`` (Linux 5.14): one write SIGKILLs every task of the subtree,
  including those forked while it runs; the kill is over when ``cgroup.events`` says
  ``populated 0``.
* ``pidfd_send_signal(leader, SIGKILL, PIDFD_SIGNAL_PROCESS_GROUP)`` (Linux 6.9): the
  process group of a pidfd's process, which cannot be a reused group id while the pidfd
  pins the leader.  Used only when the leader is alive and every process of the group (a
  scan of ``/proc``) passes the guard and lies inside the scope.
* Otherwise, and always on cgroup v1, which has no ``cgroup.kill``: **kill every task and
  kill again until none is left**, a bounded number of rounds.  The v1 freezer does not
  help during a takeover: a task paused in the OOM path never reaches the freezer, so
  ``FREEZING`` never becomes ``FROZEN``, and a frozen task that got SIGKILL is not reaped
  until it is thawed.  Each pid is signalled through a pidfd opened first and re-checked
  after opening (the guard, then its cgroup, read again), so a pid that exited and was
  reused by a process outside the unit is never signalled.  Protected pids are spared and
  the loop ends once only they are left.

Everything here is bounded: rounds, the time to wait for the unit to empty, the pids read.
"""

from __future__ import annotations

import errno
import os
import select
import signal
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import anyio

from .cgroupfs import read_keyed, read_subtree_procs, write_value
from .procfs import list_pids, read_small
from .safety import Guard

__all__ = [
    "PIDFD_SIGNAL_PROCESS_GROUP",
    "UnitKill",
    "group_pids",
    "in_cgroup",
    "kill_cgroup",
    "kill_each",
    "kill_process_group",
]

PIDFD_SIGNAL_PROCESS_GROUP = 1 << 2
"""``pidfd_send_signal`` flag (``include/uapi/linux/pidfd.h``, Linux 6.9): signal the
pidfd's process group.  Older kernels refuse it with EINVAL."""

_SETTLE_S = 0.005
"""Between two rounds of the kill-all loop: long enough for a SIGKILLed task to leave
``cgroup.procs``, short enough that a fork burst has no time to refill it."""


@dataclass(slots=True)
class UnitKill:
    """What one unit kill did."""

    how: str
    """``cgroup.kill``, ``process-group signal`` or ``kill-each``."""
    pids: list[int] = field(default_factory=list)
    """Every pid signalled (for ``cgroup.kill``: every pid listed right before the write)."""
    spared: list[int] = field(default_factory=list)
    """Protected pids left alive."""
    rounds: int = 0
    emptied: bool = False
    """No process but the spared ones was left at the end."""
    refusals: list[str] = field(default_factory=list)
    """Why pids were spared (the guard's words), at most a few."""
    sent_ns: int = 0
    dead_ns: int = 0


def in_cgroup(proc: str, pid: int, tree: str, path: str) -> bool:
    """Is ``pid`` in the cgroup ``path`` of ``tree`` (``v1``: its memory controller, ``v2``)
    or below it, as ``/proc/PID/cgroup`` says now?"""
    try:
        raw = read_small(f"{proc}/{pid}/cgroup", 65536)
    except OSError:
        return False
    want_v2 = tree == "v2"
    for line in raw.split(b"\n"):
        _, _, rest = line.partition(b":")
        controllers, sep, where = rest.partition(b":")
        if not sep:
            continue
        if (not controllers) if want_v2 else (b"memory" in controllers.split(b",")):
            here = where.decode(errors="replace")
            return path == "/" or here == path or here.startswith(path.rstrip("/") + "/")
    return False


def _exited(pidfd: int) -> bool:
    """A pidfd is readable once its process has exited (a zombie counts).  ``poll``, not
    ``select``: a daemon holding many descriptors (the candidates' process tables) hands out
    pidfds above ``FD_SETSIZE``, which ``select`` refuses."""
    watch = select.poll()
    watch.register(pidfd, select.POLLIN)
    return bool(watch.poll(0))


class _Killer:
    """The kill-each loop's state: one pidfd per signalled process, held until it is dead."""

    def __init__(self, proc: str, guard: Guard, result: UnitKill) -> None:
        self.proc = proc
        self.guard = guard
        self.result = result
        self.pidfds: dict[int, int] = {}
        self.spared: set[int] = set()
        self.recorded = set(result.pids)  # signalled before the loop (the group signal)
        self.passed: set[int] = set()
        """Listed, but gone or no longer in the unit when checked: nothing of ours."""

    def close(self) -> None:
        for fd in self.pidfds.values():
            os.close(fd)
        self.pidfds.clear()

    def kill(self, pid: int, where: tuple[str, str] | None = None) -> bool:
        """SIGKILL ``pid`` unless it is spared, gone, already signalled, or no longer in the
        unit; returns whether a signal was sent."""
        if pid in self.spared or pid in self.passed:
            return False
        fd = self.pidfds.get(pid)
        if fd is not None:
            if not _exited(fd):
                # Signalled and still running: a task paused in the kernel wakes on it, so
                # sending again costs nothing and covers a signal that raced an exec.
                try:
                    signal.pidfd_send_signal(fd, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            return False
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            self.passed.add(pid)
            return False
        except OSError as exc:
            if exc.errno in (errno.ESRCH, errno.EINVAL):
                self.passed.add(pid)
                return False
            raise
        keep = False
        try:
            # Checked after the pidfd pins the process: the pid can no longer change hands.
            verdict = self.guard.check(pid)
            if verdict.status == "refused":
                self.spared.add(pid)
                self.result.spared.append(pid)
                if len(self.result.refusals) < 4:
                    self.result.refusals.append(f"pid {pid}: {verdict.reason}")
                return False
            if verdict.status == "gone" or _exited(fd) or (where is not None and not in_cgroup(self.proc, pid, *where)):
                # Exited, left the unit, or a reused pid of someone else's.
                self.passed.add(pid)
                return False
            try:
                signal.pidfd_send_signal(fd, signal.SIGKILL)
            except ProcessLookupError:
                return False
            if not self.result.sent_ns:
                self.result.sent_ns = time.monotonic_ns()
            if pid not in self.recorded:
                self.recorded.add(pid)
                self.result.pids.append(pid)
            self.pidfds[pid] = fd
            keep = True
            return True
        finally:
            if not keep:
                os.close(fd)

    def live(self, pids: Iterable[int]) -> list[int]:
        """The pids that are neither spared nor a signalled process that has exited."""
        out = []
        for pid in pids:
            if pid in self.spared or pid in self.passed:
                continue
            fd = self.pidfds.get(pid)
            if fd is not None and _exited(fd):
                continue
            out.append(pid)
        return out

    async def wait_dead(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while True:
            if all(_exited(fd) for fd in self.pidfds.values()):
                return True
            if time.monotonic() >= deadline:
                return False
            await anyio.sleep(_SETTLE_S)


async def kill_each(
    proc: str,
    list_now: Callable[[], list[int]],
    guard: Guard,
    where: tuple[str, str] | None,
    *,
    rounds: int,
    timeout_s: float,
    result: UnitKill | None = None,
) -> UnitKill:
    """Kill every pid ``list_now()`` returns, and again with what it returns next, until it
    returns only spared pids and the dead, at most ``rounds`` times; then wait (at most
    ``timeout_s``) for every signalled process to be gone."""
    out = result if result is not None else UnitKill(how="kill-each")
    killer = _Killer(proc, guard, out)
    deadline = time.monotonic() + timeout_s
    try:
        for _ in range(rounds):
            out.rounds += 1
            todo = killer.live(list_now())
            if not todo:
                out.emptied = True
                break
            for pid in todo:
                killer.kill(pid, where=where)
            if time.monotonic() >= deadline:
                break
            await anyio.sleep(_SETTLE_S)
        else:
            out.emptied = not killer.live(list_now())
        if await killer.wait_dead(max(0.0, deadline - time.monotonic())):
            out.dead_ns = time.monotonic_ns() if out.pids else 0
            if not out.emptied:
                # The last round still saw signalled processes not yet dead (a loaded
                # machine): they are now, so only a process that came since is left.
                try:
                    out.emptied = not killer.live(list_now())
                except FileNotFoundError:
                    out.emptied = True  # the unit itself is gone, and everyone in it
        else:
            out.emptied = False
    finally:
        killer.close()
    return out


async def kill_cgroup(
    proc: str,
    directory: Path,
    tree: str,
    path: str,
    guard: Guard,
    *,
    rounds: int,
    timeout_s: float,
    use_cgroup_kill: bool = True,
) -> UnitKill:
    """Kill every process of the cgroup at ``directory`` (``path`` in ``tree``) and below.

    ``cgroup.kill`` when ``tree`` is ``v2``, ``use_cgroup_kill`` is set, the file exists and
    every pid listed now passes ``guard``; the kill-each loop otherwise.
    """
    listed = read_subtree_procs(directory)
    if use_cgroup_kill and tree == "v2" and (directory / "cgroup.kill").exists():
        verdicts = [(pid, guard.check(pid)) for pid in listed]
        refused = [(pid, v.reason) for pid, v in verdicts if v.status == "refused"]
        if not refused:
            out = UnitKill(how="cgroup.kill", pids=[pid for pid, v in verdicts if v.status == "ok"])
            out.rounds = 1
            write_value(directory / "cgroup.kill", 1)
            out.sent_ns = time.monotonic_ns()
            out.emptied = await _wait_unpopulated(directory, timeout_s)
            out.dead_ns = time.monotonic_ns() if out.emptied else 0
            return out
    return await kill_each(
        proc, lambda: read_subtree_procs(directory), guard, (tree, path), rounds=rounds, timeout_s=timeout_s,
        result=UnitKill(how="kill-each"),
    )


async def _wait_unpopulated(directory: Path, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if read_keyed(directory / "cgroup.events").get("populated", 0) == 0:
                return True
        except FileNotFoundError:
            return True  # removed: nothing is left in it
        if time.monotonic() >= deadline:
            return False
        await anyio.sleep(_SETTLE_S)


def group_pids(proc: str, pgid: int, limit: int = 1 << 16) -> list[int] | None:
    """Every process of process group ``pgid`` in ``/proc`` (None: more than ``limit``)."""
    out = []
    for pid in list_pids(proc):
        try:
            raw = read_small(f"{proc}/{pid}/stat", 1024)
            if int(raw[raw.rindex(b")") + 2 :].split()[2]) == pgid:
                out.append(pid)
        except (OSError, ValueError, IndexError):
            continue
        if len(out) > limit:
            return None
    return out


async def kill_process_group(
    proc: str,
    pgid: int,
    members: list[int],
    guard: Guard,
    where: tuple[str, str] | None,
    *,
    rounds: int,
    timeout_s: float,
    use_group_signal: bool = True,
) -> UnitKill:
    """Kill process group ``pgid``: through its leader's pidfd with
    :data:`PIDFD_SIGNAL_PROCESS_GROUP` when every process of the group passes ``guard`` and
    is inside ``where`` (a cgroup: ``(tree, path)``; None: anywhere), else each member of
    the group found in ``members`` and in ``/proc`` by a pidfd of its own."""

    def now() -> list[int]:
        found = group_pids(proc, pgid) or []
        return [pid for pid in found if where is None or in_cgroup(proc, pid, *where)]

    if use_group_signal and pgid in members:
        out = await _signal_group(proc, pgid, guard, where)
        if out is not None:
            return await kill_each(proc, now, guard, where, rounds=rounds, timeout_s=timeout_s, result=out)
    return await kill_each(proc, lambda: sorted(set(members) | set(now())), guard, where, rounds=rounds,
                           timeout_s=timeout_s, result=UnitKill(how="kill-each"))


async def _signal_group(proc: str, pgid: int, guard: Guard, where: tuple[str, str] | None) -> UnitKill | None:
    """The group signal, when it is allowed and the kernel has it; None to fall back."""
    try:
        leader = os.pidfd_open(pgid)
    except OSError:
        return None
    try:
        everyone = group_pids(proc, pgid)
        if not everyone or pgid not in everyone:
            return None
        for pid in everyone:
            if guard.check(pid).status != "ok":
                return None
            if where is not None and not in_cgroup(proc, pid, *where):
                return None
        try:
            signal.pidfd_send_signal(leader, signal.SIGKILL, None, PIDFD_SIGNAL_PROCESS_GROUP)
        except OSError as exc:
            if exc.errno in (errno.EINVAL, errno.ESRCH):
                return None  # an older kernel, or the leader just exited
            raise
        return UnitKill(how="process-group signal", pids=everyone, rounds=1, sent_ns=time.monotonic_ns())
    finally:
        os.close(leader)
