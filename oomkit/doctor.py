"""``oomkit doctor``: the probes' answers, and which of oomkit's features they allow here.

:data:`FEATURES` says what each feature needs and which probes (:mod:`oomkit.probes`) tell
whether this machine has it; README.md's feature table is generated from it
(``docs/gen_features.py``), so the table, ``oomkit doctor`` and the test suite's skip
reasons say the same thing in the same words.

``oomkit doctor --json`` prints one JSON document::

    {
      "format": 1,
      "oomkit": "0.1.0.dev0",
      "kernel": "6.18.44",
      "probes": [
        {"name": "takeover-v1", "ok": true, "summary": "...", "detail": {...}},
        ...
      ],
      "features": [
        {"name": "...", "needs": "...", "planned": false, "requires": ["takeover-v1"],
         "related": ["cgroup-layout"], "ok": true, "why": ""},
        ...
      ]
    }

``ok`` is true (there), false (not there; ``summary`` or ``why`` says why) or null (the
probe could not tell).  A feature is ok when every probe it requires is; its ``why`` is the
first failing probe's ``name: summary``.  ``detail`` holds each probe's own facts (paths,
controllers, errnos).  These keys and probe names are stable: keys may be added, and none is
removed or changes meaning unless ``format`` changes.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec

from .probes import PROBES, Machine, Probe, run_probe

__all__ = ["FEATURES", "FORMAT", "Feature", "feature_status", "report", "render_json", "render_table"]

FORMAT = 1
"""The version of the JSON document's layout."""


@dataclass(frozen=True, slots=True)
class Feature:
    """One thing oomkit does, what it needs from the kernel, and the probes that tell."""

    name: str
    needs: str
    requires: tuple[str, ...]
    """Probes that must all be ok for the feature to work here."""
    related: tuple[str, ...] = ()
    """Probes worth reading beside it (not required)."""
    planned: bool = False
    """Not built yet; the probe says whether this machine would allow it."""


FEATURES: tuple[Feature, ...] = (
    Feature(
        "`meminfo` source (the default)",
        "MemAvailable in /proc/meminfo (Linux >= 3.14)",
        ("meminfo-available",),
        ("swap",),
    ),
    Feature(
        "`memcg-oom` takeover (cgroup v1)",
        "cgroup v1 memory controller (`CONFIG_MEMCG_V1`), write access to the memcg",
        ("cgroup-v1-memory", "takeover-v1"),
        ("cgroup-layout",),
    ),
    Feature(
        "`memcg-oom` observe mode, `memcg-pressure`, `memcg-threshold`",
        "cgroup v1 memory controller",
        ("cgroup-v1-memory",),
        ("cgroup-layout",),
    ),
    Feature(
        "`memory-events` and `memory-threshold` sources",
        "cgroup v2 with the memory controller enabled for the watched cgroups",
        ("cgroup-v2", "cgroup-v2-memory"),
    ),
    Feature(
        "`memory-high` takeover (cgroup v2): a brake, `memory.high` under `memory.max`",
        "cgroup v2 memory controller, write access to `memory.high` and `memory.max`",
        ("cgroup-v2", "brake-v2"),
    ),
    Feature(
        "`psi` triggers, system-wide",
        "PSI (`CONFIG_PSI`, Linux >= 4.20); without CAP_SYS_RESOURCE Linux >= 6.5 and 2 s windows",
        ("psi", "psi-trigger-system"),
        ("capabilities",),
    ),
    Feature(
        "`psi` triggers, per v2 cgroup",
        "PSI and cgroup v2 (`memory.pressure` exists without the memory controller)",
        ("cgroup-v2", "psi-trigger-cgroup"),
    ),
    Feature("`psi` polling (its last fallback)", "PSI", ("psi",)),
    Feature("`shared-page` source", "any Linux", ()),
    Feature(
        "killer: signals through a pidfd (never a reused pid)",
        "Linux >= 5.3; CAP_KILL to signal other users' processes",
        ("pidfd",),
        ("capabilities",),
    ),
    Feature(
        "killer: `process_mrelease` reaps the victim at once",
        "Linux >= 5.15",
        ("process-mrelease",),
    ),
    Feature(
        "`unit_killer`: a whole v2 cgroup in one write (`cgroup.kill`)",
        "cgroup v2, Linux >= 5.14 (on v1, and around a protected process: each task killed until none is left)",
        ("cgroup-kill",),
        ("freezer-v1",),
    ),
    Feature(
        "`pageout` rescue before a kill (`process_madvise(MADV_PAGEOUT)`)",
        "Linux >= 5.10, CAP_SYS_NICE; swap (or zram as swap) for anonymous memory, file-backed pages anywhere",
        ("process-madvise",),
        ("swap", "zram"),
    ),
    Feature(
        "`reclaim` rescue before a kill (v2 `memory.reclaim`)",
        "cgroup v2 memory controller, Linux >= 5.19; without swap it frees page cache and slab only",
        ("cgroup-v2", "cgroup-v2-memory"),
        ("swap",),
    ),
    Feature(
        "`kernel-page` source: `oom:mark_victim` from mapped tracefs ring buffers",
        "tracefs (`CONFIG_TRACING`, CAP_SYS_ADMIN to mount it); Linux >= 6.10 to map the ring buffer",
        ("tracefs", "trace-oom-events", "trace-ring-buffer-mmap"),
        ("kernel",),
    ),
    Feature(
        "`kernel-page` source: its `read()` fallback (kernels before 6.10)",
        "tracefs with the `oom` events",
        ("tracefs", "trace-oom-events"),
    ),
    Feature(
        "`kernel-page` source: its `/dev/kmsg` fallback",
        "a readable `/dev/kmsg` (CAP_SYSLOG, or `kernel.dmesg_restrict = 0`)",
        (),
    ),
    Feature("`oomkit serve`: its pages locked", "`mlockall` (CAP_IPC_LOCK or RLIMIT_MEMLOCK)", ("mlockall",)),
    Feature(
        "`oomkit serve`: its `oom_score_adj` at -1000",
        "CAP_SYS_RESOURCE",
        ("oom-score-adj",),
        ("capabilities",),
    ),
    Feature(
        "`oomkit serve` as the only OOM daemon",
        "no systemd-oomd, earlyoom, nohang, oomd, lmkd or other `oomkit serve` running",
        ("other-oom-daemons",),
    ),
)


