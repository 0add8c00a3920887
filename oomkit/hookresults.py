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
from .events import Candidate, KillResult, Outcome
from .sources.base import Source

__all__ = [
    "MAX_CANDIDATES",
    "MAX_PID",
    "MAX_SCORE",
    "MAX_SCORE_TEXT",
    "MAX_TEXT",
    "BadResult",
    "Note",
    "check_candidates",
    "check_kill",
    "check_scores",
    "check_should_act",
    "check_sources",
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
    for i, c in enumerate(out):
        if not isinstance(c, Candidate):
            raise BadResult(f"item {i} is a {_kind(c)}, not a Candidate")
        problem = _candidate_problem(c)
        if problem is not None:
            raise BadResult(f"candidate {i} ({_show(c.name)}): {problem}")
    return out


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
    if len(result.action) > MAX_TEXT or len(result.detail) > MAX_TEXT:
        # msgspec.structs.replace would do, but the killer's own struct must stay its own.
        return KillResult(
            action=_clip(result.action), outcome=result.outcome, detail=_clip(result.detail),
            signals=signals, sent_ns=result.sent_ns, dead_ns=result.dead_ns,
            memory_released=result.memory_released,
        )
    return result


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
