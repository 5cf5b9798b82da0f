"""The MQTT channel without sockets: packets in, what it answers out.

Each channel runs against a real gateway on a real SQLite store (the ``world`` fixture) and a
real session registry; only its connection is replaced, by :class:`Wire`, which keeps what the
channel sends (decoded as the client would read it) and the reason code it closed with. What the
channel hands back for a packet is checked too: None when the packet is done, the work the
connection must run before the next packet otherwise.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

import pytest

from adapters.mqtt.channel import CLOSED, CONNECTED, Channel, shared
from adapters.mqtt.codec import (
    ConnAck,
    Connect,
    Decoder,
    Disconnect,
    MQTTProtocolError,
    Packet,
    PingReq,
    PingResp,
    Properties,
    PubAck,
    PubComp,
    Publish,
    PubRec,
    PubRel,
    SubAck,
    Subscribe,
    Subscription,
    UnsubAck,
    Unsubscribe,
    Will,
)
from adapters.mqtt.codec.reasons import (
    ReasonCode,
    ReturnCode,
    for_connack,
    for_disconnect,
    for_suback,
    v3_connack,
)
from adapters.mqtt.options import Options
from adapters.mqtt.sessions import SessionRegistry
from core.bus import Subscription as BusSubscription
from tests.conftest import Party, World, drain
from tests.mqtt.conftest import refusals

TOPIC = "m/acme/c/temps/a"


class Wire:
    """A channel's Link in memory: the bytes it sends and how it closed."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.deliveries = 0
        self.closed_with: int | None = None

    def send(self, data: bytes) -> None:
        assert self.closed_with is None, "sent after close"
        self.data += data

    def deliver(self, data: bytes) -> None:
        self.deliveries += 1
        self.send(data)

    def close(self, reason_code: int) -> None:
        assert self.closed_with is None, "closed twice"
        self.closed_with = reason_code

    def packets(self, level: int) -> list[Packet]:
        """What was sent since the last call, decoded at ``level`` as the client reads it."""
        decoder = Decoder(protocol_level=level)
        decoder.feed(bytes(self.data))
        self.data.clear()
        return list(decoder)


class Side:
    """The adapter's side of the tests: options, one registry, the tasks it spawned."""

    def __init__(self, world: World, **options: Any) -> None:
        self.world = world
        self.options = Options(max_packet_size=world.gateway.limits.max_payload + 65_536, **options)
        self.tasks: list[asyncio.Task[None]] = []
        self.registry = SessionRegistry(world.gateway, self.options, self._spawn)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        self.tasks.append(asyncio.get_running_loop().create_task(coro))

    async def settle(self) -> None:
        """Let what the registry spawned (wills, unsubscriptions) finish."""
        while self.tasks:
            await self.tasks.pop()

    def client(self) -> Client:
        return Client(self)


class Client:
    """One channel with its wire."""

    def __init__(self, side: Side) -> None:
        self.wire = Wire()
        self.backlog: list[Packet] = []  # what followed the CONNACK
        self.channel = Channel(side.world.gateway, side.options, side.registry, self.wire)

    @property
    def level(self) -> int:
        return self.channel.level or 4

    async def handle(self, packet: Packet) -> list[Packet]:
        """Hand over one packet, run its work if it has any; what the channel sent."""
        pending = self.channel.handle(packet)
        if pending is not None:
            await pending
        return self.wire.packets(self.level)

    async def connect(
        self,
        party: Party | None,
        client_id: str = "dev",
        level: int = 4,
        *,
        clean: bool = True,
        keep_alive: int = 0,
        will: Will | None = None,
        properties: Properties | None = None,
        password: bytes | None = None,
        username: str | None = None,
    ) -> ConnAck:
        if password is None and party is not None:
            password = party.secret.encode()
        if username is None and party is not None:
            username = party.id
        connect = Connect(
            level,
            clean,
            keep_alive,
            client_id,
            username,
            password,
            will,
            properties or Properties(),
        )
        pending = self.channel.handle(connect)
        assert pending is not None  # CONNECT needs the gateway: the next packets wait
        assert self.wire.packets(level) == []  # nothing answered before authentication
        await pending
        ack, *self.backlog = self.wire.packets(level)
        assert isinstance(ack, ConnAck)
        return ack

    @property
    def closed_with(self) -> int | None:
        return self.wire.closed_with


