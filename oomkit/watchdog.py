"""The takeover watchdog: enforces each OOM's deadline and restores every memcg, by itself.

A memcg with ``oom_kill_disable=1`` pauses at its limit until someone decides, so the one
guarantee that matters cannot depend on the daemon, which may be blocked in a plugin,
stopped, or dead.  The memcg-oom source (:mod:`oomkit.sources.memcg_oom`, through
:mod:`oomkit.watchdog_client`) starts this script as a child, in a session of its own,
before it changes anything::

    python -I -S .../oomkit/watchdog.py PROC JOURNAL_DIR RESCAN_MS

It holds its own ``memory.oom_control`` eventfd for every memcg it guards, so it sees each
OOM begin, follows it by reading ``under_oom``, and hands the memcg back to the kernel
(``oom_kill_disable=0``) when its deadline passes unresolved.  It puts every original value
back when the daemon goes (end of file on its socket, whatever the cause) and on SIGTERM or
SIGINT to itself, then exits; it ignores SIGHUP (the daemon's reload signal, which
``systemctl kill -s HUP`` sends to the whole unit).  Every ``RESCAN_MS`` it also reads every
guarded memcg (an OOM whose notification was lost is found then) and resets descendants that
inherited ``oom_kill_disable=1`` (:func:`reset_descendants`), so a new child's OOM is handed
to the kernel within that period even while the daemon cannot act.

It stays small: ``-I -S`` skips ``site``, and only built-in modules are imported
(``_signal`` and ``_socket`` rather than ``signal`` and ``socket``, which import ``enum``);
it allocates nothing while it waits in ``epoll_wait``.  It refuses a memcg it runs inside
(an OOM there would pause the watchdog too).

Protocol
--------
Its stdin is an ``AF_UNIX`` ``SOCK_SEQPACKET`` socket: one packet is one line of ASCII
words separated by spaces (no newline needed), at most 32 KiB; a packet may carry file
descriptors (``SCM_RIGHTS``).  Paths are percent-encoded (:func:`quote`): every byte outside
``A-Z a-z 0-9 / . _ - + @ : , = ~`` as ``%XX``.  The daemon sends:

``add ID KIND DEADLINE_MS POLL_MS ORIGINAL WRITTEN ENTRY PATH`` + one fd
    Guard the cgroup whose directory fd comes with the packet (the fd is the identity, and
    carries the daemon's ``flock``, which the watchdog thereby shares until it exits), then
    write ``WRITTEN`` (arm).  ``ID``: the daemon's number for it.  ``KIND``: ``v1`` (write
    ``memory.oom_control``'s ``oom_kill_disable``) or ``v2`` (write ``memory.high``: the
    brake, see below).  ``ORIGINAL`` is the value put back on restore, only while the file
    still holds ``WRITTEN``;
    ``ENTRY``: the journal entry (a file name in ``JOURNAL_DIR``, ``-`` for none), removed
    once the original is back.  ``PATH``: the cgroup's path in its tree.  When ``ORIGINAL``
    is 0 (v1) its descendants are scanned at once.  Replies ``ok ID`` or ``err ID REASON...``.
``arm ID``
    Take it over again after a hand-back: ``armed ID``, or ``busy ID`` while it is still
    under OOM (the kernel is deciding; ask again once it is out).  v2: only while
    ``memory.high`` still holds ``ORIGINAL`` (the value the hand-back put there), else
    ``theirs ID VALUE``: someone else wrote it meanwhile, and it stays theirs.
``release ID``
    Hand its OOM back to the kernel now, before the deadline (the engine will kill nobody):
    ``handback ID MS`` as at a deadline, or ``idle ID`` when there is no OOM of ours to
    hand back.
``scan ID RELPATH``
    Reset descendants below ``RELPATH`` (``.``: all of them); replies ``reset ID RELPATH``
    per descendant reset, then ``scanned ID COUNT``.
``drop ID``
    Put the original back, remove the entry, stop guarding: ``dropped ID``.
``forget ID``
    The cgroup is gone: remove the entry and stop guarding, writing nothing: ``forgot ID``.
``ping TOKEN``
    Replies ``pong TOKEN``.
``quit``
    Restore every cgroup (``restored ID VALUE`` each, ``kept ID VALUE`` where the file no
    longer holds ``WRITTEN``), reply ``bye quit`` and exit 0.
end of file
    The daemon is gone: restore every cgroup, say so on stderr (one line per cgroup: the
    service's log), exit 0.

Unprompted, it sends ``ready PID PROTOCOL`` once, ``handback ID MS`` when a deadline
passed (MS: how long it had been under OOM), ``gone ID`` when a cgroup was removed,
``reset ID RELPATH`` when the periodic scan reset a descendant, and ``bye REASON`` before it
exits (``quit``, ``eof``, ``SIGTERM``, ``SIGINT``).  Its packets are sent without blocking:
while the daemon is not reading (stopped) they are dropped, never waited for.

The v2 brake (``KIND`` ``v2``)
------------------------------
There is no pause on cgroup v2: ``WRITTEN`` is a ``memory.high`` some margin under
``memory.max``, where the kernel throttles the cgroup's allocators instead of killing.  An
*episode* is the cgroup stuck at its brake (:func:`stuck`: ``memory.current`` at or above
``memory.high``, and not merely page cache the kernel reclaims there by itself); it starts
when ``memory.events`` signals (``EPOLLPRI`` on its own fd of that file; a fake tree's
plain file cannot be polled, and is read at each rescan instead) and is followed by reading
the files every ``POLL_MS``.  Past its deadline the watchdog releases the brake (writes
``ORIGINAL``, only while the file holds ``WRITTEN``) and says ``handback ID MS``; the
kernel's own killer then acts at ``memory.max``.  ``arm`` re-applies it once usage is back
under ``WRITTEN`` (``busy`` before).  A ``memory.high`` that holds neither value was
written by someone else (an operator, systemd, the kubelet): the watchdog never writes it
again, says ``theirs ID VALUE`` once, and its restore keeps it.  No descendant is ever
touched: ``memory.high`` is not inherited.

Who owns which transition
-------------------------
The watchdog is the only writer of ``oom_kill_disable`` while it runs: the daemon *asks*
for a takeover (``add``) and a re-take after a hand-back (``arm``), which therefore needs a
live, responsive daemon (while it is stopped or blocked the memcg stays with the kernel);
the watchdog alone decides a hand-back (the deadline), a descendant's reset and the restore
on exit.  So no two writes can race.  Only when the watchdog is dead does the daemon write,
to restore before it starts a new one; one that misses a deadline or stops answering pings
is killed by the daemon first, so that too happens with a single writer.
"""

