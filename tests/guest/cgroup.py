"""Cgroups in a guest's v2 hierarchy, made and removed through its agent."""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence
from typing import Any

from .machine import Guest, GuestError, Process, Result

__all__ = ["GuestCgroup", "ROOT"]

ROOT = "/sys/fs/cgroup"
_counter = itertools.count()


class GuestCgroup:
    """One cgroup directory in the guest; ``rel`` is its path as oomkit's configs name it."""

    def __init__(self, guest: Guest, path: str) -> None:
        self.guest = guest
        self.path = path

    @classmethod
    def make(cls, guest: Guest, tag: str, parent: str = ROOT) -> GuestCgroup:
        """A new cgroup ``oomkit-test-<n>-<tag>`` under ``parent``."""
        path = f"{parent}/oomkit-test-{next(_counter)}-{tag}"
        guest.run(["mkdir", path])
        return cls(guest, path)

    def child(self, tag: str) -> GuestCgroup:
        """A new cgroup below this one, with every controller this one has enabled for it."""
        for c in self.read("cgroup.controllers").split():
            self.write("cgroup.subtree_control", f"+{c}")
        return GuestCgroup.make(self.guest, tag, self.path)

    @property
    def rel(self) -> str:
        return self.path.removeprefix(ROOT) or "/"

    def __repr__(self) -> str:
        return f"<GuestCgroup {self.rel}>"

    def write(self, name: str, value: str | int) -> None:
        self.guest.write(f"{self.path}/{name}", value)

    def read(self, name: str) -> str:
        return self.guest.read_text(f"{self.path}/{name}")

    def keyed(self, name: str) -> dict[str, int]:
        """A flat-keyed file (``memory.events``, ``cgroup.events``) as a dict."""
        return {k: int(v) for k, v in (ln.split() for ln in self.read(name).splitlines() if ln)}

    def procs(self) -> list[int]:
        return [int(p) for p in self.read("cgroup.procs").split()]

    def spawn(self, argv: Sequence[str], **kwargs: Any) -> Process:
        return self.guest.spawn(argv, cgroup=self.path, **kwargs)

    def run(self, argv: Sequence[str], **kwargs: Any) -> Result:
        return self.guest.run(argv, cgroup=self.path, **kwargs)

    def wait_empty(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while self.keyed("cgroup.events")["populated"]:
            if time.monotonic() > deadline:
                raise GuestError(f"{self.path} still holds {self.procs()} after {timeout:g} s")
            time.sleep(0.1)

    def remove(self) -> None:
        """Kill everything inside (``cgroup.kill``), then rmdir, children first; nothing if
        the test removed it already."""
        if self.guest.run(["test", "-d", self.path], check=False).rc != 0:
            return
        found = self.guest.run(["find", self.path, "-mindepth", "1", "-type", "d"], check=False)
        for sub in sorted(found.text.split(), key=len, reverse=True):
            GuestCgroup(self.guest, sub).remove()
        self.write("cgroup.kill", 1)
        self.wait_empty()
        self.guest.run(["rmdir", self.path])
