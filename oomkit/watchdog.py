"""The takeover watchdog: gives OOM decisions back to the kernel when oomkit dies, even by SIGKILL.

A memcg with ``oom_kill_disable=1`` and nobody left to decide stays paused at its limit
forever.  :class:`~oomkit.sources.memcg_oom.MemcgOomSource` therefore starts this script as
a child before it takes anything over::

    python -I -S watchdog.py PROC FD=CGROUP [FD=CGROUP ...]

Its stdin is the read end of a pipe whose write end only the source holds; each ``FD`` is
an inherited ``memory.oom_control`` opened for writing.  It prints ``ready`` and blocks on
stdin.  EOF means the source is gone, however it went: the watchdog writes ``0`` to every
``FD`` and exits.  The source also passes it its lock files, so another oomkit cannot take
a cgroup over before the watchdog has handed it back.

It refuses to run (exit status 2, the reason on stdout) from inside a memcg it guards: an
OOM there would pause the watchdog too.  Only ``os`` and ``sys`` are imported, and ``-I -S``
skips even ``site``, to keep it small; it allocates nothing while it waits.
"""

import os
import sys

REFUSED = 2


def inside(own: str, guarded: str) -> bool:
    return guarded == "/" or own == guarded or own.startswith(guarded.rstrip("/") + "/")


def _own_memcg(proc: str) -> str | None:
    with open(f"{proc}/self/cgroup") as f:
        for line in f:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            if "memory" in controllers.split(","):
                return path
    return None


def main(argv: list[str]) -> int:
    proc = argv[1]
    guards = [(int(fd), rel) for fd, _, rel in (arg.partition("=") for arg in argv[2:])]
    own = _own_memcg(proc)
    for _, rel in guards:
        if own is not None and inside(own, rel):
            print(f"refused: the watchdog runs in memcg {own}, inside guarded {rel}", flush=True)
            return REFUSED
    try:
        # Lowering it to -1000 needs CAP_SYS_RESOURCE; without it the watchdog stays as
        # killable as any small process, which is little.
        with open(f"{proc}/self/oom_score_adj", "w") as f:
            f.write("-1000")
    except OSError:
        pass
    print("ready", flush=True)
    while os.read(0, 512):
        pass
    for fd, _ in guards:
        try:
            os.write(fd, b"0\n")
        except OSError:
            pass  # the cgroup is gone: nothing left to hand back
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
