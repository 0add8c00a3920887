"""oomkit's own hook caller.

pluggy's caller never awaits (an ``async def`` implementation returns a coroutine, which is
not ``None``, so under ``firstresult`` it would always "win") and it stops at the first
exception, so one broken plugin would silence every plugin after it.  This caller walks
``get_hookimpls()`` itself, in pluggy's call order (last registered first, ``tryfirst`` and
``trylast`` honoured), isolates every implementation, awaits async ones under a deadline and
applies first-result only after awaiting.

Each call may pass a ``check`` (from :mod:`oomkit.hookresults`) that every non-None result
goes through inside the same isolation, so a malformed result counts as raising, and an
iterator that raises while it is consumed counts as its implementation raising.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Literal, cast, final

import anyio
import pluggy

from .errors import describe
from .events import PluginError
from .hookresults import BadResult, Note
from .hookthreads import Job

__all__ = ["LOG_INTERVAL_S", "Caller", "Check", "ErrorLog"]

log = logging.getLogger("oomkit.hooks")

ErrorSink = Callable[[PluginError], None]

Check = Callable[[Any, Note], Any]
"""Turns one implementation's non-None result into what the engine uses, or raises."""

LOG_INTERVAL_S = 60.0
"""At most one log line per plugin and hook in this many seconds; the rest are counted."""


def _describe(exc: BaseException) -> str:
    if isinstance(exc, BadResult):
        return str(exc)  # already says what the result was and why it is refused
    return describe(exc)


@final
class ErrorLog:
    """Logs plugin failures, at most one line per plugin and hook per ``interval_s``.

    A plugin that fails on every decision (or on every event, for ``should_act``) would
    otherwise write a line per event of a storm.  The first failure is logged at once; the
    ones within the next interval are counted, and the next line says how many there were.
    Counting them in the engine's stats and decisions is not this class's job: those always
    see every failure.
    """

    __slots__ = ("_interval_ns", "_held")

    def __init__(self, interval_s: float = LOG_INTERVAL_S) -> None:
        self._interval_ns = int(interval_s * 1e9)
        # (plugin, hook) -> [time the next line may be written, failures not logged since]
        self._held: dict[tuple[str, str], list[int]] = {}

    def __call__(self, err: PluginError) -> None:
        self.line((err.plugin, err.hook), f"plugin {err.plugin} failed in {err.hook}: {err.error}")

    def line(self, key: tuple[str, str], text: str) -> None:
        """Log ``text`` unless a line for ``key`` was logged within the interval."""
        now = time.monotonic_ns()
        held = self._held.get(key)
        if held is not None and now < held[0]:
            held[1] += 1
            return
        quiet = held[1] if held is not None else 0
        log.warning("%s%s", text, f" ({quiet} more like it since the last line, not logged)" if quiet else "")
        self._held[key] = [now + self._interval_ns, 0]

    def flush(self) -> None:
        """Log how many lines are still held back (the engine calls this when it stops)."""
        for (who, what), held in self._held.items():
            if held[1]:
                log.warning("%s in %s: %d more like the last line logged, not logged one by one", who, what, held[1])
                held[1] = 0


Busy = dict[int, tuple[str, str, int]]
"""Async calls under way: a key of the call's own to ``(plugin, hook, monotonic ns begun)``."""

Report = tuple[PluginError, bool]
"""A failure seen in a worker thread, and whether it gets a log line (a skip does not)."""


