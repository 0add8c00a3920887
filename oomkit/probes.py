"""Probes: what this kernel and machine offer oomkit, one small function per capability.

Each probe takes a :class:`Machine` (where the kernel's files are, and how to make and
remove the directories a probe needs) and returns a frozen :class:`Probe`: ``ok`` is True
when the capability is there, False when it is not, None when the probe could not tell;
``summary`` says which in one line, in the words ``oomkit doctor`` prints and the test
suite's skips use; ``detail`` holds the facts found, JSON-ready.

Probes never change the system for good.  What one creates to find out (a child memcg, a
v2 cgroup, a tracefs mount or instance, a PSI trigger fd) is named
``oomkit-doctor-<pid>-<n>`` and removed before it returns, on error too; what one changes
in our own process (``oom_score_adj``, ``mlockall``) is put back at once.  None of them
waits for the kernel to do anything.

:data:`PROBES` lists every probe in the order ``oomkit doctor`` prints them;
:func:`run_probe` runs one by name and turns an unexpected failure into an ``ok=None``
result, so one broken probe never hides the others.
"""

from __future__ import annotations

import ctypes
import errno
import itertools
import mmap
import os
import re
import resource
import signal
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, final

import msgspec

from .cgroupfs import mounts_for, read_keyed, register_v1_event, write_value
from .config import PathsConfig
from .errors import OomkitError, describe
from .procfs import list_pids, own_cgroup, read_cmdline, read_meminfo, read_small
from .psi import open_trigger, read_pressure

__all__ = [
    "CAPABILITIES",
    "CleanupError",
    "OOM_DAEMONS",
    "PREFIX",
    "PROBES",
    "RELEVANT_CAPABILITIES",
    "Machine",
    "OomDaemon",
    "Probe",
    "ProbeSpec",
    "capabilities",
    "find_oom_daemons",
    "kernel_version",
    "run_all",
    "run_probe",
    "syscall_verdict",
]

PREFIX = "oomkit-doctor-"
"""Everything a probe creates is named ``PREFIX<pid>-<n>``."""

_seq = itertools.count()


def _unique() -> str:
    return f"{PREFIX}{os.getpid()}-{next(_seq)}"


@final
class Probe(msgspec.Struct, frozen=True, kw_only=True):
    """One probe's answer: ``ok`` True (offered), False (not), None (could not tell)."""

    name: str
    ok: bool | None
    summary: str
    """One line: what is there, or why not."""
    detail: dict[str, Any] = msgspec.field(default_factory=dict)
    """The facts found (paths, values, errnos), JSON-ready; keys differ per probe."""

    @property
    def reason(self) -> str:
        """``name: summary``, as a skip reason or a log line."""
        return f"{self.name}: {self.summary}"


def _yes(name: str, summary: str, detail: dict[str, Any] | None = None) -> Probe:
    return Probe(name=name, ok=True, summary=summary, detail=detail or {})


def _no(name: str, summary: str, detail: dict[str, Any] | None = None) -> Probe:
    return Probe(name=name, ok=False, summary=summary, detail=detail or {})


# --- where the kernel is, and how probes touch it -------------------------------------------


def _libc() -> ctypes.CDLL:
    # A CDLL object of our own: argtypes set here never leak into another module's calls.
    return ctypes.CDLL(None, use_errno=True)


class CleanupError(OomkitError):
    """A probe could not remove what it made (the message names it): remove it by hand."""


def _kernel_rmdir(path: Path) -> None:
    # A tracefs instance or cgroup can stay busy for a moment after its last fd or task.
    for _ in range(100):
        try:
            os.rmdir(path)
            return
        except OSError as exc:
            if exc.errno != errno.EBUSY:
                raise
        time.sleep(0.01)
    os.rmdir(path)


def _mount_tracefs(target: Path) -> None:
    libc = _libc()
    libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p]
    if libc.mount(b"nodev", os.fsencode(target), b"tracefs", 0, None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(target))


def _umount(target: Path) -> None:
    libc = _libc()
    libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
    if libc.umount2(os.fsencode(target), 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(target))


@dataclass(frozen=True, slots=True)
class Machine:
    """Where the probes look, and the few operations they need beyond reading files.

    ``mkdir``/``rmdir`` make and remove cgroups and tracefs instances (the kernel fills a
    new one with its files; a fake tree's ``mkdir`` has to do the same); ``mount``/``umount``
    mount tracefs where none is mounted.  The system calls probed (``mlockall``,
    ``process_mrelease``, pidfds) are always the real ones: they change nothing.
    """

    proc: str
    memory_v1: Path | None
    """The cgroup v1 memory mount (None: not mounted)."""
    unified: Path | None
    """The cgroup v2 mount (None: not mounted)."""
    sys: str = "/sys"
    mkdir: Callable[[Path], None] = os.mkdir
    rmdir: Callable[[Path], None] = _kernel_rmdir
    mount: Callable[[Path], None] = _mount_tracefs
    umount: Callable[[Path], None] = _umount

    @classmethod
    def from_paths(cls, paths: PathsConfig, **fields: Any) -> Machine:
        """The machine ``[paths]`` describes (mounts it leaves empty are discovered)."""
        mounts = mounts_for(paths)
        return cls(proc=paths.proc, memory_v1=mounts.memory_v1, unified=mounts.unified, **fields)

    @contextmanager
    def child(self, parent: Path) -> Iterator[Path]:
        """A uniquely named directory under ``parent``, removed on the way out."""
        path = parent / _unique()
        self.mkdir(path)
        try:
            yield path
        finally:
            try:
                self.rmdir(path)
            except OSError as exc:
                # Not an OSError: a probe's own error handling must never swallow it.
                raise CleanupError(f"could not remove {path}: {_strerror(exc)}") from exc


