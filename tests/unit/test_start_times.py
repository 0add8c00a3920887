"""StartTimes on a fake tree: no pidfds there (its pids are not this kernel's), every answer read."""

from __future__ import annotations

from oomkit.procfs import StartTimes, is_own_procfs
from oomkit.testing import FakeProc


def test_a_fake_tree_is_not_our_procfs_and_every_answer_is_read_anew(fake_proc: FakeProc) -> None:
    assert not is_own_procfs(fake_proc.path)
    fake_proc.add_process(4242, "app", start_ticks=100)
    times = StartTimes(fake_proc.path)
    assert times.get(4242) == 100
    fake_proc.add_process(4242, "app", start_ticks=900)  # the pid reused by another process
    assert times.get(4242) == 900
    fake_proc.remove_process(4242)
    assert times.get(4242) is None
    assert len(times) == 0
    assert "no pidfds" in repr(times)


def test_the_real_proc_is_ours() -> None:
    assert is_own_procfs("/proc")
