"""Reserved metadata keys (``mqtt:...``) cannot be forged: a client's MQTT 5 user properties
named with the reserved prefix are dropped, so they can neither silence another session's No
Local subscription, nor downgrade a delivery's QoS, nor pass a Response Topic the codec would
refuse, nor reach any subscriber. Other user properties travel unchanged."""

from __future__ import annotations

from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties as PahoProperties

from adapters.mqtt import MQTTAdapter
from adapters.mqtt.codec import (
    PingReq,
    PingResp,
    Properties,
    PubAck,
    PubComp,
    Publish,
    PubRec,
    PubRel,
    Will,
)
from core.bus import Subscription
from tests.conftest import World
from tests.mqtt.conftest import RawClient, connected, drain, paho_client, until

TOPIC = "m/acme/c/temps/a"


async def received_until(client: RawClient, last: bytes) -> list[Publish]:
    """The PUBLISHes the client receives up to the one with payload ``last`` (acknowledged;
    PUBACKs of its own publishes are skipped)."""
    got: list[Publish] = []
    while True:
        packet = await client.recv()
        if isinstance(packet, PubAck):
            continue
        assert isinstance(packet, Publish), packet
        got.append(packet)
        if packet.qos == 1:
            await client.send(PubAck(packet.packet_id))
        if packet.payload == last:
            return got


async def test_no_local_cannot_be_silenced_by_a_forged_client_property(
    world: World, raw: Any, mqtt_adapter: MQTTAdapter, watch: Subscription
) -> None:
    """A's No Local subscription still drops A's own messages and still receives every message
    of B, although B sends ``mqtt:client`` user properties with A's real token and with every
    token a sequential counter would have given out."""
    a = await connected(raw, world.both, "a", 5)
    await a.subscribe("m/acme/c/temps/#", qos=1, no_local=True)
    token = mqtt_adapter.sessions[(world.both.id, "a")].token
    b = await connected(raw, world.publisher, "b", 5)
    candidates = [token, *(str(i) for i in range(1, 201))]
    for i, candidate in enumerate(candidates):
        props = Properties(user_properties=(("mqtt:client", candidate),))
        assert await b.publish(TOPIC, candidate.encode(), 1, i + 1, properties=props) == PubAck(
            i + 1
        )
    await a.send(Publish(TOPIC, b"own", 1, packet_id=1))  # A's own: not delivered to A
    assert await b.publish(TOPIC, b"end", 1, 1) == PubAck(1)
    got = await received_until(a, b"end")
    assert [p.payload.decode() for p in got] == [*candidates, "end"]
    assert all(p.properties.user_properties == () for p in got)
    # what other protocols see: no forged key
    messages = drain(watch)
    assert len(messages) == len(candidates) + 2
    forged = [m for m in messages if m.publisher == world.publisher.id]
    assert [m.metadata for m in forged] == [{"mqtt:qos": "1"}] * (len(candidates) + 1)


async def test_qos_cannot_be_downgraded_by_a_user_property(
    world: World, mqtt_adapter: MQTTAdapter, raw: Any
) -> None:
    """paho publishes at QoS 2 with the user property ``mqtt:qos=0``: a QoS 2 subscriber gets
    it at QoS 2."""
    sub = await connected(raw, world.subscriber, "sub", 5)
    await sub.subscribe("m/acme/c/temps/#", qos=2)
    props = PahoProperties(PacketTypes.PUBLISH)
    props.UserProperty = ("mqtt:qos", "0")
    props.UserProperty = ("site", "lab")
    with paho_client(mqtt_adapter.port, world.publisher, "pub", protocol=paho.MQTTv5) as pub:
        await until(lambda: pub.connack)
        info = pub.client.publish(TOPIC, b"exactly once", qos=2, properties=props)
        await until(lambda: info.mid in pub.acked)
    got = await sub.recv()
    assert isinstance(got, Publish) and got.payload == b"exactly once"
    assert got.qos == 2
    assert got.properties.user_properties == (("site", "lab"),)
    await sub.send(PubRec(got.packet_id))


async def test_response_topic_user_property_is_not_a_response_topic(
    world: World, raw: Any, watch: Subscription
) -> None:
    """A user property ``mqtt:response_topic`` with wildcards (the real property with
    wildcards is refused, 0x90) reaches no subscriber as a Response Topic."""
    sub = await connected(raw, world.subscriber, "sub", 5)
    await sub.subscribe("m/acme/c/temps/#", qos=1)
    pub = await connected(raw, world.publisher, "pub", 5)
    props = Properties(
        user_properties=(
            ("mqtt:response_topic", "m/acme/c/+/#"),
            ("mqtt:correlation_data", "AAE="),
        )
    )
    assert await pub.publish(TOPIC, b"request", 1, 1, properties=props) == PubAck(1)
    got = await sub.recv()
    assert isinstance(got, Publish) and got.payload == b"request"
    assert got.properties.response_topic is None
    assert got.properties.correlation_data is None
    assert got.properties.user_properties == ()
    await sub.send(PubAck(got.packet_id))
    (message,) = drain(watch)
    assert message.metadata == {"mqtt:qos": "1"}
    # the real property with a wildcard is still refused
    bad = Properties(response_topic="m/acme/c/+/#")
    await pub.send(Publish(TOPIC, b"x", 1, packet_id=2, properties=bad))
    (disconnect,) = await pub.until_closed()
    assert disconnect.reason_code == 0x90  # type: ignore[attr-defined]


async def test_subscribers_never_get_reserved_user_properties(
    world: World, raw: Any, watch: Subscription
) -> None:
    """Every user property named with the reserved prefix is dropped, for MQTT subscribers and
    for the other protocols (the message's metadata); the others arrive as sent, in order."""
    sub = await connected(raw, world.subscriber, "sub", 5)
    await sub.subscribe("m/acme/c/temps/#", qos=2)
    pub = await connected(raw, world.publisher, "pub", 5)
    users = (
        ("site", "lab"),
        ("mqtt:client", "1"),
        ("mqtt:qos", "0"),
        ("mqtt:retain", "1"),
        ("mqtt:expiry", "0"),
        ("mqtt:payload_format", "1"),
        ("mqtt:anything", "x"),
        ("unit", "Cel"),
        ("MQTT:qos", "kept: the prefix is lower case"),
    )
    answer = await pub.publish(TOPIC, b"\xff", 2, 1, properties=Properties(user_properties=users))
    assert isinstance(answer, PubRec) and answer.reason_code == 0
    got = await sub.recv()
    assert isinstance(got, Publish) and got.qos == 2 and not got.retain
    assert got.properties == Properties(
        user_properties=(
            ("site", "lab"),
            ("unit", "Cel"),
            ("MQTT:qos", "kept: the prefix is lower case"),
        )
    )
    (message,) = drain(watch)
    assert message.metadata == {
        "site": "lab",
        "unit": "Cel",
        "MQTT:qos": "kept: the prefix is lower case",
    }
    # and the subscriber is undisturbed
    await sub.send(PubRec(got.packet_id))
    assert await sub.recv() == PubRel(got.packet_id)
    await sub.send(PubComp(got.packet_id))
    await sub.send(PingReq())
    assert isinstance(await sub.recv(), PingResp)


async def test_will_user_properties_are_dropped_too(
    world: World, raw: Any, watch: Subscription
) -> None:
    """A will's user properties go through the same mapping."""
    users = (("mqtt:qos", "0"), ("mqtt:response_topic", "m/x/c/+"), ("k", "v"))
    will = Will(TOPIC, b"gone", qos=1, properties=Properties(user_properties=users))
    dev = await connected(raw, world.publisher, "dev", 5, will=will)
    await dev.close()  # no DISCONNECT: the will is published
    messages = await until(lambda: drain(watch))
    assert [(m.payload, m.metadata) for m in messages] == [(b"gone", {"k": "v", "mqtt:qos": "1"})]
