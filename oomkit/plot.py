"""``oomkit plot``: a decision timeline from the JSON-lines log, drawn with matplotlib.

One scope, two panels sharing nothing but the decisions:

* **memory over time**: the scope's charge and limit from its memory samples (the
  ``memory-sample`` records of :mod:`oomkit.records`), the tracked processes' resident
  total, and the resident size of each decision's victim as the samples saw it; every
  decision is a vertical line at its event (coloured by outcome) with the victim named, and
  a kill's signal and death are marked where they happened;
* **stage times**: one bar per decision, from its event: queued, candidates, score, veto,
  recheck, kill (``Decision.stage_ns``; the kill stage includes the killer's wait for the
  death), with the moments the signal was sent and the victim was dead marked on it.

Times are the daemon's monotonic clock (samples, decisions and kill times share it), shown
in seconds from the first record drawn.  The scope is ``--scope``, or the one with the most
decisions (samples when there are none).  A log that mixes boots (the monotonic clock starts
again) is drawn from its last boot only: ``wall_time`` says where one ends.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .errors import OomkitError
from .events import Decision, Scope
from .records import MemorySample, read_log

__all__ = ["PlotError", "Timeline", "load", "plot"]

_MiB = 1 << 20
_STAGES = ("queued", "candidates", "score", "veto", "recheck", "kill")
_OUTCOME_COLOURS = {"killed": "tab:red", "dry-run": "tab:cyan", "failed": "tab:purple", "all-vetoed": "tab:olive",
                    "handed-back": "tab:brown"}
_BOOT_SLACK_S = 30.0
"""Wall and monotonic clocks may drift apart by this much between records of one boot."""


class PlotError(OomkitError):
    """The timeline cannot be drawn (nothing for the scope, matplotlib missing); says why."""


@dataclass
class Timeline:
    """One scope's records from a log, in file order."""

    scope: Scope
    samples: list[MemorySample] = field(default_factory=list)
    decisions: list[Decision] = field(default_factory=list)
    other_scopes: int = 0
    """Scopes in the log that this timeline leaves out."""
    earlier_boots: int = 0
    """Records left out because they were written before the last boot."""

    @property
    def t0_ns(self) -> int:
        times = [s.monotonic_ns for s in self.samples] + [d.event.monotonic_ns for d in self.decisions]
        return min(times)


def _boot_of(wall: float, mono_ns: int) -> float:
    """The wall time of the monotonic clock's zero: one value per boot (within slack)."""
    return wall - mono_ns / 1e9


def load(path: str | Path, scope: str | None = None) -> Timeline:
    """The records of one scope in the log at ``path``: ``scope`` as oomkit prints it
    (``system``, ``v1:/jobs``, ``v2:/a/b``) or a cgroup path alone (``/jobs``, when one
    tree has it), else the scope with the most decisions (then samples)."""
    records = [rec for _, rec in read_log(path)]
    if not records:
        raise PlotError(f"{path}: no decisions and no memory samples in it")
    last_boot = _boot_of(records[-1].wall_time, records[-1].monotonic_ns)
    this_boot = [r for r in records if abs(_boot_of(r.wall_time, r.monotonic_ns) - last_boot) < _BOOT_SLACK_S]
    earlier = len(records) - len(this_boot)

    def scope_of(r: Decision | MemorySample) -> Scope:
        return r.event.scope if isinstance(r, Decision) else r.scope

    counts: dict[Scope, tuple[int, int]] = {}
    for r in this_boot:
        d, s = counts.get(scope_of(r), (0, 0))
        counts[scope_of(r)] = (d + 1, s) if isinstance(r, Decision) else (d, s + 1)
    if scope is None:
        chosen = max(counts, key=lambda k: counts[k])
    else:
        named = [k for k in counts if scope in (str(k), k.path)]
        if len(named) != 1:
            known = ", ".join(sorted(str(k) for k in counts))
            why = "nothing about" if not named else "more than one tree has"
            raise PlotError(f"{path}: {why} scope {scope} (it has: {known})")
        chosen = named[0]
    mine = [r for r in this_boot if scope_of(r) == chosen]
    return Timeline(
        scope=chosen,
        samples=[r for r in mine if isinstance(r, MemorySample)],
        decisions=[r for r in mine if isinstance(r, Decision)],
        other_scopes=len({scope_of(r) for r in this_boot}) - 1,
        earlier_boots=earlier,
    )


def _victim_rss(t: Timeline, d: Decision) -> tuple[list[float], list[float]]:
    """The victim's resident size (MiB) in the samples that named it among the largest."""
    assert d.victim is not None
    xs, ys = [], []
    for s in t.samples:
        for p in s.top:
            if p.pid == d.victim.pid and (not p.start_ticks or p.start_ticks == d.victim.start_ticks):
                xs.append((s.monotonic_ns - t.t0_ns) / 1e9)
                ys.append(p.rss_bytes / _MiB)
    return xs, ys


