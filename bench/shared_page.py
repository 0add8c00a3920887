"""Shared page: publish-to-event latency and sustained rate, beside an eventfd floor.

    python -m bench.shared_page [--rounds N] [--burst N] [--runs N]

* ``eventfd ping-pong``: two processes, one writes an eventfd, the other wakes from a
  blocking read; one-way latency from the write to the wake.  The floor for any doorbell.
  On this VM it has two values: about 3 us when the scheduler runs both processes on one
  CPU, 20-30 us when the wake crosses to the other (an idle vCPU woken by the host;
  measured with the two pinned apart), whichever the load of the moment makes it pick.
* ``publish -> event``: a producer process publishes a record and rings the doorbell; a
  SharedPageSource in this process, under each event loop, emits the event; latency from the
  record's timestamp to the emit.  The producer waits for each event before the next: its
  ack comes from inside the emit (back to back: the producer, often woken on the reader's
  CPU, publishes while the reader still finishes its turn, and the rest of that turn counts
  in the next record's latency), or, in the ``reader idle`` rows, from another task once the
  source's turn is over, so the record finds the reader waiting, as a lone event does.
  The producer is :class:`oomkit.sharedpage.Publisher` (Python: its own few microseconds
  between the record's timestamp and the doorbell count in the latency), and in the ``C
  producer`` rows ``bench/c/pagepub`` (the C header, ``examples/shared-page``: a few hundred
  nanoseconds from the timestamp to the doorbell, as a real producer would be).
  ``--runs`` times, each run with a floor of its own (the machine is shared: ``x floor`` is
  each p50 over its run's floor), then the median and the range of the runs.  All of it
  twice: with the processes wherever the scheduler puts them, then with both pinned to one
  CPU, where the floor is the wake-up alone (no idle vCPU to wake) and what is left above it
  is oomkit's own path: the reader's wake-up, its poll of the ring, the event built.
* ``events/s``: the producer publishes ``--burst`` records as fast as it can, ringing for
  each; events per second from the first record to the last event, and records lost.
* ``reader``: what one ``RingReader.poll()`` costs in this process, on a ring with nothing
  new and with one new record (``pread`` with a ``fence()`` after ``write_seq`` and between
  a record's copy and its second sequence load; after a doorbell, two copies of two slots
  around a fence), and one ``fence()``.  The reader used to
  map rings (0.7 us and 4.2 us, measured before the change on this machine), which let a
  producer that truncated its ring kill it with SIGBUS.

Clocks: CLOCK_MONOTONIC, shared by both processes.
"""

from __future__ import annotations

import argparse
import mmap
import os
import platform
import struct
import tempfile
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import anyio

from oomkit.config import Config
from oomkit.events import Event
from oomkit.procfs import start_ticks
from oomkit.sharedpage import Publisher, RingReader, fence
from oomkit.sources.shared_page import SharedPageSource, SharedPageSourceConfig

from . import native

BACKENDS: list[tuple[str, str, dict[str, Any]]] = [
    ("asyncio", "asyncio", {}),
    ("uvloop", "asyncio", {"use_uvloop": True}),
    ("trio", "trio", {}),
]


def pct(values: list[int], p: float) -> float:
    """The p-th percentile in microseconds."""
    s = sorted(values)
    return s[min(len(s) - 1, int(p / 100 * len(s)))] / 1000


def fork(child: Callable[[], None]) -> int:
    pid = os.fork()
    if pid == 0:
        try:
            child()
        finally:
            os._exit(0)
    return pid


def eventfd_floor(rounds: int) -> list[int]:
    ping, pong = os.eventfd(0), os.eventfd(0)
    woke = mmap.mmap(-1, 8)  # shared with the child: when it woke

    def child() -> None:
        for _ in range(rounds):
            os.eventfd_read(ping)
            woke[0:8] = struct.pack("<Q", time.monotonic_ns())
            os.eventfd_write(pong, 1)

    pid = fork(child)
    out = []
    for _ in range(rounds):
        t0 = time.monotonic_ns()
        os.eventfd_write(ping, 1)
        os.eventfd_read(pong)
        out.append(struct.unpack("<Q", woke[0:8])[0] - t0)
    os.waitpid(pid, 0)
    for fd in (ping, pong):
        os.close(fd)
    return out


def source(directory: str) -> SharedPageSource:
    return SharedPageSource(SharedPageSourceConfig(directory=directory, poll_interval_s=1.0), Config())


