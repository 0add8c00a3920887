"""The shared page across real processes: a C producer feeding an engine end to end,
concurrent producers, a writer lapping a live reader, a hostile scribbler, and an
unprivileged user who must not be able to inject events."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import anyio
import pytest

from oomkit import Config, Engine, hookimpl
from oomkit.cgroupfs import mounts_for, read_procs, scope_dir
from oomkit.config import EngineConfig, PathsConfig
from oomkit.events import Candidate, Decision, Event, Scope
from oomkit.procfs import read_process, start_ticks
from oomkit.sharedpage import Doorbell, Publisher, RingReader, UnsafeRingError
from oomkit.sources.shared_page import SharedPageSourceConfig

from .. import kernel

pytestmark = pytest.mark.kernel

EXAMPLE = Path(__file__).parents[2] / "examples" / "shared-page"
NOBODY = 65534


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def compile_c(source: Path, out: Path) -> Path:
    """``source`` built with the system C compiler, warnings as errors, the C header of
    examples/shared-page on the include path; skips the test without a compiler."""
    cc = shutil.which("cc")
    if cc is None:
        pytest.skip("no C compiler: `cc` is not on PATH")
    subprocess.run([cc, "-std=c11", "-O2", "-Wall", "-Wextra", "-Werror", f"-I{EXAMPLE}", "-o", str(out), str(source)],
                   check=True)
    return out


@pytest.fixture(scope="module")
def producer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """examples/shared-page/producer.c, built with the system C compiler."""
    return compile_c(EXAMPLE / "producer.c", tmp_path_factory.mktemp("producer") / "producer")


class MemcgCandidates:
    """The processes of the event's v1 memcg (first-party plugins live elsewhere)."""

    name = "test-memcg-candidates"

    def __init__(self) -> None:
        self.mounts = mounts_for(PathsConfig())

    @hookimpl
    def oomkit_candidates(self, event: Event) -> list[Candidate]:
        procs = read_procs(scope_dir(self.mounts, event.scope))
        return [c for c in (read_process("/proc", pid, event.scope.path) for pid in procs) if c is not None]


class Decisions:
    name = "test-decisions"

    def __init__(self) -> None:
        self.seen: list[Decision] = []

    @hookimpl
    async def oomkit_notify(self, decision: Decision) -> None:
        self.seen.append(decision)

    async def first(self, timeout: float = 10.0) -> Decision:
        with anyio.fail_after(timeout):
            while not self.seen:
                await anyio.sleep(0.005)
        return self.seen[0]


def wait_line(proc: subprocess.Popen[bytes], want: bytes) -> None:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    while line and not line.startswith(want):
        line = proc.stdout.readline()
    assert line.startswith(want), f"the process ended before printing {want!r}"


@pytest.mark.anyio
async def test_a_c_producer_feeds_an_engine_that_names_the_process_in_the_memcg(
    memcg: Callable[..., kernel.Cgroup], producer: Path, tmp_path: Path
) -> None:
    cg = memcg(limit=256 << 20)
    hog = cg.hog(8, hold=True, stdout=subprocess.PIPE)
    try:
        wait_line(hog, b"done")
        directory = tmp_path / "sp"
        config = Config(
            engine=EngineConfig(dry_run=True),
            # Only the doorbell can deliver within the test: the slow poll never comes.
            sources=(SharedPageSourceConfig(directory=str(directory), poll_interval_s=3600),),
        )
        decisions = Decisions()
        async with Engine(config, plugins=[MemcgCandidates(), decisions], autoload=False):
            result = await anyio.run_process([str(producer), str(directory), "cprod", str(hog.pid), cg.rel])
            assert result.stdout.strip() == b"1"
            decision = await decisions.first()
    finally:
        hog.kill()
        hog.wait()
        assert hog.stdout is not None
        hog.stdout.close()
    assert decision.outcome == "dry-run"
    assert decision.victim is not None and decision.victim.pid == hog.pid
    event = decision.event
    assert (event.kind, event.scope, event.pid) == ("oom", Scope("v1", cg.rel), hog.pid)
    assert event.pid_start_ticks == decision.victim.start_ticks
    assert event.monotonic_ns < decision.monotonic_ns  # the record's time, when C wrote it


