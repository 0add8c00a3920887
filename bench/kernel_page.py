"""The kernel-page source: how soon, how completely and at what cost the kernel's own OOM
kills reach oomkit, through the memory-mapped ring buffer, ``read()`` and ``/dev/kmsg``.

    python -m bench.kernel_page [--runs 30] [--storm 50] [--idle-seconds 30]
                                [--modes mmap read kmsg] [--limit-mib 64]

Each mode runs the ``kernel-page`` source alone in a child process (``--child MODE``, on
asyncio), which prints every ``kernel-kill`` event with the moment it was emitted
(``time.monotonic_ns()``).  The hog (``bench/c/hog.c``, comm ``benchhog``) touches twice
a v1 memcg's limit, so the kernel's memcg OOM killer kills it.

* **kill → event**: from the kernel queueing SIGKILL for the hog (the ``signal_generate``
  tracepoint, ``bench.tracing``, the same witness as ``memcg_oom``) to the source emitting
  its event, one hog at a time.  For mmap and read, ``mark_victim`` is stamped by the
  kernel too (``trace_clock mono``), which shows where the time goes: the kernel prints its
  OOM report to the console before the victim's page fault returns, and the ring buffer
  wakes its reader from an irq_work that waits for that.
* **storm**: ``--storm`` hogs started at once in one memcg: the kernel kills them one after
  another.  Every kill must be reported once: seen, missed, reported twice, and the
  source's own counters (records lost, victims whose memcg could not be read).
* **floor**: a ``trace_marker`` write to a thread blocked in ``poll`` on a mapped CPU's
  ``trace_pipe_raw`` waking: the ring buffer's own wake-up with no OOM report printed.
* **CPU**: every thread of the child (``/proc/PID/task/*/schedstat``) during the storm, per
  event; and at rest, over ``--idle-seconds`` with no kills of ours, as % of one core
  (other tests' OOM kills on the machine wake it too; the table says how many).

Needs root, the v1 memory controller, tracefs and a C compiler; other processes' OOM kills
on the machine during a run are seen too and left out (only our hogs' pids count).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

from oomkit.cgroupfs import find_mounts
from tests import kernel
from tests.sources_support import cpu_ns

from . import native, tracing
from .stats import summary, table

MODES = ("mmap", "read", "kmsg")


# --- the child: the source alone --------------------------------------------------------------


def child(mode: str) -> None:
    import anyio

    from oomkit.config import Config
    from oomkit.events import Event
    from oomkit.sources.kernel_page import KernelPageSource, KernelPageSourceConfig

    src = KernelPageSource(KernelPageSourceConfig(mode=mode), Config())  # type: ignore[arg-type]

    async def emit(event: Event) -> None:
        if event.kind == "kernel-kill":
            now = time.monotonic_ns()
            print(f"kill {event.pid} {now} {event.monotonic_ns} {event.scope}", flush=True)

    async def main() -> None:
        with anyio.open_signal_receiver(signal.SIGTERM) as signals:
            async with anyio.create_task_group() as tg:
                await tg.start(src.run, emit)
                print(f"ready {src.stats.mode}", flush=True)
                async for _ in signals:
                    tg.cancel_scope.cancel()
                    break

    try:
        anyio.run(main)
    finally:
        s = src.stats
        print(json.dumps({"mode": s.mode, "kills": s.kills, "lost": s.lost, "duplicates": s.duplicates,
                          "memcg_misses": s.memcg_misses, "rejected": s.rejected_total, "wakes": s.wakes,
                          "ioctls": s.ioctls, "fallbacks": s.fallbacks}), flush=True)


class Child:
    """The source in its own process, and what it printed."""

    def __init__(self, mode: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "bench.kernel_page", "--child", mode],
                                     stdout=subprocess.PIPE, text=True)
        self.kills: dict[int, list[tuple[int, int, str]]] = {}
        self.stats: dict[str, object] = {}
        self._ready = threading.Event()
        self.mode = ""
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._pump, daemon=True)
        self._thread.start()
        if not self._ready.wait(30):
            self.proc.kill()
            raise RuntimeError(f"{mode}: the source did not start")

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("ready"):
                self.mode = line.split()[1]
                self._ready.set()
            elif line.startswith("kill "):
                _, pid, recv, ev, scope = line.split(maxsplit=4)
                with self._lock:
                    self.kills.setdefault(int(pid), []).append((int(recv), int(ev), scope.strip()))
            elif line.startswith("{"):
                self.stats = json.loads(line)

    def wait_for(self, pid: int, timeout: float = 5.0) -> tuple[int, int, str] | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                got = self.kills.get(pid)
            if got:
                return got[0]
            time.sleep(0.001)
        return None

    def stop(self) -> dict[str, object]:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=30)
        self._thread.join(timeout=5)
        assert self.proc.stdout is not None
        self.proc.stdout.close()
        return self.stats


# --- the runs ---------------------------------------------------------------------------------


def _memcg(limit_mib: int) -> kernel.Cgroup:
    parent, root = kernel.v1_parent(), find_mounts("/proc")[0]
    assert parent is not None and root is not None
    cg = kernel.make(parent, root, "bench-kpage")
    cg.write("memory.limit_in_bytes", limit_mib << 20)
    return cg


@dataclass
class Latency:
    lat: list[float] = field(default_factory=list)
    """kill sent → event emitted, ms"""
    stamp: list[float] = field(default_factory=list)
    """kill sent → the kernel's mark_victim timestamp, ms"""
    missed: int = 0


