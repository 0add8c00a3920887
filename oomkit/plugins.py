"""Finding, loading, checking and registering plugins.

Each engine owns one :class:`pluggy.PluginManager`.  Plugins come from three places, in this
order: the ``oomkit`` entry-point group (first-party plugins included, unless autoloading is
off), the ``[plugins] load`` list of ``module:object`` names, and the objects an embedding
program passes to :class:`~oomkit.Engine`.  A loaded class is instantiated with no
arguments, so each engine has its own plugin state; a module or an instance is registered
as it is.

**Which name a plugin goes by** (the name ``[plugins.<name>]``, ``[weights]``,
``disable`` and every report use): for an entry point, the entry point's name, whatever the
class's ``name`` says; for a ``load`` string, the class's (or module's) ``name`` attribute,
else the string itself; for an object passed to the engine, the name of a ``(name, plugin)``
pair, else its ``name`` attribute, else ``module:Class``.  An object passed to the engine
under the name of an installed entry point replaces it (so ``oomkit.testing.decide(MyPlugin())``
tests your instance even once your package is installed); any other clash is an error that
says where the first one came from.
"""

from __future__ import annotations

import importlib
import inspect
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any

import pluggy

from . import hookspecs
from .errors import OomkitError

__all__ = [
    "AUTOLOAD_ENV",
    "ENTRY_POINT_GROUP",
    "PluginLoadError",
    "hookimpl",
    "load_plugins",
    "make_manager",
]

ENTRY_POINT_GROUP = "oomkit"
AUTOLOAD_ENV = "OOMKIT_DISABLE_PLUGIN_AUTOLOAD"
"""Set to any non-empty value to skip the entry-point group (as pytest's
``PYTEST_DISABLE_PLUGIN_AUTOLOAD``); plugins named in the config still load."""

hookimpl = pluggy.HookimplMarker("oomkit")

RESERVED_NAME = "oomkit"
"""No plugin may be called this: the core's vetoes (:mod:`oomkit.safety`) are, so a veto by
``oomkit`` in a ranking always means the core's."""


class PluginLoadError(OomkitError):
    """A plugin that cannot be used; the message names the plugin, the hook and the problem."""


@dataclass(slots=True)
class LoadReport:
    """What :func:`load_plugins` did, for ``oomkit plugins``."""

    loaded: dict[str, str] = field(default_factory=dict)
    """Plugin name to where it came from (``entry point mod:obj (dist 1.0)``, ``config``...)."""
    disabled: list[str] = field(default_factory=list)


def make_manager() -> pluggy.PluginManager:
    pm = pluggy.PluginManager("oomkit")
    pm.add_hookspecs(hookspecs)
    return pm


def autoload_enabled() -> bool:
    return not os.environ.get(AUTOLOAD_ENV)


def _instantiate(name: str, obj: Any) -> Any:
    if inspect.isclass(obj):
        try:
            return obj()
        except Exception as exc:
            raise PluginLoadError(
                f"plugin {name!r}: creating {obj.__qualname__}() failed: {type(exc).__name__}: {exc}"
            ) from None
    return obj


def _import_spec(spec: str) -> Any:
    module_name, _, attr = spec.partition(":")
    module = importlib.import_module(module_name)
    obj: Any = module
    for part in filter(None, attr.split(".")):
        obj = getattr(obj, part)
    return obj


def _check(pm: pluggy.PluginManager, name: str, plugin: Any) -> None:
    """Refuse what pluggy lets through: wrong sync/async kind, wrappers, unmarked hooks."""
    for caller in pm.get_hookcallers(plugin) or ():
        for impl in caller.get_hookimpls():
            if impl.plugin is not plugin:
                continue
            hook = caller.name
            if impl.hookwrapper or impl.wrapper:
                raise PluginLoadError(f"plugin {name!r}, hook {hook}: hook wrappers are not supported")
            is_async = inspect.iscoroutinefunction(impl.function)
            if hook in hookspecs.ASYNC_HOOKS and not is_async:
                raise PluginLoadError(f"plugin {name!r}, hook {hook}: must be `async def`")
            if hook not in hookspecs.ASYNC_HOOKS and is_async:
                raise PluginLoadError(f"plugin {name!r}, hook {hook}: must be a plain `def`, not `async def`")
    marked = {c.name for c in pm.get_hookcallers(plugin) or ()}
    for attr in dir(plugin):
        if attr.startswith("oomkit_") and attr not in marked and callable(getattr(plugin, attr, None)):
            raise PluginLoadError(
                f"plugin {name!r}, hook {attr}: not marked with @oomkit.hookimpl, so it would never run"
            )