import os
import sys
import time

import _signal  # type: ignore[import-not-found]  # no stub: signal's own imports enum
import _socket
import fcntl
import select

PROTOCOL = 1
REFUSED = 2
MAX_PACKET = 32768
MAX_FDS = 4
MAX_SCAN = 100_000
"""Directories looked at per descendant scan at most (a runaway tree must not stall us)."""

OOM_CONTROL = "memory.oom_control"
HIGH = "memory.high"
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_SAFE = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789/._-+@:,=~")


def quote(path: str) -> str:
    """``path`` as one protocol word."""
    return "".join(chr(b) if b in _SAFE else "%%%02X" % b for b in os.fsencode(path))


def unquote(word: str) -> str:
    raw = word.encode("ascii")
    out = bytearray()
    i = 0
    while i < len(raw):
        if raw[i] == 0x25 and i + 2 < len(raw):
            out.append(int(raw[i + 1 : i + 3], 16))
            i += 3
        else:
            out.append(raw[i])
            i += 1
    return os.fsdecode(bytes(out))


def inside(own: str, guarded: str) -> bool:
    """Is the cgroup ``own`` the cgroup ``guarded`` or one of its descendants?"""
    return guarded == "/" or own == guarded or own.startswith(guarded.rstrip("/") + "/")