@dataclass
class Storm:
    seen: int
    missed: int
    twice: int
    cpu_ms: float
    stats: dict[str, object]


def latency(mode: str, runs: int, limit_mib: int, trace: tracing.SignalTrace) -> Latency:
    hog = str(native.build("hog"))
    cg = _memcg(limit_mib)
    child = Child(mode)
    res = Latency()
    try:
        if child.mode != mode:
            raise RuntimeError(f"{mode}: the source runs in mode {child.mode!r}")
        for _ in range(runs):
            trace.clear()
            p = cg.spawn([hog, str(limit_mib * 2), "0"], stdout=subprocess.DEVNULL)
            os.waitpid(p.pid, 0)
            p.returncode = -9
            kill = trace.first(p.pid)
            got = child.wait_for(p.pid)
            if kill is None or got is None:
                res.missed += 1
                continue
            recv, ev_ns, _ = got
            res.lat.append((recv - kill.ns) / 1e6)
            if mode != "kmsg":
                res.stamp.append((ev_ns - kill.ns) / 1e6)
            time.sleep(0.05)
    finally:
        child.stop()
        cg.remove()
    return res


def storm(mode: str, n: int, limit_mib: int) -> Storm:
    hog = str(native.build("hog"))
    cg = _memcg(limit_mib)
    child = Child(mode)
    try:
        c0 = cpu_ns(child.proc.pid)
        hogs = [cg.spawn([hog, str(limit_mib * 2), "0"], stdout=subprocess.DEVNULL) for _ in range(n)]
        for p in hogs:
            os.waitpid(p.pid, 0)
            p.returncode = -9
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not all(p.pid in child.kills for p in hogs):
            time.sleep(0.01)
        time.sleep(1.0)  # anything reported twice arrives by now
        c1 = cpu_ns(child.proc.pid)
    finally:
        stats = child.stop()
        cg.remove()
    counts = [len(child.kills.get(p.pid, [])) for p in hogs]
    return Storm(seen=sum(1 for c in counts if c), missed=sum(1 for c in counts if not c),
                 twice=sum(1 for c in counts if c > 1), cpu_ms=(c1 - c0) / 1e6, stats=stats)


def idle(mode: str, seconds: float) -> tuple[float, int, dict[str, object]]:
    """CPU % of one core at rest, threads, and the source's counters (other processes' OOM
    kills on the machine wake it too: they are counted, not hidden)."""
    child = Child(mode)
    try:
        time.sleep(2)  # start-up done
        threads = len(os.listdir(f"/proc/{child.proc.pid}/task"))
        c0, t0 = cpu_ns(child.proc.pid), time.monotonic()
        time.sleep(seconds)
        c1, t1 = cpu_ns(child.proc.pid), time.monotonic()
    finally:
        stats = child.stop()
    return (c1 - c0) / ((t1 - t0) * 1e9) * 100, threads, stats


