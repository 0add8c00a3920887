"""Operating `oomkit serve` on the real kernel: `oomkit status` shows a real takeover,
`oomkit events --follow` sees a real kill, SIGHUP reloads a weight without ever handing the
memcg back (and a bad file changes nothing), the metrics endpoint counts the kill, sd_notify
messages arrive in order on a notify socket the test binds, and a competing OOM daemon is
named once at start."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from .. import kernel

pytestmark = pytest.mark.kernel


def wait_for(predicate: Callable[[], object], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = predicate()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


class Daemon:
    def __init__(self, proc: subprocess.Popen[bytes], log: Path, cfg: Path, sock: Path) -> None:
        self.proc, self.log, self.cfg, self.sock = proc, log, cfg, sock

    def stderr(self) -> str:
        return self.log.read_text()

    def oomkit(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "oomkit", *args, "--socket", str(self.sock)],
                              capture_output=True, text=True, timeout=60)

    def status(self) -> dict[str, Any]:
        done = self.oomkit("status", "--json")
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)  # type: ignore[no-any-return]

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=20)


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    started: list[Daemon] = []

    def start(*args: str, config: str = "", env: dict[str, str] | None = None) -> Daemon:
        n = len(started)
        cfg = tmp_path / f"oomkit-{n}.toml"
        run = tmp_path / f"run-{n}"
        cfg.write_text(f'[paths]\nrun_dir = "{run}"\n' + config)
        log = tmp_path / f"serve-{n}.log"
        with open(log, "wb") as err:
            proc = subprocess.Popen([sys.executable, "-m", "oomkit", "serve", "-c", str(cfg), *args],
                                    stdout=subprocess.DEVNULL, stderr=err, env=env)
        d = Daemon(proc, log, cfg, run / "control.sock")
        started.append(d)
        wait_for(lambda: "oomkit ready" in d.stderr() or proc.poll() is not None, 30, "oomkit ready")
        assert proc.poll() is None, d.stderr()
        return d

    yield start
    for d in started:
        if d.proc.poll() is None:
            d.proc.kill()
            d.proc.wait()


PROTECT_SLEEP = """
[[sources]]
kind = "meminfo"
mem_available = "0%"