@pytest.fixture
def side(world: World) -> Side:
    return Side(world, connect_timeout=2.0, max_inflight=4, topic_alias_maximum=8)


async def connected(side: Side, party: Party, client_id: str = "dev", level: int = 4) -> Client:
    client = side.client()
    ack = await client.connect(party, client_id, level)
    assert ack.reason_code == 0
    return client


# --- CONNECT --------------------------------------------------------------------------------


@pytest.mark.parametrize("level", [4, 5])
async def test_connect_accepted(world: World, side: Side, level: int) -> None:
    client = side.client()
    ack = await client.connect(world.publisher, "dev", level, keep_alive=10)
    assert ack.reason_code == 0 and not ack.session_present
    assert client.channel.state is CONNECTED
    assert client.channel.keep_alive == 15.0  # the timer it asks for: 1.5 x keep alive
    if level == 5:
        assert ack.properties.receive_maximum == 4
        assert ack.properties.topic_alias_maximum == 8
        assert ack.properties.maximum_packet_size == side.options.max_packet_size
    assert client.closed_with is None


@pytest.mark.parametrize(
    ("password", "rc3", "rc5", "reason"),
    [
        (b"", 4, 0x86, "no_credentials"),
        (b"not-a-secret", 4, 0x86, "bad_credentials"),
        (b"\xff\xfe", 4, 0x86, "bad_credentials"),
    ],
)
@pytest.mark.parametrize("level", [4, 5])
async def test_connect_refused_credentials(
    world: World, side: Side, level: int, password: bytes, rc3: int, rc5: int, reason: str
) -> None:
    client = side.client()
    ack = await client.connect(world.publisher, "dev", level, password=password)
    assert ack.reason_code == (rc3 if level == 4 else rc5)
    assert client.closed_with == 0x86  # the MQTT 5 code, whatever the version
    assert client.channel.state is CLOSED
    assert refusals(world, reason) == 1


@pytest.mark.parametrize("level", [4, 5])
async def test_user_name_is_the_client_id_the_secret_claims(
    world: World, side: Side, level: int
) -> None:
    """No user name: the secret alone says who; another client's id: bad credentials."""
    ack = await side.client().connect(world.publisher, "dev-1", level, username="")
    assert ack.reason_code == 0
    client = side.client()
    ack = await client.connect(world.publisher, "dev-2", level, username=world.subscriber.id)
    assert ack.reason_code == (4 if level == 4 else 0x86)
    assert client.closed_with == 0x86
    assert refusals(world, "bad_credentials") == 1


@pytest.mark.parametrize("level", [4, 5])
async def test_store_unavailable_at_connect(world: World, side: Side, level: int) -> None:
    await world.gateway.store.close()
    client = side.client()
    ack = await client.connect(world.publisher, "dev", level)
    assert ack.reason_code == (3 if level == 4 else 0x88)
    assert client.closed_with == 0x88


async def test_empty_client_id(world: World, side: Side) -> None:
    v5 = side.client()
    ack = await v5.connect(world.publisher, "", 5)
    assigned = ack.properties.assigned_client_identifier
    assert ack.reason_code == 0 and assigned and assigned.startswith("conduit-")
    v4 = side.client()
    assert (await v4.connect(world.publisher, "", 4, clean=False)).reason_code == 2
    assert v4.closed_with == ReasonCode.CLIENT_IDENTIFIER_NOT_VALID
    assert refusals(world, "identifier_rejected") == 1


async def test_enhanced_authentication_is_refused(world: World, side: Side) -> None:
    client = side.client()
    props = Properties(authentication_method="SCRAM-SHA-1")
    ack = await client.connect(world.publisher, "dev", 5, properties=props)
    assert ack.reason_code == 0x8C
    assert client.closed_with == 0x8C


@pytest.mark.parametrize(
    ("asked", "level", "code", "granted", "timer"),
    [
        (0, 5, 0, 60, 90.0),  # none asked for: told the server's (Server Keep Alive)
        (600, 5, 0, 60, 90.0),  # more than the maximum: lowered
        (30, 5, 0, None, 45.0),  # within: kept
        (600, 4, 2, None, 0.0),  # 3.1.1 cannot be told: identifier rejected
        (30, 4, 0, None, 45.0),
    ],
)
async def test_keep_alive_policy(
    world: World,
    asked: int,
    level: int,
    code: int,
    granted: int | None,
    timer: float,
) -> None:
    side = Side(world, max_keep_alive=60)
    client = side.client()
    ack = await client.connect(world.publisher, "dev", level, keep_alive=asked)
    assert ack.reason_code == code
    assert ack.properties.server_keep_alive == granted
    assert client.channel.keep_alive == timer
    if code:
        assert refusals(world, "keep_alive_too_long") == 1
        assert client.channel.state is CLOSED


