"""``Rescuer``: how a program that embeds oomkit asks to be told to release memory before
anyone is killed (the ``oomkit_rescue`` hook as one function).

A service that holds memory it can give back (a cache, buffers, a pool of idle workers)
passes one to its engine::

    def shed(event: oomkit.Event) -> int:
        freed = cache.size()
        cache.clear()
        return freed

    engine = oomkit.Engine(config, plugins=[oomkit.Rescuer(shed, name="shed-cache")])

Once a victim is chosen and before it is killed, the engine calls ``shed``; then it asks the
source whether its condition still holds (usage still over the threshold, the memcg still
under OOM, MemAvailable still low).  If not, the decision ends ``rescued`` and nobody dies;
if it does, or ``shed`` raised or passed ``[engine] rescue_timeout_s``, the kill goes ahead.
Each attempt is in ``Decision.rescues`` with the bytes freed.

The function takes the :class:`~oomkit.Event` and returns the bytes it released by its own
count, or None.  Either way the rescuer reads the scope's usage before and after
(``memory.usage_in_bytes`` of a v1 memcg, ``memory.current`` of a v2 cgroup, the fall of
``MemTotal - MemAvailable`` for the system) and records the larger of the two figures: what
the kernel saw fall is what the re-check looks at.

* A plain function runs on the event loop, so it may touch the service's state without
  locks; it must not block.  An ``async def`` is awaited under the deadline.  With
  ``thread=True`` a blocking function runs in a worker thread, abandoned (it goes on
  running) when the deadline passes.
* ``scopes`` limits it to events of these scopes (a service's own memcg); by default it is
  asked for every event.
* ``name`` names the plugin (in ``Decision.rescues``, logs and ``-p no:NAME``): give each
  rescuer of one engine its own.
* Rescuers run in call order: the one registered last runs first (pluggy's rule); the
  engine stops at the first after which the condition has cleared.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Iterable
from typing import final

import anyio

from .cgroupfs import Mounts, mounts_for, scope_dir
from .config import Config
from .events import Event, Scope
from .plugins import hookimpl
from .procfs import read_meminfo, read_small

__all__ = ["Release", "Rescuer"]

Release = Callable[[Event], "int | None | Awaitable[int | None]"]
"""What a :class:`Rescuer` calls: takes the event, returns the bytes it released or None."""


@final
class Rescuer:
    """A rescue plugin made of one function; see the module docstring."""

    __slots__ = ("name", "release", "scopes", "thread", "_mounts", "_proc")

    def __init__(self, release: Release, *, name: str = "rescuer", scopes: Iterable[Scope] | None = None,
                 thread: bool = False) -> None:
        if not callable(release):
            raise TypeError(f"Rescuer needs a callable, got {type(release).__name__}")
        self.name = name
        self.release = release
        self.scopes = None if scopes is None else frozenset(scopes)
        self.thread = thread
        self._mounts: Mounts | None = None
        self._proc = "/proc"

    def __repr__(self) -> str:
        where = "any scope" if self.scopes is None else ", ".join(sorted(map(str, self.scopes)))
        return f"<Rescuer {self.name} {getattr(self.release, '__qualname__', self.release)!r} for {where}>"

    @hookimpl
    def oomkit_configure(self, config: Config) -> None:
        self._mounts = mounts_for(config.paths)
        self._proc = config.paths.proc

    @hookimpl
    async def oomkit_rescue(self, event: Event) -> tuple[str, int, str] | None:
        if self.scopes is not None and event.scope not in self.scopes:
            return None
        before = self._used(event.scope)
        if self.thread:
            said = await anyio.to_thread.run_sync(self.release, event, abandon_on_cancel=True)
        else:
            said = self.release(event)
        if inspect.isawaitable(said):
            said = await said
        if said is not None and (isinstance(said, bool) or not isinstance(said, int) or said < 0):
            raise TypeError(f"{self.name}: the release function returned {said!r}, not a byte count or None")
        after = self._used(event.scope)
        fell = max(0, before - after) if before is not None and after is not None else 0
        freed = min(max(fell, said or 0), 1 << 62)
        word = "freed" if freed else "nothing"
        said_text = "" if said is None else f"; it says it released {said} bytes"
        return word, freed, f"{self.name}: usage fell by {fell} bytes{said_text}"

    def _used(self, scope: Scope) -> int | None:
        try:
            if scope.tree == "system":
                info = read_meminfo(self._proc, ("MemTotal", "MemAvailable"))
                return info["MemTotal"] - info["MemAvailable"]
            if self._mounts is None:
                return None
            name = "memory.usage_in_bytes" if scope.tree == "v1" else "memory.current"
            text = read_small(scope_dir(self._mounts, scope) / name, 64).strip()
            return int(text) if text.isdigit() else None
        except (OSError, LookupError, KeyError, ValueError):
            return None