[plugins.protect]
names = ["sleep"]
"""


def test_status_reflects_a_real_takeover(memcg: Callable[..., kernel.Cgroup], serve: Callable[..., Daemon]) -> None:
    cg = memcg(limit=64 << 20)
    d = serve("--takeover", str(cg.path), config=PROTECT_SLEEP)
    st = d.status()
    (takeover,) = [s for s in st["sources"] if s["name"] == "takeover"]
    assert takeover["kind"] == "memcg-oom" and takeover["mode"] == "takeover"
    assert takeover["scopes"] == [{"scope": {"tree": "v1", "path": cg.rel}, "state": "taken-over", "detail": str(cg.path)}]
    assert takeover["watchdog"]["alive"] is True and os.path.exists(f"/proc/{takeover['watchdog']['pid']}")
    assert st["pid"] == d.proc.pid and st["health"] == "" and st["generation"] == 1
    text = d.oomkit("status")
    assert text.returncode == 0 and f"v1:{cg.rel} taken-over" in text.stdout, text.stdout
    assert cg.keyed("memory.oom_control")["oom_kill_disable"] == 1
    # Inspection beside the daemon: no lock taken, nothing changed (it used to exit 2).
    # (--takeover only where it means something: check validates what serve would run.)
    for command in (["check", "--takeover", str(cg.path)], ["plugins"], ["top", "--local", "--scope", str(cg.path)]):
        done = subprocess.run([sys.executable, "-m", "oomkit", *command, "-c", str(d.cfg)],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, (command, done.stderr)
    assert cg.keyed("memory.oom_control")["oom_kill_disable"] == 1
    assert d.stop() == 0
    assert cg.keyed("memory.oom_control")["oom_kill_disable"] == 0


def test_events_follow_sees_a_real_decision(memcg: Callable[..., kernel.Cgroup], serve: Callable[..., Daemon]) -> None:
    cg = memcg(limit=64 << 20)
    d = serve("--takeover", str(cg.path), config=PROTECT_SLEEP)
    follower = subprocess.Popen(
        [sys.executable, "-m", "oomkit", "events", "--follow", "--json", "-n", "0", "--socket", str(d.sock)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    try:
        wait_for(lambda: d.status()["feeds"] == 1, 30, "the follower")
        hog = cg.hog(256)
        assert hog.wait(timeout=30) == -signal.SIGKILL
        assert follower.stdout is not None
        lines: list[dict[str, Any]] = []
        reader = threading.Thread(target=lambda: lines.extend(json.loads(ln) for ln in iter(follower.stdout.readline, b"")))
        reader.start()
        wait_for(lambda: any(x["outcome"] == "killed" for x in lines), 30, "the kill on the follower")
        killed = next(x for x in lines if x["outcome"] == "killed")
        assert killed["victim"]["pid"] == hog.pid and killed["event"]["scope"] == {"tree": "v1", "path": cg.rel}
    finally:
        follower.kill()
        follower.wait()
        for stream in (follower.stdout, follower.stderr):
            if stream is not None:
                stream.close()
    brief = d.oomkit("events", "-n", "1")
    assert brief.returncode == 0 and " killed " in brief.stdout and f"pid {hog.pid} " in brief.stdout
    assert d.stop() == 0


def _top_score(d: Daemon, cg: kernel.Cgroup, pid: int) -> float:
    done = subprocess.run([sys.executable, "-m", "oomkit", "top", "--json", "--scope", str(cg.path), "--socket",
                           str(d.sock)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    rows = [json.loads(ln) for ln in done.stdout.splitlines() if ln.startswith("{")]
    return float(next(r["score"] for r in rows if r["candidate"]["pid"] == pid))


def _locked(path: Path) -> bool:
    """Does someone hold the takeover lock (``flock`` on the memcg's directory)?"""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def test_sighup_reload_changes_a_weight_keeps_the_takeover_and_refuses_a_bad_file(
    memcg: Callable[..., kernel.Cgroup], serve: Callable[..., Daemon]
) -> None:
    cg = memcg(limit=256 << 20)
    sleeper = cg.spawn(["sleep", "600"])
    try:
        # kernel_badness alone scores here, so a weight three times as big triples the score.
        alone = '\n[plugins]\ndisable = ["growth", "freed", "trigger", "burst", "preference"]\n'
        d = serve("--takeover", str(cg.path), config=PROTECT_SLEEP + alone + "\n[weights]\nkernel_badness = 1.0\n")
        before = d.status()
        dog = next(s for s in before["sources"] if s["name"] == "takeover")["watchdog"]["pid"]
        score = _top_score(d, cg, sleeper.pid)
        assert score > 0

        d.cfg.write_text(d.cfg.read_text().replace("kernel_badness = 1.0", "kernel_badness = 3.0"))
        seen: list[int] = []
        stop = threading.Event()
        watcher = threading.Thread(target=lambda: [seen.append(cg.keyed("memory.oom_control")["oom_kill_disable"])
                                                   or time.sleep(0.001) for _ in iter(stop.is_set, True)])
        watcher.start()
        d.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: d.status()["generation"] == 2, 30, "the reload")
        stop.set()
        watcher.join()
        assert seen and set(seen) == {1}, "oom_kill_disable stayed 1 through the reload"
        after = d.status()
        assert next(s for s in after["sources"] if s["name"] == "takeover")["watchdog"]["pid"] == dog
        assert _top_score(d, cg, sleeper.pid) == pytest.approx(3 * score, rel=0.05)
        assert "reloaded" in d.stderr() and "kept: " in d.stderr()
        assert _locked(cg.path), "the takeover's lock on the memcg was kept"

        d.cfg.write_text(d.cfg.read_text() + "\n[engine]\nno_such_key = 1\n")
        d.proc.send_signal(signal.SIGHUP)
        line = wait_for(lambda: [ln for ln in d.stderr().splitlines() if "reload refused" in ln], 30, "the refusal")
        assert len(line) == 1 and "no_such_key" in line[0] and "`$.engine`" in line[0]
        st = d.status()
        assert st["generation"] == 2 and st["reload_failures"] == 1
        assert cg.keyed("memory.oom_control")["oom_kill_disable"] == 1
        assert _top_score(d, cg, sleeper.pid) == pytest.approx(3 * score, rel=0.05), "the old config runs on"
        refused = d.oomkit("reload")
        assert refused.returncode == 2 and refused.stderr.startswith("oomkit: error: ") and "no_such_key" in refused.stderr
        assert d.stop() == 0
    finally:
        sleeper.kill()
        sleeper.wait()


