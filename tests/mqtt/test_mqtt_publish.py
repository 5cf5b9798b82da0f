"""PUBLISH both ways at QoS 0, 1 and 2, and every refusal of a publish: the exact answer
(PUBACK/PUBREC or DISCONNECT reason code in 5.0, a close in 3.1.1), counted once, nothing
published."""

from __future__ import annotations

import json
from typing import Any

import pytest

from adapters.mqtt.codec import (
    Disconnect,
    PingReq,
    PingResp,
    Properties,
    PubAck,
    PubComp,
    Publish,
    PubRec,
    PubRel,
    encode,
)
from core.bus import Subscription
from core.limits import Limits
from tests.conftest import World
from tests.mqtt.conftest import RawClient, connected, drain, refusals, until

SENML = json.dumps([{"n": "temp", "u": "Cel", "v": 21.5}]).encode()


@pytest.fixture
def limits() -> Limits:
    return Limits(max_payload=1024)


@pytest.mark.parametrize("level", [4, 5])
async def test_qos_0_1_2_in_and_out(world: World, raw: Any, level: int) -> None:
    sub = await connected(raw, world.subscriber, "sub", level)
    suback = await sub.subscribe("m/acme/c/temps/#", qos=2)
    assert suback.reason_codes == [2]
    pub = await connected(raw, world.publisher, "pub", level)
    await pub.publish("m/acme/c/temps/a", b"zero", 0)
    assert await pub.publish("m/acme/c/temps/a", b"one", 1, packet_id=7) == PubAck(7)
    assert await pub.publish("m/acme/c/temps/a", b"two", 2, packet_id=8) == PubRec(8)
    await pub.send(PubRel(8))
    assert await pub.recv() == PubComp(8)

    got = [await sub.recv() for _ in range(3)]
    assert [(p.topic, p.payload, p.qos) for p in got] == [  # type: ignore[union-attr]
        ("m/acme/c/temps/a", b"zero", 0),
        ("m/acme/c/temps/a", b"one", 1),
        ("m/acme/c/temps/a", b"two", 2),
    ]
    one, two = got[1], got[2]
    assert isinstance(one, Publish) and isinstance(two, Publish)
    assert not one.retain and not one.dup
    await sub.send(PubAck(one.packet_id))
    await sub.send(PubRec(two.packet_id))
    assert await sub.recv() == PubRel(two.packet_id)
    await sub.send(PubComp(two.packet_id))
    await sub.send(PingReq())
    assert isinstance(await sub.recv(), PingResp)


async def test_qos2_duplicate_is_published_once(
    world: World, raw: Any, watch: Subscription
) -> None:
    pub = await connected(raw, world.publisher, "pub", 5)
    assert await pub.publish("m/acme/c/temps/a", b"once", 2, packet_id=3) == PubRec(3)
    await pub.send(Publish("m/acme/c/temps/a", b"once", 2, False, True, 3))  # DUP resend
    assert await pub.recv() == PubRec(3)
    await pub.send(PubRel(3))
    assert await pub.recv() == PubComp(3)
    await pub.send(PubRel(3))  # unknown now
    assert await pub.recv() == PubComp(3, 0x92)
    assert [m.payload for m in drain(watch)] == [b"once"]


async def test_delivery_qos_is_minimum_of_publish_and_subscription(world: World, raw: Any) -> None:
    sub = await connected(raw, world.subscriber, "sub", 4)
    await sub.subscribe("m/acme/c/temps/#", qos=1)
    pub = await connected(raw, world.publisher, "pub", 4)
    await pub.publish("m/acme/c/temps/a", b"q0", 0)
    await pub.publish("m/acme/c/temps/a", b"q2", 2, packet_id=1)
    first, second = await sub.recv(), await sub.recv()
    assert isinstance(first, Publish) and isinstance(second, Publish)
    assert (first.qos, second.qos) == (0, 1)


async def test_unacknowledged_qos1_waits_in_window(world: World, raw: Any) -> None:
    """Packet ids are distinct while in flight and reused only after the acknowledgement."""
    sub = await connected(raw, world.subscriber, "sub", 4)
    await sub.subscribe("m/acme/c/temps/#", qos=1)
    pub = await connected(raw, world.publisher, "pub", 4)
    for i in range(5):
        await pub.publish("m/acme/c/temps/a", b"%d" % i, 1, packet_id=i + 1)
    got = [await sub.recv() for _ in range(5)]
    ids = [p.packet_id for p in got]  # type: ignore[union-attr]
    assert len(set(ids)) == 5 and 0 not in ids
    assert [p.payload for p in got] == [b"0", b"1", b"2", b"3", b"4"]  # type: ignore[union-attr]


# --- refusals -----------------------------------------------------------------------------

# (client, topic, payload, 5.0 code, refusal reason, reason string)
PUBLISH_REFUSALS = [
    (
        "subscriber",
        "m/acme/c/temps/a",
        b"x",
        0x87,
        "not_allowed",
        "client may not publish on channel 'temps'",
    ),
    (
        "both",
        "m/acme/c/other/a",
        b"x",
        0x87,
        "not_allowed",
        "client may not publish on channel 'other'",
    ),
    ("both", "m/globex/c/temps/a", b"x", 0x87, "not_allowed", "client is not in domain 'globex'"),
    ("both", "m/acme/c/temps//a", b"x", 0x90, "bad_topic", "subtopic level 1 is empty"),
    (
        "both",
        "m/acme/c",
        b"x",
        0x90,
        "bad_topic",
        "topic 'm/acme/c' is not of the form m/<domain>/c/<channel>[/<subtopic>...]",
    ),
    (
        "both",
        "devices/x",
        b"x",
        0x90,
        "not_found",
        "topic 'devices/x' is not of the form m/<domain>/c/<channel>[/<subtopic>...]",
    ),
]


@pytest.mark.parametrize(("who", "topic", "payload", "code", "reason", "text"), PUBLISH_REFUSALS)
@pytest.mark.parametrize("qos", [1, 2])
async def test_publish_refused_v5_with_ack_code(
    world: World,
    raw: Any,
    watch: Subscription,
    who: str,
    topic: str,
    payload: bytes,
    code: int,
    reason: str,
    text: str,
    qos: int,
) -> None:
    client = await connected(raw, getattr(world, who), "dev", 5)
    answer = await client.publish(topic, payload, qos, packet_id=5)
    ack = PubAck if qos == 1 else PubRec
    assert answer == ack(5, code, Properties(reason_string=text))
    # the connection stays up, and nothing was published
    await client.send(PingReq())
    assert isinstance(await client.recv(), PingResp)
    assert drain(watch) == []
    assert refusals(world, reason) == 1


@pytest.mark.parametrize(("who", "topic", "payload", "code", "reason", "text"), PUBLISH_REFUSALS)
async def test_publish_refused_v5_qos0_is_disconnect(
    world: World,
    raw: Any,
    watch: Subscription,
    who: str,
    topic: str,
    payload: bytes,
    code: int,
    reason: str,
    text: str,
) -> None:
    client = await connected(raw, getattr(world, who), "dev", 5)
    await client.publish(topic, payload, 0)
    assert await client.until_closed() == [Disconnect(code, Properties(reason_string=text))]
    assert drain(watch) == []
    assert refusals(world, reason) == 1


@pytest.mark.parametrize(("who", "topic", "payload", "code", "reason", "text"), PUBLISH_REFUSALS)
@pytest.mark.parametrize("qos", [0, 1])
async def test_publish_refused_v311_is_disconnect(
    world: World,
    raw: Any,
    watch: Subscription,
    who: str,
    topic: str,
    payload: bytes,
    code: int,
    reason: str,
    text: str,
    qos: int,
) -> None:
    client = await connected(raw, getattr(world, who), "dev", 4)
    await client.send(Publish(topic, payload, qos, packet_id=qos))
    assert await client.until_closed() == []
    assert drain(watch) == []
    assert refusals(world, reason) == 1


@pytest.mark.parametrize("level", [4, 5])
async def test_too_large_payload(world: World, raw: Any, watch: Subscription, level: int) -> None:
    """Above the gateway's payload limit (not the packet limit): 0x95 has no PUBACK form, so
    MQTT 5 gets DISCONNECT 0x95; 3.1.1 a close."""
    client = await connected(raw, world.both, "dev", level)
    await client.send(Publish("m/acme/c/temps/a", b"x" * 1025, 1, packet_id=1))
    packets = await client.until_closed()
    if level == 5:
        assert packets == [
            Disconnect(0x95, Properties(reason_string="payload of 1025 bytes exceeds 1024"))
        ]
    else:
        assert packets == []
    assert drain(watch) == []
    assert refusals(world, "too_large") == 1


async def test_invalid_senml_v5_is_puback_0x99(world: World, raw: Any, watch: Subscription) -> None:
    client = await connected(raw, world.both, "dev", 5)
    props = Properties(content_type="application/senml+json")
    bad = b'[{"n": "temp", "v": "warm"}]'
    answer = await client.publish("m/acme/c/temps/a", bad, 1, packet_id=2, properties=props)
    assert isinstance(answer, PubAck) and answer.reason_code == 0x99
    assert answer.properties.reason_string and "record 0" in answer.properties.reason_string
    assert drain(watch) == []
    # valid SenML passes, whatever the spelling of its content type
    props = Properties(content_type="Application/SenML+JSON; charset=utf-8")
    ok = await client.publish("m/acme/c/temps/a", SENML, 1, packet_id=3, properties=props)
    assert ok == PubAck(3)
    assert [m.content_type for m in drain(watch)] == ["application/senml+json"]
    assert refusals(world, "invalid_senml") == 1


async def test_payload_format_invalid_is_0x99(world: World, raw: Any, watch: Subscription) -> None:
    client = await connected(raw, world.both, "dev", 5)
    props = Properties(payload_format_indicator=1)
    answer = await client.publish("m/acme/c/temps/a", b"\xff\xfe", 1, packet_id=4, properties=props)
    assert isinstance(answer, PubAck) and answer.reason_code == 0x99
    assert drain(watch) == []
    assert refusals(world, "payload_format_invalid") == 1


