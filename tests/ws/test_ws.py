"""The WebSocket adapter over real sockets: subscribe, publish, credentials, formats, and
delivery across protocols (HTTP), with the websockets client and aiohttp's client."""

from __future__ import annotations

import asyncio
import base64
import json
from urllib.parse import quote

import aiohttp
import cbor2
import orjson
from websockets.asyncio.client import ClientConnection, connect

from adapters.ws import WSAdapter
from core.bus import Subscription
from core.credentials import Credentials
from core.message import Message
from tests.conftest import World
from tests.ws.conftest import drain, masked_frame, raw_upgrade

SENML = [{"bn": "urn:dev:1:", "n": "temp", "u": "Cel", "v": 21.5}]


def client(secret: str) -> dict[str, str]:
    return {"Authorization": f"Client {secret}"}


def basic(client_id: str, secret: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{client_id}:{secret}".encode()).decode()}


async def recv(ws: ClientConnection) -> str | bytes:
    return await asyncio.wait_for(ws.recv(), 5)


async def published(watch: Subscription) -> Message:
    return await asyncio.wait_for(watch.get(), 5)


async def test_subscriber_receives_raw_payloads(world: World, ws: str) -> None:
    async with connect(
        f"{ws}/m/acme/c/temps/room1", additional_headers=client(world.subscriber.secret)
    ) as sub:
        gw = world.gateway
        ident = await gw.authenticate(Credentials(world.publisher.secret))
        body = orjson.dumps(SENML)
        await gw.publish(ident, "m/acme/c/temps/room1", body, "application/senml+json", "http")
        await gw.publish(ident, "m/acme/c/temps/other", b"not for room1", "text/plain", "http")
        await gw.publish(
            ident, "m/acme/c/temps/room1", b"\x00\xff", "application/octet-stream", "http"
        )
        await gw.publish(
            ident, "m/acme/c/temps/room1", b"\xff not utf-8", "application/json", "http"
        )
        assert await recv(sub) == body.decode()  # textual and UTF-8: a text frame
        assert await recv(sub) == b"\x00\xff"  # opaque: a binary frame
        assert await recv(sub) == b"\xff not utf-8"  # "JSON" that is not UTF-8: binary


async def test_publish_text_and_binary_frames(world: World, ws: str, watch: Subscription) -> None:
    async with connect(
        f"{ws}/m/acme/c/temps/room1",
        additional_headers=basic(world.publisher.id, world.publisher.secret),
    ) as c:
        await c.send('{"on": true}')
        await c.send(b"\x01\x02")
        first, second = await published(watch), await published(watch)
    assert (first.subtopic, first.publisher, first.protocol) == ("room1", world.publisher.id, "ws")
    assert (first.content_type, first.payload) == ("application/json", b'{"on": true}')
    assert (second.content_type, second.payload) == ("application/octet-stream", b"\x01\x02")


async def test_publish_senml_with_ct_query(world: World, ws: str, watch: Subscription) -> None:
    auth = client(world.publisher.secret)
    async with connect(
        f"{ws}/m/acme/c/temps?ct=application/senml%2Bjson", additional_headers=auth
    ) as c:
        await c.send(json.dumps(SENML))
        msg = await published(watch)
        assert (msg.content_type, msg.subtopic) == ("application/senml+json", "")
    pack = cbor2.dumps([{-2: "urn:dev:1:", 0: "temp", 2: 21.5}])
    async with connect(
        f"{ws}/m/acme/c/temps/cbor?ct=application/senml%2Bcbor", additional_headers=auth
    ) as c:
        await c.send(pack)
        msg = await published(watch)
        assert (msg.content_type, msg.payload) == ("application/senml+cbor", pack)


async def test_credentials_in_the_query(world: World, ws: str, watch: Subscription) -> None:
    """Browsers cannot set headers on a WebSocket: ?authorization= carries the same values."""
    for value in (
        f"Client {world.publisher.secret}",
        world.publisher.secret,
        basic(world.publisher.id, world.publisher.secret)["Authorization"],
    ):
        async with connect(f"{ws}/m/acme/c/temps?authorization={quote(value, safe='')}") as c:
            await c.send("x")
            assert (await published(watch)).publisher == world.publisher.id


async def test_both_rights_receive_own_messages_unless_mode_publish(world: World, ws: str) -> None:
    auth = client(world.both.secret)
    async with (
        connect(f"{ws}/m/acme/c/temps", additional_headers=auth) as both,
        connect(f"{ws}/m/acme/c/temps?mode=publish", additional_headers=auth) as device,
    ):
        await device.send("from device")
        await both.send("from both")
        assert await recv(both) == "from device"
        assert await recv(both) == "from both"  # the channel's messages, its own included
        await both.send("last")
        assert await recv(both) == "last"
    # the publish-only connection never had a subscription: nothing was queued for it
    assert world.gateway.metrics.drops["ws"].value == 0


async def test_envelope_on_a_wildcard(world: World, ws: str, http: str) -> None:
    url = f"{ws}/m/acme/c/temps/%23?format=envelope"
    async with (
        connect(url, additional_headers=client(world.subscriber.secret)) as sub,
        aiohttp.ClientSession() as session,
    ):
        for path, body, ct in (
            ("r1/t", b"21.5", "text/plain"),
            ("r2", b"\xff\x00", "application/octet-stream"),
        ):
            async with session.post(
                f"{http}/m/acme/c/temps/{path}",
                data=body,
                headers={"Content-Type": ct, **client(world.publisher.secret)},
            ) as r:
                assert r.status == 202
        first = json.loads(await recv(sub))
        second = json.loads(await recv(sub))
    assert first["subtopic"] == "r1/t" and first["payload"] == "21.5"
    assert first["encoding"] == "utf-8" and first["content_type"] == "text/plain"
    assert first["publisher"] == world.publisher.id and first["protocol"] == "http"
    assert first["topic"] == "m/acme/c/temps/r1/t" and isinstance(first["created"], int)
    assert second["subtopic"] == "r2" and second["encoding"] == "base64"
    assert base64.b64decode(second["payload"]) == b"\xff\x00"


async def test_plus_wildcard_filters_levels(world: World, ws: str) -> None:
    async with (
        connect(
            f"{ws}/m/acme/c/temps/%2B/t", additional_headers=client(world.subscriber.secret)
        ) as sub,
        connect(
            f"{ws}/m/acme/c/temps/r1/h", additional_headers=client(world.publisher.secret)
        ) as h,
        connect(
            f"{ws}/m/acme/c/temps/r2/t", additional_headers=client(world.publisher.secret)
        ) as t,
    ):
        await h.send("humidity: filtered out")
        await t.send("temperature")
        assert await recv(sub) == "temperature"
    # "+" unencoded in the path works too
    async with connect(
        f"{ws}/m/acme/c/temps/+/t", additional_headers=client(world.subscriber.secret)
    ):
        pass


async def test_ws_to_http_sse_and_http_to_ws(world: World, ws: str, http: str) -> None:
    """Cross-protocol both ways: a WS frame reaches an SSE stream, a POST reaches a WS."""
    async with aiohttp.ClientSession() as session:
        sse_headers = {"Accept": "text/event-stream", **client(world.subscriber.secret)}
        async with (
            session.get(f"{http}/m/acme/c/temps/%23", headers=sse_headers) as stream,
            connect(
                f"{ws}/m/acme/c/temps/room1", additional_headers=client(world.both.secret)
            ) as both,
        ):
            await stream.content.readline()  # ": subscribed to ..."
            await stream.content.readline()
            await both.send(json.dumps(SENML))
            event = None
            while event is None:
                line = await asyncio.wait_for(stream.content.readline(), 5)
                if line.startswith(b"data: "):
                    event = json.loads(line[6:])
            assert event["protocol"] == "ws" and event["publisher"] == world.both.id
            assert json.loads(event["payload"]) == SENML
            assert await recv(both) == json.dumps(SENML)  # its own, through the bus

            async with session.post(
                f"{http}/m/acme/c/temps/room1",
                data=b"via http",
                headers={"Content-Type": "text/plain", **client(world.publisher.secret)},
            ) as r:
                assert r.status == 202
            assert await recv(both) == "via http"


async def test_aiohttp_client(world: World, ws: str, watch: Subscription) -> None:
    """aiohttp's WebSocket client: publish and subscribe on one connection."""
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(f"{ws}/m/acme/c/temps/a", headers=client(world.both.secret)) as conn,
    ):
        await conn.send_str('{"x": 1}')
        await conn.send_bytes(b"\x07")
        text = await conn.receive(timeout=5)
        binary = await conn.receive(timeout=5)
        assert (text.type, text.data) == (aiohttp.WSMsgType.TEXT, '{"x": 1}')
        assert (binary.type, binary.data) == (aiohttp.WSMsgType.BINARY, b"\x07")
    assert [m.payload for m in drain(watch)] == [b'{"x": 1}', b"\x07"]  # type: ignore[attr-defined]


