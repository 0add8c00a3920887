"""``pageout`` against the real kernel: a child's file-backed pages paged out through its
pidfd (works without swap), its anonymous memory left alone where there is no swap."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from oomkit.procfs import read_meminfo, read_process
from oomkit_plugins.pageout import page_out

pytestmark = pytest.mark.kernel

MiB = 1 << 20

CHILD = r"""
import mmap, os, sys
path, anon_mib = sys.argv[1], int(sys.argv[2])
f = open(path, "rb")
m = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
s = 0
for i in range(0, len(m), 4096):
    s += m[i]
a = bytearray(anon_mib << 20)
for i in range(0, len(a), 4096):
    a[i] = 1
print("ready", flush=True)
sys.stdin.read()
"""


def _rss(pid: int) -> tuple[int, int]:
    c = read_process("/proc", pid)
    assert c is not None and c.rss_file_bytes is not None and c.rss_anon_bytes is not None
    return c.rss_file_bytes, c.rss_anon_bytes


def test_file_backed_pages_are_paged_out_anonymous_memory_only_with_swap(tmp_path: Path) -> None:
    data = tmp_path / f"pageout-{os.getpid()}.bin"
    data.write_bytes(os.urandom(32 * MiB))
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(data), "16"], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE)
    try:
        assert child.stdout is not None and child.stdout.readline() == b"ready\n"
        file_before, anon_before = _rss(child.pid)
        assert file_before >= 30 * MiB
        c = read_process("/proc", child.pid)
        assert c is not None
        swap = read_meminfo("/proc", ("SwapTotal",)).get("SwapTotal", 0) > 0
        advised, freed, problem = page_out("/proc", child.pid, c.start_ticks, anonymous=swap)
        assert problem == "" and advised >= 32 * MiB
        deadline = time.monotonic() + 10
        while _rss(child.pid)[0] > file_before - 24 * MiB and time.monotonic() < deadline:
            time.sleep(0.05)
        file_after, anon_after = _rss(child.pid)
        assert file_after <= file_before - 24 * MiB, (file_before, file_after)
        assert freed >= 24 * MiB
        if not swap:
            assert anon_after >= anon_before - 2 * MiB  # no swap: it cannot go anywhere
        # A reused pid (another start time) is never advised.
        assert page_out("/proc", child.pid, c.start_ticks + 1, anonymous=swap) == (0, 0, "gone")
    finally:
        child.kill()
        child.communicate()