@final
class Caller:
    """Calls one plugin manager's hooks, reporting every failure to ``on_error``.

    A caller made by :meth:`in_job` runs in a hook worker thread
    (:mod:`oomkit.hookthreads`): it tells the job which implementation it is in, skips an
    implementation whose earlier call is stuck, and keeps its failures in ``reports``
    instead of reporting them, so that only the run of a job that finished is reported, on
    the loop, by :meth:`replay`.
    """

    __slots__ = ("_pm", "_on_error", "_log", "_job", "_busy", "reports")

    def __init__(
        self, pm: pluggy.PluginManager, on_error: ErrorSink, errlog: ErrorLog, busy: Busy | None = None
    ) -> None:
        self._pm = pm
        self._on_error = on_error
        self._log = errlog
        self._job: Job[Any] | None = None
        self._busy = busy
        self.reports: list[Report] = []

    def in_job(self, job: Job[Any]) -> Caller:
        """A caller for one run of ``job``, in its worker (see the class docstring)."""
        mine = Caller(self._pm, self._on_error, self._log, self._busy)
        mine._job = job
        return mine

    def replay(self, reports: list[Report]) -> None:
        """Report, on the loop, what a job's caller kept."""
        for err, logged in reports:
            if logged:
                self.report(err)
            else:
                self._on_error(err)

    def _impls(self, hook: str) -> list[pluggy.HookImpl]:
        # get_hookimpls() lists in registration order with trylast first and tryfirst last;
        # the call order is the reverse.
        impls: list[pluggy.HookImpl] = getattr(self._pm.hook, hook).get_hookimpls()
        impls.reverse()
        return impls

    def _fail(self, impl: pluggy.HookImpl, hook: str, exc: BaseException) -> None:
        self.report(PluginError(plugin=impl.plugin_name, hook=hook, error=_describe(exc)))

    def report(self, err: PluginError) -> None:
        """Log (rate-limited) and count a plugin failure."""
        if self._job is not None:
            self.reports.append((err, True))
            return
        self._log(err)
        self._on_error(err)

    def _call(self, impl: pluggy.HookImpl, hook: str, kwargs: dict[str, Any], check: Check | None) -> tuple[bool, Any]:
        """Run one implementation (and its result's check); ``(False, None)`` if either raised."""
        job = self._job
        if job is not None:
            skipped = job.enter(impl.plugin_name, hook)
            if skipped is not None:
                # Said once when it stalled (hookthreads); the decision still records it.
                self.reports.append((PluginError(plugin=impl.plugin_name, hook=hook, error=skipped), False))
                return False, None
        try:
            res = impl.function(*[kwargs[a] for a in impl.argnames])
            if res is not None and check is not None:
                res = check(res, self._noter(impl, hook))
        except Exception as exc:
            self._fail(impl, hook, exc)
            return False, None
        finally:
            if job is not None:
                job.leave()
        return True, res

    def _noter(self, impl: pluggy.HookImpl, hook: str) -> Note:
        def note(problem: str) -> None:
            self.report(PluginError(plugin=impl.plugin_name, hook=hook, error=problem))

        return note

    def each(self, hook: str, kwargs: dict[str, Any], check: Check | None = None) -> list[tuple[str, Any]]:
        """Call every implementation; return ``(plugin name, result)`` for non-None results."""
        return self.each_with_failures(hook, kwargs, check)[0]

    def each_with_failures(
        self, hook: str, kwargs: dict[str, Any], check: Check | None = None
    ) -> tuple[list[tuple[str, Any]], list[str]]:
        """Like :meth:`each`, and also name the plugins that raised (vetoes need them)."""
        out: list[tuple[str, Any]] = []
        failed: list[str] = []
        for impl in self._impls(hook):
            ok, res = self._call(impl, hook, kwargs, check)
            if not ok:
                failed.append(impl.plugin_name)
            elif res is not None:
                out.append((impl.plugin_name, res))
        return out, failed

    def first(self, hook: str, kwargs: dict[str, Any], check: Check | None = None) -> tuple[str, Any] | None:
        """Call implementations until one returns non-None; raising counts as None."""
        for impl in self._impls(hook):
            ok, res = self._call(impl, hook, kwargs, check)
            if ok and res is not None:
                return impl.plugin_name, res
        return None

    def implementations(self, hook: str) -> list[pluggy.HookImpl]:
        """A hook's implementations in call order, for a caller that drives them one by one
        (:meth:`attempt`)."""
        return self._impls(hook)

    async def attempt(
        self, impl: pluggy.HookImpl, hook: str, kwargs: dict[str, Any], timeout: float, check: Check | None = None
    ) -> tuple[Literal["ok", "timeout", "error"], Any]:
        """Await one async implementation under ``timeout``; a failure is reported as usual
        and returned as ``timeout`` or ``error`` (with its description) instead of a result."""
        busy, key = self._busy, id(kwargs)
        if busy is not None:
            # Still listed if it never ends (it shields itself from cancellation): a daemon
            # that gives up waiting at shutdown says whom it waited for.
            busy[key] = (impl.plugin_name, hook, time.monotonic_ns())
        try:
            with anyio.fail_after(timeout):
                # Registration checked that this hook's implementations are coroutines.
                pending = cast(Awaitable[Any], impl.function(*[kwargs[a] for a in impl.argnames]))
                res = await pending
            if res is not None and check is not None:
                res = check(res, self._noter(impl, hook))
            return "ok", res
        except TimeoutError:
            exc: Exception = TimeoutError(f"no answer within {timeout:g} s")
            status: Literal["timeout", "error"] = "timeout"
        except Exception as raised:
            exc, status = raised, "error"
        finally:
            if busy is not None:
                busy.pop(key, None)
        self._fail(impl, hook, exc)
        return status, _describe(exc)

    async def _await_one(
        self, impl: pluggy.HookImpl, hook: str, kwargs: dict[str, Any], timeout: float, check: Check | None
    ) -> tuple[bool, Any]:
        status, res = await self.attempt(impl, hook, kwargs, timeout, check)
        return (True, res) if status == "ok" else (False, None)

    async def each_async(self, hook: str, kwargs: dict[str, Any], timeout: float) -> None:
        """Await every implementation in turn, each under ``timeout`` seconds."""
        for impl in self._impls(hook):
            await self._await_one(impl, hook, kwargs, timeout, None)

    async def first_async(
        self, hook: str, kwargs: dict[str, Any], timeout: float, check: Check | None = None
    ) -> tuple[str, Any] | None:
        """Await implementations in turn until one returns non-None (and passes ``check``)."""
        for impl in self._impls(hook):
            ok, res = await self._await_one(impl, hook, kwargs, timeout, check)
            if ok and res is not None:
                return impl.plugin_name, res
        return None
