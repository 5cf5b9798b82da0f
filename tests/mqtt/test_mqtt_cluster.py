"""MQTT sessions across nodes: two nodes in one process, each a gateway and an MQTT adapter of
its own on its own connection to one store (a SQLite file, or a PostgreSQL schema when the local
server answers), sharing one bus that says it spans nodes (the in-process bus, which every
gateway registers on: what one announces, both hear, as with NATS). A client identifier is
unique in the cluster; a persistent session moves with its client; a node restores only what it
holds; a holder that died is waited for, then its session is taken."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from pathlib import Path

import pytest

from adapters.mqtt import MQTTAdapter
from adapters.mqtt.codec import Disconnect, Properties, PubAck, Publish, ReasonCode
from core.auth import store_auth
from core.bus.local import LocalBus
from core.gateway import Gateway
from core.store import Store, make_store
from tests import postgres
from tests.conftest import Party, World, provision
from tests.mqtt.conftest import HOST, Closed, RawClient

TOPIC = "m/acme/c/temps/t"
PERSISTENT = Properties(session_expiry_interval=3600)
WAIT = 0.5  # the handover wait of the nodes: short, the dead-holder test waits it out


class SharedBus(LocalBus):
    """The in-process bus shared by the gateways of several nodes in one process."""

    spans_nodes = True

    async def close(self) -> None:  # a node that stops leaves it to the others
        pass


class Node:
    """One Conduit node: its own store connection, gateway and MQTT adapter."""

    def __init__(self, name: str, new_store: Callable[[], Store], bus: LocalBus) -> None:
        self.name = name
        self.new_store = new_store
        self.bus = bus

    async def start(self) -> Node:
        store = self.new_store()
        sessions = store.sessions(self.name)
        self.gateway = Gateway(store, self.bus, *store_auth(store), sessions=sessions)
        await self.gateway.start()
        self.mqtt = MQTTAdapter(
            self.gateway, HOST, 0, ws_port=None, connect_timeout=2.0, handover_wait=WAIT
        )
        await self.mqtt.start()
        return self

    async def stop(self) -> None:
        await self.mqtt.stop(timeout=2)
        await self.gateway.close()

    async def client(self, level: int = 5) -> RawClient:
        return await RawClient.open(self.mqtt.port, level)


class Cluster:
    def __init__(self, new_store: Callable[[], Store]) -> None:
        self.new_store = new_store
        self.bus: LocalBus = SharedBus()
        self.nodes: list[Node] = []
        self.clients: list[RawClient] = []

    async def node(self, name: str) -> Node:
        node = await Node(name, self.new_store, self.bus).start()
        self.nodes.append(node)
        return node

    async def client(self, node: Node, level: int = 5) -> RawClient:
        client = await node.client(level)
        self.clients.append(client)
        return client


@pytest.fixture(params=["sqlite", "postgres"])
async def cluster(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Cluster]:
    async with AsyncExitStack() as stack:
        if request.param == "postgres":
            schema = await stack.enter_async_context(postgres.fresh_schema())

            def new_store() -> Store:
                return make_store("postgres", postgres_dsn=postgres.DSN,
                                  postgres_schema=schema, postgres_pool_max=2)  # fmt: skip
        else:

            def new_store() -> Store:
                return make_store("sqlite", sqlite_path=tmp_path / "conduit.db")

        cluster = Cluster(new_store)
        try:
            yield cluster
        finally:
            for client in cluster.clients:
                await client.close()
            for node in cluster.nodes:
                await node.stop()


async def two_nodes(cluster: Cluster) -> tuple[Node, Node, World]:
    a = await cluster.node("a")
    world = await provision(a.gateway)
    b = await cluster.node("b")
    return a, b, world


async def publish(cluster: Cluster, node: Node, world: World, *payloads: bytes) -> None:
    """QoS 1 publishes by the publisher, each acknowledged (so queued copies are stored)."""
    client = await cluster.client(node)
    await client.connect(world.publisher, "publisher")
    for n, payload in enumerate(payloads, 1):
        assert isinstance(await client.publish(TOPIC, payload, qos=1, packet_id=n), PubAck)
    await client.disconnect()


async def received(client: RawClient, count: int) -> list[bytes]:
    """The payloads of ``count`` PUBLISHes (each acknowledged), then nothing more for a while."""
    payloads = []
    for _ in range(count):
        packet = await client.expect(Publish)
        payloads.append(packet.payload)
        if packet.qos:
            await client.send(PubAck(packet.packet_id))
    with pytest.raises(TimeoutError):
        extra = await client.recv(timeout=0.3)
        raise AssertionError(f"unexpected {extra!r}")
    return payloads


async def persistent_session_on(cluster: Cluster, node: Node, party: Party) -> None:
    """The device's persistent session on ``node``, subscribed with QoS 1, then offline."""
    dev = await cluster.client(node)
    ack = await dev.connect(party, "dev", clean=False, properties=PERSISTENT)
    assert ack.reason_code == 0
    await dev.subscribe("m/acme/c/temps/#", qos=1)
    await dev.disconnect()
    await asyncio.sleep(0.05)


