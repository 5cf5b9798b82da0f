"""Bad input over real sockets: each malformed packet gets the specification's answer (a reason
code where the version has one, then a close), is logged once, and never affects the server or
another session. Random input is thrown at the server with hypothesis (bounded in time); inputs
that once broke something are kept below as regression tests."""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adapters.mqtt.codec import (
    ConnAck,
    Connect,
    Disconnect,
    PingReq,
    PingResp,
    Properties,
    Publish,
    encode,
)
from core.bus import Subscription
from tests.conftest import World
from tests.mqtt.conftest import Closed, RawClient, connected, drain, refusals


@pytest.fixture
def mqtt_options() -> dict[str, Any]:
    return {"max_packet_size": 2048}


TOPIC = b"m/acme/c/temps/a"


def publish_bytes(
    topic: bytes, payload: bytes = b"x", first: int = 0x30, pid: bytes = b""
) -> bytes:
    body = len(topic).to_bytes(2, "big") + topic + pid + payload
    return bytes((first, len(body))) + body


# (name, bytes after CONNECT (or {level: bytes}), 5.0 reason code, refusal reason)
BAD_PACKETS = [
    ("reserved type 0", b"\x00\x00", 0x81, "malformed_packet"),
    ("SUBSCRIBE flags 0000", b"\x80\x06\x00\x01\x00\x01a\x00", 0x81, "malformed_packet"),
    ("PUBREL flags 0000", b"\x60\x02\x00\x01", 0x81, "malformed_packet"),
    ("PINGREQ flags set", b"\xc1\x00", 0x81, "malformed_packet"),
    ("PUBLISH QoS 3", publish_bytes(TOPIC, first=0x36, pid=b"\x00\x01"), 0x81, "malformed_packet"),
    ("PUBLISH DUP on QoS 0", publish_bytes(TOPIC, first=0x38), 0x81, "malformed_packet"),
    ("remaining length of 5 bytes", b"\x30\xff\xff\xff\xff\x01", 0x81, "malformed_packet"),
    ("remaining length not minimal", b"\xc0\x80\x00", 0x81, "malformed_packet"),
    ("topic not UTF-8", publish_bytes(b"m/acme/c/temps/\xc3\x28"), 0x81, "malformed_packet"),
    ("NUL in topic", publish_bytes(b"m/acme/c/temps/a\x00b"), 0x81, "malformed_packet"),
    ("topic runs past the end", b"\x30\x04\x00\x10ab", 0x81, "malformed_packet"),
    ("packet id 0", publish_bytes(TOPIC, first=0x32, pid=b"\x00\x00"), 0x82, "protocol_error"),
    ("PUBACK packet id 0", b"\x40\x02\x00\x00", 0x82, "protocol_error"),
    (
        "SUBSCRIBE without filter",
        {4: b"\x82\x02\x00\x01", 5: b"\x82\x03\x00\x01\x00"},
        0x82,
        "protocol_error",
    ),
    (
        "wildcard in topic",
        {4: publish_bytes(b"m/acme/c/temps/#"), 5: publish_bytes(b"m/acme/c/temps/#", b"\x00x")},
        0x90,
        "bad_topic",
    ),
    ("oversized", b"\x30\x80\x20" + b"\x00" * 10, 0x95, "too_large"),
    ("server packet PINGRESP", b"\xd0\x00", 0x82, "protocol_error"),
]


@pytest.mark.parametrize("level", [4, 5])
@pytest.mark.parametrize(
    ("name", "data", "code", "reason"), BAD_PACKETS, ids=[b[0] for b in BAD_PACKETS]
)
async def test_bad_packet_after_connect(
    world: World,
    raw: Any,
    watch: Subscription,
    mqtt_log: pytest.LogCaptureFixture,
    level: int,
    name: str,
    data: bytes | dict[int, bytes],
    code: int,
    reason: str,
) -> None:
    if isinstance(data, dict):
        data = data[level]
    bystander = await connected(raw, world.both, "bystander", level)
    await bystander.subscribe("m/acme/c/temps/#")
    client = await connected(raw, world.both, "bad", level)
    await client.send(data)
    packets = await client.until_closed()
    if level == 5:
        assert len(packets) == 1 and isinstance(packets[0], Disconnect), packets
        assert packets[0].reason_code == code
        assert packets[0].properties.reason_string
    else:
        assert packets == []
    assert refusals(world, reason) == 1
    logged = [r for r in mqtt_log.records if r.getMessage().startswith("refused mqtt")]
    assert len(logged) == 1 and f"reason={reason}" in logged[0].getMessage()
    assert drain(watch) == []
    # the other session is untouched
    await bystander.publish("m/acme/c/temps/a", b"still here")
    got = await bystander.recv()
    assert isinstance(got, Publish) and got.payload == b"still here"


