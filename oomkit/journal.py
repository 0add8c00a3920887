"""The takeover journal: every cgroup value oomkit changes, with its original, on disk first.

If every oomkit process dies at once (a service manager's SIGKILL of the whole unit), a
memcg left at ``oom_kill_disable=1`` stays paused at its next OOM, and a v2 cgroup left with
a lowered ``memory.high`` stays throttled.  So before oomkit writes such a value it records,
under ``[paths] run_dir``/``journal``, what it found and what it is about to write;
``oomkit restore`` (:mod:`oomkit.restore`) puts the originals back, and ``oomkit serve`` does
the same at start.

Format: one small JSON file per changed value (:class:`Entry`), named after a hash of the
tree, the cgroup path, the file and the cgroup's inode (:meth:`Journal.name_for`), so any
path, however long, gives a short name, one cgroup value is one entry however often it is
journalled, and a cgroup made again at the same path gets an entry of its own.  Each
is written whole to a temporary file, ``fsync``\\ ed and renamed over its name, and the
directory is ``fsync``\\ ed: a reader sees the old entry or the new one, never a torn one.
Removing an entry is one ``unlink``, done by whoever put the original back.  The journal is
bounded: an entry is at most :data:`MAX_ENTRY_BYTES` (a path at most ``PATH_MAX``), and at
most :data:`MAX_ENTRIES` exist; one exists per cgroup value held, and each goes when its
value is restored or its cgroup is removed.

A restore writes an original back only while the file still holds the value oomkit wrote
(systemd and the kubelet write ``memory.high`` too: a newer value is theirs), only to the
cgroup that was journalled (its inode), and only when no running oomkit holds that cgroup's
lock (:mod:`oomkit.cgroupdir`).
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Literal, final

import msgspec

from .errors import OomkitError
from .procfs import pid_alive

__all__ = ["JOURNAL_DIR", "MAX_ENTRIES", "MAX_ENTRY_BYTES", "Entry", "Journal", "JournalError"]

JOURNAL_DIR = "journal"
MAX_ENTRY_BYTES = 16384
MAX_ENTRIES = 65536
_SUFFIX = ".json"
_TMP = ".tmp-"

Value = Annotated[str, msgspec.Meta(min_length=1, max_length=32, pattern=r"^(max|[0-9]+)$")]
"""A cgroup value as written to its file: ``0``/``1`` for ``oom_kill_disable``, bytes or
``max`` for ``memory.high``."""

_FILES = {"v1": "memory.oom_control", "v2": "memory.high"}


class JournalError(OomkitError):
    """A journal entry that cannot be written or read; the message names the file."""


class Entry(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """One journalled value: what oomkit found in ``file`` of cgroup ``path`` and wrote over it."""

    version: Annotated[int, msgspec.Meta(ge=1, le=1)] = 1
    tree: Literal["v1", "v2"]
    path: Annotated[str, msgspec.Meta(min_length=1, max_length=4095)]
    """The cgroup's canonical path in its tree (``/jobs/a``)."""
    file: Literal["memory.oom_control", "memory.high"]
    """``memory.oom_control`` (its ``oom_kill_disable``) for v1, ``memory.high`` for v2."""
    original: Value
    """What the file held before oomkit changed it: what a restore puts back."""
    written: Value
    """What oomkit wrote: a restore changes the file only while it still holds this."""
    ino: Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]
    """The cgroup directory's inode: a cgroup made again at the same path is another one."""
    pid: Annotated[int, msgspec.Meta(ge=0, le=2**22)]
    """The oomkit process that journalled it."""
    source: Annotated[str, msgspec.Meta(max_length=256)] = ""
    wall_time: Annotated[float, msgspec.Meta(ge=0, le=1e11)] = 0.0

    def __post_init__(self) -> None:
        if not self.path.startswith("/"):
            raise ValueError("`path` must start with '/'")
        if _FILES[self.tree] != self.file:
            raise ValueError(f"a {self.tree} entry journals {_FILES[self.tree]}, not {self.file}")
        if not math.isfinite(self.wall_time):
            raise ValueError("`wall_time` must be finite")

    @property
    def label(self) -> str:
        """``v1:/jobs/a``, as scopes print."""
        return f"{self.tree}:{self.path}"


_decoder = msgspec.json.Decoder(Entry)
_encoder = msgspec.json.Encoder()


