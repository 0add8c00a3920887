"""A source that lives outside oomkit, as a third-party one would: configured under
``[[sources]]`` as ``kind = "tests.tick_source:TickSource"``, or registered as ``tick`` by
the throwaway distributions that tests/unit/sources/test_registry.py puts on a path."""

from __future__ import annotations

from typing import Annotated

import anyio
import msgspec
from anyio.abc import TaskStatus

from oomkit import Config, Emit, Event, Source, SourceSettings


class TickSettings(SourceSettings, frozen=True, tag="tick", kw_only=True):
    """``low-memory`` events, ``count`` of them, one every ``interval_s``."""

    interval_s: Annotated[float, msgspec.Meta(ge=0.001, le=3600)] = 0.01
    """Time between two events (0.001 to 3600 s)."""
    count: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 1
    """How many events (1 to 1000); then the source idles."""


class TickSource(Source):
    settings_type = TickSettings

    def __init__(self, settings: TickSettings, config: Config) -> None:
        self.name = settings.source_name
        self.settings = settings
        self.proc = config.paths.proc  # the whole config is handed over
        self.sent = 0

    async def run(self, emit: Emit, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while self.sent < self.settings.count:
            self.sent += 1
            await emit(Event(source=self.name, kind="low-memory", values={"tick": float(self.sent)}))
            await anyio.sleep(self.settings.interval_s)
        await anyio.sleep_forever()


class OtherTick(TickSource):
    """Registered as ``tick`` too, by a second distribution: a clash."""


class Untagged(Source):
    """Has no ``settings_type``: cannot be configured."""

    def __init__(self, settings: object, config: Config) -> None:
        self.name = "untagged"

    async def run(self, emit: Emit, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
