"""Block-wise transfers (RFC 7959) both ways: a large publish in Block1 blocks, the latest large
message in Block2 blocks, and large notifications: first block with the notification, the rest
fetched with GETs, never mixed with the next notification."""

from __future__ import annotations

import json

import aiocoap
import aiohttp
from aiocoap.numbers.codes import Code

from core.bus import Subscription
from core.credentials import Credentials
from tests.coap.conftest import Observer, RawClient, drain, request
from tests.conftest import World

# 200 records, about 5 kB: five 1024-byte blocks.
BIG = json.dumps([{"n": f"t{i}", "u": "Cel", "v": 20 + i / 10} for i in range(200)]).encode()
PATH = ("m", "acme", "c", "temps", "big")


async def test_block1_publish(
    world: World, coap: str, client: aiocoap.Context, watch: Subscription
) -> None:
    assert len(BIG) > 4096
    url = f"{coap}/m/acme/c/temps/big?auth={world.publisher.secret}"
    response = await request(client, Code.POST, url, BIG, content_format=110)
    assert response.code == Code.CHANGED
    [msg] = drain(watch)
    assert (msg.payload, msg.content_type, msg.subtopic) == (
        BIG, "application/senml+json", "big",
    )  # fmt: skip


async def test_block2_get_latest(world: World, coap: str, client: aiocoap.Context) -> None:
    url = f"{coap}/m/acme/c/temps/big"
    await request(client, Code.POST, f"{url}?auth={world.publisher.secret}", BIG,
                  content_format=110)  # fmt: skip
    response = await request(client, Code.GET, f"{url}?auth={world.subscriber.secret}")
    assert response.code == Code.CONTENT
    assert (response.payload, response.opt.content_format) == (BIG, 110)


async def test_block2_get_in_small_blocks(world: World, raw: RawClient) -> None:
    ident = await world.gateway.authenticate(Credentials(world.publisher.secret))
    await world.gateway.publish(ident, "/".join(PATH), BIG, "application/senml+json", "http")
    query = (f"auth={world.subscriber.secret}",)
    received = b""
    number = 0
    while True:  # the client asks for 64-byte blocks (SZX 2)
        raw.send(
            aiocoap.Message(
                code=Code.GET, uri_path=PATH, uri_query=query, block2=(number, False, 2)
            )
        )
        block = await raw.recv()
        assert block.code == Code.CONTENT
        assert block.opt.block2.block_number == number
        assert block.opt.block2.size_exponent == 2
        received += block.payload
        if not block.opt.block2.more:
            break
        assert len(block.payload) == 64
        number += 1
    assert received == BIG


async def test_large_notifications_cross_protocol(
    world: World, coap: str, http: str, client: aiocoap.Context
) -> None:
    observer = Observer(client, f"{coap}/m/acme/c/temps/%23?auth={world.subscriber.secret}")
    await observer.first()
    second = BIG.replace(b"Cel", b"K\x00\x00")  # same size, other bytes: ETags tell them apart
    headers = {"Authorization": f"Client {world.publisher.secret}"}
    async with aiohttp.ClientSession(headers=headers) as session:
        for body, ct in ((BIG, "application/senml+json"), (second, "application/octet-stream"),
                         (b"small", "text/plain")):  # fmt: skip
            async with session.post(f"{http}/m/acme/c/temps/big", data=body,
                                    headers={"Content-Type": ct}) as r:  # fmt: skip
                assert r.status == 202
    notes = [await observer.next() for _ in range(3)]
    assert [(n.payload, n.opt.content_format) for n in notes] == [
        (BIG, 110),
        (second, 42),
        (b"small", 0),
    ]
    numbers = [n.opt.observe for n in notes]
    assert numbers == sorted(numbers) and len(set(numbers)) == 3


async def test_registration_answered_block_wise(
    world: World, coap: str, client: aiocoap.Context
) -> None:
    url = f"{coap}/m/acme/c/temps/big"
    await request(client, Code.POST, f"{url}?auth={world.publisher.secret}", BIG,
                  content_format=110)  # fmt: skip
    observer = Observer(client, f"{url}?auth={world.subscriber.secret}")
    first = await observer.first()
    assert (first.code, first.payload, first.opt.content_format) == (Code.CONTENT, BIG, 110)
    await request(client, Code.POST, f"{url}?auth={world.publisher.secret}", b"next",
                  content_format=0)  # fmt: skip
    assert (await observer.next()).payload == b"next"


async def test_notification_blocks_on_the_wire(world: World, raw: RawClient) -> None:
    """What a constrained observer sees: it registers asking for 64-byte blocks, gets the first
    block with the notification (Block2, ETag, Size2), fetches the rest with plain GETs."""
    query = (f"auth={world.subscriber.secret}",)
    raw.send(
        aiocoap.Message(
            code=Code.GET, uri_path=PATH, uri_query=query, observe=0, block2=(0, False, 2)
        ),
        token=b"\x0b",
    )
    await raw.recv()
    ident = await world.gateway.authenticate(Credentials(world.publisher.secret))
    await world.gateway.publish(ident, "/".join(PATH), BIG, "application/senml+json", "http")
    note = await raw.recv()
    assert note.mtype == aiocoap.CON and note.token == b"\x0b"
    assert note.opt.observe is not None
    assert note.opt.block2 == (0, True, 2)
    assert note.opt.size2 == len(BIG)
    assert note.opt.content_format == 110
    etag = note.opt.etag
    assert etag
    raw.ack(note)
    received = note.payload
    number = 1
    while True:
        raw.send(
            aiocoap.Message(
                code=Code.GET, uri_path=PATH, uri_query=query, block2=(number, False, 2)
            ),
            token=b"\x0c",
        )
        block = await raw.recv()
        assert (block.code, block.opt.etag, block.opt.block2.block_number) == (
            Code.CONTENT, etag, number,
        )  # fmt: skip
        received += block.payload
        if not block.opt.block2.more:
            break
        number += 1
    assert received == BIG
    # The transfer is complete: the next notification follows.
    await world.gateway.publish(ident, "/".join(PATH), b"next", "text/plain", "http")
    note = await raw.recv()
    assert (note.payload, note.token, note.opt.block2) == (b"next", b"\x0b", None)
