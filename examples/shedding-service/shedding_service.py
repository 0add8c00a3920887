"""An HTTP service that gives memory back under pressure instead of having a process killed.

It embeds oomkit's engine, with its default policy, in its own event loop:

* the ``memcg-threshold`` source watches the service's *own* v1 memory cgroup and reports an
  event each time usage crosses ``threshold`` (a share of the memcg's limit), upwards and
  back down; ``ActOnThreshold`` makes an upward crossing a decision (by default the engine
  decides only on OOMs and low memory) and a downward one the end of shedding;
* the decision ranks the memcg's processes (the service's background ``--workers``; the
  service itself is oomkit's own process, which the core never kills) and, before killing
  the one chosen, asks the service's :class:`oomkit.Rescuer` to release memory: it drops the
  cache and answers new work with ``503`` and ``Retry-After``.  The engine re-checks the
  threshold: usage is back under it, so the decision ends ``rescued`` and nobody dies.  Only
  if the rescue does not bring usage under the threshold (or passes its deadline) is the
  worker killed.  Once usage is back under the threshold (and at least ``Retry-After`` has
  passed, the wait clients were told) the service takes work again.

A service never takes over its own memcg (its own threads would be paused at the limit with
the rest); ``oomkit serve`` with a ``memcg-oom`` source is for a supervisor.

The work: ``GET /item/{key}`` computes a value of ``item_bytes`` for ``key`` and caches it, so
every new key costs memory until the cache is dropped.  ``GET /stats`` shows the state,
``GET /decisions`` the engine's recent decisions (with their rescue attempts).

    python shedding_service.py --threshold 60%          # prints "ready port N" once serving
    python shedding_service.py --without-oomkit         # the same service, unprotected
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import logging
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

import msgspec

from oomkit import Config, Engine, Event, Rescuer, Scope, Source, hookimpl
from oomkit.config import config_from_dict
from oomkit.procfs import own_cgroup

log = logging.getLogger("shedding_service")

try:
    _malloc_trim: Any = ctypes.CDLL(None).malloc_trim
except AttributeError:  # not glibc
    _malloc_trim = None


class Shedder:
    """The service's memory state: its cache, and whether it takes new work."""

    def __init__(self, *, retry_after_s: int = 1, hold_s: float | None = None) -> None:
        self.cache: dict[str, bytes] = {}
        self.retry_after_s = retry_after_s
        self.hold_s = float(retry_after_s) if hold_s is None else hold_s
        """After a drop, shed for at least this long: clients were told to come back later."""
        self.pressure = False
        self.drops = 0
        self.shed = 0
        self._hold_until = 0.0

    @property
    def accepting(self) -> bool:
        return not self.pressure and time.monotonic() >= self._hold_until

    def rising(self) -> None:
        self.pressure = True
        self._hold_until = time.monotonic() + self.hold_s

    def release(self, event: Event) -> int:
        """The rescue: shed new work and drop the cache; returns the bytes dropped."""
        log.warning("asked to release memory (%s in %s): dropping the cache, shedding load", event.kind, event.scope)
        freed = sum(len(v) for v in self.cache.values())
        self.rising()
        self.drop_cache()
        return freed

    def cleared(self) -> None:
        self.pressure = False

    def drop_cache(self) -> None:
        self.cache.clear()
        self.drops += 1
        # Freed blocks stay in the C allocator's heap unless it hands them back: without
        # this, the memcg's usage (what the kernel kills by) would barely move.
        if _malloc_trim is not None:
            _malloc_trim(0)

    def stats(self) -> dict[str, Any]:
        return {
            "cached_bytes": sum(len(v) for v in self.cache.values()),
            "accepting": self.accepting,
            "pressure": self.pressure,
            "drops": self.drops,
            "shed": self.shed,
        }


class ActOnThreshold:
    """Threshold crossings of the service's own memcg: upwards, decide (the rescue comes
    first); downwards, stop shedding.  ``tryfirst`` because ``should_act`` stops at the
    first answer: no other plugin may swallow these events."""

    name = "act_on_threshold"

    def __init__(self, shedder: Shedder, scope: Scope) -> None:
        self.shedder = shedder
        self.scope = scope

    @hookimpl(tryfirst=True)
    def oomkit_should_act(self, event: Event) -> bool | None:
        if event.kind != "threshold" or event.scope != self.scope:
            return None
        if event.values.get("direction", 0.0) > 0:
            return True
        log.warning("memory back under %d bytes", event.values.get("threshold_bytes", 0))
        self.shedder.cleared()
        return False


