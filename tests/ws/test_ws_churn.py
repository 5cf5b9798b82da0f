"""WebSocket connections that end in any way leave nothing behind: subscribers and publishers
closed cleanly or cut off (the TCP connection aborted), and afterwards the gateway and the adapter
hold nothing of them, and no outbox or bus subscription object is alive with the cycle collector
off: what a connection held is freed by reference counting when it ends."""

from __future__ import annotations

import asyncio
import gc

from websockets.asyncio.client import connect

from adapters.ws import WSAdapter
from adapters.ws.outbox import Outbox
from core.bus import Subscription
from tests.conftest import World
from tests.mqtt.conftest import until

ROUNDS = 4
PER_WAY = 50


def alive(kind: type) -> int:
    return sum(1 for o in gc.get_objects() if type(o) is kind)


async def churn(world: World, ws: str) -> None:
    sub = f"{ws}/m/acme/c/temps/%23?authorization={world.subscriber.secret}"
    pub = f"{ws}/m/acme/c/temps/t?authorization={world.publisher.secret}"
    clients = [await connect(sub if i % 2 else pub) for i in range(4 * PER_WAY)]
    await clients[0].send(b"x")  # a publisher publishes, every subscriber gets it
    for i, client in enumerate(clients):
        if i % 4 < 2:
            await client.close()
        else:
            client.transport.abort()  # cut off: no close frame, a reset


async def test_churn_leaves_nothing(world: World, ws_adapter: WSAdapter, ws: str) -> None:
    gateway = world.gateway
    gc.collect()
    gc.disable()
    try:
        before = {kind: alive(kind) for kind in (Outbox, Subscription)}
        for _ in range(ROUNDS):
            await churn(world, ws)
            await until(lambda: not ws_adapter.tcp_connections, timeout=10)
            await asyncio.sleep(0.05)
            assert not gateway._connections
            assert not gateway._subs
        after = {kind: alive(kind) for kind in (Outbox, Subscription)}
        assert after == before
    finally:
        gc.enable()