def own_memcg(proc: str) -> "str | None":
    with open(proc + "/self/cgroup", "rb") as f:
        for line in f:
            _, controllers, path = line.rstrip(b"\n").split(b":", 2)
            if b"memory" in controllers.split(b","):
                return os.fsdecode(path)
    return None


def own_v2(proc: str) -> "str | None":
    """This process's cgroup v2 path (the ``0::`` line), or None."""
    with open(proc + "/self/cgroup", "rb") as f:
        for line in f:
            num, controllers, path = line.rstrip(b"\n").split(b":", 2)
            if num == b"0" and not controllers:
                return os.fsdecode(path)
    return None


def read_oom(fd: int) -> "tuple[int, int]":
    """``(oom_kill_disable, under_oom)`` of the cgroup whose directory is ``fd``."""
    cfd = os.open(OOM_CONTROL, os.O_RDONLY | os.O_CLOEXEC, dir_fd=fd)
    try:
        raw = os.read(cfd, 4096)
    finally:
        os.close(cfd)
    disable = under = 0
    for line in raw.split(b"\n"):
        key, _, value = line.partition(b" ")
        if key == b"oom_kill_disable" and value:
            disable = int(value)
        elif key == b"under_oom" and value:
            under = int(value)
    return disable, under


def write_at(fd: int, name: str, value: str) -> None:
    wfd = os.open(name, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC, dir_fd=fd)
    try:
        os.write(wfd, value.encode() + b"\n")
    finally:
        os.close(wfd)


def write_value(fd: int, name: str, value: str) -> None:
    """Write a single-value file (``memory.high``) whole: ``O_TRUNC``, so a fake tree's
    plain file holds the value as the kernel's would (kernfs ignores it)."""
    wfd = os.open(name, os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC, dir_fd=fd)
    try:
        os.write(wfd, value.encode() + b"\n")
    finally:
        os.close(wfd)


def read_at(fd: int, name: str, size: int = 8192) -> bytes:
    rfd = os.open(name, os.O_RDONLY | os.O_CLOEXEC, dir_fd=fd)
    try:
        return os.read(rfd, size)
    finally:
        os.close(rfd)


def _bytes(raw: bytes) -> int:
    """A v2 size file's value: bytes, or -1 for ``max``."""
    text = raw.strip()
    return -1 if text == b"max" else int(text)


def read_brake(fd: int) -> "tuple[str, int, int, int, int]":
    """``(memory.high as written, high, max, current, file_lru)`` of the v2 cgroup whose
    directory is ``fd``; a size is -1 for ``max``.  ``file_lru`` is the page cache on the
    file LRU lists (``active_file + inactive_file`` of ``memory.stat``): what reclaim at
    ``memory.high`` frees without swap; shmem and anonymous memory sit on the anon lists."""
    raw = read_at(fd, HIGH, 64).strip()
    high = _bytes(raw)
    limit = _bytes(read_at(fd, "memory.max", 64))
    current = _bytes(read_at(fd, "memory.current", 64))
    lru = 0
    for line in read_at(fd, "memory.stat", 65536).split(b"\n"):
        key, _, value = line.partition(b" ")
        if key in (b"active_file", b"inactive_file") and value.strip().isdigit():
            lru += int(value)
    return raw.decode("ascii", "replace"), high, limit, current, lru


STUCK_DIP = 1 << 20
"""How far under ``memory.high`` usage may go and a cgroup already stuck at its brake still
count as stuck: the kernel reclaims over ``high`` in batches of a few hundred KiB (a charge
batch of 64 pages, reclaim's 32), so a stuck cgroup dips that far under it whenever reclaim
trims the little page cache it has left (112 KiB under, with 4 KiB of cache, measured in the
guest); a cgroup a MiB under has been relieved."""


