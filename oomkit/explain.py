"""``oomkit explain``: why a decision's victim won and why the next ones lost, in plain words.

Reads decisions from a JSON-lines log (what the ``jsonl`` notifier writes: one
:class:`~oomkit.events.Decision` a line, memory samples between them), so it explains what
the daemon did, not what it would do now.  Every reason comes from the decision record itself: the ranking (tiers,
vetoes, each scorer's raw score), the weights it used and the policy.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from .errors import OomkitError
from .events import Decision, Ranked
from .records import read_log

__all__ = ["ExplainError", "explain", "find_decision", "read_decisions"]

_TIER_WORDS = {"expendable": "the expendable tier", "normal": "the normal tier", "critical": "the critical tier"}
_TIER_RANK = {"expendable": 2, "normal": 1, "critical": 0}


class ExplainError(OomkitError):
    """No such decision, or no readable log; the message says which."""


def read_decisions(path: str | Path) -> Iterator[Decision]:
    """Every decision in a JSON-lines log; memory samples and records of other types are
    skipped, and a line that is no record is a :class:`~oomkit.records.LogError` naming
    the file and line (:func:`oomkit.records.read_log`)."""
    for _, record in read_log(path):
        if isinstance(record, Decision):
            yield record


def find_decision(path: str | Path, decision_id: int | None) -> Decision:
    """Decision ``decision_id`` from the log (None: the last one that ranked anybody)."""
    found: Decision | None = None
    for d in read_decisions(path):
        if decision_id is None:
            if d.ranking:
                found = d
        elif d.id == decision_id:
            found = d  # ids restart with the daemon: the latest one of that id
    if found is None:
        what = "no decision that ranked anyone" if decision_id is None else f"no decision {decision_id}"
        raise ExplainError(f"{path}: {what}")
    return found


def _who(r: Ranked) -> str:
    return f"pid {r.candidate.pid} ({r.candidate.name})"


def _terms(r: Ranked, weights: dict[str, float]) -> str:
    parts = [
        f"{name} {score:.1f}x{weights.get(name, 1.0):g}"
        for name, score in sorted(r.scores.items())
        if score and weights.get(name, 1.0)
    ]
    return " + ".join(parts) or "no scorer gave it anything"


def _why_lost(r: Ranked, top: Ranked, d: Decision, tiebreak: str) -> str:
    if r.vetoes:
        return "protected: " + "; ".join(f"{v.plugin} says {v.reason}" for v in r.vetoes)
    if d.policy != "kernel" and _TIER_RANK[r.tier] < _TIER_RANK[top.tier]:
        because = f" ({r.tier_reason})" if r.tier_reason else ""
        if r.tier == "critical":
            return f"in the critical tier{because}: chosen only when nobody else is left"
        return f"in {_TIER_WORDS[r.tier]}, after {_TIER_WORDS[top.tier]} of the victim ({top.tier_reason})"
    weights = d.weights
    if r.score < top.score:
        diffs = {
            name: (top.scores.get(name, 0.0) - r.scores.get(name, 0.0)) * weights.get(name, 1.0)
            for name in set(top.scores) | set(r.scores)
        }
        name = max(diffs, key=lambda n: diffs[n])
        mine, theirs = r.scores.get(name, 0.0), top.scores.get(name, 0.0)
        return (
            f"scored {r.score:.1f} against {top.score:.1f}, mostly on {name}"
            f" ({mine:.1f} against {theirs:.1f}, weight {weights.get(name, 1.0):g})"
        )
    mine, theirs = r.scores.get(tiebreak, 0.0), top.scores.get(tiebreak, 0.0)
    if tiebreak and mine != theirs:
        return f"tied at {r.score:.1f}; the tiebreak {tiebreak} gave it {mine:.1f} against {theirs:.1f}"
    return f"tied at {r.score:.1f}; the larger or older process went first"


def explain(d: Decision, *, next_n: int = 5) -> str:
    """The decision in plain words: what happened, why the victim won, why the next lost."""
    ev = d.event
    tiebreak = d.tiebreak
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(d.wall_time))
    lines = [f"decision {d.id} at {when}: {ev.kind} in {ev.scope} (source {ev.source}), outcome {d.outcome}"
             + (f": {d.detail}" if d.detail else "")]
    if not d.ranking:
        lines.append("nobody could be killed: no candidates were offered")
        return "\n".join(lines)
    lines.append(f"policy {d.policy}: " + (
        f"the tiebreak scorer ({tiebreak}) alone ranks, as the kernel does" if d.policy == "kernel"
        else "the expendable tier first, then the weighted score, the critical tier last"
    ))
    top = d.ranking[0]
    if d.victim is None:
        lines.append(f"no victim: every one of the {len(d.ranking)} candidates was protected")
        shown: Sequence[Ranked] = d.ranking[: next_n + 1]
        for i, r in enumerate(shown, 1):
            lines.append(f"  {i}. {_who(r)}: " + "; ".join(f"{v.plugin} says {v.reason}" for v in r.vetoes))
        return "\n".join(lines)
    tier = f"in {_TIER_WORDS[top.tier]}" + (f" ({top.tier_reason})" if top.tier_reason else "")
    lines.append(f"victim {_who(top)} won: {tier}, score {top.score:.1f} = {_terms(top, d.weights)}")
    if d.group:
        names = ", ".join(f"{c.pid}" for c in d.group)
        lines.append(f"  killed with it in the same decision ({len(d.group)}): pids {names}")
    rest = [r for r in d.ranking[1:] if not any(c.pid == r.candidate.pid for c in d.group)]
    if rest:
        lines.append(f"the next {min(next_n, len(rest))} of {len(d.ranking) - 1 - len(d.group)} lost:")
    for i, r in enumerate(rest[:next_n], 2):
        lines.append(f"  {i}. {_who(r)}: {_why_lost(r, top, d, tiebreak)}")
    return "\n".join(lines)