def plot(t: Timeline, out: str | Path, *, title: str = "", width_in: float = 11.0) -> None:
    """Draw ``t`` into ``out`` (the format from its suffix: .png, .svg, .pdf)."""
    try:
        import matplotlib
    except ImportError:
        raise PlotError("oomkit plot needs matplotlib (pip install 'oomkit[plot]')") from None
    matplotlib.use("Agg")  # no display: a file is drawn
    import matplotlib.pyplot as plt

    t0 = t.t0_ns
    with_stages = bool(t.decisions)
    fig, axes = plt.subplots(2 if with_stages else 1, 1, figsize=(width_in, 7.5 if with_stages else 4.5),
                             squeeze=False, height_ratios=[3, 2] if with_stages else [1])
    mem = axes[0][0]
    xs = [(s.monotonic_ns - t0) / 1e9 for s in t.samples]
    if t.samples:
        mem.plot(xs, [s.usage_bytes / _MiB for s in t.samples], color="tab:blue", label="charge (usage)")
        mem.plot(xs, [s.rss_bytes / _MiB for s in t.samples], color="tab:green", lw=1,
                 label="resident, tracked processes")
        if any(s.limit_bytes for s in t.samples):
            mem.step(xs, [s.limit_bytes / _MiB if s.limit_bytes else float("nan") for s in t.samples],
                     where="post", color="black", ls="--", lw=1, label="limit")
    named: set[int] = set()
    for d in t.decisions:
        x = (d.event.monotonic_ns - t0) / 1e9
        colour = _OUTCOME_COLOURS.get(d.outcome, "tab:gray")
        mem.axvline(x, color=colour, lw=1, ls=":")
        label = f"#{d.id} {d.outcome}"
        if d.victim is not None:
            label += f"\n{d.victim.pid} {d.victim.name}"
            vx, vy = _victim_rss(t, d)
            if vx and d.victim.pid not in named:
                named.add(d.victim.pid)
                mem.plot(vx, vy, color=colour, lw=1, alpha=0.7, label=f"victim {d.victim.pid} {d.victim.name}")
        if d.kill is not None and d.kill.sent_ns:
            mem.axvline((d.kill.sent_ns - t0) / 1e9, color=colour, lw=1.5)
        mem.annotate(label, xy=(x, 1.0), xycoords=("data", "axes fraction"), xytext=(3, -3),
                     textcoords="offset points", va="top", fontsize=8, color=colour)
    mem.set_xlabel("seconds (daemon's monotonic clock, from the first record)")
    mem.set_ylabel("MiB")
    mem.set_ylim(bottom=0)
    if not t.samples:
        mem.text(0.5, 0.5, "no memory samples for this scope ([plugins.jsonl] sample_interval_s, a warm scope)",
                 transform=mem.transAxes, ha="center", fontsize=9, color="gray")
    if mem.get_legend_handles_labels()[0]:
        mem.legend(loc="lower left", fontsize=8)
    mem.set_title(title or f"{t.scope}: memory and decisions", fontsize=10)

    if with_stages:
        _stages(axes[1][0], t.decisions)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def _stages(ax: object, decisions: Sequence[Decision]) -> None:
    from matplotlib.axes import Axes

    assert isinstance(ax, Axes)
    shown = list(decisions)[-20:]  # the newest twenty: one bar each stays readable
    cmap = {s: f"C{i}" for i, s in enumerate(_STAGES)}
    used: set[str] = set()
    for row, d in enumerate(shown):
        start = 0.0
        for stage in _STAGES:
            ms = d.stage_ns.get(stage, 0) / 1e6
            if ms > 0:
                ax.broken_barh([(start, ms)], (row - 0.4, 0.8), color=cmap[stage],
                               label=stage if stage not in used else None)
                used.add(stage)
                start += ms
        if d.kill is not None and d.kill.sent_ns:
            # The kill stage includes the wait for death: mark where in it each happened.
            ev = d.event.monotonic_ns
            ax.plot([(d.kill.sent_ns - ev) / 1e6], [row], marker="v", ms=9, mfc="white", mec="black",
                    ls="none", label="signal sent" if "sent" not in used else None)
            used.add("sent")
            if d.kill.dead_ns:
                ax.plot([(d.kill.dead_ns - ev) / 1e6], [row], marker="x", color="black", ls="none",
                        label="dead" if "dead" not in used else None)
                used.add("dead")
        dead_at = (d.kill.dead_ns - d.event.monotonic_ns) / 1e6 if d.kill is not None and d.kill.dead_ns else 0.0
        ax.text(max(start, dead_at), row, f"  {start:.2f} ms", va="center", fontsize=7)
    ax.set_yticks(range(len(shown)), [f"#{d.id} {d.outcome}" for d in shown], fontsize=8)
    ax.set_xlabel("milliseconds from the event (Decision.stage_ns)")
    ax.set_xlim(left=0)
    ax.set_title(f"stage times of the last {len(shown)} decisions", fontsize=10)
    if used:
        ax.legend(loc="lower right", fontsize=7, ncols=4)