def stuck(high: int, current: int, file_lru: int, slack: int, *, held: bool = False) -> bool:
    """Is a v2 cgroup stuck at its brake?  Usage at or above ``memory.high``, and still
    within ``slack`` (the brake's margin) of it without its page cache: a cgroup full of
    cache is trimmed by the kernel at ``memory.high`` with nobody throttled for long, and
    must neither wake the engine nor start a deadline.  Shared with the brake source.

    ``held``: the cgroup was stuck at the last look (an episode, a deadline running).  It
    stays stuck through reclaim's dips under ``memory.high`` (:data:`STUCK_DIP`, at most
    ``slack``): a dip that ended the episode would restart its deadline, and a cgroup that
    dips at every look would be held at its brake with no deadline ever reached."""
    floor = high - min(STUCK_DIP, slack) if held else high
    return high >= 0 and current >= floor and current - file_lru >= high - slack


def reset_descendants(top: int, start: str = ".", skip: "frozenset[tuple[int, int]] | set[tuple[int, int]]" = frozenset()) -> "tuple[list[str], list[str]]":
    """Write 0 to ``oom_kill_disable`` of every memcg below ``top`` (a directory fd) that is
    at 1: the value a child inherits from a memcg under takeover, which would pause its own
    OOMs with nobody watching (their notification does not reach the parent's eventfd).

    ``start`` limits the walk to one subtree (relative to ``top``, included itself).  Left
    alone, with their subtrees: the ``(st_dev, st_ino)`` in ``skip`` (memcgs taken over in
    their own right) and memcgs whose lock another oomkit holds (tried without waiting, held
    only for the write).  Returns ``(reset, failed)``: paths relative to ``top``, and
    ``"path: reason"`` for writes refused.  Shared by the watchdog, the daemon's own restore
    and ``oomkit restore``.
    """
    reset: "list[str]" = []
    failed: "list[str]" = []
    todo = [("" if start in ("", ".") else start.strip("/"))]
    seen = 0
    while todo and seen < MAX_SCAN:
        rel = todo.pop()
        seen += 1
        try:
            fd = os.open(rel, _DIR, dir_fd=top) if rel else os.dup(top)
        except OSError:
            continue  # removed meanwhile, or not a directory
        try:
            if rel:
                st = os.fstat(fd)
                if (st.st_dev, st.st_ino) in skip:
                    continue
                try:
                    disable, _ = read_oom(fd)
                except OSError:
                    disable = 0  # not a memcg (a fake tree's plain directory): look below it
                if disable:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except BlockingIOError:
                        continue  # another oomkit holds it: its subtree is its business
                    try:
                        write_at(fd, OOM_CONTROL, "0")
                        reset.append(rel)
                    except OSError as exc:
                        failed.append(rel + ": " + (exc.strerror or str(exc)))
            with os.scandir(fd) as it:
                for e in it:
                    if e.is_dir(follow_symlinks=False):
                        todo.append(rel + "/" + e.name if rel else e.name)
        except OSError:
            pass
        finally:
            os.close(fd)
    return reset, failed


def what(g: "Guard") -> str:
    return "memory.high" if g.kind == "v2" else "oom_kill_disable"


class Guard:
    """One guarded cgroup."""

    __slots__ = (
        "id", "fd", "key", "cfd", "efd", "original", "written", "deadline", "poll", "entry", "path", "since", "unsent",
        "kind", "braked", "theirs", "slack",
    )

    def __init__(self, gid: str, fd: int, original: str, written: str, deadline: float, poll: float, entry: str, path: str,
                 kind: str = "v1") -> None:
        self.id = gid
        self.kind = kind
        self.braked = True
        """v2: ``memory.high`` should hold ``written`` (False after a hand-back, until ``arm``)."""
        self.theirs = False
        """v2: someone else wrote ``memory.high``: never written again, kept on restore."""
        self.slack = 0
        """v2: the brake's margin (``memory.max`` minus ``written`` when added)."""
        self.fd = fd
        st = os.fstat(fd)
        self.key = (st.st_dev, st.st_ino)
        self.cfd = -1
        self.efd = -1
        self.original = original
        self.written = written
        self.deadline = deadline
        self.poll = poll
        self.entry = entry
        self.path = path
        self.since = -1.0
        """When this OOM was first seen while armed (-1: not under OOM, or not ours)."""
        self.unsent = ""
        """A ``handback`` the daemon must hear, sent again until its socket takes it."""

    def close(self) -> None:
        for fd in dict.fromkeys((self.efd, self.cfd, self.fd)):  # v2: efd is cfd
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self.efd = self.cfd = self.fd = -1