def feature_status(feature: Feature, results: dict[str, Probe]) -> tuple[bool | None, str]:
    """``(ok, why)``: False (and the first failing probe's reason) when a required probe
    failed, None when one could not tell or did not run, else True."""
    unknown = ""
    for name in feature.requires:
        probe = results.get(name)
        if probe is None:
            unknown = unknown or f"{name}: not probed"
        elif probe.ok is False:
            return False, probe.reason
        elif probe.ok is None:
            unknown = unknown or probe.reason
    return (None, unknown) if unknown else (True, "")


def report(machine: Machine, only: Iterable[str] = ()) -> list[Probe]:
    """Run ``only`` these probes (all by default), in :data:`~oomkit.probes.PROBES` order."""
    wanted = set(only)
    return [run_probe(spec.name, machine) for spec in PROBES if not wanted or spec.name in wanted]


def _kernel_release(machine: Machine) -> str:
    try:
        with open(f"{machine.proc}/sys/kernel/osrelease") as f:
            return f.read().strip()
    except OSError:
        return platform.release()


def render_json(results: Sequence[Probe], machine: Machine) -> bytes:
    """The document described in this module's docstring, with a final newline."""
    from . import __version__

    by_name = {p.name: p for p in results}
    features: list[dict[str, Any]] = []
    for f in FEATURES:
        if not set(f.requires) <= by_name.keys():
            continue  # not every probe it needs ran (--probe)
        ok, why = feature_status(f, by_name)
        features.append({
            "name": f.name, "needs": f.needs, "planned": f.planned, "requires": list(f.requires),
            "related": list(f.related), "ok": ok, "why": why,
        })
    doc = {
        "format": FORMAT,
        "oomkit": __version__,
        "kernel": _kernel_release(machine),
        "probes": list(results),
        "features": features,
    }
    return msgspec.json.encode(doc) + b"\n"


def _yes(ok: bool | None) -> str:
    return {True: "yes", False: "no", None: "?"}[ok]


def render_table(results: Sequence[Probe], machine: Machine) -> str:
    """Probes, then features, as aligned text for a terminal."""
    by_name = {p.name: p for p in results}
    lines = [
        f"oomkit doctor: Linux {_kernel_release(machine)}, Python {platform.python_version()}, euid {os.geteuid()}",
        "",
    ]
    width = max([len(p.name) for p in results] + [5])
    lines.append(f"{'PROBE':<{width}}  OK   FOUND")
    lines += [f"{p.name:<{width}}  {_yes(p.ok):<3}  {p.summary}" for p in results]
    rows = []
    for f in FEATURES:
        if not set(f.requires) <= by_name.keys():
            continue
        ok, why = feature_status(f, by_name)
        name = f.name.replace("`", "") + (" (planned)" if f.planned else "")
        rows.append((name, _yes(ok) + (f": {why}" if why else "")))
    if rows:
        fwidth = max(len(r[0]) for r in rows)
        lines += ["", f"{'FEATURE':<{fwidth}}  HERE"]
        lines += [f"{name:<{fwidth}}  {here}" for name, here in rows]
    return "\n".join(lines) + "\n"
