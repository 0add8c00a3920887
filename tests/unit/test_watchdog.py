"""The takeover watchdog's line protocol, spoken to the real script on fake trees.

The test is the daemon: it holds the other end of the watchdog's socket and sends commands
with directory fds attached, as :mod:`oomkit.watchdog_client` does.  Nothing signals the
watchdog's eventfds on a fake tree; its rescan (every 20 ms here) reads every memcg instead.
"""

from __future__ import annotations

import array
import fcntl
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from oomkit import watchdog
from oomkit.testing import FakeCgroups, FakeProc

CG = "/jobs/a"


class Dog:
    """One watchdog process and our end of its socket."""

    def __init__(self, proc: FakeProc, journal: Path, rescan_ms: int = 20) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.proc = subprocess.Popen(
            [sys.executable, "-I", "-S", str(watchdog.__file__), proc.path, str(journal), str(rescan_ms)],
            stdin=theirs.fileno(),
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        theirs.close()
        self.sock = ours
        ours.settimeout(10)
        self.seen: list[list[str]] = []

    def send(self, *words: str, fds: tuple[int, ...] = ()) -> None:
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        self.sock.sendmsg([" ".join(words).encode()], anc)

    def recv(self) -> list[str]:
        data = self.sock.recv(65536)
        assert data, "end of file: the watchdog is gone"
        return data.decode().split()

    def expect(self, verb: str) -> list[str]:
        """The next message that starts with ``verb``; the others are kept in ``seen``."""
        while True:
            words = self.recv()
            if words[0] == verb:
                return words
            self.seen.append(words)

    def add(self, gid: str, d: Path, *, deadline_ms: int = 200, original: str = "0", entry: str = "-", path: str = CG) -> list[str]:
        fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
        try:
            self.send("add", gid, "v1", str(deadline_ms), "10", original, "1", entry, watchdog.quote(path), fds=(fd,))
        finally:
            os.close(fd)
        return self.recv()

    def stderr(self) -> str:
        assert self.proc.stderr is not None
        return self.proc.stderr.read().decode()

    def close(self) -> None:
        self.sock.close()
        try:
            self.proc.wait(timeout=10)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            if self.proc.stderr is not None:
                self.proc.stderr.close()


@pytest.fixture
def memdir(fake_proc: FakeProc, fake_cgroups: FakeCgroups) -> Path:
    (fake_proc.root / "self" / "cgroup").write_text("4:memory:/daemon\n0::/\n")
    return fake_cgroups.mkdir_v1(CG)


@pytest.fixture
def journal(tmp_path: Path) -> Path:
    d = tmp_path / "journal"
    d.mkdir()
    return d


@pytest.fixture
def dog(fake_proc: FakeProc, journal: Path) -> Iterator[Dog]:
    """A watchdog that rescans every 20 ms: how it sees an OOM on a fake tree."""
    d = Dog(fake_proc, journal)
    assert d.recv() == ["ready", str(d.proc.pid), str(watchdog.PROTOCOL)]
    yield d
    d.close()


@pytest.fixture
def calm_dog(fake_proc: FakeProc, journal: Path) -> Iterator[Dog]:
    """A watchdog whose rescan never comes: only commands make it act (a fake memcg keeps
    showing ``oom_kill_disable 1`` after a reset, which each rescan would reset again)."""
    d = Dog(fake_proc, journal, rescan_ms=3_600_000)
    assert d.recv()[0] == "ready"
    yield d
    d.close()


def wait_for(pred: object, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():  # type: ignore[operator]
        assert time.monotonic() < deadline
        time.sleep(0.005)


# --- add, arm, the deadline ----------------------------------------------------------------


def test_add_registers_its_own_eventfd_and_arms(dog: Dog, memdir: Path) -> None:
    assert dog.add("1", memdir) == ["ok", "1"]
    assert FakeCgroups.written(memdir) == ["1"]
    (line,) = (memdir / "cgroup.event_control").read_text().splitlines()
    efd, cfd = (int(x) for x in line.split())
    assert os.readlink(f"/proc/{dog.proc.pid}/fd/{efd}") == "anon_inode:[eventfd]"
    assert os.readlink(f"/proc/{dog.proc.pid}/fd/{cfd}") == str(memdir / "memory.oom_control")


def test_it_hands_back_at_the_deadline(dog: Dog, memdir: Path) -> None:
    dog.add("1", memdir, deadline_ms=200)
    FakeCgroups.set_oom_control(memdir, oom_kill_disable=1, under_oom=1)
    t0 = time.monotonic()
    words = dog.expect("handback")
    assert time.monotonic() - t0 >= 0.2
    assert words[1] == "1" and int(words[2]) >= 200
    assert FakeCgroups.written(memdir) == ["0"]


def test_an_oom_resolved_in_time_is_not_handed_back(dog: Dog, memdir: Path) -> None:
    dog.add("1", memdir, deadline_ms=300)
    FakeCgroups.set_oom_control(memdir, oom_kill_disable=1, under_oom=1)
    time.sleep(0.1)
    FakeCgroups.set_oom_control(memdir, oom_kill_disable=1, under_oom=0)
    time.sleep(0.5)
    dog.send("ping", "x")
    assert dog.expect("pong") == ["pong", "x"]
    assert dog.seen == [] and FakeCgroups.written(memdir) == []


def test_an_oom_the_kernel_decides_is_not_ours_to_hand_back(dog: Dog, memdir: Path) -> None:
    dog.add("1", memdir, deadline_ms=100)
    FakeCgroups.set_oom_control(memdir, oom_kill_disable=0, under_oom=1)  # handed back already
    time.sleep(0.4)
    assert FakeCgroups.written(memdir) == []


def test_arm_waits_for_the_end_of_the_oom(dog: Dog, memdir: Path) -> None:
    dog.add("1", memdir)
    FakeCgroups.set_oom_control(memdir, oom_kill_disable=0, under_oom=1)
    dog.send("arm", "1")
    assert dog.recv() == ["busy", "1"]
    FakeCgroups.set_oom_control(memdir, oom_kill_disable=0, under_oom=0)
    dog.send("arm", "1")
    assert dog.recv() == ["armed", "1"]
    assert FakeCgroups.written(memdir) == ["1"]


def test_a_handback_the_daemon_could_not_take_is_sent_when_it_can(dog: Dog, memdir: Path) -> None:
    dog.add("1", memdir, deadline_ms=100)
    # A daemon that reads nothing (stopped): its queue fills with answers, the rest dropped.
    flood = 2000
    for n in range(flood):
        dog.send("ping", str(n))
    time.sleep(0.5)
    FakeCgroups.set_oom_control(memdir, oom_kill_disable=1, under_oom=1)
    wait_for(lambda: FakeCgroups.written(memdir) == ["0"])
    time.sleep(0.2)  # it tried to say so, and could not
    pongs = 0
    while (words := dog.recv())[0] == "pong":
        pongs += 1
    assert pongs < flood  # the queue was full: answers were dropped
    assert words[:2] == ["handback", "1"]  # and the hand-back came once there was room


# --- refusals --------------------------------------------------------------------------------


def test_it_refuses_a_memcg_it_runs_in(dog: Dog, memdir: Path, fake_proc: FakeProc) -> None:
    (fake_proc.root / "self" / "cgroup").write_text(f"4:memory:{CG}/inner\n0::/\n")
    words = dog.add("1", memdir)
    assert words[:2] == ["err", "1"] and "refused: the watchdog runs in cgroup /jobs/a/inner, inside guarded /jobs/a" in " ".join(words)
    assert FakeCgroups.written(memdir) == []


@pytest.mark.parametrize(
    ("words", "fds", "reply"),
    [
        (("add", "1", "v3", "100", "10", "max", "1000", "-", "/x"), True, "err 1 unknown kind v3"),
        (("add", "1", "v1", "100"), True, "err 1 bad command"),
        (("add", "1", "v1", "100", "10", "0", "1", "-", "/x"), False, "err 1 bad command"),
        (("arm", "9"), False, "err 9 not guarded"),
        (("frobnicate",), False, "err - bad command: frobnicate"),
        (("add", "x", "v1", "soon", "10", "0", "1", "-", "/x"), True, "err x ValueError"),
    ],
)
def test_bad_commands_get_an_error_and_change_nothing(
    dog: Dog, memdir: Path, words: tuple[str, ...], fds: bool, reply: str
) -> None:
    fd = os.open(memdir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        dog.send(*words, fds=(fd,) if fds else ())
    finally:
        os.close(fd)
    assert " ".join(dog.recv()).startswith(reply)
    assert FakeCgroups.written(memdir) == []
    dog.send("ping", "still-here")
    assert dog.recv() == ["pong", "still-here"]


def test_one_cgroup_is_guarded_once(dog: Dog, memdir: Path) -> None:
    dog.add("1", memdir)
    assert dog.add("2", memdir, path=f"{CG}/.") == ["err", "2", "already", "guarded", "as", "1"]


# --- descendants ---------------------------------------------------------------------------


def test_scan_resets_inherited_children_but_not_guarded_or_locked_ones(
    calm_dog: Dog, memdir: Path, fake_cgroups: FakeCgroups
) -> None:
    dog = calm_dog
    kid = fake_cgroups.mkdir_v1(f"{CG}/kid", oom_kill_disable=1)
    named = fake_cgroups.mkdir_v1(f"{CG}/named", oom_kill_disable=1)
    theirs = fake_cgroups.mkdir_v1(f"{CG}/theirs", oom_kill_disable=1)
    below_theirs = fake_cgroups.mkdir_v1(f"{CG}/theirs/x", oom_kill_disable=1)
    calm = fake_cgroups.mkdir_v1(f"{CG}/calm/deep", oom_kill_disable=1)
    lock = os.open(theirs, os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(lock, fcntl.LOCK_EX)  # another oomkit holds it
    try:
        assert dog.add("2", named, path=f"{CG}/named", original="0") == ["ok", "2"]
        assert dog.add("1", memdir) == ["ok", "1"]  # its first scan resets what it finds
        resets = {watchdog.unquote(m[2]) for m in (dog.recv(), dog.recv()) if m[0] == "reset"}
        assert resets == {"kid", "calm/deep"}
        assert FakeCgroups.written(kid) == ["0"] and FakeCgroups.written(calm) == ["0"]
        assert FakeCgroups.written(named) == ["1"]  # its own takeover, not a reset
        assert FakeCgroups.written(theirs) == [] and FakeCgroups.written(below_theirs) == []
        late = fake_cgroups.mkdir_v1(f"{CG}/late", oom_kill_disable=1)
        dog.send("scan", "1", "late")
        assert dog.expect("reset") == ["reset", "1", "late"]
        assert dog.expect("scanned") == ["scanned", "1", "1"]
        assert FakeCgroups.written(late) == ["0"]
    finally:
        os.close(lock)


def test_below_a_memcg_whose_original_was_1_children_are_left_alone(
    calm_dog: Dog, memdir: Path, fake_cgroups: FakeCgroups
) -> None:
    dog = calm_dog
    kid = fake_cgroups.mkdir_v1(f"{CG}/kid", oom_kill_disable=1)
    dog.add("1", memdir, original="1")
    dog.send("scan", "1", ".")
    assert dog.expect("scanned") == ["scanned", "1", "0"]
    assert FakeCgroups.written(kid) == []


def test_the_rescan_finds_children_nobody_reported(dog: Dog, memdir: Path, fake_cgroups: FakeCgroups) -> None:
    dog.add("1", memdir)
    kid = fake_cgroups.mkdir_v1(f"{CG}/kid", oom_kill_disable=1)
    assert dog.expect("reset") == ["reset", "1", "kid"]
    assert set(FakeCgroups.written(kid)) == {"0"}  # again at each rescan: a fake keeps showing 1


# --- drop, forget, gone, the lock ----------------------------------------------------------


def test_drop_restores_and_removes_the_entry(calm_dog: Dog, memdir: Path, journal: Path) -> None:
    dog = calm_dog
    (journal / "v1-x.json").write_text("{}")
    dog.add("1", memdir, entry="v1-x.json")
    FakeCgroups.set_oom_control(memdir, oom_kill_disable=1)
    dog.send("drop", "1")
    assert dog.recv() == ["dropped", "1"]
    assert FakeCgroups.written(memdir) == ["0"]
    assert not (journal / "v1-x.json").exists()
    dog.send("drop", "1")
    assert dog.recv() == ["dropped", "1"]  # gone already: nothing to say


def test_forget_writes_nothing(dog: Dog, memdir: Path, journal: Path) -> None:
    (journal / "v1-x.json").write_text("{}")
    dog.add("1", memdir, entry="v1-x.json")
    FakeCgroups.set_oom_control(memdir, oom_kill_disable=1)
    dog.send("forget", "1")
    assert dog.recv() == ["forgot", "1"]
    assert FakeCgroups.written(memdir) == [] and not (journal / "v1-x.json").exists()


def test_a_removed_cgroup_is_forgotten(dog: Dog, memdir: Path, journal: Path) -> None:
    import shutil

    (journal / "v1-x.json").write_text("{}")
    dog.add("1", memdir, entry="v1-x.json")
    shutil.rmtree(memdir)
    assert dog.expect("gone") == ["gone", "1"]
    assert not (journal / "v1-x.json").exists()


def test_it_shares_the_daemons_lock_until_it_lets_go(dog: Dog, memdir: Path) -> None:
    fd = os.open(memdir, os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    dog.send("add", "1", "v1", "100", "10", "0", "1", "-", CG, fds=(fd,))
    assert dog.recv() == ["ok", "1"]
    os.close(fd)  # the daemon is gone; the watchdog's copy of the fd keeps the lock
    other = os.open(memdir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(BlockingIOError):
            fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        dog.send("forget", "1")
        assert dog.recv() == ["forgot", "1"]
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(other)


# --- the end --------------------------------------------------------------------------------


def test_quit_restores_everything_and_says_so(calm_dog: Dog, memdir: Path, fake_cgroups: FakeCgroups) -> None:
    dog = calm_dog
    other = fake_cgroups.mkdir_v1("/jobs/b")
    dog.add("1", memdir)
    dog.add("2", other, path="/jobs/b")
    FakeCgroups.set_oom_control(memdir, oom_kill_disable=1)
    FakeCgroups.set_oom_control(other, oom_kill_disable=0)  # handed back: nothing to restore
    dog.send("quit")
    said = [dog.recv(), dog.recv(), dog.recv()]
    assert sorted(said[:2]) == [["restored", "1", "0"], ["restored", "2", "0"]]
    assert said[2] == ["bye", "quit"]
    assert dog.proc.wait(timeout=10) == 0
    assert FakeCgroups.written(memdir) == ["0"] and FakeCgroups.written(other) == []


def test_end_of_file_restores_and_tells_the_log(
    fake_proc: FakeProc, journal: Path, memdir: Path, fake_cgroups: FakeCgroups
) -> None:
    d = Dog(fake_proc, journal, rescan_ms=3_600_000)
    d.recv()
    kid = fake_cgroups.mkdir_v1(f"{CG}/kid")
    d.add("1", memdir)
    d.send("ping", "after-the-first-scan")  # answered once add's scan of the children is done
    assert d.recv() == ["pong", "after-the-first-scan"]
    FakeCgroups.set_oom_control(memdir, oom_kill_disable=1)
    FakeCgroups.set_oom_control(kid, oom_kill_disable=1)  # appeared after the last scan
    d.sock.close()
    assert d.proc.wait(timeout=10) == 0
    err = d.stderr()
    assert f"{CG} (eof): oom_kill_disable 1 -> 0, the original" in err
    assert FakeCgroups.written(memdir) == ["0"] and FakeCgroups.written(kid) == ["0"], (err, (kid / "memory.oom_control").read_text())
    d.close()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_and_sigint_restore_and_exit(calm_dog: Dog, memdir: Path, signum: int) -> None:
    dog = calm_dog
    dog.add("1", memdir)
    FakeCgroups.set_oom_control(memdir, oom_kill_disable=1)
    dog.proc.send_signal(signum)
    assert dog.expect("bye") == ["bye", signal.Signals(signum).name]
    assert dog.proc.wait(timeout=10) == 0
    assert FakeCgroups.written(memdir) == ["0"]


def test_sighup_is_ignored(dog: Dog, memdir: Path) -> None:
    dog.add("1", memdir)
    dog.proc.send_signal(signal.SIGHUP)
    time.sleep(0.1)
    dog.send("ping", "1")
    assert dog.recv() == ["pong", "1"]
    assert FakeCgroups.written(memdir) == ["1"]


def test_started_by_hand_it_says_how_to_use_it() -> None:
    out = subprocess.run([sys.executable, "-I", "-S", str(watchdog.__file__)], capture_output=True, text=True, timeout=30)
    assert out.returncode == watchdog.REFUSED and "started by oomkit" in out.stderr


def test_it_imports_only_builtin_modules() -> None:
    out = subprocess.run(
        [sys.executable, "-I", "-S", "-X", "importtime", str(watchdog.__file__)], capture_output=True, text=True, timeout=30
    )
    loaded = {ln.rsplit("|", 1)[1].strip() for ln in out.stderr.splitlines() if ln.startswith("import time:")}
    assert {"_signal", "_socket", "select", "fcntl"} <= loaded
    assert not loaded & {"enum", "socket", "signal", "functools", "collections", "re", "oomkit"}, sorted(loaded)


@pytest.mark.parametrize("path", ["/a/b", "/with space/x", "/per%cent", "/new\nline", "/ünï", "/" + "n" * 200])
def test_paths_travel_as_one_word(path: str) -> None:
    word = watchdog.quote(path)
    assert " " not in word and "\n" not in word and word.isascii()
    assert watchdog.unquote(word) == path


def test_release_hands_back_before_the_deadline(calm_dog: Dog, memdir: Path) -> None:
    calm_dog.add("1", memdir, deadline_ms=3_600_000)
    calm_dog.send("release", "1")
    assert calm_dog.recv() == ["idle", "1"]  # no OOM of ours: nothing to hand back
    FakeCgroups.set_oom_control(memdir, oom_kill_disable=1, under_oom=1)
    calm_dog.send("release", "1")
    assert calm_dog.recv()[:2] == ["handback", "1"]
    assert FakeCgroups.written(memdir) == ["0"]


# --- the v2 brake (KIND v2) ---------------------------------------------------------------


def add_v2(dog: Dog, gid: str, d: Path, written: str, *, original: str = "max", deadline_ms: int = 200) -> list[str]:
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        path = "/" + d.name
        dog.send("add", gid, "v2", str(deadline_ms), "10", original, written, "-", path, fds=(fd,))
    finally:
        os.close(fd)
    return dog.recv()


def test_v2_brakes_releases_at_the_deadline_rearms_and_keeps_their_value(
    dog: Dog, fake_proc: FakeProc, fake_cgroups: FakeCgroups
) -> None:
    (fake_proc.root / "self" / "cgroup").write_text("0::/daemon\n")
    d = fake_cgroups.mkdir_v2("/pod")
    FakeCgroups.set_memory(d, max=64 << 20, current=1 << 20)
    brake = str(48 << 20)
    assert add_v2(dog, "1", d, brake) == ["ok", "1"]
    assert (d / "memory.high").read_text() == brake + "\n"
    FakeCgroups.set_memory(d, current=50 << 20)  # stuck: the rescan finds it
    words = dog.expect("handback")
    assert words[1] == "1" and int(words[2]) >= 200
    assert (d / "memory.high").read_text() == "max\n"
    dog.send("arm", "1")
    assert dog.expect("busy") == ["busy", "1"]  # still over the brake point
    FakeCgroups.set_memory(d, current=1 << 20)
    dog.send("arm", "1")
    assert dog.expect("armed") == ["armed", "1"]
    assert (d / "memory.high").read_text() == brake + "\n"
    FakeCgroups.set_memory(d, high=32 << 20)  # an operator's
    assert dog.expect("theirs") == ["theirs", "1", str(32 << 20)]
    dog.send("quit")
    assert dog.expect("kept") == ["kept", "1", str(32 << 20)]
    assert (d / "memory.high").read_text() == f"{32 << 20}\n"


def test_v2_reclaims_dips_under_the_brake_do_not_restart_the_deadline(
    dog: Dog, fake_proc: FakeProc, fake_cgroups: FakeCgroups
) -> None:
    # A stuck cgroup dips a few hundred KiB under memory.high whenever reclaim trims its last
    # page cache.  Were every dip the end of the episode, a cgroup dipping more often than
    # the deadline would be held at its brake for ever.
    (fake_proc.root / "self" / "cgroup").write_text("0::/daemon\n")
    d = fake_cgroups.mkdir_v2("/pod")
    FakeCgroups.set_memory(d, max=64 << 20, current=1 << 20)
    brake = 48 << 20
    assert add_v2(dog, "1", d, str(brake), deadline_ms=400) == ["ok", "1"]
    dog.sock.settimeout(0.06)
    words: list[str] = []
    deadline = time.monotonic() + 30
    while not words:
        assert time.monotonic() < deadline, "no handback: each dip restarted the deadline"
        for current in (brake + (2 << 20), brake - (112 << 10)):  # three rescans each
            FakeCgroups.set_memory(d, current=current, file_lru=4096)
            try:
                words = dog.expect("handback")
                break
            except TimeoutError:
                pass
    assert words[1] == "1" and int(words[2]) >= 400
    assert (d / "memory.high").read_text() == "max\n"


def test_v2_refuses_a_brake_not_under_memory_max_and_its_own_cgroup(
    dog: Dog, fake_proc: FakeProc, fake_cgroups: FakeCgroups
) -> None:
    (fake_proc.root / "self" / "cgroup").write_text("0::/pod/inner\n")
    d = fake_cgroups.mkdir_v2("/free")
    words = add_v2(dog, "1", d, str(48 << 20))
    assert words[:2] == ["err", "1"] and "memory.max is max" in " ".join(words)
    assert (d / "memory.high").read_text() == "max\n"
    own = fake_cgroups.mkdir_v2("/pod")
    FakeCgroups.set_memory(own, max=64 << 20)
    words = add_v2(dog, "2", own, str(48 << 20))
    assert words[:2] == ["err", "2"] and "inside guarded" in " ".join(words)
