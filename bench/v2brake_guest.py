"""The guest side of ``python -m bench v2brake``: hogs in a v2 cgroup, timed from the kernel's own
notifications.  Run inside the guest by bench/v2brake.py; prints one JSON line per run.

    v2brake_guest.py kill CGROUP RUNS COUNTER   # a hog until it dies; COUNTER: high or max
    v2brake_guest.py hold CGROUP RUNS TASKS     # memory.high 16 MiB under memory.max, TASKS hogs

Times are taken at the inotify wake on ``memory.events`` (``IN_MODIFY``; the kernel rate-
limits these notifications to one per 10 ms, and oomkit waits on the same ones) and at the
victim's pidfd becoming readable (it has exited).  The hogs are children forked from this
small script (no imports beyond the standard library), so their shared pages are charged
once and 20 of them fit in the cgroup.
"""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import select
import signal
import sys
import time

MiB = 1 << 20
_libc = ctypes.CDLL(None, use_errno=True)
IN_MODIFY = 0x2
HOLD_CAP_S = 150.0


def keyed(path: str) -> dict[str, int]:
    with open(path) as f:
        return {k: int(v) for k, v in (ln.split() for ln in f if ln.strip())}


def hog(cgroup: str, mib: int) -> int:
    pid = os.fork()
    if pid:
        return pid
    try:
        with open(f"{cgroup}/cgroup.procs", "w") as f:
            f.write(str(os.getpid()))
        chunks = []
        for _ in range(mib):
            m = mmap.mmap(-1, MiB, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            for off in range(0, MiB, mmap.PAGESIZE):
                m[off] = 1
            chunks.append(m)
        time.sleep(3600)
    finally:
        os._exit(0)


class Events:
    """An inotify watch on one cgroup's ``memory.events``."""

    def __init__(self, cgroup: str) -> None:
        self.path = f"{cgroup}/memory.events"
        self.fd = _libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if _libc.inotify_add_watch(self.fd, self.path.encode(), IN_MODIFY) < 0:
            raise OSError(ctypes.get_errno(), "inotify_add_watch")

    def drain(self) -> None:
        try:
            while os.read(self.fd, 4096):
                pass
        except BlockingIOError:
            pass

    def until(self, counter: str, above: int, timeout: float) -> float | None:
        """The time (monotonic) of the wake at which ``counter`` first exceeds ``above``."""
        deadline = time.monotonic() + timeout
        poll = select.poll()
        poll.register(self.fd, select.POLLIN)
        while True:
            if keyed(self.path).get(counter, 0) > above:
                return time.monotonic()
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            if poll.poll(left * 1000):
                t = time.monotonic()
                self.drain()
                if keyed(self.path).get(counter, 0) > above:
                    return t


def wait_exit(pid: int, timeout: float) -> tuple[float | None, int]:
    fd = os.pidfd_open(pid)
    try:
        ready, _, _ = select.select([fd], [], [], timeout)
        t = time.monotonic() if ready else None
    finally:
        os.close(fd)
    if t is None:
        os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    return t, status


def settle(cgroup: str, below: int) -> None:
    deadline = time.monotonic() + 30
    while int(open(f"{cgroup}/memory.current").read()) >= below and time.monotonic() < deadline:
        time.sleep(0.05)


def kill_runs(cgroup: str, runs: int, counter: str) -> None:
    ev = Events(cgroup)
    limit = int(open(f"{cgroup}/memory.max").read())
    for _ in range(runs):
        settle(cgroup, limit // 2)
        if counter == "high":  # wait for oomkit to have put its brake back
            deadline = time.monotonic() + 30
            while open(f"{cgroup}/memory.high").read().strip() == "max" and time.monotonic() < deadline:
                time.sleep(0.05)
        ev.drain()
        before = keyed(ev.path)
        pid = hog(cgroup, 4 * limit // MiB)
        t0 = ev.until(counter, before.get(counter, 0), 120)
        t1, status = wait_exit(pid, 120)
        after = keyed(ev.path)
        ms = None if t0 is None or t1 is None else (t1 - t0) * 1000
        kernel = after.get("oom_kill", 0) - before.get("oom_kill", 0)
        print(json.dumps({"ms": ms, "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else 0,
                          "kernel_kills": kernel}), flush=True)


def hold_runs(cgroup: str, runs: int, tasks: int) -> None:
    ev = Events(cgroup)
    limit = int(open(f"{cgroup}/memory.max").read())
    high = limit - 16 * MiB
    for _ in range(runs):
        with open(f"{cgroup}/memory.high", "w") as f:
            f.write("max")
        settle(cgroup, MiB * 4)
        with open(f"{cgroup}/memory.high", "w") as f:
            f.write(str(high))
        ev.drain()
        before = keyed(ev.path)
        pids = [hog(cgroup, 4 * limit // MiB // tasks + 4) for _ in range(tasks)]
        t0 = ev.until("high", before.get("high", 0), 120)
        t1 = ev.until("max", before.get("max", 0), HOLD_CAP_S)
        with open(f"{cgroup}/memory.high", "w") as f:
            f.write("max")
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            os.waitpid(pid, 0)
        s = None if t0 is None else (t1 - t0 if t1 is not None else None)
        print(json.dumps({"s": s, "capped": t1 is None, "tasks": tasks}), flush=True)


def main(argv: list[str]) -> None:
    mode, cgroup, runs, arg = argv
    if mode == "kill":
        kill_runs(cgroup, int(runs), arg)
    else:
        hold_runs(cgroup, int(runs), int(arg))


if __name__ == "__main__":
    main(sys.argv[1:])
