"""What plugins return, checked before the engine uses any of it.

Every hook result is untrusted: a plugin is third-party code, and one malformed value must
cost that plugin its say in one decision, never the engine.  Each ``check_*`` function below
takes what one implementation returned and gives back a clean value, or raises
:class:`BadResult` with a one-line reason.  The hook caller (:mod:`oomkit.hookcall`) calls
them inside the same isolation as the implementation itself, so a bad result *counts as
raising*: the hookspecs say, hook by hook, what raising means.

The bounds below are part of the hook contract (``oomkit/hookspecs.py``) and are printed in
the hook reference.
"""

from __future__ import annotations

import itertools
import math
import numbers
from collections.abc import Callable, Iterable, Mapping, Sequence, Set
from typing import Any, get_args

from .errors import OomkitError
from .events import Candidate, KillResult, Member, Outcome, RescueResult
from .sources.base import Source
from .urgency import checkpointed

__all__ = [
    "MAX_CANDIDATES",
    "MAX_FREED",
    "MAX_MEMBERS",
    "MAX_PID",
    "MAX_SCORE",
    "MAX_SCORE_TEXT",
    "MAX_TEXT",
    "BadResult",
    "Note",
    "check_candidates",
    "check_group",
    "check_kill",
    "check_rescue",
    "check_scores",
    "check_should_act",
    "check_sources",
    "check_tiers",
    "check_vetoes",
]

MAX_PID = 1 << 22
"""Linux's ``PID_MAX_LIMIT`` on 64-bit machines: no pid is larger, whatever ``pid_max`` says."""

MAX_CANDIDATES = MAX_PID
"""At most this many candidates from one implementation per decision: more than the kernel
can have processes, so a plugin offering more is broken (an endless generator, say)."""

MAX_SCORE = 1e9
"""Every score must lie in ``[-MAX_SCORE, MAX_SCORE]``: a million times the scale's "holds
all the memory" (1000), so any real preference fits, while with weights of at most 1000
(``[weights]``, checked again by the engine) each weighted term stays within 1e12 and any
sum of them finite."""
MAX_SCORE_TEXT = "1e9"  # how messages and the hook reference spell it
assert float(MAX_SCORE_TEXT) == MAX_SCORE

MAX_MEMBERS = 65536
"""At most this many members in one unit: a cgroup with more processes than this is not
offered whole (its candidates plugin says so), so one decision's memory stays bounded."""

_UNITS = frozenset({"cgroup", "process-group"})

MAX_TEXT = 240
"""Veto reasons and a killer's ``detail`` are cut to this many characters: they are kept in
every recorded decision and written to every notifier."""

KILL_OUTCOMES = frozenset({"killed", "exited", "failed"})
"""What a killer may report; the other :data:`~oomkit.events.Outcome`\\ s are the engine's."""

_OUTCOMES = frozenset(get_args(Outcome))
assert KILL_OUTCOMES <= _OUTCOMES

Note = Callable[[str], None]
"""Reports a problem in a result that is used anyway (a veto's non-text reason)."""


class BadResult(OomkitError, ValueError):
    """A hook result the engine cannot use; the message says what is wrong, in one line.

    The caller catches it (the result counts as raising); it escapes only from
    :meth:`oomkit.Engine.rank` given malformed candidates by its own caller.
    """


def _kind(value: object) -> str:
    return type(value).__name__


def _clip(text: str, limit: int = MAX_TEXT) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _show(value: object) -> str:
    try:
        return _clip(repr(value), 60)
    except Exception:
        return f"<{_kind(value)}>"


# --- should_act ---------------------------------------------------------------------------


def check_should_act(result: object) -> bool:
    # `type(...) is bool`: bool cannot be subclassed, and an int or a numpy bool is a bug
    # the plugin author wants to hear about, not a truth value to guess at.
    if type(result) is not bool:
        raise BadResult(f"returned a {_kind(result)}, not True, False or None")
    return result


# --- candidates ---------------------------------------------------------------------------