@pytest.mark.parametrize("level", [4, 5])
async def test_keep_alive_timeout(world: World, side: Side, level: int) -> None:
    client = side.client()
    await client.connect(world.publisher, "dev", level, keep_alive=10)
    client.channel.timed_out(age=100.0, silence=14.9)  # within 1.5 x keep alive
    assert client.closed_with is None
    client.channel.timed_out(age=100.0, silence=15.1)
    packets = client.wire.packets(level)
    if level == 5:
        assert packets == [Disconnect(0x8D, Properties(reason_string="keep alive timeout"))]
    else:
        assert packets == []
    assert client.closed_with == 0x8D
    assert refusals(world, "keep_alive_timeout") == 1


async def test_connect_timeout(world: World, side: Side) -> None:
    client = side.client()
    client.channel.timed_out(age=1.9, silence=1.9)
    assert client.closed_with is None
    client.channel.timed_out(age=2.1, silence=2.1)
    assert client.closed_with == 0 and client.wire.packets(4) == []
    assert refusals(world, "connect_timeout") == 1


@pytest.mark.parametrize(
    ("will", "rc3", "rc5", "reason"),
    [
        (Will("m/acme/c/other/x", b"gone"), 5, 0x87, "not_allowed"),
        (Will("m/acme/c", b"gone"), 5, 0x90, "bad_topic"),
        (Will("elsewhere/x", b"gone"), 5, 0x90, "not_found"),
        (Will(TOPIC, b"x" * 2_000_000), 5, 0x95, "too_large"),
    ],
)
@pytest.mark.parametrize("level", [4, 5])
async def test_will_refused_at_connect(
    world: World, side: Side, level: int, will: Will, rc3: int, rc5: int, reason: str
) -> None:
    client = side.client()
    ack = await client.connect(world.publisher, "dev", level, will=will)
    assert ack.reason_code == (rc3 if level == 4 else rc5)
    assert client.closed_with == rc5
    assert refusals(world, reason) == 1


@pytest.mark.parametrize("level", [4, 5])
async def test_will_invalid_senml(world: World, level: int) -> None:
    """A will that is not the SenML its content type (or the adapter's default) says."""
    side = Side(world, content_type="application/senml+json")
    client = side.client()
    ack = await client.connect(world.publisher, "dev", level, will=Will(TOPIC, b"[1]"))
    assert ack.reason_code == (5 if level == 4 else 0x99)
    assert client.closed_with == 0x99
    assert refusals(world, "invalid_senml") == 1


async def test_will_payload_format_invalid(world: World, side: Side) -> None:
    client = side.client()
    will = Will(TOPIC, b"\xff", properties=Properties(payload_format_indicator=1))
    ack = await client.connect(world.publisher, "dev", 5, will=will)
    assert ack.reason_code == 0x99
    assert client.closed_with == 0x99
    assert refusals(world, "payload_format_invalid") == 1


async def test_unsupported_protocol_level_from_the_codec(world: World, side: Side) -> None:
    """The codec's error, answered by the channel in the version the client asked for."""
    for level, answer in ((3, [ConnAck(False, 1)]), (6, [ConnAck(False, 0x84)])):
        client = side.client()
        body = b"\x00\x04MQTT" + bytes((level, 0x02, 0, 0, 0, 0))
        decoder = Decoder()
        decoder.feed(bytes((0x10, len(body))) + body)
        with pytest.raises(MQTTProtocolError) as caught:
            decoder.next_packet()
        client.channel.malformed(caught.value)
        assert client.wire.packets(4 if level < 5 else 5) == answer
        assert client.closed_with == 0x84
    assert refusals(world, "unsupported_protocol_version") == 2


@pytest.mark.parametrize("level", [4, 5])
async def test_second_connect(world: World, side: Side, level: int) -> None:
    client = await connected(side, world.publisher, "dev", level)
    assert await client.handle(Connect(level, True, 0, "dev", None, b"x")) == (
        [Disconnect(0x82, Properties(reason_string="a second CONNECT"))] if level == 5 else []
    )
    assert client.closed_with == 0x82


