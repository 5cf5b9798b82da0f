"""The HTTP adapter over a real socket with aiohttp's client: publish, SSE, every refusal."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator

import aiohttp
import cbor2
import pytest

from tests.conftest import World

SENML = [{"bn": "urn:dev:1:", "n": "temp", "u": "Cel", "v": 21.5}, {"n": "hum", "v": 40}]


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


def auth(secret: str) -> dict[str, str]:
    return {"Authorization": f"Client {secret}"}


async def post(session: aiohttp.ClientSession, url: str, body: bytes | str,
               ct: str = "application/senml+json", **headers: str) -> tuple[int, dict]:  # type: ignore[type-arg]
    async with session.post(url, data=body, headers={"Content-Type": ct, **headers}) as r:
        text = await r.text()
        if r.status >= 400:
            assert r.headers["Content-Type"] == "application/problem+json"
            return r.status, json.loads(text)
        return r.status, {}


async def test_publish_senml_json(world: World, http: str, session, watch) -> None:  # type: ignore[no-untyped-def]
    body = json.dumps(SENML)
    status, _ = await post(session, f"{http}/m/acme/c/temps/room1", body,
                           **auth(world.publisher.secret))
    assert status == 202
    msg = watch.get_nowait()
    assert msg is not None
    assert (msg.subtopic, msg.publisher, msg.protocol) == ("room1", world.publisher.id, "http")
    assert (msg.content_type, msg.payload) == ("application/senml+json", body.encode())


@pytest.mark.parametrize(
    ("ct", "body"),
    [
        ("application/senml+cbor", cbor2.dumps([{0: "temp", 2: 21.5}])),
        ("application/json", b'{"any": "json"}'),
        ("text/plain; charset=utf-8", b"hello"),
        ("application/octet-stream", b"\x00\x01\xff"),
    ],
)
async def test_publish_other_types(world: World, http: str, session, watch, ct: str,  # type: ignore[no-untyped-def]
                                   body: bytes) -> None:
    status, _ = await post(session, f"{http}/m/acme/c/temps", body, ct,
                           **auth(world.publisher.secret))
    assert status == 202
    msg = watch.get_nowait()
    assert msg is not None and msg.payload == body and msg.content_type == ct.split(";")[0]


async def test_basic_credentials(world: World, http: str, session, watch) -> None:  # type: ignore[no-untyped-def]
    basic = base64.b64encode(f"{world.publisher.id}:{world.publisher.secret}".encode()).decode()
    status, _ = await post(session, f"{http}/m/acme/c/temps", json.dumps(SENML),
                           Authorization=f"Basic {basic}")
    assert status == 202 and watch.get_nowait() is not None
    wrong = base64.b64encode(f"{world.both.id}:{world.publisher.secret}".encode()).decode()
    status, problem = await post(session, f"{http}/m/acme/c/temps", json.dumps(SENML),
                                 Authorization=f"Basic {wrong}")
    assert status == 401 and "does not match" in problem["detail"]
    assert watch.get_nowait() is None


@pytest.mark.parametrize(
    ("path", "headers", "ct", "body", "status", "reason", "detail"),
    [
        ("/m/acme/c/temps", {}, "application/senml+json", json.dumps(SENML), 401,
         "no_credentials", "no credentials"),
        ("/m/acme/c/temps", {"Authorization": "Client nope"}, "application/senml+json",
         json.dumps(SENML), 401, "bad_credentials", "unknown or disabled client"),
        ("/m/acme/c/temps", "subscriber", "application/senml+json", json.dumps(SENML), 403,
         "not_allowed", "may not publish on channel 'temps'"),
        ("/m/acme/c/temps", "stranger", "application/senml+json", json.dumps(SENML), 403,
         "not_allowed", "may not publish"),
        ("/m/acme/c/other", "publisher", "application/senml+json", json.dumps(SENML), 403,
         "not_allowed", "may not publish on channel 'other'"),
        ("/m/beta/c/temps", "publisher", "application/senml+json", json.dumps(SENML), 403,
         "not_allowed", "not in domain 'beta'"),
        ("/m/acme/c/temps/a+b", "publisher", "application/senml+json", json.dumps(SENML), 400,
         "bad_topic", "character not allowed"),
        ("/m/acme/c/temps/%23", "publisher", "application/senml+json", json.dumps(SENML), 400,
         "bad_topic", "wildcards are not allowed"),
        ("/m/acme/x/temps", "publisher", "application/senml+json", json.dumps(SENML), 400,
         "bad_topic", "not of the form"),
        ("/things/1", "publisher", "application/senml+json", json.dumps(SENML), 404,
         "not_found", "not a messaging path"),
        ("/m/acme/c/temps", "publisher", "application/xml", "<a/>", 415,
         "unsupported_content_type", "'application/xml' is not supported"),
        ("/m/acme/c/temps", "publisher", "application/senml+json", "{not json", 400,
         "invalid_senml", ""),
        ("/m/acme/c/temps", "publisher", "application/senml+json", "[]", 400,
         "invalid_senml", ""),
    ],
)
async def test_refusals(world: World, http: str, session, watch, path: str,  # type: ignore[no-untyped-def]
                        headers: dict[str, str] | str, ct: str, body: str, status: int,
                        reason: str, detail: str) -> None:
    if isinstance(headers, str):
        headers = auth(getattr(world, headers).secret)
    got, problem = await post(session, http + path, body, ct, **headers)
    assert got == status
    assert problem["status"] == status
    assert problem["type"] == f"urn:conduit:error:{reason}"
    assert detail in problem["detail"]
    assert watch.get_nowait() is None, "nothing may be published on a refusal"
    metrics = world.gateway.metrics.exposition().decode()
    assert f'conduit_refusals_total{{protocol="http",reason="{reason}"}} 1.0' in metrics


async def test_invalid_senml_names_record_and_field(world: World, http: str, session,  # type: ignore[no-untyped-def]
                                                    watch) -> None:
    body = json.dumps([{"n": "ok", "v": 1}, {"n": "bad name", "v": 2}])
    status, problem = await post(session, f"{http}/m/acme/c/temps", body,
                                 **auth(world.publisher.secret))
    assert status == 400
    assert (problem["record"], problem["field"]) == (1, "n")
    assert watch.get_nowait() is None
    body = json.dumps([{"n": "a", "v": 1, "vs": "x"}])
    status, problem = await post(session, f"{http}/m/acme/c/temps", body,
                                 **auth(world.publisher.secret))
    assert status == 400 and problem["record"] == 0
    assert watch.get_nowait() is None


async def test_unauthenticated_answer_names_schemes(http: str, session) -> None:  # type: ignore[no-untyped-def]
    async with session.post(f"{http}/m/acme/c/temps", data=b"x") as r:
        assert r.status == 401
        assert "Client" in r.headers["WWW-Authenticate"]


async def test_store_unavailable_is_503(world: World, http: str, session) -> None:  # type: ignore[no-untyped-def]
    await world.gateway.store.close()
    status, problem = await post(session, f"{http}/m/acme/c/temps", json.dumps(SENML),
                                 **auth(world.publisher.secret))
    assert status == 503 and problem["type"] == "urn:conduit:error:unavailable"
    async with session.get(f"{http}/health") as r:
        assert r.status == 503
        assert (await r.json())["store"].startswith("unavailable")


async def test_bus_unavailable_is_503(world: World, http: str, session) -> None:  # type: ignore[no-untyped-def]
    await world.gateway.bus.close()
    status, problem = await post(session, f"{http}/m/acme/c/temps", json.dumps(SENML),
                                 **auth(world.publisher.secret))
    assert status == 503 and "bus is closed" in problem["detail"]


async def test_health(http: str, session) -> None:  # type: ignore[no-untyped-def]
    async with session.get(f"{http}/health") as r:
        assert r.status == 200
        assert await r.json() == {"store": "ok", "bus": "ok", "status": "ok"}


async def read_events(resp: aiohttp.ClientResponse, n: int) -> list[dict]:  # type: ignore[type-arg]
    events: list[dict] = []  # type: ignore[type-arg]
    kind = "message"
    while len(events) < n:
        line = (await asyncio.wait_for(resp.content.readline(), 5)).decode().rstrip("\n")
        if line.startswith("event: "):
            kind = line[7:]
        elif line.startswith("data: "):
            events.append({"event": kind, **json.loads(line[6:])})
    return events


async def test_sse_subscribe_with_wildcard(world: World, http: str, session) -> None:  # type: ignore[no-untyped-def]
    headers = {"Accept": "text/event-stream", **auth(world.subscriber.secret)}
    async with session.get(f"{http}/m/acme/c/temps/%2B/t", headers=headers) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "text/event-stream"
        assert (await resp.content.readline()).startswith(b": subscribed to m/acme/c/temps/+/t")
        for sub, body in (("r1/t", b"one"), ("r1/h", b"skip"), ("r2/t", b"\xff\x00")):
            status, _ = await post(session, f"{http}/m/acme/c/temps/{sub}", body,
                                   "application/octet-stream", **auth(world.publisher.secret))
            assert status == 202
        first, second = await read_events(resp, 2)
    assert first["subtopic"] == "r1/t" and first["payload"] == "one"
    assert first["publisher"] == world.publisher.id and first["protocol"] == "http"
    assert first["content_type"] == "application/octet-stream"
    assert second["subtopic"] == "r2/t" and second["encoding"] == "base64"
    assert base64.b64decode(second["payload"]) == b"\xff\x00"


async def test_sse_carries_a_senml_json_pack_as_json(world: World, http: str, session) -> None:  # type: ignore[no-untyped-def]
    headers = {"Accept": "text/event-stream", **auth(world.subscriber.secret)}
    pack = b'[{"bn":"urn:dev:1:",\n  "n":"temp","u":"Cel","v":21.5},\n {"n":"note","vs":"a\\nb"}]'
    async with session.get(f"{http}/m/acme/c/temps", headers=headers) as resp:
        await resp.content.readline()
        status, _ = await post(session, f"{http}/m/acme/c/temps", pack,
                               "application/senml+json", **auth(world.publisher.secret))
        assert status == 202
        (event,) = await read_events(resp, 1)  # one data: line although the pack has three
    assert event["encoding"] == "json" and event["content_type"] == "application/senml+json"
    assert event["payload"] == json.loads(pack)


async def test_sse_streams_get_every_message_in_order(world: World, http: str, session) -> None:  # type: ignore[no-untyped-def]
    headers = {"Accept": "text/event-stream", **auth(world.subscriber.secret)}
    url = f"{http}/m/acme/c/temps/%23"
    async with session.get(url, headers=headers) as one, session.get(url, headers=headers) as two:
        for resp in (one, two):
            await resp.content.readline()
        # Published together, so that they reach the streams in one loop turn.
        statuses = await asyncio.gather(*(
            post(session, f"{http}/m/acme/c/temps/r{i}", f"m{i}", "text/plain",
                 **auth(world.publisher.secret))
            for i in range(5)
        ))
        assert [status for status, _ in statuses] == [202] * 5
        events = [await read_events(resp, 5) for resp in (one, two)]
    assert events[0] == events[1]
    assert sorted(e["payload"] for e in events[0]) == [f"m{i}" for i in range(5)]
    order = [e["created"] for e in events[0]]
    assert order == sorted(order)
    metrics = world.gateway.metrics.exposition().decode()
    assert 'conduit_messages_out_total{protocol="http"} 10.0' in metrics


async def test_sse_refusals(world: World, http: str, session) -> None:  # type: ignore[no-untyped-def]
    sse = {"Accept": "text/event-stream"}
    async with session.get(f"{http}/m/acme/c/temps", headers=sse) as r:
        assert r.status == 401
    async with session.get(f"{http}/m/acme/c/temps",
                           headers={**sse, **auth(world.publisher.secret)}) as r:
        assert r.status == 403
    async with session.get(f"{http}/m/acme/c/%23",
                           headers={**sse, **auth(world.subscriber.secret)}) as r:
        assert r.status == 400 and (await r.json())["part"] == "channel"
    async with session.get(f"{http}/m/acme/c/temps", headers=auth(world.subscriber.secret)) as r:
        assert r.status == 406


async def test_sse_stream_ends_when_right_is_revoked(world: World, http: str, session) -> None:  # type: ignore[no-untyped-def]
    headers = {"Accept": "text/event-stream", **auth(world.subscriber.secret)}
    async with session.get(f"{http}/m/acme/c/temps/%23", headers=headers) as resp:
        await resp.content.readline()
        await world.gateway.provisioning.disconnect("acme", world.subscriber.id, "temps")
        (event,) = await read_events(resp, 1)
        assert event == {"event": "close", "reason": "authorization revoked"}


async def test_other_methods_are_405(world: World, http: str, session) -> None:  # type: ignore[no-untyped-def]
    async with session.delete(f"{http}/m/acme/c/temps", headers=auth(world.publisher.secret)) as r:
        assert r.status == 405
        assert r.headers["Allow"] == "GET, POST, PUT"
        assert r.headers["Content-Type"] == "application/problem+json"
