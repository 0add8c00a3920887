"""What the doc generators share: write the page, or check that it is current."""

from __future__ import annotations

import sys
from pathlib import Path


def write_or_check(target: Path, text: str, argv: list[str], script: str) -> int:
    """With ``--check`` in ``argv``: 1 (and a hint on stderr) if ``target`` differs from
    ``text``, else 0.  Without it: write ``text`` to ``target``."""
    if "--check" in argv:
        if not target.exists() or target.read_text() != text:
            print(f"{target} is out of date: run python docs/{script}", file=sys.stderr)
            return 1
        return 0
    target.write_text(text)
    return 0
