"""The guest side of the runner: a command server on a virtio-serial port.

Started once by the guest's init (``python -I -S agent.py /dev/vportNpM``); standard library
only.  One JSON object per line each way; each request has an ``op`` and an ``id`` that its
reply repeats.  Replies carry ``"ok": true`` and the op's fields, or ``"ok": false`` and an
``error`` string.  Bytes (output, file contents) travel base64-encoded.

Ops:
  run     argv, env, cwd, cgroup, timeout, stdin, limit -> rc, stdout, stderr, timed_out,
          truncated
  spawn   argv, env, cwd, cgroup -> pid (a background process; its output goes to files)
  poll    pid, out_offset, err_offset, limit -> rc (None while running), stdout, stderr
  signal  pid, signal -> {}
  read    path, limit -> data
  write   path, data -> {}
  poweroff -> {} and the agent exits (init then powers the guest off)

``cgroup`` is a cgroup directory the child joins before exec (if it cannot, it exits with
126 and says why on its stderr).  Requests are served one at a time; a ``run`` blocks the
agent until it ends or times out (its whole process group is then SIGKILLed).  Children
start in their own session with ``oom_score_adj`` 0; the agent itself is at -1000, so a
test's OOM never takes it, and locked in memory, so a global shortage does not make it thrash.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
from typing import Any

OUTPUT_DIR = "/oomkit-guest/output"  # made here, in the overlay: a path the host has not
DEFAULT_LIMIT = 1 << 20


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _child_setup(cgroup: str | None) -> Any:
    """What a child does before exec: leave the agent's -1000 behind, join ``cgroup``.

    A failure is written to the child's stderr and ends it with status 126: an exception
    raised here would reach the agent without its message."""

    def setup() -> None:
        try:
            with open("/proc/self/oom_score_adj", "w") as f:
                f.write("0")
            if cgroup:
                with open(os.path.join(cgroup, "cgroup.procs"), "w") as f:
                    f.write("0")  # "0" is the writing process itself
        except OSError as exc:
            os.write(2, f"oomkit agent: cannot join {cgroup}: {exc}\n".encode())
            os._exit(126)

    return setup


class Agent:
    def __init__(self, port: str) -> None:
        self.fd = os.open(port, os.O_RDWR)
        self.background: dict[int, subprocess.Popen[bytes]] = {}
        self.spawned = 0
        os.makedirs(OUTPUT_DIR, exist_ok=True)

    def send(self, reply: dict[str, Any]) -> None:
        data = (json.dumps(reply) + "\n").encode()
        while data:
            data = data[os.write(self.fd, data) :]

    def serve(self) -> None:
        self.send({"id": 0, "ok": True, "ready": True, "pid": os.getpid()})
        buf = b""
        while True:
            chunk = os.read(self.fd, 65536)
            if not chunk:
                time.sleep(0.1)  # the host side is not connected (yet, or any more)
                continue
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                if self.handle(line):
                    return

    def handle(self, line: bytes) -> bool:
        """Serve one request; True when the agent should exit."""
        req_id: object = None
        op: object = None
        try:
            req = json.loads(line)
            req_id = req.get("id")
            op = req["op"]
            method = getattr(self, f"op_{op}", None)
            if method is None:
                raise ValueError(f"unknown op {op!r}")
            reply = method(req)
        except Exception as exc:  # every fault becomes a reply naming it; the agent goes on
            self.send({"id": req_id, "ok": False, "error": f"{type(exc).__name__}: {exc}"})
            return False
        self.send({"id": req_id, "ok": True, **reply})
        return op == "poweroff"

    @staticmethod
    def _env(req: dict[str, Any]) -> dict[str, str]:
        env = dict(os.environ)
        env.update(req.get("env") or {})
        return env

    def op_run(self, req: dict[str, Any]) -> dict[str, Any]:
        limit = int(req.get("limit", DEFAULT_LIMIT))
        stdin = base64.b64decode(req["stdin"]) if req.get("stdin") else b""
        proc = subprocess.Popen(
            req["argv"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=req.get("cwd"),
            env=self._env(req),
            start_new_session=True,
            preexec_fn=_child_setup(req.get("cgroup")),
        )
        timed_out = False
        try:
            out, err = proc.communicate(stdin, timeout=req.get("timeout"))
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
        return {
            "rc": proc.returncode,
            "stdout": _b64(out[:limit]),
            "stderr": _b64(err[:limit]),
            "timed_out": timed_out,
            "truncated": len(out) > limit or len(err) > limit,
        }

    def op_spawn(self, req: dict[str, Any]) -> dict[str, Any]:
        # Output goes to files, not pipes: nobody drains a pipe while the agent serves others.
        self.spawned += 1
        tag = f"{OUTPUT_DIR}/new-{self.spawned}"
        with open(f"{tag}.out", "wb") as out, open(f"{tag}.err", "wb") as err:
            proc = subprocess.Popen(
                req["argv"],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                cwd=req.get("cwd"),
                env=self._env(req),
                start_new_session=True,
                preexec_fn=_child_setup(req.get("cgroup")),
            )
        os.rename(f"{tag}.out", f"{OUTPUT_DIR}/{proc.pid}.out")
        os.rename(f"{tag}.err", f"{OUTPUT_DIR}/{proc.pid}.err")
        self.background[proc.pid] = proc
        return {"pid": proc.pid}

    def _proc(self, req: dict[str, Any]) -> subprocess.Popen[bytes]:
        pid = int(req["pid"])
        if pid not in self.background:
            raise LookupError(f"no background process {pid}")
        return self.background[pid]

    def op_poll(self, req: dict[str, Any]) -> dict[str, Any]:
        proc = self._proc(req)
        rc = proc.poll()  # before reading: output read after exit is complete
        limit = int(req.get("limit", DEFAULT_LIMIT))
        chunks = []
        for suffix, key in (("out", "out_offset"), ("err", "err_offset")):
            with open(f"{OUTPUT_DIR}/{proc.pid}.{suffix}", "rb") as f:
                f.seek(int(req.get(key, 0)))
                chunks.append(f.read(limit))
        if rc is not None:
            self.background.pop(proc.pid)
        return {"rc": rc, "stdout": _b64(chunks[0]), "stderr": _b64(chunks[1])}

    def op_signal(self, req: dict[str, Any]) -> dict[str, Any]:
        proc = self._proc(req)
        if proc.poll() is None:
            os.killpg(proc.pid, int(req.get("signal", signal.SIGTERM)))
        return {}

    def op_read(self, req: dict[str, Any]) -> dict[str, Any]:
        with open(req["path"], "rb") as f:
            return {"data": _b64(f.read(int(req.get("limit", DEFAULT_LIMIT))))}

    def op_write(self, req: dict[str, Any]) -> dict[str, Any]:
        # One write call: cgroup control files take a whole value per write(2).
        fd = os.open(req["path"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, base64.b64decode(req["data"]))
        finally:
            os.close(fd)
        return {}

    def op_poweroff(self, req: dict[str, Any]) -> dict[str, Any]:
        for proc in self.background.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        return {}


def _lock_in_memory() -> None:
    # Under a test's global memory pressure the kernel evicts every file page it can, the
    # agent's code (read over 9p) included, and a thrashing agent stops answering: keep it
    # resident.  Best effort: a guest without the rights still runs every other test.
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mlockall(1 | 2)  # MCL_CURRENT | MCL_FUTURE; not inherited by the children it forks


def main() -> None:
    with open("/proc/self/oom_score_adj", "w") as f:
        f.write("-1000")
    _lock_in_memory()
    Agent(sys.argv[1]).serve()


if __name__ == "__main__":
    main()
