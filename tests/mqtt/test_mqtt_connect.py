"""CONNECT: authentication and every CONNACK code (3.1.1 return codes, 5.0 reason codes) of the
error table and of the protocol, client identifiers, takeover, CONNECT timeout, keep-alive."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from adapters.mqtt import MQTTAdapter
from adapters.mqtt.codec import (
    ConnAck,
    Connect,
    Disconnect,
    PingReq,
    PingResp,
    Properties,
    Will,
    encode,
)
from tests.conftest import Party, World
from tests.mqtt.conftest import RawClient, connected, refusals


@pytest.fixture
def mqtt_options() -> dict[str, Any]:
    return {"connect_timeout": 0.5}


def v5_reason(ack: ConnAck) -> str | None:
    return ack.properties.reason_string


# (who, password override, 3.1.1 return code, 5.0 reason code, refusal reason, 5.0 text)
AUTH_REFUSALS = [
    (
        "none",
        None,
        4,
        0x86,
        "no_credentials",
        "no password: send the client secret as the password",
    ),
    (
        "empty",
        b"",
        4,
        0x86,
        "no_credentials",
        "no password: send the client secret as the password",
    ),
    ("wrong", b"not-a-secret", 4, 0x86, "bad_credentials", "unknown or disabled client"),
    ("mismatch", None, 4, 0x86, "bad_credentials", "client id does not match the secret"),
    ("binary", b"\xff\xfe", 4, 0x86, "bad_credentials", "the password is not UTF-8"),
]


@pytest.mark.parametrize("level", [4, 5])
@pytest.mark.parametrize(("who", "password", "rc3", "rc5", "reason", "text"), AUTH_REFUSALS)
async def test_authentication_refusals(
    world: World,
    raw: Any,
    level: int,
    who: str,
    password: bytes | None,
    rc3: int,
    rc5: int,
    reason: str,
    text: str,
) -> None:
    client: RawClient = await raw(level)
    party: Party | None = world.publisher
    if who == "none":
        await client.send(Connect(level, True, 0, "dev", world.publisher.id, None))
        ack = await client.recv()
    else:
        if who == "mismatch":
            party = Party(world.subscriber.id, world.publisher.secret)
        ack = await client.connect(party, "dev", password=password)
    assert isinstance(ack, ConnAck)
    assert not ack.session_present
    if level == 4:
        assert ack.reason_code == rc3
    else:
        assert ack.reason_code == rc5
        assert v5_reason(ack) == text
    assert await client.until_closed() == []
    assert refusals(world, reason) == 1


@pytest.mark.parametrize("level", [4, 5])
async def test_store_unavailable_is_connack_3_or_0x88(world: World, raw: Any, level: int) -> None:
    await world.gateway.store.close()
    client: RawClient = await raw(level)
    ack = await client.connect(world.publisher, "dev")
    assert ack.reason_code == (3 if level == 4 else 0x88)
    if level == 5:
        assert v5_reason(ack) == "store is not open"
    assert await client.until_closed() == []
    assert refusals(world, "unavailable") == 1


@pytest.mark.parametrize("level", [4, 5])
async def test_accepted(world: World, raw: Any, level: int) -> None:
    client = await connected(raw, world.publisher, "dev", level)
    await client.send(PingReq())
    assert isinstance(await client.recv(), PingResp)


async def test_connack_properties_v5(world: World, raw: Any, mqtt_adapter: MQTTAdapter) -> None:
    client: RawClient = await raw(5)
    ack = await client.connect(world.publisher, "dev")
    assert ack.reason_code == 0
    props = ack.properties
    assert props.receive_maximum == mqtt_adapter.max_inflight
    assert props.maximum_packet_size == mqtt_adapter.max_packet_size
    assert props.topic_alias_maximum == mqtt_adapter.topic_alias_maximum
    assert props.assigned_client_identifier is None


async def test_empty_client_id_v5_gets_assigned_one(world: World, raw: Any) -> None:
    client: RawClient = await raw(5)
    ack = await client.connect(world.publisher, "")
    assert ack.reason_code == 0
    assigned = ack.properties.assigned_client_identifier
    assert assigned and assigned.startswith("conduit-")
    other: RawClient = await raw(5)
    ack2 = await other.connect(world.publisher, "")
    assert ack2.properties.assigned_client_identifier not in (None, assigned)


async def test_empty_client_id_v311_with_clean_session(world: World, raw: Any) -> None:
    client: RawClient = await raw(4)
    ack = await client.connect(world.publisher, "", clean=True)
    assert ack.reason_code == 0


async def test_empty_client_id_v311_without_clean_session_is_rc_2(world: World, raw: Any) -> None:
    client: RawClient = await raw(4)
    ack = await client.connect(world.publisher, "", clean=False)
    assert ack.reason_code == 2
    assert await client.until_closed() == []
    assert refusals(world, "identifier_rejected") == 1


def connect_bytes(name: bytes, level: int) -> bytes:
    body = len(name).to_bytes(2, "big") + name + bytes((level, 0x02, 0, 0, 0, 0))
    return bytes((0x10, len(body))) + body


@pytest.mark.parametrize(
    ("name", "level", "answer"),
    [
        (b"MQTT", 3, b"\x20\x02\x00\x01"),  # 3.1.1 format, return code 1
        (b"MQIsdp", 3, b"\x20\x02\x00\x01"),  # MQTT 3.1
        (b"MQTT", 6, b"\x20\x03\x00\x84\x00"),  # a later version: 5.0 format, 0x84
    ],
)
async def test_unknown_protocol_level(
    world: World, port: int, name: bytes, level: int, answer: bytes
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(connect_bytes(name, level))
    data = await asyncio.wait_for(reader.read(), 5)  # everything until the server closes
    assert data == answer
    writer.close()
    assert refusals(world, "unsupported_protocol_version") == 1


async def test_first_packet_not_connect_is_closed(world: World, raw: Any) -> None:
    client: RawClient = await raw(4)
    await client.send(PingReq())
    assert await client.until_closed() == []
    assert refusals(world, "protocol_error") == 1


@pytest.mark.parametrize("level", [4, 5])
async def test_second_connect(world: World, raw: Any, level: int) -> None:
    client = await connected(raw, world.publisher, "dev", level)
    await client.send(Connect(level, True, 0, "dev", world.publisher.id, b"x"))
    packets = await client.until_closed()
    if level == 4:
        assert packets == []
    else:
        assert packets == [Disconnect(0x82, Properties(reason_string="a second CONNECT"))]


async def test_enhanced_authentication_is_0x8c(world: World, raw: Any) -> None:
    client: RawClient = await raw(5)
    ack = await client.connect(
        world.publisher, "dev", properties=Properties(authentication_method="SCRAM-SHA-1")
    )
    assert ack.reason_code == 0x8C
    assert "not supported" in (v5_reason(ack) or "")


async def test_connect_timeout(world: World, port: int, raw: Any) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"\x10")  # a CONNECT that never completes
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()
    assert refusals(world, "connect_timeout") == 1
    # others are served meanwhile and after
    await connected(raw, world.publisher, "dev")


@pytest.mark.parametrize("level", [4, 5])
async def test_keep_alive_enforced(world: World, raw: Any, level: int) -> None:
    client = await connected(raw, world.publisher, "dev", level, keep_alive=1)
    # one ping keeps it alive, then silence: closed after 1.5 x keep alive
    await client.send(PingReq())
    assert isinstance(await client.recv(), PingResp)
    packets = await client.until_closed(timeout=10)
    if level == 5:
        assert packets == [Disconnect(0x8D, Properties(reason_string="keep alive timeout"))]
    else:
        assert packets == []
    assert refusals(world, "keep_alive_timeout") == 1


@pytest.mark.parametrize("level", [4, 5])
async def test_takeover(world: World, raw: Any, level: int) -> None:
    first = await connected(raw, world.publisher, "dev", level)
    second = await connected(raw, world.publisher, "dev", level)
    packets = await first.until_closed()
    if level == 5:
        assert [p.reason_code for p in packets] == [0x8E]  # type: ignore[union-attr]
    else:
        assert packets == []
    await second.send(PingReq())
    assert isinstance(await second.recv(), PingResp)


async def test_same_client_id_of_another_client_is_not_a_takeover(world: World, raw: Any) -> None:
    first = await connected(raw, world.publisher, "dev")
    await connected(raw, world.subscriber, "dev")
    await first.send(PingReq())
    assert isinstance(await first.recv(), PingResp)


@pytest.mark.parametrize("level", [4, 5])
@pytest.mark.parametrize(
    ("topic", "rc3", "rc5", "reason"),
    [
        ("m/acme/c/other/x", 5, 0x87, "not_allowed"),  # not connected to that channel
        ("m/acme/c", 5, 0x90, "bad_topic"),
        ("elsewhere/x", 5, 0x90, "not_found"),
    ],
)
async def test_will_refused_at_connect(
    world: World, raw: Any, level: int, topic: str, rc3: int, rc5: int, reason: str
) -> None:
    client: RawClient = await raw(level)
    ack = await client.connect(world.publisher, "dev", will=Will(topic, b"gone"))
    assert ack.reason_code == (rc3 if level == 4 else rc5)
    assert await client.until_closed() == []
    assert refusals(world, reason) == 1


async def test_will_payload_format_invalid_is_0x99(world: World, raw: Any) -> None:
    client: RawClient = await raw(5)
    will = Will("m/acme/c/temps/w", b"\xff", properties=Properties(payload_format_indicator=1))
    ack = await client.connect(world.publisher, "dev", will=will)
    assert ack.reason_code == 0x99


async def test_connect_pipelined_with_packets(world: World, port: int) -> None:
    """CONNECT, SUBSCRIBE and PINGREQ in one write: handled in order after authentication."""
    client = await RawClient.open(port, 4)
    from adapters.mqtt.codec import Subscribe, Subscription

    data = b"".join(
        encode(p, 4)
        for p in (
            Connect(4, True, 0, "dev", world.both.id, world.both.secret.encode()),
            Subscribe(1, [Subscription("m/acme/c/temps/#", 1)]),
            PingReq(),
        )
    )
    await client.send(data)
    kinds = [type(await client.recv()).__name__ for _ in range(3)]
    assert kinds == ["ConnAck", "SubAck", "PingResp"]
    await client.close()


async def test_server_keeps_serving_while_one_connect_is_slow(world: World, raw: Any) -> None:
    """A connection that sent half a CONNECT holds nothing up."""
    slow: RawClient = await raw(4)
    await slow.send(b"\x10\x20\x00\x04MQ")
    client = await connected(raw, world.publisher, "dev")
    await client.send(PingReq())
    assert isinstance(await client.recv(), PingResp)
    with pytest.raises(TimeoutError):  # still waiting for its CONNECT to complete
        await slow.recv(timeout=0.2)
