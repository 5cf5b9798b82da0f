"""Observing over CoAP (RFC 7641) with aiocoap's client: notifications from any protocol, in
order, with their Content-Format and increasing Observe numbers; wildcards; the registration's
answer; deregistration by RST and by Observe 1; revocation and shutdown end the observation."""

from __future__ import annotations

import itertools
import json

import aiocoap
import aiohttp
import pytest
from aiocoap.numbers.codes import Code

from adapters.coap import CoAPAdapter
from core.credentials import Credentials
from tests.coap.conftest import (
    Observer,
    RawClient,
    client_context,
    eventually,
    metric,
    observers,
    request,
)
from tests.conftest import World, running

SENML = [{"bn": "urn:dev:1:", "n": "temp", "u": "Cel", "v": 21.5}]
PATH = ("m", "acme", "c", "temps")


def increasing(numbers: list[int]) -> bool:
    return all(b > a for a, b in itertools.pairwise(numbers))


async def test_coap_in_coap_out(world: World, coap: str, client: aiocoap.Context) -> None:
    observer = Observer(client, f"{coap}/m/acme/c/temps/room1?auth={world.subscriber.secret}")
    first = await observer.first()
    # Nothing published yet: the registration is answered with an empty 2.05.
    assert (first.code, first.payload, first.opt.content_format) == (Code.CONTENT, b"", None)
    assert first.opt.observe is not None
    assert observers(world) == 1
    pub = f"{coap}/m/acme/c/temps/room1?auth={world.publisher.secret}"
    other = f"{coap}/m/acme/c/temps/room2?auth={world.publisher.secret}"
    device = await client_context()  # the publisher is another device
    try:
        for value in range(3):
            body = json.dumps([{"n": "temp", "v": value}]).encode()
            await request(device, Code.POST, other, b"not for this observer", content_format=0)
            assert (await request(device, Code.POST, pub, body, content_format=110)).code == (
                Code.CHANGED
            )
    finally:
        await device.shutdown()
    notes = [await observer.next() for _ in range(3)]
    assert [n.payload for n in notes] == [
        json.dumps([{"n": "temp", "v": v}]).encode() for v in range(3)
    ]
    assert all(n.code == Code.CONTENT and n.opt.content_format == 110 for n in notes)
    assert increasing([first.opt.observe, *(n.opt.observe for n in notes)])
    assert metric(world, "conduit_messages_out_total", protocol="coap") == 3


async def test_http_in_coap_out(
    world: World, coap: str, http: str, client: aiocoap.Context
) -> None:
    observer = Observer(client, f"{coap}/m/acme/c/temps/%23?auth={world.subscriber.secret}")
    await observer.first()
    headers = {"Authorization": f"Client {world.publisher.secret}"}
    async with aiohttp.ClientSession(headers=headers) as session:
        for path, ct, body in (
            ("room1", "application/senml+json", json.dumps(SENML)),
            ("room1/door", "text/plain; charset=utf-8", "open"),
            ("", "application/json", '{"x": 1}'),
        ):
            url = f"{http}/m/acme/c/temps/{path}".rstrip("/")
            async with session.post(url, data=body, headers={"Content-Type": ct}) as r:
                assert r.status == 202
    notes = [await observer.next() for _ in range(3)]
    assert [(n.payload, n.opt.content_format) for n in notes] == [
        (json.dumps(SENML).encode(), 110),
        (b"open", 0),
        (b'{"x": 1}', 50),
    ]


async def test_registration_answers_the_latest_message(
    world: World, coap: str, client: aiocoap.Context
) -> None:
    url = f"{coap}/m/acme/c/temps/room1"
    body = json.dumps(SENML).encode()
    await request(client, Code.POST, f"{url}?auth={world.publisher.secret}", body,
                  content_format=110)  # fmt: skip
    observer = Observer(client, f"{url}?auth={world.subscriber.secret}")
    first = await observer.first()
    assert (first.code, first.payload, first.opt.content_format) == (Code.CONTENT, body, 110)
    await request(client, Code.POST, f"{url}?auth={world.publisher.secret}", b"next",
                  content_format=0)  # fmt: skip
    assert (await observer.next()).payload == b"next"


async def test_wildcards(world: World, coap: str, client: aiocoap.Context) -> None:
    observer = Observer(client, f"{coap}/m/acme/c/temps/+/temp?auth={world.subscriber.secret}")
    await observer.first()
    for path in ("room1/temp", "room1/hum", "room2/temp", "room2/temp/x", "temp"):
        url = f"{coap}/m/acme/c/temps/{path}?auth={world.publisher.secret}"
        await request(client, Code.POST, url, path.encode(), content_format=0)
    assert (await observer.next()).payload == b"room1/temp"
    assert (await observer.next()).payload == b"room2/temp"
    # The filter matched nothing else: the next notification is the next match.
    await request(client, Code.POST, f"{coap}/m/acme/c/temps/r3/temp?auth="
                  + world.publisher.secret, b"r3", content_format=0)  # fmt: skip
    assert (await observer.next()).payload == b"r3"


