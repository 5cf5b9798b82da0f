"""What a restart does to the persistent sessions in the session store (the registry's
``restore``), driven without sockets on the gateway's session store: a session that was
connected when the server died gets its will after its delay and expires from the restart; one
that expired meanwhile is gone (its due will published); a subscription whose right was revoked
meanwhile does not come back; messages come back queued or in flight, in order."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine
from typing import Any

from adapters.mqtt.channel import subscription_closed
from adapters.mqtt.codec import Properties, Will
from adapters.mqtt.options import Options
from adapters.mqtt.session import Sub, store_key
from adapters.mqtt.sessions import SessionRegistry
from core.bus import Subscription
from core.credentials import Credentials
from core.identity import Identity
from core.message import Message
from tests.conftest import World, drain

WILL = Will("m/acme/c/temps/will", b"gone", 1, False, Properties(will_delay_interval=1))


class Node:
    """One run of the server: a registry on the gateway's session store."""

    def __init__(self, world: World) -> None:
        self.tasks: list[asyncio.Task[None]] = []
        options = Options(max_packet_size=1 << 20, max_inflight=2)
        self.registry = SessionRegistry(world.gateway, options, self._spawn)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        self.tasks.append(asyncio.get_running_loop().create_task(coro))

    async def settle(self) -> None:
        while self.tasks:
            await self.tasks.pop()


async def identity(world: World) -> Identity:
    return await world.gateway.authenticate(Credentials(world.both.secret))


def message(n: int) -> Message:
    return Message("acme", "temps", "n", "x", "http", "text/plain", b"%d" % n, time.time_ns())


async def test_connected_at_the_crash_will_after_its_delay(
    world: World, watch: Subscription
) -> None:
    first = Node(world)
    first.registry.open(await identity(world), "dev", False, 60, WILL)
    await world.gateway.sessions.flush()  # then the server dies: nothing more
    second = Node(world)
    assert await second.registry.restore(subscription_closed) == 1
    (restored,) = second.registry.sessions.values()
    assert restored.outlet is None and restored.will == WILL
    assert drain(watch) == []
    await asyncio.sleep(1.3)
    await second.settle()
    assert [m.payload for m in drain(watch)] == [b"gone"]
    assert restored.expiry_handle is not None  # expires 60 s after the restart


async def test_expired_while_down_is_gone(world: World, watch: Subscription) -> None:
    first = Node(world)
    session, _ = first.registry.open(await identity(world), "dev", False, 60, WILL)
    session.save(expires_at=time.time() - 1, will_at=time.time() - 30)
    await world.gateway.sessions.flush()
    second = Node(world)
    assert await second.registry.restore(subscription_closed) == 0
    await second.settle()
    assert [m.payload for m in drain(watch)] == [b"gone"]  # it was due before the expiry
    await world.gateway.sessions.flush()
    assert await world.gateway.sessions.load() == []


async def test_subscriptions_come_back_unless_revoked(world: World) -> None:
    await world.gateway.provisioning.connect("acme", world.both.id, "other", True, True)
    first = Node(world)
    ident = await identity(world)
    session, _ = first.registry.open(ident, "dev", False, 60)
    for topic_filter in ("m/acme/c/temps/#", "m/acme/c/other/#"):
        session.add_sub(Sub(session, topic_filter, topic_filter, None, 1))
    session.save()
    await world.gateway.sessions.flush()
    await world.gateway.provisioning.disconnect("acme", world.both.id, "other")
    second = Node(world)
    assert await second.registry.restore(subscription_closed) == 1
    (restored,) = second.registry.sessions.values()
    assert list(restored.subs) == ["m/acme/c/temps/#"]
    sub = restored.subs["m/acme/c/temps/#"]
    assert sub.bus is not None and sub.bus in world.gateway._subs


async def test_messages_come_back_in_order_queued_or_in_flight(world: World) -> None:
    first = Node(world)
    ident = await identity(world)
    session, _ = first.registry.open(ident, "dev", False, 60)
    sub = Sub(session, "m/acme/c/temps/#", "m/acme/c/temps/#", None, 2)
    session.add_sub(sub)
    for n in range(5):  # offline: all queued, each stored
        assert session.offer(sub, message(n), False)
    # Two go in flight to a client (window 2), which acknowledges the first with PUBREC.
    sent: list[bytes] = []

    class Outlet:
        level, congested, max_packet_size = 4, False, 1 << 20
        send = deliver = sent.append

    session.attach(Outlet())
    assert sorted(session.inflight) == [1, 2]
    assert session.pubrec(1)
    session.detach()
    first.registry.detached(session, will=False)
    await world.gateway.sessions.flush()
    (stored,) = await world.gateway.sessions.load()
    assert stored.key == store_key(ident, "dev") and len(stored.messages) == 5
    second = Node(world)
    assert await second.registry.restore(subscription_closed) == 1
    (restored,) = second.registry.sessions.values()
    assert {pid: (o.message.payload, o.released) for pid, o in restored.inflight.items()} == {
        1: (b"0", True),
        2: (b"1", False),
    }
    assert [o.message.payload for o in restored.queue or []] == [b"2", b"3", b"4"]
    assert restored.identity == ident