def run_source(src: SharedPageSource, backend: str, options: dict[str, Any],
               on_event: Callable[[Event], bool], producer: Callable[[], None],
               beside: Callable[[], Coroutine[Any, Any, None]] | None = None) -> None:
    """Run ``src`` until ``on_event`` says stop; the producer runs in a child process forked
    once the source is ready, ``beside`` in a task of its own."""

    async def run() -> None:
        done = anyio.Event()

        async def emit(event: Event) -> None:
            if on_event(event):
                done.set()

        async with anyio.create_task_group() as tg:
            await tg.start(src.run, emit)
            if beside is not None:
                tg.start_soon(beside)
            pid = fork(producer)
            with anyio.fail_after(120):
                await done.wait()
            tg.cancel_scope.cancel()
        os.waitpid(pid, 0)

    anyio.run(run, backend=backend, backend_options=options)


def c_producer(directory: str, rounds: int, ack: int, *ring: int) -> Callable[[], None]:
    """A child's body that becomes ``bench/c/pagepub`` (the C header's publisher): ``rounds``
    records into ``directory``, each waiting for an ack on the eventfd ``ack`` (-1: none)."""
    binary = str(native.build("pagepub"))

    def child() -> None:
        if ack >= 0:
            os.set_inheritable(ack, True)
        os.execv(binary, [binary, directory, str(rounds), str(ack), *map(str, ring)])

    return child


def latency(rounds: int, backend: str, options: dict[str, Any], *, after_turn: bool = False,
            producer_in: str = "python") -> list[int]:
    """Record timestamp -> emit, one record at a time.  The producer publishes the next record
    when the event's ack comes: from inside the emit (back to back: the producer, often woken
    on the reader's CPU, publishes while the reader still finishes its turn, whose rest is
    then part of the next record's latency) or, with ``after_turn``, from another task once
    the source's turn is over (the record finds the reader waiting, as a lone event does).
    ``producer_in`` is ``python`` (:class:`oomkit.sharedpage.Publisher`, whose own few
    microseconds between the timestamp and the doorbell count in the latency) or ``c``
    (``bench/c/pagepub``: the C header, a few hundred nanoseconds)."""
    ack = os.eventfd(0)
    out: list[int] = []
    turn_over = [anyio.Event()]
    with tempfile.TemporaryDirectory() as d:

        def python_producer() -> None:
            # A real pid and its start time: the reader checks them against /proc.
            me = os.getpid()
            ticks = start_ticks("/proc", me) or 0
            with Publisher.create(Path(d) / "bench.ring", capacity=1024) as pub:
                for _ in range(rounds):
                    pub.publish("oom", "/bench", pid=me, start_ticks=ticks)
                    os.eventfd_read(ack)

        producer = python_producer if producer_in == "python" else c_producer(d, rounds, ack)

        def on_event(event: Event) -> bool:
            out.append(time.monotonic_ns() - event.monotonic_ns)
            if after_turn:
                turn_over[0].set()
            else:
                os.eventfd_write(ack, 1)
            return len(out) == rounds

        async def acker() -> None:
            # Woken by the emit, it runs once the source's task has given the loop back.
            while True:
                await turn_over[0].wait()
                turn_over[0] = anyio.Event()
                os.eventfd_write(ack, 1)

        run_source(source(d), backend, options, on_event, producer, acker if after_turn else None)
    os.close(ack)
    return out


def sustained(burst: int, backend: str, options: dict[str, Any]) -> tuple[float, int]:
    """Events per second and records lost for a burst published as fast as possible."""
    count, first = 0, 0
    with tempfile.TemporaryDirectory() as d:
        src = source(d)

        def producer() -> None:
            with Publisher.create(Path(d) / "bench.ring", capacity=65536, record_size=128) as pub:
                for _ in range(burst):
                    pub.publish("oom", "/bench")

        def on_event(event: Event) -> bool:
            nonlocal count, first
            first = first or event.monotonic_ns
            count += 1
            return count + src.stats.lost >= burst

        run_source(src, backend, options, on_event, producer)
    return count / ((time.monotonic_ns() - first) / 1e9), src.stats.lost