def _candidate_problem(c: Candidate) -> str | None:
    # Unrolled, and `type(x) is int` rather than isinstance: this runs once per candidate,
    # ten thousand times for a full system ranking (bench: `selection`).
    pid = c.pid
    if type(pid) is not int or not 0 < pid <= MAX_PID:
        return f"pid {_show(pid)} is not a pid (an int in 1..{MAX_PID})"
    ppid, uid, rss, swap, pgt, start = c.ppid, c.uid, c.rss_bytes, c.swap_bytes, c.pgtables_bytes, c.start_ticks
    if not (
        type(ppid) is int and type(uid) is int and type(rss) is int and type(swap) is int
        and type(pgt) is int and type(start) is int and min(ppid, uid, rss, swap, pgt, start) >= 0
    ):
        for name in ("ppid", "uid", "rss_bytes", "swap_bytes", "pgtables_bytes", "start_ticks"):
            value = getattr(c, name)
            if type(value) is not int or value < 0:
                return f"{name} {_show(value)} is not a non-negative int"
    # Optional, but a scorer reads them (``freed``): a NaN here would fail that scorer, and
    # blame it for this plugin's garbage.
    anon, file, shmem = c.rss_anon_bytes, c.rss_file_bytes, c.rss_shmem_bytes
    if not (
        (anon is None or (type(anon) is int and anon >= 0))
        and (file is None or (type(file) is int and file >= 0))
        and (shmem is None or (type(shmem) is int and shmem >= 0))
    ):
        for name in ("rss_anon_bytes", "rss_file_bytes", "rss_shmem_bytes"):
            value = getattr(c, name)
            if value is not None and (type(value) is not int or value < 0):
                return f"{name} {_show(value)} is not None or a non-negative int"
    adj = c.oom_score_adj
    if type(adj) is not int or not -1000 <= adj <= 1000:
        return f"oom_score_adj {_show(adj)} is not an int in -1000..1000"
    if type(c.name) is not str or type(c.cgroup) is not str:
        return "name and cgroup must be str"
    if type(c.kthread) is not bool:
        return f"kthread {_show(c.kthread)} is not a bool"
    argv = c.cmdline
    if argv is not None and (type(argv) is not tuple or not all(type(a) is str for a in argv)):
        return "cmdline must be None or a tuple of str"
    if c.unit != "process" or c.members or c.pgid or c.descend:
        return _unit_problem(c)
    return None


def _unit_problem(c: Candidate) -> str | None:
    if type(c.pgid) is not int or not 0 <= c.pgid <= MAX_PID:
        return f"pgid {_show(c.pgid)} is not 0 or a pid"
    if type(c.descend) is not bool or (c.descend and c.unit != "cgroup"):
        return "descend must be a bool, and true only for a cgroup unit"
    if c.unit == "process":
        return "a process has no members (set unit to 'cgroup' or 'process-group')" if c.members else None
    if c.unit not in _UNITS:
        return f"unit {_show(c.unit)} is not one of {', '.join(sorted(_UNITS))}"
    members = c.members
    if type(members) is not tuple or not 0 < len(members) <= MAX_MEMBERS:
        return f"a {c.unit} unit needs a tuple of 1..{MAX_MEMBERS} members"
    seen: set[int] = set()
    for m in members:
        if not isinstance(m, Member):
            return f"member {_show(m)} is a {_kind(m)}, not a Member"
        pid = m.pid
        if type(pid) is not int or not 0 < pid <= MAX_PID or pid in seen:
            return f"member pid {_show(pid)} is not a pid, or is listed twice"
        seen.add(pid)
        if type(m.start_ticks) is not int or type(m.rss_bytes) is not int or min(m.start_ticks, m.rss_bytes) < 0:
            return f"member {pid}: start_ticks and rss_bytes must be non-negative ints"
        if type(m.oom_score_adj) is not int or not -1000 <= m.oom_score_adj <= 1000:
            return f"member {pid}: oom_score_adj {_show(m.oom_score_adj)} is not an int in -1000..1000"
        if type(m.kthread) is not bool or type(m.name) is not str:
            return f"member {pid}: kthread must be a bool and name a str"
    if c.pid not in seen:
        return f"the unit's key pid {c.pid} is not one of its members"
    return None