@pytest.mark.parametrize("level", [4, 5])
async def test_takeover(world: World, side: Side, level: int) -> None:
    first = await connected(side, world.publisher, "dev", level)
    second = await connected(side, world.publisher, "dev", level)
    packets = first.wire.packets(level)
    assert [p.reason_code for p in packets] == ([0x8E] if level == 5 else [])  # type: ignore[union-attr]
    assert first.closed_with == 0x8E
    assert second.channel.session is not None and second.channel.session.outlet is second.channel


async def test_shutdown_and_revocation(world: World, side: Side) -> None:
    stopping = await connected(side, world.publisher, "a", 5)
    stopping.channel.shutdown()
    assert stopping.wire.packets(5) == [
        Disconnect(0x8B, Properties(reason_string="server shutting down"))
    ]
    assert stopping.closed_with == 0x8B
    revoked = await connected(side, world.subscriber, "b", 5)
    await world.gateway.provisioning.set_client_enabled("acme", world.subscriber.id, False)
    assert [p.reason_code for p in revoked.wire.packets(5)] == [0x87]  # type: ignore[union-attr]
    assert revoked.closed_with == 0x87


async def test_lost_connection_leaves_the_gateway(world: World, side: Side) -> None:
    """A connection that breaks without a DISCONNECT is unregistered like a closed one (it is
    told nothing more, and nothing holds it)."""
    client = await connected(side, world.subscriber, "dev")
    assert len(world.gateway._connections) == 1
    client.channel.lost()
    assert client.channel.state is CLOSED
    assert world.gateway._connections == set()


# --- PUBLISH --------------------------------------------------------------------------------


async def test_qos0_publish_returns_nothing_once_rights_are_cached(
    world: World, side: Side, watch: BusSubscription
) -> None:
    client = await connected(side, world.publisher)
    first = client.channel.handle(Publish(TOPIC, b"1"))
    assert first is not None  # the rights are not cached yet: the gateway is awaited
    await first
    assert client.channel.handle(Publish(TOPIC, b"2")) is None  # the hot path: no work left
    assert client.wire.packets(4) == []
    assert [m.payload for m in drain(watch)] == [b"1", b"2"]


async def test_publish_acknowledged(world: World, side: Side, watch: BusSubscription) -> None:
    client = await connected(side, world.publisher, "dev", 5)
    assert await client.handle(Publish(TOPIC, b"1", 1, packet_id=1)) == [PubAck(1)]
    assert await client.handle(Publish(TOPIC, b"2", 2, packet_id=2)) == [PubRec(2)]
    # a duplicate before PUBREL: acknowledged again, not published again
    assert await client.handle(Publish(TOPIC, b"2", 2, dup=True, packet_id=2)) == [PubRec(2)]
    assert await client.handle(PubRel(2)) == [PubComp(2)]
    assert await client.handle(PubRel(2)) == [PubComp(2, 0x92)]  # unknown now
    assert await client.handle(PingReq()) == [PingResp()]
    assert [m.payload for m in drain(watch)] == [b"1", b"2"]


@pytest.mark.parametrize("level", [4, 5])
async def test_publish_refused(
    world: World, side: Side, level: int, watch: BusSubscription
) -> None:
    """Not allowed: MQTT 5 QoS 1 PUBACK 0x87; QoS 0 DISCONNECT 0x87; 3.1.1 closes."""
    client = await connected(side, world.publisher, "dev", level)
    refused = await client.handle(Publish("m/acme/c/other/x", b"x", 1, packet_id=1))
    if level == 5:
        assert [(type(p), p.reason_code) for p in refused] == [(PubAck, 0x87)]  # type: ignore[union-attr]
        assert client.closed_with is None
        refused = await client.handle(Publish("m/acme/c/other/x", b"x"))
        assert [p.reason_code for p in refused] == [0x87]  # type: ignore[union-attr]
    else:
        assert refused == []
    assert client.closed_with == 0x87
    assert drain(watch) == []


