"""The ``kernel-page`` source's fallbacks in the guest's 6.1 kernel (see :mod:`tests.guest`).

6.1 cannot memory-map a tracefs ring buffer (that came in 6.10), so the source has to fall
back to ``read()`` of ``trace_pipe_raw``, or to ``/dev/kmsg``.  ``oom:mark_victim`` in 6.1 as
released carries the pid alone; Debian's 6.1.176 has the later fields backported: the
source reads whichever its ``format`` file describes, and the name and memcg from ``/proc``.  Every kill here is
the guest kernel's own: a hog in a cgroup with ``memory.max`` set.  The guest has no tracefs
mounted, so the source mounts its own and must leave nothing behind.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.guest import Guest, GuestCgroup

from .support import CHECKOUT, HOG, MiB, hog, watch

pytestmark = pytest.mark.kernel

Make = Callable[[str], GuestCgroup]


def _mounts(guest: Guest) -> str:
    return guest.run(["cat", "/proc/mounts"]).stdout.decode()


@pytest.mark.parametrize("mode", ["auto", "kmsg"])
def test_a_kernel_kill_through_each_fallback(mode: str, guest: Guest, guest_cgroup: Make) -> None:
    cg = guest_cgroup(f"kpage-{mode}")
    cg.write("memory.max", 32 * MiB)
    assert "tracefs" not in _mounts(guest)
    w = watch(guest, {"kind": "kernel-page", "mode": mode})
    victim = hog(cg, 100)
    # The victim stays a zombie until we reap it: its /proc entry is there for the lookup.
    w.wait(lambda w: any(e["pid"] == victim.pid for e in w.events("kernel-kill")), "the kill reported", timeout=120)
    assert victim.wait(60) == -9
    w.stop()
    kills = [e for e in w.events("kernel-kill") if e["pid"] == victim.pid or e["scope"]["path"] == cg.rel]
    assert len(kills) == 1, kills
    [kill] = kills
    assert kill["scope"] == {"tree": "v2", "path": cg.rel}
    assert kill["comm"] == Path(guest.interpreter).name[:15]
    log = w.log()
    if mode == "auto":
        assert "ring-buffer mapping needs Linux 6.10); using read()" in log, log
        assert "through read() of tracefs ring buffers" in log
        assert kill["pid_start_ticks"] is not None
        if kill["values"]:  # the format has the memory fields (backported)
            assert kill["values"]["anon_rss_bytes"] > 16 * MiB
    else:
        assert "through the kernel log (/dev/kmsg)" in log
        assert kill["values"]["anon_rss_bytes"] > 16 * MiB
    assert "tracefs" not in _mounts(guest)  # the private mount, and the instance on it, are gone


def test_reclaim_retries_before_a_global_oom_are_early_warnings(fresh_guest: Guest) -> None:
    # Global memory pressure, which the host must never be put under: the guest is its own
    # machine, booted for this test alone.  A hog in the root cgroup allocates more than the
    # guest has; before the kernel gives up and kills it, its allocator retries reclaim.
    guest = fresh_guest
    w = watch(guest, {"kind": "kernel-page", "warn_interval_s": 0.1}, mlock=True)
    guest.write(f"/proc/{w.proc.pid}/oom_score_adj", -1000)
    total = int(guest.read_text("/proc/meminfo").split("MemTotal:")[1].split()[0]) * 1024
    victim = guest.spawn([guest.interpreter, str(HOG), str(2 * total // MiB)], cwd=str(CHECKOUT))
    w.wait(lambda w: any(e["pid"] == victim.pid for e in w.events("kernel-kill")), "the global OOM kill", timeout=240)
    warnings = w.events("pressure", source="kernel-page")
    w.stop()
    assert warnings, w.log()
    assert all(e["scope"] == {"tree": "system", "path": "/"} for e in warnings)
    assert sum(e["values"].get("reclaim_retries", 0) + e["values"].get("compact_retries", 0) for e in warnings) >= 1, warnings
    # The warnings came first: the kernel retried before it killed.
    kill = next(e for e in w.events("kernel-kill") if e["pid"] == victim.pid)
    assert min(e["monotonic_ns"] for e in warnings) < kill["monotonic_ns"]
