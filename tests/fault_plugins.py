"""Plugins that misbehave, one stage of the hook chain each, for the fault-injection suite
(``tests/integration/test_takeover_plugin_faults.py``, ``bench/takeover_faults.py``).

A real ``oomkit serve`` loads them from ``[plugins] load = ["tests.fault_plugins:NAME"]``.
Every class names its ``hook`` and whether the engine must *blame* it (count and log a
plugin error): a result the hookspec tells the engine to ignore (a veto for pids that are
not candidates) or one that passes every check (a killer that claims a kill it never did)
is not blamed, and the test asserts what the engine does then instead.

The garbage is aimed at the small sibling of the memcg's hog: were it accepted, the sibling
would rank first, be made expendable, or be protected wrongly, so a test that sees the hog
killed and the sibling alive knows the garbage was refused.  The sibling is whichever
candidate has the least resident memory.

:class:`PauseInVeto` and :class:`PauseInKill` are no faults of their own: they hold the
decision at one point (in the veto stage, before the core's re-check; or in the kill
stage, after it) until the test has done something to the victim (made it exit, reused its
pid, removed its cgroup) and says go, through two files named by ``OOMKIT_TEST_PAUSE``.

:data:`CASES` are the suite's plugin faults (one real OOM each).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import anyio

from oomkit.events import Candidate, Decision, Event, KillResult
from oomkit.plugins import hookimpl

MAX_PID = 1 << 22


def _sibling(candidates: Sequence[Candidate]) -> Candidate:
    return min(candidates, key=lambda c: (c.rss_bytes, c.pid))


def _scope_pids(event: Event) -> list[int]:
    """The pids in the event's memcg, read as a candidates plugin would."""
    root = Path("/sys/fs/cgroup/memory")
    try:
        return [int(p) for p in (root / event.scope.path.lstrip("/") / "cgroup.procs").read_text().split()]
    except OSError:
        return []


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _start_ticks(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return 0


def _sleeper(event: Event) -> int:
    """The pid of the memcg's ``sleep`` (the sibling), or of any process in it."""
    pids = _scope_pids(event)
    return next((p for p in pids if _comm(p) == "sleep"), pids[0] if pids else 1)


class Fault:
    name: ClassVar[str]
    hook: ClassVar[str]
    blamed: ClassVar[bool] = True
    """The engine must count and log a plugin error for it."""


# --- should_act ----------------------------------------------------------------------------


class ShouldActRaises(Fault):
    name, hook = "fault-should-act-raises", "oomkit_should_act"

    @hookimpl
    def oomkit_should_act(self, event: Event) -> bool | None:
        raise RuntimeError("injected fault in should_act")


class ShouldActGarbage(Fault):
    name, hook = "fault-should-act-garbage", "oomkit_should_act"

    @hookimpl
    def oomkit_should_act(self, event: Event) -> Any:
        return "no"  # a str is not a bool: counts as no opinion, so the OOM is acted on


# --- candidates ----------------------------------------------------------------------------


class CandidatesRaises(Fault):
    name, hook = "fault-candidates-raises", "oomkit_candidates"

    @hookimpl
    def oomkit_candidates(self, event: Event) -> list[Candidate]:
        raise RuntimeError("injected fault in candidates")


class CandidatesNotIterable(Fault):
    name, hook = "fault-candidates-not-iterable", "oomkit_candidates"

    @hookimpl
    def oomkit_candidates(self, event: Event) -> Any:
        return 42


class CandidatesNotCandidates(Fault):
    name, hook = "fault-candidates-not-candidates", "oomkit_candidates"

    @hookimpl
    def oomkit_candidates(self, event: Event) -> Any:
        return [{"pid": _sleeper(event), "rss_bytes": 1 << 40}, "sleep"]


class CandidatesBadFields(Fault):
    """The sibling with a NaN size and an out-of-range adj: refused whole."""

    name, hook = "fault-candidates-bad-fields", "oomkit_candidates"

    @hookimpl
    def oomkit_candidates(self, event: Event) -> Any:
        pid = _sleeper(event)
        return [Candidate(pid=pid, name="sleep", rss_bytes=math.nan, oom_score_adj=5000,  # type: ignore[arg-type]
                          start_ticks=_start_ticks(pid), cgroup=event.scope.path)]


class CandidatesBadOptionalSizes(Fault):
    """Every required field right, and a NaN ``rss_anon_bytes``: a first-party scorer
    (``freed``) would fail on it, and be blamed for this plugin's garbage."""

    name, hook = "fault-candidates-bad-optional-sizes", "oomkit_candidates"

    @hookimpl
    def oomkit_candidates(self, event: Event) -> Any:
        pid = _sleeper(event)
        return [Candidate(pid=pid, name="sleep", rss_bytes=4096, rss_anon_bytes=math.nan,  # type: ignore[arg-type]
                          rss_file_bytes="many", start_ticks=_start_ticks(pid),  # type: ignore[arg-type]
                          cgroup=event.scope.path)]


class CandidatesBadPids(Fault):
    name, hook = "fault-candidates-bad-pids", "oomkit_candidates"

    @hookimpl
    def oomkit_candidates(self, event: Event) -> Any:
        return [Candidate(pid=MAX_PID + 1, name="huge", rss_bytes=1 << 40, start_ticks=1),
                Candidate(pid=-1, name="negative", rss_bytes=1 << 40, start_ticks=1),
                Candidate(pid="1", name="text", rss_bytes=1 << 40, start_ticks=1)]  # type: ignore[arg-type]


class CandidatesEndless(Fault):
    """A generator that never ends: refused once it offered more than Linux has pids."""

    name, hook = "fault-candidates-endless", "oomkit_candidates"

    @hookimpl
    def oomkit_candidates(self, event: Event) -> Iterator[Candidate]:
        pid = _sleeper(event)
        one = Candidate(pid=pid, name="sleep", rss_bytes=1 << 40, start_ticks=_start_ticks(pid))
        while True:
            yield one


class CandidatesPhantom(Fault):
    """A well-formed candidate for a pid no process has (above ``pid_max``), the largest of
    all: it ranks first, and the core's re-check finds it gone.  Passes every check, so it
    is not blamed."""

    name, hook, blamed = "fault-candidates-phantom", "oomkit_candidates", False

    @hookimpl
    def oomkit_candidates(self, event: Event) -> list[Candidate]:
        return [Candidate(pid=MAX_PID, name="phantom", rss_bytes=1 << 40, start_ticks=1, cgroup=event.scope.path)]


# --- score ---------------------------------------------------------------------------------


class _Scorer(Fault):
    hook = "oomkit_score"

    @hookimpl
    def oomkit_score(self, candidates: Sequence[Candidate]) -> Any:
        return self.garbage(candidates, _sibling(candidates).pid)

    def garbage(self, candidates: Sequence[Candidate], sibling: int) -> Any:
        raise NotImplementedError


class ScoreRaises(_Scorer):
    name = "fault-score-raises"

    def garbage(self, candidates: Sequence[Candidate], sibling: int) -> Any:
        raise RuntimeError("injected fault in score")


class ScoreNaN(_Scorer):
    name = "fault-score-nan"

    def garbage(self, candidates: Sequence[Candidate], sibling: int) -> Any:
        return [math.nan if c.pid == sibling else 0.0 for c in candidates]


class ScoreInf(_Scorer):
    name = "fault-score-inf"

    def garbage(self, candidates: Sequence[Candidate], sibling: int) -> Any:
        return {sibling: math.inf}


class ScoreOutOfRange(_Scorer):
    name = "fault-score-out-of-range"

    def garbage(self, candidates: Sequence[Candidate], sibling: int) -> Any:
        return {sibling: 1e300}


class ScoreText(_Scorer):
    name = "fault-score-text"

    def garbage(self, candidates: Sequence[Candidate], sibling: int) -> Any:
        return {sibling: "1e6"}


class ScoreBool(_Scorer):
    name = "fault-score-bool"

    def garbage(self, candidates: Sequence[Candidate], sibling: int) -> Any:
        return {sibling: True}


class ScoreHugeList(_Scorer):
    name = "fault-score-huge-list"

    def garbage(self, candidates: Sequence[Candidate], sibling: int) -> Any:
        return [1e6] * 1_000_000


class ScoreNonCandidate(_Scorer):
    """Scores for a pid that is not a candidate (and for the sibling): refused whole."""

    name = "fault-score-non-candidate"

    def garbage(self, candidates: Sequence[Candidate], sibling: int) -> Any:
        return {sibling: 1e6, MAX_PID: 1e6}


class ScoreNotNumbers(_Scorer):
    name = "fault-score-not-numbers"

    def garbage(self, candidates: Sequence[Candidate], sibling: int) -> Any:
        return "high"


# --- tier and group ------------------------------------------------------------------------


class TierGarbage(Fault):
    """Would make the sibling expendable (killed first), with a reason that is not a str."""

    name, hook = "fault-tier-garbage", "oomkit_tier"

    @hookimpl
    def oomkit_tier(self, candidates: Sequence[Candidate]) -> Any:
        return {_sibling(candidates).pid: ("expendable", 42)}


class GroupGarbage(Fault):
    """Would have the sibling die with the victim, named by a str."""

    name, hook = "fault-group-garbage", "oomkit_group"

    @hookimpl
    def oomkit_group(self, candidates: Sequence[Candidate]) -> Any:
        return [str(_sibling(candidates).pid)]


# --- veto ----------------------------------------------------------------------------------


class VetoRaises(Fault):
    name, hook = "fault-veto-raises", "oomkit_veto"

    @hookimpl
    def oomkit_veto(self, candidates: Sequence[Candidate]) -> Any:
        raise RuntimeError("injected fault in veto")


class VetoNotMapping(Fault):
    name, hook = "fault-veto-not-mapping", "oomkit_veto"

    @hookimpl
    def oomkit_veto(self, candidates: Sequence[Candidate]) -> Any:
        return [c.pid for c in candidates]


class VetoTextKey(Fault):
    name, hook = "fault-veto-text-key", "oomkit_veto"

    @hookimpl
    def oomkit_veto(self, candidates: Sequence[Candidate]) -> Any:
        return {str(_sibling(candidates).pid): "protect"}


class VetoNaNKey(Fault):
    name, hook = "fault-veto-nan-key", "oomkit_veto"

    @hookimpl
    def oomkit_veto(self, candidates: Sequence[Candidate]) -> Any:
        return {math.nan: "protect"}


class VetoNonCandidates(Fault):
    """A million vetoes, none for a candidate: ignored, as the hookspec says, not blamed."""

    name, hook, blamed = "fault-veto-non-candidates", "oomkit_veto", False

    @hookimpl
    def oomkit_veto(self, candidates: Sequence[Candidate]) -> Any:
        mine = {c.pid for c in candidates}
        return {pid: "not a candidate" for pid in range(MAX_PID - 1_000_000, MAX_PID) if pid not in mine}


class _Unprintable:
    def __str__(self) -> str:
        raise RuntimeError("cannot print me")


class VetoUnprintableReason(Fault):
    """Protects the sibling with a reason ``str()`` cannot print: still a veto (the sibling
    lives), and the odd reason is reported as an error."""

    name, hook = "fault-veto-unprintable-reason", "oomkit_veto"

    @hookimpl
    def oomkit_veto(self, candidates: Sequence[Candidate]) -> Any:
        return {_sibling(candidates).pid: _Unprintable()}


# --- rescue --------------------------------------------------------------------------------


class _Rescuer(Fault):
    hook = "oomkit_rescue"

    @hookimpl
    async def oomkit_rescue(self, event: Event, victim: Candidate) -> Any:
        await anyio.sleep(0)
        return self.garbage()

    def garbage(self) -> Any:
        raise NotImplementedError


class RescueRaises(_Rescuer):
    name = "fault-rescue-raises"

    def garbage(self) -> Any:
        raise RuntimeError("injected fault in rescue")


class RescueBadWord(_Rescuer):
    name = "fault-rescue-bad-word"

    def garbage(self) -> Any:
        return "cleared"


class RescueNaN(_Rescuer):
    name = "fault-rescue-nan"

    def garbage(self) -> Any:
        return ("freed", math.nan)


class RescueHugeTuple(_Rescuer):
    name = "fault-rescue-huge-tuple"

    def garbage(self) -> Any:
        return ("freed", *range(100_000))


class RescueLies(_Rescuer):
    """Claims a GiB freed and frees nothing: recorded, and the re-check still finds the OOM,
    so the kill goes ahead.  A valid result: not blamed."""

    name, blamed = "fault-rescue-lies", False

    def garbage(self) -> Any:
        return ("freed", 1 << 30, "freed a GiB (not really)")


# --- kill ----------------------------------------------------------------------------------


class _Killer(Fault):
    hook = "oomkit_kill"

    @hookimpl
    async def oomkit_kill(self, event: Event, victim: Candidate) -> Any:
        await anyio.sleep(0)
        return self.garbage(victim)

    def garbage(self, victim: Candidate) -> Any:
        raise NotImplementedError


class KillRaises(_Killer):
    name = "fault-kill-raises"

    def garbage(self, victim: Candidate) -> Any:
        raise RuntimeError("injected fault in kill")


class KillNotResult(_Killer):
    name = "fault-kill-not-result"

    def garbage(self, victim: Candidate) -> Any:
        return "killed"


class KillBadOutcome(_Killer):
    name = "fault-kill-bad-outcome"

    def garbage(self, victim: Candidate) -> Any:
        return KillResult(action="fault", outcome="rescued")


class KillBadPids(_Killer):
    name = "fault-kill-bad-pids"

    def garbage(self, victim: Candidate) -> Any:
        return KillResult(action="fault", outcome="killed", pids=(-1, "x"))  # type: ignore[arg-type]


class KillNaNTime(_Killer):
    name = "fault-kill-nan-time"

    def garbage(self, victim: Candidate) -> Any:
        return KillResult(action="fault", outcome="killed", sent_ns=math.nan)  # type: ignore[arg-type]


class KillLies(_Killer):
    """Claims the kill and sends no signal: a valid result, so the engine believes it; only
    the watchdog's deadline frees the memcg (the kernel kills).  Not blamed."""

    name, blamed = "fault-kill-lies", False

    def garbage(self, victim: Candidate) -> Any:
        return KillResult(action="fault", outcome="killed", detail="killed (not really)", pids=(victim.pid,))


# --- notify --------------------------------------------------------------------------------


class NotifyRaises(Fault):
    name, hook = "fault-notify-raises", "oomkit_notify"

    @hookimpl
    async def oomkit_notify(self, decision: Decision) -> None:
        raise RuntimeError("injected fault in notify")


class NotifyGarbage(Fault):
    """Returns something from a hook whose result is unused: ignored, not blamed."""

    name, hook, blamed = "fault-notify-garbage", "oomkit_notify", False

    @hookimpl
    async def oomkit_notify(self, decision: Decision) -> Any:
        return {"nan": math.nan}


# --- holding a decision for the test -------------------------------------------------------


def _pause_files() -> tuple[Path, Path]:
    base = Path(os.environ["OOMKIT_TEST_PAUSE"])
    return base.with_suffix(".reached"), base.with_suffix(".go")


def _reached(candidates: Sequence[Candidate]) -> Path:
    reached, go = _pause_files()
    victim = max(candidates, key=lambda c: (c.rss_bytes, -c.pid))
    tmp = reached.with_suffix(".tmp")
    tmp.write_text(f"{victim.pid} {victim.start_ticks}\n")
    tmp.rename(reached)
    return go


class PauseInVeto:
    """Blocks the veto stage (the event loop with it) until the test says go; vetoes nothing."""

    name = "pause-in-veto"

    @hookimpl
    def oomkit_veto(self, candidates: Sequence[Candidate]) -> dict[int, str]:
        go = _reached(candidates)
        deadline = time.monotonic() + 120
        while not go.exists() and time.monotonic() < deadline:
            time.sleep(0.005)
        return {}


class PauseInKill:
    """Holds the kill stage (after the core's re-check, before the built-in killer's signal)
    until the test says go, then declines, so the next killer meets the victim as it is then."""

    name = "pause-in-kill"

    @hookimpl
    async def oomkit_kill(self, event: Event, victim: Candidate) -> KillResult | None:
        go = _reached([victim])
        with anyio.move_on_after(120):
            while not go.exists():
                await anyio.sleep(0.005)
        return None


# --- the suite's cases ---------------------------------------------------------------------

Ends = Literal["ours", "handed-back", "deadline"]


@dataclass(frozen=True)
class Case:
    """One fault of the suite: these plugins loaded together, and how the OOM must end."""

    plugins: tuple[type[Fault], ...]
    ends: Ends
    """``ours``: oomkit kills the hog; ``handed-back``: nobody may be killed, the engine hands
    the OOM to the kernel at once; ``deadline``: the watchdog does, at the deadline (a test
    gives the others a deadline no loaded machine reaches first)."""


CASES: dict[str, Case] = {
    "should_act": Case((ShouldActRaises, ShouldActGarbage), "ours"),
    "candidates-raises": Case((CandidatesRaises,), "ours"),
    "candidates-garbage": Case(
        (CandidatesNotIterable, CandidatesNotCandidates, CandidatesBadFields,
         CandidatesBadOptionalSizes, CandidatesBadPids, CandidatesEndless),
        "ours",
    ),
    "score-raises": Case((ScoreRaises,), "ours"),
    "score-garbage": Case(
        (ScoreNaN, ScoreInf, ScoreOutOfRange, ScoreText, ScoreBool, ScoreHugeList,
         ScoreNonCandidate, ScoreNotNumbers),
        "ours",
    ),
    "tier-and-group-garbage": Case((TierGarbage, GroupGarbage), "ours"),
    "veto-raises": Case((VetoRaises,), "handed-back"),
    "veto-malformed": Case((VetoNotMapping, VetoTextKey, VetoNaNKey), "handed-back"),
    "veto-odd-but-usable": Case((VetoNonCandidates, VetoUnprintableReason), "ours"),
    "rescue-raises": Case((RescueRaises,), "ours"),
    "rescue-garbage": Case((RescueBadWord, RescueNaN, RescueHugeTuple, RescueLies), "ours"),
    "kill-raises": Case((KillRaises,), "ours"),
    "kill-garbage": Case((KillNotResult, KillBadOutcome, KillBadPids, KillNaNTime), "ours"),
    "kill-lies": Case((KillLies,), "deadline"),
    "notify": Case((NotifyRaises, NotifyGarbage), "ours"),
    # Gone at the re-check while the OOM holds: the next candidate (the hog) is the victim.
    "candidates-phantom": Case((CandidatesPhantom,), "ours"),
}
