"""Publishing over CoAP with aiocoap's client: every accepted Content-Format, the credentials in
any query position, the answer piggy-backed on the ACK, the latest message with a plain GET, and
``/.well-known/core``."""

from __future__ import annotations

import json

import aiocoap
import cbor2
import pytest
from aiocoap.numbers.codes import Code

from adapters.coap import CoAPAdapter
from core.bus import Subscription
from tests.coap.conftest import RawClient, drain, request
from tests.conftest import World

SENML = json.dumps([{"bn": "urn:dev:1:", "n": "temp", "u": "Cel", "v": 21.5}]).encode()


@pytest.mark.parametrize(
    ("cf", "body", "media"),
    [
        (110, SENML, "application/senml+json"),
        (112, cbor2.dumps([{0: "temp", 2: 21.5}]), "application/senml+cbor"),
        (50, b'{"any": "json"}', "application/json"),
        (0, b"hello", "text/plain"),
        (42, b"\x00\x01\xff", "application/octet-stream"),
        (None, b"\x00\x01\xff", "application/octet-stream"),
    ],
)
async def test_publish_content_formats(
    world: World,
    coap: str,
    client: aiocoap.Context,
    watch: Subscription,
    cf: int | None,
    body: bytes,
    media: str,
) -> None:
    uri = f"{coap}/m/acme/c/temps/room1?auth={world.publisher.secret}"
    options = {} if cf is None else {"content_format": cf}
    response = await request(client, Code.POST, uri, body, **options)
    assert response.code == Code.CHANGED
    assert response.payload == b""
    [msg] = drain(watch)
    assert (msg.subtopic, msg.publisher, msg.protocol) == ("room1", world.publisher.id, "coap")
    assert (msg.content_type, msg.payload) == (media, body)


async def test_put_publishes_too(
    world: World, coap: str, client: aiocoap.Context, watch: Subscription
) -> None:
    uri = f"{coap}/m/acme/c/temps?auth={world.both.secret}"
    response = await request(client, Code.PUT, uri, SENML, content_format=110)
    assert response.code == Code.CHANGED
    [msg] = drain(watch)
    assert (msg.subtopic, msg.payload) == ("", SENML)


async def test_credentials_in_any_query_position(
    world: World, coap: str, client: aiocoap.Context, watch: Subscription
) -> None:
    uri = f"{coap}/m/acme/c/temps/a/b?x=1&auth={world.publisher.secret}&y"
    response = await request(client, Code.POST, uri, b"ok", content_format=0)
    assert response.code == Code.CHANGED
    [msg] = drain(watch)
    assert msg.subtopic == "a/b"


async def test_answer_is_piggybacked_on_the_ack(
    world: World, raw: RawClient, watch: Subscription
) -> None:
    request = aiocoap.Message(
        code=Code.POST,
        uri_path=("m", "acme", "c", "temps"),
        uri_query=(f"auth={world.publisher.secret}",),
        content_format=110,
        payload=SENML,
    )
    mid = raw.send(request, token=b"\xab\xcd")
    response = await raw.recv()
    assert (response.mtype, response.mid, response.token) == (aiocoap.ACK, mid, b"\xab\xcd")
    assert response.code == Code.CHANGED
    assert len(drain(watch)) == 1


async def test_non_confirmable_request_gets_a_non_answer(
    world: World, raw: RawClient, watch: Subscription
) -> None:
    request = aiocoap.Message(
        code=Code.POST,
        uri_path=("m", "acme", "c", "temps"),
        uri_query=(f"auth={world.publisher.secret}",),
        payload=b"x",
    )
    raw.send(request, mtype=aiocoap.NON)
    response = await raw.recv()
    assert (response.mtype, response.code) == (aiocoap.NON, Code.CHANGED)
    assert len(drain(watch)) == 1


async def test_get_answers_the_latest_message(
    world: World, coap: str, client: aiocoap.Context
) -> None:
    pub = f"{coap}/m/acme/c/temps/room1?auth={world.publisher.secret}"
    get = f"{coap}/m/acme/c/temps/room1?auth={world.subscriber.secret}"
    for value in (1, 2):
        body = json.dumps([{"n": "temp", "v": value}]).encode()
        assert (await request(client, Code.POST, pub, body, content_format=110)).code == (
            Code.CHANGED
        )
    response = await request(client, Code.GET, get)
    assert response.code == Code.CONTENT
    assert response.payload == b'[{"n": "temp", "v": 2}]'
    assert response.opt.content_format == 110
    # Exactly that topic: another subtopic has its own latest message (none yet).
    other = await request(
        client, Code.GET, f"{coap}/m/acme/c/temps/room2?auth=" + (world.subscriber.secret)
    )
    assert other.code == Code.NOT_FOUND
    assert other.payload == b"nothing was published on this topic yet"


async def test_well_known_core(coap: str, client: aiocoap.Context) -> None:
    response = await request(client, Code.GET, f"{coap}/.well-known/core")
    assert response.code == Code.CONTENT
    assert response.opt.content_format == 40
    links = response.payload.decode()
    assert '</m>;rt="conduit.messages";ct="0 42 50 110 112";obs' in links


async def test_bound_port_is_reported(world: World) -> None:
    adapter = CoAPAdapter(world.gateway, "127.0.0.1", 0)
    await adapter.start()
    try:
        assert adapter.port != 0
        assert adapter.protocol == "coap"
    finally:
        await adapter.stop(timeout=1)


async def test_retransmission_is_answered_again_not_published_twice(
    world: World, raw: RawClient, watch: Subscription
) -> None:
    request = aiocoap.Message(
        code=Code.POST,
        uri_path=("m", "acme", "c", "temps"),
        uri_query=(f"auth={world.publisher.secret}",),
        content_format=110,
        payload=SENML,
    )
    mid = raw.send(request)
    first = await raw.recv()
    raw.send_raw(request.encode())  # the same datagram again: the ACK was "lost"
    again = await raw.recv()
    assert (again.mtype, again.mid, again.code) == (aiocoap.ACK, mid, Code.CHANGED)
    assert (again.token, again.payload) == (first.token, first.payload)
    assert len(drain(watch)) == 1