def test_metrics_count_a_real_kill(memcg: Callable[..., kernel.Cgroup], serve: Callable[..., Daemon],
                                   tmp_path: Path) -> None:
    cg = memcg(limit=64 << 20)
    textfile = tmp_path / "oomkit.prom"
    d = serve("--takeover", str(cg.path),
              config=f'[metrics]\nlisten = "127.0.0.1:0"\ntextfile = "{textfile}"\ntextfile_interval_s = 1.0\n'
              + PROTECT_SLEEP)
    port = int(wait_for(lambda: [ln.rsplit(":", 1)[1].split("/")[0] for ln in d.stderr().splitlines()
                                 if "metrics on http://" in ln], 30, "the endpoint")[0])

    def scrape() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as answer:
            text = answer.read().decode()
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for f in text_string_to_metric_families(text) for s in f.samples}

    state = (("cgroup", cg.rel), ("source", "takeover"), ("state", "taken-over"), ("tree", "v1"))
    assert scrape()[("oomkit_cgroup_state", state)] == 1
    assert ("oomkit_kills_total", ()) in scrape() and scrape()[("oomkit_kills_total", ())] == 0
    hog = cg.hog(256)
    assert hog.wait(timeout=30) == -signal.SIGKILL
    m = wait_for(lambda: (lambda m: m if m.get(("oomkit_kills_total", ())) == 1 else None)(scrape()), 30, "the kill")
    assert m[("oomkit_decisions_total", (("outcome", "killed"),))] == 1
    assert m[("oomkit_events_total", (("kind", "oom"), ("source", "takeover")))] >= 1
    assert m[("oomkit_decision_stage_seconds_count", (("stage", "kill"),))] >= 1
    wait_for(lambda: "oomkit_kills_total 1.0" in textfile.read_text(), 30, "the textfile")
    assert d.stop() == 0


def test_sd_notify_messages_arrive_in_order(serve: Callable[..., Daemon], tmp_path: Path) -> None:
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify.sock"))
    notify.settimeout(30)
    try:
        env = {**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify.sock"), "WATCHDOG_USEC": "400000"}
        d = serve(config=PROTECT_SLEEP, env=env)
        got = [dict(ln.split("=", 1) for ln in notify.recv(4096).decode().split("\n")) for _ in range(3)]
        assert got[0]["READY"] == "1" and got[0]["MAINPID"] == str(d.proc.pid) and "sources" in got[0]["STATUS"]
        assert {"WATCHDOG": "1"} in got[1:], got

        def until(key: str) -> list[dict[str, str]]:
            out = []
            while not out or key not in out[-1]:
                out.append(dict(ln.split("=", 1) for ln in notify.recv(4096).decode().split("\n")))
            return out

        d.proc.send_signal(signal.SIGHUP)
        reload = until("RELOADING")
        reload += until("READY")
        d.proc.send_signal(signal.SIGTERM)
        stop = until("STOPPING")
        kinds = [k for m in reload + stop for k in m if k in ("RELOADING", "READY", "STOPPING")]
        assert kinds == ["RELOADING", "READY", "STOPPING"], reload + stop
        assert d.proc.wait(timeout=20) == 0
    finally:
        notify.close()


def test_a_competing_oom_daemon_is_named_once_at_start(serve: Callable[..., Daemon], tmp_path: Path) -> None:
    fake = tmp_path / "earlyoom"  # what the probe looks for: the process name
    shutil.copy("/bin/sleep", fake)
    other = subprocess.Popen([str(fake), "600"])
    try:
        d = serve(config=PROTECT_SLEEP)
        lines = wait_for(lambda: [ln for ln in d.stderr().splitlines() if "another OOM daemon runs here" in ln],
                         60, "the warning")
        time.sleep(0.5)
        assert len([ln for ln in d.stderr().splitlines() if "another OOM daemon" in ln]) == 1
        assert f"earlyoom (pid {other.pid})" in lines[0]
        assert d.stop() == 0
    finally:
        other.kill()
        other.wait()
