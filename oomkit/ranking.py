"""A ranking put in order as it is read, each of its rows built when it is first read.

A system-scope decision ranks every process (ten thousand on a build host) but reads only
the top of the order: the victim, the few refused at the re-check before it, the
``[engine] record_ranking`` rows it records.  A :class:`~oomkit.Ranked` per candidate, its
scores a dict, cost more than all of the scoring together (40-70 ms of a 280 ms ranking of
10 000 fake processes, ``python -m bench selection``), and freeing them was most of what the
reaper (:mod:`oomkit.reaper`) had to keep off the event loop.  So :class:`Ranking` keeps the
columns the engine computed, sorts on keys zipped from them, and builds a row when it is read.

Nor is the whole order computed until it is needed: only its first :data:`HEAD` rows at once
(``heapq.nlargest``), the rest when a read goes past them (an index from the end, a slice or
a walk beyond them) or asks for every candidate in order (:attr:`Ranking.candidates`).  The
engine never does: its group and rescue stages hand their hooks :attr:`Ranking.members`, in
the order the candidates were read, and look the group up in :meth:`Ranking.killable`,
unordered too.  Why: ``sorted``
over ten thousand keys ran 4-7 ms in one C call, holding the GIL the whole time; a takeover
decided meanwhile (``python -m bench loop_stall``) waited that long at whichever of
its system calls it was, for the ranking thread to give the GIL back.  ``nlargest`` loops in
Python, which hands the GIL over at every switch interval, and takes 1.4 ms.  The keys are
zipped a slice at a time for the same reason (2 ms in one call, else).
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import final, overload

from .events import Candidate, Ranked, Tier, Veto
from .urgency import checkpoint

__all__ = ["HEAD", "Ranking"]

HEAD = 64
"""Rows put in order as a ranking is built; the rest only when first read.  More than a
decision's walk to its victim reads unless dozens are refused at the re-check, and than
``[engine] record_ranking`` records (20 by default; a larger one reads past it)."""

_ZIP_AT_ONCE = 1024
"""Keys zipped per C call: ~0.2 ms with the GIL held, not the whole ranking's 2 ms."""

TIER_ORDER: dict[str, int] = {"expendable": 2, "normal": 1, "critical": 0}
"""Which tier goes first: the higher, the sooner."""

_NORMAL: tuple[Tier, str] = ("normal", "")


