"""A real terminal for tests: a private tmux server, one window, keys sent, the screen captured.

Each server has its own socket name, ``oomkit-test-<pid>-<n>``, so concurrent runs never
share one, and is killed when the test ends.  Where tmux is missing the tests skip with
:func:`skip_reason` (``make test`` installs it from Debian when it can).
"""

from __future__ import annotations

import itertools
import os
import shlex
import shutil
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

_counter = itertools.count()


def skip_reason() -> str | None:
    if shutil.which("tmux") is None:
        return "tmux is not installed (make test installs it from Debian; apt-get install tmux)"
    return None


class Tmux:
    """One detached tmux session running ``argv``; its exit status lands in ``rc_file``."""

    def __init__(self, argv: Sequence[str], workdir: Path, *, width: int = 220, height: int = 60,
                 env: dict[str, str] | None = None) -> None:
        self.name = f"oomkit-test-{os.getpid()}-{next(_counter)}"
        self.rc_file = workdir / f"{self.name}.rc"
        self.err_file = workdir / f"{self.name}.err"
        # A COLUMNS or LINES inherited from the test's own environment would override the
        # window's real size for the program (rich reads them first).
        exports = "unset COLUMNS LINES; " + "".join(f"export {k}={shlex.quote(v)}; " for k, v in (env or {}).items())
        # The shell stays after the command so the last screen can still be captured.
        script = (f"{exports}{shlex.join(argv)} 2>{shlex.quote(str(self.err_file))};"
                  f" echo $? > {shlex.quote(str(self.rc_file))}; sleep 600")
        self._tmux("new-session", "-d", "-s", "t", "-x", str(width), "-y", str(height), script)

    def _tmux(self, *args: str) -> str:
        done = subprocess.run(["tmux", "-L", self.name, *args], capture_output=True, text=True, timeout=30)
        if done.returncode != 0:
            raise RuntimeError(f"tmux {' '.join(args[:1])}: {done.stderr.strip()}")
        return done.stdout

    def screen(self) -> str:
        return self._tmux("capture-pane", "-p", "-t", "t")

    def send(self, *keys: str) -> None:
        self._tmux("send-keys", "-t", "t", *keys)

    def wait_for(self, predicate: Callable[[str], object], timeout: float, what: str) -> str:
        """The screen, once ``predicate(screen)`` holds; fails naming ``what`` with the last screen."""
        deadline = time.monotonic() + timeout
        while True:
            shown = self.screen()
            if predicate(shown):
                return shown
            if self.rc_file.exists() or time.monotonic() > deadline:
                err = self.err_file.read_text() if self.err_file.exists() else ""
                raise AssertionError(f"waiting for {what}: not seen within {timeout} s"
                                     f"{' (the program exited)' if self.rc_file.exists() else ''}; screen:\n"
                                     f"{shown}\nstderr:\n{err}")
            time.sleep(0.1)

    def exit_status(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while not self.rc_file.exists() or not self.rc_file.read_text().strip():
            if time.monotonic() > deadline:
                raise AssertionError(f"the program did not exit within {timeout} s; screen:\n{self.screen()}")
            time.sleep(0.05)
        return int(self.rc_file.read_text())

    def close(self) -> None:
        subprocess.run(["tmux", "-L", self.name, "kill-server"], capture_output=True, timeout=30)
        base = Path(os.environ.get("TMUX_TMPDIR", "/tmp")) / f"tmux-{os.getuid()}"
        (base / self.name).unlink(missing_ok=True)