async def test_topic_aliases(world: World, side: Side, watch: BusSubscription) -> None:
    client = await connected(side, world.publisher, "dev", 5)
    alias = Properties(topic_alias=3)
    for packet in (
        Publish("m/acme/c/temps/long/topic", b"1", properties=alias),
        Publish("", b"2", properties=alias),
        Publish("m/acme/c/temps/other", b"3", properties=alias),
        Publish("", b"4", 1, packet_id=1, properties=alias),
    ):
        await client.handle(packet)
    assert [(m.subtopic, m.payload) for m in drain(watch)] == [
        ("long/topic", b"1"),
        ("long/topic", b"2"),
        ("other", b"3"),
        ("other", b"4"),
    ]


@pytest.mark.parametrize(
    ("topic", "alias", "code", "text"),
    [
        (TOPIC, 9, 0x94, "topic alias 9 is not in 1..8"),
        (TOPIC, 0, 0x94, "topic alias 0 is not in 1..8"),
        ("", 2, 0x82, "topic alias 2 has no topic yet"),
    ],
)
async def test_topic_alias_refused(
    world: World, side: Side, watch: BusSubscription, topic: str, alias: int, code: int, text: str
) -> None:
    client = await connected(side, world.publisher, "dev", 5)
    packets = await client.handle(Publish(topic, b"x", properties=Properties(topic_alias=alias)))
    assert packets == [Disconnect(code, Properties(reason_string=text))]
    assert client.closed_with == code
    assert drain(watch) == []


async def test_payload_format_invalid(world: World, side: Side, watch: BusSubscription) -> None:
    client = await connected(side, world.publisher, "dev", 5)
    utf8 = Properties(payload_format_indicator=1)
    packets = await client.handle(Publish(TOPIC, b"\xff", 1, packet_id=1, properties=utf8))
    assert [(type(p), p.reason_code) for p in packets] == [(PubAck, 0x99)]  # type: ignore[union-attr]
    assert client.closed_with is None
    assert drain(watch) == []


async def test_server_receive_maximum(world: World, side: Side, watch: BusSubscription) -> None:
    """More QoS 2 messages awaiting PUBREL than the server's maximum (4): DISCONNECT 0x93."""
    client = await connected(side, world.publisher, "dev", 5)
    for i in range(1, 5):
        assert await client.handle(Publish(TOPIC, b"x", 2, packet_id=i)) == [PubRec(i)]
    packets = await client.handle(Publish(TOPIC, b"x", 2, packet_id=5))
    assert [p.reason_code for p in packets] == [0x93]  # type: ignore[union-attr]
    assert client.closed_with == 0x93
    assert len(drain(watch)) == 4


async def test_client_receive_maximum(world: World, side: Side) -> None:
    """The server never has more unacknowledged QoS 1 deliveries out than the client allows;
    and a congested connection gets no QoS 0 (dropped) while QoS 1 waits."""
    sub = side.client()
    await sub.connect(world.subscriber, "sub", 5, properties=Properties(receive_maximum=2))
    await sub.handle(Subscribe(1, [Subscription("m/acme/c/temps/#", 1)]))
    pub = await connected(side, world.publisher, "pub")
    for i in range(4):
        await pub.handle(Publish(TOPIC, b"%d" % i, 1, packet_id=i + 1))
    first = sub.wire.packets(5)
    assert [p.payload for p in first] == [b"0", b"1"]  # type: ignore[union-attr]
    assert await sub.handle(PubAck(first[0].packet_id)) == [  # type: ignore[union-attr]
        Publish(TOPIC, b"2", 1, packet_id=3)
    ]
    sub.channel.congested = True
    await pub.handle(Publish(TOPIC, b"q0"))
    await pub.handle(Publish(TOPIC, b"q1", 1, packet_id=9))
    assert sub.wire.packets(5) == []
    sub.channel.congested = False
    sub.channel.writable()  # the window is full: nothing yet
    assert sub.wire.packets(5) == []
    sent = await sub.handle(PubAck(2)) + await sub.handle(PubAck(3))
    assert [p.payload for p in sent] == [b"3", b"q1"]  # type: ignore[union-attr]


# --- SUBSCRIBE ------------------------------------------------------------------------------


def test_shared_filters() -> None:
    assert shared("m/acme/c/temps/#") == (None, "m/acme/c/temps/#")
    assert shared("$share/g1/m/acme/c/temps/#") == ("g1", "m/acme/c/temps/#")
    for bad in ("$share/", "$share//m/acme/c/t", "$share/g+/m/acme/c/t", "$share/#/x", "$share/g"):
        assert shared(bad) is None, bad


