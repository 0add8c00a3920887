"""The kernel-page source's decoding and validation, on recorded pages and a fake /proc.

Everything from the records onwards runs as in production; only the kernel interface
(tracefs, the mapping, /dev/kmsg) is left to tests/integration/test_kernel_page_kernel.py.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest

from oomkit.config import ConfigError, config_from_dict
from oomkit.events import SYSTEM, Scope
from oomkit.kmsg import parse_kill, parse_record
from oomkit.ringbuffer import Batch, PageParser, RawEvent, ReadCpu
from oomkit.sources import build_sources
from oomkit.sources.kernel_page import KernelPageSource, KernelPageSourceConfig
from oomkit.testing import FakeCgroups, FakeProc, config_for
from oomkit.tracefs import EventFormat, parse_event_header, parse_format, parse_page_header

DATA = Path(__file__).parents[2] / "data" / "tracefs" / "6.18"
S = 1_000_000_000


def formats() -> dict[int, EventFormat]:
    out = {}
    for path in (DATA / "oom").glob("*/format"):
        f = parse_format(path.read_text(), str(path), system="oom")
        out[f.id] = f
    return out


def parser() -> PageParser:
    return PageParser(parse_page_header((DATA / "header_page").read_text()),
                      parse_event_header((DATA / "header_event").read_text()))


def source(proc: FakeProc, cgroups: FakeCgroups | None = None, **settings: Any) -> KernelPageSource:
    return KernelPageSource(KernelPageSourceConfig(**settings), config_for(proc, cgroups))


def test_settings_decode_and_register() -> None:
    cfg = config_from_dict({"sources": [{"kind": "kernel-page", "mode": "read", "buffer_kib": 128}]}, "/etc/o.toml")
    assert cfg.sources == (KernelPageSourceConfig(mode="read", buffer_kib=128),)
    [src] = build_sources(cfg)
    assert isinstance(src, KernelPageSource) and src.name == "kernel-page"
    with pytest.raises(ConfigError, match=r"^/etc/o\.toml: .*\$\.sources\[0\]\.buffer_kib"):
        config_from_dict({"sources": [{"kind": "kernel-page", "buffer_kib": 1}]}, "/etc/o.toml")
    with pytest.raises(ConfigError, match=r"\$\.sources\[0\]\.mode"):
        config_from_dict({"sources": [{"kind": "kernel-page", "mode": "bpf"}]}, "/etc/o.toml")


def test_recorded_kills_become_kernel_kill_events(tmp_path: Path, fake_proc: FakeProc,
                                                   fake_cgroups: FakeCgroups) -> None:
    meta = json.loads((DATA / "kills-read.json").read_text())
    (tmp_path / "pipe").write_bytes((DATA / "kills-read.bin").read_bytes())
    victims = meta["pids"]
    # The first victim is still there (its cgroup readable), the others already gone.
    fake_proc.add_process(victims[0], "python", memcg="/jobs/a", start_ticks=4321)
    src = source(fake_proc, fake_cgroups)
    reader = ReadCpu(tmp_path / "pipe", 0, parser())
    try:
        records = src.records(reader.read(), formats(), 0)
    finally:
        reader.close()
    events = src.trace_events(records, True, 10_000 * S)
    assert [e.pid for e in events] == victims  # put in time order across the two CPUs' pages
    first = events[0]
    assert (first.kind, first.scope, first.pid_start_ticks, first.comm) == ("kernel-kill", Scope("v1", "/jobs/a"),
                                                                          4321, "python")
    kill = parse_kill(meta["kmsg"][0])
    assert kill is not None
    assert first.values == {
        "total_vm_bytes": kill.fields["total_vm"] * 1024.0, "anon_rss_bytes": kill.fields["anon_rss"] * 1024.0,
        "file_rss_bytes": kill.fields["file_rss"] * 1024.0, "shmem_rss_bytes": 0.0,
        "pgtables_bytes": kill.fields["pgtables"] * 1024.0, "uid": 0.0, "oom_score_adj": 0.0,
    }
    assert first.monotonic_ns == records[[r[2]["pid"] for r in records].index(victims[0])][0]
    assert [e.scope for e in events[1:]] == [SYSTEM, SYSTEM]
    assert (src.stats.kills, src.stats.memcg_misses, src.stats.records) == (3, 2, {"mark_victim": 3})


def test_a_bad_record_is_counted_and_skipped(fake_proc: FakeProc) -> None:
    src = source(fake_proc)
    f = formats()
    victim = next(x for x in f.values() if x.name == "mark_victim")
    good = bytearray(70)
    good[0:2] = victim.id.to_bytes(2, "little")
    good[8:12] = (300).to_bytes(4, "little")
    good[12:16] = (66 | 4 << 16).to_bytes(4, "little")
    good[66:70] = b"hog\0"
    outside = bytearray(good)
    outside[12:16] = (66 | 400 << 16).to_bytes(4, "little")
    batch = Batch(events=[RawEvent(1, b"\x01"), RawEvent(2, (9999).to_bytes(2, "little") + bytes(8)),
                          RawEvent(3, bytes(outside)), RawEvent(4, bytes(good[:30])), RawEvent(5, bytes(good))],
                  rejected=[("truncated", "event header at 4000 runs past 4001")], lost=7)
    records = src.records(batch, f, 1)
    events = src.trace_events(records, True, 10 * S)
    assert [(e.pid, e.comm) for e in events] == [(300, "hog")]
    assert src.stats.rejected == {"record": 3, "type": 1, "truncated": 1}
    assert src.stats.lost == 7
    c = src.counters()
    assert (c["rejected"], c["rejected_record"], c["lost"], c["kills"], c["records_mark_victim"]) == (5, 3, 7, 1, 1)


def test_kill_values_and_pids_are_validated(fake_proc: FakeProc) -> None:
    src = source(fake_proc)
    assert src.kill(0, "x", {}, 1, 1) is None
    assert src.kill(1 << 30, "x", {}, 1, 1) is None
    assert src.kill(5, "x", {"anon_rss_bytes": float("nan")}, 1, 1) is None
    assert src.kill(5, "x", {"oom_score_adj": 5000.0}, 1, 1) is None
    assert src.stats.rejected == {"pid": 2, "value": 2}
    ev = src.kill(5, None, {"oom_score_adj": -1000.0}, 1, 1)
    assert ev is not None and ev.comm is None and ev.scope == SYSTEM  # pid 5 is not in the fake /proc


def test_the_same_victim_twice_is_one_kill(fake_proc: FakeProc) -> None:
    src = source(fake_proc)
    assert src.kill(42, "a", {}, 1 * S, 1 * S) is not None
    assert src.kill(42, "a", {}, 2 * S, 2 * S) is None
    assert src.kill(42, "a", {}, 10 * S, 10 * S) is not None  # later: a new process with that pid
    assert (src.stats.kills, src.stats.duplicates) == (2, 1)


def test_comm_is_read_when_the_kernel_format_has_none(fake_proc: FakeProc, fake_cgroups: FakeCgroups) -> None:
    """6.1's mark_victim carries the pid alone."""
    text = ("name: mark_victim\nID: 500\nformat:\n"
            "\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;\n"
            "\tfield:unsigned char common_flags;\toffset:2;\tsize:1;\tsigned:0;\n"
            "\tfield:unsigned char common_preempt_count;\toffset:3;\tsize:1;\tsigned:0;\n"
            "\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;\n\n"
            "\tfield:int pid;\toffset:8;\tsize:4;\tsigned:1;\n")
    old = parse_format(text, system="oom")
    fake_proc.add_process(123, "java", memcg="/svc")
    src = source(fake_proc, fake_cgroups)
    rec = (500).to_bytes(2, "little") + bytes(6) + (123).to_bytes(4, "little")
    [ev] = src.trace_events(src.records(Batch(events=[RawEvent(9, rec)]), {500: old}, 0), True, 10)
    assert (ev.pid, ev.comm, ev.scope, ev.values) == (123, "java", Scope("v1", "/svc"), {})


