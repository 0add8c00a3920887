"""Which scopes a plugin's ``scopes``-like setting names: globs over the scope as it prints."""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable

__all__ = ["matches"]


def matches(scope: str, patterns: Iterable[str]) -> bool:
    """``v2:/jobs/a`` against ``("v2:/jobs/*",)``; ``system`` is the machine's scope."""
    return any(fnmatch.fnmatchcase(scope, p) for p in patterns)