def own_scope(proc: str = "/proc") -> Scope:
    """The v1 memory cgroup this process runs in."""
    path = own_cgroup(proc, "memory")
    if path is None:
        raise RuntimeError("not in a cgroup v1 memory cgroup: no memcg thresholds to watch")
    return Scope("v1", path)


def engine_config(scope: Scope, threshold: str) -> Config:
    """Only the threshold source, on our own memcg; decoded as a TOML file would be."""
    source = {"kind": "memcg-threshold", "name": "own-memcg", "cgroups": [scope.path], "thresholds": [threshold]}
    return config_from_dict({"sources": [source]}, "<shedding_service>")


def build_app(
    shedder: Shedder, engine: Engine | None, *, item_bytes: int = 1 << 20, ready: Callable[[], None] | None = None
) -> Starlette:
    """The ASGI app; its lifespan runs ``engine`` (None: the service without oomkit), and
    calls ``ready`` once the engine's source is armed."""

    async def item(request: Request) -> Response:
        if not shedder.accepting:
            shedder.shed += 1
            return Response(
                "shedding load: memory pressure\n",
                status_code=503,
                headers={"Retry-After": str(shedder.retry_after_s)},
            )
        key = request.path_params["key"]
        value = shedder.cache.get(key)
        if value is None:
            value = shedder.cache[key] = key.encode()[:1] * item_bytes  # stands in for real work
        return JSONResponse({"key": key, "bytes": len(value)})

    async def stats(request: Request) -> Response:
        return JSONResponse(shedder.stats())

    async def decisions(request: Request) -> Response:
        recent = [] if engine is None else msgspec.to_builtins(list(engine.recent))
        return JSONResponse(recent)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with contextlib.AsyncExitStack() as stack:
            if engine is not None:
                await stack.enter_async_context(engine)  # returns once the threshold is armed
            if ready is not None:
                ready()
            yield

    return Starlette(routes=[Route("/item/{key}", item), Route("/stats", stats), Route("/decisions", decisions)], lifespan=lifespan)


def make_engine(shedder: Shedder, scope: Scope, config: Config, sources: Iterable[Source] = (), *,
                autoload: bool = True) -> Engine:
    """The engine with oomkit's default policy (``autoload``) and the service's two plugins."""
    plugins = [ActOnThreshold(shedder, scope), Rescuer(shedder.release, name="shed-cache", scopes=[scope])]
    return Engine(config, plugins=plugins, sources=sources, autoload=autoload)


WORKER = "import sys, time; held = b'x' * (int(sys.argv[1]) << 20); time.sleep(1e9)"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0, help="0: any free port (printed)")
    ap.add_argument("--threshold", default="60%", help="usage that starts shedding: size or share of the limit")
    ap.add_argument("--item-bytes", type=int, default=1 << 20)
    ap.add_argument("--retry-after", type=int, default=1, help="seconds, sent with every 503")
    ap.add_argument("--hold", type=float, help="shed at least this long after a drop (default: --retry-after)")
    ap.add_argument("--loop", choices=["asyncio", "uvloop"], default="uvloop")
    ap.add_argument("--without-oomkit", action="store_true", help="no engine: the kernel decides")
    ap.add_argument("--workers", type=int, default=1, help="background worker processes (killable if a rescue fails)")
    ap.add_argument("--worker-mib", type=int, default=8, help="memory each worker holds")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(name)s: %(message)s")

    shedder = Shedder(retry_after_s=args.retry_after, hold_s=args.hold)
    engine = None
    if not args.without_oomkit:
        scope = own_scope()
        engine = make_engine(shedder, scope, engine_config(scope, args.threshold))
    # IPPROTO_TCP spelled out: asyncio turns Nagle's algorithm off only on sockets that say
    # so (socket.create_server leaves proto 0), and with it on, every response waits ~40 ms
    # for the client's delayed ACK.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))
    sock.listen(128)
    port = sock.getsockname()[1]

    def ready() -> None:
        # The socket already listens, so connections made from now on wait for uvicorn.
        print(f"ready port {port} oomkit {'off' if engine is None else 'on'}", flush=True)

    workers = [subprocess.Popen([sys.executable, "-c", WORKER, str(args.worker_mib)]) for _ in range(args.workers)]
    app = build_app(shedder, engine, item_bytes=args.item_bytes, ready=ready)
    try:
        uvicorn.Server(uvicorn.Config(app, loop=args.loop, log_level="warning", lifespan="on")).run(sockets=[sock])
    finally:
        for w in workers:
            w.kill()
            w.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