@dataclass(frozen=True, slots=True)
class _Mount:
    where: str
    fstype: str
    options: tuple[str, ...]


def _unescape(field_: str) -> str:
    # /proc/self/mounts writes space, tab, newline and backslash as octal escapes.
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), field_)


def _mounts(proc: str) -> list[_Mount]:
    out = []
    for line in Path(proc, "self", "mounts").read_text().splitlines():
        parts = line.split()
        if len(parts) >= 4:
            out.append(_Mount(_unescape(parts[1]), parts[2], tuple(parts[3].split(","))))
    return out


_V1_CONTROLLERS = frozenset(
    "cpuset cpu cpuacct blkio io memory devices freezer net_cls perf_event net_prio hugetlb pids rdma misc debug".split()
)


def _v1_hierarchies(proc: str) -> dict[str, str]:
    """``{controller or name=X: mount point}`` of every cgroup v1 mount."""
    out: dict[str, str] = {}
    for m in _mounts(proc):
        if m.fstype == "cgroup":
            for opt in m.options:
                if opt in _V1_CONTROLLERS or opt.startswith("name="):
                    out.setdefault(opt, m.where)
    return out


def _words(path: Path) -> list[str]:
    try:
        return read_small(path, 65536).decode().split()
    except FileNotFoundError:
        return []


def _strerror(exc: OSError) -> str:
    name = errno.errorcode.get(exc.errno or 0, "")
    return f"{exc.strerror or exc} ({name})" if name else str(exc.strerror or exc)


# --- kernel and cgroups ---------------------------------------------------------------------


def kernel_version(proc: str = "/proc") -> tuple[int, int] | None:
    """``(major, minor)`` of the running kernel, from ``PROC/sys/kernel/osrelease``."""
    m = re.match(r"(\d+)\.(\d+)", read_small(f"{proc}/sys/kernel/osrelease", 256).decode())
    return (int(m[1]), int(m[2])) if m else None


def probe_kernel(m: Machine) -> Probe:
    release = read_small(f"{m.proc}/sys/kernel/osrelease", 256).decode().strip()
    version = kernel_version(m.proc)
    return _yes("kernel", f"Linux {release}",
        detail={"release": release, "version": list(version) if version else None})


def probe_cgroup_layout(m: Machine) -> Probe:
    v1 = _v1_hierarchies(m.proc)
    v2 = str(m.unified) if m.unified is not None else None
    root_controllers = _words(m.unified / "cgroup.controllers") if m.unified is not None else []
    layout = "hybrid" if v1 and v2 else "v1" if v1 else "v2" if v2 else "none"
    detail: dict[str, Any] = {
        "layout": layout,
        "v1": v1,
        "memory_v1": str(m.memory_v1) if m.memory_v1 is not None else None,
        "v2": v2,
        "v2_root_controllers": root_controllers,
    }
    if layout == "none":
        return _no("cgroup-layout", "no cgroup hierarchy is mounted", detail)
    parts = []
    if v1:
        parts.append(f"v1 {', '.join(sorted(v1))}")
    if v2:
        parts.append(f"v2 at {v2} with {' '.join(root_controllers) or 'no controllers'}")
    return _yes("cgroup-layout", f"{layout}: {'; '.join(parts)}", detail)


def _v1_parent(m: Machine, controller: str = "memory") -> tuple[Path | None, str, dict[str, Any]]:
    """Our own v1 cgroup directory for ``controller``, or None and why."""
    if controller == "memory":
        mount = m.memory_v1
    else:
        where = _v1_hierarchies(m.proc).get(controller)
        mount = Path(where) if where else None
    label = f"cgroup v1 {controller}"
    if mount is None:
        return None, f"no {label} hierarchy is mounted (see {m.proc}/self/mounts)", {}
    own = own_cgroup(m.proc, controller)
    detail: dict[str, Any] = {"mount": str(mount), "cgroup": own}
    if own is None:
        return None, f"we are in no {label} cgroup ({m.proc}/self/cgroup has no {controller} line)", detail
    d = mount / own.lstrip("/")
    detail["dir"] = str(d)
    if not d.is_dir():
        return None, f"our {label} cgroup {own} is not visible at {d}", detail
    return d, "", detail


def _v1_probe(m: Machine, name: str, controller: str, control: str) -> Probe:
    parent, why, detail = _v1_parent(m, controller)
    if parent is None:
        return _no(name, why, detail)
    try:
        with m.child(parent) as child:
            has_control = (child / control).exists()
    except OSError as exc:
        return _no(name, f"cannot create a cgroup v1 {controller} cgroup under {parent}: {_strerror(exc)}", detail)
    if not has_control:
        return _no(name, f"a new child of {parent} has no {control}", detail)
    return _yes(name, f"our {controller} cgroup {detail['cgroup']}: children can be made there", detail)


def probe_cgroup_v1_memory(m: Machine) -> Probe:
    return _v1_probe(m, "cgroup-v1-memory", "memory", "memory.limit_in_bytes")


def probe_freezer_v1(m: Machine) -> Probe:
    return _v1_probe(m, "freezer-v1", "freezer", "freezer.state")


def probe_takeover_v1(m: Machine) -> Probe:
    """oom_kill_disable set and cleared in a child of our memcg, and an OOM eventfd armed."""
    name = "takeover-v1"
    parent, why, detail = _v1_parent(m)
    if parent is None:
        return _no(name, why, detail)
    step = f"creating a child memcg under {parent}"
    try:
        with m.child(parent) as child:
            oom = child / "memory.oom_control"
            step = f"writing oom_kill_disable=1 to {oom}"
            write_value(oom, 1)
            try:
                step = f"registering an OOM eventfd through {child}/cgroup.event_control"
                register_v1_event(child, "memory.oom_control").close()
            finally:
                step = f"writing oom_kill_disable=0 to {oom}"
                write_value(oom, 0)
    except OSError as exc:
        return _no(name, f"{step}: {_strerror(exc)}", detail)
    text = f"oom_kill_disable set and cleared, OOM eventfd armed, in a child of our memcg {detail['cgroup']}"
    return _yes(name, text, detail)


