"""Keep-alive pings and graceful shutdown of the WebSocket adapter."""

from __future__ import annotations

import asyncio
import struct

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from adapters.ws import WSAdapter
from tests.conftest import World, running
from tests.ws.conftest import masked_frame, raw_upgrade


async def test_shutdown_closes_with_1001(world: World) -> None:
    adapter = WSAdapter(world.gateway, "127.0.0.1", 0)
    await adapter.start()
    url = f"ws://127.0.0.1:{adapter.port}/m/acme/c/temps"
    headers = {"Authorization": f"Client {world.both.secret}"}
    async with (
        connect(url, additional_headers=headers) as sub,
        connect(url + "?mode=publish", additional_headers=headers) as pub,
    ):
        await adapter.stop(timeout=5)
        for conn in (sub, pub):
            with pytest.raises(ConnectionClosed):
                await asyncio.wait_for(conn.recv(), 5)
            assert (conn.close_code, conn.close_reason) == (1001, "server shutting down")
    with pytest.raises(OSError):
        async with connect(url, additional_headers=headers):
            pass
    assert world.gateway.metrics.conns["ws"].value == 0


async def test_keepalive_pings_are_answered(world: World) -> None:
    async with running(
        WSAdapter(world.gateway, "127.0.0.1", 0, ping_interval=0.05, ping_timeout=5)
    ) as adapter:
        url = f"ws://127.0.0.1:{adapter.port}/m/acme/c/temps"
        async with connect(
            url, additional_headers={"Authorization": f"Client {world.subscriber.secret}"}
        ):
            (server_side,) = adapter.connections
            for _ in range(500):  # until the server has seen a pong
                if server_side.latency > 0:
                    break
                await asyncio.sleep(0.01)
            assert server_side.latency > 0


async def test_pings_go_on_while_pongs_come_and_an_ended_connection_leaves_its_round(
    world: World,
) -> None:
    """The keep-alive pings in rounds: each pong answered brings the next ping; a connection
    that ends, however, is in no round any more."""
    async with running(
        WSAdapter(world.gateway, "127.0.0.1", 0, ping_interval=0.2, ping_timeout=5)
    ) as adapter:
        reader, writer = await raw_upgrade(adapter.port, world.subscriber.secret)
        pings = 0
        while pings < 3:
            first, second = await asyncio.wait_for(reader.readexactly(2), 5)
            data = await reader.readexactly(second & 0x7F)
            assert first & 0x0F == 0x9  # only pings on an idle connection
            pings += 1
            writer.write(masked_frame(0x8A, data))  # the pong
        for _ in range(500):  # the last pong read, the connection waits in a round again
            if sum(len(r) for r in adapter._rounds.values()) == 1:
                break
            await asyncio.sleep(0.001)
        assert sum(len(r) for r in adapter._rounds.values()) == 1
        writer.close()
        for _ in range(500):
            if not adapter.connections:
                break
            await asyncio.sleep(0.01)
        assert adapter.connections == []
        assert sum(len(r) for r in adapter._rounds.values()) == 0


async def test_peer_that_never_answers_pings_is_closed_with_1011(world: World) -> None:
    async with running(
        WSAdapter(world.gateway, "127.0.0.1", 0, ping_interval=0.05, ping_timeout=0.2)
    ) as adapter:
        reader, writer = await raw_upgrade(adapter.port, world.subscriber.secret)
        opcodes, close = [], None
        while close is None:  # read frames, answer nothing
            first, second = await asyncio.wait_for(reader.readexactly(2), 5)
            data = await reader.readexactly(second & 0x7F)
            opcodes.append(first & 0x0F)
            if first & 0x0F == 0x8:
                close = (struct.unpack("!H", data[:2])[0], data[2:].decode())
        assert 0x9 in opcodes  # a ping came first
        assert close == (1011, "keepalive ping timeout")
        writer.close()
