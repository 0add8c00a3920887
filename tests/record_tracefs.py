"""Record real tracefs ring-buffer pages for the unit tests (run as root on a real kernel).

    .venv/bin/python -m tests.record_tracefs [OUT_DIR]

Writes into ``tests/data/tracefs/<major.minor>/`` (or OUT_DIR): the instance's
``header_page`` and ``header_event``, the ``format`` file of every ``oom`` event and of
``ftrace/print``, and pages captured from a private instance, each ``NAME.bin`` with a
``NAME.json`` saying how it was made and what it must decode to:

* ``kill-mmap``: the reader sub-buffer after a memcg OOM kill, through the mapping;
* ``kills-read``: three memcg OOM kills in a row, through ``read()``;
* ``marker-extend``: two trace_marker writes 300 ms apart (a delta too large for 27 bits,
  so the kernel writes a time extend between them);
* ``marker-lost``: a flood of trace_marker writes into a one-page buffer, then ``read()``:
  the first page read says events were lost before it.

The memcgs are made under our own, limited to 32 MiB, and removed after.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

from oomkit.kmsg import Kmsg
from oomkit.ringbuffer import MappedCpu, PageParser, ReadCpu
from oomkit.tracefs import Instance, Mount

from . import kernel

OOM_EVENTS = ("mark_victim", "wake_reaper", "start_task_reaping", "finish_task_reaping", "skip_task_reaping",
              "reclaim_retry_zone", "compact_retry", "oom_score_adj_update")


def _kills(n: int) -> tuple[list[int], list[str]]:
    """``n`` memcg OOM kills: the victims' pids, and the kernel's own "Killed process" lines
    for them from /dev/kmsg (the oracle the decoded pages are checked against)."""
    parent, root = kernel.v1_parent(), kernel.find_mounts("/proc")[0]
    assert parent is not None and root is not None, kernel.v1_skip_reason()
    cg = kernel.make(parent, root, "record")
    log = Kmsg()
    try:
        cg.write("memory.limit_in_bytes", 32 << 20)
        pids = []
        for _ in range(n):
            p = cg.hog(100)
            p.wait()
            pids.append(p.pid)
        time.sleep(0.2)
        lines = [r.text for r in log.read()[0] if "Killed process" in r.text
                 and any(f"Killed process {pid} " in r.text for pid in pids)]
        return pids, lines
    finally:
        log.close()
        cg.remove()


def _instance(mount: Mount, size_kb: int, *events: str) -> Instance:
    inst = Instance(mount.path)
    inst.write("tracing_on", "0")
    inst.write("buffer_size_kb", str(size_kb))
    inst.write("trace_clock", "mono")
    inst.write("buffer_percent", "0")
    for e in events:
        inst.enable("oom", e)
    return inst


def main() -> None:
    release = ".".join(platform.release().split(".")[:2])
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).with_name("data") / "tracefs" / release
    out.mkdir(parents=True, exist_ok=True)
    mount = Mount.open()
    try:
        inst = _instance(mount, 64, "mark_victim")
        try:
            (out / "header_page").write_text(inst.read("events/header_page"))
            (out / "header_event").write_text(inst.read("events/header_event"))
            for system, event in [("oom", e) for e in OOM_EVENTS] + [("ftrace", "print")]:
                if inst.has_event(system, event):
                    d = out / system / event
                    d.mkdir(parents=True, exist_ok=True)
                    (d / "format").write_text(inst.read(f"events/{system}/{event}/format"))
            parser = PageParser(inst.page_header(), inst.event_header())
            mapped = {c: MappedCpu(inst.cpu_file(c), c, parser) for c in inst.cpus()}
            inst.write("tracing_on", "1")
            pids, lines = _kills(1)
            for cpu, m in mapped.items():
                batch = m.read()
                if batch.events:
                    # The reader sub-buffer as the mapping shows it, header and all.
                    _save(out, "kill-mmap", m.reader_page(), {"how": "mapped reader sub-buffer after one memcg OOM kill",
                                                              "cpu": cpu, "pids": pids, "kmsg": lines})
            for m in mapped.values():
                m.close()
        finally:
            inst.remove()

        inst = _instance(mount, 64, "mark_victim")
        try:
            readers = [ReadCpu(inst.cpu_file(c), c, parser) for c in inst.cpus()]
            inst.write("tracing_on", "1")
            pids, lines = _kills(3)
            pages = [b for r in readers for b in _read_pages(r)]
            _save(out, "kills-read", b"".join(pages), {"how": "read() of trace_pipe_raw after three memcg OOM kills",
                                                       "pages": len(pages), "pids": pids, "kmsg": lines})
            for r in readers:
                r.close()
        finally:
            inst.remove()

        inst = _instance(mount, 4)
        try:
            readers = [ReadCpu(inst.cpu_file(c), c, parser) for c in inst.cpus()]
            inst.write("tracing_on", "1")
            os.sched_setaffinity(0, {0})
            _marker(inst, "first")
            time.sleep(0.3)
            _marker(inst, "second")
            pages = _read_pages(readers[0])
            _save(out, "marker-extend", b"".join(pages), {"how": "trace_marker 'first', 300 ms, 'second', on cpu 0",
                                                          "texts": ["first", "second"], "min_gap_ns": 300_000_000})
            for i in range(2000):
                _marker(inst, f"flood {i}")
            pages = _read_pages(readers[0])
            _save(out, "marker-lost", b"".join(pages), {"how": "2000 trace_marker writes into a 4 KiB buffer, then read()",
                                                        "pages": len(pages), "written": 2000})
            for r in readers:
                r.close()
        finally:
            inst.remove()
    finally:
        mount.close()
    print(f"recorded into {out}")


def _marker(inst: Instance, text: str) -> None:
    fd = os.open(inst.path / "trace_marker", os.O_WRONLY)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def _read_pages(r: ReadCpu) -> list[bytes]:
    pages = []
    while True:
        try:
            buf = os.read(r.fileno(), r.parser.page.subbuf_size)
        except BlockingIOError:
            return pages
        if not buf:
            return pages
        pages.append(buf)


def _save(out: Path, name: str, data: bytes, meta: dict[str, object]) -> None:
    meta["kernel"] = platform.release()
    (out / f"{name}.bin").write_bytes(data)
    (out / f"{name}.json").write_text(json.dumps(meta, indent=2) + "\n")


if __name__ == "__main__":
    main()
