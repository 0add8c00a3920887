"""The v2 brake (``memory-high``) end to end against the guest's real memory controller.

``oomkit serve`` runs in the guest's root cgroup and brakes a test cgroup: ``memory.high``
16 MiB under its ``memory.max``.  Every hog is real and allocates until something stops it:
oomkit's kill while the kernel throttles it at the brake, or the kernel's own killer at
``memory.max`` once the brake is released.  Assertions are on outcomes (who died, what the
files hold, what the decision log says), never on durations.
"""

from __future__ import annotations

import itertools
import json
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.guest import Guest, GuestCgroup, Process

from .support import CHECKOUT, HOG, START_S, MiB, hog, touched

pytestmark = pytest.mark.kernel

Make = Callable[[str], GuestCgroup]
LIMIT = 96 * MiB
BRAKE = LIMIT - 16 * MiB
_n = itertools.count()
SIBLING = "oomkit-sibling"


def sibling(guest: Guest, cg: GuestCgroup, mib: int) -> Process:
    """A hog whose name (``comm``, from the name it was executed by) is :data:`SIBLING`."""
    link = f"/tmp/{SIBLING}"
    guest.run(["ln", "-sf", guest.interpreter, link])
    return cg.spawn([link, str(HOG), str(mib), "--hold"], cwd=str(CHECKOUT))


STARTED: list[Process] = []
"""Every daemon started: one a failed test left running is killed after it."""


@pytest.fixture(autouse=True)
def _no_daemon_left() -> Iterator[None]:
    yield
    while STARTED:
        proc = STARTED.pop()
        if proc.poll() is None:
            proc.signal(signal.SIGKILL)
            proc.wait()


class Daemon:
    def __init__(self, guest: Guest, cg: GuestCgroup, *, deadline_s: float, extra: tuple[str, ...] = ()) -> None:
        n = next(_n)
        self.guest = guest
        self.run_dir = f"/tmp/oomkit-brake-{n}"
        self.config = f"/tmp/oomkit-brake-{n}.toml"
        guest.write(self.config, (
            f'[paths]\nrun_dir = "{self.run_dir}"\n\n'
            f'[[sources]]\nkind = "memory-high"\ncgroups = ["{cg.rel}"]\nmargin = "16M"\ndeadline_s = {deadline_s}\n\n'
            # By name: a cmdline read of a throttled task may not answer in time (then
            # protect protects it, and the engine would kill nobody).
            f'[plugins.protect]\nnames = ["{SIBLING}"]\n'
        ))
        self.oomkit = str(Path(guest.interpreter).with_name("oomkit"))
        self.proc = guest.spawn([self.oomkit, "serve", "-c", self.config, "--events", "-", *extra])
        STARTED.append(self.proc)
        self.proc.wait_for(lambda p: b"oomkit ready" in p.stderr, timeout=START_S, what="the daemon started")

    def log(self) -> str:
        self.proc.poll()
        return self.proc.stderr.decode(errors="replace")

    def decisions(self) -> list[dict[str, Any]]:
        self.proc.poll()
        return [d for d in self.proc.json() if d.get("event", {}).get("kind") == "oom"]

    def journal(self) -> list[str]:
        out = self.guest.run(["ls", f"{self.run_dir}/journal"], check=False)
        return out.text.split()

    def restore(self) -> str:
        return self.guest.run([self.oomkit, "restore", "-c", self.config], timeout=START_S).text


@pytest.fixture
def braked(guest: Guest, guest_cgroup: Make) -> Iterator[GuestCgroup]:
    cg = guest_cgroup("brake")
    cg.write("memory.max", LIMIT)
    yield cg


def high(cg: GuestCgroup) -> str:
    return cg.read("memory.high").strip()


def wait(what: str, until: Callable[[], bool], proc: Process, timeout: float = 120.0) -> None:
    proc.wait_for(lambda _: until(), timeout=timeout, what=what)