def test_kmsg_lines_become_kills_with_the_kernels_memcg(fake_proc: FakeProc, fake_cgroups: FakeCgroups) -> None:
    src = source(fake_proc, fake_cgroups)
    lines = [
        b"6,10,100,-;oom-kill:constraint=CONSTRAINT_MEMCG,nodemask=(null),cpuset=/,mems_allowed=0,"
        b"oom_memcg=/a,task_memcg=/a/b,task=hog,pid=777,uid=0",
        b"3,11,101,-;Memory cgroup out of memory: Killed process 777 (hog) total-vm:100kB, anon-rss:80kB, "
        b"file-rss:4kB, shmem-rss:0kB, UID:0 pgtables:8kB oom_score_adj:300",
        # Rate-limited summary: the kill line alone, the victim already gone from /proc.
        b"3,12,102,-;Memory cgroup out of memory: Killed process 778 (hog) total-vm:100kB, anon-rss:80kB",
        b"3,13,103,-;Memory cgroup out of memory: Killed process oops",
        b"6,14,104,-;something else entirely",
    ]
    events = src.kmsg_events([parse_record(raw) for raw in lines], 5 * S)
    assert [(e.pid, e.comm, e.scope) for e in events] == [(777, "hog", Scope("v1", "/a/b")), (778, "hog", SYSTEM)]
    assert events[0].values == {"total_vm_bytes": 102400.0, "anon_rss_bytes": 81920.0, "file_rss_bytes": 4096.0,
                                "shmem_rss_bytes": 0.0, "uid": 0.0, "pgtables_bytes": 8192.0, "oom_score_adj": 300.0}
    assert src.stats.memcg_misses == 1 and src.stats.rejected == {"kmsg": 1}


