"""The protections no config and no plugin can switch off.

Whatever the plugins offer, score or veto, the engine never kills:

* pid 1 (init: the machine goes down with it);
* a kernel thread (``PF_KTHREAD``: killing it frees nothing, and the kernel ignores it);
* oomkit itself (the process running the engine, an embedding program included) and its
  ancestors (the supervisor or shell that runs oomkit: killing it kills oomkit too);
* a process a source declares it depends on (:meth:`oomkit.Source.protected_pids`: the
  memcg-oom source's takeover watchdog);
* a task with ``oom_score_adj == -1000`` (the kernel's own "never kill me");
* a thread id standing for its process (a signal to it would kill a process nobody judged).

A unit (a cgroup or a process group: :class:`~oomkit.events.Candidate` ``unit``) is judged
member by member.  A unit whose every member is protected is vetoed.  A unit holding some
protected members is *not killed whole*: its killer must spare them (no ``cgroup.kill``,
no signal to the process group), killing the others one pid at a time after asking
:class:`Guard`, the core's check a killer gets for every pid it finds by itself (a member
forked after the ranking, say).  The kernel's own ``memory.oom.group`` kill does the same
for its protected tasks (``oom_score_adj -1000``, init): they survive the group's death.

They act twice.  In the ranking they are vetoes by the reserved plugin name ``oomkit``
(:data:`CORE`), judged on the candidates' own facts, so ``oomkit top`` shows why.  Then,
right before the kill, :meth:`Safety.verify` re-reads the chosen victim from ``/proc``
itself, because a candidates plugin's facts are untrusted and ``oom_score_adj`` may change
at any moment.  A victim that fails is not killed: the engine vetoes it by ``oomkit`` and
tries the next one in the ranking.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, final

from .events import Candidate
from .plugins import RESERVED_NAME
from .procfs import read_identity, read_process

__all__ = ["CORE", "OOM_SCORE_ADJ_MIN", "Guard", "Safety", "Verdict"]

CORE = RESERVED_NAME
"""The plugin name of the core's vetoes; no plugin may register under it."""

OOM_SCORE_ADJ_MIN = -1000

_ANCESTRY_LIMIT = 64  # a fake tree with a loop must not hang us


@final
@dataclass(frozen=True, slots=True)
class Verdict:
    """What :meth:`Safety.verify` found: ``ok`` to kill, ``gone`` (or reused), ``refused``."""

    status: Literal["ok", "gone", "refused"]
    reason: str = ""
    spared: tuple[int, ...] = ()
    """For a unit: the members the core protects (the unit is then not killed whole)."""


_OK = Verdict("ok")


