"""tracefs: finding or mounting it, private instances, and the format files of its events.

The kernel describes every tracepoint's binary record in ``events/<system>/<event>/format``
(field offsets, sizes, signedness, ``__data_loc`` strings) and its ring buffer's page and
event headers in ``events/header_page`` and ``events/header_event``.  Nothing here assumes a
layout those files do not state: a kernel that adds, moves or drops a field (6.1's
``oom:mark_victim`` has ``pid`` alone; 6.18's has nine fields) is read from its own files.

A private instance (``instances/oomkit-<pid>-<n>``) has a ring buffer of its own, so oomkit's
events never mix with anyone else's tracing and its settings (clock, size, wake-up
threshold) change nothing for others.  An instance can be removed only once every file on it
is closed; one left by a crashed run (its pid gone) is removed by :func:`sweep_stale`.

Mounting needs ``CAP_SYS_ADMIN``.  A tracefs that is not mounted anywhere is mounted on a
private directory (``oomkit-tracefs-<pid>-*`` in the temporary directory) and unmounted
again when the last user is done; mounts of crashed runs are swept too.  tracefs has one
superblock, so every mount shows the same instances.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import tempfile
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, final

from .errors import OomkitError
from .procfs import pid_alive

__all__ = [
    "INSTANCE_PREFIX",
    "EventFormat",
    "EventHeader",
    "Field",
    "FormatError",
    "Instance",
    "Mount",
    "PageHeader",
    "RecordError",
    "TracefsUnavailable",
    "find_mount",
    "parse_event_header",
    "parse_format",
    "parse_page_header",
    "sweep_stale",
]

INSTANCE_PREFIX = "oomkit-"
MOUNT_PREFIX = "oomkit-tracefs-"
MAX_STRING = 4096
"""The longest string field a record may carry (comm is 16 bytes; a path a few hundred)."""

_INSTANCE = re.compile(r"^oomkit-(\d+)(?:-\d+)?$")
_MOUNT_DIR = re.compile(r"^oomkit-tracefs-(\d+)-")


class TracefsUnavailable(OomkitError):
    """tracefs cannot be used here; the message says why (not compiled in, no privilege)."""


class FormatError(OomkitError, ValueError):
    """A format or header file this reader cannot use; the message names the file."""


class RecordError(ValueError):
    """A record that does not fit its format (too short, a string outside it)."""


# --- mounts ----------------------------------------------------------------------------------


def _mounts(proc: str) -> list[Path]:
    """Every tracefs mount point, in mount order."""
    try:
        text = Path(f"{proc}/self/mounts").read_text()
    except OSError:
        return []
    out = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[2] == "tracefs":
            # /proc/self/mounts escapes spaces and the like as octal.
            out.append(Path(re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), parts[1])))
    return out


def find_mount(proc: str = "/proc") -> Path | None:
    """A tracefs mount that is not a private one of another oomkit process (``oomkit-*``
    directories: this source's, ``oomkit doctor``'s; they go away with their process)."""
    for where in _mounts(proc):
        if not where.name.startswith("oomkit-"):
            return where
    return None


_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
MNT_DETACH = 2


def _mount_tracefs(target: Path) -> None:
    if _libc.mount(b"nodev", os.fsencode(target), b"tracefs", 0, None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount -t tracefs on {target}: {os.strerror(err)}")


def _umount(target: Path, flags: int = 0) -> int:
    """0, or the errno of a failed umount2."""
    return 0 if _libc.umount2(os.fsencode(target), flags) == 0 else ctypes.get_errno()


@final
class Mount:
    """A tracefs to work in: the system's, or a private mount made for this process.

    ``Mount.open()`` uses a tracefs mounted anywhere (``/sys/kernel/tracing`` usually) and
    mounts one on a private directory only if there is none; :meth:`close` unmounts only
    what it mounted.
    """

    __slots__ = ("path", "ours")

    def __init__(self, path: Path, ours: bool) -> None:
        self.path = path
        self.ours = ours

    @classmethod
    def open(cls, where: str = "", proc: str = "/proc") -> Mount:
        """The tracefs at ``where`` (checked), else the mounted one, else a private mount.

        Raises :class:`TracefsUnavailable` saying why when none can be had.
        """
        if where:
            path = Path(where)
            if not (path / "instances").is_dir():
                raise TracefsUnavailable(f"{path}: not a tracefs mount (no instances/ directory)")
            return cls(path, False)
        found = find_mount(proc)
        if found is not None and (found / "instances").is_dir():
            return cls(found, False)
        if not _filesystem_known(proc):
            raise TracefsUnavailable("the kernel has no tracefs (CONFIG_TRACING is off: not in /proc/filesystems)")
        target = Path(tempfile.mkdtemp(prefix=f"{MOUNT_PREFIX}{os.getpid()}-"))
        try:
            _mount_tracefs(target)
        except OSError as exc:
            target.rmdir()
            need = " (needs CAP_SYS_ADMIN)" if exc.errno == errno.EPERM else ""
            raise TracefsUnavailable(f"tracefs is not mounted and {exc.strerror}{need}") from None
        return cls(target, True)

    def close(self) -> None:
        """Unmount a private mount (lazily if something still uses it) and remove its directory."""
        if not self.ours:
            return
        if _umount(self.path) == errno.EBUSY:
            _umount(self.path, MNT_DETACH)
        try:
            self.path.rmdir()
        except OSError:
            pass
        self.ours = False

    def __repr__(self) -> str:
        return f"<Mount {str(self.path)!r}{' private' if self.ours else ''}>"


def _filesystem_known(proc: str) -> bool:
    try:
        return any(line.split()[-1:] == ["tracefs"] for line in Path(f"{proc}/filesystems").read_text().splitlines())
    except OSError:
        return True  # cannot tell: let the mount say


# --- instances -------------------------------------------------------------------------------


_counter = iter(range(1 << 62))


@final
class Instance:
    """A private tracefs instance, created on construction, removed by :meth:`remove`."""

    __slots__ = ("root", "name", "path")

    def __init__(self, root: Path, name: str | None = None) -> None:
        self.root = root
        self.name = name or f"{INSTANCE_PREFIX}{os.getpid()}-{next(_counter)}"
        self.path = root / "instances" / self.name
        try:
            self.path.mkdir()
        except FileExistsError:
            raise FileExistsError(errno.EEXIST, f"{self.path}: a tracefs instance of that name exists") from None
        except OSError as exc:
            raise TracefsUnavailable(f"cannot create tracefs instance {self.path}: {exc.strerror}") from None

    def write(self, rel: str, value: str) -> None:
        """One ``write`` of ``value`` to a file of the instance; OSError names the file."""
        path = self.path / rel
        try:
            fd = os.open(path, os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC)
        except OSError as exc:
            raise OSError(exc.errno, f"{path}: {exc.strerror}") from None
        try:
            os.write(fd, value.encode())
        except OSError as exc:
            raise OSError(exc.errno, f"{path}: writing {value!r}: {exc.strerror}") from None
        finally:
            os.close(fd)

    def read(self, rel: str) -> str:
        return (self.path / rel).read_text()

    def has_event(self, system: str, event: str) -> bool:
        return (self.path / "events" / system / event / "format").is_file()

    def enable(self, system: str, event: str) -> None:
        self.write(f"events/{system}/{event}/enable", "1")

    def event_format(self, system: str, event: str) -> EventFormat:
        rel = f"events/{system}/{event}/format"
        return parse_format(self.read(rel), str(self.path / rel), system=system)

    def page_header(self) -> PageHeader:
        return parse_page_header(self.read("events/header_page"), str(self.path / "events/header_page"))

    def event_header(self) -> EventHeader:
        return parse_event_header(self.read("events/header_event"), str(self.path / "events/header_event"))

    def cpus(self, online: str = "/sys/devices/system/cpu/online") -> list[int]:
        """The CPUs with a ring buffer to read: ``per_cpu/cpuN`` exists for every possible
        CPU, but an offline one has no buffer (mapping it fails with EINVAL) and writes no
        events.  All of them when ``online`` cannot be read."""
        out = []
        for entry in os.listdir(self.path / "per_cpu"):
            if entry.startswith("cpu") and entry[3:].isdigit():
                out.append(int(entry[3:]))
        try:
            up = parse_cpu_list(Path(online).read_text())
        except (OSError, ValueError):
            return sorted(out)
        return sorted(c for c in out if c in up)

    def cpu_file(self, cpu: int, name: str = "trace_pipe_raw") -> Path:
        return self.path / "per_cpu" / f"cpu{cpu}" / name

    def remove(self, *, attempts: int = 50) -> None:
        """rmdir the instance.  EBUSY means a file on it is still open (someone's fd, a
        mapping): retried briefly, since a file just closed may still be released."""
        remove_instance(self.path, attempts=attempts)

    def __repr__(self) -> str:
        return f"<Instance {str(self.path)!r}>"


def parse_cpu_list(text: str) -> set[int]:
    """``0-3,5`` (the kernel's CPU list format) as a set; ValueError if malformed."""
    out: set[int] = set()
    for part in text.strip().split(","):
        if not part:
            continue
        lo, sep, hi = part.partition("-")
        first, last = int(lo), int(hi) if sep else int(lo)
        if last < first or last - first > 1 << 16:
            raise ValueError(f"bad CPU range {part!r}")
        out.update(range(first, last + 1))
    return out


def remove_instance(path: Path, *, attempts: int = 50) -> None:
    for i in range(attempts):
        try:
            path.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError as exc:
            if exc.errno != errno.EBUSY or i == attempts - 1:
                raise OSError(exc.errno, f"cannot remove tracefs instance {path}: {exc.strerror}") from None
            time.sleep(0.01)


def sweep_stale(root: Path, proc: str = "/proc") -> list[str]:
    """Remove oomkit instances whose creating process is gone, and private tracefs mounts
    of such processes; return what was removed.  Another live oomkit's are left alone."""
    removed: list[str] = []
    try:
        names = os.listdir(root / "instances")
    except OSError:
        names = []
    for name in names:
        m = _INSTANCE.match(name)
        if m and int(m[1]) != os.getpid() and not pid_alive(int(m[1])):
            try:
                remove_instance(root / "instances" / name, attempts=1)
                removed.append(str(root / "instances" / name))
            except OSError:
                pass  # still held by a survivor of that run: leave it
    for where in _mounts(proc):
        m = _MOUNT_DIR.match(where.name)
        if m and int(m[1]) != os.getpid() and not pid_alive(int(m[1])):
            if _umount(where, MNT_DETACH) == 0:
                try:
                    where.rmdir()
                except OSError:
                    pass
                removed.append(str(where))
    return removed


# --- format files ----------------------------------------------------------------------------

FieldKind = Literal["int", "str", "loc", "rel_loc", "bytes"]

_FIELD = re.compile(
    r"^\s*field:\s*(?P<decl>[^;]*?)\s*;\s*offset:\s*(?P<offset>\d+)\s*;\s*size:\s*(?P<size>\d+)\s*;"
    r"(?:\s*signed:\s*(?P<signed>-?\d+)\s*;)?"
)
_NAME = re.compile(r"([A-Za-z_]\w*)\s*(\[[^\]]*\])?$")


@dataclass(frozen=True, slots=True)
class Field:
    """One field of a binary record: where it is, how long, how to read it."""

    name: str
    offset: int
    size: int
    signed: bool
    kind: FieldKind
    decl: str

    @property
    def end(self) -> int:
        return self.offset + self.size


def _field(decl: str, offset: int, size: int, signed: bool, where: str) -> Field:
    m = _NAME.search(decl)
    if m is None:
        raise FormatError(f"{where}: cannot tell the field name in {decl!r}")
    name, array = m[1], m[2]
    ctype = decl[: m.start()].strip()
    kind: FieldKind
    if ctype.startswith("__data_loc"):
        kind = "loc"
    elif ctype.startswith("__rel_loc"):
        kind = "rel_loc"
    elif array is not None:
        kind = "str" if ctype.split()[-1:] == ["char"] else "bytes"
    elif size in (1, 2, 4, 8):
        kind = "int"
    else:
        kind = "bytes"
    if kind in ("loc", "rel_loc") and size != 4:
        raise FormatError(f"{where}: field {name}: a {ctype.split()[0]} field of {size} bytes (4 expected)")
    return Field(name, offset, size, signed, kind, decl)


@dataclass(frozen=True, slots=True)
class EventFormat:
    """A tracepoint's record layout, from its ``format`` file."""

    system: str
    name: str
    id: int
    fields: Mapping[str, Field]
    where: str = ""

    @property
    def size(self) -> int:
        """The fixed part of a record: every field's end (strings of ``__data_loc`` follow)."""
        return max((f.end for f in self.fields.values()), default=0)

    def decode(self, payload: bytes | memoryview, only: Iterable[str] | None = None) -> dict[str, int | str]:
        """The fields of one record.  Raises :class:`RecordError` when the record does not
        fit the format: shorter than its fields, a ``__data_loc`` string outside it or
        longer than :data:`MAX_STRING`."""
        n = len(payload)
        if n < self.size:
            raise RecordError(f"{self.name}: record of {n} bytes, its format needs {self.size}")
        out: dict[str, int | str] = {}
        fields = self.fields.values() if only is None else [self.fields[k] for k in only if k in self.fields]
        for f in fields:
            if f.kind == "int":
                out[f.name] = int.from_bytes(payload[f.offset : f.end], "little", signed=f.signed)
            elif f.kind == "str":
                # A flexible array (``char buf[]``, size 0) runs to the end of the record.
                end = f.end if f.size else min(n, f.offset + MAX_STRING)
                out[f.name] = _text(payload[f.offset : end])
            elif f.kind in ("loc", "rel_loc"):
                loc = int.from_bytes(payload[f.offset : f.end], "little")
                start, length = loc & 0xFFFF, loc >> 16
                if f.kind == "rel_loc":
                    start += f.end
                if length > MAX_STRING or start < self.size or start + length > n:
                    raise RecordError(
                        f"{self.name}: field {f.name}: string at {start}+{length} outside the"
                        f" {n}-byte record (its fixed part ends at {self.size})"
                    )
                out[f.name] = _text(payload[start : start + length])
        return out

    def type_of(self, payload: bytes | memoryview) -> int:
        f = self.fields["common_type"]
        return int.from_bytes(payload[f.offset : f.end], "little")


def _text(raw: bytes | memoryview) -> str:
    b = bytes(raw)
    nul = b.find(b"\0")
    return (b if nul < 0 else b[:nul]).decode("utf-8", errors="replace")


def parse_format(text: str, where: str = "format", *, system: str = "") -> EventFormat:
    """An :class:`EventFormat` from a ``format`` file's text; :class:`FormatError` if unusable."""
    name = ""
    ident = -1
    fields: dict[str, Field] = {}
    for line in text.splitlines():
        if line.startswith("name:"):
            name = line[5:].strip()
        elif line.startswith("ID:"):
            try:
                ident = int(line[3:].strip())
            except ValueError:
                raise FormatError(f"{where}: bad ID line {line!r}") from None
        else:
            m = _FIELD.match(line)
            if m:
                f = _field(m["decl"], int(m["offset"]), int(m["size"]), m["signed"] == "1", where)
                fields[f.name] = f
    if not name or ident < 0:
        raise FormatError(f"{where}: no name or ID line")
    if "common_type" not in fields or fields["common_type"].kind != "int":
        raise FormatError(f"{where}: no common_type field")
    return EventFormat(system, name, ident, fields, where)


# --- the ring buffer's own headers ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PageHeader:
    """A sub-buffer's header (``events/header_page``): its timestamp, its commit word (the
    bytes of data it holds, flags in the high bits), and where the data starts."""

    timestamp_offset: int
    timestamp_size: int
    commit_offset: int
    commit_size: int
    data_offset: int
    data_size: int

    @property
    def subbuf_size(self) -> int:
        return self.data_offset + self.data_size


def parse_page_header(text: str, where: str = "header_page") -> PageHeader:
    found: dict[str, tuple[int, int]] = {}
    for line in text.splitlines():
        m = _FIELD.match(line)
        if m:
            name = m["decl"].split()[-1]
            found.setdefault(name, (int(m["offset"]), int(m["size"])))
    try:
        ts, commit, data = found["timestamp"], found["commit"], found["data"]
    except KeyError as exc:
        raise FormatError(f"{where}: no {exc.args[0]} field") from None
    header = PageHeader(ts[0], ts[1], commit[0], commit[1], data[0], data[1])
    if ts[1] != 8 or commit[1] not in (4, 8) or data[0] < max(ts[0] + ts[1], commit[0] + commit[1]):
        raise FormatError(f"{where}: a page header this reader does not know ({header})")
    if not 0 < data[1] <= 1 << 24:
        raise FormatError(f"{where}: data size {data[1]} out of range")
    return header


@dataclass(frozen=True, slots=True)
class EventHeader:
    """The compressed entry header (``events/header_event``): a 32-bit word of ``type_len``
    (low bits) and ``time_delta``, then ``array`` words, and the type codes."""

    type_len_bits: int
    time_delta_bits: int
    padding: int
    time_extend: int
    time_stamp: int
    data_max: int


_HEADER_LINE = re.compile(r"^\s*(type_len|time_delta|array)\s*:\s*(\d+)\s*bits")
_TYPE_LINE = re.compile(r"^\s*(padding|time_extend|time_stamp)\s*:\s*type\s*==\s*(\d+)")
_DATA_MAX = re.compile(r"^\s*data max type_len\s*==\s*(\d+)")


def parse_event_header(text: str, where: str = "header_event") -> EventHeader:
    bits: dict[str, int] = {}
    types: dict[str, int] = {}
    data_max = -1
    for line in text.splitlines():
        if m := _HEADER_LINE.match(line):
            bits[m[1]] = int(m[2])
        elif m := _TYPE_LINE.match(line):
            types[m[1]] = int(m[2])
        elif m := _DATA_MAX.match(line):
            data_max = int(m[1])
    try:
        header = EventHeader(
            bits["type_len"], bits["time_delta"], types["padding"], types["time_extend"], types["time_stamp"], data_max
        )
    except KeyError as exc:
        raise FormatError(f"{where}: no {exc.args[0]} line") from None
    if header.type_len_bits + header.time_delta_bits != 32 or bits.get("array", 32) != 32:
        raise FormatError(f"{where}: entry header is not one 32-bit word plus 32-bit array words ({header})")
    limit = (1 << header.type_len_bits) - 1
    codes = {header.padding, header.time_extend, header.time_stamp}
    if len(codes) != 3 or not 0 < data_max < min(codes) or max(codes) > limit:
        raise FormatError(f"{where}: type codes this reader cannot use ({header})")
    return header
