"""MQTT 5 properties end to end: user properties, content type, request/response, payload
format indicator, message expiry, topic aliases, receive maximum both ways, maximum packet size,
server keep alive."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from adapters.mqtt.codec import (
    Disconnect,
    PingReq,
    PingResp,
    Properties,
    PubAck,
    Publish,
    PubRec,
)
from core.bus import Subscription
from tests.conftest import World
from tests.mqtt.conftest import RawClient, connected, drain


@pytest.fixture
def mqtt_options() -> dict[str, Any]:
    return {"max_inflight": 4, "max_keep_alive": 60, "topic_alias_maximum": 8}


async def quiet(client: RawClient) -> None:
    await client.send(PingReq())
    assert isinstance(await client.recv(), PingResp)


async def test_properties_end_to_end(world: World, raw: Any, watch: Subscription) -> None:
    sub = await connected(raw, world.subscriber, "sub", 5)
    await sub.subscribe("m/acme/c/temps/#", qos=1)
    pub = await connected(raw, world.publisher, "pub", 5)
    props = Properties(
        payload_format_indicator=1,
        content_type="application/json",
        response_topic="m/acme/c/temps/replies",
        correlation_data=b"\x00\x01req-7",
        user_properties=(("site", "lab"), ("unit", "Cel")),
    )
    assert await pub.publish("m/acme/c/temps/a", b'{"t": 21}', 1, 1, properties=props) == PubAck(1)
    got = await sub.recv()
    assert isinstance(got, Publish)
    assert got.properties == props
    # in the gateway's envelope: metadata other protocols can read
    (message,) = drain(watch)
    assert message.content_type == "application/json"
    assert message.metadata == {
        "site": "lab",
        "unit": "Cel",
        "mqtt:response_topic": "m/acme/c/temps/replies",
        "mqtt:correlation_data": "AAFyZXEtNw==",
        "mqtt:payload_format": "1",
        "mqtt:qos": "1",
    }


async def test_v311_subscriber_gets_payload_only(world: World, raw: Any) -> None:
    sub = await connected(raw, world.subscriber, "sub", 4, keep_alive=30)
    await sub.subscribe("m/acme/c/temps/#")
    pub = await connected(raw, world.publisher, "pub", 5)
    props = Properties(content_type="text/plain", user_properties=(("a", "b"),))
    await pub.publish("m/acme/c/temps/a", b"hi", properties=props)
    got = await sub.recv()
    assert isinstance(got, Publish) and got.payload == b"hi"


async def test_message_expiry(world: World, raw: Any) -> None:
    await_sub = await connected(
        raw,
        world.subscriber,
        "sub",
        5,
        clean=False,
        properties=Properties(session_expiry_interval=60),
    )
    await await_sub.subscribe("m/acme/c/temps/#", qos=1)
    await await_sub.disconnect()
    pub = await connected(raw, world.publisher, "pub", 5)
    await pub.publish(
        "m/acme/c/temps/a", b"short", 1, 1, properties=Properties(message_expiry_interval=1)
    )
    await pub.publish(
        "m/acme/c/temps/a", b"long", 1, 2, properties=Properties(message_expiry_interval=100)
    )
    await asyncio.sleep(1.1)
    sub: RawClient = await raw(5)
    await sub.connect(world.subscriber, "sub", clean=False)
    got = await sub.recv()
    assert isinstance(got, Publish) and got.payload == b"long"
    assert got.properties.message_expiry_interval is not None
    assert 0 < got.properties.message_expiry_interval < 100  # the time it has left
    await sub.send(PubAck(got.packet_id))
    await quiet(sub)


async def test_topic_alias(world: World, raw: Any, watch: Subscription) -> None:
    pub = await connected(raw, world.publisher, "pub", 5)
    await pub.publish("m/acme/c/temps/long/topic", b"1", properties=Properties(topic_alias=3))
    await pub.publish("", b"2", properties=Properties(topic_alias=3))
    await pub.publish("m/acme/c/temps/other", b"3", properties=Properties(topic_alias=3))
    assert await pub.publish("", b"4", 1, 1, properties=Properties(topic_alias=3)) == PubAck(1)
    assert [(m.subtopic, m.payload) for m in drain(watch)] == [
        ("long/topic", b"1"),
        ("long/topic", b"2"),
        ("other", b"3"),
        ("other", b"4"),
    ]


@pytest.mark.parametrize(
    ("topic", "alias", "code"),
    [("m/acme/c/temps/a", 9, 0x94), ("m/acme/c/temps/a", 0, 0x94), ("", 2, 0x82)],
)
async def test_topic_alias_refused(
    world: World, raw: Any, watch: Subscription, topic: str, alias: int, code: int
) -> None:
    pub = await connected(raw, world.publisher, "pub", 5)
    await pub.publish(topic, b"x", properties=Properties(topic_alias=alias))
    packets = await pub.until_closed()
    assert len(packets) == 1 and isinstance(packets[0], Disconnect)
    assert packets[0].reason_code == code
    assert drain(watch) == []


async def test_subscription_identifier_from_client_is_protocol_error(
    world: World, raw: Any
) -> None:
    pub = await connected(raw, world.publisher, "pub", 5)
    await pub.publish(
        "m/acme/c/temps/a", b"x", properties=Properties(subscription_identifiers=(1,))
    )
    packets = await pub.until_closed()
    assert [p.reason_code for p in packets] == [0x82]  # type: ignore[union-attr]


async def test_client_receive_maximum(world: World, raw: Any) -> None:
    """The server never has more unacknowledged QoS 1 messages out than the client allows."""
    sub = await connected(raw, world.subscriber, "sub", 5, properties=Properties(receive_maximum=2))
    await sub.subscribe("m/acme/c/temps/#", qos=1)
    pub = await connected(raw, world.publisher, "pub", 5)
    for i in range(5):
        await pub.publish("m/acme/c/temps/a", b"%d" % i, 1, i + 1)
    first = [await sub.recv(), await sub.recv()]
    with pytest.raises(TimeoutError):
        await sub.recv(timeout=0.2)
    received = [p.payload for p in first]  # type: ignore[union-attr]
    for _ in range(3):
        await sub.send(PubAck(first.pop(0).packet_id))  # type: ignore[union-attr]
        first.append(await sub.recv())
        received.append(first[-1].payload)  # type: ignore[union-attr]
    assert received == [b"0", b"1", b"2", b"3", b"4"]


async def test_server_receive_maximum(world: World, raw: Any, watch: Subscription) -> None:
    """More QoS 2 messages awaiting PUBREL than the server's Receive Maximum (4): 0x93."""
    pub = await connected(raw, world.publisher, "pub", 5)
    for i in range(4):
        assert await pub.publish("m/acme/c/temps/a", b"x", 2, i + 1) == PubRec(i + 1)
    await pub.send(Publish("m/acme/c/temps/a", b"x", 2, packet_id=5))
    packets = await pub.until_closed()
    assert [p.reason_code for p in packets] == [0x93]  # type: ignore[union-attr]
    assert len(drain(watch)) == 4