@final
class Safety:
    """The core's protections, for one proc root (``[paths] proc``)."""

    __slots__ = ("_proc", "_me", "_ancestors")

    def __init__(self, proc: str) -> None:
        self._proc = proc
        self._me = -1
        self._ancestors: dict[int, int] = {}
        self._refresh()

    def _refresh(self) -> None:
        """Read oomkit's ancestry: pid to start time, oomkit itself included.

        Read once, and again only if we are now another process (an embedding program that
        forked).  Ancestors can only disappear, never be added: an orphan is reparented to
        a subreaper or init, both older ancestors, so the chain read at start is a superset
        of the live one.  A pid of the chain that exits and is reused gets another start
        time, which is why a process matches only with both.
        """
        me = os.getpid()
        chain: dict[int, int] = {}
        pid = me
        while pid > 1 and pid not in chain and len(chain) < _ANCESTRY_LIMIT:
            found = read_process(self._proc, pid)
            if found is None:
                break
            chain[pid] = found.start_ticks
            pid = found.ppid
        self._me, self._ancestors = me, chain

    def _whose(self, pid: int, start_ticks: int) -> str | None:
        if pid == self._me:
            return "oomkit itself (the process running the engine)"
        if self._ancestors.get(pid) == start_ticks:
            return f"an ancestor of oomkit (pid {self._me}): killing it kills oomkit"
        return None

    def vetoes(self, candidates: Sequence[Candidate], protected: Mapping[int, str]) -> dict[int, str]:
        """The candidates the core protects, judged on their own facts, each with a reason.

        ``protected`` maps the pids sources declared (:meth:`oomkit.Source.protected_pids`)
        to the source's name.
        """
        if os.getpid() != self._me:
            self._refresh()
        # The cheap test first: it runs once per candidate, and almost every one passes it.
        me, mine = self._me, self._ancestors
        out: dict[int, str] = {}
        for c in candidates:
            if c.unit != "process":
                why = self._unit_reason(c, protected)
                if why is not None:
                    out[c.pid] = why
                continue
            pid = c.pid
            adj = c.oom_score_adj
            if pid == 1 or c.kthread or pid == me or pid in mine or pid in protected or adj == OOM_SCORE_ADJ_MIN:
                reason = self._reason(pid, c.kthread, c.start_ticks, adj, protected)
                if reason is not None:
                    out[pid] = reason
        return out

    def _unit_reason(self, unit: Candidate, protected: Mapping[int, str]) -> str | None:
        """A unit is vetoed only when every member is protected (or it has none)."""
        first: str | None = None
        for m in unit.members:
            reason = self._reason(m.pid, m.kthread, m.start_ticks, m.oom_score_adj, protected)
            if reason is None:
                return None
            first = first or f"pid {m.pid} ({m.name}): {reason}"
        if first is None:
            return f"{unit.describe()} has no members"
        return f"every member is protected (first: {first})"

    def _reason(
        self, pid: int, kthread: bool, start_ticks: int, adj: int, protected: Mapping[int, str]
    ) -> str | None:
        if pid == 1:
            return "pid 1 (init): the machine goes down with it"
        if kthread:
            return "kernel thread: killing it frees nothing"
        mine = self._whose(pid, start_ticks)
        if mine is not None:
            return mine
        source = protected.get(pid)
        if source is not None:
            return f"source {source!r} depends on it (its watchdog)"
        if adj == OOM_SCORE_ADJ_MIN:
            return "oom_score_adj is -1000 (never kill)"
        return None

    def verify(self, victim: Candidate, protected: Mapping[int, str]) -> Verdict:
        """Re-check ``victim`` against ``/proc`` now, trusting none of its facts but its pid
        (a unit's: every member's pid and start time, :meth:`verify_unit`).

        ``gone`` when the pid is gone or now names another process (another start time);
        ``refused`` when the live process is protected, is a thread rather than a process,
        or cannot be read.  Three small reads: ``stat``, ``status``, ``oom_score_adj``.
        """
        if victim.unit != "process":
            return self.verify_unit(victim, protected)
        return self.check(victim.pid, protected, victim.start_ticks)

    def verify_unit(self, unit: Candidate, protected: Mapping[int, str]) -> Verdict:
        """Every member re-checked: ``ok`` while one may be killed (those the core protects
        listed in ``spared``), ``gone`` when all are, ``refused`` when all that are left are
        protected."""
        spared: list[int] = []
        first = ""
        alive = 0
        for m in unit.members:
            verdict = self.check(m.pid, protected, m.start_ticks)
            if verdict.status == "ok":
                alive += 1
            elif verdict.status == "refused":
                spared.append(m.pid)
                first = first or verdict.reason
        if alive:
            why = f"sparing {len(spared)} protected member(s) (first: {first})" if spared else ""
            return Verdict("ok", why, tuple(spared))
        if spared:
            return Verdict("refused", f"{unit.describe()}: every member left is protected (first: {first})",
                           tuple(spared))
        return Verdict("gone", f"every member of {unit.describe()} was gone when re-verified before the kill")

    def check(self, pid: int, protected: Mapping[int, str], start_ticks: int | None = None) -> Verdict:
        """Re-check one pid against ``/proc`` now; with ``start_ticks``, also that it is still
        the process that was judged (another start time: ``gone``)."""
        if os.getpid() != self._me:
            self._refresh()
        try:
            live = read_identity(self._proc, pid)
        except Exception as exc:
            return Verdict("refused", f"re-verification before the kill failed ({type(exc).__name__}: {exc})")
        if live is None:
            return Verdict("gone", f"pid {pid} was gone when re-verified before the kill")
        if live.tgid != pid:
            # Before anything else: a thread's facts (start time) are its own, while a signal
            # to it kills its whole process, which nobody judged.
            what = f"pid {pid} is a thread of process {live.tgid}, not a process"
            return Verdict("refused", f"re-verified in /proc before the kill: {what}")
        reason = self._reason(pid, live.kthread, live.start_ticks, live.oom_score_adj, protected)
        if reason is not None:
            return Verdict("refused", f"re-verified in /proc before the kill: {reason}")
        if start_ticks is not None and live.start_ticks != start_ticks:
            return Verdict(
                "gone",
                f"pid {pid} now belongs to another process (start time {live.start_ticks},"
                f" the candidate's {start_ticks})",
            )
        return _OK


@final
class Guard:
    """The core's protections for a killer that signals pids it found itself.

    A unit's killer (``oomkit_kill``'s ``guard`` argument) asks before each signal: the
    members it lists in ``cgroup.procs``, a process forked into the unit since the ranking.
    One check is three small reads of ``/proc``; ``gone`` (and, with ``start_ticks``, a pid
    reused since) must not be signalled either.
    """

    __slots__ = ("_safety", "_protected")

    def __init__(self, safety: Safety, protected: Mapping[int, str]) -> None:
        self._safety = safety
        self._protected = dict(protected)

    def check(self, pid: int, start_ticks: int | None = None) -> Verdict:
        """``ok`` to signal ``pid`` now, else ``gone`` or ``refused`` with the reason."""
        return self._safety.check(pid, self._protected, start_ticks)

    def __repr__(self) -> str:
        return f"<Guard protected={sorted(self._protected)}>"

