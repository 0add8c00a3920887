"""The daemons compared: oomkit serve, earlyoom and nohang, started in the foreground.

Each is pointed at the hog (comm ``benchhog``) by its own means, and the hog also gets
``oom_score_adj=1000``, which all three honour as the kernel does: earlyoom ``--prefer``,
nohang ``@BADNESS_ADJ_RE_NAME``, oomkit ``[plugins.protect] names`` for the processes of the
benchmark itself (``kernel_badness`` already ranks an ``oom_score_adj=1000`` hog first).

nohang 0.2.0 refuses a memory threshold above 50 % of RAM, which a benchmark that leaves
the machine most of its memory needs: :func:`nohang_command` runs a temporary copy of
``/usr/sbin/nohang`` with that one check relaxed to 100 %, generated at each run.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

HOG = "benchhog"
NOHANG = Path("/usr/sbin/nohang")
NOHANG_CONF = Path("/etc/nohang/nohang.conf")
_NOHANG_CHECK = "if mem_min_kb > mem_total * 0.5 or mem_min_kb < 0:"
PEERS = ("oomkit", "earlyoom", "nohang")


def skip_reason(peer: str) -> str | None:
    """Why ``peer`` cannot run here, or None."""
    if peer == "earlyoom" and not shutil.which("earlyoom"):
        return "earlyoom is not installed (apt-get install earlyoom)"
    if peer == "nohang" and not (NOHANG.exists() and NOHANG_CONF.exists()):
        return "nohang is not installed (apt-get install nohang)"
    return None


def version(peer: str) -> str:
    if peer == "earlyoom":
        out = subprocess.run(["earlyoom", "-v"], capture_output=True, text=True)
        return (out.stdout + out.stderr).split("\n")[0].strip()
    if peer == "nohang":
        out = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", "nohang"], capture_output=True, text=True)
        return f"nohang {out.stdout.strip() or '?'}"
    from oomkit import __version__

    return f"oomkit {__version__}"


def oomkit_command(tmp: Path, threshold_kib: int | None, events: Path | None = None) -> list[str]:
    """``oomkit serve`` on its default config, with the meminfo threshold set if given."""
    argv = [sys.executable, "-m", "oomkit", "serve"]
    if threshold_kib is not None:
        cfg = tmp / "oomkit.toml"
        cfg.write_text(
            f'[[sources]]\nkind = "meminfo"\nmem_available = "{threshold_kib}K"\n\n'
            # The benchmark's own processes; the hog is ranked first anyway (oom_score_adj 1000).
            '[plugins.protect]\nnames = ["python*", "make", "memsampler", "earlyoom", "nohang"]\n'
        )
        argv += ["-c", str(cfg)]
    if events is not None:
        argv += ["--events", str(events)]
    return argv


BENCH_NAMES = "^(python.*|make|memsampler)$"
"""The benchmark's own processes, for every daemon to avoid should it act with no hog left."""


def earlyoom_command(threshold_kib: int | None) -> list[str]:
    """earlyoom; with a threshold, SIGKILL right at it (-M SIZE,KILL_SIZE equal), as the others do."""
    if threshold_kib is None:
        return ["earlyoom"]
    return ["earlyoom", "-M", f"{threshold_kib},{threshold_kib}", "--prefer", f"^{HOG}$", "--avoid", BENCH_NAMES]


def nohang_command(tmp: Path, threshold_kib: int | None) -> list[str]:
    """nohang on its packaged config; with a threshold, a patched copy (see module docstring)."""
    if threshold_kib is None:
        return ["/usr/bin/python3", str(NOHANG), "--monitor", "-c", str(NOHANG_CONF)]
    source = NOHANG.read_text()
    if source.count(_NOHANG_CHECK) != 1:
        raise RuntimeError(f"{NOHANG}: the 50 % threshold check to relax was not found; is it still 0.2.0?")
    patched = tmp / "nohang-patched"
    patched.write_text(source.replace(_NOHANG_CHECK, _NOHANG_CHECK.replace("0.5", "1.0")))
    conf = NOHANG_CONF.read_text()
    mib = f"{threshold_kib / 1024:.3f} M"
    for key in ("soft_threshold_min_mem", "hard_threshold_min_mem"):
        conf, n = re.subn(rf"^{key}\s*=.*$", f"{key} = {mib}", conf, flags=re.M)
        if n != 1:
            raise RuntimeError(f"{NOHANG_CONF}: no single {key} line")
    conf += f"\n@BADNESS_ADJ_RE_NAME 1000 /// ^{HOG}$\n@BADNESS_ADJ_RE_NAME -1000 /// {BENCH_NAMES}\n"
    (tmp / "nohang.conf").write_text(conf)
    return ["/usr/bin/python3", str(patched), "--monitor", "-c", str(tmp / "nohang.conf")]


def command(peer: str, tmp: Path, threshold_kib: int | None) -> list[str]:
    """The peer's command line; with a threshold, oomkit logs its decisions to ``tmp/decisions.jsonl``."""
    if peer == "oomkit":
        return oomkit_command(tmp, threshold_kib, None if threshold_kib is None else tmp / "decisions.jsonl")
    if peer == "earlyoom":
        return earlyoom_command(threshold_kib)
    return nohang_command(tmp, threshold_kib)


@contextmanager
def running(peer: str, tmp: Path, threshold_kib: int | None, settle_s: float) -> Iterator[subprocess.Popen[bytes]]:
    """The peer running in the foreground, its output in ``tmp/PEER.log``; stopped after."""
    with open(tmp / f"{peer}.log", "wb") as log:
        proc = subprocess.Popen(command(peer, tmp, threshold_kib), stdout=log, stderr=subprocess.STDOUT)
    try:
        ready = {"oomkit": b"oomkit ready", "earlyoom": b"mem avail", "nohang": b"Monitoring has started"}[peer]
        deadline = time.monotonic() + 30
        while ready not in (tmp / f"{peer}.log").read_bytes():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{peer} did not start: {(tmp / f'{peer}.log').read_text()[-2000:]}")
            time.sleep(0.05)
        time.sleep(settle_s)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