async def test_connections_are_counted(world: World, ws: str) -> None:
    conns = world.gateway.metrics.conns["ws"]
    base = conns.value
    async with (
        connect(f"{ws}/m/acme/c/temps", additional_headers=client(world.publisher.secret)),
        connect(f"{ws}/m/acme/c/temps", additional_headers=client(world.subscriber.secret)),
    ):
        assert conns.value == base + 2  # one publish-only, one subscription
    for _ in range(100):
        if conns.value == base:
            break
        await asyncio.sleep(0.01)
    assert conns.value == base


async def test_deliveries_are_counted(world: World, ws: str) -> None:
    async with connect(f"{ws}/m/acme/c/temps", additional_headers=client(world.both.secret)) as c:
        for i in range(3):
            await c.send(str(i))
        for _ in range(3):
            await recv(c)
        await asyncio.sleep(0)  # counts are flushed once per event-loop turn
    assert world.gateway.metrics.out["ws"].value == 3
    assert world.gateway.metrics.in_["ws"].value == 3


async def test_dashboard_page(ws: str) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.get(ws.replace("ws:", "http:") + "/") as r,
    ):
        assert r.status == 200
        assert r.headers["Content-Type"] == "text/html; charset=utf-8"
        csp = r.headers["Content-Security-Policy"]
        assert "script-src 'sha256-" in csp and "unsafe-inline" not in csp
        page = await r.text()
    assert "format=envelope" in page and "textContent" in page