def test_reclaim_retries_are_folded_into_rate_limited_warnings(fake_proc: FakeProc) -> None:
    src = source(fake_proc, warn_interval_s=1.0)
    f = formats()
    zone = next(x for x in f.values() if x.name == "reclaim_retry_zone")

    def retry(loops: int) -> bytes:
        rec = bytearray(zone.size)
        rec[0:2] = zone.id.to_bytes(2, "little")
        for name, value in (("order", 0), ("reclaimable", 10), ("available", 20), ("min_wmark", 5),
                            ("no_progress_loops", loops)):
            fld = zone.fields[name]
            rec[fld.offset : fld.end] = value.to_bytes(fld.size, "little")
        return bytes(rec)

    def feed(ts: int, loops: int) -> list[Any]:
        return src.trace_events(src.records(Batch(events=[RawEvent(ts, retry(loops))]), f, 0), True, ts)

    first = feed(1 * S, 1)
    assert [e.kind for e in first] == ["pressure"] and first[0].values["reclaim_retries"] == 1
    assert feed(1 * S + 10, 2) == [] and feed(1 * S + 20, 3) == []
    assert src.warnings.due_in(1 * S + 20) == pytest.approx(1.0, abs=1e-6)
    later = src.warnings.flush(2 * S + 1)
    assert later is not None and later.values["reclaim_retries"] == 2 and later.values["no_progress_loops"] == 3
    assert later.values["available_bytes"] == 20 * 4096
    assert (src.stats.warnings, src.stats.warnings_folded) == (2, 2)


def test_rejections_are_logged_with_counts(fake_proc: FakeProc, caplog: pytest.LogCaptureFixture) -> None:
    src = source(fake_proc, log_interval_s=3600)
    with caplog.at_level(logging.WARNING, "oomkit.sources.kernel_page"):
        for _ in range(10):
            src.reject("record", "bad")
        src.ratelog.flush(force=True)
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2 and "1 malformed" in messages[0] and "9 malformed" in messages[1]


def test_an_exiting_victim_is_found_by_the_memcg_whose_oom_kill_grew(fake_proc: FakeProc,
                                                                     fake_cgroups: FakeCgroups) -> None:
    """v1 shows "/" for a task that began to exit: the oom_kill counters say where it was."""
    a, b = fake_cgroups.mkdir_v1("/jobs/a"), fake_cgroups.mkdir_v1("/jobs/b")
    src = source(fake_proc, fake_cgroups)
    src.snapshot_memcgs()
    fake_proc.add_process(50, "hog", memcg="/jobs/b")  # read from /proc: matched, not news
    fake_cgroups.set_oom_control(b, oom_kill=1)
    fake_proc.add_process(51, "hog", memcg="/", exiting=True)
    fake_cgroups.set_oom_control(a, oom_kill=1)
    e50 = src.kill(50, None, {}, 1, 1)
    e51 = src.kill(51, None, {}, 2, 2)
    assert e50 is not None and e51 is not None
    assert (e50.scope, e51.scope) == (Scope("v1", "/jobs/b"), Scope("v1", "/jobs/a"))
    # Gone from /proc altogether, and kills in two memcgs since: cannot tell which is whose.
    fake_cgroups.set_oom_control(a, oom_kill=2)
    fake_cgroups.set_oom_control(b, oom_kill=2)
    e52 = src.kill(52, "hog", {}, 3, 3)
    assert e52 is not None and e52.scope == SYSTEM and src.stats.memcg_misses == 1


def test_a_victim_in_the_root_memcg_that_is_not_exiting(fake_proc: FakeProc, fake_cgroups: FakeCgroups) -> None:
    src = source(fake_proc, fake_cgroups)
    src.snapshot_memcgs()
    fake_proc.add_process(60, "hog", memcg="/")
    ev = src.kill(60, None, {}, 1, 1)
    assert ev is not None and ev.scope == Scope("v1", "/") and src.stats.memcg_misses == 0