def until(pred: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"{what}: not within {timeout:g} s"
        time.sleep(0.2)


def watchdog_pids(guest: Guest, d: Daemon) -> list[int]:
    """The watchdogs of ``d`` (its journal directory is in their argv; another daemon's,
    left by an earlier test, is not)."""
    code = (
        "import os\n"
        f"mine = {(d.run_dir + '/journal').encode()!r}\n"
        "for p in os.listdir('/proc'):\n"
        "    if p.isdigit() and int(p) != os.getpid():\n"
        "        try: cmd = open(f'/proc/{p}/cmdline', 'rb').read().split(b'\\0')\n"
        "        except OSError: continue\n"
        "        if any(a.endswith(b'oomkit/watchdog.py') for a in cmd) and mine in cmd: print(p)\n"
    )
    return [int(p) for p in guest.python(code).text.split()]


def test_serve_brakes_kills_the_hog_spares_the_protected_sibling_and_releases_on_exit(
    guest: Guest, braked: GuestCgroup
) -> None:
    d = Daemon(guest, braked, deadline_s=60)
    assert high(braked) == str(BRAKE) and len(d.journal()) == 1
    spared = sibling(guest, braked, 40)
    touched(spared)
    grower = hog(braked, 400)
    wait("a decision", lambda: bool(d.decisions()), d.proc)
    decision = d.decisions()[0]
    assert decision["outcome"] == "killed", decision
    assert decision["victim"]["pid"] == grower.pid
    assert decision["event"]["values"]["braked"] == 1 and decision["event"]["values"]["high_bytes"] == BRAKE
    assert grower.wait(60) == -9
    vetoed = [r for r in decision["ranking"] if r["candidate"]["pid"] == spared.pid]
    assert vetoed and any(v["plugin"] == "protect" for v in vetoed[0]["vetoes"]), decision["ranking"]
    assert spared.poll() is None
    # oomkit's kill, not the kernel's.
    assert braked.keyed("memory.events")["oom_kill"] == 0
    assert high(braked) == str(BRAKE)  # still braked for the next episode
    assert d.proc.stop() == 0
    assert high(braked) == "max" and d.journal() == []
    assert "braked: memory.high" in d.log()


def test_dry_run_the_deadline_releases_the_brake_and_the_kernel_kills_at_max(
    guest: Guest, braked: GuestCgroup
) -> None:
    d = Daemon(guest, braked, deadline_s=2.0, extra=("--dry-run",))
    grower = hog(braked, 400)
    assert grower.wait(180) == -9
    events = braked.keyed("memory.events")
    assert events["oom_kill"] >= 1 and events["high"] >= 1
    # The engine chose the grower; a decision slower than the deadline (an emulated CPU on a
    # busy host) finds the brake released at its re-check and ends condition-cleared instead.
    outcomes = [(x["outcome"], x["victim"] and x["victim"]["pid"]) for x in d.decisions()]
    assert any(o in ("dry-run", "condition-cleared") and pid == grower.pid for o, pid in outcomes), outcomes
    assert "brake released" in d.log()
    # Usage is back under the brake point: braked again.
    wait("braked again", lambda: high(braked) == str(BRAKE), d.proc)
    assert d.proc.stop() == 0
    assert high(braked) == "max"


def test_the_watchdog_releases_the_brake_when_the_daemon_is_sigkilled(guest: Guest, braked: GuestCgroup) -> None:
    d = Daemon(guest, braked, deadline_s=600, extra=("--dry-run",))
    grower = hog(braked, 400)
    wait("the hog stuck at the brake", lambda: bool(d.decisions()), d.proc)
    assert grower.poll() is None and high(braked) == str(BRAKE), d.decisions()
    d.proc.signal(signal.SIGKILL)
    d.proc.wait()
    wait("the watchdog's restore", lambda: high(braked) == "max", grower)
    assert grower.wait(180) == -9  # the kernel's killer at memory.max
    assert d.journal() == []
    until(lambda: watchdog_pids(guest, d) == [], "the watchdog exited after its restore")


def test_oomkit_restore_releases_the_brake_when_everything_was_sigkilled(guest: Guest, braked: GuestCgroup) -> None:
    d = Daemon(guest, braked, deadline_s=600, extra=("--dry-run",))
    assert high(braked) == str(BRAKE)
    (dog,) = watchdog_pids(guest, d)
    d.proc.signal(signal.SIGSTOP)  # "together": the daemon cannot see its watchdog die
    guest.run(["kill", "-9", str(dog)])
    d.proc.signal(signal.SIGKILL)
    d.proc.wait()
    assert high(braked) == str(BRAKE) and len(d.journal()) == 1  # nobody left to restore
    out = d.restore()
    assert f"v2:{braked.rel}: memory.high {BRAKE} -> max (the original" in out, out
    assert high(braked) == "max" and d.journal() == []


def test_an_operators_memory_high_written_meanwhile_is_kept(guest: Guest, braked: GuestCgroup) -> None:
    d = Daemon(guest, braked, deadline_s=1.0, extra=("--dry-run",))
    theirs = str(72 * MiB)
    braked.write("memory.high", theirs)
    wait("the change noticed", lambda: "written by someone else" in d.log(), d.proc)
    assert d.journal() == []
    # Stuck at their value: the engine decides there, and no deadline releases it.
    grower = hog(braked, 400)
    wait("a decision at their brake", lambda: bool(d.decisions()), d.proc)
    assert d.decisions()[0]["event"]["values"]["high_bytes"] == int(theirs)
    assert high(braked) == theirs and grower.poll() is None
    grower.signal(signal.SIGKILL)
    grower.wait()
    assert d.proc.stop() == 0
    assert high(braked) == theirs
    assert json.dumps(d.journal()) == "[]"


def test_a_cgroup_removed_while_braked_is_waited_for_and_braked_again(guest: Guest, braked: GuestCgroup) -> None:
    d = Daemon(guest, braked, deadline_s=600, extra=("--dry-run",))
    grower = hog(braked, 400)
    wait("the hog stuck at the brake", lambda: bool(d.decisions()), d.proc)
    braked.write("cgroup.kill", 1)
    assert grower.wait(60) == -9
    braked.wait_empty()
    guest.run(["rmdir", braked.path])
    wait("the removal noticed", lambda: "was removed; waiting for it to come back" in d.log(), d.proc)
    assert d.journal() == []
    guest.run(["mkdir", braked.path])
    braked.write("memory.max", LIMIT)
    # Made before its limit was set (as a runtime does): braked at the next rescan at the latest.
    wait("braked again", lambda: high(braked) == str(BRAKE), d.proc)
    assert len(d.journal()) == 1
    assert d.proc.stop() == 0
    assert high(braked) == "max" and d.journal() == []


def test_the_brake_follows_a_memory_max_raised_while_a_hog_is_held_at_it(guest: Guest, braked: GuestCgroup) -> None:
    d = Daemon(guest, braked, deadline_s=600, extra=("--dry-run",))
    grower = hog(braked, 136, "--hold")  # more than the brake, less than the new limit less its margin
    wait("the hog stuck at the brake", lambda: bool(d.decisions()), d.proc)
    assert grower.poll() is None and high(braked) == str(BRAKE)
    braked.write("memory.max", 2 * LIMIT)  # resized in place: the old brake would throttle it for nothing
    wait("the brake moved", lambda: high(braked) == str(2 * LIMIT - 16 * MiB), d.proc)
    touched(grower)  # it got its memory, the kernel's limit untouched
    assert braked.keyed("memory.events")["oom_kill"] == 0 and len(d.journal()) == 1
    braked.write("memory.max", "max")
    wait("the brake off", lambda: high(braked) == "max" and d.journal() == [], d.proc)
    assert "the brake moves" in d.log() and "there is no limit to brake under" in d.log()
    grower.signal(signal.SIGKILL)
    grower.wait()
    assert d.proc.stop() == 0
    assert high(braked) == "max"
