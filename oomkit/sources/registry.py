"""Source kinds: which :class:`~oomkit.sources.base.Source` class a ``[[sources]]`` table's
``kind`` names.

Kinds register through the ``oomkit.sources`` entry-point group, the first-party ones too
(``pyproject.toml``): the entry point's name is the kind, its value ``module:SourceClass``,
and that class's ``settings_type`` must carry the kind as its tag.  A kind may also be written
``package.module:SourceClass``, for a source that can be imported but is not installed as a
distribution (a local source, a test's); its settings keep whatever tag they declare.

Listing the kinds imports nothing; looking one up imports its module only, so an engine pays
for the sources its config names.  Entry-point metadata is read once per registry, and the
process shares one registry (:func:`default_registry`).
"""

from __future__ import annotations

import functools
import importlib
import inspect
from collections.abc import Callable, Iterable
from importlib.metadata import EntryPoint, entry_points
from typing import TYPE_CHECKING, cast, final

from ..errors import OomkitError
from .base import Source, SourceSettings

if TYPE_CHECKING:
    from ..config import Config

__all__ = [
    "ENTRY_POINT_GROUP",
    "SourceKindError",
    "SourceRegistry",
    "UnknownSourceKind",
    "default_registry",
]

ENTRY_POINT_GROUP = "oomkit.sources"


class SourceKindError(OomkitError):
    """A kind that names no usable source; the message names the kind and its entry point."""


class UnknownSourceKind(SourceKindError):
    """No entry point has this name (and it is not a ``module:Class``)."""


def _describe(ep: EntryPoint) -> str:
    dist = ep.dist
    return f"entry point {ep.name} = {ep.value}" + (f" ({dist.name} {dist.version})" if dist else "")


