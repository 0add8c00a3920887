"""The base of every first-party plugin's settings table."""

from __future__ import annotations

import msgspec


class Settings(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """A ``[plugins.<name>]`` table: unknown keys are errors, as everywhere in oomkit."""
