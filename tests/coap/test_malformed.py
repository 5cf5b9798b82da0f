"""Malformed datagrams never take the server down: garbage, truncations, bit flips and
reserved or ill-typed fields, sent raw over UDP; after each batch a real client still publishes
and observes, and nothing the garbage carried was published."""

from __future__ import annotations

import logging
import random

import aiocoap
import pytest
from aiocoap.numbers.codes import Code

from adapters.coap import CoAPAdapter
from core.bus import Subscription
from core.noise import SAMPLE
from tests.coap.conftest import Observer, RawClient, drain, request
from tests.conftest import World


def valid_post(secret: str) -> bytes:
    message = aiocoap.Message(
        code=Code.POST,
        uri_path=("m", "acme", "c", "temps", "x"),
        uri_query=(f"auth={secret}",),
        content_format=110,
        payload=b'[{"n":"t","v":1}]',
    )
    message.mtype, message.mid, message.token = aiocoap.CON, 0x1234, b"\x01\x02"
    return message.encode()


def option(delta: int, value: bytes) -> bytes:
    assert delta < 13 and len(value) < 13
    return bytes([delta << 4 | len(value)]) + value


HEADER = b"\x42\x01\x00\x01\xaa\xbb"  # CON GET, MID 1, 2-byte token
# fmt: off
CRAFTED = [
    b"",
    b"\x40",
    b"\x40\x01\x00",
    b"\x00\x01\x00\x01",  # version 0
    b"\xc0\x01\x00\x01",  # version 3
    b"\x4f\x01\x00\x01" + b"\x00" * 15,  # token length 15 (reserved)
    b"\x49\x01\x00\x01" + b"\x00" * 9,  # token length 9 (reserved)
    HEADER + b"\xff",  # payload marker, no payload
    HEADER + b"\xf0",  # option delta 15 (reserved)
    HEADER + b"\x0f",  # option length 15 (reserved)
    HEADER + b"\xd1",  # extended delta byte missing
    HEADER + b"\xb5m",  # Uri-Path claims 5 bytes, has 1
    HEADER + option(11, b"m") + option(0, b"\xff\xfe") + option(0, b"c"),  # not UTF-8
    HEADER + option(11, b"m") + option(0, b"a") + option(0, b"c") + option(0, b"t")
    + option(4, b"auth=\xc3\x28"),  # Uri-Query not UTF-8
    HEADER + option(6, b"\x01\x02\x03\x04\x05") + option(5, b"m"),  # Observe of 5 bytes
    HEADER + option(6, b"\x00") + option(5, b"m") + option(0, b"a") + option(0, b"c")
    + option(0, b"t") + b"\xd3\x0a\xff\xff\xff\xff",  # Observe 0, Block2 of 4 bytes
    HEADER + option(9, b"x") + option(2, b"m"),  # option 9: unknown and critical
    HEADER + option(11, b"m") + option(1, b"\x00\x01\x02\x03\x04"),  # Content-Format 5 bytes
    b"\x42\x45\x00\x02\xaa\xbb",  # a CON 2.05 response nobody asked for
    b"\x60\x00\x00\x03",  # an ACK for nothing
    b"\x70\x00\x00\x04",  # a RST for nothing
    b"\x40\x00\x00\x05\xff",  # an empty message with a payload marker
    b"\x50\x01\x00\x06",  # NON GET without options
    b"\x44\x02\x00\x07abcd" + option(11, b"m") + option(0, b"acme") + option(0, b"c")
    + option(0, b"temps") + b"\xff" + b"\x00" * 1400,  # no credentials, big payload
]
# fmt: on


async def still_serves(world: World, coap: str, client: aiocoap.Context) -> None:
    url = f"{coap}/m/acme/c/temps/ok?auth={world.publisher.secret}"
    response = await request(client, Code.POST, url, b"still here", content_format=0)
    assert response.code == Code.CHANGED


@pytest.fixture(autouse=True)
def no_unhandled_errors(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR)