@final
class SourceRegistry:
    """Kinds to source classes, from a set of entry points (normally the installed ones)."""

    __slots__ = ("_entry_points", "_classes", "_by_settings", "_spelling")

    def __init__(self, entry_points: Iterable[EntryPoint]) -> None:
        self._entry_points: dict[str, list[EntryPoint]] = {}
        for ep in entry_points:
            same = self._entry_points.setdefault(ep.name, [])
            # The same registration seen twice (one distribution found on two paths) is one.
            if all(other.value != ep.value for other in same):
                same.append(ep)
        self._classes: dict[str, type[Source]] = {}
        self._by_settings: dict[type[SourceSettings], type[Source]] = {}
        self._spelling: dict[type[SourceSettings], str] = {}

    @classmethod
    def from_metadata(cls) -> SourceRegistry:
        """The kinds the installed distributions register."""
        return cls(entry_points(group=ENTRY_POINT_GROUP))

    def kinds(self) -> list[str]:
        """The registered kinds, sorted; imports nothing."""
        return sorted(self._entry_points)

    def resolve(self, kind: str) -> type[Source]:
        """The source class for ``kind``: an entry point's name or ``module:Class``.

        Raises :class:`UnknownSourceKind` or :class:`SourceKindError` (one line, naming the
        kind and the entry point).
        """
        cls = self._classes.get(kind)
        if cls is None:
            cls = self._import_spec(kind) if ":" in kind else self._load_entry_point(kind)
            self._classes[kind] = cls
            self._by_settings[cls.settings_type] = cls
            if ":" not in kind or cls.settings_type not in self._spelling:
                self._spelling[cls.settings_type] = kind
        return cls

    def kind_of(self, settings: SourceSettings) -> str:
        """The ``kind`` a config file writes for ``settings``: the entry point's name, or the
        ``module:Class`` it was found by (which its tag need not be)."""
        settings_type = type(settings)
        return self._spelling.get(settings_type) or str(settings_type.__struct_config__.tag)

    def load_all(self) -> dict[str, type[Source]]:
        """Every registered kind's class, importing each (for reference docs and checks)."""
        return {kind: self.resolve(kind) for kind in self.kinds()}

    def source_class_for(self, settings: SourceSettings) -> type[Source]:
        """The class that builds a source from ``settings`` (decoded or built in Python)."""
        settings_type = type(settings)
        cls = self._by_settings.get(settings_type)
        if cls is None:
            tag = str(settings_type.__struct_config__.tag)
            cls = self.resolve(tag)
            if cls.settings_type is not settings_type:
                raise SourceKindError(
                    f"source kind {tag!r}: {settings_type.__qualname__} is not the settings_type of"
                    f" {cls.__qualname__} ({cls.settings_type.__qualname__} is)"
                )
        return cls

    def build(self, settings: SourceSettings, config: Config) -> Source:
        """The source ``settings`` describe, as ``SourceClass(settings, config)``."""
        # Loading checked that the class takes (settings, config); its own annotation names
        # its own settings Struct, which no static type over every kind can express.
        factory = cast(Callable[[SourceSettings, "Config"], Source], self.source_class_for(settings))
        return factory(settings, config)

    def _load_entry_point(self, kind: str) -> type[Source]:
        found = self._entry_points.get(kind)
        if not found:
            raise UnknownSourceKind(f"unknown source kind {kind!r} (known: {', '.join(self.kinds()) or 'none'})")
        if len(found) > 1:
            raise SourceKindError(
                f"source kind {kind!r} is registered twice: {' and '.join(_describe(ep) for ep in found)}"
            )
        ep = found[0]
        where = f"source kind {kind!r} ({_describe(ep)})"
        try:
            obj = ep.load()
        except Exception as exc:
            raise SourceKindError(f"{where}: import failed: {type(exc).__name__}: {exc}") from None
        cls = self._checked(where, obj)
        tag = cls.settings_type.__struct_config__.tag
        if tag != kind:
            raise SourceKindError(
                f"{where}: {cls.settings_type.__qualname__} has tag {tag!r}; an entry point's name"
                f" must be its settings' tag"
            )
        return cls

    def _import_spec(self, spec: str) -> type[Source]:
        where = f"source kind {spec!r}"
        module_name, _, attr = spec.partition(":")
        try:
            obj: object = importlib.import_module(module_name)
            for part in attr.split("."):
                obj = getattr(obj, part)
        except Exception as exc:
            raise SourceKindError(f"{where}: import failed: {type(exc).__name__}: {exc}") from None
        cls = self._checked(where, obj)
        tag = str(cls.settings_type.__struct_config__.tag)
        # Its tag is what a decoded table reports as its kind: it must not be some other
        # source's registered kind.
        if tag in self._entry_points and self.resolve(tag) is not cls:
            raise SourceKindError(f"{where}: its settings' tag {tag!r} is the kind of another source")
        return cls

    def _checked(self, where: str, obj: object) -> type[Source]:
        if not (isinstance(obj, type) and issubclass(obj, Source)):
            raise SourceKindError(f"{where}: {obj!r} is not a subclass of oomkit.Source")
        settings_type = getattr(obj, "settings_type", None)
        if not (isinstance(settings_type, type) and issubclass(settings_type, SourceSettings)):
            raise SourceKindError(
                f"{where}: {obj.__qualname__} has no settings_type (a subclass of"
                f" oomkit.sources.base.SourceSettings)"
            )
        if not isinstance(settings_type.__struct_config__.tag, str):
            raise SourceKindError(f"{where}: {settings_type.__qualname__}'s tag (its kind) must be a string")
        try:
            inspect.signature(obj).bind(settings_type, None)
        except TypeError:
            name = obj.__qualname__
            raise SourceKindError(f"{where}: {name} cannot be built as {name}(settings, config)") from None
        owner = self._by_settings.get(settings_type)
        if owner is not None and owner is not obj:
            raise SourceKindError(
                f"{where}: {settings_type.__qualname__} is already the settings_type of {owner.__qualname__};"
                f" a source needs settings of its own (a subclass will do)"
            )
        return obj

    def __repr__(self) -> str:
        return f"<SourceRegistry kinds={len(self._entry_points)} loaded={len(self._classes)}>"


@functools.cache
def default_registry() -> SourceRegistry:
    """The process's registry, read from the installed distributions on first use."""
    return SourceRegistry.from_metadata()