def register(pm: pluggy.PluginManager, name: str, plugin: Any, first: str | None = None) -> None:
    """Register one plugin object under ``name``, checked; raises :class:`PluginLoadError`.

    ``first`` says where an already registered plugin of that name came from, for the error.
    """
    if name == RESERVED_NAME:
        raise PluginLoadError(
            f"plugin {name!r}: the name is reserved for the core's own protections (its vetoes carry it)"
        )
    if pm.has_plugin(name):
        where = f" (from {first})" if first else ""
        raise PluginLoadError(
            f"plugin {name!r}: a plugin of that name is already registered{where}; give one of them another"
            f" `name`, or disable the other with [plugins] disable = [{name!r}]"
        )
    try:
        pm.register(plugin, name=name)
    except pluggy.PluginValidationError as exc:
        # pluggy's message spans several lines; keep the first (it names plugin and hook) and
        # the last (what is wrong) on one line.
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        detail = lines[0] if len(lines) == 1 else f"{lines[0]} {lines[-1]}"
        raise PluginLoadError(f"plugin {name!r}: {detail}") from None
    except ValueError as exc:
        raise PluginLoadError(f"plugin {name!r}: {exc}") from None
    try:
        _check(pm, name, plugin)
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        pm.unregister(plugin)
        raise PluginLoadError(f"plugin {name!r}: {str(exc).splitlines()[0]}") from None
    except PluginLoadError:
        pm.unregister(plugin)
        raise


def _plugin_name(obj: Any) -> str:
    name = getattr(obj, "name", None)
    if isinstance(name, str) and name:
        return name
    if inspect.ismodule(obj):
        return obj.__name__
    cls = obj if inspect.isclass(obj) else type(obj)
    return f"{cls.__module__}:{cls.__qualname__}"


def load_plugins(
    pm: pluggy.PluginManager,
    *,
    autoload: bool,
    load: Sequence[str] = (),
    disable: Sequence[str] = (),
    extra: Iterable[Any] = (),
) -> LoadReport:
    """Load and register plugins from every place; see the module docstring for the order.

    ``extra`` holds plugin objects or ``(name, object)`` pairs from an embedding program.
    Every name in ``disable`` must match a plugin that would otherwise load.
    """
    report = LoadReport()
    blocked = set(disable)
    seen: set[str] = set()

    if autoload:
        for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
            seen.add(ep.name)
            if ep.name in blocked:
                report.disabled.append(ep.name)
                continue
            try:
                obj = ep.load()
            except Exception as exc:
                raise PluginLoadError(
                    f"plugin {ep.name!r} (entry point {ep.value}): import failed: "
                    f"{type(exc).__name__}: {exc}"
                ) from None
            register(pm, ep.name, _instantiate(ep.name, obj))
            dist = ep.dist
            where = f"entry point {ep.value}" + (f" ({dist.name} {dist.version})" if dist else "")
            report.loaded[ep.name] = where

    for spec in load:
        seen.add(spec)
        if spec in blocked:
            report.disabled.append(spec)
            continue
        try:
            obj = _import_spec(spec)
        except Exception as exc:
            raise PluginLoadError(
                f"plugin {spec!r} (from [plugins] load): import failed: {type(exc).__name__}: {exc}"
            ) from None
        # A plugin that declares a `name` is known by it (its settings live under
        # [plugins.<name>]); `disable` accepts that name or the load string.
        declared = getattr(obj, "name", None)
        name = declared if isinstance(declared, str) and declared else spec
        seen.add(name)
        if name in blocked:
            report.disabled.append(name)
            continue
        register(pm, name, _instantiate(name, obj), report.loaded.get(name))
        report.loaded[name] = f"config [plugins] load {spec}"

    for item in extra:
        name, obj = item if isinstance(item, tuple) else (_plugin_name(item), item)
        seen.add(name)
        if name in blocked:
            report.disabled.append(name)
            continue
        where = "passed to Engine(plugins=...)"
        first = report.loaded.get(name)
        if first is not None and first.startswith("entry point"):
            # The instance a test (or an embedding program) hands over is the one it means:
            # it replaces the installed copy of the same plugin instead of clashing with it.
            pm.unregister(name=name)
            where += f", replacing the {first}"
        register(pm, name, _instantiate(name, obj))
        report.loaded[name] = where

    unknown = sorted(blocked - seen)
    if unknown:
        raise PluginLoadError(
            f"cannot disable unknown plugin(s) {', '.join(map(repr, unknown))}; "
            f"known: {', '.join(sorted(seen)) or 'none'}"
        )
    return report