def unhandled(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


async def test_crafted_datagrams(
    world: World,
    coap: str,
    raw: RawClient,
    client: aiocoap.Context,
    watch: Subscription,
    caplog: pytest.LogCaptureFixture,
) -> None:
    for datagram in CRAFTED:
        raw.send_raw(datagram)
    await still_serves(world, coap, client)
    assert [m.payload for m in drain(watch)] == [b"still here"]
    assert unhandled(caplog) == []


async def test_random_bytes(
    world: World,
    coap: str,
    raw: RawClient,
    client: aiocoap.Context,
    watch: Subscription,
    caplog: pytest.LogCaptureFixture,
) -> None:
    rng = random.Random(5683)
    for _ in range(2000):
        size = rng.choice((rng.randrange(0, 16), rng.randrange(0, 1500)))
        datagram = rng.randbytes(size)
        if rng.random() < 0.5 and size >= 4:  # a valid version: further into the parser
            datagram = bytes([0x40 | datagram[0] & 0x3F]) + datagram[1:]
        raw.send_raw(datagram)
    await still_serves(world, coap, client)
    assert [m.payload for m in drain(watch)] == [b"still here"]
    assert unhandled(caplog) == []


async def test_truncations_and_bit_flips(
    world: World,
    coap: str,
    raw: RawClient,
    client: aiocoap.Context,
    caplog: pytest.LogCaptureFixture,
) -> None:
    good = valid_post(world.publisher.secret)
    for end in range(len(good)):
        raw.send_raw(good[:end])
    for bit in range(len(good) * 8):
        flipped = bytearray(good)
        flipped[bit // 8] ^= 1 << (bit % 8)
        flipped[2:4] = (bit + 2).to_bytes(2, "big")  # fresh message ids: no deduplication
        raw.send_raw(bytes(flipped))
    await still_serves(world, coap, client)
    assert unhandled(caplog) == []


async def test_observer_survives_garbage(
    world: World,
    coap: str,
    coap_adapter: CoAPAdapter,
    client: aiocoap.Context,
    caplog: pytest.LogCaptureFixture,
) -> None:
    observer = Observer(client, f"{coap}/m/acme/c/temps/%23?auth={world.subscriber.secret}")
    await observer.first()
    attacker = await RawClient.connect(coap_adapter.port)
    try:
        for datagram in CRAFTED:
            attacker.send_raw(datagram)
    finally:
        attacker.close()
    await still_serves(world, coap, client)
    assert (await observer.next()).payload == b"still here"
    assert unhandled(caplog) == []


async def test_garbage_is_counted_and_logged_as_a_sample(
    world: World,
    coap: str,
    raw: RawClient,
    client: aiocoap.Context,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Each unparsable datagram is a counted refusal; the log gets a sample, not a WARNING per
    datagram (aiocoap writes one for each)."""
    caplog.set_level(logging.DEBUG)
    n = 5 * SAMPLE
    for i in range(n):
        raw.send_raw(b"\x00\x01" + i.to_bytes(2, "big"))  # CoAP version 0: unparsable
    bad_utf8 = HEADER + option(11, b"m") + option(0, b"\xff\xfe")
    raw.send_raw(bad_utf8)  # an option that is not UTF-8: aiocoap raises instead of logging
    await still_serves(world, coap, client)
    refusals = world.gateway.metrics.refusals.labels("coap", "malformed_datagram")
    assert refusals.value == n + 1
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    sampled = [r for r in caplog.records if "malformed_datagram" in r.getMessage()]
    assert len(sampled) == SAMPLE


async def test_block_size_exponent_7_is_refused(
    world: World, raw: RawClient, watch: Subscription
) -> None:
    """SZX 7 is reserved over UDP (RFC 7959 sec 2.2): 4.00, not 2.31 Continue."""
    path = ("m", "acme", "c", "temps", "big")
    query = (f"auth={world.publisher.secret}",)
    raw.send(aiocoap.Message(code=Code.POST, uri_path=path, uri_query=query,
                             block1=(0, True, 7), payload=b"x" * 1024))  # fmt: skip
    answer = await raw.recv()
    assert answer.code == Code.BAD_REQUEST
    assert answer.payload == b"Block1 size exponent 7 is reserved over UDP (RFC 7959 sec 2.2):" \
        b" use 0 to 6"
    raw.send(aiocoap.Message(code=Code.GET, uri_path=path,
                             uri_query=(f"auth={world.subscriber.secret}",),
                             block2=(0, False, 7)))  # fmt: skip
    assert (await raw.recv()).code == Code.BAD_REQUEST
    assert drain(watch) == []
    assert world.gateway.metrics.refusals.labels("coap", "malformed_request").value == 2
