"""A ranking sorted once, each of its rows built when it is first read.

A system-scope decision ranks every process (ten thousand on a build host) but reads only
the top of the order: the victim, the few refused at the re-check before it, the
``[engine] record_ranking`` rows it records.  A :class:`~oomkit.Ranked` per candidate, its
scores a dict, cost more than all of the scoring together (40-70 ms of a 280 ms ranking of
10 000 fake processes, ``python -m bench selection``), and freeing them was most of what the
reaper (:mod:`oomkit.reaper`) had to keep off the event loop.  So :class:`Ranking` keeps the
columns the engine computed, sorts on keys zipped from them, and builds a row when it is read.

Nor is the whole order computed until it is needed: only its first :data:`HEAD` rows at once
(``heapq.nlargest``), the rest when a read goes past them or asks for every candidate.  Why:
``sorted`` over ten thousand keys ran 4-7 ms in one C call, holding the GIL the whole time; a
takeover decided meanwhile (``python -m bench loop_stall``) waited that long at whichever of
its system calls it was, for the ranking thread to give the GIL back.  ``nlargest`` loops in
Python, which hands the GIL over at every switch interval, and takes 1.4 ms.  The keys are
zipped a slice at a time for the same reason (2 ms in one call, else).
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import final, overload

from .events import Candidate, Ranked, Tier, Veto
from .urgency import checkpoint

__all__ = ["HEAD", "Ranking"]

HEAD = 64
"""Rows put in order as a ranking is built; the rest only when first read.  At least what
a decision reads (its victim, the few refused before it, ``[engine] record_ranking``, 20 by
default), so that a decision reads past it only when many are refused."""

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
    engine needs of every candidate (:attr:`candidates`, :meth:`killable`) is answered
    without building any.

    ``columns`` (one per name in ``names``) and ``totals`` hold one score per candidate, in
    the order of ``cands``; of any other length they are a ValueError.
    """

    __slots__ = ("_cands", "_names", "_columns", "_totals", "_vetoes", "_tiers", "_keys", "_sort", "_rows",
                 "_stale")

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
            columns[self._names.index(tiebreak)] if tiebreak in self._names else itertools.repeat(0.0, n),
            [c.rss_bytes for c in cands],
            [-pid for pid in pids],
        )
        self._keys: list[tuple[bool, int, float, float, int, int]] = []
        for _ in range(0, n, _ZIP_AT_ONCE):
            checkpoint()
            self._keys.extend(itertools.islice(keys, _ZIP_AT_ONCE))
        self._sort = self._sorted()
        self._rows: dict[int, Ranked] = {}
        self._stale = False

    def _sorted(self) -> _Order:
        """The order's first HEAD rows, or all of them if there are no more."""
        n = len(self._keys)
        if n <= HEAD:
            return _Order(sorted(range(n), key=self._keys.__getitem__, reverse=True), True)
        # The same rows as sorted(...)[:HEAD], ties included (documented of nlargest).
        return _Order(heapq.nlargest(HEAD, range(n), key=self._keys.__getitem__), False)

    def _whole(self) -> list[int]:
        """The whole order, of the keys as they were when its head was put in order (a
        refusal sorts the rest first, see refuse)."""
        order = self._sort
        if not order.full:
            order.rows = sorted(range(len(self._keys)), key=self._keys.__getitem__, reverse=True)
            order.full = True
        return order.rows

    def __len__(self) -> int:
        return len(self._keys)

    @overload
    def __getitem__(self, i: int) -> Ranked: ...

    @overload
    def __getitem__(self, i: slice) -> list[Ranked]: ...

    def __getitem__(self, i: int | slice) -> Ranked | list[Ranked]:
        rows = self._sort.rows
        if isinstance(i, slice):
            at = range(len(self._keys))[i]
            if at and max(at[0], at[-1]) >= len(rows):
                rows = self._whole()
            return [self._row(rows[k]) for k in at]
        if 0 <= i < len(rows):
            return self._row(rows[i])
        return self._row(self._whole()[i])  # from the end, past the head, or an IndexError

    def __iter__(self) -> Iterator[Ranked]:
        # resort() puts a new _Order in place, so an iteration under way goes on in the old
        # order: the head it started with, then the rest of that same order.
        order = self._sort
        i = 0
        while True:
            if i == len(order.rows):
                if order.full or order is not self._sort:
                    return
                self._whole()
                continue
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
        return tuple(map(self._cands.__getitem__, self._whole()))

    def killable(self) -> dict[int, Candidate]:
        """The candidates nobody vetoed, by pid, in rank order."""
        vetoed = self._vetoes
        return {c.pid: c for c in map(self._cands.__getitem__, self._whole()) if c.pid not in vetoed}

    def refuse(self, i: int, veto: Veto) -> Ranked:
        """Veto the row at ``i`` (the core's re-check refused it) and return it as it is now.
        The order stays as it was until :meth:`resort`, so a walk down the ranking can go on
        from ``i + 1``."""
        # The rest of the order is sorted now, of the keys before this veto: a walk under way
        # goes on past the head in the order it started in.
        k = self._whole()[i]
        pid = self._cands[k].pid
        self._vetoes[pid] = (*self._vetoes.get(pid, ()), veto)
        self._keys[k] = (False, *self._keys[k][1:])
        self._rows.pop(k, None)
        self._stale = True
        return self._row(k)

    def resort(self) -> None:
        """Put rows refused since the last sort where they now belong, among the vetoed."""
        if self._stale:
            self._sort = self._sorted()
            self._stale = False

    def head(self, n: int) -> tuple[Ranked, ...]:
        """The first ``n`` rows."""
        return tuple(self[:n])

    def parts(self) -> Iterable[object]:
        """Everything this ranking holds, for :class:`oomkit.reaper.Reaper` to free a slice at
        a time; the ranking is empty afterwards."""
        # An iterator over the lists, not a list of their members: the reaper takes it apart
        # in its own thread.  The vetoes and the tiers too: a veto plugin that failed vetoes
        # every candidate, and a dict of ten thousand tuples freed on the loop is a stall.
        held = itertools.chain(self._cands, self._columns, self._totals, self._keys, self._sort.rows,
                               self._rows.values(), self._vetoes.values(), self._tiers or ())
        self._cands, self._columns, self._totals, self._keys, self._sort = (), (), (), [], _Order([], True)
        self._rows, self._vetoes, self._tiers = {}, {}, None
        return held


@final
class _Order:
    """A ranking's order: its head, or all of it once ``full``."""

    __slots__ = ("rows", "full")

    def __init__(self, rows: list[int], full: bool) -> None:
        self.rows = rows
        self.full = full
