"""Independent kill timestamps: the kernel's ``signal_generate`` tracepoint, on CLOCK_MONOTONIC.

Every handler (the kernel's OOM killer, a C program, oomkit, earlyoom, nohang) is timed by the
same witness: the moment the kernel queued SIGKILL or SIGTERM for the hog, and who sent it.
A private tracefs instance keeps this apart from anyone else's tracing; ``trace_clock mono``
makes its timestamps comparable with ``time.monotonic_ns()`` (to the microsecond the text
format prints).
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

# "  earlyoom-1234  [001] d..1.  5678.123456: signal_generate: sig=9 errno=0 code=0 comm=benchhog pid=42 ..."
_LINE = re.compile(r"^\s*(?P<sender>.+?)-(?P<spid>\d+)\s+\[\d+\].*?(?P<ts>\d+\.\d+): signal_generate: "
                   r"sig=(?P<sig>\d+) .*?comm=(?P<comm>\S+) pid=(?P<pid>\d+)")


@dataclass(frozen=True, slots=True)
class Signal:
    ns: int
    sig: int
    pid: int
    sender: str
    sender_pid: int


def _tracefs() -> Path | None:
    with open("/proc/self/mounts") as f:
        for line in f:
            dev, where, fstype = line.split()[:3]
            if fstype == "tracefs":
                return Path(where)
    return None


def skip_reason() -> str | None:
    """Why signals cannot be traced here, or None (probes by mounting if need be)."""
    try:
        with SignalTrace("benchhog"):
            return None
    except OSError as exc:
        return f"tracefs unavailable ({exc.strerror or exc}): needs CAP_SYS_ADMIN and CONFIG_TRACING"
    except subprocess.CalledProcessError as exc:
        return f"cannot mount tracefs: {exc}"


class SignalTrace:
    """``with SignalTrace("benchhog") as t: ... t.signals()``: SIGKILL/SIGTERM sent to that comm."""

    def __init__(self, comm: str) -> None:
        self.comm = comm
        self._mounted: Path | None = None
        self._inst: Path | None = None

    def __enter__(self) -> SignalTrace:
        root = _tracefs()
        if root is None:
            root = Path(tempfile.mkdtemp(prefix="oomkit-bench-tracefs-"))
            subprocess.run(["mount", "-t", "tracefs", "nodev", str(root)], check=True, capture_output=True)
            self._mounted = root
        try:
            self._inst = root / "instances" / f"oomkit-bench-{os.getpid()}"
            self._inst.mkdir()
            self._write("trace_clock", "mono")
            event = self._inst / "events" / "signal" / "signal_generate"
            (event / "filter").write_text(f'(sig == 9 || sig == 15) && comm == "{self.comm}"')
            (event / "enable").write_text("1")
            self._write("tracing_on", "1")
        except BaseException:
            self._close()
            raise
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self._close()

    def _write(self, name: str, value: str) -> None:
        assert self._inst is not None
        (self._inst / name).write_text(value)

    def _close(self) -> None:
        if self._inst is not None and self._inst.is_dir():
            self._inst.rmdir()
        if self._mounted is not None:
            subprocess.run(["umount", str(self._mounted)], check=False)
            self._mounted.rmdir()
            self._mounted = None

    def clear(self) -> None:
        self._write("trace", "")

    def signals(self) -> list[Signal]:
        assert self._inst is not None
        out = []
        for line in (self._inst / "trace").read_text().splitlines():
            m = _LINE.match(line)
            if m:
                secs, frac = m["ts"].split(".")
                ns = int(secs) * 1_000_000_000 + int(frac.ljust(9, "0")[:9])
                out.append(Signal(ns, int(m["sig"]), int(m["pid"]), m["sender"].strip(), int(m["spid"])))
        return out

    def first(self, pid: int) -> Signal | None:
        """The first SIGKILL or SIGTERM sent to ``pid`` since the last :meth:`clear`."""
        return next((s for s in self.signals() if s.pid == pid), None)
