"""Urgent decisions: while the kernel waits on one, the rest of the process makes way for it.

A takeover OOM (an ``oom`` event: a v1 memcg with ``oom_kill_disable``, or a v2 cgroup at its
brake) has the scope's tasks paused until oomkit acts.  Its decision runs on the event loop
and in hook worker threads (:mod:`oomkit.hookthreads`), beside whatever else the engine does:
often a big ranking in another worker.  Threads give the loop its turn only through the GIL,
and every time the takeover's path gives the GIL up (each read of a cgroup or ``/proc`` file,
the eventfd, the hand-over to and from a worker, the signal) getting it back waits behind the
ranking thread for up to one switch interval, and on a busy machine behind the scheduler
too.  ``python -m bench loop_stall`` measured the wake → kill sent p99 at 5.7x its idle value
with a 1 ms interval.  While at least one urgent decision is in flight:

* the interpreter's switch interval (process-wide) is lowered to the smallest one asked for
  (``[engine] urgent_switch_interval_s``), and put back to what it was when the last urgent
  decision ends, however it ends (:func:`urgent` is a context manager, counted, so
  overlapping urgent decisions, in one engine or several, neither nest wrongly nor restore
  early);
* the cyclic garbage collector is off (if it was on: then it is switched on again after):
  a full collection, started by whichever thread allocates next, holds the GIL for as long
  as it takes (30-40 ms here with a 10 000-process ranking in flight), far longer than any
  switch interval (at most :data:`GC_OFF_MAX_S` per spell);
* threads running work that is not urgent (hook workers on another decision's job, the
  history sampler's thread, the reaper freeing a finished ranking, :mod:`oomkit.reaper`)
  *park* at their next :func:`checkpoint`: they wait, holding nothing, until no urgent
  decision is left, at most ``park_s`` (``[engine] urgent_park_s``) per thread per urgent
  spell, so a storm of takeovers can slow a ranking but not starve it;
* each thread inside an urgent block (the event loop's, where the source wakes and the
  decision runs) is scheduled ``SCHED_FIFO`` at ``realtime_priority`` (``[engine]
  urgent_realtime_priority``) until its last urgent block ends, then put back to what it was:
  runnable, it runs before every ordinary thread on the machine instead of waiting for a CPU
  behind them (the ranking's thread, the victim's siblings, a build).  Its children start
  ordinary (``SCHED_RESET_ON_FORK``).  A thread already real-time is left as it is; one that
  may not (no ``CAP_SYS_NICE``, an ``RLIMIT_RTPRIO`` below the priority, systemd's
  ``RestrictRealtime=``, a container without real-time runtime) is counted in
  :attr:`UrgencyStats.realtime_refused` and logged once, and the decision goes on.

The engine calls :func:`checkpoint` before every sync hook implementation and in its own
loops over candidates; a plugin whose hook loops over thousands of items may call it too (it
costs a few hundred nanoseconds when nothing is urgent), or loop over
:func:`checkpointed(items) <checkpointed>`, at a point where it holds no lock another hook
call might need.  The loop's thread, and an urgent decision's own workers, never park.

What the benchmark's worst cases were, found by sampling every thread's state in ``/proc``:
not the interval, but a thread holding the GIL for 30-40 ms in C, the collector's full pass or
a finished ranking freed all at once (:mod:`oomkit.reaper`); and, shorter, a 10 000-row
ranking sorted in one call, 4-7 ms (:mod:`oomkit.ranking` orders only its head at once).  A
parked ranking thread starts neither while the takeover is decided; one that runs on makes
garbage, and takes the GIL back at every switch interval.  With those gone, the worst runs
left were the loop's thread runnable but not running for 5-11 ms
(``/proc/self/task/TID/schedstat``), and the reaper taking the GIL at each of the decision's
system calls: real-time scheduling and the reaper's parking are for those.
"""

from __future__ import annotations

import errno
import gc
import itertools
import logging
import os
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

__all__ = ["LOOP_WAIT_MAX_S", "UrgencyStats", "checkpoint", "checkpointed", "may_park", "parkable", "release_parked", "stats", "urgent"]

T = TypeVar("T")