@pytest.mark.parametrize(
    ("name", "connect", "answer"),
    [
        # level 5 CONNECT with its reserved flag set: CONNACK 0x81
        ("reserved flag v5", b"\x10\x0d\x00\x04MQTT\x05\x03\x00\x00\x00\x00\x00", b"\x20"),
        # level 4: no code for it, close
        ("reserved flag v4", b"\x10\x0c\x00\x04MQTT\x04\x03\x00\x00\x00\x00", b""),
        # unknown property in a level 5 CONNECT: CONNACK 0x81
        (
            "unknown property v5",
            b"\x10\x0f\x00\x04MQTT\x05\x02\x00\x00\x02\x7f\x00\x00\x00",
            b"\x20",
        ),
        # protocol name not MQTT
        ("protocol name", b"\x10\x0c\x00\x04MQXX\x04\x02\x00\x00\x00\x00", b""),
        # oversized CONNECT: the version is not known yet, close
        ("oversized", b"\x10\x80\x20", b""),
    ],
)
async def test_bad_connect(
    world: World, port: int, raw: Any, name: str, connect: bytes, answer: bytes
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(connect)
    data = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    if answer:
        client = RawClient(reader, writer, 5)
        client.decoder.feed(data)
        ack = client.decoder.next_packet()
        assert isinstance(ack, ConnAck) and ack.reason_code == 0x81, ack
        assert ack.properties.reason_string
    else:
        assert data == b""
    await connected(raw, world.publisher, "fine")


async def test_many_bad_connections_at_once(world: World, port: int, raw: Any) -> None:
    async def bad(i: int) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"\x10\x0c\x00\x04MQTT\x04\x02\x00\x00\x00\x00" + bytes([i % 256]) * 8)
        data = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        return data

    await asyncio.gather(*(bad(i) for i in range(50)))
    await connected(raw, world.publisher, "fine")


# --- fuzzing the server -------------------------------------------------------------------

# Edge cases kept as regression tests; an input the fuzzer below ever finds breaking the server
# goes here. Each must leave the connection answered or closed and the server serving.
CRASHERS: list[bytes] = [
    b"\xe0\x01\x00",  # DISCONNECT with a reason code at level 4
    b"\xf0\x00",  # AUTH
    b"\x62\x02\x00\x01\x62\x02\x00\x01",  # PUBREL for nothing, twice
    b"\x82\x05\x00\x01\x00\x00\x00",  # SUBSCRIBE of an empty filter
    b"\xa2\x04\x00\x01\x00\x00",  # UNSUBSCRIBE of an empty filter
    b"\x82\x0b\x00\x01\x00\x06$share\x00",  # "$share" alone
    b"\x82\x0c\x00\x01\x00\x07$share/\x00",  # "$share/" without a group
]


@pytest.mark.parametrize("data", CRASHERS)
async def test_crashers(world: World, raw: Any, data: bytes) -> None:
    client = await connected(raw, world.both, "fuzz", 4)
    await client.send(data + b"\xc0\x00")  # then a PINGREQ: answered unless closed
    try:
        while not isinstance(await client.recv(timeout=5), PingResp):
            pass
    except Closed:
        pass
    await client.close()
    other = await connected(raw, world.both, "other", 4)
    await other.send(PingReq())
    assert isinstance(await other.recv(), PingResp)


_packet = st.one_of(
    st.binary(max_size=64),
    st.sampled_from(
        [
            encode(Publish("m/acme/c/temps/a", b"x", 1, packet_id=1), 5),
            encode(Publish("m/acme/c/temps/a", b"x", 2, packet_id=2), 5),
            b"\x82\x13\x00\x01\x00\x00\x10m/acme/c/temps/#\x01",
            b"\x62\x02\x00\x02",
            b"\xc0\x00",
        ]
    ),
)


@settings(
    max_examples=int(os.environ.get("MQTT_FUZZ_EXAMPLES", "50")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(chunks=st.lists(_packet, min_size=1, max_size=6))
async def test_fuzz_server(
    world: World, port: int, caplog: pytest.LogCaptureFixture, chunks: list[bytes]
) -> None:
    caplog.set_level(logging.WARNING, logger="conduit")
    client = await RawClient.open(port, 5)
    await client.send(
        encode(Connect(5, True, 0, "fuzz", world.both.id, world.both.secret.encode()), 5)
    )
    for chunk in chunks:
        try:
            await client.send(chunk)
        except ConnectionError:
            break
    try:  # read what the server answers, until it closes or goes quiet
        while True:
            await client.recv(timeout=0.05)
    except Exception:
        pass
    await client.close()
    # the server still serves
    probe = await RawClient.open(port, 5)
    ack = await probe.connect(world.both, "probe", properties=Properties())
    assert ack.reason_code == 0
    await probe.send(PingReq())
    assert isinstance(await probe.recv(), PingResp)
    await probe.close()
    # nothing went wrong inside the server (an unexpected exception is logged as an error)
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []
