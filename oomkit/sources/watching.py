"""The loop shared by sources that watch a kernel interface per scope.

A :class:`WatchingSource` keeps one :class:`Watch` per scope (the eventfds of a memcg, the
PSI trigger of a cgroup, ...), all in one :class:`~oomkit.poller.Poller`, and follows its
scope patterns with a :class:`~oomkit.sources.scopes.ScopeWatcher` in the same poller, so
one task and one await serve any number of cgroups and nothing races: arming, firing and
disarming all happen in that task.

Faults never stop the source.  A scope that cannot be armed (file missing, write refused) is
logged once and left alone until it disappears and appears again; a watch whose cgroup
vanished, or whose file became unreadable, ends with one log line.  Nothing is retried on a
timer, so a fault costs no CPU afterwards.
"""

from __future__ import annotations

import abc
import errno
import logging
import os
import select
import time
from collections.abc import Callable, Iterable, Sequence
from functools import partial
from pathlib import Path
from typing import Literal

import anyio
from anyio.abc import TaskStatus

from ..cgroupfs import Mounts
from ..config import ConfigError
from ..events import Event, Scope
from ..poller import Poller
from .base import Emit, Source
from .scopes import ScopeWatcher

__all__ = ["Watch", "WatchEnded", "WatchingSource", "tree_root"]

log = logging.getLogger("oomkit.sources")


class WatchEnded(Exception):
    """Raised by a watch whose scope is gone or whose interface stopped working."""

    def __init__(self, reason: str, *, vanished: bool = False) -> None:
        super().__init__(reason)
        self.vanished = vanished


class Watch(abc.ABC):
    """One scope's armed kernel interface.  Registers its fds in the poller with
    ``(self, tag)`` keys; the source calls :meth:`fired` with that tag when one fires."""

    scope: Scope
    shared = False
    """A shared watch serves many scopes of its source (one inotify fd for all of them) and
    ends only with the source."""
    deadline: float | None = None
    """``time.monotonic()`` at which :meth:`tick` is due; None: no timer."""

    @abc.abstractmethod
    def fired(self, tag: int, events: int, now: float) -> Iterable[Event]:
        """The fd registered with ``tag`` fired; return the events to emit."""

    def tick(self, now: float) -> Iterable[Event]:
        """:attr:`deadline` passed; return the events to emit."""
        return ()

    @abc.abstractmethod
    def close(self) -> None:
        """Unregister from the poller and release every fd (called once)."""


def tree_root(mounts: Mounts, tree: Literal["v1", "v2"], source: str) -> Path:
    """The mount a source's cgroups live in; a ConfigError (engine refuses to start) if absent."""
    root = mounts.memory_v1 if tree == "v1" else mounts.unified
    if root is None or not root.is_dir():
        what = "cgroup v1 memory controller" if tree == "v1" else "cgroup v2 hierarchy"
        raise ConfigError(f"source {source!r}: the {what} is not mounted on this machine")
    return root


