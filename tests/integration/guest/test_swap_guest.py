"""The swap-dependent paths in a guest with zram as swap: ``pageout`` of a process's
anonymous memory, and the ``freed`` scorer counting what went to swap."""

from __future__ import annotations

import json

import pytest

from tests.guest import Guest, GuestCgroup, Image

from .support import CHECKOUT, START_S, hog, touched

pytestmark = pytest.mark.kernel

PAGEOUT = r"""
import json, sys
from oomkit.procfs import read_meminfo, read_process
from oomkit_plugins.freed import freed_bytes
from oomkit_plugins.pageout import page_out
pid = int(sys.argv[1])
before = read_process("/proc", pid)
advised, freed, problem = page_out("/proc", pid, before.start_ticks, anonymous=True)
after = read_process("/proc", pid)
print(json.dumps({"swap_total": read_meminfo("/proc", ("SwapTotal",))["SwapTotal"], "advised": advised,
                  "freed": freed, "problem": problem, "anon_before": before.rss_anon_bytes,
                  "anon_after": after.rss_anon_bytes, "swap_after": after.swap_bytes,
                  "freed_score_before": freed_bytes(before), "freed_score_after": freed_bytes(after)}))
"""


def test_pageout_of_anonymous_memory_with_zram_and_freed_counts_swap(guest_image: Image) -> None:
    with Guest(guest_image, zram=True) as g:
        g.sh("echo 128M > /sys/block/zram0/disksize && mkswap /dev/zram0 >/dev/null && swapon /dev/zram0")
        cg = GuestCgroup.make(g, "zram")
        h = hog(cg, 32, "--hold")
        touched(h)
        out = json.loads(g.run([g.interpreter, "-c", PAGEOUT, str(h.pid)], cwd=str(CHECKOUT),
                               timeout=3 * START_S).text.splitlines()[-1])
        assert out["swap_total"] > 0 and out["problem"] == "", out
        # The hog's anonymous memory went to zram: its RssAnon fell, VmSwap rose...
        assert out["anon_after"] <= out["anon_before"] - (24 << 20), out
        assert out["swap_after"] >= 24 << 20 and out["freed"] >= 24 << 20, out
        # ...and a kill would still free it all: freed counts swap with resident memory.
        assert out["freed_score_after"] >= out["freed_score_before"] - (4 << 20), out
        assert h.poll() is None


