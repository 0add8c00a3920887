"""oomkit's own hook caller.

pluggy's caller never awaits (an ``async def`` implementation returns a coroutine, which is
not ``None``, so under ``firstresult`` it would always "win") and it stops at the first
exception, so one broken plugin would silence every plugin after it.  This caller walks
``get_hookimpls()`` itself, in pluggy's call order (last registered first, ``tryfirst`` and
``trylast`` honoured), isolates every implementation, awaits async ones under a deadline and
applies first-result only after awaiting.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any, cast, final

import anyio
import pluggy

from .errors import describe
from .events import PluginError

__all__ = ["Caller"]

log = logging.getLogger("oomkit.hooks")

ErrorSink = Callable[[PluginError], None]


@final
class Caller:
    """Calls one plugin manager's hooks, reporting every failure to ``on_error``."""

    __slots__ = ("_pm", "_on_error")

    def __init__(self, pm: pluggy.PluginManager, on_error: ErrorSink) -> None:
        self._pm = pm
        self._on_error = on_error

    def _impls(self, hook: str) -> list[pluggy.HookImpl]:
        # get_hookimpls() lists in registration order with trylast first and tryfirst last;
        # the call order is the reverse.
        impls: list[pluggy.HookImpl] = getattr(self._pm.hook, hook).get_hookimpls()
        impls.reverse()
        return impls

    def _fail(self, impl: pluggy.HookImpl, hook: str, exc: BaseException) -> None:
        self.report(PluginError(plugin=impl.plugin_name, hook=hook, error=describe(exc)))

    def report(self, err: PluginError) -> None:
        """Log and count a plugin failure found outside the call (a malformed result)."""
        log.warning("plugin %s failed in %s: %s", err.plugin, err.hook, err.error)
        self._on_error(err)

    def each(self, hook: str, kwargs: dict[str, Any]) -> list[tuple[str, Any]]:
        """Call every implementation; return ``(plugin name, result)`` for non-None results."""
        return self.each_with_failures(hook, kwargs)[0]

    def each_with_failures(
        self, hook: str, kwargs: dict[str, Any]
    ) -> tuple[list[tuple[str, Any]], list[str]]:
        """Like :meth:`each`, and also name the plugins that raised (vetoes need them)."""
        out: list[tuple[str, Any]] = []
        failed: list[str] = []
        for impl in self._impls(hook):
            try:
                res = impl.function(*[kwargs[a] for a in impl.argnames])
            except Exception as exc:
                self._fail(impl, hook, exc)
                failed.append(impl.plugin_name)
                continue
            if res is not None:
                out.append((impl.plugin_name, res))
        return out, failed

    def first(self, hook: str, kwargs: dict[str, Any]) -> tuple[str, Any] | None:
        """Call implementations until one returns non-None; raising counts as None."""
        for impl in self._impls(hook):
            try:
                res = impl.function(*[kwargs[a] for a in impl.argnames])
            except Exception as exc:
                self._fail(impl, hook, exc)
                continue
            if res is not None:
                return impl.plugin_name, res
        return None

    async def _await_one(
        self, impl: pluggy.HookImpl, hook: str, kwargs: dict[str, Any], timeout: float
    ) -> tuple[bool, Any]:
        try:
            with anyio.fail_after(timeout):
                # Registration checked that this hook's implementations are coroutines.
                pending = cast(Awaitable[Any], impl.function(*[kwargs[a] for a in impl.argnames]))
                return True, await pending
        except TimeoutError:
            self._fail(impl, hook, TimeoutError(f"no answer within {timeout:g} s"))
        except Exception as exc:
            self._fail(impl, hook, exc)
        return False, None

    async def each_async(self, hook: str, kwargs: dict[str, Any], timeout: float) -> None:
        """Await every implementation in turn, each under ``timeout`` seconds."""
        for impl in self._impls(hook):
            await self._await_one(impl, hook, kwargs, timeout)

    async def first_async(
        self, hook: str, kwargs: dict[str, Any], timeout: float
    ) -> tuple[str, Any] | None:
        """Await implementations in turn until one returns non-None."""
        for impl in self._impls(hook):
            ok, res = await self._await_one(impl, hook, kwargs, timeout)
            if ok and res is not None:
                return impl.plugin_name, res
        return None
