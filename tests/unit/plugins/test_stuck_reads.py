"""Plugins that read slow per-process files off the hot path (``preference``: command lines,
``freed``: ``smaps_rollup``): a stuck read costs a bounded number of threads however many
rankings ask for it."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator

import pytest
from oomkit_plugins.freed import Freed
from oomkit_plugins.preference import Preference

from oomkit import Candidate, Config, Event
from oomkit.config import PluginsConfig
from oomkit.testing import FakeProc, config_for


def _fifo(fake_proc: FakeProc, name: str) -> Iterator[int]:
    """Pid 66, whose ``name`` read blocks (a FIFO no one writes) until the test ends."""
    fake_proc.add_process(66, "stuck")
    path = fake_proc.root / "66" / name
    path.unlink(missing_ok=True)
    os.mkfifo(path)
    yield 66
    fd = os.open(path, os.O_RDWR)
    path.unlink()
    path.write_bytes(b"")
    os.close(fd)


@pytest.fixture
def stuck(fake_proc: FakeProc) -> Iterator[int]:
    yield from _fifo(fake_proc, "cmdline")


@pytest.fixture
def stuck_smaps(fake_proc: FakeProc) -> Iterator[int]:
    yield from _fifo(fake_proc, "smaps_rollup")


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


def test_a_stuck_smaps_rollup_read_does_not_cost_a_thread_per_ranking(fake_proc: FakeProc, stuck_smaps: int) -> None:
    cfg: Config = config_for(fake_proc, plugins=PluginsConfig(settings={"freed": {"smaps_rollup": True}}))
    plugin = Freed()
    plugin.oomkit_configure(cfg)
    before = threading.active_count()
    for i in range(50):
        # A new process each time: every ranking has something not read yet.
        cands = [Candidate(pid=66, name="stuck", start_ticks=1000), Candidate(pid=1000 + i, name="n", start_ticks=1)]
        scores = plugin.oomkit_score(Event(source="t", kind="oom"), cands, None)  # type: ignore[arg-type]
        assert len(scores) == 2
    assert threading.active_count() - before <= 1