class WatchingSource(Source):
    """Runs :class:`Watch`es for fixed scopes and for the scopes its patterns match."""

    def __init__(
        self,
        name: str,
        *,
        root: Path | None,
        tree: Literal["v1", "v2"],
        patterns: Sequence[str] = (),
        fixed: Sequence[Scope] = (),
        threaded: bool = False,
    ) -> None:
        self.name = name
        self.root = root
        self.faults = 0
        self._patterns = patterns
        self._tree: Literal["v1", "v2"] = tree
        self._fixed = tuple(fixed)
        self._threaded = threaded
        self._watches: dict[Scope, Watch] = {}
        self._shared: list[Watch] = []
        self._poller: Poller[tuple[Watch | ScopeWatcher, int]] | None = None

    @abc.abstractmethod
    def open_watch(self, scope: Scope, poller: Poller[tuple[Watch | ScopeWatcher, int]]) -> Watch:
        """Arm the kernel interface for ``scope``.  Raise OSError or ValueError to refuse."""

    def add_shared(self, watch: Watch) -> None:
        """Keep a shared watch (already in the poller) until the source ends."""
        self._shared.append(watch)

    def guarded(self, watch: Watch, call: Callable[[], Iterable[Event]]) -> list[Event]:
        """Run one watch's handler; a fault ends that watch only (for shared watches)."""
        try:
            return list(call())
        except (WatchEnded, OSError, ValueError) as exc:
            self._ended(watch, exc)
            return []

    def scope_dir(self, scope: Scope) -> Path:
        assert self.root is not None
        return self.root / scope.path.lstrip("/")

    @property
    def watching(self) -> list[Scope]:
        return sorted(self._watches)

    def scopes(self) -> list[Scope]:
        return list(self._watches)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} scopes={len(self._watches)} faults={self.faults}>"

    # --- arming and disarming ---------------------------------------------------------------

    def _start(self, scope: Scope) -> None:
        assert self._poller is not None
        try:
            self._watches[scope] = self.open_watch(scope, self._poller)
        except (OSError, ValueError) as exc:
            self.faults += 1
            if isinstance(exc, FileNotFoundError) and scope.tree != "system" and not self.scope_dir(scope).is_dir():
                log.info("%s: %s vanished before it could be watched", self.name, scope)
            else:
                log.warning("%s: cannot watch %s: %s; leaving it alone", self.name, scope, _describe(exc))

    def _stop(self, scope: Scope, why: WatchEnded | None = None) -> None:
        watch = self._watches.pop(scope, None)
        if watch is None:
            return
        watch.close()
        if why is None:
            log.info("%s: %s is gone; stopped watching it", self.name, scope)
        elif why.vanished:
            log.info("%s: %s %s; stopped watching it", self.name, scope, why)
        else:
            self.faults += 1
            log.warning("%s: %s: %s; stopped watching it", self.name, scope, why)

    def _ended(self, watch: Watch, exc: Exception) -> None:
        if isinstance(exc, WatchEnded):
            self._stop(watch.scope, exc)
            return
        vanished = watch.scope.tree != "system" and not self.scope_dir(watch.scope).is_dir()
        self._stop(watch.scope, WatchEnded("vanished" if vanished else _describe(exc), vanished=vanished))

    # --- the loop ---------------------------------------------------------------------------

    async def run(self, emit: Emit, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        self._poller = poller = Poller[tuple[Watch | ScopeWatcher, int]](threaded=self._threaded)
        scopes: ScopeWatcher | None = None
        try:
            for scope in self._fixed:
                self._start(scope)
            if self._patterns:
                assert self.root is not None
                scopes = ScopeWatcher(self.root, self._tree, self._patterns)
                for scope in sorted(scopes.scan()):
                    self._start(scope)
                for pattern in scopes.unmatched():
                    log.warning("%s: %s matches no cgroup yet; watching for it", self.name, pattern)
                poller.register(scopes.fileno(), select.EPOLLIN, (scopes, 0))
            log.info("%s: watching %d scope(s)", self.name, len(self._watches))
            task_status.started()
            await self._loop(emit, poller, scopes)
        finally:
            for scope in list(self._watches):
                self._watches.pop(scope).close()
            for shared in self._shared:
                shared.close()
            self._shared.clear()
            if scopes is not None:
                scopes.close()
            poller.close()
            self._poller = None

    async def _loop(self, emit: Emit, poller: Poller[tuple[Watch | ScopeWatcher, int]], scopes: ScopeWatcher | None) -> None:
        while True:
            deadlines = [w.deadline for w in self._watches.values() if w.deadline is not None]
            timeout = max(0.0, min(deadlines) - time.monotonic()) if deadlines else None
            ready = await poller.wait(timeout)
            now = time.monotonic()
            out: list[Event] = []
            for (watch, tag), events in ready:
                if isinstance(watch, ScopeWatcher):
                    appeared, vanished = watch.changes()
                    for scope in sorted(vanished):
                        self._stop(scope)
                    for scope in sorted(appeared):
                        self._start(scope)
                    continue
                if not watch.shared and self._watches.get(watch.scope) is not watch:
                    continue  # ended earlier in this turn
                out.extend(self.guarded(watch, partial(watch.fired, tag, events, now)))
            for watch in [w for w in self._watches.values() if w.deadline is not None and w.deadline <= now]:
                out.extend(self.guarded(watch, partial(watch.tick, now)))
            for event in out:
                await emit(event)



def _describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.errno is not None:
        where = f" ({exc.filename})" if exc.filename else ""
        return f"{errno.errorcode.get(exc.errno, exc.errno)} ({os.strerror(exc.errno)}){where}"
    return f"{type(exc).__name__}: {exc}"
