"""Connections that end in any way leave nothing behind: a churn of real connections (dropped
without DISCONNECT, reset, closed with DISCONNECT, taken over), each subscribed, and afterwards
the gateway, the adapter and the registry hold nothing of them, and no channel, session or
subscription object is alive, with the cycle collector off: what a connection held is freed by
reference counting when it ends, not at the collector's next pass."""

from __future__ import annotations

import asyncio
import gc
import socket
import struct

from adapters.mqtt import MQTTAdapter
from adapters.mqtt.channel import Channel
from adapters.mqtt.codec import Disconnect
from adapters.mqtt.session import Session, Sub
from tests.conftest import World
from tests.mqtt.conftest import RawClient, until

ROUNDS = 5
PER_WAY = 100


def alive(kind: type) -> int:
    return sum(1 for o in gc.get_objects() if type(o) is kind)


async def churn(world: World, port: int) -> None:
    clients = []
    for i in range(4 * PER_WAY):
        client = await RawClient.open(port, 5 if i % 2 else 4)
        assert (await client.connect(world.both, f"dev-{i}")).reason_code == 0
        await client.subscribe("m/acme/c/temps/#", qos=1)
        clients.append(client)
    dropped, reset, disconnected, taken = (
        clients[k * PER_WAY : (k + 1) * PER_WAY] for k in range(4)
    )
    for client in dropped:
        client.writer.close()
    for client in reset:
        sock = client.writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.writer.close()
    for client in disconnected:
        await client.send(Disconnect())
        client.writer.close()
    for i, client in enumerate(taken, start=3 * PER_WAY):
        thief = await RawClient.open(port, 4)
        assert (await thief.connect(world.both, f"dev-{i}")).reason_code == 0
        thief.writer.close()
        client.writer.close()


async def test_churn_leaves_nothing(world: World, mqtt_adapter: MQTTAdapter) -> None:
    gateway = world.gateway
    gc.collect()
    gc.disable()
    try:
        before = {kind: alive(kind) for kind in (Channel, Session, Sub)}
        for _ in range(ROUNDS):
            await churn(world, mqtt_adapter.port)
            await until(lambda: not mqtt_adapter.conns, timeout=10)
            await asyncio.sleep(0.05)  # the unsubscriptions of ended sessions
            assert not gateway._connections
            assert not gateway._subs
            assert not mqtt_adapter.sessions
        after = {kind: alive(kind) for kind in (Channel, Session, Sub)}
        assert after == before
    finally:
        gc.enable()