@pytest.mark.parametrize("level", [4, 5])
async def test_subscribe_codes(world: World, side: Side, level: int) -> None:
    client = await connected(side, world.subscriber, "dev", level)
    filters = [
        "$share/g1/m/acme/c/temps/#",  # granted
        "$share//m/acme/c/temps/#",  # no group
        "$share/g+/m/acme/c/temps/#",  # wildcard in the group
        "m/acme/c/other/#",  # not allowed
        "m/acme/c/+/x",  # wildcard for the channel
        "m/acme/c/temps/#",  # granted
    ]
    (ack,) = await client.handle(Subscribe(1, [Subscription(f, 1) for f in filters]))
    assert isinstance(ack, SubAck)
    if level == 5:
        assert ack.reason_codes == [1, 0x8F, 0x8F, 0x87, 0x8F, 1]
        assert "is not $share/<group>/<filter>" in (ack.properties.reason_string or "")
    else:
        assert ack.reason_codes == [1, 0x80, 0x80, 0x80, 0x80, 1]
    assert refusals(world, "bad_topic") == 3
    assert refusals(world, "not_allowed") == 1
    assert await client.handle(Unsubscribe(2, ["m/acme/c/temps/#", "nothing"])) == [
        UnsubAck(2, [0, 0x11] if level == 5 else [])
    ]


# --- DISCONNECT and wills -------------------------------------------------------------------


@pytest.mark.parametrize(("reason_code", "published"), [(0, False), (0x04, True)])
async def test_disconnect_and_will(
    world: World, side: Side, watch: BusSubscription, reason_code: int, published: bool
) -> None:
    client = side.client()
    await client.connect(world.publisher, "dev", 5, will=Will(TOPIC, b"gone"))
    assert await client.handle(Disconnect(reason_code)) == []
    await side.settle()
    assert client.closed_with == 0
    assert [m.payload for m in drain(watch)] == ([b"gone"] if published else [])


async def test_lost_connection_publishes_the_will(
    world: World, side: Side, watch: BusSubscription
) -> None:
    client = side.client()
    await client.connect(world.publisher, "dev", 4, will=Will(TOPIC, b"gone"))
    client.channel.lost()
    await side.settle()
    assert [m.payload for m in drain(watch)] == [b"gone"]


async def test_session_resumed(world: World, side: Side) -> None:
    """Clean session 0: the second connection finds the subscription and what was queued."""
    first = side.client()
    await first.connect(world.subscriber, "sub", 4, clean=False)
    await first.handle(Subscribe(1, [Subscription("m/acme/c/temps/#", 1)]))
    await first.handle(Disconnect())
    pub = await connected(side, world.publisher, "pub")
    await pub.handle(Publish(TOPIC, b"kept", 1, packet_id=1))
    second = side.client()
    ack = await second.connect(world.subscriber, "sub", 4, clean=False)
    assert ack.session_present
    (delivery,) = second.backlog
    assert isinstance(delivery, Publish) and delivery.payload == b"kept"


# --- reason codes ---------------------------------------------------------------------------


def test_reason_code_mapping() -> None:
    assert v3_connack(ReasonCode.UNSUPPORTED_PROTOCOL_VERSION) == 1
    assert v3_connack(ReasonCode.CLIENT_IDENTIFIER_NOT_VALID) == 2
    assert v3_connack(ReasonCode.SERVER_UNAVAILABLE) == 3
    assert v3_connack(ReasonCode.BAD_USER_NAME_OR_PASSWORD) == 4
    assert v3_connack(ReasonCode.NOT_AUTHORIZED) == ReturnCode.NOT_AUTHORIZED
    assert v3_connack(ReasonCode.PACKET_TOO_LARGE) == 5  # 3.1.1 has no word for it
    assert for_disconnect(0x88) == 0x89  # Server unavailable is a CONNACK code
    assert for_disconnect(0x84) == 0x80
    assert for_disconnect(0x99) == 0x99
    assert for_connack(0x8E) == 0x80  # Session taken over is a DISCONNECT code
    assert for_connack(0x86) == 0x86
    assert for_suback(0x90) == 0x80
    assert for_suback(0x87) == 0x87


def test_options_refuse_what_mqtt_cannot_carry() -> None:
    with pytest.raises(ValueError, match="max_inflight"):
        Options(max_packet_size=1024, max_inflight=0)
    with pytest.raises(ValueError, match="max_inflight"):
        Options(max_packet_size=1024, max_inflight=0xFFFF)