def reader_cost(n: int = 20000) -> tuple[float, float, float, float]:
    """Microseconds per poll of an idle ring, of a ring with one new record, and of one with
    one new record after a doorbell (``poll(rang=True)``: two reads); ns per fence."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "cost.ring"
        with Publisher.create(path, capacity=256, doorbell=Path(d) / "none") as pub:
            reader = RingReader(path)
            t = time.perf_counter_ns()
            for _ in range(n):
                reader.poll()
            idle = (time.perf_counter_ns() - t) / n / 1000
            busy = 0
            for _ in range(n // 4):
                pub.publish("oom", "/a/b", ring=False)
                t = time.perf_counter_ns()
                reader.poll()
                busy += time.perf_counter_ns() - t
            rang = 0
            for _ in range(n // 4):
                pub.publish("oom", "/a/b", ring=False)
                t = time.perf_counter_ns()
                reader.poll(rang=True)
                rang += time.perf_counter_ns() - t
            reader.close()
    t = time.perf_counter_ns()
    for _ in range(n):
        fence()
    return idle, busy / (n // 4) / 1000, rang / (n // 4) / 1000, (time.perf_counter_ns() - t) / n


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="shared page: latency and rate beside an eventfd floor")
    ap.add_argument("--rounds", type=int, default=2000)
    ap.add_argument("--burst", type=int, default=200_000)
    ap.add_argument("--runs", type=int, default=3, help="latency runs, each with its own floor")
    args = ap.parse_args(argv)
    print(f"# shared page: {os.cpu_count()} CPUs, Linux {platform.release()}, Python "
          f"{platform.python_version()}; {args.rounds} rounds x {args.runs} runs, burst of {args.burst}")
    backends = []
    for label, backend, options in BACKENDS:
        try:
            anyio.run(anyio.sleep, 0, backend=backend, backend_options=options)
        except ImportError as exc:
            print(f"{'publish -> event, ' + label:<52} skipped: {exc}")
            continue
        backends.append((label, backend, options))
    rows = ["eventfd ping-pong (floor)"] + [f"publish -> event, {label}{c}{idle}" for label, _, _ in backends
                                           for c in ("", ", C producer") for idle in ("", ", reader idle")]
    everywhere = os.sched_getaffinity(0)
    placements: list[tuple[str, set[int]]] = [("CPUs as the scheduler picks", everywhere)]
    if len(everywhere) > 1:
        placements.append((f"both processes on CPU {min(everywhere)}", {min(everywhere)}))
    try:
        for where, cpus in placements:
            # The forked producer inherits the affinity: pinned, every wake stays on one CPU.
            os.sched_setaffinity(0, cpus)
            latency_runs(args.rounds, args.runs, where, rows, backends)
    finally:
        os.sched_setaffinity(0, everywhere)
    print(f"{'burst':<52} {'events/s':>10} {'lost':>6}")
    for label, backend, options in backends:
        rate, lost = sustained(args.burst, backend, options)
        print(f"{label:<52} {rate:10.0f} {lost:6d}")
    idle, one, rang, fence_ns = reader_cost()
    print(f"reader: poll of an idle ring {idle:.2f} us, poll with one new record {one:.2f} us"
          f" ({rang:.2f} us after a doorbell), fence() {fence_ns:.0f} ns")


def latency_runs(rounds: int, runs: int, where: str, rows: list[str],
                 backends: list[tuple[str, str, dict[str, Any]]]) -> None:
    p50s: dict[str, list[float]] = {row: [] for row in rows}
    ratios: dict[str, list[float]] = {row: [] for row in rows}
    print(f"## latency, {where}")
    print(f"{'path':<52} {'p50 us':>8} {'p99 us':>8} {'x floor':>8}")
    for run in range(1, runs + 1):
        print(f"run {run}")
        floor = eventfd_floor(rounds)
        results = {rows[0]: floor}
        for label, backend, options in backends:
            for c, producer_in in (("", "python"), (", C producer", "c")):
                results[f"publish -> event, {label}{c}"] = latency(rounds, backend, options, producer_in=producer_in)
                results[f"publish -> event, {label}{c}, reader idle"] = latency(
                    rounds, backend, options, after_turn=True, producer_in=producer_in)
        for row, lat in results.items():
            p50s[row].append(pct(lat, 50))
            ratios[row].append(pct(lat, 50) / pct(floor, 50))
            print(f"{row:<52} {pct(lat, 50):8.1f} {pct(lat, 99):8.1f} {ratios[row][-1]:8.1f}")
    print(f"p50 over {runs} runs ({where}): median [lowest, highest]; x floor: the same of each run's p50 / its floor's")
    print(f"{'path':<52} {'p50 us':>22} {'x floor':>20}")
    for row in rows:
        print(f"{row:<52} {spread(p50s[row]):>22} {spread(ratios[row]):>20}")


def spread(values: list[float]) -> str:
    s = sorted(values)
    return f"{s[len(s) // 2]:.1f} [{s[0]:.1f}, {s[-1]:.1f}]"


if __name__ == "__main__":
    main()