def _v2_parent(m: Machine) -> tuple[Path | None, str, dict[str, Any]]:
    """Our own v2 cgroup directory, or None and why; the detail names its controllers."""
    if m.unified is None:
        return None, f"no cgroup v2 hierarchy is mounted (see {m.proc}/self/mounts)", {}
    own = own_cgroup(m.proc, "")
    detail: dict[str, Any] = {"mount": str(m.unified), "cgroup": own}
    if own is None:
        return None, f"we are in no cgroup v2 cgroup ({m.proc}/self/cgroup has no 0:: line)", detail
    d = m.unified / own.lstrip("/")
    detail["dir"] = str(d)
    if not d.is_dir():
        return None, f"our cgroup v2 cgroup {own} is not visible at {d}", detail
    at_root = d == m.unified
    detail["root_controllers"] = _words(m.unified / "cgroup.controllers")
    # Our cgroup's own controllers are exactly what its parent enabled in subtree_control.
    detail["parent_subtree_control"] = None if at_root else _words(d.parent / "cgroup.subtree_control")
    detail["controllers"] = _words(d / "cgroup.controllers")
    detail["subtree_control"] = _words(d / "cgroup.subtree_control")
    return d, "", detail


def probe_cgroup_v2(m: Machine) -> Probe:
    name = "cgroup-v2"
    parent, why, detail = _v2_parent(m)
    if parent is None:
        return _no(name, why, detail)
    try:
        with m.child(parent):
            pass
    except OSError as exc:
        return _no(name, f"cannot create a cgroup v2 cgroup under {parent}: {_strerror(exc)}", detail)
    ours = " ".join(detail["controllers"]) or "none"
    children = " ".join(detail["subtree_control"]) or "none"
    return _yes(name, f"our cgroup {detail['cgroup']}: controllers {ours}; enabled for its children: {children}",
                detail)


def _v2_memory_missing(m: Machine, parent: Path, detail: dict[str, Any]) -> str | None:
    """Why a child of ``parent`` gets no memory controller, or None when it does."""
    if "memory" not in detail["root_controllers"]:
        root = detail["mount"]
        v1 = f"; it is bound to the v1 hierarchy at {m.memory_v1}" if m.memory_v1 is not None else ""
        return (
            f"cgroup v2 has no memory controller ({root}/cgroup.controllers: "
            f"{' '.join(detail['root_controllers']) or 'none'}{v1})"
        )
    if "memory" not in detail["controllers"]:
        return (
            f"the memory controller is not enabled for our cgroup {detail['cgroup']} "
            f"({parent.parent}/cgroup.subtree_control: {' '.join(detail['parent_subtree_control'] or []) or 'none'})"
        )
    if "memory" not in detail["subtree_control"]:
        return (
            f"the memory controller is not enabled for children of our cgroup {detail['cgroup']} "
            f"({parent}/cgroup.subtree_control: {' '.join(detail['subtree_control']) or 'none'}; "
            "'+memory' there enables it, which a cgroup with processes of its own may only do at the root)"
        )
    return None


def probe_cgroup_v2_memory(m: Machine) -> Probe:
    """A child of our v2 cgroup has the memory controller: ``memory.events`` is there."""
    name = "cgroup-v2-memory"
    parent, why, detail = _v2_parent(m)
    if parent is None:
        return _no(name, why, detail)
    missing = _v2_memory_missing(m, parent, detail)
    if missing:
        return _no(name, missing, detail)
    try:
        with m.child(parent) as child:
            detail["memory_events"] = read_keyed(child / "memory.events")
    except OSError as exc:
        return _no(name, f"memory.events in a new child of {parent}: {_strerror(exc)}", detail)
    return _yes(name, f"children of our cgroup {detail['cgroup']} have the memory controller (memory.events)", detail)


_BRAKE_HIGH = 1 << 30
_BRAKE_MAX = 2 << 30


def probe_brake_v2(m: Machine) -> Probe:
    """``memory.high`` and ``memory.max`` can be written in a child v2 cgroup."""
    name = "brake-v2"
    parent, why, detail = _v2_parent(m)
    if parent is None:
        return _no(name, why, detail)
    missing = _v2_memory_missing(m, parent, detail)
    if missing:
        return _no(name, missing, detail)
    step = f"creating a child cgroup under {parent}"
    try:
        with m.child(parent) as child:
            # The kernel refuses a write it will not apply, so a write that returns is the
            # answer; the cgroup is empty and goes away, so nothing is throttled meanwhile.
            for file, value in (("memory.max", _BRAKE_MAX), ("memory.high", _BRAKE_HIGH)):
                step = f"writing {value} to {child}/{file}"
                write_value(child / file, value)
    except OSError as exc:
        return _no(name, f"{step}: {_strerror(exc)}", detail)
    return _yes(name, f"memory.high and memory.max writable in a child of our cgroup {detail['cgroup']}", detail)


def probe_cgroup_kill(m: Machine) -> Probe:
    """A child v2 cgroup has ``cgroup.kill`` (Linux 5.14) and ``cgroup.freeze`` (5.2)."""
    name = "cgroup-kill"
    parent, why, detail = _v2_parent(m)
    if parent is None:
        return _no(name, why, detail)
    try:
        with m.child(parent) as child:
            files = {f: (child / f).exists() for f in ("cgroup.kill", "cgroup.freeze")}
    except OSError as exc:
        return _no(name, f"cannot create a cgroup v2 cgroup under {parent}: {_strerror(exc)}", detail)
    detail.update(files)
    if not files["cgroup.kill"]:
        return _no(name, "no cgroup.kill in a new v2 cgroup (Linux >= 5.14 has it)", detail)
    also = " and cgroup.freeze" if files["cgroup.freeze"] else " (no cgroup.freeze)"
    return _yes(name, f"cgroup.kill{also} in a child of our v2 cgroup", detail)


