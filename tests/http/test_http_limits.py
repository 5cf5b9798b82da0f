"""HTTP refusals that need tight limits: too large (413) and rate exceeded (429)."""

from __future__ import annotations

import asyncio
from urllib.parse import urlsplit

import aiohttp
import pytest

from core.credentials import Credentials
from core.limits import Limits
from tests.conftest import World


@pytest.fixture
def limits() -> Limits:
    return Limits(max_payload=1000, rate=1.0, burst=3)


async def test_too_large_and_rate_limited(world: World, http: str) -> None:
    ident = await world.gateway.authenticate(Credentials(world.subscriber.secret))
    watch = await world.gateway.subscribe(ident, "m/acme/c/temps/#", "http")
    headers = {"Authorization": f"Client {world.publisher.secret}", "Content-Type": "text/plain"}
    url = f"{http}/m/acme/c/temps"
    async with aiohttp.ClientSession() as s:
        async with s.post(url, data=b"x" * 1001, headers=headers) as r:
            assert r.status == 413
            assert (await r.json(content_type=None))["type"] == "urn:conduit:error:too_large"
        assert watch.get_nowait() is None

        # A chunked body has no Content-Length: the limit holds while reading.
        async def chunks():  # type: ignore[no-untyped-def]
            for _ in range(3):
                yield b"y" * 600

        async with s.post(url, data=chunks(), headers=headers) as r:
            assert r.status == 413
        assert watch.get_nowait() is None

        statuses = []
        for _ in range(5):
            async with s.post(url, data=b"ok", headers=headers) as r:
                statuses.append(r.status)
                if r.status == 429:
                    body = await r.json(content_type=None)
                    assert body["type"] == "urn:conduit:error:rate_limited"
        assert statuses[:3] == [202, 202, 202] and 429 in statuses[3:]
    delivered = 0
    while watch.get_nowait() is not None:
        delivered += 1
    assert delivered == statuses.count(202)


async def _raw_post(http: str, secret: str, body_bytes: bytes, framing: str) -> bytes:
    """One POST written to the socket in a single write, so the whole body is there when the
    handler runs (the path that takes the body from aiohttp's buffer)."""
    url = urlsplit(http)
    reader, writer = await asyncio.open_connection(url.hostname, url.port)
    head = (
        "POST /m/acme/c/temps HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain\r\n"
        f"Authorization: Client {secret}\r\n{framing}\r\n"
    )
    writer.write(head.encode() + body_bytes)
    await writer.drain()
    status = await reader.readline()
    writer.close()
    return status


@pytest.mark.parametrize("size", [999, 1000, 1001, 5000])
async def test_chunked_body_in_one_write_holds_the_limit(
    world: World, http: str, size: int
) -> None:
    ident = await world.gateway.authenticate(Credentials(world.subscriber.secret))
    watch = await world.gateway.subscribe(ident, "m/acme/c/temps/#", "http")
    payload = b"z" * size
    half = size // 2
    chunked = b"%x\r\n%b\r\n%x\r\n%b\r\n0\r\n\r\n" % (
        half,
        payload[:half],
        size - half,
        payload[half:],
    )
    status = await _raw_post(
        http, world.publisher.secret, chunked, "Transfer-Encoding: chunked\r\n"
    )
    message = watch.get_nowait()
    if size <= 1000:
        assert status.startswith(b"HTTP/1.1 202")
        assert message is not None and message.payload == payload
    else:
        assert status.startswith(b"HTTP/1.1 413")
        assert message is None


async def test_expect_100_continue_is_answered(world: World, http: str) -> None:
    """A client that sends ``Expect: 100-continue`` waits for the interim answer before the
    body; without it, curl waits a second and other clients wait for good."""
    ident = await world.gateway.authenticate(Credentials(world.subscriber.secret))
    watch = await world.gateway.subscribe(ident, "m/acme/c/temps/#", "http")
    url = urlsplit(http)
    head = (
        "POST /m/acme/c/temps HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain\r\n"
        f"Authorization: Client {world.publisher.secret}\r\nExpect: 100-continue\r\n"
    )
    reader, writer = await asyncio.open_connection(url.hostname, url.port)
    writer.write(f"{head}Content-Length: 5\r\n\r\n".encode())
    assert await asyncio.wait_for(reader.readline(), 2) == b"HTTP/1.1 100 Continue\r\n"
    assert await reader.readline() == b"\r\n"
    writer.write(b"hello")
    assert (await asyncio.wait_for(reader.readline(), 2)).startswith(b"HTTP/1.1 202")
    writer.close()
    message = watch.get_nowait()
    assert message is not None and message.payload == b"hello"

    # Too large by its announced length: the final answer at once, no 100, nothing published.
    reader, writer = await asyncio.open_connection(url.hostname, url.port)
    writer.write(f"{head}Content-Length: 5000\r\n\r\n".encode())
    assert (await asyncio.wait_for(reader.readline(), 2)).startswith(b"HTTP/1.1 413")
    writer.close()
    assert watch.get_nowait() is None