def wake_floor(samples: int) -> list[float]:
    """trace_marker write → a thread blocked in poll on the mapped CPU's fd wakes, in ms: the
    ring buffer's own wake-up, with no OOM report printed on the way."""
    import select

    from oomkit.ringbuffer import MappedCpu, PageParser
    from oomkit.tracefs import Instance, Mount

    mount = Mount.open()
    inst = Instance(mount.path)
    out: list[float] = []
    reader = None
    try:
        inst.write("buffer_percent", "0")
        cpu = sorted(os.sched_getaffinity(0))[0]
        reader = MappedCpu(inst.cpu_file(cpu), cpu, PageParser(inst.page_header(), inst.event_header()))
        reader.read()
        fd = os.open(inst.path / "trace_marker", os.O_WRONLY)
        woke: list[int] = []

        def waiter() -> None:
            p = select.poll()
            p.register(reader.fileno(), select.POLLIN)
            p.poll(5000)
            woke.append(time.monotonic_ns())

        old = os.sched_getaffinity(0)
        os.sched_setaffinity(0, {cpu})  # the marker lands in that CPU's ring
        try:
            for _ in range(samples):
                woke.clear()
                t = threading.Thread(target=waiter)
                t.start()
                time.sleep(0.005)  # blocked in poll by now
                sent = time.monotonic_ns()
                os.write(fd, b"x")
                t.join()
                if woke:
                    out.append((woke[0] - sent) / 1e6)
                reader.read()
        finally:
            os.sched_setaffinity(0, old)
            os.close(fd)
    finally:
        if reader is not None:
            reader.close()
        inst.remove()
        mount.close()
    return out


def skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root (tracefs, /dev/kmsg, memcgs)"
    return kernel.v1_skip_reason() or native.skip_reason() or tracing.skip_reason()


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.kernel_page")
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--storm", type=int, default=50)
    ap.add_argument("--idle-seconds", type=float, default=30.0)
    ap.add_argument("--limit-mib", type=int, default=64)
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    ap.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(args.child)
        return
    reason = skip_reason()
    if reason:
        print(f"kernel_page benchmark skipped: {reason}\n")
        return
    lat: dict[str, Latency] = {}
    with tracing.SignalTrace("benchhog") as trace:
        for mode in args.modes:
            lat[mode] = latency(mode, args.runs, args.limit_mib, trace)
    floor = wake_floor(args.runs)
    storms = {mode: storm(mode, args.storm, args.limit_mib) for mode in args.modes}
    idles = {mode: idle(mode, args.idle_seconds) for mode in args.modes}

    rows: list[tuple[object, ...]] = []
    for mode in args.modes:
        r = lat[mode]
        for stage, values in (("kill sent → event emitted", r.lat), ("kill sent → mark_victim stamp", r.stamp)):
            if values:
                s = summary(values)
                rows.append((mode, stage, s["n"], s["p50"], s["p99"], s["max"], r.missed))
    if floor:
        s = summary(floor)
        rows.append(("(floor)", "trace_marker write → poll wakes", s["n"], s["p50"], s["p99"], s["max"], 0))
    print(table(f"kernel memcg OOM kill → kernel-kill event, {args.limit_mib} MiB limit (ms)",
                ("mode", "stage", "runs", "p50", "p99", "max", "missed"), rows))
    rows = []
    for mode in args.modes:
        st = storms[mode]
        rows.append((mode, args.storm, st.seen, st.missed, st.twice, st.stats.get("lost", "?"),
                     st.stats.get("memcg_misses", "?"), st.cpu_ms, st.cpu_ms * 1000 / max(1, st.seen)))
    print(table(f"a storm of {args.storm} kernel kills in one {args.limit_mib} MiB memcg",
                ("mode", "kills", "seen", "missed", "twice", "lost (source)", "memcg misses", "CPU ms",
                 "CPU µs per kill"), rows))
    rows = [(mode, f"{args.idle_seconds:g} s", idles[mode][1], idles[mode][2].get("kills", "?"),
             idles[mode][2].get("wakes", "?"), f"{idles[mode][0]:.4f} %") for mode in args.modes]
    print(table("the source at rest (no kills of ours)",
                ("mode", "measured over", "threads", "other kills seen", "wakes", "CPU, % of one core"), rows))


if __name__ == "__main__":
    main(sys.argv[1:])
