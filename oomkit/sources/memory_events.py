"""cgroup v2 ``memory.events`` counters (low, high, max, oom, oom_kill, oom_group_kill).

kernfs signals a change of the file both by POLLPRI and by inotify ``IN_MODIFY``; inotify is
what systemd uses for ``cgroup.events`` and it needs no worker thread, so one inotify
instance per source watches every cgroup's file (one instance per cgroup would run into
``fs.inotify.max_user_instances``, 128 by default).  A removed cgroup's files get no inotify
event at all (checked on a 6.1 guest: no ``IN_DELETE_SELF``, no ``IN_IGNORED``; kernfs does
not unlink them through the VFS and the watch pins the inode): its watch ends when the
scope watcher sees the directory go, by the ``IN_DELETE`` on its parent.

Each change becomes one ``memory-events`` event carrying, for every counter that moved, its
increase (``<name>_delta``) and its new value; an increase of ``oom_kill`` also becomes a
``kernel-kill`` event, so notifiers report what the kernel's own killer did.
"""

from __future__ import annotations

import errno
import os
import select
from collections.abc import Iterable
from functools import partial
from pathlib import Path

import anyio
from anyio.abc import TaskStatus

from ..cgroupfs import mounts_for, read_keyed
from ..config import Config
from ..events import Event, Scope
from ..inotify import IN_IGNORED, IN_MODIFY, IN_Q_OVERFLOW, Inotify
from ..poller import Poller
from .base import Emit, SourceSettings
from .scopes import ScopeWatcher
from .watching import Watch, WatchEnded, WatchingSource, tree_root

__all__ = ["MemoryEventsSource", "MemoryEventsSourceConfig"]


class MemoryEventsSourceConfig(SourceSettings, frozen=True, tag="memory-events", kw_only=True):
    """cgroup v2 ``memory.events`` (or ``memory.events.local``) counters, watched with inotify.

    Emits ``memory-events`` with each changed counter's increase, and ``kernel-kill`` when
    ``oom_kill`` grew.  ``cgroups`` are v2 paths or globs.
    """

    cgroups: tuple[str, ...]
    """v2 cgroup paths or glob patterns."""
    local: bool = False
    """Watch ``memory.events.local`` (this cgroup only) instead of ``memory.events``."""

    def __post_init__(self) -> None:
        if not self.cgroups:
            raise ValueError("`cgroups` needs at least one cgroup")


PollerT = Poller[tuple[Watch | ScopeWatcher, int]]

_OOM_COUNTERS = frozenset({"oom", "oom_kill", "oom_group_kill"})


class _EventsWatch(Watch):
    def __init__(self, src: MemoryEventsSource, scope: Scope, ino: Inotify) -> None:
        self.scope = scope
        self._src = src
        self.ino = ino
        self.path = src.scope_dir(scope) / src.file
        try:
            self.counters = read_keyed(self.path)
        except FileNotFoundError:
            raise _missing(self.path, scope) from None
        self.wd = ino.add_watch(self.path, IN_MODIFY)

    def fired(self, tag: int, events: int, now: float) -> Iterable[Event]:
        if events & IN_IGNORED:
            raise WatchEnded("was removed", vanished=True)
        try:
            new = read_keyed(self.path)
        except FileNotFoundError:
            raise WatchEnded("was removed", vanished=True) from None
        old, self.counters = self.counters, new
        values: dict[str, float] = {}
        for key, value in new.items():
            delta = value - old.get(key, 0)
            if delta:
                values[f"{key}_delta"] = float(delta)
                values[key] = float(value)
        if not values:
            return ()
        out = [Event(source=self._src.name, kind="memory-events", scope=self.scope, values=values)]
        if values.get("oom_kill_delta", 0) > 0:
            kills = {k: v for k, v in values.items() if k.removesuffix("_delta") in _OOM_COUNTERS}
            out.append(Event(source=self._src.name, kind="kernel-kill", scope=self.scope, values=kills))
        return out

    def close(self) -> None:
        self._src.forget(self)


def _missing(path: Path, scope: Scope) -> Exception:
    """Why a cgroup that exists has no ``memory.events``: the kernel keeps none for the root,
    nor for a cgroup whose parent does not enable the memory controller for it."""
    if not path.parent.is_dir():
        return FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), str(path))
    if scope.path == "/":
        return ValueError(f"the root cgroup has no {path.name} (the kernel keeps none for it): watch its children")
    return ValueError(
        f"no {path.name}: the memory controller is not enabled for this cgroup"
        f" (see {path.parent.parent / 'cgroup.subtree_control'})"
    )


class _Router(Watch):
    """The one inotify fd of a source: hands each event to the watch of its file."""

    shared = True

    def __init__(self, src: MemoryEventsSource, ino: Inotify) -> None:
        self.scope = Scope(tree="v2", path="")
        self._src = src
        self.ino = ino
        self.by_wd: dict[int, _EventsWatch] = {}

    def fired(self, tag: int, events: int, now: float) -> Iterable[Event]:
        masks: dict[int, int] = {}
        overflow = False
        for ev in self.ino.read():
            if ev.mask & IN_Q_OVERFLOW:
                overflow = True
            else:
                masks[ev.wd] = masks.get(ev.wd, 0) | ev.mask
        if overflow:
            # Events were lost: re-read every file (unchanged ones emit nothing).
            for wd in self.by_wd:
                masks[wd] = masks.get(wd, 0) | IN_MODIFY
        out: list[Event] = []
        for wd, mask in masks.items():
            watch = self.by_wd.get(wd)
            if watch is not None:
                out.extend(self._src.guarded(watch, partial(watch.fired, 0, mask, now)))
        return out

    def close(self) -> None:
        self.ino.close()


class MemoryEventsSource(WatchingSource):
    """``memory-events`` and ``kernel-kill`` events from v2 ``memory.events``."""

    settings_type = MemoryEventsSourceConfig

    def __init__(self, spec: MemoryEventsSourceConfig, config: Config) -> None:
        super().__init__(
            spec.source_name,
            root=tree_root(mounts_for(config.paths), "v2", spec.source_name),
            tree="v2",
            patterns=spec.cgroups,
        )
        self.file = "memory.events.local" if spec.local else "memory.events"
        self._router: _Router | None = None

    def open_watch(self, scope: Scope, poller: PollerT) -> Watch:
        if self._router is None:
            self._router = _Router(self, Inotify())
            poller.register(self._router.ino.fileno(), select.EPOLLIN, (self._router, 0))
            self.add_shared(self._router)
        watch = _EventsWatch(self, scope, self._router.ino)
        self._router.by_wd[watch.wd] = watch
        return watch

    async def run(self, emit: Emit, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        try:
            await super().run(emit, task_status=task_status)
        finally:
            self._router = None  # closed with the source's other shared watches

    def forget(self, watch: _EventsWatch) -> None:
        if self._router is not None and self._router.by_wd.pop(watch.wd, None) is not None:
            self._router.ino.rm_watch(watch.wd)
