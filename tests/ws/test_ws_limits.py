"""WebSocket refusals that need tight limits: too large (1009) and rate exceeded (1008)."""

from __future__ import annotations

import asyncio

import pytest
from websockets.asyncio.client import connect

from core.bus import Subscription
from core.limits import Limits
from tests.conftest import World
from tests.ws.conftest import drain
from tests.ws.test_ws_refusals import closed, refusals


@pytest.fixture
def limits() -> Limits:
    return Limits(max_payload=1000, rate=1.0, burst=3)


async def test_too_large(world: World, ws: str, watch: Subscription) -> None:
    headers = {"Authorization": f"Client {world.publisher.secret}"}
    async with connect(f"{ws}/m/acme/c/temps", additional_headers=headers, max_size=None) as conn:
        await conn.send(b"x" * 1000)  # at the limit: accepted
        assert (await asyncio.wait_for(watch.get(), 5)).payload == b"x" * 1000
        await conn.send(b"y" * 1001)
        assert await closed(conn) == (1009, "frame with 1001 bytes exceeds limit of 1000 bytes")
    assert refusals(world, "too_large") == 1
    assert drain(watch) == []


async def test_rate_exceeded(world: World, ws: str, watch: Subscription) -> None:
    headers = {"Authorization": f"Client {world.both.secret}"}
    async with connect(f"{ws}/m/acme/c/temps?mode=publish", additional_headers=headers) as conn:
        for i in range(5):
            await conn.send(str(i))
        assert await closed(conn) == (1008, "more than 1 messages per second")
    assert refusals(world, "rate_limited") == 1
    assert [m.payload for m in drain(watch)] == [b"0", b"1", b"2"]  # type: ignore[attr-defined]
