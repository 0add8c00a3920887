"""``preference`` reads command lines through the bounded reader: a stuck read costs a
bounded number of threads however many rankings ask for it."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator

import pytest
from oomkit_plugins.preference import Preference

from oomkit import Candidate, Config, Event
from oomkit.config import PluginsConfig
from oomkit.testing import FakeProc, config_for


@pytest.fixture
def stuck(fake_proc: FakeProc) -> Iterator[int]:
    """Pid 66, whose cmdline read blocks (a FIFO no one writes) until the test ends."""
    fake_proc.add_process(66, "stuck")
    path = fake_proc.root / "66" / "cmdline"
    path.unlink()
    os.mkfifo(path)
    yield 66
    fd = os.open(path, os.O_RDWR)
    path.unlink()
    path.write_bytes(b"")
    os.close(fd)


def test_a_stuck_cmdline_read_does_not_cost_a_thread_per_ranking(fake_proc: FakeProc, stuck: int) -> None:
    fake_proc.add_process(67, "batch", cmdline=("batch", "--nightly"))
    cfg: Config = config_for(fake_proc, plugins=PluginsConfig(settings={"preference": {"expendable": {"cmdlines": ["--nightly"]}}}))
    plugin = Preference()
    plugin.oomkit_configure(cfg)
    cands = [Candidate(pid=66, name="stuck", start_ticks=1000), Candidate(pid=67, name="batch", start_ticks=1000)]
    before = threading.active_count()
    tiers = {}
    for _ in range(50):
        tiers = plugin.oomkit_tier(Event(source="t", kind="oom"), cands)
    assert tiers[67][0] == "expendable" and 66 not in tiers
    assert threading.active_count() - before <= 4  # CmdlineReader's max_workers