@final
class Journal:
    """The journal directory ``RUN_DIR/journal``."""

    __slots__ = ("dir",)

    def __init__(self, run_dir: str | os.PathLike[str]) -> None:
        self.dir = Path(run_dir) / JOURNAL_DIR

    def ensure(self) -> None:
        """Create the directory (mode 0700) if needed; OSError if that is refused."""
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)

    @staticmethod
    def name_for(tree: str, path: str, file: str, ino: int) -> str:
        digest = hashlib.sha256(f"{tree}\0{path}\0{file}\0{ino}".encode(errors="surrogateescape")).hexdigest()
        return f"{tree}-{digest[:40]}{_SUFFIX}"

    def names(self) -> list[str]:
        """The entries' file names, sorted; temporary files of dead writers are removed."""
        try:
            listed = os.listdir(self.dir)
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise JournalError(f"journal {self.dir}: cannot list it: {exc.strerror}") from None
        out = []
        for name in listed:
            if name.startswith(_TMP):
                pid = name[len(_TMP) :].split("-", 1)[0]
                if pid.isdigit() and not pid_alive(int(pid)):
                    try:
                        os.unlink(self.dir / name)
                    except OSError:
                        pass
            elif name.endswith(_SUFFIX):
                out.append(name)
        return sorted(out)

    def write(self, entry: Entry) -> str:
        """Journal ``entry`` durably (replacing one for the same value); returns its name."""
        name = self.name_for(entry.tree, entry.path, entry.file, entry.ino)
        data = _encoder.encode(entry) + b"\n"
        if len(data) > MAX_ENTRY_BYTES:
            raise JournalError(f"journal entry for {entry.label}: {len(data)} bytes, more than {MAX_ENTRY_BYTES}")
        final_path = self.dir / name
        if not final_path.exists() and len(self.names()) >= MAX_ENTRIES:
            raise JournalError(f"journal {self.dir}: full ({MAX_ENTRIES} entries); {entry.label} not taken over")
        tmp = self.dir / f"{_TMP}{os.getpid()}-{name}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, final_path)
            self._sync_dir()
        except OSError as exc:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise JournalError(f"journal {self.dir}: cannot write the entry for {entry.label}: {exc.strerror}") from None
        return name

    def _sync_dir(self) -> None:
        fd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def read(self, name: str) -> Entry:
        """One entry; :class:`JournalError` naming the file if it is unreadable or invalid."""
        path = self.dir / name
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
            try:
                data = os.read(fd, MAX_ENTRY_BYTES + 1)
            finally:
                os.close(fd)
        except OSError as exc:
            raise JournalError(f"journal entry {path}: {exc.strerror}") from None
        if len(data) > MAX_ENTRY_BYTES:
            raise JournalError(f"journal entry {path}: larger than {MAX_ENTRY_BYTES} bytes")
        try:
            entry = _decoder.decode(data)
        except msgspec.DecodeError as exc:
            raise JournalError(f"journal entry {path}: {exc}") from None
        if name != self.name_for(entry.tree, entry.path, entry.file, entry.ino):
            raise JournalError(f"journal entry {path}: its name does not match its cgroup {entry.label}")
        return entry

    def find(self, tree: str, path: str, file: str, ino: int) -> tuple[str, Entry] | None:
        """The entry for one cgroup value, if one is journalled and readable."""
        name = self.name_for(tree, path, file, ino)
        if not (self.dir / name).exists():
            return None
        try:
            return name, self.read(name)
        except JournalError:
            return None

    def entries(self) -> Iterator[tuple[str, Entry | JournalError]]:
        """Every entry, or the error that makes it unreadable."""
        for name in self.names():
            try:
                yield name, self.read(name)
            except JournalError as exc:
                yield name, exc

    def remove(self, name: str) -> None:
        """Remove an entry (no error if it is already gone)."""
        try:
            os.unlink(self.dir / name)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise JournalError(f"journal entry {self.dir / name}: cannot remove it: {exc.strerror}") from None

    @staticmethod
    def entry(tree: Literal["v1", "v2"], path: str, original: str, written: str, ino: int, source: str) -> Entry:
        """An entry for a value this process is about to write."""
        return Entry(
            tree=tree,
            path=path,
            file="memory.oom_control" if tree == "v1" else "memory.high",
            original=original,
            written=written,
            ino=ino,
            pid=os.getpid(),
            source=source,
            wall_time=time.time(),
        )

    def __repr__(self) -> str:
        return f"<Journal {self.dir}>"
