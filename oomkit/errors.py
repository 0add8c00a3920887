"""The exceptions oomkit raises on purpose, under one root.

Catch :class:`OomkitError` to handle every failure oomkit reports itself (a bad
configuration, a plugin that cannot load, a source that cannot start or that died); each
message is one line that names the file, key, plugin or source at fault.  Anything else that
escapes is a bug.
"""

from __future__ import annotations

__all__ = ["OomkitError", "SourceError", "describe"]


class OomkitError(Exception):
    """The root of every exception oomkit raises on purpose."""


class SourceError(OomkitError):
    """A source that could not arm its kernel interface, or that died after it had.

    The message names the source.  Before the engine is ready it refuses to start the
    engine; after, it stops the engine unless ``[engine] on_source_failure = "continue"``.
    """


def describe(exc: BaseException) -> str:
    """``Type: message`` (or the type alone) for a one-line report of ``exc``."""
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
