"""``preference``: what the operator and the processes themselves declared (principle 3).

Two things, kept apart because "never while another candidate exists" cannot be a weight:

* a **score**, ``oom_score_adj`` itself on the shared scale (adj 300 scores 300): the
  kernel's own "kill me sooner or later" knob, read as a declared preference rather than an
  amount of memory;
* a **tier** per candidate (the ``oomkit_tier`` hook): ``expendable`` (self-declared with
  ``oom_score_adj > 0`` when ``adj_expendable``, or operator-declared by the ``expendable``
  patterns) is chosen before anyone else; ``critical`` (the ``critical`` patterns) only when
  nobody else is left.  Expendable wins when a candidate matches both (the operator named it
  explicitly, or the process asked for it).

Patterns are regular expressions, compiled once when the config is read (a bad one is a
one-line error naming its key): ``names`` must match the whole ``comm`` (15 characters at
most), ``cmdlines`` are searched in the arguments joined by spaces, ``cgroups`` in the
candidate's cgroup path; ``uids`` are numbers.  Command lines are read only when some
``cmdlines`` pattern is set, in a thread, waited for at most ``cmdline_timeout_s`` per
decision (reading one takes the target's mmap lock); a command line not read in time
matches nothing.

A unit (a cgroup or process group ranked whole, :mod:`oomkit_plugins.units`) is matched
as itself (its name, the cgroup's last component; its cgroup; its key process's uid and
command line) and through its members' names, because killing it kills them all: it is
``critical`` when any member is named critical, ``expendable`` only when every member is
(named expendable, or ``oom_score_adj > 0`` with ``adj_expendable``).  Its score is its
adj, the members' adj weighted by their resident memory.

The default ``critical`` names are the processes whose death costs more than any memory it
frees: init systems and the session and bus daemons a machine cannot be repaired without
(``systemd``, ``init``, ``runit``, ``s6-svscan``, ``systemd-journal``, ``systemd-logind``,
``dbus-daemon``, ``dbus-broker``), remote access (``sshd``), container runtimes that take
every container down with them (``containerd``, ``dockerd``, ``kubelet``), and databases,
whose death aborts every client's work and whose restart replays a log (``postgres``,
``mysqld``, ``mariadbd``, ``mongod``, ``redis-server``).  Setting ``critical.names``
replaces the list.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Annotated, Literal

import msgspec

from oomkit import Candidate, Config, Event, hookimpl
from oomkit.cmdline import CmdlineReader
from oomkit.urgency import LOOP_WAIT_MAX_S, checkpointed

from ._settings import Settings

__all__ = ["DEFAULT_CRITICAL", "Patterns", "Preference", "PreferenceSettings"]

DEFAULT_CRITICAL = (
    "systemd", "init", "runit", "s6-svscan", "systemd-journal", "systemd-logind", "dbus-daemon", "dbus-broker",
    "sshd", "containerd", "dockerd", "kubelet",
    "postgres", "mysqld", "mariadbd", "mongod", "redis-server",
)

Uid = Annotated[int, msgspec.Meta(ge=0, le=(1 << 32) - 1)]


class Patterns(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Who a tier takes: any pattern matching puts a candidate in it."""

    names: tuple[str, ...] = ()
    """Regular expressions the whole process name (``comm``) must match."""
    cmdlines: tuple[str, ...] = ()
    """Regular expressions searched in the command line (arguments joined by spaces)."""
    cgroups: tuple[str, ...] = ()
    """Regular expressions searched in the candidate's cgroup path."""
    uids: tuple[Uid, ...] = ()
    """Real user ids."""


class PreferenceSettings(Settings, frozen=True):
    """``[plugins.preference]``."""

    adj_expendable: bool = True
    """A candidate with ``oom_score_adj > 0`` declared itself expendable."""
    expendable: Patterns = Patterns()
    """Operator-declared expendable: chosen before anyone else."""
    critical: Patterns = Patterns(names=DEFAULT_CRITICAL)
    """Operator-declared critical: chosen only when nobody else is left."""
    cmdline_timeout_s: Annotated[float, msgspec.Meta(ge=0.001, le=60.0)] = 0.05
    """How long one decision waits for the command lines it has not read before."""

    def __post_init__(self) -> None:
        for tier in ("expendable", "critical"):
            patterns: Patterns = getattr(self, tier)
            for key in ("names", "cmdlines", "cgroups"):
                for i, text in enumerate(getattr(patterns, key)):
                    try:
                        re.compile(text)
                    except re.error as exc:
                        raise ValueError(f"`{tier}.{key}[{i}]` is not a regular expression: {exc}") from None