_lock = threading.Lock()
_calm = threading.Event()  # set: no urgent decision in flight (or parking released for this spell)
_calm.set()
_asked: Counter[float] = Counter()  # switch intervals asked for by the urgent decisions in flight
_in_flight = 0
_spell = 0  # counts urgent spells (0 -> 1 in flight); a thread's park budget is per spell
_saved: float | None = None  # the switch interval found when the current spell lowered it
_park_s = 0.0  # the largest park budget asked for in this spell
_gc_was_on = False  # the cyclic collector was enabled when this spell began (and is off now)
_spell_began_ns = 0
GC_OFF_MAX_S = 1.0
"""The collector stays off at most about this long in one spell: back-to-back takeovers must
not let cyclic garbage grow without bound (checked as urgent decisions begin and end; each
decision is bounded by the engine's timeouts)."""
LOOP_WAIT_MAX_S = 0.1
"""The longest a ``loop_safe`` plugin's sync hook may wait for anything (a reader thread, a
lock) in one call, since an urgent decision may call it on the event loop (``[engine]
urgent_on_loop``): a plugin whose waits are configurable says it is loop-safe only while its
setting is within this."""
_local = threading.local()
log = logging.getLogger(__name__)
_REALTIME = frozenset({os.SCHED_FIFO, os.SCHED_RR})

_totals = {"decisions": 0, "spells": 0, "parks": 0, "parked_ns": 0, "released": 0, "realtime": 0,
           "realtime_refused": 0}
_parked_now = 0


@dataclass(frozen=True, slots=True)
class UrgencyStats:
    """What urgency did since the process started (all engines together)."""

    in_flight: int
    """Urgent decisions running now."""
    parked_now: int
    """Threads parked at a checkpoint now."""
    decisions: int
    """Urgent decisions since the start."""
    parks: int
    """Times a thread parked at a checkpoint for an urgent decision."""
    parked_s: float
    """Seconds threads spent parked, all together."""
    released: int
    """Spells in which parking was cut short: an urgent job waited for a hook thread, or for
    a lock a parked thread held (the first-party candidates plugin's tables)."""
    realtime: int = 0
    """Times a thread was made real-time for its urgent blocks (``realtime_priority``)."""
    realtime_refused: int = 0
    """Times the kernel refused that (see the module docstring); the decision went on."""


def stats() -> UrgencyStats:
    with _lock:
        return UrgencyStats(
            in_flight=_in_flight, parked_now=_parked_now, decisions=_totals["decisions"], parks=_totals["parks"],
            parked_s=_totals["parked_ns"] / 1e9, released=_totals["released"], realtime=_totals["realtime"],
            realtime_refused=_totals["realtime_refused"],
        )


def _set(seconds: float) -> None:
    # CPython keeps whole microseconds and truncates: 100 us read back as seconds and set
    # again would become 99 us, one less on every spell.
    sys.setswitchinterval(seconds + 5e-10)


def _set_interval() -> None:
    # Under _lock.  The smallest interval any decision in flight asked for, never above the
    # one the spell started from (a daemon configured lower keeps its own).
    global _saved
    if _saved is None:
        _saved = sys.getswitchinterval()
    wanted = min(_asked) if _asked else _saved
    _set(min(wanted, _saved))


def _realtime_enter(priority: int) -> None:
    """The calling thread's first urgent block asking for ``priority`` makes it real-time."""
    depth = getattr(_local, "rt_depth", 0)
    _local.rt_depth = depth + 1
    if depth:
        return
    _local.rt_saved = None
    try:
        policy = os.sched_getscheduler(0)  # pid 0: this thread, on Linux
        if policy & ~os.SCHED_RESET_ON_FORK in _REALTIME:
            return  # an operator's choice (systemd CPUSchedulingPolicy=, chrt): kept
        saved = (policy, os.sched_getparam(0))
        os.sched_setscheduler(0, os.SCHED_FIFO | os.SCHED_RESET_ON_FORK, os.sched_param(priority))
    except OSError as exc:
        with _lock:
            _totals["realtime_refused"] += 1
            first = _totals["realtime_refused"] == 1
        if first:
            why = "not permitted" if exc.errno == errno.EPERM else exc.strerror
            log.warning("urgent decisions run at the ordinary priority: SCHED_FIFO %d was refused (%s; needs"
                        " CAP_SYS_NICE or RLIMIT_RTPRIO >= %d, and no RestrictRealtime=); counted in"
                        " urgent_realtime_refused", priority, why, priority)
        return
    _local.rt_saved = saved
    with _lock:
        _totals["realtime"] += 1


def _realtime_exit() -> None:
    """The calling thread's last urgent block puts its scheduling back."""
    _local.rt_depth -= 1
    saved = getattr(_local, "rt_saved", None)
    if _local.rt_depth or saved is None:
        return
    _local.rt_saved = None
    try:
        os.sched_setscheduler(0, *saved)
    except OSError as exc:  # leaving real time is always allowed; say so if it was not
        log.error("cannot put this thread's scheduling back after an urgent decision: %s", exc.strerror)