@final
class Ranking(Sequence[Ranked]):
    """The candidates of one ranking in order: killable first, then by tier, then by the
    weighted total; ties go to the tiebreak scorer's raw score, the larger RSS, the lower
    pid, so the order is total and repeatable.

    Indexing and iterating build each :class:`~oomkit.Ranked` when it is first read, and
    give that same object on every later read, until :meth:`refuse` vetoes its candidate: a
    Ranked is frozen, so the refused row is built again, and a row read before then is a
    different object that still holds the vetoes it had.  A slice is a list.  What the
    engine needs of every candidate (:attr:`members`, :meth:`killable`) is answered
    without building any, nor sorting past the head.

    Building one calls :func:`oomkit.urgency.checkpoint` every 1024 candidates: in a hook
    thread working for another decision, it parks there while a takeover is decided.

    ``columns`` (one per name in ``names``) and ``totals`` hold one score per candidate, in
    the order of ``cands``; of any other length they are a ValueError, and so is a NaN in
    ``totals`` or the ``tiebreak`` column (it has no place in an order).
    """

    __slots__ = ("_cands", "_names", "_columns", "_totals", "_vetoes", "_tiers", "_sort", "_rows", "_refused")

    def __init__(
        self,
        cands: Sequence[Candidate],
        names: Sequence[str],
        columns: Sequence[Sequence[float]],
        totals: Sequence[float],
        vetoes: Mapping[int, Sequence[Veto]],
        tiers: Mapping[int, tuple[Tier, str]],
        tiebreak: str,
    ) -> None:
        n = len(cands)
        # zip() below would drop the candidates past the end of a short column, silently.
        if len(names) != len(columns):
            raise ValueError(f"Ranking: {len(names)} scorer names but {len(columns)} columns")
        short = [f"totals has {len(totals)}"] if len(totals) != n else []
        short += [f"column {name!r} has {len(col)}" for name, col in zip(names, columns) if len(col) != n]
        if short:
            raise ValueError(f"Ranking: {n} candidates but {', '.join(short)}")
        tb_col = columns[names.index(tiebreak)] if tiebreak in names else None
        for what, col in (("totals", totals), (f"column {tiebreak!r}", tb_col)):
            # A NaN compares false both ways, so the head and the rest would disagree on the
            # order (a row twice, another never).  sum() finds one in C; inf alone is in order.
            if col is not None and math.isnan(sum(col)):
                k = next((k for k, v in enumerate(col) if math.isnan(v)), None)
                if k is not None:
                    raise ValueError(f"Ranking: {what} is NaN for pid {cands[k].pid}")
        pids = [c.pid for c in cands]
        self._cands = cands
        self._names = tuple(names)
        self._columns = columns
        self._totals = totals
        self._vetoes = {pid: tuple(v) for pid, v in vetoes.items()}
        self._tiers = [tiers.get(pid, _NORMAL) for pid in pids] if tiers else None
        # Keys zipped column by column in C: ten thousand Python-level key functions cost
        # more than the sort.
        keys = zip(
            [pid not in vetoes for pid in pids] if vetoes else itertools.repeat(True, n),
            [TIER_ORDER[t] for t, _ in self._tiers] if self._tiers else itertools.repeat(1, n),
            totals,
            tb_col if tb_col is not None else itertools.repeat(0.0, n),
            [c.rss_bytes for c in cands],
            [-pid for pid in pids],
        )
        zipped: list[_Key] = []
        for _ in range(0, n, _ZIP_AT_ONCE):
            checkpoint()
            zipped.extend(itertools.islice(keys, _ZIP_AT_ONCE))
        self._sort = _Order(zipped)
        self._rows: dict[int, Ranked] = {}
        self._refused: list[int] = []
        """Rows refused since the last resort, whose keys it changes."""

    def __len__(self) -> int:
        return len(self._sort.keys)

    @overload
    def __getitem__(self, i: int) -> Ranked: ...

    @overload
    def __getitem__(self, i: slice) -> list[Ranked]: ...

    def __getitem__(self, i: int | slice) -> Ranked | list[Ranked]:
        rows = self._sort.rows
        if isinstance(i, slice):
            at = range(len(self))[i]
            if at and max(at[0], at[-1]) >= len(rows):
                rows = self._sort.whole()
            return [self._row(rows[k]) for k in at]
        if 0 <= i < len(rows):
            return self._row(rows[i])
        return self._row(self._sort.whole()[i])  # from the end, past the head, or an IndexError

    def __iter__(self) -> Iterator[Ranked]:
        # resort() puts a new _Order in place, so an iteration under way goes on in the old
        # order: the head it started with, then the rest of that same order, of its own keys.
        # Taken here, not in the generator, which would take it only at the first next().
        return self._walk(self._sort)

    def _walk(self, order: _Order) -> Iterator[Ranked]:
        i = 0
        while i < len(order.rows) or not order.full:
            if i == len(order.rows):
                order.whole()
            yield self._row(order.rows[i])
            i += 1

    def __repr__(self) -> str:
        head = ", ".join(f"{r.candidate.pid}:{r.score:g}" for r in self[:3])
        return f"<Ranking of {len(self)}: {head}{', ...' if len(self) > 3 else ''}>"

    def _row(self, k: int) -> Ranked:
        row = self._rows.get(k)
        if row is None:
            c = self._cands[k]
            tier, why = self._tiers[k] if self._tiers else _NORMAL
            row = self._rows[k] = Ranked(
                candidate=c, score=self._totals[k], scores={name: col[k] for name, col in zip(self._names, self._columns)},
                vetoes=self._vetoes.get(c.pid, ()), tier=tier, tier_reason=why,
            )
        return row

    @property
    def scorers(self) -> tuple[str, ...]:
        """The scorers whose scores every row holds, in the order they answered."""
        return self._names

    @property
    def candidates(self) -> tuple[Candidate, ...]:
        """Every candidate, in rank order."""
        return tuple(map(self._cands.__getitem__, self._sort.whole()))

    @property
    def members(self) -> tuple[Candidate, ...]:
        """Every candidate in the order they were read, not ranked: what a lookup needs,
        without the sort of the whole ranking that :attr:`candidates` costs."""
        return tuple(self._cands)

    def killable(self) -> dict[int, Candidate]:
        """The candidates nobody vetoed, by pid, in the order they were read."""
        vetoed = self._vetoes
        return {c.pid: c for c in self._cands if c.pid not in vetoed}

    def refuse(self, i: int, veto: Veto) -> Ranked:
        """Veto the row at ``i`` (the core's re-check refused it) and return it as it is now.
        The order stays as it was until :meth:`resort`, so a walk down the ranking can go on
        from ``i + 1``."""
        rows = self._sort.rows
        k = rows[i] if 0 <= i < len(rows) else self._sort.whole()[i]
        pid = self._cands[k].pid
        self._vetoes[pid] = (*self._vetoes.get(pid, ()), veto)
        self._rows.pop(k, None)
        self._refused.append(k)
        return self._row(k)

    def resort(self) -> None:
        """Put rows refused since the last sort where they now belong, among the vetoed."""
        if self._refused:
            # New keys in a new list: the order being replaced keeps its own, for a walk under way.
            keys = list(self._sort.keys)
            for k in self._refused:
                keys[k] = (False, *keys[k][1:])
            self._sort = _Order(keys)
            self._refused = []

    def head(self, n: int) -> tuple[Ranked, ...]:
        """The first ``n`` rows."""
        return tuple(self[:n])

    def parts(self) -> Iterable[object]:
        """Everything this ranking holds, for :class:`oomkit.reaper.Reaper` to free a slice at
        a time; the ranking is empty afterwards."""
        # An iterator over the lists, not a list of their members: the reaper takes it apart
        # in its own thread.  The vetoes and the tiers too: a veto plugin that failed vetoes
        # every candidate, and a dict of ten thousand tuples freed on the loop is a stall.
        held = itertools.chain(self._cands, self._columns, self._totals, self._sort.keys, self._sort.rows,
                               self._rows.values(), self._vetoes.values(), self._tiers or ())
        self._cands, self._columns, self._totals, self._sort = (), (), (), _Order([])
        self._rows, self._vetoes, self._tiers = {}, {}, None
        return held


_Key = tuple[bool, int, float, float, int, int]
"""A row's sort key: killable, tier, total, tiebreak score, RSS, minus the pid (unique)."""


@final
class _Order:
    """One order of a ranking's keys, which never change: its first HEAD rows, and all of
    them once ``full``."""

    __slots__ = ("keys", "rows", "full")

    def __init__(self, keys: list[_Key]) -> None:
        self.keys = keys
        self.full = len(keys) <= HEAD
        # nlargest gives the same rows as sorted(...)[:HEAD], ties included (documented).
        self.rows = self._all() if self.full else heapq.nlargest(HEAD, range(len(keys)), key=keys.__getitem__)

    def whole(self) -> list[int]:
        if not self.full:
            self.rows, self.full = self._all(), True
        return self.rows

    def _all(self) -> list[int]:
        return sorted(range(len(self.keys)), key=self.keys.__getitem__, reverse=True)
