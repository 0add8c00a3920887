"""One cgroup, one spelling, one lock: canonical paths and held directories on fake trees."""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from oomkit.cgroupdir import CgroupDir, NotACgroup, flock_holder, open_below
from oomkit.cgroupfs import canonical_path, mounts_for, resolve_cgroup
from oomkit.config import ConfigError
from oomkit.events import Scope
from oomkit.testing import FakeCgroups, FakeProc, paths_for


@pytest.fixture
def root(fake_cgroups: FakeCgroups) -> Path:
    fake_cgroups.mkdir_v1("/a/b")
    return fake_cgroups.memory_v1


@pytest.mark.parametrize(
    ("configured", "canonical"),
    [
        ("/a/b", "/a/b"),
        ("a/b", "/a/b"),
        ("/a//b/", "/a/b"),
        ("/a/./b/.", "/a/b"),
        ("/a/b/..", "/a"),
        ("/a/b/../../a", "/a"),
        ("/", "/"),
        ("", "/"),
        ("/a/b/../..", "/"),
        ("/a/*/x", "/a/*/x"),  # a pattern stays a pattern
    ],
)
def test_spellings_of_one_cgroup_give_one_path(root: Path, configured: str, canonical: str) -> None:
    assert canonical_path(root, configured) == canonical
    assert canonical_path(root, f"{root}{'/' if configured and not configured.startswith('/') else ''}{configured}") == canonical
    assert canonical_path(root, f"/{root}//{configured}") == canonical


def test_a_symlink_into_the_mount_names_the_cgroup_it_leads_to(root: Path, tmp_path: Path) -> None:
    (tmp_path / "to-a").symlink_to(root / "a")
    (tmp_path / "mnt").symlink_to(root)
    assert canonical_path(root, str(tmp_path / "to-a" / "b")) == "/a/b"
    assert canonical_path(tmp_path / "mnt", str(root / "a")) == "/a"  # the mount itself through a link


@pytest.mark.parametrize(
    ("configured", "error"),
    [
        ("/..", r"^cgroup '/\.\.': '\.\.' climbs out of the cgroup v1 memory hierarchy \(mounted at .*\)$"),
        ("/a/../../b", r"climbs out"),
        ("/a/" + "n" * 256, r"the name 'n+\.\.\.' \(256 characters\) is longer than NAME_MAX allows \(255 bytes\)$"),
        ("/a/" + "x/" * 2047, r"^cgroup '/a/x/x/x.*\.\.\.' \(4097 characters\): 4097 bytes, longer than PATH_MAX"),
        ("/a/\0", r"contains a NUL byte"),
    ],
)
def test_what_cannot_be_a_cgroup_is_one_line(root: Path, configured: str, error: str) -> None:
    with pytest.raises(ConfigError, match=error) as info:
        canonical_path(root, configured)
    assert "\n" not in str(info.value) and len(str(info.value)) < 300


def test_a_name_of_255_bytes_is_fine(root: Path) -> None:
    assert canonical_path(root, "/a/" + "n" * 255) == "/a/" + "n" * 255


def test_resolve_cgroup_uses_the_canonical_path(fake_proc: FakeProc, fake_cgroups: FakeCgroups, root: Path) -> None:
    mounts = mounts_for(paths_for(fake_proc, fake_cgroups))
    assert resolve_cgroup(mounts, "/a/b/../b/") == Scope("v1", "/a/b")
    with pytest.raises(ConfigError, match="no such cgroup"):
        resolve_cgroup(mounts, "/a/nope")


# --- held directories -----------------------------------------------------------------------


def test_a_held_cgroup_is_read_through_its_fd_not_its_path(root: Path, fake_cgroups: FakeCgroups) -> None:
    cg = CgroupDir.open(root, Scope("v1", "/a/b"))
    try:
        assert cg.keyed("memory.oom_control")["oom_kill_disable"] == 0
        assert cg.exists() and not cg.replaced()
        shutil.rmtree(root / "a" / "b")
        fake_cgroups.mkdir_v1("/a/b", oom_kill_disable=1)  # another cgroup at the same path
        assert not cg.exists()
        with pytest.raises(FileNotFoundError):
            cg.keyed("memory.oom_control")  # never its successor's
    finally:
        cg.close()


def test_replaced_sees_another_cgroup_at_the_path(root: Path, fake_cgroups: FakeCgroups) -> None:
    cg = CgroupDir.open(root, Scope("v1", "/a/b"))
    try:
        os.rename(root / "a" / "b", root / "a" / "old")  # still there, elsewhere
        fake_cgroups.mkdir_v1("/a/b")
        assert cg.exists() and cg.replaced()
    finally:
        cg.close()


def test_open_below_follows_no_symlink(root: Path, tmp_path: Path) -> None:
    (root / "a" / "link").symlink_to(tmp_path)
    with pytest.raises(NotACgroup, match="'link' is not a cgroup directory"):
        open_below(root, "/a/link")
    with pytest.raises(FileNotFoundError):
        open_below(root, "/a/nope")


_TRY_LOCK = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECTORY)
try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    print("got it")
except BlockingIOError:
    print("held")
"""


def test_the_lock_holds_whatever_the_spelling_and_across_processes(root: Path) -> None:
    cg = CgroupDir.open(root, Scope("v1", "/a/b"))
    try:
        assert cg.lock()
        for spelling in (root / "a" / "b", f"{root}//a/./b/", root / "a" / "b" / ".." / "b"):
            out = subprocess.run([sys.executable, "-c", _TRY_LOCK, str(spelling)], capture_output=True, text=True)
            assert out.stdout.strip() == "held", spelling
        other = CgroupDir.open(root, Scope("v1", "/a/b"))
        try:
            assert not other.lock(attempts=2)  # another open file description, same process
            assert other.holder() == os.getpid()
        finally:
            other.close()
    finally:
        cg.close()
    out = subprocess.run([sys.executable, "-c", _TRY_LOCK, str(root / "a" / "b")], capture_output=True, text=True)
    assert out.stdout.strip() == "got it"


def test_a_cgroup_made_again_starts_unlocked(root: Path, fake_cgroups: FakeCgroups) -> None:
    cg = CgroupDir.open(root, Scope("v1", "/a/b"))
    try:
        assert cg.lock()
        shutil.rmtree(root / "a" / "b")
        fake_cgroups.mkdir_v1("/a/b")
        again = CgroupDir.open(root, Scope("v1", "/a/b"))
        try:
            assert again.lock(attempts=1)
        finally:
            again.close()
    finally:
        cg.close()


def test_nobody_holds_an_unlocked_directory(root: Path) -> None:
    fd = os.open(root / "a", os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert flock_holder(fd) is None
        fcntl.flock(fd, fcntl.LOCK_SH)
        assert flock_holder(fd) == os.getpid()
    finally:
        os.close(fd)
