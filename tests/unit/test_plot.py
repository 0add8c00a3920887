"""`oomkit plot` on logs written here: the scope chosen, every decision, victim and stage
drawn (read back from the SVG's text), other boots and scopes left out and said so, bad
lines and unknown scopes one error line naming the file."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import matplotlib
import pytest

from oomkit import Candidate, Decision, Event, KillResult, Scope, to_json
from oomkit.cli import main
from oomkit.plot import load
from oomkit.records import MemorySample, ProcessSample

MiB = 1 << 20
S = 1_000_000_000
JOBS = Scope("v1", "/jobs")
BOOT = 1.7e9  # the wall time of the monotonic clock's zero


def sample(t_s: float, usage_mib: int, hog_mib: int, scope: Scope = JOBS, boot: float = BOOT) -> MemorySample:
    return MemorySample(scope=scope, monotonic_ns=int(t_s * S), wall_time=boot + t_s, usage_bytes=usage_mib * MiB,
                        limit_bytes=512 * MiB, rss_bytes=usage_mib * MiB, processes=2, warm=True,
                        top=(ProcessSample(pid=4242, name="hog", start_ticks=77, rss_bytes=hog_mib * MiB),
                             ProcessSample(pid=10, name="shell", start_ticks=5, rss_bytes=MiB)))


def killed(n: int, t_s: float, scope: Scope = JOBS) -> Decision:
    ev = int(t_s * S)
    return Decision(
        id=n, event=Event(source="memcg-oom", kind="oom", scope=scope, monotonic_ns=ev, wall_time=BOOT + t_s),
        victim=Candidate(pid=4242, name="hog", start_ticks=77, rss_bytes=500 * MiB), outcome="killed",
        action="signal", kill=KillResult(action="signal", outcome="killed", sent_ns=ev + 2_000_000, dead_ns=ev + 9_000_000),
        stage_ns={"queued": 100_000, "candidates": 900_000, "score": 300_000, "veto": 50_000, "kill": 8_000_000},
        monotonic_ns=ev + 10_000_000, wall_time=BOOT + t_s + 0.01,
    )


@pytest.fixture
def svg_text() -> Iterator[None]:
    with matplotlib.rc_context({"svg.fonttype": "none"}):  # text stays text, to be read back
        yield


def write(path: Path, *records: object) -> Path:
    path.write_bytes(b"".join(to_json(r) + b"\n" for r in records))  # type: ignore[arg-type]
    return path


def test_a_scopes_memory_decisions_victim_and_stages_are_drawn(
    tmp_path: Path, svg_text: None, capsys: pytest.CaptureFixture[str]
) -> None:
    log = write(tmp_path / "events.jsonl", *(sample(i * 0.5, 100 + 40 * i, 90 + 40 * i) for i in range(10)),
                killed(3, 5.0), sample(5.5, 60, 0), sample(1.0, 9, 9, scope=Scope()))
    out = tmp_path / "timeline.svg"
    assert main(["plot", str(log), "-o", str(out)]) == 0
    assert capsys.readouterr().out == f"{out}: v1:/jobs, 11 memory samples, 1 decisions; left out: 1 other scopes (--scope)\n"
    svg = out.read_text()
    for text in ("v1:/jobs: memory and decisions", "#3 killed", "4242 hog", "victim 4242 hog", "charge (usage)",
                 "limit", "candidates", "kill", "signal sent", "dead", "stage times of the last 1 decisions"):
        assert text in svg, text
    png = tmp_path / "timeline.png"
    assert main(["plot", str(log), "-o", str(png), "--scope", "system"]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_scope_is_named_or_the_busiest_and_only_the_last_boot_is_drawn(tmp_path: Path) -> None:
    other = Scope("v2", "/jobs")
    log = write(tmp_path / "events.jsonl",
                sample(900.0, 1, 1, boot=BOOT - 86400), sample(901.0, 1, 1, scope=other, boot=BOOT - 86400),
                sample(1.0, 100, 90), sample(1.5, 100, 90),
                sample(2.0, 1, 1, scope=other), killed(2, 2.5, scope=other), killed(3, 3.0, scope=Scope()))
    t = load(log)
    assert (t.scope, len(t.samples), len(t.decisions)) == (other, 1, 1), "the most decisions, then samples"
    assert (t.earlier_boots, t.other_scopes) == (2, 2), "wall minus monotonic time moved a day: another boot"
    assert t.t0_ns == 2 * S, "from the scope's first record"
    jobs = load(log, "v1:/jobs")
    assert jobs.scope == JOBS and [s.monotonic_ns for s in jobs.samples] == [S, 3 * S // 2] and not jobs.decisions
    assert load(log, "system").scope == Scope()


@pytest.mark.parametrize(
    ("content", "args", "message"),
    [
        (b"[1, 2\n", (), "{log}, line 1: not a JSON record: "),
        (b"", (), "{log}: no decisions and no memory samples in it"),
        (None, ("--scope", "/nowhere"), "{log}: nothing about scope /nowhere (it has: v1:/jobs, v2:/jobs)"),
        (None, ("--scope", "/jobs"), "{log}: more than one tree has scope /jobs (it has: v1:/jobs, v2:/jobs)"),
    ],
)
def test_what_cannot_be_drawn_is_one_error_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes | None, args: tuple[str, ...], message: str
) -> None:
    log = tmp_path / "events.jsonl"
    if content is None:
        write(log, sample(1.0, 1, 1), sample(1.0, 1, 1, scope=Scope("v2", "/jobs")))
    else:
        log.write_bytes(content)
    out = tmp_path / "x.png"
    assert main(["plot", str(log), "-o", str(out), *args]) == 1
    err = capsys.readouterr().err
    assert err.startswith("oomkit: error: " + message.format(log=log)) and err.count("\n") == 1
    assert not out.exists()
