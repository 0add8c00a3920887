"""``growth``: who has been growing while the scope filled (principle 1, kill the cause).

The score is the rise of the candidate's *lower envelope* over the memory history's window
(``[history] window_s``), on the shared scale (1000 = the scope's whole limit):

* the window (or, for a process younger than it, the time since it started, when it had
  nothing) is cut into ``buckets`` equal spans and the smallest resident size of each is
  taken; the candidate's size now (read for this decision) ends the last span;
* the rise is the last span's minimum minus the lowest minimum before it;
* or, if larger, the *new high*: how far the size now stands above the largest size seen
  before the last span.

So a process that grew steadily scores what it grew, whatever moment the OOM caught it at;
one that maps and frees a big buffer every 100 ms has flat minima and never passes its
earlier peaks, so it scores about 0 (it is spiky, not growing), even caught at a peak; one
that was flat and has just allocated a lot scores that jump (a sudden allocation between
two samples is growth too); a stable giant scores 0; a process that grew, freed and grows
again counts from its lowest point.  A process never sampled and older than the window scores 0
(nothing is known of it); one younger than the window counts from its start even unsampled,
which is how a burst of allocation between two samples is still seen.  Rises under
``noise_bytes`` are 0.

A unit (a cgroup or process group ranked whole, :mod:`oomkit_plugins.units`) is scored the
same way on the sum of its processes: its history is the summed history the memory history
keeps for it (:meth:`oomkit.history.History.of`), its size now the sum of its members', its
start its oldest member's.  So a small cgroup whose total keeps rising beside a large,
stable one scores, and the large one does not.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Annotated

import msgspec

from oomkit import Candidate, Config, Event, hookimpl
from oomkit.history import History, Samples
from oomkit.units import Size
from oomkit.urgency import checkpointed

from ._scale import SCALE, ScopeTotal
from ._settings import Settings

__all__ = ["Growth", "GrowthSettings", "envelope_rise", "new_high"]


class GrowthSettings(Settings, frozen=True):
    """``[plugins.growth]``."""

    buckets: Annotated[int, msgspec.Meta(ge=2, le=32)] = 4
    """Spans the window is cut into; each contributes its smallest size.  More spans follow
    faster growth more closely, and let a shorter spike through."""
    noise_bytes: Size = 1 << 20
    """Rises smaller than this are not growth (allocator slack, a thread stack)."""


def envelope_rise(points: Sequence[tuple[int, int]], buckets: int) -> int:
    """The rise of the lower envelope of ``(time, bytes)`` points, oldest first."""
    if len(points) < 2:
        return 0
    t0, t1 = points[0][0], points[-1][0]
    width = max(1, (t1 - t0 + buckets - 1) // buckets)
    minima: dict[int, int] = {}
    for t, v in points:
        k = min(buckets - 1, (t - t0) // width)
        if k not in minima or v < minima[k]:
            minima[k] = v
    ordered = [minima[k] for k in sorted(minima)]
    if len(ordered) < 2:
        return 0
    return max(0, ordered[-1] - min(ordered[:-1]))


def new_high(points: Sequence[tuple[int, int]], buckets: int) -> int:
    """How far the last point stands above every point before the last span: a sample taken
    in the middle of a jump does not hide the jump, and a spiky process's earlier peaks
    still count against its current one."""
    if len(points) < 2:
        return 0
    t0, t1 = points[0][0], points[-1][0]
    cut = t1 - max(1, (t1 - t0 + buckets - 1) // buckets)
    earlier = [v for t, v in points if t < cut]
    return max(0, points[-1][1] - max(earlier)) if earlier else 0


class Growth:
    """Scores sustained growth over the memory history's window."""

    name = "growth"
    loop_safe = True
    """An urgent decision may call its sync hooks on the event loop: the history's lock is held per 256 candidates, never across a checkpoint."""
    weight = 1.0
    """Default weight: growth is the cause, the strongest evidence of the default policy."""

    def __init__(self) -> None:
        self.settings = GrowthSettings()
        self._total = ScopeTotal()

    @hookimpl
    def oomkit_configure(self, config: Config) -> None:
        self.settings = config.plugin_settings(self.name, GrowthSettings)
        self._total.configure(config)

    def rise_bytes(self, c: Candidate, samples: Samples | None, started_ns: int, now_ns: int, window_ns: int) -> int:
        points: list[tuple[int, int]] = []
        since = now_ns - window_ns
        if started_ns > since:
            points.append((started_ns, 0))  # younger than the window: it had nothing then
        elif samples is None:
            return 0  # old and never sampled: nothing is known of its past
        if samples is not None:
            points.extend((t, v) for t, v in zip(samples.times_ns, samples.rss_bytes) if since <= t <= now_ns)
        points.append((now_ns, c.rss_bytes))
        rise = max(envelope_rise(points, self.settings.buckets), new_high(points, self.settings.buckets))
        return rise if rise >= self.settings.noise_bytes else 0

    @hookimpl
    def oomkit_score(self, event: Event, candidates: Sequence[Candidate], history: History) -> list[float]:
        total = self._total(event, history)
        now = time.monotonic_ns()
        window = int(history.window_s * 1e9)
        since = now - window
        out: list[float] = []
        for c, samples in zip(checkpointed(candidates), history.of_all(candidates, now, tree=event.scope.tree)):
            started = history.started_of(c)
            if samples is None and started <= since:
                out.append(0.0)  # old and never sampled: most of a big host, and nothing is known
                continue
            out.append(self.rise_bytes(c, samples, started, now, window) * SCALE / total)
        return out