PY_PRODUCER = textwrap.dedent(
    """
    import sys
    from oomkit.sharedpage import Publisher
    directory, name, count, capacity = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    with Publisher.create(f"{directory}/{name}.ring", capacity=capacity) as pub:
        for n in range(1, count + 1):
            pub.publish("oom", f"/{name}/{n}", ring=n % 64 == 0 or n == count)
    """
)


def run_producers(directory: Path, argvs: list[list[str]]) -> None:
    procs = [subprocess.Popen(a) for a in argvs]
    for p in procs:
        assert p.wait(timeout=60) == 0


@pytest.mark.anyio
async def test_concurrent_producers_each_in_their_own_ring_lose_nothing(tmp_path: Path) -> None:
    from oomkit.sources.shared_page import SharedPageSource

    directory = tmp_path / "sp"
    src = SharedPageSource(SharedPageSourceConfig(directory=str(directory), poll_interval_s=0.05), Config())
    events: list[Event] = []

    async def emit(e: Event) -> None:
        events.append(e)

    count, names = 2000, [f"py{i}" for i in range(4)]
    async with anyio.create_task_group() as tg:
        await tg.start(src.run, emit)
        await anyio.to_thread.run_sync(
            run_producers, directory,
            [[sys.executable, "-c", PY_PRODUCER, str(directory), n, str(count), str(count)] for n in names],
        )
        with anyio.fail_after(10):
            while len(events) < count * len(names):
                await anyio.sleep(0.01)
        tg.cancel_scope.cancel()
    by_ring: dict[str, list[int]] = {}
    for e in events:
        _, ring, n = e.scope.path.split("/")
        by_ring.setdefault(ring, []).append(int(n))
    assert by_ring == {n: list(range(1, count + 1)) for n in names}
    assert (src.stats.lost, src.stats.rejected, src.stats.refused_rings) == (0, 0, 0)


def test_concurrent_c_producers_each_in_their_own_ring_lose_nothing(producer: Path, tmp_path: Path) -> None:
    directory = tmp_path / "sp"
    directory.mkdir()
    names = [f"c{i}" for i in range(4)]
    run_producers(directory, [[str(producer), "-n", "5000", "-c", "8192", str(directory), n, "0", f"/{n}"] for n in names])
    for n in names:
        reader = RingReader(directory / f"{n}.ring")
        got = reader.poll()
        assert [r.seq for r in got] == list(range(1, 5001)) and {r.path for r in got} == {f"/{n}"}
        assert reader.stats.rejected_total == 0


def test_a_c_producer_publishes_values(producer: Path, tmp_path: Path) -> None:
    directory = tmp_path / "sp"
    directory.mkdir()
    run_producers(directory, [[str(producer), "-k", "4", "-v", "some_avg10_pct=61.5", "-v", "stall_us=250000",
                               str(directory), "vals", "0", "/svc"]])
    reader = RingReader(directory / "vals.ring")
    [rec] = reader.poll()
    assert (rec.kind, rec.path, rec.values) == ("pressure", "/svc", {"some_avg10_pct": 61.5, "stall_us": 250000.0})


def test_a_c_producer_does_not_replace_a_ring_a_live_publisher_holds(producer: Path, tmp_path: Path) -> None:
    directory = tmp_path / "sp"
    directory.mkdir()
    with Publisher.create(directory / "held.ring") as pub:
        pub.publish("oom", "/first")
        done = subprocess.run([str(producer), str(directory), "held", "0", "/second"], capture_output=True, text=True)
        assert done.returncode == 1 and "Device or resource busy" in done.stderr
        assert [r.path for r in RingReader(directory / "held.ring").poll()] == ["/first"]


LAPPER = textwrap.dedent(
    """
    import sys
    from oomkit.sharedpage import Publisher
    path, count = sys.argv[1], int(sys.argv[2])
    with Publisher.open(path, doorbell=path + ".none") as pub:
        for n in range(pub.write_seq + 1, count + 1):
            pub.publish("oom", f"/{n}", pid=n, start_ticks=n, ring=False)
    """
)


