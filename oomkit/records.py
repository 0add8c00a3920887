"""What oomkit writes about memory besides decisions, and the reader of its JSON-lines log.

The ``jsonl`` notifier's log holds two kinds of line (docs/operations.md, "The JSON-lines
log"):

* a **decision**: a :class:`~oomkit.events.Decision`, as it always was; it has no ``type``
  key;
* a **memory sample**: a :class:`MemorySample`, ``"type": "memory-sample"``: one reading of
  a scope's memory by the history sampler (:mod:`oomkit.history`), what ``oomkit plot``
  draws the scope's memory from.

Readers tell them apart by ``type``: absent is a decision, ``memory-sample`` a sample, and
any other value a record of a kind this version does not know, which is skipped (a newer
daemon may write more kinds).  :func:`read_log` is that reader; ``oomkit explain`` and
``oomkit plot`` use it.  A line that is not JSON, or not a valid record of its kind, is an
error naming the file and the line, except a last line without its newline: that one is
being written, or was cut by a crash, and is skipped.

:class:`ScopeHistory` is what the control socket's ``history`` op answers: the recent
samples of some of a scope's processes, bounded in processes and in points.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Literal

import msgspec

from .errors import OomkitError
from .events import Decision, Scope

__all__ = [
    "MEMORY_SAMPLE",
    "LogError",
    "MemorySample",
    "ProcessHistory",
    "ProcessSample",
    "ScopeHistory",
    "read_log",
]

MEMORY_SAMPLE: Literal["memory-sample"] = "memory-sample"

_Bytes = Annotated[int, msgspec.Meta(ge=0, le=1 << 62)]
_Pid = Annotated[int, msgspec.Meta(ge=1, le=4194304)]
_Time = Annotated[float, msgspec.Meta(ge=0.0, le=1e11)]
_Name = Annotated[str, msgspec.Meta(max_length=64)]


class ProcessSample(msgspec.Struct, frozen=True, kw_only=True):
    """One process as the sampler last read it."""

    pid: _Pid
    name: _Name = ""
    """Its ``comm`` when the sampler first read it."""
    start_ticks: Annotated[int, msgspec.Meta(ge=0)] = 0
    rss_bytes: _Bytes = 0


class MemorySample(msgspec.Struct, frozen=True, kw_only=True):
    """One reading of a scope's memory, taken by the history sampler on one of its ticks.

    Every number comes from reads the sampler makes anyway (nothing is read twice for it):
    the scope's charge and limit, and the resident size of each process it tracks.  A big
    scope is read round-robin (``[history] tick_budget``), so ``rss_bytes`` and ``top`` are
    each process's latest reading, up to one full round old.
    """

    type: Literal["memory-sample"] = MEMORY_SAMPLE
    scope: Scope
    monotonic_ns: Annotated[int, msgspec.Meta(ge=0)]
    """When, on the clock of ``Decision.monotonic_ns`` and of the kill times."""
    wall_time: _Time
    usage_bytes: _Bytes = 0
    """Memory charged to the scope: v1 ``memory.usage_in_bytes``, v2 ``memory.current``, the
    system's ``MemTotal - MemAvailable``; 0 when it could not be read."""
    limit_bytes: _Bytes = 0
    """The scope's limit: v1 ``memory.limit_in_bytes``, v2 ``memory.max``, the system's
    ``MemTotal``; 0 when unlimited or unknown."""
    rss_bytes: _Bytes = 0
    """The resident sizes of the tracked processes, summed."""
    processes: Annotated[int, msgspec.Meta(ge=0)] = 0
    """Processes tracked in the scope (at most ``[history] max_processes``)."""
    warm: bool = False
    """The scope is warm (near its limit, or an event named it lately): the sampler keeps
    its history; a small cold scope is sampled too, with ``warm`` false."""
    top: tuple[ProcessSample, ...] = ()
    """The largest tracked processes, largest first."""


class ProcessHistory(msgspec.Struct, frozen=True, kw_only=True):
    """One process's recent samples, oldest first (``times_ns`` and ``rss_bytes`` pairwise)."""

    pid: int
    name: str = ""
    start_ticks: int = 0
    times_ns: tuple[int, ...] = ()
    rss_bytes: tuple[int, ...] = ()


class ScopeHistory(msgspec.Struct, frozen=True, kw_only=True):
    """Some of a scope's processes over the history window (the control socket's ``history``)."""

    scope: Scope
    sampled: bool
    """Whether the sampler reads this scope now (a cold big scope keeps no history)."""
    window_s: float
    interval_s: float
    now_ns: int
    """The daemon's monotonic clock when it answered (sample times are on it)."""
    usage_bytes: int = 0
    limit_bytes: int = 0
    rss_bytes: int = 0
    processes: int = 0
    """Processes tracked in the scope; ``history`` holds at most the requested number."""
    history: tuple[ProcessHistory, ...] = ()
    """The requested pids first (those tracked), then the largest, largest first."""


class LogError(OomkitError):
    """The log cannot be read, or a line in it is not a record; the message names the file and line."""


class _Kind(msgspec.Struct):
    type: str = ""


_kind = msgspec.json.Decoder(_Kind)
_decision = msgspec.json.Decoder(Decision)
_sample = msgspec.json.Decoder(MemorySample)


def read_log(path: str | Path) -> Iterator[tuple[int, Decision | MemorySample]]:
    """Every decision and memory sample in a JSON-lines log, with its line number, in file
    order; records of other types are skipped.  Raises :class:`LogError` naming the file
    and the line of the first line that is neither (a torn last line is skipped)."""
    try:
        f = open(path, "rb")
    except OSError as exc:
        raise LogError(f"{path}: {exc.strerror}") from None
    with f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            kind: str | None = None
            try:
                kind = _kind.decode(line).type
                if kind == "":
                    yield number, _decision.decode(line)
                elif kind == MEMORY_SAMPLE:
                    yield number, _sample.decode(line)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                if not line.endswith(b"\n"):
                    return  # the last line, not finished: being written, or cut by a crash
                what = {None: "a JSON record", "": "a decision", MEMORY_SAMPLE: "a memory sample"}[kind]
                raise LogError(f"{path}, line {number}: not {what}: {exc}") from None