@contextmanager
def urgent(switch_interval_s: float = 0.0, park_s: float = 0.0, realtime_priority: int = 0) -> Iterator[None]:
    """Mark an urgent decision in flight for the ``with`` block (see the module docstring).

    ``switch_interval_s`` 0 leaves the switch interval alone; ``park_s`` 0 parks nobody;
    ``realtime_priority`` 0 leaves the calling thread's scheduling alone (else 1-99, its
    ``SCHED_FIFO`` priority for the block)."""
    global _in_flight, _spell, _saved, _park_s, _gc_was_on, _spell_began_ns
    with _lock:
        _in_flight += 1
        _totals["decisions"] += 1
        if _in_flight == 1:
            _spell += 1
            _totals["spells"] += 1
            _park_s = 0.0
            _spell_began_ns = time.monotonic_ns()
            _gc_was_on = gc.isenabled()
            gc.disable()
        else:
            _gc_overdue()
        if park_s > _park_s:
            _park_s = park_s
            _calm.clear()
        if switch_interval_s > 0:
            _asked[switch_interval_s] += 1
            _set_interval()
    if realtime_priority > 0:
        _realtime_enter(realtime_priority)
    try:
        yield
    finally:
        if realtime_priority > 0:
            _realtime_exit()
        with _lock:
            _in_flight -= 1
            if switch_interval_s > 0:
                _asked[switch_interval_s] -= 1
                if not _asked[switch_interval_s]:
                    del _asked[switch_interval_s]
                if _saved is not None:
                    _set_interval()
            _gc_overdue()
            if _in_flight == 0:
                if _saved is not None:
                    _set(_saved)
                    _saved = None
                if _gc_was_on:
                    gc.enable()
                    _gc_was_on = False
                _calm.set()


def _gc_overdue() -> None:
    # Under _lock.
    global _gc_was_on
    if _gc_was_on and time.monotonic_ns() - _spell_began_ns > GC_OFF_MAX_S * 1e9:
        gc.enable()
        _gc_was_on = False


def release_parked() -> None:
    """Let every parked thread go for the rest of this spell (an urgent job is waiting for a
    hook thread, and the parked ones hold them all)."""
    with _lock:
        if not _calm.is_set():
            _totals["released"] += 1
            _calm.set()


@contextmanager
def parkable(on_park: Callable[[bool], None] | None = None) -> Iterator[None]:
    """Let the current thread park at checkpoints for the ``with`` block; ``on_park`` is
    called with True as a park begins and False as it ends (a hook job does not count the
    time against the plugin it is in)."""
    _local.parkable = True
    _local.on_park = on_park
    try:
        yield
    finally:
        _local.parkable = False
        _local.on_park = None


def may_park() -> bool:
    """Whether the current thread parks at checkpoints (inside :func:`parkable`)."""
    return bool(getattr(_local, "parkable", False))


def checkpointed(items: Iterable[T], every: int = 256) -> Iterator[T]:
    """``items``, with a :func:`checkpoint` before the first and after every ``every``
    (taken from ``items`` that many at a time)."""
    # A chunk at a time (islice, yield from) rather than a counter per item: a full ranking
    # runs ten thousand candidates through this in eight places.
    it = iter(items)
    while True:
        checkpoint()
        chunk = list(itertools.islice(it, every))
        if not chunk:
            return
        yield from chunk


def checkpoint() -> None:
    """Park here while an urgent decision is in flight, if this thread may (see the module
    docstring); returns at once otherwise."""
    if _calm.is_set() or not getattr(_local, "parkable", False):
        return
    with _lock:
        spell, budget = _spell, _park_s
    if getattr(_local, "spell", None) != spell:
        _local.spell, _local.parked_ns = spell, 0
    left_ns = int(budget * 1e9) - _local.parked_ns
    if left_ns <= 0:
        return
    global _parked_now
    on_park = _local.on_park
    if on_park is not None:
        on_park(True)
    with _lock:
        _parked_now += 1
    t0 = time.monotonic_ns()
    try:
        _calm.wait(left_ns / 1e9)
    finally:
        took = time.monotonic_ns() - t0
        _local.parked_ns += took
        with _lock:
            _parked_now -= 1
            _totals["parks"] += 1
            _totals["parked_ns"] += took
        if on_park is not None:
            on_park(False)