def test_a_writer_lapping_a_live_reader_never_yields_a_torn_record(tmp_path: Path) -> None:
    """An honest writer racing the reader: every record is delivered intact or counted lost,
    none is ever rejected, and none delivered carries another record's fields."""
    ring = tmp_path / "lap.ring"
    Publisher.create(ring, capacity=8, record_size=64).close()
    reader = RingReader(ring, pid_max=1 << 22)
    count = 100_000
    writer = subprocess.Popen([sys.executable, "-c", LAPPER, str(ring), str(count)])
    got = []
    deadline = time.monotonic() + 60
    while reader.next <= count:
        got += reader.poll()
        assert time.monotonic() < deadline
    assert writer.wait(timeout=10) == 0
    s = reader.stats
    assert s.records + s.lost == count and s.rejected_total == 0
    assert all(r.path == f"/{r.seq}" and r.pid == r.seq == r.start_ticks for r in got)
    assert s.lost > 0 and s.records > 0, "the writer never lapped the reader: the test proved nothing"


SCRIBBLER = textwrap.dedent(
    """
    import os, random, sys, time
    fd = os.open(sys.argv[1], os.O_RDWR)
    size = os.fstat(fd).st_size
    end = time.monotonic() + float(sys.argv[2])
    rnd = random.Random(1)
    while time.monotonic() < end:
        off = rnd.randrange(size)
        os.pwrite(fd, rnd.randbytes(rnd.randrange(1, 48))[: size - off], off)
    """
)


def test_a_scribbling_writer_never_crashes_the_reader_or_yields_invalid_records(tmp_path: Path) -> None:
    ring = tmp_path / "bad.ring"
    pub = Publisher.create(ring, capacity=4, record_size=128)
    reader = RingReader(ring, pid_max=32768)
    scribbler = subprocess.Popen([sys.executable, "-c", SCRIBBLER, str(ring), "1.0"])
    got = []
    while scribbler.poll() is None:
        pub.publish("oom", "/ok", ring=False)
        got += reader.poll()
    pub.close()
    assert scribbler.returncode == 0
    assert reader.stats.rejected_total > 0  # the scribbler did reach the records
    for r in got:
        assert r.path.startswith("/") and ".." not in r.path.split("/") and 0 <= r.pid < 32768


# --- an unprivileged local user ------------------------------------------------------------

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="running as another user needs root")