def check_candidates(result: object) -> list[Candidate]:
    """Every item a :class:`Candidate` with fields of the declared types and ranges.

    An iterator is consumed here, inside the caller's isolation, so one that raises midway
    counts as the implementation raising: nobody it offered before is kept either.
    """
    if isinstance(result, (str, bytes, Mapping)) or not isinstance(result, Iterable):
        raise BadResult(f"returned a {_kind(result)}, not an iterable of Candidates")
    out = list(itertools.islice(result, MAX_CANDIDATES + 1))
    if len(out) > MAX_CANDIDATES:
        raise BadResult(f"offered more than {MAX_CANDIDATES} candidates, more than Linux has pids")
    known = _validated[0]
    passed: dict[int, Candidate] = {}
    for i, c in enumerate(checkpointed(out)):
        key = id(c)
        hit = known.get(key)
        if hit is not None and hit is c:
            passed[key] = hit  # checked before, and frozen since
            continue
        if not isinstance(c, Candidate):
            raise BadResult(f"item {i} is a {_kind(c)}, not a Candidate")
        problem = _candidate_problem(c)
        if problem is not None:
            raise BadResult(f"candidate {i} ({_show(c.name)}): {problem}")
        passed[key] = c
    _validated[0] = passed
    return out


# The candidates the last check passed, by id, each held so its id cannot go to another
# object: a candidates plugin that keeps its processes between rankings (the first-party one
# does) offers the same frozen objects again, and checking ten thousand of them was a tenth
# of a warm ranking.  Two scopes ranked in two threads replace it in turn: only a miss.
# (msgspec.structs.force_setattr could change one after its check; so could any code in
# the process: plugins are trusted not to do that, not to return well-formed values.)
_validated: list[dict[int, Candidate]] = [{}]


# --- score --------------------------------------------------------------------------------


def _as_float(value: object, pid: object) -> float:
    if type(value) is float:
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise BadResult(f"score for pid {pid} is a {_kind(value)}, not a number")
    try:
        return float(value)
    except (OverflowError, ValueError, TypeError):
        raise BadResult(f"score for pid {pid} ({_show(value)}) does not fit a float") from None


def _floats(raw: list[Any]) -> list[float] | None:
    try:
        return list(map(float, raw))
    except OverflowError:
        return None


def check_scores(result: object, candidates: Sequence[Candidate]) -> list[float]:
    """One finite float in ``[-MAX_SCORE, MAX_SCORE]`` per candidate, in candidate order.

    A mapping must be keyed by the candidates' pids (others score 0); anything else iterable
    (a list, a tuple, an array) must hold exactly one number per candidate.
    """
    n = len(candidates)
    if isinstance(result, Mapping):
        if len(result) > n:
            raise BadResult(f"returned {len(result)} scores for {n} candidates")
        index = {c.pid: i for i, c in enumerate(candidates)}
        values = [0.0] * n
        for pid, value in result.items():
            i = index.get(pid) if type(pid) is int else None
            if i is None:
                raise BadResult(f"key {_show(pid)} is not the pid of a candidate")
            values[i] = _as_float(value, pid)
    elif isinstance(result, (str, bytes, Set)) or not isinstance(result, Iterable):
        raise BadResult(f"returned a {_kind(result)}, not a sequence or mapping of scores")
    else:
        raw = list(itertools.islice(result, n + 1))
        if len(raw) != n:
            got = f"{n + 1} or more" if len(raw) > n else str(len(raw))
            raise BadResult(f"returned {got} scores for {n} candidates")
        # The common cases (floats, ints) in C; item by item only for anything else, or an
        # int too large for a float.
        kinds = set(map(type, raw))
        fast = raw if kinds <= {float} else _floats(raw) if kinds <= {float, int} else None
        values = fast if fast is not None else [_as_float(v, candidates[i].pid) for i, v in enumerate(raw)]
    # One pass in C for the common case: a finite sum means no nan and no inf, and without
    # a nan, min and max are well defined.  (A sum of huge finite values may overflow; the
    # bounds below catch those.)
    if not math.isfinite(sum(values)):
        bad = next((i for i, v in enumerate(values) if not math.isfinite(v)), None)
        if bad is not None:
            raise BadResult(f"score for pid {candidates[bad].pid} is {values[bad]}: every score must be finite")
    if values and (min(values) < -MAX_SCORE or max(values) > MAX_SCORE):
        i = next(i for i, v in enumerate(values) if abs(v) > MAX_SCORE)
        raise BadResult(f"score for pid {candidates[i].pid} is {values[i]:g}, outside ±{MAX_SCORE_TEXT}")
    return values


