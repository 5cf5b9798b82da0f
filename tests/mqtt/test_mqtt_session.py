"""Persistent sessions (3.1.1 clean session 0, MQTT 5 session expiry): subscriptions and QoS 1/2
messages kept for offline clients (bounded, drops counted), redelivery with DUP on resume, and
wills (MQTT 5 will delay)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from adapters.mqtt import MQTTAdapter
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
    Will,
)
from core.bus import Subscription
from tests.conftest import World
from tests.mqtt.conftest import RawClient, connected, drain, until


@pytest.fixture
def mqtt_options() -> dict[str, Any]:
    return {"max_queued": 3}


async def quiet(client: RawClient) -> None:
    await client.send(PingReq())
    assert isinstance(await client.recv(), PingResp)


def dropped(world: World) -> float:
    value = world.gateway.metrics.registry.get_sample_value(
        "conduit_dropped_total", {"protocol": "mqtt"}
    )
    return value or 0.0


async def offline_subscriber(raw: Any, world: World, level: int, **kw: Any) -> None:
    sub = await connected(raw, world.subscriber, "sub", level, clean=False, **kw)
    await sub.subscribe("m/acme/c/temps/#", qos=1)
    await sub.disconnect()


@pytest.mark.parametrize("level", [4, 5])
async def test_messages_queued_for_offline_client(
    world: World, raw: Any, level: int, mqtt_adapter: MQTTAdapter
) -> None:
    expiry = Properties(session_expiry_interval=60) if level == 5 else Properties()
    await offline_subscriber(raw, world, level, properties=expiry)
    await until(lambda: all(s.outlet is None for s in mqtt_adapter.sessions.values()))
    pub = await connected(raw, world.publisher, "pub", level)
    await pub.publish("m/acme/c/temps/a", b"q0", 0)  # QoS 0: not kept
    for i in range(5):  # only max_queued (3) are kept; the rest are counted drops
        await pub.publish("m/acme/c/temps/a", b"%d" % i, 1, packet_id=i + 1)
    assert dropped(world) == 2

    sub: RawClient = await raw(level)
    ack = await sub.connect(world.subscriber, "sub", clean=False, properties=expiry)
    assert ack.session_present
    got = [await sub.recv() for _ in range(3)]
    assert [p.payload for p in got] == [b"0", b"1", b"2"]  # type: ignore[union-attr]
    assert all(p.qos == 1 and not p.dup for p in got)  # type: ignore[union-attr]
    for p in got:
        await sub.send(PubAck(p.packet_id))  # type: ignore[union-attr]
    await quiet(sub)
    # the subscription is still there
    await pub.publish("m/acme/c/temps/a", b"live", 1, packet_id=9)
    live = await sub.recv()
    assert isinstance(live, Publish) and live.payload == b"live"


@pytest.mark.parametrize("level", [4, 5])
async def test_clean_start_discards_session(world: World, raw: Any, level: int) -> None:
    expiry = Properties(session_expiry_interval=60) if level == 5 else Properties()
    await offline_subscriber(raw, world, level, properties=expiry)
    sub: RawClient = await raw(level)
    ack = await sub.connect(world.subscriber, "sub", clean=True)
    assert not ack.session_present
    pub = await connected(raw, world.publisher, "pub", level)
    await pub.publish("m/acme/c/temps/a", b"x", 1, packet_id=1)
    await quiet(sub)  # no subscription any more


async def test_v5_session_expiry_zero_ends_with_connection(world: World, raw: Any) -> None:
    await offline_subscriber(raw, world, 5)  # no session expiry interval: 0
    sub: RawClient = await raw(5)
    ack = await sub.connect(world.subscriber, "sub", clean=False)
    assert not ack.session_present


async def test_v5_session_expires(world: World, raw: Any, mqtt_adapter: MQTTAdapter) -> None:
    await offline_subscriber(raw, world, 5, properties=Properties(session_expiry_interval=1))
    await until(lambda: not mqtt_adapter.sessions, timeout=5)
    sub: RawClient = await raw(5)
    ack = await sub.connect(world.subscriber, "sub", clean=False)
    assert not ack.session_present


async def test_v5_session_expiry_capped(world: World, raw: Any) -> None:
    sub: RawClient = await raw(5)
    ack = await sub.connect(
        world.subscriber, "sub", properties=Properties(session_expiry_interval=0xFFFFFFFF)
    )
    assert ack.properties.session_expiry_interval == 7 * 86_400


async def test_disconnect_can_set_expiry_to_zero(
    world: World, raw: Any, mqtt_adapter: MQTTAdapter
) -> None:
    sub = await connected(
        raw,
        world.subscriber,
        "sub",
        5,
        clean=False,
        properties=Properties(session_expiry_interval=60),
    )
    await sub.send(Disconnect(0, Properties(session_expiry_interval=0)))
    await until(lambda: not mqtt_adapter.sessions)


async def test_disconnect_cannot_set_expiry_after_zero(world: World, raw: Any) -> None:
    sub = await connected(raw, world.subscriber, "sub", 5)
    await sub.send(Disconnect(0, Properties(session_expiry_interval=60)))
    packets = await sub.until_closed()
    assert [p.reason_code for p in packets] == [0x82]  # type: ignore[union-attr]


@pytest.mark.parametrize("level", [4, 5])
async def test_inflight_redelivered_with_dup(world: World, raw: Any, level: int) -> None:
    expiry = Properties(session_expiry_interval=60) if level == 5 else Properties()
    sub = await connected(raw, world.subscriber, "sub", level, clean=False, properties=expiry)
    await sub.subscribe("m/acme/c/temps/#", qos=2)
    pub = await connected(raw, world.publisher, "pub", level)
    await pub.publish("m/acme/c/temps/a", b"one", 1, packet_id=1)
    await pub.publish("m/acme/c/temps/a", b"two", 2, packet_id=2)
    await pub.send(PubRel(2))
    first, second = await sub.recv(), await sub.recv()
    assert isinstance(first, Publish) and isinstance(second, Publish)
    assert (first.qos, second.qos) == (1, 2)
    await sub.send(PubRec(second.packet_id))  # QoS 2 half done, QoS 1 not acknowledged
    assert await sub.recv() == PubRel(second.packet_id)
    await sub.close()  # network failure

    again: RawClient = await raw(level)
    ack = await again.connect(world.subscriber, "sub", clean=False, properties=expiry)
    assert ack.session_present
    redo = [await again.recv(), await again.recv()]
    assert redo[0] == Publish(
        "m/acme/c/temps/a",
        b"one",
        1,
        False,
        True,
        first.packet_id,
        redo[0].properties,  # type: ignore[union-attr]
    )
    assert redo[1] == PubRel(second.packet_id)
    await again.send(PubAck(first.packet_id))
    await again.send(PubComp(second.packet_id))
    await quiet(again)


async def test_takeover_keeps_session(world: World, raw: Any) -> None:
    first = await connected(raw, world.subscriber, "sub", 4, clean=False)
    await first.subscribe("m/acme/c/temps/#", qos=1)
    second: RawClient = await raw(4)
    ack = await second.connect(world.subscriber, "sub", clean=False)
    assert ack.session_present
    assert await first.until_closed() == []
    pub = await connected(raw, world.publisher, "pub", 4)
    await pub.publish("m/acme/c/temps/a", b"x", 1, packet_id=1)
    got = await second.recv()
    assert isinstance(got, Publish) and got.payload == b"x"


# --- wills ---------------------------------------------------------------------------------

WILL = Will("m/acme/c/temps/status", b"gone", 1)


@pytest.mark.parametrize("level", [4, 5])
async def test_will_on_abnormal_close(
    world: World, raw: Any, watch: Subscription, level: int
) -> None:
    client = await connected(raw, world.publisher, "dev", level, will=WILL)
    await client.close()  # no DISCONNECT
    await until(lambda: [m.payload for m in watch._queue] == [b"gone"])
    (message,) = drain(watch)
    assert message.topic == "m/acme/c/temps/status"
    assert message.publisher == world.publisher.id


@pytest.mark.parametrize("level", [4, 5])
async def test_no_will_on_disconnect(
    world: World, raw: Any, watch: Subscription, level: int
) -> None:
    client = await connected(raw, world.publisher, "dev", level, will=WILL)
    await client.disconnect()
    other = await connected(raw, world.both, "other", level)
    await other.publish("m/acme/c/temps/x", b"after", 1, packet_id=1)
    await until(lambda: len(watch._queue) == 1)
    assert [m.payload for m in drain(watch)] == [b"after"]


async def test_will_on_disconnect_with_will_message(
    world: World, raw: Any, watch: Subscription
) -> None:
    client = await connected(raw, world.publisher, "dev", 5, will=WILL)
    await client.disconnect(0x04)
    await until(lambda: [m.payload for m in watch._queue] == [b"gone"])


async def test_will_on_protocol_error(world: World, raw: Any, watch: Subscription) -> None:
    client = await connected(raw, world.publisher, "dev", 4, will=WILL)
    await client.send(b"\xf0\x00")  # AUTH does not exist in 3.1.1
    assert await client.until_closed() == []
    await until(lambda: [m.payload for m in watch._queue] == [b"gone"])


async def test_will_delay_cancelled_by_reconnect(
    world: World, raw: Any, watch: Subscription
) -> None:
    will = Will(
        "m/acme/c/temps/status",
        b"gone",
        1,
        properties=Properties(will_delay_interval=30),
    )
    expiry = Properties(session_expiry_interval=60)
    client = await connected(
        raw, world.publisher, "dev", 5, clean=False, will=will, properties=expiry
    )
    await client.close()
    await asyncio.sleep(0.1)
    back: RawClient = await raw(5)
    ack = await back.connect(world.publisher, "dev", clean=False, properties=expiry)
    assert ack.session_present
    await back.disconnect()
    await asyncio.sleep(0.1)
    assert drain(watch) == []


async def test_will_delay_published_when_session_ends_first(
    world: World, raw: Any, watch: Subscription
) -> None:
    will = Will(
        "m/acme/c/temps/status",
        b"gone",
        1,
        properties=Properties(will_delay_interval=30),
    )
    client = await connected(
        raw, world.publisher, "dev", 5, will=will, properties=Properties(session_expiry_interval=1)
    )
    await client.close()
    await until(lambda: [m.payload for m in watch._queue] == [b"gone"])


async def test_retained_will_with_properties(world: World, raw: Any) -> None:
    will = Will(
        "m/acme/c/temps/status",
        b"offline",
        1,
        True,
        Properties(content_type="text/plain", user_properties=(("why", "lost"),)),
    )
    client = await connected(raw, world.publisher, "dev", 5, will=will)
    await client.close()
    for _ in range(500):  # the will is published (and kept) once the server sees the close
        if await world.gateway.store.retained("acme", "temps"):
            break
        await asyncio.sleep(0.01)
    sub = await connected(raw, world.subscriber, "sub", 5)
    await sub.subscribe("m/acme/c/temps/status")
    got = await sub.recv()
    assert isinstance(got, Publish) and got.retain and got.payload == b"offline"
    assert got.properties.content_type == "text/plain"
    assert got.properties.user_properties == (("why", "lost"),)