async def test_every_message_arrives_in_order(
    world: World, coap: str, client: aiocoap.Context
) -> None:
    observer = Observer(client, f"{coap}/m/acme/c/temps?auth={world.subscriber.secret}")
    first = await observer.first()
    ident = await world.gateway.authenticate(Credentials(world.publisher.secret))
    for i in range(100):  # a burst: faster than the observer ACKs
        await world.gateway.publish(ident, "m/acme/c/temps", b"%d" % i, "text/plain", "mqtt")
    notes = [await observer.next() for _ in range(100)]
    assert [n.payload for n in notes] == [b"%d" % i for i in range(100)]
    assert increasing([first.opt.observe, *(n.opt.observe for n in notes)])


async def test_one_message_many_observers(world: World, coap: str) -> None:
    devices = [await client_context() for _ in range(5)]  # one context per device
    try:
        url = f"{coap}/m/acme/c/temps/%23?auth={world.subscriber.secret}"
        observing = [Observer(device, url) for device in devices]
        for observer in observing:
            await observer.first()
        assert observers(world) == 5
        await request(devices[0], Code.POST, f"{coap}/m/acme/c/temps/x?auth="
                      + world.publisher.secret, b"all", content_format=0)  # fmt: skip
        for observer in observing:
            assert (await observer.next()).payload == b"all"
    finally:
        for device in devices:
            await device.shutdown()


async def test_rst_deregisters(world: World, coap: str, client: aiocoap.Context) -> None:
    observer = Observer(client, f"{coap}/m/acme/c/temps?auth={world.subscriber.secret}")
    await observer.first()
    assert observers(world) == 1
    # aiocoap forgets the observation when the next notification comes (it ACKs that one) and
    # answers the one after with a RST.
    observer.cancel()
    for body in (b"one", b"two"):
        await request(client, Code.POST, f"{coap}/m/acme/c/temps?auth={world.publisher.secret}",
                      body, content_format=0)  # fmt: skip
    await eventually(lambda: observers(world) == 0, "the RST ended the observation")


async def test_observe_1_deregisters(world: World, raw: RawClient) -> None:
    query = (f"auth={world.subscriber.secret}",)
    raw.send(aiocoap.Message(code=Code.GET, uri_path=PATH, uri_query=query, observe=0))
    first = await raw.recv()
    assert first.code == Code.CONTENT and first.opt.observe is not None
    ident = await world.gateway.authenticate(Credentials(world.publisher.secret))
    await world.gateway.publish(ident, "m/acme/c/temps", b"one", "text/plain", "http")
    note = await raw.recv()
    assert (note.mtype, note.payload) == (aiocoap.CON, b"one")
    raw.ack(note)
    # Same token, Observe 1: the observation ends and the GET is answered as a plain GET.
    raw.send(aiocoap.Message(code=Code.GET, uri_path=PATH, uri_query=query, observe=1))
    answer = await raw.recv()
    assert (answer.code, answer.payload, answer.opt.observe) == (Code.CONTENT, b"one", None)
    assert observers(world) == 0
    await world.gateway.publish(ident, "m/acme/c/temps", b"two", "text/plain", "http")
    # A ping's answer (RST) comes after any notification the publish could have caused.
    raw.send_raw(b"\x40\x00\x77\x77")
    pong = await raw.recv()
    assert (pong.mtype, pong.code) == (aiocoap.RST, Code.EMPTY)


@pytest.mark.parametrize("revoke", ["disconnect", "disable"])
async def test_revoked_observer_is_cut_off(
    world: World, coap: str, client: aiocoap.Context, revoke: str
) -> None:
    observer = Observer(client, f"{coap}/m/acme/c/temps?auth={world.subscriber.secret}")
    await observer.first()
    pub = f"{coap}/m/acme/c/temps?auth={world.publisher.secret}"
    await request(client, Code.POST, pub, b"before", content_format=0)
    assert (await observer.next()).payload == b"before"
    if revoke == "disconnect":
        await world.gateway.provisioning.disconnect("acme", world.subscriber.id, "temps")
    else:
        await world.gateway.provisioning.set_client_enabled("acme", world.subscriber.id, False)
    last = await observer.next()
    assert (last.code, last.payload, last.opt.observe) == (
        Code.FORBIDDEN, b"authorization revoked", None,
    )  # fmt: skip
    with pytest.raises(StopAsyncIteration):
        await observer.next()
    assert observers(world) == 0
    await request(client, Code.POST, pub, b"after", content_format=0)
    assert observers(world) == 0


async def test_vanished_observer_is_dropped(world: World, raw: RawClient) -> None:
    query = (f"auth={world.subscriber.secret}",)
    raw.send(aiocoap.Message(code=Code.GET, uri_path=PATH, uri_query=query, observe=0))
    await raw.recv()
    assert observers(world) == 1
    raw.close()  # the device is gone: its port answers with ICMP port unreachable
    ident = await world.gateway.authenticate(Credentials(world.publisher.secret))
    await world.gateway.publish(ident, "m/acme/c/temps", b"lost", "text/plain", "http")
    await eventually(lambda: observers(world) == 0, "the observation of a gone client ended")


async def test_shutdown_ends_observations(world: World, client: aiocoap.Context) -> None:
    async with running(CoAPAdapter(world.gateway, "127.0.0.1", 0)) as adapter:
        url = f"coap://127.0.0.1:{adapter.port}/m/acme/c/temps?auth={world.subscriber.secret}"
        observer = Observer(client, url)
        await observer.first()
    last = await observer.next()
    assert (last.code, last.payload) == (Code.SERVICE_UNAVAILABLE, b"server shutting down")
    assert observers(world) == 0
