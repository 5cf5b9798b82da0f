"""Every refusal of the WebSocket adapter: the exact HTTP status at the upgrade or close code once
open, the reason the client is told, that it was counted, and that nothing was published."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from typing import Any

import cbor2
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from core.bus import Subscription
from tests.conftest import World
from tests.ws.conftest import drain

PROBLEM = "application/problem+json"


def refusals(world: World, reason: str) -> float:
    value = world.gateway.metrics.registry.get_sample_value(
        "conduit_refusals_total", {"protocol": "ws", "reason": reason}
    )
    return value or 0.0


async def refused_upgrade(url: str, headers: Any = None) -> tuple[int, dict[str, Any], Any]:
    with pytest.raises(InvalidStatus) as info:
        async with connect(url, additional_headers=headers):
            pass
    response = info.value.response
    assert response.headers["Content-Type"] == PROBLEM
    return response.status_code, json.loads(response.body), response.headers


async def closed(ws: ClientConnection) -> tuple[int | None, str | None]:
    """Wait for the server to close the connection; its close code and reason."""
    with pytest.raises(ConnectionClosed):
        while True:
            await asyncio.wait_for(ws.recv(), 5)
    return ws.close_code, ws.close_reason


def basic(client_id: str, secret: str) -> str:
    return "Basic " + base64.b64encode(f"{client_id}:{secret}".encode()).decode()


# (path and query, who, status, problem type, detail)
# fmt: off
UPGRADE_REFUSALS = [
    ("/m/acme/c/temps", None, 401, "no_credentials", "no credentials"),
    ("/m/acme/c/temps", "Client not-a-secret", 401, "bad_credentials",
     "unknown or disabled client"),
    ("/m/acme/c/temps", "basic:wrong-id", 401, "bad_credentials",
     "client id does not match the secret"),
    ("/m/acme/c/temps", "Bearer eyJ", 401, "bad_credentials",
     "no identity provider of this gateway knows this token"),
    ("/m/acme/c/temps", "stranger", 403, "not_allowed",
     "client may neither publish nor subscribe on channel 'temps'"),
    ("/m/acme/c/other", "both", 403, "not_allowed",
     "client may neither publish nor subscribe on channel 'other'"),
    ("/m/globex/c/temps", "both", 403, "not_allowed", "client is not in domain 'globex'"),
    ("/m/acme/c/temps/%23", "publisher", 403, "not_allowed",
     "client may not subscribe on channel 'temps'"),
    ("/m/acme/c/temps?mode=publish", "subscriber", 403, "not_allowed",
     "client may not publish on channel 'temps'"),
    ("/m/acme/c/temps?mode=subscribe", "publisher", 403, "not_allowed",
     "client may not subscribe on channel 'temps'"),
    ("/m/acme/c/", "both", 400, "bad_topic",
     "topic filter 'm/acme/c' is not of the form m/<domain>/c/<channel>[/<subtopic>...]"),
    ("/m/acme/c/temps//x", "both", 400, "bad_topic", "subtopic level 1 is empty"),
    ("/m/acme/c/%23", "both", 400, "bad_topic", "wildcards are not allowed in the channel"),
    ("/m/acme/c/temps/a/%23/b", "both", 400, "bad_topic",
     "'#' must be the last level of a filter"),
    ("/m/acme/c/temps/%23?mode=publish", "both", 400, "bad_topic",
     "wildcards are not allowed when publishing"),
    ("/m/acme/c/temps?format=xml", "both", 400, "bad_topic",
     "format 'xml' is not one of raw, envelope"),
    ("/m/acme/c/temps?mode=admin", "both", 400, "bad_topic",
     "mode 'admin' is not one of publish, subscribe"),
    ("/m/acme/c/temps?ct=application/xml", "both", 415, "unsupported_content_type",
     "content type 'application/xml' is not supported; use one of application/json,"
     " application/octet-stream, application/senml+cbor, application/senml+json, text/plain"),
    ("/mqtt", "both", 404, "not_found", "/mqtt is not a messaging path"),
    ("/", "both", 404, "not_found", "/ is not a messaging path"),
]
# fmt: on


@pytest.mark.parametrize(("path", "who", "status", "kind", "detail"), UPGRADE_REFUSALS)
async def test_upgrade_refusals(
    world: World,
    ws: str,
    watch: Subscription,
    path: str,
    who: str | None,
    status: int,
    kind: str,
    detail: str,
) -> None:
    headers = None
    if who == "basic:wrong-id":
        headers = {"Authorization": basic("wrong-id", world.publisher.secret)}
    elif who in ("publisher", "subscriber", "both", "stranger"):
        headers = {"Authorization": f"Client {getattr(world, who).secret}"}
    elif who is not None:
        headers = {"Authorization": who}
    code, problem, response_headers = await refused_upgrade(ws + path, headers)
    assert (code, problem["status"]) == (status, status)
    assert problem["type"] == f"urn:conduit:error:{kind}"
    assert problem["detail"] == detail
    if status == 401:
        assert "Client" in response_headers["WWW-Authenticate"]
    assert refusals(world, kind) == 1
    assert drain(watch) == []


async def test_topic_refusal_names_the_part(world: World, ws: str) -> None:
    headers = {"Authorization": f"Client {world.both.secret}"}
    _, problem, _ = await refused_upgrade(f"{ws}/m/acme/c/%23", headers)
    assert problem["part"] == "channel"


async def test_two_authorization_headers(world: World, ws: str) -> None:
    headers = [("Authorization", f"Client {world.both.secret}"), ("Authorization", "Client x")]
    status, problem, _ = await refused_upgrade(f"{ws}/m/acme/c/temps", headers)
    assert (status, problem["detail"]) == (401, "more than one Authorization header")


async def test_refusal_is_logged_without_the_secret(
    world: World, ws: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "conduit")
    secret = world.subscriber.secret
    await refused_upgrade(f"{ws}/m/acme/c/temps?mode=publish&authorization=Client%20{secret}")
    lines = [r.getMessage() for r in caplog.records if r.name == "conduit.gateway"]
    assert lines == [
        f"refused ws client={world.subscriber.id} reason=not_allowed:"
        " client may not publish on channel 'temps'"
    ]
    assert secret not in caplog.text


async def test_store_unavailable_is_503(world: World, ws: str) -> None:
    await world.gateway.store.close()
    headers = {"Authorization": f"Client {world.both.secret}"}
    status, problem, _ = await refused_upgrade(f"{ws}/m/acme/c/temps", headers)
    assert status == 503 and problem["type"] == "urn:conduit:error:unavailable"


# once open: (path and query, who, frame, close code, reason, refusal counted)
# fmt: off
CLOSE_REFUSALS = [
    ("/m/acme/c/temps", "subscriber", "hello", 1008,
     "client may not publish on channel 'temps'", "not_allowed"),
    ("/m/acme/c/temps?mode=subscribe", "both", "hello", 1008,
     "connection opened with mode=subscribe: it cannot publish", "not_allowed"),
    ("/m/acme/c/temps/%23", "both", "hello", 1008,
     "m/acme/c/temps/# has wildcards: this connection subscribes only", "bad_topic"),
    ("/m/acme/c/temps/%2B", "both", "hello", 1008,
     "m/acme/c/temps/+ has wildcards: this connection subscribes only", "bad_topic"),
    ("/m/acme/c/temps?ct=application/senml%2Bjson", "publisher", '[{"n": "t", "v": "x"}]', 1007,
     "record 0, field 'v': 'v' must be a number, got a string", "invalid_senml"),
    ("/m/acme/c/temps?ct=application/senml%2Bjson", "publisher", '{"n": "t"}', 1007,
     "a SenML pack is a JSON array of records, got an object", "invalid_senml"),
    ("/m/acme/c/temps?ct=application/senml%2Bcbor", "publisher", cbor2.dumps([{0: "t"}]), 1007,
     "record 0, field 'v': record has no value: it needs one of v, vs, vb, vd, or a sum s"
     " (RFC 8428 sec 4.2)", "invalid_senml"),
]
# fmt: on


@pytest.mark.parametrize(("path", "who", "frame", "code", "reason", "kind"), CLOSE_REFUSALS)
async def test_close_refusals(
    world: World,
    ws: str,
    watch: Subscription,
    path: str,
    who: str,
    frame: str | bytes,
    code: int,
    reason: str,
    kind: str,
) -> None:
    headers = {"Authorization": f"Client {getattr(world, who).secret}"}
    async with connect(ws + path, additional_headers=headers) as conn:
        await conn.send(frame)
        assert await closed(conn) == (code, reason)
    assert refusals(world, kind) == 1
    assert drain(watch) == []


async def test_long_reason_is_cut_to_fit_a_close_frame(
    world: World, ws: str, watch: Subscription
) -> None:
    headers = {"Authorization": f"Client {world.publisher.secret}"}
    pack = json.dumps([{"bn": "\u00e9" * 100, "n": "t", "v": 1}])  # the detail quotes the name
    async with connect(
        f"{ws}/m/acme/c/temps?ct=application/senml%2Bjson", additional_headers=headers
    ) as conn:
        await conn.send(pack)
        code, reason = await closed(conn)
    assert code == 1007 and reason is not None
    assert len(reason.encode()) <= 123 and reason.endswith("\u00e9...")  # whole characters
    assert reason.startswith("record 0, field 'bn': name '")
    assert drain(watch) == []


async def test_invalid_utf8_text_frame(world: World, ws: str, watch: Subscription) -> None:
    """websockets itself fails a text frame that is not UTF-8 (RFC 6455 8.1): close 1007."""
    headers = {"Authorization": f"Client {world.publisher.secret}"}
    async with connect(f"{ws}/m/acme/c/temps", additional_headers=headers) as conn:
        await conn.send(b"\xff\xfe", text=True)
        code, reason = await closed(conn)
    assert code == 1007 and reason == "invalid start byte at position 0"
    assert drain(watch) == []


async def test_revoked_right_closes_the_subscriber(world: World, ws: str) -> None:
    headers = {"Authorization": f"Client {world.subscriber.secret}"}
    async with connect(f"{ws}/m/acme/c/temps/%23", additional_headers=headers) as conn:
        await world.gateway.provisioning.disconnect("acme", world.subscriber.id, "temps")
        assert await closed(conn) == (1008, "authorization revoked")


async def test_revoked_publish_right_refuses_the_next_frame(
    world: World, ws: str, watch: Subscription
) -> None:
    headers = {"Authorization": f"Client {world.publisher.secret}"}
    async with connect(f"{ws}/m/acme/c/temps", additional_headers=headers) as conn:
        await conn.send("before")
        assert (await asyncio.wait_for(watch.get(), 5)).payload == b"before"
        await world.gateway.provisioning.disconnect("acme", world.publisher.id, "temps")
        await conn.send("after")
        assert await closed(conn) == (1008, "client may not publish on channel 'temps'")
    assert drain(watch) == []


async def test_bus_unavailable_closes_with_1011(world: World, ws: str) -> None:
    headers = {"Authorization": f"Client {world.publisher.secret}"}
    async with connect(f"{ws}/m/acme/c/temps", additional_headers=headers) as conn:
        await world.gateway.bus.close()
        await conn.send("lost")
        assert await closed(conn) == (1011, "bus is closed")
    assert refusals(world, "unavailable") == 1
