"""``GET /openapi.json`` on the public HTTP listeners: a valid OpenAPI 3.1 document, fetched
from a running adapter (plain and TLS), that names exactly the operations the adapter serves.

The served set comes from two places that cannot both be wrong silently: the adapter's route
table (``ROUTES``, which its dispatch reads), compared with the description as data; and a
running adapter, asked every documented operation (none may answer the router's 404 or a 405),
every other method on those paths (each a 405 naming the documented ones), and made-up paths
(the router's 404).
"""

from __future__ import annotations

import re
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from openapi_spec_validator import validate

from adapters.http import HTTPAdapter
from adapters.http.adapter import MESSAGING, ROUTES
from adapters.http.openapi import EXCHANGE_REFUSALS, spec
from core.bus import Subscription
from core.listeners import Endpoint
from tests.conftest import World, running
from tests.test_tls import make_certificate

DOCS = Path(__file__).resolve().parents[2] / "docs"
METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
ROUTER_404 = "urn:conduit:error:not_found"
# A value for each path parameter of the description.
VALUES = {"domain": "acme", "channel": "temps", "subtopic": "room/1", "provider": "google"}


def documented() -> set[tuple[str, str]]:
    """(METHOD, path template) of every operation the description names."""
    return {(m.upper(), path) for path, item in spec()["paths"].items() for m in item}


def route_of(template: str) -> str:
    """The key of ROUTES that serves a path template: itself, or the one prefix it is under."""
    if template in ROUTES:
        return template
    prefixes = [key for key in ROUTES if key.endswith("/") and template.startswith(key)]
    assert len(prefixes) == 1, f"{template} is under no route, or several: {prefixes}"
    return prefixes[0]


def concrete(template: str) -> str:
    return re.sub(r"\{(\w+)\}", lambda m: VALUES[m.group(1)], template)


@pytest.fixture
async def listeners(world: World, tmp_path: Path) -> AsyncIterator[tuple[str, str, ssl.SSLContext]]:
    """The adapter on a plain and a TLS endpoint at once, as `conduit serve` runs it: their base
    URLs, and a client context that trusts the TLS one."""
    cert, key = make_certificate(tmp_path, "server")
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(cert, key)
    endpoints = [
        Endpoint("http", "127.0.0.1", 0),
        Endpoint("https", "127.0.0.1", 0, server),
    ]
    async with running(HTTPAdapter(world.gateway, endpoints=endpoints)) as adapter:
        ports = adapter.ports
        yield (
            f"http://127.0.0.1:{ports['http']}",
            f"https://127.0.0.1:{ports['https']}",
            ssl.create_default_context(cafile=cert),
        )


def test_the_description_names_the_operations_of_the_route_table() -> None:
    validate(spec())  # type: ignore[arg-type]
    served = {(method, path) for path, methods in ROUTES.items() for method in methods}
    described = {(method, route_of(template)) for method, template in documented()}
    assert described == served
    # Every prefix route is described by at least one template under it (checked above for
    # each template), and no other route is under the messaging prefix.
    assert all(key == MESSAGING or not key.startswith(MESSAGING) for key in ROUTES)
    assert not "/openapi.json".startswith(MESSAGING)
    ids = [op["operationId"] for item in spec()["paths"].values() for op in item.values()]
    assert len(ids) == len(set(ids))


async def test_served_on_the_plain_and_the_tls_listener(
    listeners: tuple[str, str, ssl.SSLContext],
) -> None:
    plain, tls, trust = listeners
    bodies = []
    async with aiohttp.ClientSession() as session:
        for base in (plain, tls):
            async with session.get(f"{base}/openapi.json", ssl=trust) as r:
                assert r.status == 200
                assert r.headers["Content-Type"] == "application/json"
                assert r.headers["Cache-Control"] == "public, max-age=3600"
                etag = r.headers["ETag"]
                document = await r.json()
                bodies.append(document)
            validate(document)
            assert document["openapi"] == "3.1.0"
            async with session.get(
                f"{base}/openapi.json", ssl=trust, headers={"If-None-Match": f'W/{etag}, "x"'}
            ) as r:
                assert r.status == 304 and r.headers["ETag"] == etag
                assert await r.read() == b""
            async with session.head(f"{base}/openapi.json", ssl=trust) as r:
                assert r.status == 200 and r.headers["ETag"] == etag
    assert bodies[0] == bodies[1] == spec()
    assert documented() == {(m.upper(), p) for p, item in bodies[0]["paths"].items() for m in item}


async def answer(
    session: aiohttp.ClientSession, method: str, url: str
) -> tuple[int, dict[str, Any] | None, str | None]:
    """Status, problem document if any, and Allow header of a request with no credentials."""
    async with session.request(method, url, data=b"{}") as r:
        problem = None
        if r.headers.get("Content-Type") == "application/problem+json" and method != "HEAD":
            problem = await r.json(content_type=None)
        return r.status, problem, r.headers.get("Allow")


async def test_every_documented_operation_is_routed_and_nothing_else(http: str) -> None:
    operations = documented()
    templates = {template for _, template in operations}
    async with aiohttp.ClientSession() as session:
        for method, template in sorted(operations):
            status, problem, _ = await answer(session, method, http + concrete(template))
            routed_404 = status == 404 and problem is not None and problem["type"] == ROUTER_404
            assert status != 405 and not routed_404, (method, template, status, problem)
        for template in sorted(templates):
            allowed = sorted(m for m, t in operations if t == template)
            for method in METHODS:
                if method in allowed:
                    continue
                status, problem, allow = await answer(session, method, http + concrete(template))
                assert (status, allow) == (405, ", ".join(allowed)), (method, template)
                if method != "HEAD":
                    assert problem is not None and problem["status"] == 405
        for made_up in ("/nowhere", "/openapi.json/x", "/openapi", "/m", "/users", "/auth/x",
                        "/users/me/x", "/.well-known/x"):  # fmt: skip
            for method in ("GET", "POST"):
                status, problem, _ = await answer(session, method, http + made_up)
                assert status == 404 and problem is not None, (method, made_up)
                assert problem["type"] == ROUTER_404
                assert problem["detail"] == f"{made_up} is not a messaging path"


async def test_a_percent_encoded_slash_separates_subtopic_levels(
    world: World, http: str, watch: Subscription
) -> None:
    """What the description says of {subtopic}: generated clients escape a '/' in it."""
    headers = {"Authorization": f"Client {world.publisher.secret}", "Content-Type": "text/plain"}
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{http}/m/acme/c/temps/room%2F1", data=b"x", headers=headers) as r:
            assert r.status == 202
    message = watch.get_nowait()
    assert message is not None and message.subtopic == "room/1"


def test_exchange_refusals_match_the_docs() -> None:
    """The problem types of the exchange in the description and in identity-providers.md."""
    text = (DOCS / "identity-providers.md").read_text()
    rows = re.findall(r"^\| (\d{3}) \| ((?:`[a-z-]+`(?:, )?)+) \|", text, re.MULTILINE)
    in_docs = {
        kind: int(status) for status, kinds in rows for kind in re.findall(r"`([a-z-]+)`", kinds)
    }
    assert in_docs == {kind: status for kind, (status, _) in EXCHANGE_REFUSALS.items()}
