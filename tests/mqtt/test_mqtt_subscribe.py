"""SUBSCRIBE and UNSUBSCRIBE: SUBACK codes per filter (refusals counted once), wildcards,
retained messages (kept in the store, across a restart), MQTT 5 subscription options (No Local,
Retain As Published, Retain Handling), subscription identifiers and shared subscriptions."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from adapters.mqtt import MQTTAdapter
from adapters.mqtt.codec import PingReq, PingResp, Properties, Publish, UnsubAck, Unsubscribe
from tests.conftest import World, make_gateway, provision
from tests.mqtt.conftest import Closed, RawClient, connected, refusals


async def quiet(client: RawClient) -> None:
    """Nothing more arrives: a ping is answered and no PUBLISH came before it."""
    await client.send(PingReq())
    assert isinstance(await client.recv(), PingResp)


# (client, filter, 3.1.1 code, 5.0 code, refusal reason)
SUBSCRIBE_REFUSALS = [
    ("publisher", "m/acme/c/temps/#", 0x80, 0x87, "not_allowed"),
    ("both", "m/acme/c/other/#", 0x80, 0x87, "not_allowed"),
    ("both", "m/globex/c/temps", 0x80, 0x87, "not_allowed"),
    ("both", "m/acme/c/+", 0x80, 0x8F, "bad_topic"),
    ("both", "m/+/c/temps", 0x80, 0x8F, "bad_topic"),
    ("both", "m/acme/c/temps/a/#/b", 0x80, 0x8F, "bad_topic"),
    ("both", "#", 0x80, 0x8F, "not_found"),
    ("both", "$share/g", 0x80, 0x8F, "bad_topic"),
]


@pytest.mark.parametrize("level", [4, 5])
@pytest.mark.parametrize(("who", "flt", "rc3", "rc5", "reason"), SUBSCRIBE_REFUSALS)
async def test_subscribe_refusals(
    world: World, raw: Any, level: int, who: str, flt: str, rc3: int, rc5: int, reason: str
) -> None:
    client = await connected(raw, getattr(world, who), "dev", level)
    suback = await client.subscribe(flt, "m/acme/c/temps/ok", qos=1, packet_id=3)
    ok = 1 if who == "both" else 0x80 if level == 4 else 0x87
    assert suback.packet_id == 3
    assert suback.reason_codes == [rc3 if level == 4 else rc5, ok]
    if level == 5:
        assert suback.properties.reason_string
    assert refusals(world, reason) == (1 if who == "both" else 2)  # each refusal once
    await quiet(client)  # the connection stays up


async def test_request_problem_information_0_leaves_reason_strings_out(
    world: World, raw: Any
) -> None:
    client = await connected(
        raw, world.both, "dev", 5, properties=Properties(request_problem_information=0)
    )
    suback = await client.subscribe("m/acme/c/other/#")
    assert suback.reason_codes == [0x87]
    assert suback.properties.reason_string is None


@pytest.mark.parametrize("level", [4, 5])
async def test_wildcards_in_subtopic(world: World, raw: Any, level: int) -> None:
    sub = await connected(raw, world.both, "sub", level)
    assert (await sub.subscribe("m/acme/c/temps/+/t", "m/acme/c/temps")).reason_codes == [0, 0]
    pub = await connected(raw, world.both, "pub", level)
    for topic in ("m/acme/c/temps/a/t", "m/acme/c/temps/a/b", "m/acme/c/temps", "m/acme/c/x"):
        if topic.startswith("m/acme/c/temps"):
            await pub.publish(topic, topic.encode())
    got = [await sub.recv(), await sub.recv()]
    assert sorted(p.topic for p in got) == ["m/acme/c/temps", "m/acme/c/temps/a/t"]  # type: ignore[union-attr]
    await quiet(sub)


@pytest.mark.parametrize("level", [4, 5])
async def test_unsubscribe(world: World, raw: Any, level: int) -> None:
    sub = await connected(raw, world.both, "sub", level)
    await sub.subscribe("m/acme/c/temps/#")
    await sub.send(Unsubscribe(9, ["m/acme/c/temps/#", "m/acme/c/temps/none"]))
    ack = await sub.expect(UnsubAck)
    assert ack.packet_id == 9
    assert ack.reason_codes == ([] if level == 4 else [0x00, 0x11])
    pub = await connected(raw, world.both, "pub", level)
    await pub.publish("m/acme/c/temps/a", b"x")
    await quiet(sub)


async def test_resubscribe_replaces_options(world: World, raw: Any) -> None:
    sub = await connected(raw, world.both, "sub", 4)
    await sub.subscribe("m/acme/c/temps/#", qos=0)
    assert (await sub.subscribe("m/acme/c/temps/#", qos=1, packet_id=2)).reason_codes == [1]
    pub = await connected(raw, world.both, "pub", 4)
    await pub.publish("m/acme/c/temps/a", b"x", 1, packet_id=1)
    got = await sub.recv()
    assert isinstance(got, Publish) and got.qos == 1  # once, at the new QoS
    await quiet(sub)


# --- retained -----------------------------------------------------------------------------


@pytest.mark.parametrize("level", [4, 5])
async def test_retained_sent_on_subscribe(world: World, raw: Any, level: int) -> None:
    pub = await connected(raw, world.both, "pub", level)
    await pub.publish("m/acme/c/temps/r1", b"one", 1, packet_id=1, retain=True)
    await pub.publish("m/acme/c/temps/r2", b"two", 1, packet_id=2, retain=True)
    await pub.publish("m/acme/c/temps/r2", b"", 1, packet_id=3, retain=True)  # cleared
    await pub.publish("m/acme/c/temps/r3", b"live", 1, packet_id=4)  # not retained
    sub = await connected(raw, world.both, "sub", level)
    await sub.subscribe("m/acme/c/temps/#", qos=1)
    got = await sub.recv()
    assert isinstance(got, Publish)
    assert (got.topic, got.payload, got.retain, got.qos) == ("m/acme/c/temps/r1", b"one", True, 1)
    await quiet(sub)
    # live messages on an established subscription have retain 0 (3.1.1 3.3.1.3)
    await pub.publish("m/acme/c/temps/r1", b"again", 0, retain=True)
    live = await sub.recv()
    assert isinstance(live, Publish) and live.payload == b"again" and not live.retain


async def test_retained_survives_restart(tmp_path: Path) -> None:
    gateway = await make_gateway(tmp_path)
    world = await provision(gateway)
    adapter = MQTTAdapter(gateway, "127.0.0.1", 0, ws_port=None)
    await adapter.start()
    pub = await RawClient.open(adapter.port, 4)
    await pub.connect(world.publisher, "pub")
    await pub.publish("m/acme/c/temps/r", b"kept", 1, packet_id=1, retain=True)
    await pub.close()
    await adapter.stop(timeout=1)
    await gateway.close()

    gateway = await make_gateway(tmp_path)  # same SQLite file
    adapter = MQTTAdapter(gateway, "127.0.0.1", 0, ws_port=None)
    await adapter.start()
    try:
        sub = await RawClient.open(adapter.port, 4)
        await sub.connect(world.subscriber, "sub")
        await sub.subscribe("m/acme/c/temps/+")
        got = await sub.recv()
        assert isinstance(got, Publish) and (got.payload, got.retain) == (b"kept", True)
        await sub.close()
    finally:
        await adapter.stop(timeout=1)
        await gateway.close()


@pytest.mark.parametrize(("handling", "first", "again"), [(0, 1, 1), (1, 1, 0), (2, 0, 0)])
async def test_retain_handling(
    world: World, raw: Any, handling: int, first: int, again: int
) -> None:
    pub = await connected(raw, world.both, "pub", 5)
    await pub.publish("m/acme/c/temps/r", b"kept", 1, packet_id=1, retain=True)
    sub = await connected(raw, world.both, "sub", 5)
    for expected, packet_id in ((first, 1), (again, 2)):
        await sub.subscribe("m/acme/c/temps/#", packet_id=packet_id, retain_handling=handling)
        for _ in range(expected):
            got = await sub.recv()
            assert isinstance(got, Publish) and got.retain
        await quiet(sub)


async def test_retain_as_published(world: World, raw: Any) -> None:
    sub = await connected(raw, world.both, "sub", 5)
    await sub.subscribe("m/acme/c/temps/a", retain_as_published=True)
    await sub.subscribe("m/acme/c/temps/b", packet_id=2)
    pub = await connected(raw, world.both, "pub", 5)
    await pub.publish("m/acme/c/temps/a", b"x", retain=True)
    await pub.publish("m/acme/c/temps/b", b"y", retain=True)
    a, b = await sub.recv(), await sub.recv()
    assert isinstance(a, Publish) and isinstance(b, Publish)
    assert (a.topic, a.retain) == ("m/acme/c/temps/a", True)
    assert (b.topic, b.retain) == ("m/acme/c/temps/b", False)


# --- MQTT 5 subscription options ----------------------------------------------------------


async def test_no_local(world: World, raw: Any) -> None:
    me = await connected(raw, world.both, "me", 5)
    await me.subscribe("m/acme/c/temps/#", no_local=True)
    other = await connected(raw, world.both, "other", 5)
    await other.subscribe("m/acme/c/temps/#")
    await me.publish("m/acme/c/temps/a", b"mine")
    got = await other.recv()
    assert isinstance(got, Publish) and got.payload == b"mine"
    await quiet(me)
    await other.publish("m/acme/c/temps/a", b"theirs")
    got = await me.recv()
    assert isinstance(got, Publish) and got.payload == b"theirs"


async def test_subscription_identifiers(world: World, raw: Any) -> None:
    sub = await connected(raw, world.both, "sub", 5)
    await sub.subscribe("m/acme/c/temps/#", properties=Properties(subscription_identifiers=(42,)))
    await sub.subscribe("m/acme/c/temps/a", packet_id=2)  # none
    pub = await connected(raw, world.both, "pub", 5)
    await pub.publish("m/acme/c/temps/a", b"x")
    got = sorted(
        [await sub.recv(), await sub.recv()],
        key=lambda p: p.properties.subscription_identifiers,  # type: ignore[union-attr]
    )
    assert [p.properties.subscription_identifiers for p in got] == [(), (42,)]  # type: ignore[union-attr]


@pytest.mark.parametrize("level", [4, 5])
async def test_shared_subscription(world: World, raw: Any, level: int) -> None:
    a = await connected(raw, world.both, "a", level)
    b = await connected(raw, world.both, "b", level)
    for client in (a, b):
        assert (await client.subscribe("$share/workers/m/acme/c/temps/#", qos=1)).reason_codes == [
            1
        ]
    pub = await connected(raw, world.both, "pub", level)
    for i in range(4):
        await pub.publish("m/acme/c/temps/job", b"%d" % i, 1, packet_id=i + 1)
    got = []
    for client in (a, b):
        for _ in range(2):
            packet = await client.recv()
            assert isinstance(packet, Publish)
            got.append(packet.payload)
        await quiet(client)
    assert sorted(got) == [b"0", b"1", b"2", b"3"]  # each message to one member only
    await a.send(Unsubscribe(5, ["$share/workers/m/acme/c/temps/#"]))
    await a.expect(UnsubAck)


async def test_shared_subscription_gets_no_retained(world: World, raw: Any) -> None:
    pub = await connected(raw, world.both, "pub", 5)
    await pub.publish("m/acme/c/temps/r", b"kept", 1, packet_id=1, retain=True)
    sub = await connected(raw, world.both, "sub", 5)
    await sub.subscribe("$share/g/m/acme/c/temps/#")
    await quiet(sub)


async def test_revoked_subscription_stops_delivering(world: World, raw: Any) -> None:
    sub = await connected(raw, world.subscriber, "sub", 5)
    await sub.subscribe("m/acme/c/temps/#")
    await world.gateway.provisioning.disconnect("acme", world.subscriber.id, "temps")
    pub = await connected(raw, world.publisher, "pub", 5)
    await pub.publish("m/acme/c/temps/a", b"x", 1, packet_id=1)
    with pytest.raises((TimeoutError, Closed)):
        await sub.recv(timeout=0.3)
