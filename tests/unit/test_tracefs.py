"""tracefs format files (recorded on this machine's 6.18 kernel), stale instances on a fake tree."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from oomkit.tracefs import (
    MAX_STRING,
    FormatError,
    RecordError,
    parse_event_header,
    parse_format,
    parse_page_header,
    sweep_stale,
)

DATA = Path(__file__).parents[1] / "data" / "tracefs" / "6.18"


def fmt(system: str, event: str):  # type: ignore[no-untyped-def]
    return parse_format((DATA / system / event / "format").read_text(), f"{system}/{event}/format", system=system)


def test_mark_victim_format_from_the_kernel() -> None:
    f = fmt("oom", "mark_victim")
    assert (f.system, f.name, f.id) == ("oom", "mark_victim", 609)
    layout = {name: (fld.offset, fld.size, fld.signed, fld.kind) for name, fld in f.fields.items()}
    assert layout == {
        "common_type": (0, 2, False, "int"),
        "common_flags": (2, 1, False, "int"),
        "common_preempt_count": (3, 1, False, "int"),
        "common_pid": (4, 4, True, "int"),
        "pid": (8, 4, True, "int"),
        "comm": (12, 4, False, "loc"),
        "total_vm": (16, 8, False, "int"),
        "anon_rss": (24, 8, False, "int"),
        "file_rss": (32, 8, False, "int"),
        "shmem_rss": (40, 8, False, "int"),
        "uid": (48, 4, False, "int"),
        "pgtables": (56, 8, False, "int"),
        "oom_score_adj": (64, 2, True, "int"),
    }
    assert f.size == 66


def test_every_recorded_format_parses() -> None:
    names = sorted(p.parent.name for p in DATA.glob("*/*/format"))
    assert "mark_victim" in names and "reclaim_retry_zone" in names and "print" in names
    for path in DATA.glob("*/*/format"):
        f = parse_format(path.read_text(), str(path), system=path.parent.parent.name)
        assert f.name == path.parent.name
        assert all(fld.end <= 4096 for fld in f.fields.values())


def test_fixed_char_array_and_signed_fields() -> None:
    f = fmt("oom", "oom_score_adj_update")
    assert f.fields["comm"].kind == "str" and f.fields["comm"].size == 16
    rec = bytearray(32)
    rec[0:2] = f.id.to_bytes(2, "little")
    rec[8:12] = (4242).to_bytes(4, "little")
    rec[12:20] = b"bash\0xyz"
    rec[28:30] = (-1000).to_bytes(2, "little", signed=True)
    assert f.decode(bytes(rec)) == {
        "common_type": f.id, "common_flags": 0, "common_preempt_count": 0, "common_pid": 0,
        "pid": 4242, "comm": "bash", "oom_score_adj": -1000,
    }


def _victim(comm: bytes, loc: int | None = None, size: int | None = None) -> bytes:
    f = fmt("oom", "mark_victim")
    rec = bytearray(66)
    rec[0:2] = f.id.to_bytes(2, "little")
    rec[8:12] = (77).to_bytes(4, "little")
    offset = 66 if loc is None else loc
    rec[12:16] = (offset | (len(comm) if size is None else size) << 16).to_bytes(4, "little")
    return bytes(rec) + comm


def test_data_loc_string() -> None:
    out = fmt("oom", "mark_victim").decode(_victim(b"hog\0"))
    assert out["pid"] == 77 and out["comm"] == "hog"


def test_data_loc_outside_the_record_is_refused() -> None:
    f = fmt("oom", "mark_victim")
    with pytest.raises(RecordError, match="outside"):
        f.decode(_victim(b"hog\0", loc=200))
    with pytest.raises(RecordError, match="outside"):
        f.decode(_victim(b"hog\0", size=40))  # longer than what follows
    with pytest.raises(RecordError, match="outside"):
        f.decode(_victim(b"hog\0", loc=4))  # inside the fixed fields
    with pytest.raises(RecordError, match="outside"):
        f.decode(_victim(b"x" * (MAX_STRING + 1)))


def test_truncated_record_is_refused() -> None:
    with pytest.raises(RecordError, match="record of 40 bytes, its format needs 66"):
        fmt("oom", "mark_victim").decode(_victim(b"hog\0")[:40])


def test_rel_loc_is_relative_to_the_field_end() -> None:
    text = (
        "name: demo\nID: 9\nformat:\n"
        "\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;\n"
        "\tfield:__rel_loc char[] name;\toffset:4;\tsize:4;\tsigned:0;\n"
    )
    f = parse_format(text)
    rec = (9).to_bytes(2, "little") + b"\0\0" + (0 | 3 << 16).to_bytes(4, "little") + b"abc"
    assert f.decode(rec)["name"] == "abc"


def test_flexible_char_array_runs_to_the_record_end() -> None:
    f = fmt("ftrace", "print")
    rec = bytearray(16)
    rec[0:2] = f.id.to_bytes(2, "little")
    assert f.decode(bytes(rec) + b"hello\n\0\0")["buf"] == "hello\n"


@pytest.mark.parametrize(
    "text, message",
    [
        ("ID: 3\n\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;\n", "no name or ID"),
        ("name: x\nID: three\n", "bad ID"),
        ("name: x\nID: 3\n\tfield:int pid;\toffset:8;\tsize:4;\tsigned:1;\n", "no common_type"),
        ("name: x\nID: 3\n\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;\n"
         "\tfield:__data_loc char[] s;\toffset:4;\tsize:8;\tsigned:0;\n", "4 expected"),
    ],
)
def test_bad_format_files_name_the_file(text: str, message: str) -> None:
    with pytest.raises(FormatError, match=f"^events/x/format: .*{message}"):
        parse_format(text, "events/x/format")


def test_ring_buffer_headers_from_the_kernel() -> None:
    page = parse_page_header((DATA / "header_page").read_text())
    assert (page.timestamp_offset, page.commit_offset, page.commit_size, page.data_offset) == (0, 8, 8, 16)
    assert page.subbuf_size == 4096
    event = parse_event_header((DATA / "header_event").read_text())
    assert (event.type_len_bits, event.time_delta_bits) == (5, 27)
    assert (event.padding, event.time_extend, event.time_stamp, event.data_max) == (29, 30, 31, 28)


def test_unusable_ring_buffer_headers() -> None:
    text = (DATA / "header_event").read_text()
    with pytest.raises(FormatError, match="32-bit word"):
        parse_event_header(text.replace("27 bits", "26 bits"), "header_event")
    with pytest.raises(FormatError, match="no time_stamp"):
        parse_event_header(text.replace("time_stamp", "stamp"), "header_event")
    page = (DATA / "header_page").read_text()
    with pytest.raises(FormatError, match="no commit"):
        parse_page_header(page.replace("commit", "kommit"), "header_page")


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_sweep_removes_only_instances_of_dead_oomkits(tmp_path: Path, fake_proc) -> None:  # type: ignore[no-untyped-def]
    inst = tmp_path / "instances"
    dead = _dead_pid()
    for name in (f"oomkit-{dead}-0", f"oomkit-{dead}", f"oomkit-{os.getpid()}-0", "oomkit-1-0",
                 f"oomkit-bench-{dead}", "someone-else"):
        (inst / name).mkdir(parents=True)
    removed = sweep_stale(tmp_path, fake_proc.path)
    assert sorted(Path(p).name for p in removed) == sorted([f"oomkit-{dead}-0", f"oomkit-{dead}"])
    assert sorted(os.listdir(inst)) == sorted([f"oomkit-{os.getpid()}-0", "oomkit-1-0", f"oomkit-bench-{dead}",
                                               "someone-else"])


def test_cpu_lists() -> None:
    from oomkit.tracefs import parse_cpu_list

    assert parse_cpu_list("0-3,5\n") == {0, 1, 2, 3, 5}
    assert parse_cpu_list("0\n") == {0}
    for bad in ("3-1", "x", "0-"):
        with pytest.raises(ValueError):
            parse_cpu_list(bad)


def test_only_online_cpus_are_read(tmp_path: Path) -> None:
    from oomkit.tracefs import Instance

    (tmp_path / "instances").mkdir()
    inst = Instance(tmp_path)  # on a plain directory: nothing fills it in, the test does
    for cpu in range(4):
        (inst.path / "per_cpu" / f"cpu{cpu}").mkdir(parents=True)
    (tmp_path / "online").write_text("0,2-3\n")
    assert inst.cpus(str(tmp_path / "online")) == [0, 2, 3]
    assert inst.cpus(str(tmp_path / "missing")) == [0, 1, 2, 3]
