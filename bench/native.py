"""The benchmarks' small C helpers (``bench/c``), compiled on first use into the venv."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

SOURCES = Path(__file__).with_name("c")
# The hog's binary name is its comm, the name every daemon is pointed at.
BINARY = {"hog": "benchhog", "floor": "floor", "memsampler": "memsampler", "alloc": "scenalloc",
          "pagepub": "pagepub"}
# The shared page's C producer header, which pagepub.c includes.
HEADERS = SOURCES.parent.parent / "examples" / "shared-page"


def skip_reason() -> str | None:
    """Why the C helpers cannot be built here, or None."""
    return None if shutil.which("cc") else "no C compiler (`cc`) on PATH: apt-get install gcc"


def build(name: str) -> Path:
    """``bench/c/NAME.c`` compiled with ``cc -O2``, rebuilt when it or a header it may
    include is newer."""
    src = SOURCES / f"{name}.c"
    out_dir = Path(sys.prefix) / "bench-bin"
    out = out_dir / BINARY[name]
    newest = max(p.stat().st_mtime for p in [src, *HEADERS.glob("*.h")])
    if not out.exists() or out.stat().st_mtime < newest:
        out_dir.mkdir(exist_ok=True)
        subprocess.run(["cc", "-O2", "-Wall", "-Wextra", "-Werror", "-std=c11", f"-I{HEADERS}", "-o", str(out), str(src)],
                       check=True)
    return out
