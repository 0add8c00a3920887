"""Sizes and thresholds as operators write them: ``"512M"``, ``"2GiB"``, ``"10%"``, ``4096``;
and the ranges config numbers share.

Every number in a config Struct carries a ``msgspec.Meta`` lower and upper bound, so NaN,
infinities and absurd values are refused while decoding, with the key path; sizes written as
strings are bounded here, after parsing.
"""

from __future__ import annotations

import re
from fractions import Fraction
from typing import Annotated

import msgspec

__all__ = ["MAX_SIZE", "Duration", "Interval", "Size", "parse_size", "parse_threshold", "Threshold"]

MAX_SIZE = 1 << 50
"""The largest size any setting takes (1 PiB): far above any machine's memory, and small
enough that arithmetic on it stays exact in a float."""

Size = Annotated[int, msgspec.Meta(ge=0, le=MAX_SIZE)]
"""A size in bytes given as a number: 0 to :data:`MAX_SIZE`."""

Interval = Annotated[float, msgspec.Meta(ge=0.001, le=3600.0)]
"""A poll interval, deadline or timeout in seconds: 1 ms (shorter is a busy loop) to 1 hour."""

Duration = Annotated[float, msgspec.Meta(ge=0.0, le=3600.0)]
"""A span in seconds that may be zero (a cooldown, a hold time): 0 to 1 hour."""

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)
_POWERS = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4}


def parse_size(text: str | int) -> int:
    """Bytes from ``4096``, ``"64K"``, ``"512MiB"`` or ``"2G"`` (binary multiples, always).

    At most :data:`MAX_SIZE`.  Raises ValueError with the accepted forms, so a config error
    reads on its own.
    """
    if isinstance(text, int):
        size = text
    else:
        m = _SIZE.match(text)
        if not m:
            raise ValueError(f"expected a size such as 4096, '64K', '512MiB' or '2G', got {text!r}")
        # Exact, where a float would overflow to inf on a long string of digits.
        size = int(Fraction(m.group(1)) * 1024 ** _POWERS[m.group(2).lower()])
    if size < 0:
        raise ValueError(f"a size cannot be negative, got {text!r}")
    if size > MAX_SIZE:
        raise ValueError(f"a size must be at most 1 PiB ({MAX_SIZE} bytes), got {text!r}")
    return size


class Threshold:
    """A limit given either as a percentage of a total or as an absolute size."""

    __slots__ = ("percent", "size")

    def __init__(self, percent: float | None = None, size: int | None = None) -> None:
        self.percent = percent
        self.size = size

    def bytes_of(self, total: int) -> int:
        """The threshold in bytes, for a total of ``total`` bytes."""
        if self.percent is not None:
            return int(total * self.percent / 100)
        assert self.size is not None
        return self.size

    def __repr__(self) -> str:
        return f"{self.percent:g}%" if self.percent is not None else f"{self.size}B"


def parse_threshold(text: str | int) -> Threshold:
    """``"10%"`` (0 to 100) or any size :func:`parse_size` accepts."""
    if isinstance(text, str) and text.strip().endswith("%"):
        try:
            pct = float(text.strip()[:-1])
        except ValueError:
            raise ValueError(f"expected a percentage such as '10%', got {text!r}") from None
        if not 0 <= pct <= 100:
            raise ValueError(f"a percentage must be between 0 and 100, got {text!r}")
        return Threshold(percent=pct)
    return Threshold(size=parse_size(text))