class Watchdog:
    def __init__(self, proc: str, journal: str, rescan: float) -> None:
        self.proc = proc
        self.journal = journal
        self.rescan = rescan
        self.sock = _socket.socket(fileno=0)
        self.ep = select.epoll()
        self.guards: "dict[str, Guard]" = {}
        self.by_efd: "dict[int, Guard]" = {}
        self.stop = ""
        self.dropped = 0
        self.next_rescan = 0.0
        self.waiting_out = False

    # --- talking to the daemon ----------------------------------------------------------------

    def say(self, line: str) -> bool:
        try:
            self.sock.send(line.encode(), _socket.MSG_DONTWAIT | _socket.MSG_NOSIGNAL)
        except OSError:
            self.dropped += 1  # not reading (stopped), or gone: never wait for it
            return False
        return True

    def log(self, line: str) -> None:
        try:
            os.write(2, ("oomkit watchdog (pid %d): %s\n" % (os.getpid(), line)).encode(errors="replace"))
        except OSError:
            pass

    def commands(self) -> bool:
        """Handle every packet queued; False at end of file."""
        while True:
            try:
                data, anc, _, _ = self.sock.recvmsg(
                    MAX_PACKET, _socket.CMSG_SPACE(MAX_FDS * 4), _socket.MSG_DONTWAIT | _socket.MSG_CMSG_CLOEXEC
                )
            except (BlockingIOError, InterruptedError):
                return True
            except OSError:
                return False
            fds: "list[int]" = []
            for level, kind, payload in anc:
                if level == _socket.SOL_SOCKET and kind == _socket.SCM_RIGHTS:
                    n = len(payload) - len(payload) % 4
                    fds.extend(int.from_bytes(payload[i : i + 4], sys.byteorder) for i in range(0, n, 4))
            if not data and not fds:
                return False
            words = data.decode("ascii", "replace").split()
            try:
                self.command(words, fds)
            except Exception as exc:
                for fd in fds:
                    os.close(fd)
                self.say("err %s %s: %s" % (words[1] if len(words) > 1 else "-", type(exc).__name__, exc))

    def command(self, words: "list[str]", fds: "list[int]") -> None:
        verb = words[0] if words else ""
        args = words[1:]
        if verb == "add" and len(args) == 8 and len(fds) == 1:
            self.add(args, fds[0])
            return
        for fd in fds:
            os.close(fd)
        if verb == "ping" and len(args) == 1:
            self.say("pong " + args[0])
        elif verb == "quit" and not args:
            self.stop = "quit"
        elif verb in ("arm", "release", "drop", "forget") and len(args) == 1 or verb == "scan" and len(args) == 2:
            g = self.guards.get(args[0])
            if g is None and verb in ("drop", "forget"):
                self.say(("dropped " if verb == "drop" else "forgot ") + args[0])  # gone already
            elif g is None:
                self.say("err %s not guarded" % args[0])
            elif verb == "arm":
                self.arm(g)
            elif verb == "release":
                self.check(g, time.monotonic(), release=True)
            elif verb == "drop":
                self.restore(g)
                self.end(g)
                self.say("dropped " + g.id)
            elif verb == "forget":
                self.end(g)
                self.say("forgot " + g.id)
            else:
                self.scan(g, unquote(args[1]), always=True)
        else:
            self.say("err %s bad command: %s" % (args[0] if args else "-", " ".join(words)[:200]))

    # --- guarding -----------------------------------------------------------------------------

    def add(self, args: "list[str]", fd: int) -> None:
        gid, kind, deadline_ms, poll_ms, original, written, entry, path = args
        if kind not in ("v1", "v2"):
            os.close(fd)
            self.say("err %s unknown kind %s (this watchdog guards v1 memcgs and v2 brakes)" % (gid, kind))
            return
        if gid in self.guards:
            os.close(fd)
            self.say("err %s already in use" % gid)
            return
        g = Guard(gid, fd, original, written, int(deadline_ms) / 1000, int(poll_ms) / 1000, entry, unquote(path), kind)
        own = own_memcg(self.proc) if kind == "v1" else own_v2(self.proc)
        if own is not None and inside(own, g.path):
            g.close()
            self.say("err %s refused: the watchdog runs in cgroup %s, inside guarded %s" % (gid, quote(own), quote(g.path)))
            return
        twin = next((o for o in self.guards.values() if o.key == g.key), None)
        if twin is not None:
            g.close()
            self.say("err %s already guarded as %s" % (gid, twin.id))
            return
        try:
            if kind == "v2":
                self.add_brake(g)
            else:
                g.cfd = os.open(OOM_CONTROL, os.O_RDONLY | os.O_CLOEXEC, dir_fd=fd)
                g.efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
                write_at(fd, "cgroup.event_control", "%d %d" % (g.efd, g.cfd))
                write_at(fd, OOM_CONTROL, written)
                self.ep.register(g.efd, select.EPOLLIN)
        except (OSError, ValueError) as exc:
            g.close()
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            self.say("err %s cannot take it over: %s" % (gid, why))
            return
        self.guards[gid] = g
        if g.efd >= 0:
            self.by_efd[g.efd] = g
        self.say("ok " + gid)
        self.check(g, time.monotonic())
        if g.id in self.guards:
            self.scan(g, ".", always=False)

    def add_brake(self, g: Guard) -> None:
        """Check the v2 cgroup, open its ``memory.events`` for ``EPOLLPRI``, write the brake."""
        now, _, limit, _, _ = read_brake(g.fd)
        if now != g.original and now != g.written:
            raise ValueError("memory.high is %s, not the %s journalled" % (now, g.original))
        if limit < 0 or not g.written.isdigit() or int(g.written) >= limit:
            raise ValueError("memory.max is %s: the brake %s is not under it" % ("max" if limit < 0 else limit, g.written))
        g.slack = limit - int(g.written)
        g.cfd = os.open("memory.events", os.O_RDONLY | os.O_CLOEXEC, dir_fd=g.fd)
        try:
            self.ep.register(g.cfd, select.EPOLLPRI)
            g.efd = g.cfd
        except OSError:
            pass  # a fake tree's plain file: found at each rescan instead
        write_value(g.fd, HIGH, g.written)

    def arm(self, g: Guard) -> None:
        if g.kind == "v2":
            self.arm_brake(g)
            return
        try:
            _, under = read_oom(g.fd)
            if under:
                self.say("busy " + g.id)
                return
            write_at(g.fd, OOM_CONTROL, g.written)
        except OSError as exc:
            self.say("err %s cannot take it over again: %s" % (g.id, exc.strerror or exc))
            return
        g.since = -1.0
        self.say("armed " + g.id)

    def arm_brake(self, g: Guard) -> None:
        if g.theirs:
            self.say("theirs %s -" % g.id)
            return
        try:
            raw, _, _, current, _ = read_brake(g.fd)
            if raw not in (g.original, g.written):
                self.their_value(g, raw)
                return
            if g.written.isdigit() and current >= int(g.written):
                self.say("busy " + g.id)
                return
            if raw != g.written:
                write_value(g.fd, HIGH, g.written)
        except (OSError, ValueError) as exc:
            self.say("err %s cannot brake it again: %s" % (g.id, getattr(exc, "strerror", None) or exc))
            return
        g.braked = True
        g.since = -1.0
        self.say("armed " + g.id)

    def their_value(self, g: Guard, raw: str) -> None:
        """``memory.high`` holds a value oomkit did not write: it is theirs from now on."""
        g.theirs = True
        g.since = -1.0
        self.say("theirs %s %s" % (g.id, quote(raw) or "-"))

    def check_brake(self, g: Guard, now: float, release: bool) -> None:
        if g.efd >= 0:
            try:
                os.pread(g.efd, 4096, 0)  # re-arms kernfs' EPOLLPRI
            except OSError:
                pass
        try:
            raw, high, _, current, lru = read_brake(g.fd)
        except (OSError, ValueError):
            if self.exists(g):
                return  # not a size where one must be: read again at the next look
            self.end(g)
            self.say("gone " + g.id)
            return
        if not g.theirs and raw != (g.written if g.braked else g.original):
            self.their_value(g, raw)
        if g.theirs or not g.braked or not stuck(high, current, lru, g.slack, held=g.since >= 0):
            g.since = -1.0  # over, or not ours to release
            if release:
                self.say("idle " + g.id)
            return
        if g.since < 0:
            g.since = now
        if release or now - g.since >= g.deadline:
            try:
                write_value(g.fd, HIGH, g.original)
            except OSError as exc:
                self.log("%s: cannot release the brake: %s" % (g.path, exc.strerror))
                g.since = now
                return
            g.braked = False
            line = "handback %s %d" % (g.id, (now - g.since) * 1000)
            g.unsent = "" if self.say(line) else line
            g.since = -1.0

    @staticmethod
    def exists(g: Guard) -> bool:
        try:
            os.stat("cgroup.procs", dir_fd=g.fd)
        except FileNotFoundError:
            return False
        except OSError:
            return True
        return True

    def check(self, g: Guard, now: float, *, release: bool = False) -> None:
        """Read the cgroup; start, follow or end its deadline (``release``: end it at once)."""
        if g.kind == "v2":
            self.check_brake(g, now, release)
            return
        try:
            disable, under = read_oom(g.fd)
        except OSError:
            self.end(g)
            self.say("gone " + g.id)
            return
        if not (under and str(disable) == g.written):
            g.since = -1.0  # resolved, or not ours now (handed back: the kernel decides)
            if release:
                self.say("idle " + g.id)
            return
        if g.since < 0:
            g.since = now
        if release or now - g.since >= g.deadline:
            try:
                write_at(g.fd, OOM_CONTROL, "0")
            except OSError as exc:
                self.log("%s: cannot hand it back to the kernel: %s" % (g.path, exc.strerror))
                g.since = now  # tried again one deadline later, not at every poll
                return
            line = "handback %s %d" % (g.id, (now - g.since) * 1000)
            # The daemon takes the memcg back only once it has heard this: keep it until sent.
            g.unsent = "" if self.say(line) else line
            g.since = -1.0

    def scan(self, g: Guard, start: str, always: bool) -> None:
        count = 0
        if g.kind == "v1" and g.original == "0":
            skip = {o.key for o in self.guards.values()}
            reset, failed = reset_descendants(g.fd, start, skip)
            for rel in reset:
                self.say("reset %s %s" % (g.id, quote(rel)))
            for line in failed:
                self.log("%s: cannot reset a descendant: %s" % (g.path, line))
            count = len(reset)
        if always:
            self.say("scanned %s %d" % (g.id, count))

    def restore(self, g: Guard) -> "tuple[str, str]":
        """Put the original back if the file still holds our value: ``(before, after)``."""
        if g.kind == "v2":
            try:
                before = read_at(g.fd, HIGH, 64).strip().decode("ascii", "replace")
            except OSError:
                return "gone", "gone"
            after = before
            if before == g.written and not g.theirs and g.original != g.written:
                try:
                    write_value(g.fd, HIGH, g.original)
                    after = g.original
                except OSError as exc:
                    self.log("%s: cannot restore memory.high=%s: %s" % (g.path, g.original, exc.strerror))
            return before, after
        try:
            disable, _ = read_oom(g.fd)
        except OSError:
            return "gone", "gone"
        before = after = str(disable)
        if before == g.written and g.original != g.written:
            try:
                write_at(g.fd, OOM_CONTROL, g.original)
                after = g.original
            except OSError as exc:
                self.log("%s: cannot restore oom_kill_disable=%s: %s" % (g.path, g.original, exc.strerror))
        self.scan(g, ".", always=False)
        return before, after

    def end(self, g: Guard) -> None:
        if g.entry != "-":
            try:
                os.unlink(self.journal + "/" + g.entry)
            except OSError:
                pass
        if g.efd >= 0:
            try:
                self.ep.unregister(g.efd)
            except OSError:
                pass
            self.by_efd.pop(g.efd, None)
        self.guards.pop(g.id, None)
        g.close()

    def restore_all(self) -> None:
        for g in list(self.guards.values()):
            before, after = self.restore(g)
            if self.stop == "quit":
                self.say(("restored %s %s" if after == g.original else "kept %s %s") % (g.id, after))
            elif after == "gone":
                self.log("%s was removed meanwhile: nothing to restore" % g.path)
            elif after == g.original:
                change = before + " -> " + after if before != after else "is " + after
                self.log("%s (%s): %s %s, the original" % (g.path, self.stop, what(g), change))
            else:
                self.log("%s (%s): %s is %s, not oomkit's %s: left alone" % (g.path, self.stop, what(g), after, g.written))
            self.end(g)

    # --- the loop -----------------------------------------------------------------------------

    def timeout(self, now: float) -> float:
        t = self.next_rescan - now
        for g in self.guards.values():
            if g.since >= 0:
                t = min(t, g.poll, g.since + g.deadline - now)
        return max(0.0, t)

    def run(self) -> int:
        _signal.signal(_signal.SIGHUP, _signal.SIG_IGN)
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        _signal.set_wakeup_fd(w)
        for signum in (_signal.SIGTERM, _signal.SIGINT):
            _signal.signal(signum, self.on_signal)
        try:
            # Lowering it to -1000 needs CAP_SYS_RESOURCE; without it the watchdog stays as
            # killable as any small process (and the engine never picks it: its daemon
            # declares it).
            fd = os.open(self.proc + "/self/oom_score_adj", os.O_WRONLY)
            try:
                os.write(fd, b"-1000")
            finally:
                os.close(fd)
        except OSError:
            pass
        self.ep.register(0, select.EPOLLIN)
        self.ep.register(r, select.EPOLLIN)
        self.next_rescan = time.monotonic() + self.rescan
        self.say("ready %d %d" % (os.getpid(), PROTOCOL))
        while not self.stop:
            try:
                ready = self.ep.poll(self.timeout(time.monotonic()))
                now = time.monotonic()
                for fd, _ in ready:
                    if fd == 0:
                        if not self.commands():
                            self.stop = self.stop or "eof"
                    elif fd == r:
                        try:
                            os.read(r, 64)
                        except OSError:
                            pass
                    else:
                        g = self.by_efd.get(fd)
                        if g is not None:
                            if g.kind == "v1":
                                try:
                                    os.read(fd, 8)
                                except OSError:
                                    pass
                            self.check(g, now)
                for g in [g for g in self.guards.values() if g.since >= 0]:
                    self.check(g, now)
                unsent = [g for g in self.guards.values() if g.unsent]
                for g in unsent:
                    if self.say(g.unsent):
                        g.unsent = ""
                # Woken when the daemon's queue has room again, not by a timer.
                out = any(g.unsent for g in unsent)
                if out != self.waiting_out:
                    self.ep.modify(0, select.EPOLLIN | (select.EPOLLOUT if out else 0))
                    self.waiting_out = out
                if now >= self.next_rescan:
                    self.next_rescan = now + self.rescan
                    for g in list(self.guards.values()):
                        self.check(g, now)
                        if g.id in self.guards:
                            self.scan(g, ".", always=False)
            except Exception as exc:  # a bug here must not end the guard: say it, go on
                self.log("error: %s: %s" % (type(exc).__name__, exc))
                time.sleep(0.01)
        self.restore_all()
        self.say("bye " + self.stop)
        return 0

    def on_signal(self, signum: int, frame: object) -> None:
        self.stop = "SIGTERM" if signum == _signal.SIGTERM else "SIGINT"


def main(argv: "list[str]") -> int:
    if len(argv) != 4:
        os.write(2, b"usage: watchdog.py PROC JOURNAL_DIR RESCAN_MS (started by oomkit, not by hand)\n")
        return REFUSED
    return Watchdog(argv[1], argv[2], max(1, int(argv[3])) / 1000).run()


if __name__ == "__main__":
    sys.exit(main(sys.argv))
