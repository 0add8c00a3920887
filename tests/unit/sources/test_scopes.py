"""Scope patterns: expansion, and following cgroups as they appear and disappear."""

from __future__ import annotations

import select
from pathlib import Path

import pytest

from oomkit.events import Scope
from oomkit.sources.scopes import ScopeWatcher, relative_pattern


def _changed(w: ScopeWatcher) -> tuple[set[Scope], set[Scope]]:
    # The inotify fd is readable once the kernel queued the event.
    ep = select.epoll()
    ep.register(w.fileno(), select.EPOLLIN)
    try:
        assert ep.poll(5), "no inotify event arrived"
    finally:
        ep.close()
    return w.changes()


def v2(path: str) -> Scope:
    return Scope(tree="v2", path=path)


@pytest.mark.parametrize(
    "pattern, rel",
    [("/a/b", "/a/b"), ("a/b/", "/a/b"), ("/", "/"), ("", "/"), ("{root}/a", "/a"), ("{root}", "/")],
)
def test_relative_pattern(tmp_path: Path, pattern: str, rel: str) -> None:
    assert relative_pattern(tmp_path, pattern.format(root=tmp_path)) == rel


def test_scan_expands_globs_per_component(tmp_path: Path) -> None:
    for d in ("work.slice/a.service", "work.slice/b.service", "work.slice/c.scope", "other/a.service"):
        (tmp_path / d).mkdir(parents=True)
    (tmp_path / "work.slice" / "file.service").write_text("")  # files are never cgroups
    w = ScopeWatcher(tmp_path, "v2", ["/work.slice/*.service", "/other", "/missing"])
    try:
        assert w.scan() == {v2("/work.slice/a.service"), v2("/work.slice/b.service"), v2("/other")}
        assert list(w.unmatched()) == ["/missing"]
    finally:
        w.close()


def test_wildcards_do_not_cross_slashes(tmp_path: Path) -> None:
    (tmp_path / "a" / "b").mkdir(parents=True)
    w = ScopeWatcher(tmp_path, "v1", ["/*"])
    try:
        assert w.scan() == {Scope(tree="v1", path="/a")}
    finally:
        w.close()


def test_follows_cgroups_that_appear_and_disappear(tmp_path: Path) -> None:
    (tmp_path / "work.slice").mkdir()
    w = ScopeWatcher(tmp_path, "v2", ["/work.slice/*"])
    try:
        assert w.scan() == set()
        (tmp_path / "work.slice" / "job1").mkdir()
        assert _changed(w) == ({v2("/work.slice/job1")}, set())
        (tmp_path / "work.slice" / "job1").rmdir()
        assert _changed(w) == (set(), {v2("/work.slice/job1")})
    finally:
        w.close()


def test_follows_a_wildcard_level_that_appears_later(tmp_path: Path) -> None:
    w = ScopeWatcher(tmp_path, "v2", ["/user-*/app"])
    try:
        assert w.scan() == set()
        (tmp_path / "user-1").mkdir()
        assert _changed(w) == (set(), set())
        (tmp_path / "user-1" / "app").mkdir()
        assert _changed(w) == ({v2("/user-1/app")}, set())
    finally:
        w.close()


def test_a_parent_removed_and_made_again_is_watched_again(tmp_path: Path) -> None:
    (tmp_path / "p").mkdir()
    w = ScopeWatcher(tmp_path, "v2", ["/p/*"])
    try:
        w.scan()
        (tmp_path / "p").rmdir()
        _changed(w)
        (tmp_path / "p").mkdir()
        _changed(w)
        (tmp_path / "p" / "c").mkdir()
        assert _changed(w) == ({v2("/p/c")}, set())
    finally:
        w.close()


def test_new_files_cause_no_rescan(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    w = ScopeWatcher(tmp_path, "v2", ["/*"])
    try:
        w.scan()
        (tmp_path / "memory.events").write_text("")
        assert _changed(w) == (set(), set())
    finally:
        w.close()
