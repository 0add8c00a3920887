"""What every event source provides to the engine, and the base of its settings."""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Awaitable, Callable, Collection, Sequence
from typing import ClassVar

import anyio
import msgspec
from anyio.abc import TaskStatus

from ..events import Event, Scope
from ..status import SourceStatus

__all__ = ["Emit", "Source", "SourceSettings"]

Emit = Callable[[Event], Awaitable[None]]
"""Hands an event to the engine; waits while the engine's queue is full."""


class SourceSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True, tag_field="kind"):
    """One ``[[sources]]`` table.  Each source kind subclasses this with ``tag="<kind>"``
    and the fields of its table; ``kind`` itself is the tag, not a field."""

    name: str = ""
    """Unique name of this source; defaults to its kind."""

    @property
    def source_name(self) -> str:
        """The source's name: ``name``, or the kind when ``name`` is empty."""
        return self.name or str(type(self).__struct_config__.tag)


class Source(abc.ABC):
    """Turns one kind of kernel signal into :class:`~oomkit.events.Event`s.

    A source that ``[[sources]]`` can configure sets :attr:`settings_type` and is built as
    ``SourceClass(settings, config)`` (``config`` is the whole :class:`~oomkit.Config`); it
    registers its kind in the ``oomkit.sources`` entry-point group
    (:mod:`oomkit.sources.registry`).  A source that a plugin or an embedding program
    builds itself needs neither.

    The engine runs :meth:`run` in a task of its own and waits for ``task_status.started()``
    before it reports itself ready, so a source arms its kernel interface (registers its
    eventfd, sets ``oom_kill_disable``) *before* calling it.  Raising before ``started()``
    refuses to start the engine with that message; raising later ends this source only, and
    the engine logs it and carries on with the others.
    """

    name: str
    settings_type: ClassVar[type[SourceSettings]]
    """The Struct that decodes this source's ``[[sources]]`` table; its tag is the kind."""

    @abc.abstractmethod
    async def run(self, emit: Emit, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Arm, call ``task_status.started()``, then emit events until cancelled."""

    def counters(self) -> dict[str, int]:
        """A snapshot of this source's counters, for status and metrics: snake_case names,
        each only growing while the source runs (records rejected, lost, ...).  A source
        with nothing to count returns an empty dict, as this default does."""
        return {}

    def still_holds(self, event: Event) -> bool:
        """Re-check, right before a kill, that the condition behind ``event`` still holds.

        The default says yes; sources that can re-read their condition cheaply override it
        (a takeover source reads ``under_oom``, the meminfo source reads MemAvailable).
        """
        return True

    def hand_back(self, event: Event) -> bool:
        """Give the decision for ``event`` back to the kernel now, because oomkit will not
        make one (every candidate is vetoed, or there is none).  Returns whether it did.

        Only a source that took a decision over has anything to hand back (a v1 takeover
        source clears ``oom_kill_disable`` at once, instead of waiting out its deadline with
        the cgroup paused); the default does nothing and says so.
        """
        return False

    def scopes(self) -> Sequence[Scope]:
        """The scopes this source watches now, so the engine's memory history
        (:mod:`oomkit.history`) can sample them before an event needs it.

        Called once per history tick (every ``[history] interval_s``): return what the
        source already holds, without reading anything.  The default is none (a source of
        system-wide events, or one that cannot know its scopes in advance).
        """
        return ()

    def protected_pids(self) -> Collection[int]:
        """Pids of processes this source depends on, which the engine must never kill.

        Asked once per decision (keep it cheap: no I/O) and honoured by the core's safety
        (:mod:`oomkit.safety`), which no config or plugin can switch off.  Declare only
        processes you hold: your own children, whose pids cannot be reused until you reap
        them; stop declaring one once reaped (a reused pid spared for a moment is harmless, a
        watchdog left unprotected while it runs is not).  The default declares none; the
        memcg-oom source declares its takeover watchdog.  A raising implementation is logged
        and the decision goes on without its pids.
        """
        return ()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"

    def status(self) -> SourceStatus:
        """What this source is doing, for ``oomkit status`` and the metrics (no I/O: it is
        asked on every scrape).

        The default names the source and its kind and, when the source keeps its counters
        in a dataclass at ``self.stats``, reports each of its int fields.  Override it to
        add the mode the source ended up in and the cgroups it watches or changed."""
        settings_type = getattr(type(self), "settings_type", None)
        kind = str(settings_type.__struct_config__.tag) if settings_type is not None else type(self).__name__
        stats = getattr(self, "stats", None)
        counters: dict[str, int] = {}
        if stats is not None and dataclasses.is_dataclass(stats) and not isinstance(stats, type):
            for f in dataclasses.fields(stats):
                value = getattr(stats, f.name)
                if type(value) is int:
                    counters[f.name] = value
        return SourceStatus(name=self.name, kind=kind, counters=counters)