async def test_client_maximum_packet_size(world: World, raw: Any) -> None:
    sub = await connected(
        raw, world.subscriber, "sub", 5, properties=Properties(maximum_packet_size=100)
    )
    await sub.subscribe("m/acme/c/temps/#", qos=1)
    pub = await connected(raw, world.publisher, "pub", 5)
    await pub.publish("m/acme/c/temps/a", b"x" * 200, 1, 1)
    await pub.publish("m/acme/c/temps/a", b"small", 1, 2)
    got = await sub.recv()
    assert isinstance(got, Publish) and got.payload == b"small"  # the big one was discarded


async def test_server_keep_alive(world: World, raw: Any) -> None:
    client: RawClient = await raw(5)
    ack = await client.connect(world.publisher, "dev", keep_alive=0)
    assert ack.properties.server_keep_alive == 60
    client2: RawClient = await raw(5)
    ack = await client2.connect(world.publisher, "dev2", keep_alive=30)
    assert ack.properties.server_keep_alive is None


async def test_keep_alive_above_maximum_v311_is_rc_2(world: World, raw: Any) -> None:
    client: RawClient = await raw(4)
    ack = await client.connect(world.publisher, "dev", keep_alive=600)
    assert ack.reason_code == 2


async def test_content_type_of_other_protocols(world: World, raw: Any, http: str) -> None:
    import aiohttp

    sub = await connected(raw, world.subscriber, "sub", 5)
    await sub.subscribe("m/acme/c/temps/#")
    async with aiohttp.ClientSession() as session:
        r = await session.post(
            f"{http}/m/acme/c/temps/h",
            data=b'[{"n":"t","v":1}]',
            headers={
                "Authorization": f"Client {world.publisher.secret}",
                "Content-Type": "application/senml+json",
            },
        )
        assert r.status == 202
    got = await sub.recv()
    assert isinstance(got, Publish)
    assert got.properties.content_type == "application/senml+json"
    assert got.qos == 0