@pytest.mark.parametrize("level", [4, 5])
async def test_a_connect_on_another_node_takes_the_session_over(
    cluster: Cluster, level: int
) -> None:
    a, b, world = await two_nodes(cluster)
    first = await cluster.client(a, level)
    await first.connect(world.both, "dev")
    await first.subscribe("m/acme/c/temps/#", qos=1)
    second = await cluster.client(b, level)
    ack = await second.connect(world.both, "dev")
    assert ack.reason_code == 0 and not ack.session_present
    packets = await first.until_closed()
    if level == 5:
        assert packets == [Disconnect(ReasonCode.SESSION_TAKEN_OVER, packets[0].properties)]
    else:
        assert packets == []  # MQTT 3.1.1: just closed
    assert a.mqtt.sessions == {}
    await second.subscribe("m/acme/c/temps/#", qos=1)
    await publish(cluster, a, world, b"once")
    assert await received(second, 1) == [b"once"]  # once, from node b only


async def test_a_persistent_session_moves_with_its_client(cluster: Cluster) -> None:
    a, b, world = await two_nodes(cluster)
    await persistent_session_on(cluster, a, world.both)
    await publish(cluster, b, world, b"1", b"2", b"3")  # queued on a, where the session is
    dev = await cluster.client(b)
    ack = await dev.connect(world.both, "dev", clean=False, properties=PERSISTENT)
    assert ack.reason_code == 0 and ack.session_present
    assert await received(dev, 3) == [b"1", b"2", b"3"]
    assert a.mqtt.sessions == {} and len(b.mqtt.sessions) == 1
    await publish(cluster, a, world, b"4")
    assert await received(dev, 1) == [b"4"]
    key = next(iter(b.mqtt.registry.sessions.values()))
    assert await b.gateway.sessions.holder(f'["mqtt","{key.identity.client_id}","dev"]') == "b"


async def test_a_restarting_node_restores_its_own_sessions_only(cluster: Cluster) -> None:
    a, b, world = await two_nodes(cluster)
    await persistent_session_on(cluster, a, world.both)
    dev = await cluster.client(b)
    ack = await dev.connect(world.both, "dev", clean=False, properties=PERSISTENT)
    assert ack.session_present
    await dev.disconnect()
    await persistent_session_on(cluster, a, world.subscriber)  # another, which stays on a
    await publish(cluster, a, world, b"while away")
    # a restarts with the same id: its own session comes back, not the one b took.
    await a.stop()
    cluster.nodes.remove(a)
    again = await cluster.node("a")
    assert [s.identity.client_id for s in again.mqtt.sessions.values()] == [world.subscriber.id]
    # b restarts: the device's session is still its, with the message queued meanwhile.
    await b.stop()
    cluster.nodes.remove(b)
    b2 = await cluster.node("b")
    assert [s.identity.client_id for s in b2.mqtt.sessions.values()] == [world.both.id]
    dev = await cluster.client(b2)
    ack = await dev.connect(world.both, "dev", clean=False, properties=PERSISTENT)
    assert ack.session_present
    assert await received(dev, 1) == [b"while away"]


async def test_a_dead_holder_is_waited_for_then_its_session_taken(cluster: Cluster) -> None:
    a, b, world = await two_nodes(cluster)
    await persistent_session_on(cluster, a, world.both)
    await publish(cluster, a, world, b"kept")
    await a.stop()  # gone without handing anything over (as after kill -9)
    cluster.nodes.remove(a)
    dev = await cluster.client(b)
    loop = asyncio.get_running_loop()
    started = loop.time()
    ack = await dev.connect(world.both, "dev", clean=False, properties=PERSISTENT)
    assert loop.time() - started >= WAIT
    assert ack.reason_code == 0 and ack.session_present
    assert await received(dev, 1) == [b"kept"]


async def test_a_clean_start_on_another_node_ends_the_session(cluster: Cluster) -> None:
    a, b, world = await two_nodes(cluster)
    await persistent_session_on(cluster, a, world.both)
    await publish(cluster, a, world, b"old")
    dev = await cluster.client(b)
    ack = await dev.connect(world.both, "dev", clean=True)
    assert ack.reason_code == 0 and not ack.session_present
    assert await received(dev, 0) == []
    assert a.mqtt.sessions == {}
    await asyncio.sleep(0.05)
    assert await b.gateway.sessions.holder(f'["mqtt","{world.both.id}","dev"]') is None


async def test_one_node_connects_without_announcing(cluster: Cluster) -> None:
    """The in-process bus spans no node: CONNECT asks nothing of the bus or the store."""
    cluster.bus = LocalBus()
    a = await cluster.node("a")
    assert not a.mqtt.registry.clustered
    world = await provision(a.gateway)
    heard: list[object] = []

    async def hear(change: object) -> None:
        heard.append(change)

    a.gateway.on_change(hear)
    dev = await cluster.client(a)
    assert (await dev.connect(world.both, "dev")).reason_code == 0
    assert heard == []
    with pytest.raises((Closed, TimeoutError)):
        await dev.recv(timeout=0.1)
