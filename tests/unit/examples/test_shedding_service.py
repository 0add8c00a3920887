"""examples/shedding-service in-process, on asyncio, uvloop and trio: the engine runs in the
app's lifespan, threshold events (from a FakeSource here; from the real memcg-threshold
source in tests/integration/test_shedding_service.py) drive the shedding."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import anyio
import httpx
import pytest

from oomkit import Config, Engine, Event, Scope
from oomkit.testing import FakeSource

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "examples" / "shedding-service"))
import shedding_service as svc  # noqa: E402

pytestmark = pytest.mark.anyio

OWN = Scope("v1", "/services/web")
KiB = 1 << 10


@dataclass
class Running:
    client: httpx.AsyncClient
    shedder: svc.Shedder
    source: FakeSource
    engine: Engine

    def threshold(self, direction: float, scope: Scope = OWN) -> Event:
        return self.source.event("threshold", scope, direction=direction, threshold_bytes=100 * KiB, usage_bytes=0)

    async def until(self, predicate: Callable[[], bool]) -> None:
        with anyio.fail_after(5):
            while not predicate():
                await anyio.sleep(0.001)


@pytest.fixture
async def service() -> AsyncIterator[Running]:
    shedder = svc.Shedder(retry_after_s=3, hold_s=0.05)
    source = FakeSource("own-memcg")
    engine = svc.make_engine(shedder, OWN, Config(sources=()), sources=[source], autoload=False)
    ready: list[bool] = []
    app = svc.build_app(shedder, engine, item_bytes=10 * KiB, ready=lambda: ready.append(True))
    async with app.router.lifespan_context(app):
        assert ready == [True]
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://service") as client:
            yield Running(client, shedder, source, engine)


async def test_work_is_cached(service: Running) -> None:
    r = await service.client.get("/item/a")
    assert r.status_code == 200 and r.json() == {"key": "a", "bytes": 10 * KiB}
    await service.client.get("/item/b")
    assert (await service.client.get("/stats")).json()["cached_bytes"] == 20 * KiB


async def test_the_rescue_drops_the_cache_and_sheds_until_it_clears(service: Running) -> None:
    await service.client.get("/item/a")
    freed = service.shedder.release(service.threshold(+1))
    assert freed == 10 * KiB
    r = await service.client.get("/item/b")
    assert r.status_code == 503 and r.headers["Retry-After"] == "3"
    stats = (await service.client.get("/stats")).json()
    assert stats == {"cached_bytes": 0, "accepting": False, "pressure": True, "drops": 1, "shed": 1}

    await service.source.inject(service.threshold(-1))
    await service.until(lambda: not service.shedder.pressure)
    await service.until(lambda: service.shedder.accepting)  # after hold_s
    assert (await service.client.get("/item/b")).status_code == 200


async def test_an_upward_crossing_of_its_own_memcg_is_a_decision_and_nothing_else_is(service: Running) -> None:
    for event in (service.threshold(+1), service.threshold(-1), service.threshold(+1, Scope("v1", "/other"))):
        await service.source.inject(event)
    await service.until(lambda: service.engine.stats.events == 3)
    await service.until(lambda: service.engine.stats.decisions + service.engine.stats.ignored == 3)
    assert service.engine.stats.decisions == 1 and service.engine.stats.ignored == 2
    # No candidates plugin here, so no victim and no rescue: the service is untouched.
    assert service.shedder.drops == 0 and not service.shedder.pressure
    decisions = (await service.client.get("/decisions")).json()
    assert [d["event"]["scope"]["path"] for d in decisions] == [OWN.path]


def test_the_engine_watches_only_its_own_memcg() -> None:
    cfg = svc.engine_config(OWN, "60%")
    (source,) = cfg.sources
    assert (source.source_name, list(source.cgroups), list(source.thresholds)) == ("own-memcg", ["/services/web"], ["60%"])  # type: ignore[union-attr]
    loaded = svc.make_engine(svc.Shedder(), OWN, cfg, autoload=False).plugins.loaded
    assert loaded == {"act_on_threshold": "passed to Engine(plugins=...)", "shed-cache": "passed to Engine(plugins=...)"}