# --- veto ---------------------------------------------------------------------------------


def _reason(value: object) -> str:
    try:
        return _clip(str(value))
    except Exception:
        return f"<a {_kind(value)} that str() cannot print>"


def check_vetoes(result: object, candidates: Sequence[Candidate], note: Note) -> dict[int, str]:
    """The vetoes that concern ``candidates``: pid to a reason of at most ``MAX_TEXT`` chars.

    Keys must be pids (ints); a pid that is not a candidate is left out (a veto may name
    processes of other scopes).  A reason that is not a ``str`` still protects its pid, shown
    as its ``str()``, and is reported through ``note``.
    """
    if not isinstance(result, Mapping):
        raise BadResult(f"returned a {_kind(result)}, not a mapping of pid to reason")
    if len(result) > MAX_CANDIDATES:
        raise BadResult(f"returned {len(result)} vetoes, more than Linux has pids")
    wanted = {c.pid for c in candidates}
    out: dict[int, str] = {}
    odd: list[int] = []
    for pid, reason in result.items():
        if type(pid) is not int:
            # Whom did it mean?  It cannot be told, so it cannot be honoured for one pid.
            raise BadResult(f"key {_show(pid)} is a {_kind(pid)}, not a pid")
        if pid not in wanted:
            continue
        if type(reason) is str:
            out[pid] = _clip(reason)
        else:
            odd.append(pid)
            out[pid] = _reason(reason)
    if odd:
        more = f" (and {len(odd) - 1} more)" if len(odd) > 1 else ""
        note(f"reason for pid {odd[0]}{more} is a {_kind(result[odd[0]])}, not a str; vetoed anyway")
    return out


# --- tiers and groups ---------------------------------------------------------------------

TIERS = frozenset({"expendable", "critical"})


def check_tiers(result: object, candidates: Sequence[Candidate]) -> dict[int, tuple[str, str]]:
    """pid to ``(tier, reason)`` for the pids of ``candidates``; a bare tier has no reason."""
    if not isinstance(result, Mapping):
        raise BadResult(f"returned a {_kind(result)}, not a mapping of pid to (tier, reason)")
    wanted = {c.pid for c in candidates}
    out: dict[int, tuple[str, str]] = {}
    for pid, entry in result.items():
        # The common shape first: one test per item for ten thousand of them.
        if type(entry) is tuple and len(entry) == 2 and type(pid) is int and entry[0] in TIERS \
                and type(entry[1]) is str and len(entry[1]) <= MAX_TEXT:
            if pid in wanted:
                out[pid] = entry
            continue
        if type(pid) is not int:
            raise BadResult(f"key {_show(pid)} is a {_kind(pid)}, not a pid")
        tier, reason = (entry, "") if isinstance(entry, str) else (entry if isinstance(entry, tuple) else (entry, ""))
        if isinstance(entry, tuple) and len(entry) != 2:
            raise BadResult(f"pid {pid}: {_show(entry)} is not a (tier, reason) pair")
        if tier not in TIERS:
            raise BadResult(f"pid {pid}: tier {_show(tier)} is not 'expendable' or 'critical'")
        if type(reason) is not str:
            raise BadResult(f"pid {pid}: reason {_show(reason)} is a {_kind(reason)}, not a str")
        if pid in wanted:
            out[pid] = (str(tier), _clip(reason))
    return out