@pytest.mark.parametrize("level", [4, 5])
async def test_store_unavailable_on_cold_publish(
    world: World, raw: Any, watch: Subscription, level: int
) -> None:
    """Rights not cached and the store down: 0x88 has no PUBACK or DISCONNECT form in MQTT 5,
    which gets DISCONNECT 0x89 (server busy); 3.1.1 a close."""
    client = await connected(raw, world.both, "dev", level)
    world.gateway.authorizer.invalidate()
    await world.gateway.store.close()
    await client.send(Publish("m/acme/c/temps/a", b"x", 1, packet_id=1))
    packets = await client.until_closed()
    if level == 5:
        assert len(packets) == 1 and isinstance(packets[0], Disconnect)
        assert packets[0].reason_code == 0x89
    else:
        assert packets == []
    assert drain(watch) == []
    assert refusals(world, "unavailable") == 1


async def test_refused_connection_does_not_affect_others(
    world: World, raw: Any, watch: Subscription
) -> None:
    good = await connected(raw, world.both, "good", 4)
    bad = await connected(raw, world.subscriber, "bad", 4)
    await bad.publish("m/acme/c/temps/a", b"no", 0)
    assert await bad.until_closed() == []
    await good.publish("m/acme/c/temps/a", b"yes", 1, packet_id=1)
    await until(lambda: [m.payload for m in drain(watch)] == [b"yes"])


class TestSenMLDefault:
    """A deployment where MQTT payloads default to SenML JSON (3.1.1 has no content type)."""

    @pytest.fixture
    def mqtt_options(self) -> dict[str, Any]:
        return {"content_type": "application/senml+json"}

    async def test_invalid_senml_v311_is_disconnect(
        self, world: World, raw: Any, watch: Subscription
    ) -> None:
        client = await connected(raw, world.both, "dev", 4)
        assert await client.publish("m/acme/c/temps/a", SENML, 1, packet_id=1) == PubAck(1)
        await client.send(Publish("m/acme/c/temps/a", b"not senml", 1, packet_id=2))
        assert await client.until_closed() == []
        assert [m.payload for m in drain(watch)] == [SENML]
        assert refusals(world, "invalid_senml") == 1

    async def test_invalid_senml_v5_qos0_is_disconnect_0x99(
        self, world: World, raw: Any, watch: Subscription
    ) -> None:
        client = await connected(raw, world.both, "dev", 5)
        await client.publish("m/acme/c/temps/a", b"[1]", 0)
        packets = await client.until_closed()
        assert len(packets) == 1 and isinstance(packets[0], Disconnect)
        assert packets[0].reason_code == 0x99
        assert drain(watch) == []


class TestRateLimit:
    @pytest.fixture
    def limits(self) -> Limits:
        return Limits(rate=0.001, burst=2)

    @pytest.mark.parametrize("level", [4, 5])
    async def test_rate_limited(
        self, world: World, raw: Any, watch: Subscription, level: int
    ) -> None:
        client = await connected(raw, world.both, "dev", level)
        for i in range(2):
            assert await client.publish("m/acme/c/temps/a", b"ok", 1, packet_id=i + 1) == PubAck(
                i + 1
            )
        if level == 5:
            answer = await client.publish("m/acme/c/temps/a", b"no", 1, packet_id=9)
            assert isinstance(answer, PubAck) and answer.reason_code == 0x97
        else:
            await client.send(Publish("m/acme/c/temps/a", b"no", 1, packet_id=9))
            assert await client.until_closed() == []
        assert [m.payload for m in drain(watch)] == [b"ok", b"ok"]
        assert refusals(world, "rate_limited") == 1


async def test_retained_publish_through_store(world: World, raw: Any) -> None:
    pub = await connected(raw, world.publisher, "pub", 4)
    assert await pub.publish("m/acme/c/temps/r", b"kept", 1, packet_id=1, retain=True) == PubAck(1)
    stored = await world.gateway.store.retained("acme", "temps")
    assert len(stored) == 1
    assert await pub.publish("m/acme/c/temps/r", b"", 1, packet_id=2, retain=True) == PubAck(2)
    assert await world.gateway.store.retained("acme", "temps") == []


async def test_publish_order_kept_across_cold_cache(world: World, raw: Any) -> None:
    """A publish whose rights are not cached goes the slow way; the ones behind it wait."""
    sub = await connected(raw, world.subscriber, "sub", 4)
    await sub.subscribe("m/acme/c/temps/#", qos=0)
    pub: RawClient = await connected(raw, world.publisher, "pub", 4)
    world.gateway.authorizer.invalidate()
    data = b"".join(encode(Publish("m/acme/c/temps/a", b"%d" % i), 4) for i in range(50))
    await pub.send(data)
    got = [await sub.recv() for _ in range(50)]
    assert [p.payload for p in got] == [b"%d" % i for i in range(50)]  # type: ignore[union-attr]