class _Compiled:
    __slots__ = ("names", "any_name", "cmdlines", "cgroups", "uids")

    def __init__(self, p: Patterns) -> None:
        self.names = tuple(re.compile(x) for x in p.names)
        # One pass per candidate over all the names (the default list has 17); the single
        # patterns only say which one matched, for the reason.
        self.any_name = re.compile("|".join(f"(?:{x})" for x in p.names)) if p.names else None
        self.cmdlines = tuple(re.compile(x) for x in p.cmdlines)
        self.cgroups = tuple(re.compile(x) for x in p.cgroups)
        self.uids = frozenset(p.uids)

    def name(self, name: str) -> str | None:
        if self.any_name is not None and self.any_name.fullmatch(name):
            for rx in self.names:
                if rx.fullmatch(name):
                    return rx.pattern
        return None

    def match(self, c: Candidate, argv: tuple[str, ...] | None) -> str | None:
        if self.any_name is not None and self.any_name.fullmatch(c.name):
            for rx in self.names:
                if rx.fullmatch(c.name):
                    return f"name {c.name!r} matches {rx.pattern!r}"
        if c.uid in self.uids:
            return f"uid {c.uid}"
        for rx in self.cgroups:
            if rx.search(c.cgroup):
                return f"cgroup {c.cgroup!r} matches {rx.pattern!r}"
        if argv:
            joined = " ".join(argv)
            for rx in self.cmdlines:
                if rx.search(joined):
                    return f"command line matches {rx.pattern!r}"
        return None


class Preference:
    """Declared preferences: ``oom_score_adj`` as a score, patterns and adj as tiers."""

    name = "preference"
    weight = 0.1
    """Default weight: adj 300 is worth 30 points; the tiers carry the strong preferences."""

    @property
    def loop_safe(self) -> bool:
        """An urgent decision may call the score and tier on the event loop while its only
        wait, for the cmdlines being read, is short."""
        return self.settings.cmdline_timeout_s <= LOOP_WAIT_MAX_S

    def __init__(self) -> None:
        self.settings = PreferenceSettings()
        self._cmdlines = CmdlineReader()
        self._expendable = _Compiled(self.settings.expendable)
        self._critical = _Compiled(self.settings.critical)

    @hookimpl
    def oomkit_configure(self, config: Config) -> None:
        self.settings = config.plugin_settings(self.name, PreferenceSettings)
        self._cmdlines.proc = config.paths.proc
        self._expendable = _Compiled(self.settings.expendable)
        self._critical = _Compiled(self.settings.critical)

    @hookimpl
    def oomkit_score(self, candidates: Sequence[Candidate]) -> list[float]:
        return [float(c.oom_score_adj) for c in candidates]

    @hookimpl
    def oomkit_tier(self, event: Event, candidates: Sequence[Candidate]) -> dict[int, tuple[Literal["expendable", "critical"], str]]:
        argvs: dict[int, tuple[str, ...] | None] = {}
        if self._expendable.cmdlines or self._critical.cmdlines:
            argvs = self._cmdlines.get(candidates, self.settings.cmdline_timeout_s)
        out: dict[int, tuple[Literal["expendable", "critical"], str]] = {}
        by_adj: dict[int, tuple[Literal["expendable", "critical"], str]] = {}  # one text per adj, not per process
        for c in checkpointed(candidates):
            argv = argvs.get(c.pid)
            if c.is_unit:
                if (tier := self._unit_tier(c, argv)) is not None:
                    out[c.pid] = tier
                continue
            if self.settings.adj_expendable and (adj := c.oom_score_adj) > 0:
                if (said := by_adj.get(adj)) is None:
                    said = by_adj[adj] = ("expendable", f"oom_score_adj {adj} > 0 (self-declared)")
                out[c.pid] = said
            elif (why := self._expendable.match(c, argv)) is not None:
                out[c.pid] = ("expendable", f"preference.expendable: {why}")
            elif (why := self._critical.match(c, argv)) is not None:
                out[c.pid] = ("critical", f"preference.critical: {why}")
        return out

    def _unit_tier(self, c: Candidate, argv: tuple[str, ...] | None) -> tuple[Literal["expendable", "critical"], str] | None:
        members = c.members
        if self.settings.adj_expendable and members and all(m.oom_score_adj > 0 for m in members):
            return "expendable", f"every member has oom_score_adj > 0 (self-declared), {len(members)} processes"
        if (why := self._expendable.match(c, argv)) is not None:
            return "expendable", f"preference.expendable: {why}"
        if members and all(self._expendable.name(m.name) is not None for m in members):
            return "expendable", f"preference.expendable: every member's name matches ({len(members)} processes)"
        if (why := self._critical.match(c, argv)) is not None:
            return "critical", f"preference.critical: {why}"
        for m in members:
            if (pattern := self._critical.name(m.name)) is not None:
                return "critical", f"preference.critical: member {m.pid} name {m.name!r} matches {pattern!r}"
        return None