def check_group(result: object) -> list[int]:
    """A sequence of pids (ints), at most as many as Linux has."""
    if isinstance(result, (str, bytes, Mapping)) or not isinstance(result, Iterable):
        raise BadResult(f"returned a {_kind(result)}, not a sequence of pids")
    out = list(result)
    if len(out) > MAX_CANDIDATES:
        raise BadResult(f"named {len(out)} pids, more than Linux has")
    for pid in out:
        if type(pid) is not int:
            raise BadResult(f"{_show(pid)} is a {_kind(pid)}, not a pid")
    return out


# --- kill ---------------------------------------------------------------------------------


def check_kill(result: object) -> KillResult:
    """A :class:`KillResult` whose outcome is one a killer may report; texts are clipped."""
    if not isinstance(result, KillResult):
        raise BadResult(f"returned a {_kind(result)}, not a KillResult")
    if not isinstance(result.outcome, str) or result.outcome not in KILL_OUTCOMES:
        raise BadResult(f"outcome {_show(result.outcome)} is not one of {', '.join(sorted(KILL_OUTCOMES))}")
    if type(result.action) is not str or type(result.detail) is not str:
        raise BadResult("action and detail must be str")
    signals = result.signals
    if type(signals) is not tuple or not all(type(s) is str for s in signals) or len(signals) > 16:
        raise BadResult("signals must be a tuple of at most 16 str")
    for name in ("sent_ns", "dead_ns"):
        value = getattr(result, name)
        if type(value) is not int or value < 0:
            raise BadResult(f"{name} {_show(value)} is not a non-negative int")
    if type(result.memory_released) is not bool:
        raise BadResult("memory_released must be a bool")
    for name in ("pids", "spared"):
        pids = getattr(result, name)
        if type(pids) is not tuple or len(pids) > MAX_CANDIDATES or not all(
            type(p) is int and 0 < p <= MAX_PID for p in pids
        ):
            raise BadResult(f"{name} must be a tuple of pids")
    if len(result.action) > MAX_TEXT or len(result.detail) > MAX_TEXT:
        # msgspec.structs.replace would do, but the killer's own struct must stay its own.
        return KillResult(
            action=_clip(result.action), outcome=result.outcome, detail=_clip(result.detail),
            signals=signals, sent_ns=result.sent_ns, dead_ns=result.dead_ns,
            memory_released=result.memory_released, pids=result.pids, spared=result.spared,
        )
    return result


# --- rescue -------------------------------------------------------------------------------

RESCUE_RESULTS = frozenset(get_args(RescueResult))
MAX_FREED = 1 << 62
"""A rescuer's ``freed_bytes`` must lie in ``0..2**62``: more than any machine's memory."""


def check_rescue(result: object) -> tuple[RescueResult, int, str]:
    """``(result, freed_bytes, detail)`` from a rescuer: a :data:`RescueResult` word alone,
    or a tuple of that word, the bytes freed (an int) and optionally a detail (a str)."""
    parts = result if isinstance(result, tuple) else (result,)
    if not 1 <= len(parts) <= 3:
        raise BadResult(f"returned a tuple of {len(parts)}, not (result, freed_bytes[, detail])")
    word = parts[0]
    if type(word) is not str or word not in RESCUE_RESULTS:
        raise BadResult(f"result {_show(word)} is not one of {', '.join(sorted(RESCUE_RESULTS))}")
    freed = parts[1] if len(parts) > 1 else 0
    if type(freed) is not int or not 0 <= freed <= MAX_FREED:
        raise BadResult(f"freed_bytes {_show(freed)} is not an int in 0..2**62")
    detail = parts[2] if len(parts) > 2 else ""
    if type(detail) is not str:
        raise BadResult(f"detail {_show(detail)} is a {_kind(detail)}, not a str")
    return word, freed, _clip(detail)  # type: ignore[return-value]


# --- sources ------------------------------------------------------------------------------


def check_sources(result: object) -> list[Source]:
    """Every item a :class:`~oomkit.Source` instance."""
    if isinstance(result, (str, bytes, Mapping)) or not isinstance(result, Iterable):
        raise BadResult(f"returned a {_kind(result)}, not a sequence of Sources")
    out = list(result)
    for i, src in enumerate(out):
        if not isinstance(src, Source):
            raise BadResult(f"item {i} is a {_kind(src)}, not a Source")
    return out