@pytest.fixture
def public_tmp() -> Iterator[Path]:
    """A directory under /tmp that another user can reach (pytest's tmp_path is 0700)."""
    d = Path(tempfile.mkdtemp(prefix="oomkit-sharedpage-", dir="/tmp"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d)


def as_nobody(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run plain Python (no oomkit: a producer in any language) as uid/gid 65534."""
    return subprocess.run(
        ["/usr/bin/python3", "-c", textwrap.dedent(code), *args],
        user=NOBODY, group=NOBODY, extra_groups=[], capture_output=True, text=True, timeout=30,
    )


@needs_root
@pytest.mark.anyio
async def test_an_unprivileged_user_cannot_inject_events(public_tmp: Path) -> None:
    from oomkit.sources.shared_page import SharedPageSource

    directory = public_tmp / "sp"
    src = SharedPageSource(SharedPageSourceConfig(directory=str(directory), poll_interval_s=0.02), Config())
    events: list[Event] = []

    async def emit(e: Event) -> None:
        events.append(e)

    async with anyio.create_task_group() as tg:
        await tg.start(src.run, emit)
        res = as_nobody(
            """
            import errno, os, socket, sys
            d = sys.argv[1]
            try:
                os.open(d + "/evil.ring", os.O_CREAT | os.O_WRONLY, 0o644)
                print("created")
            except PermissionError:
                print("create refused")
            s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            try:
                s.sendto(b"x", d + "/doorbell")
                print("rang")
            except PermissionError:
                print("ring refused")
            """,
            str(directory),
        )
        assert res.returncode == 0, res.stderr
        assert res.stdout.split("\n")[:2] == ["create refused", "ring refused"]

        # A world-writable sticky directory (as /tmp): the user can make a ring there, in
        # the right format even, but it is theirs, so the root reader refuses it.
        directory.chmod(0o1777)
        Publisher.create(public_tmp / "template.ring", capacity=4, mode=0o644).close()
        template = (public_tmp / "template.ring").read_bytes()
        res = as_nobody(
            """
            import sys
            data = bytearray(open(sys.argv[2], "rb").read())
            open(sys.argv[1] + "/evil.ring", "wb").write(data)
            """,
            str(directory), str(public_tmp / "template.ring"),
        )
        assert res.returncode == 0, res.stderr
        assert (directory / "evil.ring").stat().st_uid == NOBODY
        with Publisher.open(directory / "evil.ring") as pub:  # a valid record in it
            pub.publish("oom", "/victim", pid=1, start_ticks=start_ticks("/proc", 1) or 1)
        os.chown(directory / "evil.ring", NOBODY, NOBODY)
        with anyio.fail_after(5):
            while src.stats.refused_rings == 0:
                await anyio.sleep(0.01)
        await anyio.sleep(0.1)
        tg.cancel_scope.cancel()
    assert events == [] and list(src.readers) == []
    assert template[:8] == b"OOMKRING"
    with pytest.raises(UnsafeRingError, match=f"owned by uid {NOBODY}"):
        RingReader(directory / "evil.ring")


def test_sigpipe_is_never_raised_by_ringing_a_dead_reader(producer: Path, tmp_path: Path) -> None:
    """A C producer whose reader went away between two events keeps going (no SIGPIPE)."""
    directory = tmp_path / "sp"
    directory.mkdir()
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    dead.bind(str(directory / "doorbell"))
    dead.close()  # bound then closed: the path stays, nobody listens (ECONNREFUSED)
    res = subprocess.run([str(producer), "-n", "3", str(directory), "p", "0", "/"], capture_output=True)
    assert res.returncode == 0 and res.returncode != -signal.SIGPIPE
    assert RingReader(directory / "p.ring").poll()[-1].seq == 3



STEPPER = textwrap.dedent(
    r"""
    #define _GNU_SOURCE
    #include "oomkit_shared_page.h"
    /* One record per line read from stdin; prints its sequence number and the doorbell's result. */
    int main(int argc, char **argv)
    {
        struct oomkit_ring ring;
        char line[16];
        if (argc != 2 || oomkit_ring_create(&ring, argv[1], "step", 16, 64) < 0)
            return 1;
        while (fgets(line, sizeof(line), stdin)) {
            int64_t seq = oomkit_publish(&ring, OOMKIT_KIND_OOM, OOMKIT_TREE_V1, 0, 0, "/a");
            printf("%lld\n", (long long)seq);
            fflush(stdout);
        }
        oomkit_ring_close(&ring, 0);
        return 0;
    }
    """
)


def test_a_c_producer_rings_a_reader_that_restarted(tmp_path: Path) -> None:
    """The C header connects its doorbell socket once; a reader that restarts binds a new
    socket at the same path, and the producer's next ring must reach it (a refused send
    connects again), as must rings after a time with no reader at all."""
    (tmp_path / "stepper.c").write_text(STEPPER)
    binary = compile_c(tmp_path / "stepper.c", tmp_path / "stepper")
    directory = tmp_path / "sp"
    directory.mkdir()
    first = Doorbell(directory / "doorbell")
    with subprocess.Popen([str(binary), str(directory)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                          text=True) as proc:
        assert proc.stdin is not None and proc.stdout is not None
        stdin, stdout = proc.stdin, proc.stdout

        def step() -> int:
            stdin.write("\n")
            stdin.flush()
            return int(stdout.readline())

        # A Unix datagram is queued when send() returns, so it is there once the line is.
        assert step() == 1 and first.drain() == 1
        first.close()
        second = Doorbell(directory / "doorbell")  # the reader restarted between two records
        try:
            assert step() == 2 and second.drain() == 1
        finally:
            second.close()
        assert step() == 3  # nobody listens: the record is still written
        third = Doorbell(directory / "doorbell")
        try:
            assert step() == 4 and third.drain() == 1
        finally:
            third.close()
        stdin.close()
        assert proc.wait(timeout=60) == 0
    assert [r.seq for r in RingReader(directory / "step.ring").poll()] == [1, 2, 3, 4]
