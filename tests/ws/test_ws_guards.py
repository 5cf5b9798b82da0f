"""The guards of the WebSocket listener: a time limit for the whole upgrade (request head,
checks, 101), a cap on connections, credentials kept out of websockets' debug log, and a stop
that does not wait for connections that never upgraded."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator

import pytest
import websockets

from adapters.ws import WSAdapter
from core.bus import Subscription
from core.limits import ListenerLimits
from tests.conftest import World, drain, running

TIMEOUT = 10.0


@pytest.fixture
async def adapter(world: World) -> AsyncIterator[WSAdapter]:
    limits = ListenerLimits(header_timeout=0.5, max_connections=3)
    async with running(WSAdapter(world.gateway, "127.0.0.1", 0, limits=limits)) as a:
        yield a


async def _closed(reader: asyncio.StreamReader) -> bytes | None:
    """What the server wrote before closing the connection, or None if it kept it open."""
    try:
        return await asyncio.wait_for(reader.read(), TIMEOUT)
    except TimeoutError:
        return None


async def _publishes(world: World, adapter: WSAdapter, watch: Subscription) -> None:
    """Another client upgrades, publishes, and its message arrives."""
    url = f"ws://127.0.0.1:{adapter.port}/m/acme/c/temps/t?mode=publish"
    headers = {"Authorization": f"Client {world.publisher.secret}"}
    async with websockets.connect(url, additional_headers=headers) as ws:
        await ws.send(b"other")
    for _ in range(100):
        got = drain(watch)
        if got:
            assert [m.payload for m in got] == [b"other"]
            return
        await asyncio.sleep(0.02)
    raise AssertionError("the other client's message did not arrive")


def _refusals(world: World, reason: str) -> float:
    return world.gateway.metrics.refusals.labels("ws", reason).value


async def test_an_upgrade_that_does_not_come_is_cut_off(
    world: World, adapter: WSAdapter, watch: Subscription
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", adapter.port)
    writer.write(b"GET /m/acme/c/temps HTTP/1.1\r\nHost: x\r\n")  # and nothing more
    assert await _closed(reader) == b""
    writer.close()
    await _publishes(world, adapter, watch)


async def test_connections_beyond_the_cap_are_refused_with_503(
    world: World, adapter: WSAdapter, watch: Subscription
) -> None:
    held = [await asyncio.open_connection("127.0.0.1", adapter.port) for _ in range(3)]
    reader, writer = await asyncio.open_connection("127.0.0.1", adapter.port)
    answer = await _closed(reader)
    assert answer is not None and answer.startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
    assert json.loads(answer.partition(b"\r\n\r\n")[2])["status"] == 503
    writer.close()
    assert _refusals(world, "connection_limit") == 1
    for _, w in held:
        w.close()
    for _ in range(100):
        if not adapter.tcp_connections:
            break
        await asyncio.sleep(0.02)
    await _publishes(world, adapter, watch)


async def test_credentials_stay_out_of_the_debug_log(
    world: World, adapter: WSAdapter, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    secret = world.subscriber.secret
    base = f"ws://127.0.0.1:{adapter.port}/m/acme/c/temps"
    async with websockets.connect(f"{base}?authorization=Client%20{secret}&mode=subscribe"):
        pass
    headers = {"Authorization": f"Client {secret}"}
    async with websockets.connect(f"{base}?mode=subscribe", additional_headers=headers):
        pass
    with pytest.raises(websockets.InvalidStatus):  # a refusal (not a messaging path)
        async with websockets.connect(f"ws://127.0.0.1:{adapter.port}/x?authorization={secret}"):
            pass
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("conduit")]
    assert any("< GET /m/acme/c/temps?authorization=[redacted]&mode=subscribe" in x for x in lines)
    assert any(x == "< Authorization: [redacted]" for x in lines)
    assert not [x for x in lines if secret in x]


async def test_stop_does_not_wait_for_connections_that_never_upgraded(world: World) -> None:
    limits = ListenerLimits(header_timeout=3600)
    adapter = WSAdapter(world.gateway, "127.0.0.1", 0, limits=limits)
    await adapter.start()
    reader, writer = await asyncio.open_connection("127.0.0.1", adapter.port)
    writer.write(b"GET /m/acme/c/temps HTTP/1.1\r\n")
    await asyncio.sleep(0.1)
    await asyncio.wait_for(adapter.stop(timeout=3600), TIMEOUT)
    assert await _closed(reader) == b""


async def test_a_refusal_reaches_a_client_still_sending(
    world: World, watch: Subscription
) -> None:
    """The client sends a frame that is refused, then many more before it sees the close: the
    server reads and drops them, so the client's close frame behind them ends the handshake
    (instead of the server waiting its whole close timeout, half an hour here)."""
    adapter = WSAdapter(world.gateway, "127.0.0.1", 0, close_timeout=1800)
    async with running(adapter):
        url = f"ws://127.0.0.1:{adapter.port}/m/acme/c/temps/x?ct=application/senml%2Bjson"
        headers = {"Authorization": f"Client {world.publisher.secret}"}
        async with websockets.connect(url, additional_headers=headers, max_queue=None) as ws:
            await ws.send('[{"v":"not a number"}]')
            with contextlib.suppress(websockets.ConnectionClosed):
                for _ in range(500):
                    await ws.send('[{"n":"t","v":1}]' + " " * 1000)
            await asyncio.wait_for(ws.wait_closed(), TIMEOUT)
            assert ws.close_code == 1007
            assert ws.close_reason == "record 0, field 'v': 'v' must be a number, got a string"
    assert drain(watch) == []
