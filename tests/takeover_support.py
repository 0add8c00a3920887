"""Driving a real ``oomkit serve`` through takeover faults: shared by
``tests/integration/test_takeover_faults.py`` and ``bench/takeover_faults.py``.

A :class:`Daemon` is ``oomkit serve`` in a subprocess (its stderr in a file), with helpers
to find its watchdog and signal either; :class:`PauseWatch` polls a memcg's
``memory.oom_control`` every millisecond in a thread and records each pause (``under_oom``
1), which is how the benchmark measures how long a memcg stayed paused past its deadline.
:class:`BlockingVeto` is a plugin that blocks the event loop, loaded by the daemon from
``[plugins] load``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from oomkit.events import Candidate, Event
from oomkit.plugins import hookimpl

ROOT = Path(__file__).resolve().parent.parent


def wait_for(predicate: Callable[[], object], timeout: float, what: str, step: float = 0.005) -> None:
    """Poll ``predicate`` until it is true; AssertionError naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(step)


def oom_control(path: Path) -> dict[str, int]:
    out = {}
    for line in (path / "memory.oom_control").read_text().splitlines():
        key, _, value = line.partition(" ")
        if value:
            out[key] = int(value)
    return out


def takeover_config(
    cgroups: Sequence[str], run_dir: Path, *, deadline_s: float = 1.0, extra: str = "",
    protect: Sequence[str] = ("sleep",), load: Sequence[str] = (), engine: str = "",
) -> str:
    """A config taking ``cgroups`` over (no meminfo source), with its journal in ``run_dir``;
    ``protect`` names the processes the ``protect`` plugin vetoes, ``load`` more plugins
    (``module:Class``), ``engine`` lines of an ``[engine]`` table."""
    listed = ", ".join(f'"{c}"' for c in cgroups)
    names = ", ".join(f'"{n}"' for n in protect)
    out = (
        f'[paths]\nrun_dir = "{run_dir}"\n\n'
        f'[[sources]]\nkind = "memcg-oom"\nname = "takeover"\ncgroups = [{listed}]\ndeadline_s = {deadline_s}\n'
        f"{extra}\n"
        f"[plugins.protect]\nnames = [{names}]\n"
    )
    if load:
        out += "\n[plugins]\nload = [" + ", ".join(f'"{spec}"' for spec in load) + "]\n"
    if engine:
        out += f"\n[engine]\n{engine}\n"
    return out


def children_of(pid: int, marker: str) -> list[int]:
    """Pids whose parent is ``pid`` and whose command line holds ``marker``."""
    out = []
    for name in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{name}/stat").read_text()
            cmd = Path(f"/proc/{name}/cmdline").read_bytes()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid and marker.encode() in cmd:
            out.append(int(name))
    return out


def state_of(pid: int) -> str:
    """The one-letter state in ``/proc/PID/stat`` (``T`` stopped, ``Z`` zombie), ``-`` if gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "-"


def alive(pid: int) -> bool:
    return state_of(pid) not in ("-", "Z", "X")


class Daemon:
    """``oomkit serve -c CONFIG ARGS...`` in a subprocess, ready once it logged so."""

    def __init__(
        self, tmp: Path, config: str, *args: str, tag: str = "", group: bool = False, env: dict[str, str] | None = None
    ) -> None:
        self.config = tmp / f"oomkit{tag}.toml"
        self.config.write_text(config)
        self.log = tmp / f"serve{tag}-{time.monotonic_ns()}.log"
        with open(self.log, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "oomkit", "serve", "-c", str(self.config), *args],
                stdout=subprocess.DEVNULL,
                stderr=err,
                cwd=ROOT,
                process_group=0 if group else None,
                env={**os.environ, **env} if env else None,
            )
        self.pid = self.proc.pid
        self.watchdogs_seen: set[int] = set()

    def wait_ready(self, timeout: float = 30) -> Daemon:
        wait_for(lambda: "oomkit ready" in self.stderr() or self.proc.poll() is not None, timeout, "oomkit ready")
        assert self.proc.poll() is None, self.stderr()
        self.watchdog()
        return self

    def stderr(self) -> str:
        return self.log.read_text(errors="replace")

    def watchdog(self) -> int:
        """The daemon's watchdog now (remembered, so :meth:`cleanup` ends it whatever happens)."""
        (dog,) = children_of(self.pid, "watchdog.py")
        self.watchdogs_seen.add(dog)
        return dog

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def stop(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            os.kill(self.pid, signal.SIGCONT)
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def cleanup(self) -> None:
        """Kill the daemon and every watchdog it had (a failed test must leave nothing)."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for dog in self.watchdogs_seen:
            if alive(dog):
                try:
                    os.kill(dog, signal.SIGKILL)
                except ProcessLookupError:
                    pass


def oomkit(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """``python -m oomkit ARGS...``, output captured."""
    return subprocess.run(
        [sys.executable, "-m", "oomkit", *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT
    )


@dataclass
class Pause:
    start: float
    end: float | None = None
    handed_back: bool = False
    """``oom_kill_disable`` read 0 while it was under OOM (the kernel was deciding)."""

    @property
    def length(self) -> float:
        return (self.end if self.end is not None else time.monotonic()) - self.start


@dataclass
class PauseWatch:
    """Polls ``memory.oom_control`` every ``period_s`` in a thread; one :class:`Pause` per
    stretch of ``under_oom 1``.  Use as a context manager."""

    path: Path
    period_s: float = 0.001
    pauses: list[Pause] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> PauseWatch:
        self._thread = threading.Thread(target=self._run, name="pause-watch", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join()

    def _run(self) -> None:
        current: Pause | None = None
        while not self._stop.is_set():
            try:
                state = oom_control(self.path)
            except OSError:
                break
            now = time.monotonic()
            if state.get("under_oom"):
                if current is None:
                    current = Pause(now)
                    self.pauses.append(current)
                if not state.get("oom_kill_disable"):
                    current.handed_back = True
            elif current is not None:
                current.end = now
                current = None
            time.sleep(self.period_s)

    def ended(self) -> bool:
        return bool(self.pauses) and all(p.end is not None for p in self.pauses)


class BlockingVeto:
    """Blocks the daemon's event loop in its veto (``OOMKIT_TEST_VETO_S`` seconds, default 3),
    as a plugin stuck in a slow call would; vetoes nothing."""

    def __init__(self) -> None:
        self.seconds = float(os.environ.get("OOMKIT_TEST_VETO_S", "3"))

    @hookimpl
    def oomkit_veto(self, event: Event, candidates: Sequence[Candidate]) -> dict[int, str]:
        time.sleep(self.seconds)
        return {}
