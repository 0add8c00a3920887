"""Which cgroups a source watches: paths and glob patterns, followed as cgroups come and go.

A pattern is a cgroup path relative to its tree's mount (``/workload.slice/*.service``) or an
absolute cgroupfs path under that mount; each component may hold ``fnmatch`` wildcards
(``*``, ``?``, ``[...]``), which never cross a ``/``, as in oomd.

Following changes: inotify ``IN_CREATE``/``IN_DELETE`` on every directory a new match could
appear in (the parents of the matches, and the directories at each wildcard level above
them), and a fresh expansion of the patterns whenever one of them changes.  cgroups are
made and removed only by ``mkdir``/``rmdir`` through the VFS, which always emits those
events, so nothing is missed; a watcher costs nothing while no cgroup changes, and a new
cgroup is watched within one loop turn.  A periodic rescan would cost a directory walk per
period for every source and still lag by a period.  If the inotify queue overflows, the
next expansion is a full one anyway.
"""

from __future__ import annotations

import fnmatch
import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Literal, final

from ..events import Scope
from ..inotify import (
    IN_CREATE,
    IN_DELETE,
    IN_DELETE_SELF,
    IN_IGNORED,
    IN_ISDIR,
    IN_MOVED_FROM,
    IN_MOVED_TO,
    IN_ONLYDIR,
    IN_Q_OVERFLOW,
    Inotify,
)

__all__ = ["ScopeWatcher", "has_magic", "matches", "relative_pattern"]

log = logging.getLogger("oomkit.sources.scopes")

_DIR_MASK = IN_CREATE | IN_DELETE | IN_MOVED_FROM | IN_MOVED_TO | IN_DELETE_SELF | IN_ONLYDIR
_MAGIC = frozenset("*?[")


def relative_pattern(root: Path, pattern: str) -> str:
    """``pattern`` relative to the tree's mount, normalised to start with ``/``."""
    p = Path(pattern)
    if p.is_absolute() and (p == root or root in p.parents):
        rel = str(p.relative_to(root))
        return "/" if rel == "." else "/" + rel
    return "/" + pattern.strip("/") if pattern.strip("/") else "/"


def has_magic(pattern: str) -> bool:
    """Does ``pattern`` hold a wildcard (``*``, ``?``, ``[``)?"""
    return not _MAGIC.isdisjoint(pattern)


def matches(pattern: str, path: str) -> bool:
    """Does the cgroup ``path`` match ``pattern`` (both relative to the mount), component by
    component, as :class:`ScopeWatcher` expands it?"""
    want = [p for p in pattern.split("/") if p]
    have = [p for p in path.split("/") if p]
    return len(want) == len(have) and all(fnmatch.fnmatchcase(h, w) for w, h in zip(want, have))


def _subdirs(d: Path) -> list[str]:
    try:
        with os.scandir(d) as it:
            return [e.name for e in it if e.is_dir(follow_symlinks=False)]
    except OSError:
        return []


@final
class ScopeWatcher:
    """Expands patterns against one tree and tells which scopes appeared or vanished."""

    __slots__ = ("root", "tree", "patterns", "_ino", "_dirs", "_current")

    def __init__(self, root: Path, tree: Literal["v1", "v2"], patterns: Sequence[str]) -> None:
        self.root = root
        self.tree = tree
        self.patterns = tuple(relative_pattern(root, p) for p in patterns)
        self._ino: Inotify | None = None
        self._dirs: dict[Path, int] = {}  # watched directory -> watch descriptor
        self._current: set[Scope] = set()

    def fileno(self) -> int:
        """The inotify fd to wait on (readable when a watched directory changed)."""
        if self._ino is None:
            self._ino = Inotify()
        return self._ino.fileno()

    def _expand(self, pattern: str) -> tuple[list[Path], list[Path]]:
        """``(matches, directories to watch)`` for one pattern."""
        parts = [p for p in pattern.split("/") if p]
        level = [self.root]
        watch: list[Path] = []
        for part in parts:
            watch.extend(level)
            nxt: list[Path] = []
            for d in level:
                if has_magic(part):
                    nxt.extend(d / n for n in sorted(_subdirs(d)) if fnmatch.fnmatchcase(n, part))
                elif (d / part).is_dir():
                    nxt.append(d / part)
            level = nxt
        return level, watch

    def scan(self) -> set[Scope]:
        """Every scope matching now; also (re)places the directory watches."""
        found: set[Scope] = set()
        want: set[Path] = set()
        for pattern in self.patterns:
            matches, watch = self._expand(pattern)
            want.update(watch)
            for m in matches:
                rel = "/" + str(m.relative_to(self.root)) if m != self.root else "/"
                found.add(Scope(tree=self.tree, path=rel))
        self.fileno()
        self._rewatch(want)
        self._current = found
        return set(found)

    def _rewatch(self, want: set[Path]) -> None:
        assert self._ino is not None
        for d in [d for d in self._dirs if d not in want]:
            self._ino.rm_watch(self._dirs.pop(d))
        for d in want - self._dirs.keys():
            try:
                self._dirs[d] = self._ino.add_watch(d, _DIR_MASK)
            except OSError as exc:
                # Gone between the walk and here: its parent's watch reports it.
                log.debug("cannot watch %s: %s", d, exc)

    def changes(self) -> tuple[set[Scope], set[Scope]]:
        """After the fd became readable: ``(appeared, vanished)`` since the last call."""
        assert self._ino is not None
        relevant = False
        for ev in self._ino.read():
            if ev.mask & IN_IGNORED:
                # The kernel dropped this watch (its directory is gone); a directory made
                # again at the same path needs a new one.
                self._dirs = {d: wd for d, wd in self._dirs.items() if wd != ev.wd}
            if ev.mask & (IN_ISDIR | IN_Q_OVERFLOW | IN_IGNORED | IN_DELETE_SELF):
                relevant = True
        if not relevant:
            return set(), set()
        before = self._current
        after = self.scan()
        return after - before, before - after

    def close(self) -> None:
        if self._ino is not None:
            self._ino.close()
            self._ino = None
        self._dirs.clear()

    def unmatched(self) -> Iterable[str]:
        """Patterns that match nothing now (worth a warning: a typo waits forever)."""
        for pattern in self.patterns:
            if not self._expand(pattern)[0]:
                yield pattern

    def __repr__(self) -> str:
        return f"<ScopeWatcher {self.tree} patterns={list(self.patterns)} scopes={len(self._current)}>"
