"""Putting journalled values back: ``oomkit restore``, and ``oomkit serve`` at start.

For a service manager's ``ExecStopPost=oomkit restore`` (after every process of the unit
is gone, SIGKILL included) and for a daemon started after a crash.  Each entry of the
journal (:mod:`oomkit.journal`) gives one line:

* the cgroup is held by a running oomkit (its lock is taken): left to it, entry kept;
* it was removed, or made again since (another inode): nothing to restore, entry removed;
* the file still holds what oomkit wrote: the original is written back, entry removed;
* it holds something else (someone wrote since, or oomkit's watchdog already restored it):
  left alone, entry removed;
* the write is refused, or the entry is unreadable: reported, entry kept (a failure).

Below a v1 memcg whose original ``oom_kill_disable`` was 0, descendants still at 1 (they
inherited it from the takeover) are reset to 0, one line each, except those another running
oomkit holds.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from . import watchdog
from .cgroupdir import CgroupDir, NotACgroup
from .cgroupfs import mounts_for
from .config import PathsConfig
from .events import Scope
from .journal import Entry, Journal, JournalError

__all__ = ["RestoreReport", "restore_journal"]

log = logging.getLogger("oomkit.restore")


@dataclass
class RestoreReport:
    """What a restore did: one line per cgroup, and whether anything failed."""

    lines: list[str] = field(default_factory=list)
    failed: int = 0
    restored: int = 0
    held: int = 0
    """Entries left to a running oomkit that holds their cgroup."""

    @property
    def ok(self) -> bool:
        return self.failed == 0


def restore_journal(paths: PathsConfig) -> RestoreReport:
    """Put back every journalled value under ``paths.run_dir`` that no running oomkit holds."""
    journal = Journal(paths.run_dir)
    report = RestoreReport()
    try:
        entries = list(journal.entries())
    except JournalError as exc:
        report.lines.append(str(exc))
        report.failed += 1
        return report
    mounts = mounts_for(paths)
    for name, entry in entries:
        if isinstance(entry, JournalError):
            report.lines.append(f"{entry}; left in place")
            report.failed += 1
            continue
        root = mounts.memory_v1 if entry.tree == "v1" else mounts.unified
        if root is None:
            report.lines.append(f"{entry.label}: its hierarchy is not mounted here; entry kept")
            report.failed += 1
            continue
        _restore_one(journal, name, entry, root, report)
    return report


def _restore_one(journal: Journal, name: str, entry: Entry, root: Path, report: RestoreReport) -> None:
    label = entry.label
    what = "oom_kill_disable" if entry.tree == "v1" else "memory.high"
    try:
        cg = CgroupDir.open(root, Scope(entry.tree, entry.path))
    except (FileNotFoundError, NotACgroup):
        _drop(journal, name, report, f"{label}: removed since oomkit (pid {entry.pid}) journalled it; nothing to restore")
        return
    except OSError as exc:
        report.lines.append(f"{label}: cannot open it: {exc.strerror}; entry kept")
        report.failed += 1
        return
    try:
        if cg.ino != entry.ino:
            _drop(journal, name, report, f"{label}: made again since it was journalled (another cgroup now); left alone")
            return
        if not cg.lock():
            holder = cg.holder()
            who = f"pid {holder}" if holder else "a process"
            report.lines.append(f"{label}: held by a running oomkit ({who}); left to it")
            report.held += 1
            return
        try:
            current = _current(cg, entry)
        except OSError as exc:
            report.lines.append(f"{label}: cannot read {entry.file}: {exc.strerror}; entry kept")
            report.failed += 1
            return
        if current == entry.written and entry.original != entry.written:
            try:
                cg.write(entry.file, entry.original, truncate=entry.tree == "v2")
            except OSError as exc:
                report.lines.append(f"{label}: cannot write {what}={entry.original}: {exc.strerror}; entry kept")
                report.failed += 1
                return
            report.restored += 1
            line = f"{label}: {what} {current} -> {entry.original} (the original, journalled by pid {entry.pid})"
        elif current == entry.original:
            line = f"{label}: {what} is {current}, the original already"
        else:
            line = f"{label}: {what} is {current}, not the {entry.written} oomkit wrote; left alone"
        _drop(journal, name, report, line)
        if entry.tree == "v1" and entry.original == "0":
            reset, failed = watchdog.reset_descendants(cg.fd)
            for rel in reset:
                report.lines.append(
                    f"{label}/{rel}: oom_kill_disable 1 -> 0 (a descendant that inherited the takeover)"
                )
            for line in failed:
                report.lines.append(f"{label}/{line}")
            report.failed += len(failed)
    finally:
        cg.close()


def _current(cg: CgroupDir, entry: Entry) -> str:
    if entry.tree == "v1":
        return str(cg.keyed(entry.file).get("oom_kill_disable", -1))
    return cg.read(entry.file, 64).decode(errors="replace").strip()


def _drop(journal: Journal, name: str, report: RestoreReport, line: str) -> None:
    try:
        journal.remove(name)
    except JournalError as exc:
        report.lines.append(f"{line}; {exc}")
        report.failed += 1
        return
    report.lines.append(line)
