"""The control socket: ask a running daemon what it is doing, follow its decisions, reload it.

A Unix stream socket (``[control] path``, by default ``control.sock`` in ``[paths]
run_dir``), created with mode ``[control] mode`` (0600) and renamed into place only once it
has that mode.  Every connection's peer credentials (``SO_PEERCRED``) are checked before a
byte is read: root, the daemon's own uid, ``allow_uids`` and members of ``allow_gids`` by
primary gid.  Protocol version 1, documented in docs/operations.md:

* one request per connection, one JSON object on one line (at most ``max_request_bytes``):
  ``{"v": 1, "op": "status"}``; ops ``status``, ``decisions``, ``rank``, ``history``,
  ``follow``, ``reload``;
* one answer line: ``{"v": 1, "ok": true, "result": ...}`` or ``{"v": 1, "ok": false,
  "error": "one line"}``; ``follow`` then sends one line per decision, ``{"v": 1,
  "decision": {...}}``, and ``{"v": 1, "dropped": N}`` when this client was too slow for N.

Bounded everywhere: ``max_clients`` connections at once (more get an error), requests
bounded in size and in time (``client_timeout_s``), answers written under the same deadline
(a client that does not read is disconnected), a follower's backlog bounded
(``follow_buffer``; the engine drops for that follower only, never waits).  Requests are
served on the engine's event loop; a ``rank`` runs the candidate, score and veto hooks there
as a decision does (and costs what one costs); a ``history`` copies at most
``MAX_HISTORY_PROCESSES`` processes' samples, thinned to ``points`` each, out of the memory
history (no read of /proc: what the sampler has).

:class:`Client` is the blocking client the ``oomkit`` command uses.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import stat
import struct
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any, Annotated, Final, Literal, Protocol

import anyio
import msgspec
from anyio.abc import SocketAttribute, SocketListener, SocketStream, TaskStatus
from anyio.streams.buffered import BufferedByteReceiveStream

from .config import Config, ControlConfig
from .errors import OomkitError
from .events import Decision, Event, Ranked, Scope
from .history import History
from .status import EngineStatus

__all__ = [
    "MAX_HISTORY_PROCESSES",
    "PROTOCOL",
    "Client",
    "ControlError",
    "ControlServer",
    "Request",
    "socket_path",
]

log = logging.getLogger("oomkit.control")

PROTOCOL: Final = 1
"""The protocol version; a change that an old client would misread gets a new number."""

MAX_HISTORY_PROCESSES: Final = 256
"""The most processes one ``history`` answer holds, whatever ``limit`` asks."""

_PEERCRED = struct.Struct("3i")


class ControlError(OomkitError):
    """The daemon refused a request, or cannot be reached; the message says which."""


class Request(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """One request line."""

    v: int
    op: Literal["status", "decisions", "rank", "history", "follow", "reload"]
    limit: Annotated[int, msgspec.Meta(ge=1, le=1 << 16)] = 20
    """``decisions``: how many (the newest); ``rank``: how many candidates; ``history``:
    how many processes (at most ``MAX_HISTORY_PROCESSES``); ``follow``: how many recent
    decisions to send before the new ones (with ``replay``)."""
    replay: bool = False
    """``follow``: send the last ``limit`` decisions first."""
    max_ranking: Annotated[int, msgspec.Meta(ge=0, le=1 << 16)] = 10
    """``decisions`` and ``follow``: ranked candidates kept per decision."""
    scope: Scope = Scope()
    """``rank`` and ``history``: where (``{"tree": "v1", "path": "/a"}``; the default is the
    whole system)."""
    pids: Annotated[tuple[Annotated[int, msgspec.Meta(ge=1, le=4194304)], ...], msgspec.Meta(max_length=256)] = ()
    """``history``: these processes first (those the history tracks), then the largest."""
    points: Annotated[int, msgspec.Meta(ge=1, le=1024)] = 32
    """``history``: samples per process at most (evenly thinned over the window)."""


def _ok(result: Any) -> dict[str, Any]:
    return {"v": PROTOCOL, "ok": True, "result": result}


def _error(text: str) -> dict[str, Any]:
    return {"v": PROTOCOL, "ok": False, "error": text}


def socket_path(config: Config) -> Path:
    return Path(config.control.path or os.path.join(config.paths.run_dir, "control.sock"))


class Controlled(Protocol):
    """What the server needs of an engine."""

    def snapshot(self) -> EngineStatus: ...

    def recent_decisions(self) -> tuple[Decision, ...]: ...

    async def rank_async(self, event: Event) -> Sequence[Ranked]: ...

    @property
    def history(self) -> History: ...

    def decisions(self, buffer: int) -> AbstractAsyncContextManager[Feed]: ...


class Feed(Protocol):
    """A subscription to decisions: iterate it; ``dropped`` counts what did not fit."""

    dropped: int

    def __aiter__(self) -> AsyncIterator[Decision]: ...


def _cut(d: Decision, n: int) -> Decision:
    return msgspec.structs.replace(d, ranking=d.ranking[:n]) if len(d.ranking) > n else d


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(Request)


class ControlServer:
    """Serves the control socket for one engine; run :meth:`run` in the daemon's task group.

    ``reload`` is the daemon's: it re-reads the configuration and returns a line saying what
    changed, or raises with a line saying why not.
    """

    def __init__(
        self, config: ControlConfig, path: Path, engine: Controlled, reload: Callable[[], Awaitable[str]]
    ) -> None:
        self.config = config
        self.path = path
        self._engine = engine
        self._reload = reload
        self._clients = anyio.Semaphore(config.max_clients)
        self._inode: tuple[int, int] | None = None
        self.served = 0
        self.refused = 0
        """Connections refused: by peer credentials, for too many clients, or a bad request."""

    def __repr__(self) -> str:
        return f"<ControlServer {str(self.path)!r} served={self.served} refused={self.refused}>"

    # --- the socket file ---------------------------------------------------------------------

    def _bind(self) -> socket.socket:
        """A listening socket at :attr:`path` with the configured mode from its first moment.

        Raises :class:`ControlError` when another daemon answers there."""
        if _answers(self.path):
            raise ControlError(f"{self.path}: another oomkit serves its control socket here")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}")
        tmp.unlink(missing_ok=True)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.bind(str(tmp))
            os.chmod(tmp, self.config.mode)
            sock.listen(self.config.max_clients)
            os.replace(tmp, self.path)  # what was there answered nobody: a dead daemon's
        except BaseException:
            sock.close()
            tmp.unlink(missing_ok=True)
            raise
        st = self.path.stat()
        self._inode = (st.st_dev, st.st_ino)
        return sock

    def _unlink(self) -> None:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return
        if (st.st_dev, st.st_ino) == self._inode:  # never another daemon's socket
            self.path.unlink()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        listener = await SocketListener.from_socket(self._bind())
        log.info("control socket %s (mode %o)", self.path, self.config.mode)
        try:
            async with listener:
                task_status.started()
                await listener.serve(self._connection)
        finally:
            self._unlink()

    # --- one connection ----------------------------------------------------------------------

    def _allowed(self, client: SocketStream) -> str:
        """Why this peer may not ask, or ""."""
        raw = client.extra(SocketAttribute.raw_socket)
        pid, uid, gid = _PEERCRED.unpack(raw.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
        c = self.config
        if uid == 0 or uid == os.geteuid() or uid in c.allow_uids or gid in c.allow_gids:
            return ""
        return f"uid {uid} (pid {pid}) may not use this socket (root and [control] allow_uids/allow_gids may)"

    async def _send(self, client: SocketStream, answer: dict[str, Any]) -> None:
        with anyio.fail_after(self.config.client_timeout_s):
            await client.send(_encoder.encode(answer) + b"\n")

    async def _refuse(self, client: SocketStream, why: str) -> None:
        self.refused += 1
        await self._send(client, _error(why))
        # Read what the client sent before closing: closing a Unix socket with unread data
        # resets the connection, and the client would never read why it was refused.
        with anyio.move_on_after(1.0):
            drained = 0
            while drained < self.config.max_request_bytes:
                drained += len(await client.receive())

    async def _connection(self, client: SocketStream) -> None:
        async with client:
            try:
                why = self._allowed(client)
                if why:
                    log.warning("control: refused %s", why)
                    await self._refuse(client, why)
                    return
                if self._clients.value == 0:
                    await self._refuse(client, f"busy: {self.config.max_clients} clients already")
                    return
                async with self._clients:
                    await self._serve(client)
            except (TimeoutError, anyio.BrokenResourceError, anyio.ClosedResourceError, anyio.EndOfStream, OSError):
                pass  # a client that went away or was too slow: nothing to tell it

    async def _serve(self, client: SocketStream) -> None:
        reader = BufferedByteReceiveStream(client)
        try:
            with anyio.fail_after(self.config.client_timeout_s):
                line = await reader.receive_until(b"\n", self.config.max_request_bytes)
        except anyio.DelimiterNotFound:
            self.refused += 1
            await self._send(client, _error(f"request longer than {self.config.max_request_bytes} bytes"))
            return
        except anyio.IncompleteRead:
            return
        try:
            request = _decoder.decode(line)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            self.refused += 1
            await self._send(client, _error(f"bad request: {exc}"))
            return
        if request.v != PROTOCOL:
            self.refused += 1
            await self._send(client, _error(f"protocol {request.v} is not spoken here (this daemon speaks {PROTOCOL})"))
            return
        self.served += 1
        if request.op == "follow":
            await self._follow(client, reader, request)
            return
        try:
            result = await self._answer(request)
        except OomkitError as exc:
            await self._send(client, _error(str(exc)))
            return
        await self._send(client, _ok(result))

    async def _answer(self, request: Request) -> Any:
        engine = self._engine
        if request.op == "status":
            return engine.snapshot()
        if request.op == "decisions":
            return [_cut(d, request.max_ranking) for d in engine.recent_decisions()[-request.limit:]]
        if request.op == "rank":
            return (await engine.rank_async(Event(source="control", kind="oom", scope=request.scope)))[: request.limit]
        if request.op == "history":
            return engine.history.scope_history(request.scope, pids=request.pids,
                                                limit=min(request.limit, MAX_HISTORY_PROCESSES), points=request.points)
        assert request.op == "reload"
        return await self._reload()

    async def _follow(self, client: SocketStream, reader: BufferedByteReceiveStream, request: Request) -> None:
        async with self._engine.decisions(self.config.follow_buffer) as feed, anyio.create_task_group() as tg:
            await self._send(client, _ok({"following": True}))

            async def hang_up() -> None:
                # A follower sends nothing more: any byte, or the end, means it is done.
                try:
                    await reader.receive()
                except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                    pass
                tg.cancel_scope.cancel()

            tg.start_soon(hang_up)
            try:
                if request.replay:
                    for d in self._engine.recent_decisions()[-request.limit:]:
                        await self._send(client, {"v": PROTOCOL, "decision": _cut(d, request.max_ranking)})
                told = 0
                async for d in feed:
                    if feed.dropped > told:
                        await self._send(client, {"v": PROTOCOL, "dropped": feed.dropped - told})
                        told = feed.dropped
                    await self._send(client, {"v": PROTOCOL, "decision": _cut(d, request.max_ranking)})
            except (TimeoutError, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                pass  # too slow to read, or gone: this follower ends, the engine never waited
            tg.cancel_scope.cancel()


def _answers(path: Path) -> bool:
    """Whether a live daemon accepts connections on ``path``."""
    try:
        if not stat.S_ISSOCK(path.lstat().st_mode):
            raise ControlError(f"{path}: exists and is not a socket")
    except FileNotFoundError:
        return False
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        probe.settimeout(1.0)
        probe.connect(str(path))
    except OSError as exc:
        if exc.errno in (errno.ECONNREFUSED, errno.ENOENT):
            return False
        raise ControlError(f"{path}: cannot tell whether a daemon serves here: {exc.strerror}") from None
    finally:
        probe.close()
    return True


# --- the client ---------------------------------------------------------------------------------

_answer_decoder = msgspec.json.Decoder(dict[str, Any])


class Client:
    """A blocking client for one request (what ``oomkit status``, ``events`` and ``reload`` use)."""

    def __init__(self, path: Path, timeout: float = 30.0) -> None:
        self.path = path
        self.timeout = timeout

    def available(self) -> bool:
        """Whether a daemon answers on the socket (a missing or dead socket: False)."""
        try:
            return _answers(self.path)
        except ControlError:
            return False

    def _open(self, request: Request) -> tuple[socket.socket, Iterator[dict[str, Any]]]:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.settimeout(self.timeout)
        try:
            sock.connect(str(self.path))
        except FileNotFoundError:
            sock.close()
            raise ControlError(f"{self.path}: no control socket (is oomkit serve running?)") from None
        except ConnectionRefusedError:
            sock.close()
            raise ControlError(f"{self.path}: nobody answers (oomkit serve is not running)") from None
        except PermissionError:
            sock.close()
            raise ControlError(f"{self.path}: permission denied (the control socket is root's)") from None
        try:
            sock.sendall(_encoder.encode(request) + b"\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused before the request arrived: the refusal is waiting to be read
        return sock, _lines(sock)

    def request(self, request: Request) -> Any:
        """Send ``request``; return its result, or raise :class:`ControlError` with the daemon's words."""
        sock, lines = self._open(request)
        with sock:
            answer = next(lines, None)
        return _result(self.path, answer)

    def follow(self, request: Request) -> Iterator[dict[str, Any]]:
        """Every line after the first answer of a ``follow`` request, as it comes."""
        sock, lines = self._open(request)
        with sock:
            sock.settimeout(None)
            _result(self.path, next(lines, None))
            yield from lines


def _result(path: Path, answer: dict[str, Any] | None) -> Any:
    if answer is None:
        raise ControlError(f"{path}: the daemon hung up without an answer")
    if not answer.get("ok", False):
        raise ControlError(str(answer.get("error", "refused")))
    return answer.get("result")


def _lines(sock: socket.socket) -> Iterator[dict[str, Any]]:
    buf = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return
        buf += chunk
        *whole, buf = buf.split(b"\n")
        for line in whole:
            if line:
                yield _answer_decoder.decode(line)
