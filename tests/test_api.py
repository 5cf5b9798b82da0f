"""The management API over a real socket: the admin key, problem answers, the OpenAPI spec."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import pytest
from openapi_spec_validator import validate

from adapters.http.server import Listener
from conduit.api import ManagementAPI
from conduit.openapi import OPERATIONS, spec
from core.limits import ListenerLimits
from core.listeners import Endpoint
from tests.conftest import World

KEY = "test-admin-key"


@pytest.fixture
async def api(world: World) -> AsyncIterator[str]:
    app = ManagementAPI(world.gateway, KEY).app
    endpoint = Endpoint("api", "127.0.0.1", 0)
    listener = Listener(world.gateway, "api", app, endpoint, limits=ListenerLimits())
    await listener.start()
    yield f"http://127.0.0.1:{listener.port}"
    await listener.stop(2)


@pytest.fixture
async def s() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {KEY}"}) as session:
        yield session


def test_spec_is_valid_and_matches_routes(world: World) -> None:
    validate(spec())  # type: ignore[arg-type]
    app = ManagementAPI(world.gateway, KEY).app
    routes = {
        (r.method.lower(), r.resource.canonical)  # type: ignore[union-attr]
        for r in app.router.routes() if r.method != "HEAD"
    }
    assert routes == set(OPERATIONS)


async def test_key_is_required(api: str) -> None:
    async with aiohttp.ClientSession() as anon:
        async with anon.get(f"{api}/domains") as r:
            assert r.status == 401
            assert r.headers["Content-Type"] == "application/problem+json"
        async with anon.get(f"{api}/domains", headers={"Authorization": "Bearer nope"}) as r:
            assert r.status == 401
        for open_path in ("/health", "/metrics", "/openapi.json"):
            async with anon.get(api + open_path) as r:
                assert r.status == 200, open_path


async def test_crud_and_problems(api: str, s: aiohttp.ClientSession, world: World) -> None:
    async with s.post(f"{api}/domains", json={"name": "beta", "metadata": {"tier": "gold"}}) as r:
        assert r.status == 201 and (await r.json())["metadata"] == {"tier": "gold"}
    async with s.post(f"{api}/domains", json={"name": "beta"}) as r:
        assert r.status == 409
    async with s.post(f"{api}/domains", json={"name": "bad name"}) as r:
        assert r.status == 400 and "domain name" in (await r.json())["detail"]
    async with s.post(f"{api}/domains", data=b"{nope") as r:
        assert r.status == 400 and "not valid JSON" in (await r.json())["detail"]
    async with s.post(f"{api}/domains", json={"metadata": {"a": 1}}) as r:
        assert r.status == 400
    async with s.post(f"{api}/domains/beta/clients", json={"name": "dev"}) as r:
        assert r.status == 201
        client = await r.json()
        assert len(client["secret"]) >= 40
    async with s.get(f"{api}/domains/beta/clients/{client['id']}") as r:
        assert "secret" not in await r.json()
    async with s.post(f"{api}/domains/beta/channels", json={"name": "ch"}) as r:
        assert r.status == 201
    async with s.post(f"{api}/domains/beta/connections",
                      json={"client": "dev", "channel": "ch", "subscribe": False}) as r:
        assert r.status == 201
        assert await r.json() == {"domain": "beta", "client_id": client["id"], "channel": "ch",
                                  "publish": True, "subscribe": False}
    async with s.post(f"{api}/domains/beta/connections",
                      json={"client": "dev", "channel": "ch", "publish": "yes"}) as r:
        assert r.status == 400
    async with s.get(f"{api}/domains/beta/connections?client=dev") as r:
        assert len(await r.json()) == 1
    async with s.delete(f"{api}/domains/beta/connections/dev/ch") as r:
        assert r.status == 204
    async with s.delete(f"{api}/domains/beta/connections/dev/ch") as r:
        assert r.status == 404
    async with s.post(f"{api}/domains/beta/clients/dev/secret") as r:
        assert (await r.json())["secret"] != client["secret"]
    async with s.get(f"{api}/domains/nope/channels") as r:
        assert r.status == 404 and (await r.json())["detail"] == "no domain 'nope'"
    async with s.delete(f"{api}/domains/beta") as r:
        assert r.status == 204
    async with s.get(f"{api}/domains/beta") as r:
        assert r.status == 404


async def test_metrics_count_by_protocol(api: str, world: World) -> None:
    async with aiohttp.ClientSession() as anon:
        async with anon.get(f"{api}/metrics") as r:
            text = await r.text()
    for name in ("conduit_messages_in_total", "conduit_refusals_total",
                 "conduit_publish_seconds_bucket", "conduit_connections"):
        assert name in text


async def test_store_down_is_503(api: str, s: aiohttp.ClientSession, world: World) -> None:
    await world.gateway.store.close()
    async with s.get(f"{api}/domains") as r:
        assert r.status == 503
        assert (await r.json())["detail"] == "store is not open"


async def test_client_names_are_unique_and_printable(
    api: str, s: aiohttp.ClientSession, world: World
) -> None:
    async with s.post(f"{api}/domains/acme/clients", json={"name": "lamp"}) as r:
        assert r.status == 201
        lamp = await r.json()
    async with s.post(f"{api}/domains/acme/clients", json={"name": "lamp"}) as r:
        assert r.status == 409
        assert (await r.json())["detail"] == "a client named 'lamp' exists in domain 'acme'"
    for bad in ("lamp\x00", "a\nb", "tab\there", " lamp", "lamp ", "\u202elamp", ""):
        async with s.post(f"{api}/domains/acme/clients", json={"name": bad}) as r:
            assert r.status == 400, repr(bad)
    # By name, the one client: "disable by name" cannot pick another.
    async with s.post(f"{api}/domains/acme/clients/lamp/disable") as r:
        assert r.status == 200 and (await r.json())["id"] == lamp["id"]
    async with s.get(f"{api}/domains/acme/clients") as r:
        names = [c["name"] for c in await r.json()]
    assert names.count("lamp") == 1
    # The same name in another domain is another client.
    await world.gateway.provisioning.create_domain("globex")
    async with s.post(f"{api}/domains/globex/clients", json={"name": "lamp"}) as r:
        assert r.status == 201


async def test_guards_of_the_api_listener(world: World) -> None:
    """The API is a listener like the HTTP adapter's: a request head must come in time, a body
    too (408), and past its connection cap a connection gets 503."""
    app = ManagementAPI(world.gateway, KEY, body_timeout=0.3).app
    limits = ListenerLimits(header_timeout=0.3, max_connections=2)
    listener = Listener(world.gateway, "api", app, Endpoint("api", "127.0.0.1", 0), limits=limits)
    await listener.start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
        writer.write(
            b"POST /domains HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode()
            + b"\r\nContent-Type: application/json\r\nContent-Length: 20\r\n\r\n{\"name\":"
        )
        answer = await asyncio.wait_for(reader.read(), 10)
        assert answer.startswith(b"HTTP/1.1 408 Request Timeout\r\n")
        assert b'"type":"urn:conduit:error:request_timeout"' in answer
        writer.close()
        assert await world.gateway.provisioning.list_domains() == [
            await world.gateway.provisioning.get_domain("acme")
        ]
        held = [await asyncio.open_connection("127.0.0.1", listener.port) for _ in range(2)]
        reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
        assert (await asyncio.wait_for(reader.read(), 10)).startswith(b"HTTP/1.1 503 ")
        writer.close()
        for r, w in held:  # both idle: cut off by the header timeout
            assert await asyncio.wait_for(r.read(), 10) == b""
            w.close()
        refusals = world.gateway.metrics.refusals
        assert refusals.labels("api", "header_timeout").value == 2
        assert refusals.labels("api", "connection_limit").value == 1
    finally:
        await listener.stop(2)