async def test_a_fragmented_message_is_published_whole(
    world: World, ws: str, watch: Subscription
) -> None:
    """A message sent in several frames (a first frame and continuations) is one message."""
    url = f"{ws}/m/acme/c/temps/t?mode=publish"
    async with connect(url, additional_headers=client(world.publisher.secret)) as conn:
        await conn.send(iter(["[1,", " 2", ", 3]"]))  # text, in three frames
        await conn.send(iter([b"\x00\x01", b"\x02"]))  # binary, in two
    text, binary = await published(watch), await published(watch)
    assert (text.payload, text.content_type) == (b"[1, 2, 3]", "application/json")
    assert (binary.payload, binary.content_type) == (b"\x00\x01\x02", "application/octet-stream")


async def test_a_text_frame_that_is_not_utf8_closes_with_1007(
    world: World, ws_adapter: WSAdapter, watch: Subscription
) -> None:
    """RFC 6455 8.1: a text message must be UTF-8; one that is not fails the connection
    (1007) and is not published. Sent raw: a client library would not send it."""
    reader, writer = await raw_upgrade(
        ws_adapter.port, world.publisher.secret, "/m/acme/c/temps/t?mode=publish"
    )
    writer.write(masked_frame(0x81, b"\xff\xfe"))  # a text frame
    first, second = await asyncio.wait_for(reader.readexactly(2), 5)
    data = await reader.readexactly(second & 0x7F)
    assert first & 0x0F == 0x8  # a close frame
    assert int.from_bytes(data[:2], "big") == 1007
    writer.close()
    await asyncio.sleep(0.1)
    assert drain(watch) == []