# --- PSI ------------------------------------------------------------------------------------


def probe_psi(m: Machine) -> Probe:
    path = Path(m.proc, "pressure", "memory")
    try:
        values = read_pressure(path)
    except FileNotFoundError:
        return _no("psi", f"no {path}: a kernel without CONFIG_PSI, or booted with psi=0")
    except (OSError, ValueError) as exc:
        text = _strerror(exc) if isinstance(exc, OSError) else str(exc)
        return _no("psi", f"{path} unreadable: {text}")
    full = f", full avg10 {values['full_avg10_pct']:.2f} %" if "full_avg10_pct" in values else ""
    return _yes("psi", f"{path} readable: some avg10 {values['some_avg10_pct']:.2f} %{full}",
        detail={"path": str(path), **values})


_TRIGGER_STALL_US = 100_000
_WINDOWS_US = (1_000_000, 2_000_000)
"""A window the unprivileged rule refuses, then one it accepts."""


def _try_triggers(paths: list[Path]) -> tuple[Path | None, dict[str, dict[str, str]]]:
    """Arm (and at once disarm) a trigger on each file in turn, with each window; the first
    file that accepts one, and what every attempt answered."""
    tried: dict[str, dict[str, str]] = {}
    for path in paths:
        answers = tried.setdefault(str(path), {})
        for window in _WINDOWS_US:
            try:
                fd = open_trigger(path, "some", _TRIGGER_STALL_US, window)
            except OSError as exc:
                answers[f"{window / 1e6:g} s"] = errno.errorcode.get(exc.errno or 0, str(exc))
            else:
                os.close(fd)
                answers[f"{window / 1e6:g} s"] = "accepted"
        if "accepted" in answers.values():
            return path, tried
    return None, tried


def _trigger_probe(name: str, paths: list[Path], m: Machine) -> Probe:
    privileged = "CAP_SYS_RESOURCE" in capabilities(m.proc)
    path, tried = _try_triggers(paths)
    detail: dict[str, Any] = {"cap_sys_resource": privileged, "tried": tried}
    if path is None:
        said = "; ".join(f"{p}: {', '.join(f'{w} {a}' for w, a in ans.items())}" for p, ans in tried.items())
        return _no(name, f"no trigger accepted ({said})", detail)
    detail["path"] = str(path)
    answers = tried[str(path)]
    accepted = [w for w, a in answers.items() if a == "accepted"]
    refused = [f"{w} {a}" for w, a in answers.items() if a != "accepted"]
    text = f"triggers accepted on {path} with a {' or '.join(accepted)} window"
    if refused:
        why = "" if privileged else ", no CAP_SYS_RESOURCE: windows must be 2 s multiples"
        text += f" (refused: {', '.join(refused)}{why})"
    earlier = [f"{p} refused" for p in tried if p != str(path)]
    if earlier:
        text += f"; {', '.join(earlier)}"
    return _yes(name, text, detail)


def probe_psi_trigger_system(m: Machine) -> Probe:
    """A trigger on ``/proc/pressure/memory``, else on the v2 root's ``memory.pressure``.

    The trigger line is written with a trailing NUL (:func:`oomkit.psi.open_trigger`): the
    system file drops the last byte written, and refuses the line without it.
    """
    paths = [Path(m.proc, "pressure", "memory")]
    if m.unified is not None:
        paths.append(m.unified / "memory.pressure")
    return _trigger_probe("psi-trigger-system", paths, m)


def probe_psi_trigger_cgroup(m: Machine) -> Probe:
    """A trigger on the ``memory.pressure`` of a new child of our v2 cgroup."""
    name = "psi-trigger-cgroup"
    parent, why, detail = _v2_parent(m)
    if parent is None:
        return _no(name, why, detail)
    try:
        with m.child(parent) as child:
            if not (child / "memory.pressure").exists():
                return _no(name, "no memory.pressure in a new v2 cgroup (PSI off?)", detail)
            probe = _trigger_probe(name, [child / "memory.pressure"], m)
    except OSError as exc:
        return _no(name, f"cannot create a cgroup v2 cgroup under {parent}: {_strerror(exc)}", detail)
    # The child is gone: name the file as any child's, not by its probe name.
    summary = probe.summary.replace(str(child), f"{parent}/<child>")
    return Probe(name=name, ok=probe.ok, summary=summary, detail={**detail, **probe.detail})


# --- tracefs --------------------------------------------------------------------------------

TRACEFS_MAGIC = 0x74726163


def _tracefs_mounted(m: Machine) -> Path | None:
    return next((Path(x.where) for x in _mounts(m.proc) if x.fstype == "tracefs"), None)


class _NoTracefs(Exception):
    """None is mounted and mounting one failed; the message says why."""


@contextmanager
def _tracefs(m: Machine) -> Iterator[tuple[Path, bool]]:
    """``(tracefs root, mounted by us)``; a mount of our own is undone on the way out.

    Raises :class:`_NoTracefs` when none is mounted and mounting fails.
    """
    root = _tracefs_mounted(m)
    if root is not None:
        yield root, False
        return
    where = Path(tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-tracefs-"))
    try:
        try:
            m.mount(where)
        except OSError as exc:
            raise _NoTracefs(_strerror(exc)) from exc
        try:
            yield where, True
        finally:
            try:
                m.umount(where)
            except OSError as exc:
                raise CleanupError(f"could not unmount tracefs from {where}: {_strerror(exc)}") from exc
    finally:
        try:
            where.rmdir()
        except OSError as exc:
            raise CleanupError(f"could not remove {where}: {_strerror(exc)}") from exc


def probe_tracefs(m: Machine) -> Probe:
    try:
        with _tracefs(m) as (root, ours):
            has_instances = (root / "instances").is_dir()
    except _NoTracefs as exc:
        return _no("tracefs", f"not mounted, and mounting it failed: {exc} (needs CONFIG_TRACING and CAP_SYS_ADMIN)")
    detail = {"mounted": None if ours else str(root), "instances": has_instances}
    where = "not mounted, but mountable (mount -t tracefs nodev DIR)" if ours else f"mounted at {root}"
    return _yes("tracefs", where, detail)


_FIELD = re.compile(r"^\s*field:[^;]*?(\w+)(?:\[\d*\])?;", re.MULTILINE)


def probe_trace_oom_events(m: Machine) -> Probe:
    name = "trace-oom-events"
    try:
        with _tracefs(m) as (root, _):
            events = root / "events" / "oom"
            names = sorted(p.name for p in events.iterdir() if p.is_dir()) if events.is_dir() else []
            fields: list[str] = []
            if "mark_victim" in names:
                fields = _FIELD.findall((events / "mark_victim" / "format").read_text())
    except _NoTracefs as exc:
        return Probe(name=name, ok=None, summary=f"tracefs unavailable: {exc}")
    detail: dict[str, Any] = {"events": names, "mark_victim_fields": [f for f in fields if not f.startswith("common_")]}
    if "mark_victim" not in names:
        return _no(name, f"no oom:mark_victim event (oom events: {', '.join(names) or 'none'})", detail)
    return _yes(name, f"oom events: {', '.join(names)}", detail)


def _fs_type(fd: int) -> int:
    buf = ctypes.create_string_buffer(256)  # struct statfs is 120 bytes on 64-bit Linux
    libc = _libc()
    if libc.fstatfs(fd, buf) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return int.from_bytes(buf.raw[: ctypes.sizeof(ctypes.c_long)], "little")


def _map_meta_page(fd: int) -> tuple[int, ...]:
    """Map the ring buffer's meta page read-only and return its first four fields
    (meta_page_size, meta_struct_len, subbuf_size, nr_subbufs).

    ``mmap.mmap`` refuses a file whose size is 0, which ``trace_pipe_raw`` always reports,
    so the call goes to libc directly.
    """
    libc = _libc()
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    addr = libc.mmap(None, mmap.PAGESIZE, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
    if addr is None or addr == ctypes.c_void_p(-1).value:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    try:
        return tuple((ctypes.c_uint32 * 4).from_address(addr))
    finally:
        libc.munmap(addr, mmap.PAGESIZE)


def probe_trace_ring_buffer_mmap(m: Machine) -> Probe:
    """Map ``per_cpu/cpu0/trace_pipe_raw`` of a private tracefs instance (Linux >= 6.10)."""
    name = "trace-ring-buffer-mmap"
    version = kernel_version(m.proc)
    step = "creating a tracefs instance"
    try:
        with _tracefs(m) as (root, _), m.child(root / "instances") as inst:
            raw = inst / "per_cpu" / "cpu0" / "trace_pipe_raw"
            step = f"opening {raw}"
            fd = os.open(raw, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            try:
                # The kernel's file reports size 0 but has a meta page behind it; any other
                # file needs a page of its own (a fake tree's has), or reading the mapping
                # would fault past its end.
                on_tracefs = _fs_type(fd) == TRACEFS_MAGIC
                step = "mmap of per_cpu/cpu0/trace_pipe_raw"
                meta = _map_meta_page(fd) if on_tracefs or os.fstat(fd).st_size >= mmap.PAGESIZE else ()
            finally:
                os.close(fd)  # before the instance's rmdir, which is EBUSY while an fd is open
    except _NoTracefs as exc:
        return Probe(name=name, ok=None, summary=f"tracefs unavailable: {exc}")
    except OSError as exc:
        hint = ""
        if exc.errno == errno.ENODEV and step.startswith("mmap"):
            running = f"{version[0]}.{version[1]}" if version else "this kernel"
            hint = f": ring-buffer mapping needs Linux >= 6.10 (this is {running})"
        return _no(name, f"{step} refused: {_strerror(exc)}{hint}")
    if not meta:
        return _no(name, "trace_pipe_raw is not on tracefs")
    page_size, struct_len, subbuf_size, nr_subbufs = meta
    detail = {
        "tracefs": on_tracefs, "meta_page_size": page_size, "meta_struct_len": struct_len,
        "subbuf_size": subbuf_size, "nr_subbufs": nr_subbufs,
    }
    if page_size % mmap.PAGESIZE or not 0 < subbuf_size <= 1 << 20 or nr_subbufs < 1:
        return _no(name, f"mapped, but the meta page makes no sense: {detail}", detail)
    return _yes(name, f"per_cpu/cpu0/trace_pipe_raw maps: {nr_subbufs} sub-buffers of {subbuf_size} bytes", detail)


# --- system calls ---------------------------------------------------------------------------


def _syscall_errno(nr: int, *args: int) -> int:
    """Call syscall ``nr`` with invalid arguments; the errno it fails with (0: it did not)."""
    libc = _libc()
    libc.syscall.restype = ctypes.c_long
    ret = libc.syscall(ctypes.c_long(nr), *(ctypes.c_long(a) for a in args))
    return ctypes.get_errno() if ret == -1 else 0


def syscall_verdict(err: int) -> bool | None:
    """What the errno of a call with an invalid pidfd says about the system call: present
    (EBADF, EINVAL), absent (ENOSYS, or EPERM from a seccomp filter), or unknown."""
    if err in (errno.EBADF, errno.EINVAL):
        return True
    if err in (errno.ENOSYS, errno.EPERM):
        return False
    return None


def _syscall_probe(name: str, call: str, nr: int, args: tuple[int, ...], since: str, use: str) -> Probe:
    err = _syscall_errno(nr, *args)
    code = errno.errorcode.get(err, str(err))
    ok = syscall_verdict(err)
    detail = {"syscall": nr, "errno": code}
    if ok:
        return _yes(name, f"{call} (syscall {nr}) exists ({code} for an invalid pidfd): {use}", detail)
    if ok is False:
        why = "blocked (a seccomp filter?)" if err == errno.EPERM else f"not in this kernel (needs Linux >= {since})"
        return _no(name, f"{call} (syscall {nr}) {why}: {code}", detail)
    return Probe(name=name, ok=None, summary=f"{call} (syscall {nr}) gave {code} for an invalid pidfd", detail=detail)


SYS_process_madvise = 440
SYS_process_mrelease = 448
"""Both numbers are the same on every architecture (the generic syscall table)."""


def probe_process_mrelease(m: Machine) -> Probe:
    return _syscall_probe(
        "process-mrelease", "process_mrelease", SYS_process_mrelease, (-1, 0), "5.15",
        "a killed victim's memory is reaped at once",
    )


def probe_process_madvise(m: Machine) -> Probe:
    return _syscall_probe(
        "process-madvise", "process_madvise", SYS_process_madvise, (-1, 0, 0, 0, 0), "5.10",
        "another process's memory can be paged out (MADV_PAGEOUT)",
    )


def probe_pidfd(m: Machine) -> Probe:
    """``pidfd_open`` on ourselves and ``pidfd_send_signal`` of signal 0 through it."""
    if not hasattr(os, "pidfd_open") or not hasattr(signal, "pidfd_send_signal"):
        return _no("pidfd", "this Python has no os.pidfd_open or signal.pidfd_send_signal")
    try:
        fd = os.pidfd_open(os.getpid())
        try:
            signal.pidfd_send_signal(fd, 0)
        finally:
            os.close(fd)
    except OSError as exc:
        hint = " (needs Linux >= 5.3)" if exc.errno == errno.ENOSYS else ""
        return _no("pidfd", f"pidfd_open/pidfd_send_signal: {_strerror(exc)}{hint}")
    return _yes("pidfd", "pidfd_open and pidfd_send_signal work: a kill never hits a reused pid")


# --- our own process ------------------------------------------------------------------------

CAPABILITIES = (
    "CHOWN DAC_OVERRIDE DAC_READ_SEARCH FOWNER FSETID KILL SETGID SETUID SETPCAP LINUX_IMMUTABLE "
    "NET_BIND_SERVICE NET_BROADCAST NET_ADMIN NET_RAW IPC_LOCK IPC_OWNER SYS_MODULE SYS_RAWIO "
    "SYS_CHROOT SYS_PTRACE SYS_PACCT SYS_ADMIN SYS_BOOT SYS_NICE SYS_RESOURCE SYS_TIME "
    "SYS_TTY_CONFIG MKNOD LEASE AUDIT_WRITE AUDIT_CONTROL SETFCAP MAC_OVERRIDE MAC_ADMIN SYSLOG "
    "WAKE_ALARM BLOCK_SUSPEND AUDIT_READ PERFMON BPF CHECKPOINT_RESTORE"
).split()
"""Capability names by bit number (linux/capability.h), without the ``CAP_`` prefix."""

RELEVANT_CAPABILITIES = (
    "CAP_SYS_RESOURCE", "CAP_SYS_ADMIN", "CAP_KILL", "CAP_IPC_LOCK", "CAP_SYS_PTRACE", "CAP_DAC_OVERRIDE",
)
"""What oomkit uses: oom_score_adj below 0 and unprivileged PSI windows; mounting tracefs;
signalling other users' processes; mlockall beyond RLIMIT_MEMLOCK; reading other users'
/proc files; writing cgroup files it does not own."""


def _status(proc: str) -> dict[str, str]:
    out = {}
    for line in read_small(f"{proc}/self/status", 16384).decode(errors="replace").splitlines():
        key, sep, value = line.partition(":")
        if sep:
            out[key] = value.strip()
    return out


def capabilities(proc: str = "/proc") -> frozenset[str]:
    """The names (``CAP_KILL``...) in our effective set, ``CapEff`` of ``PROC/self/status``."""
    eff = int(_status(proc).get("CapEff", "0"), 16)
    named = {f"CAP_{n}" for bit, n in enumerate(CAPABILITIES) if eff >> bit & 1}
    unnamed = {f"CAP_{bit}" for bit in range(len(CAPABILITIES), 64) if eff >> bit & 1}
    return frozenset(named | unnamed)


def probe_capabilities(m: Machine) -> Probe:
    status = _status(m.proc)
    held = capabilities(m.proc)
    has = [c for c in RELEVANT_CAPABILITIES if c in held]
    lacks = [c for c in RELEVANT_CAPABILITIES if c not in held]
    text = f"has {' '.join(has) or 'none of ours'}"
    if lacks:
        text += f"; lacks {' '.join(lacks)}"
    return _yes("capabilities", text,
        detail={"cap_eff": status.get("CapEff", ""), "held": sorted(held), "lacks": lacks, "euid": os.geteuid()})


_MCL_CURRENT, _MCL_FUTURE, _MCL_ONFAULT = 1, 2, 4


def probe_mlockall(m: Machine) -> Probe:
    """``mlockall(MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT)``, as ``oomkit serve`` calls it,
    undone at once; not called at all in a process that has locked memory already."""
    locked_kb = int(_status(m.proc).get("VmLck", "0 kB").split()[0])
    soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    limit = None if soft == resource.RLIM_INFINITY else soft
    detail: dict[str, Any] = {"vm_lck_kb": locked_kb, "rlimit_memlock": limit}
    if locked_kb:
        return _yes("mlockall", f"this process has locked memory already ({locked_kb} kB)", detail)
    libc = _libc()
    if libc.mlockall(_MCL_CURRENT | _MCL_FUTURE | _MCL_ONFAULT) != 0:
        err = ctypes.get_errno()
        detail["errno"] = errno.errorcode.get(err, str(err))
        why = f"mlockall refused: {os.strerror(err)} (RLIMIT_MEMLOCK {limit}, no CAP_IPC_LOCK?)"
        return _no("mlockall", why, detail)
    libc.munlockall()
    return _yes("mlockall", "mlockall(MCL_CURRENT|MCL_FUTURE|MCL_ONFAULT) allowed", detail)


def probe_oom_score_adj(m: Machine) -> Probe:
    """Our own ``oom_score_adj`` lowered to -1000, and put back at once."""
    path = f"{m.proc}/self/oom_score_adj"
    current = int(read_small(path, 32))
    detail: dict[str, Any] = {"oom_score_adj": current}
    if current == -1000:
        return _yes("oom-score-adj", "already -1000", detail)

    def write(value: int) -> None:
        # os.write reports EACCES; a buffered file object would hide it until close.
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, str(value).encode())
        finally:
            os.close(fd)

    try:
        write(-1000)
    except OSError as exc:
        hint = " (below 0 needs CAP_SYS_RESOURCE)" if exc.errno in (errno.EACCES, errno.EPERM) else ""
        return _no("oom-score-adj", f"cannot lower it from {current} to -1000: {_strerror(exc)}{hint}", detail)
    try:
        write(current)
    except OSError as exc:
        raise CleanupError(f"could not put {path} back to {current}: {_strerror(exc)}") from exc
    return _yes("oom-score-adj", f"can be lowered to -1000 (ours is {current})", detail)


# --- memory ---------------------------------------------------------------------------------


def _swaps(proc: str) -> list[dict[str, Any]]:
    """``/proc/swaps`` rows: name, type, size in bytes."""
    try:
        lines = Path(proc, "swaps").read_text().splitlines()[1:]
    except FileNotFoundError:
        return []
    out = []
    for line in lines:
        parts = line.split()
        if len(parts) >= 3 and parts[2].isdigit():
            out.append({"name": _unescape(parts[0]), "type": parts[1], "size_bytes": int(parts[2]) * 1024})
    return out


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


def probe_swap(m: Machine) -> Probe:
    total = read_meminfo(m.proc, ("SwapTotal",)).get("SwapTotal", 0)
    areas = _swaps(m.proc)
    detail = {"swap_total_bytes": total, "areas": areas}
    if not total:
        return _no("swap", "no swap (SwapTotal 0): anonymous memory can only be freed by a kill", detail)
    names = ", ".join(a["name"] for a in areas) or "?"
    return _yes("swap", f"{_gib(total)} of swap: {names}", detail)


def probe_zram(m: Machine) -> Probe:
    block = Path(m.sys, "block")
    devices = sorted(p.name for p in block.iterdir() if p.name.startswith("zram")) if block.is_dir() else []
    swapping = {Path(a["name"]).name for a in _swaps(m.proc)}
    sizes: dict[str, int] = {}
    for dev in devices:
        try:
            sizes[dev] = int(read_small(block / dev / "disksize", 64))
        except (OSError, ValueError):
            sizes[dev] = 0
    detail = {"devices": [{"device": d, "disksize_bytes": n, "swap": d in swapping} for d, n in sizes.items()]}
    ready = [d for d, n in sizes.items() if n]
    if not ready:
        text = f"{', '.join(devices)} not set up (disksize 0)" if devices else f"no zram device in {block}"
        return _no("zram", text, detail)
    parts = [f"{d} {_gib(sizes[d])}{' as swap' if d in swapping else ', not swap'}" for d in ready]
    return _yes("zram", ", ".join(parts), detail)


def probe_meminfo(m: Machine) -> Probe:
    found = read_meminfo(m.proc, ("MemTotal", "MemAvailable"))
    detail = {"mem_total_bytes": found.get("MemTotal"), "mem_available_bytes": found.get("MemAvailable")}
    if "MemAvailable" not in found:
        return _no("meminfo-available", f"no MemAvailable in {m.proc}/meminfo (Linux < 3.14)", detail)
    total = found.get("MemTotal", 0)
    return _yes("meminfo-available", f"MemAvailable {_gib(found['MemAvailable'])} of {_gib(total)}", detail)


# --- other OOM daemons ----------------------------------------------------------------------

OOM_DAEMONS = ("systemd-oomd", "earlyoom", "nohang", "oomd", "lmkd")
"""Process names (``comm``, or a script's name on an interpreter's command line) of the
user-space OOM killers oomkit knows; ``oomkit serve`` is found by its command line."""

_INTERPRETERS = re.compile(r"^python[\d.]*$")


@dataclass(frozen=True, slots=True)
class OomDaemon:
    """A running user-space OOM killer: its pid, which one, and its command line."""

    pid: int
    name: str
    cmdline: tuple[str, ...] = ()


def _oomkit_serve(argv: tuple[str, ...]) -> bool:
    """``oomkit serve ...`` or ``python -m oomkit serve ...`` (the subcommand comes first)."""
    names = [os.path.basename(a) for a in argv]
    if "oomkit" not in names:
        return False
    after = [a for a in names[names.index("oomkit") + 1 :] if not a.startswith("-")]
    return after[:1] == ["serve"]


def find_oom_daemons(proc: str = "/proc", *, exclude: frozenset[int] | None = None) -> tuple[OomDaemon, ...]:
    """Every other user-space OOM killer running (``exclude``: our own pid by default).

    One ``comm`` read per process; a command line (which takes the process's mmap lock) only
    for interpreters and ``oomkit`` itself, so this is cheap enough for a daemon's start-up.
    """
    skip = frozenset({os.getpid()}) if exclude is None else exclude
    found = []
    for pid in sorted(list_pids(proc)):
        if pid in skip:
            continue
        try:
            comm = read_small(f"{proc}/{pid}/comm", 64).decode(errors="replace").strip()
        except OSError:
            continue
        if comm in OOM_DAEMONS:
            found.append(OomDaemon(pid, comm, read_cmdline(proc, pid) or ()))
            continue
        if comm != "oomkit" and not _INTERPRETERS.match(comm):
            continue
        argv = read_cmdline(proc, pid) or ()
        if _oomkit_serve(argv):
            found.append(OomDaemon(pid, "oomkit serve", argv))
            continue
        script = next((os.path.basename(a) for a in argv[1:] if not a.startswith("-")), "")
        if script in OOM_DAEMONS:
            found.append(OomDaemon(pid, script, argv))
    return tuple(found)


def probe_other_oom_daemons(m: Machine) -> Probe:
    """ok: no other OOM daemon runs (False: one does, and two handlers may kill for one shortage)."""
    found = find_oom_daemons(m.proc)
    detail = {"daemons": [{"pid": d.pid, "name": d.name} for d in found]}
    if found:
        listed = ", ".join(f"{d.name} (pid {d.pid})" for d in found)
        return _no("other-oom-daemons", f"running: {listed}", detail)
    return _yes("other-oom-daemons", f"none running ({', '.join(OOM_DAEMONS)}, oomkit serve)", detail)


# --- the registry ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ProbeSpec:
    """A probe by name, with what it checks in a few words."""

    name: str
    checks: str
    run: Callable[[Machine], Probe]


PROBES: tuple[ProbeSpec, ...] = (
    ProbeSpec("kernel", "kernel release", probe_kernel),
    ProbeSpec("cgroup-layout", "v1 / v2 / hybrid, where each hierarchy is mounted", probe_cgroup_layout),
    ProbeSpec("cgroup-v1-memory", "our v1 memcg; a child memcg can be made there", probe_cgroup_v1_memory),
    ProbeSpec("takeover-v1", "oom_kill_disable and an OOM eventfd in a child memcg", probe_takeover_v1),
    ProbeSpec("freezer-v1", "our v1 freezer cgroup; a child can be made there", probe_freezer_v1),
    ProbeSpec("cgroup-v2", "our v2 cgroup, its controllers; a child can be made there", probe_cgroup_v2),
    ProbeSpec("cgroup-v2-memory", "the memory controller (memory.events) in a child v2 cgroup", probe_cgroup_v2_memory),
    ProbeSpec("brake-v2", "memory.high and memory.max writable in a child v2 cgroup", probe_brake_v2),
    ProbeSpec("cgroup-kill", "cgroup.kill and cgroup.freeze in a child v2 cgroup", probe_cgroup_kill),
    ProbeSpec("psi", "/proc/pressure/memory readable", probe_psi),
    ProbeSpec("psi-trigger-system", "a PSI trigger on /proc/pressure/memory (or the v2 root)", probe_psi_trigger_system),
    ProbeSpec("psi-trigger-cgroup", "a PSI trigger on a child v2 cgroup's memory.pressure", probe_psi_trigger_cgroup),
    ProbeSpec("tracefs", "tracefs mounted, or mountable", probe_tracefs),
    ProbeSpec("trace-oom-events", "oom:mark_victim and the other oom trace events", probe_trace_oom_events),
    ProbeSpec(
        "trace-ring-buffer-mmap", "trace_pipe_raw of a private instance memory-mapped", probe_trace_ring_buffer_mmap
    ),
    ProbeSpec("pidfd", "pidfd_open and pidfd_send_signal", probe_pidfd),
    ProbeSpec("process-mrelease", "process_mrelease (syscall 448)", probe_process_mrelease),
    ProbeSpec("process-madvise", "process_madvise (syscall 440)", probe_process_madvise),
    ProbeSpec("capabilities", "our effective capabilities", probe_capabilities),
    ProbeSpec("mlockall", "mlockall allowed", probe_mlockall),
    ProbeSpec("oom-score-adj", "our oom_score_adj can be lowered to -1000", probe_oom_score_adj),
    ProbeSpec("meminfo-available", "MemAvailable in /proc/meminfo", probe_meminfo),
    ProbeSpec("swap", "swap configured", probe_swap),
    ProbeSpec("zram", "zram devices set up", probe_zram),
    ProbeSpec("other-oom-daemons", "no other OOM daemon running", probe_other_oom_daemons),
)

_BY_NAME = {spec.name: spec for spec in PROBES}


def run_probe(name: str, machine: Machine | None = None) -> Probe:
    """Run the probe ``name`` (on the local machine by default).

    An exception the probe did not expect becomes ``ok=None`` with the error as its summary.
    Raises KeyError for an unknown name.
    """
    spec = _BY_NAME[name]
    m = machine if machine is not None else Machine.from_paths(PathsConfig())
    try:
        result = spec.run(m)
    except CleanupError as exc:
        return Probe(name=name, ok=None, summary=f"left something behind: {exc}")
    except Exception as exc:  # noqa: BLE001 - one broken probe must not hide the others
        return Probe(name=name, ok=None, summary=f"could not tell: {describe(exc)}")
    if result.name != name:
        raise AssertionError(f"probe {name} answered as {result.name}")
    return result


def run_all(machine: Machine | None = None) -> list[Probe]:
    """Every probe in :data:`PROBES` order."""
    m = machine if machine is not None else Machine.from_paths(PathsConfig())
    return [run_probe(spec.name, m) for spec in PROBES]
