"""The guards of an HTTP listener, with raw sockets: bad bytes in credentials, malformed
requests (answered without repeating them, counted, logged as a sample), the header, body and
idle timeouts, the connection cap, and a stop that does not wait for idle connections. In each
case nothing is published and other clients go on being served."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator

import pytest

from adapters.http import HTTPAdapter
from core.bus import Subscription
from core.limits import ListenerLimits
from core.noise import SAMPLE
from tests.conftest import World, drain, running

TIMEOUT = 10.0  # seconds a test waits for something that must happen much sooner


@pytest.fixture
def listener_limits() -> ListenerLimits:
    return ListenerLimits(header_timeout=0.5, body_timeout=0.5, idle_timeout=2, max_connections=4)


@pytest.fixture
async def adapter(world: World, listener_limits: ListenerLimits) -> AsyncIterator[HTTPAdapter]:
    async with running(HTTPAdapter(world.gateway, "127.0.0.1", 0, limits=listener_limits)) as a:
        yield a


def _post(secret: str | bytes, body: bytes = b"hello", extra: bytes = b"") -> bytes:
    if isinstance(secret, str):
        secret = secret.encode()
    return (
        b"POST /m/acme/c/temps/t HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain\r\n"
        b"Authorization: Client " + secret + b"\r\nContent-Length: %d\r\n" % len(body)
        + extra + b"\r\n" + body
    )


async def _open(adapter: HTTPAdapter) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", adapter.port)


async def _answer(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """One response: status, headers (lower-case names), body."""
    status = int((await asyncio.wait_for(reader.readline(), TIMEOUT)).split()[1])
    headers: dict[str, str] = {}
    while (line := await asyncio.wait_for(reader.readline(), TIMEOUT)) != b"\r\n":
        name, _, value = line.decode().partition(":")
        headers[name.lower()] = value.strip()
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return status, headers, body


async def _closed(reader: asyncio.StreamReader) -> bool:
    """Whether the server closes the connection (EOF, with nothing more written) in time."""
    try:
        return await asyncio.wait_for(reader.read(), TIMEOUT) == b""
    except (ConnectionError, TimeoutError):
        return False


async def _still_served(world: World, adapter: HTTPAdapter, watch: Subscription) -> None:
    """Another client publishes and its message arrives."""
    reader, writer = await _open(adapter)
    writer.write(_post(world.publisher.secret, b"other"))
    status, _, _ = await _answer(reader)
    writer.close()
    assert status == 202
    assert [m.payload for m in drain(watch)] == [b"other"]


def _refusals(world: World, reason: str) -> float:
    return world.gateway.metrics.refusals.labels("http", reason).value


async def test_credentials_that_are_not_utf8_are_bad_credentials(
    world: World, adapter: HTTPAdapter, watch: Subscription
) -> None:
    reader, writer = await _open(adapter)
    writer.write(_post(b"\xff\xfe" + world.publisher.secret.encode()))
    status, headers, body = await _answer(reader)
    assert status == 401
    assert headers["content-type"] == "application/problem+json"
    assert json.loads(body)["detail"] == "credentials must be ASCII"
    writer.close()
    assert drain(watch) == []
    await _still_served(world, adapter, watch)


async def test_malformed_requests_are_answered_counted_and_sampled(
    world: World, adapter: HTTPAdapter, watch: Subscription, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    secret = world.publisher.secret
    bare_lf = _post(secret).replace(b"\r\n", b"\n")  # lines ending with a bare LF
    n = 3 * SAMPLE
    for _ in range(n):
        reader, writer = await _open(adapter)
        writer.write(bare_lf)
        status, headers, body = await _answer(reader)
        assert status == 400
        assert headers["content-type"] == "application/problem+json"
        assert json.loads(body)["detail"] == "malformed request line (lines end with CRLF)"
        assert secret.encode() not in body  # aiohttp's own answer quoted the request
        assert await _closed(reader)
        writer.close()
    assert drain(watch) == []
    assert _refusals(world, "malformed_request") == n
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert not [r for r in caplog.records if secret in r.getMessage() or r.exc_info]
    logged = [r for r in caplog.records if "malformed_request" in r.getMessage()]
    assert len(logged) == SAMPLE  # the rest is counted, and reported once the interval is over
    await _still_served(world, adapter, watch)


async def test_a_request_head_sent_slowly_is_cut_off(
    world: World, adapter: HTTPAdapter, watch: Subscription
) -> None:
    reader, writer = await _open(adapter)

    async def trickle() -> None:
        for byte in _post(world.publisher.secret):
            writer.write(bytes([byte]))
            await asyncio.sleep(0.1)  # the whole head would take seconds

    sender = asyncio.ensure_future(trickle())
    try:
        assert await _closed(reader)
    finally:
        sender.cancel()
        writer.close()
    assert _refusals(world, "header_timeout") == 1
    assert drain(watch) == []
    await _still_served(world, adapter, watch)


async def test_a_connection_that_sends_nothing_is_closed(
    world: World, adapter: HTTPAdapter, watch: Subscription
) -> None:
    reader, writer = await _open(adapter)
    assert await _closed(reader)
    writer.close()
    assert _refusals(world, "header_timeout") == 1
    await _still_served(world, adapter, watch)


async def test_an_idle_kept_alive_connection_is_closed(
    world: World, adapter: HTTPAdapter, watch: Subscription
) -> None:
    reader, writer = await _open(adapter)
    writer.write(_post(world.publisher.secret, b"first"))
    status, _, _ = await _answer(reader)
    assert status == 202
    assert [m.payload for m in drain(watch)] == [b"first"]
    assert await _closed(reader)  # idle_timeout after the answer
    writer.close()


async def test_a_body_that_does_not_arrive_is_refused_with_408(
    world: World, adapter: HTTPAdapter, watch: Subscription
) -> None:
    reader, writer = await _open(adapter)
    writer.write(_post(world.publisher.secret, b"[1, 2, 3]")[:-5])  # 5 bytes never come
    status, headers, body = await _answer(reader)
    assert status == 408
    assert headers["connection"] == "close"
    assert json.loads(body)["type"] == "urn:conduit:error:request_timeout"
    assert await _closed(reader)
    writer.close()
    assert drain(watch) == []
    assert _refusals(world, "request_timeout") == 1
    await _still_served(world, adapter, watch)


async def test_connections_beyond_the_cap_are_refused_with_503(
    world: World, adapter: HTTPAdapter, watch: Subscription
) -> None:
    held = [await _open(adapter) for _ in range(4)]  # max_connections = 4, all idle
    reader, writer = await _open(adapter)
    status, headers, body = await _answer(reader)
    assert status == 503
    assert headers["retry-after"] == "5"
    assert json.loads(body)["detail"] == "this listener has as many connections as it accepts;" \
        " retry later"
    assert await _closed(reader)
    writer.close()
    assert _refusals(world, "connection_limit") == 1
    for _, w in held:
        w.close()
    for _ in range(50):  # the server sees the closes
        if not any(listener.connections for listener in adapter._listeners):
            break
        await asyncio.sleep(0.05)
    await _still_served(world, adapter, watch)


async def test_stop_does_not_wait_for_idle_connections(world: World) -> None:
    limits = ListenerLimits(header_timeout=3600, idle_timeout=3600)
    adapter = HTTPAdapter(world.gateway, "127.0.0.1", 0, limits=limits)
    await adapter.start()
    idle_before_request = await _open(adapter)
    reader, writer = await _open(adapter)
    writer.write(_post(world.publisher.secret))
    assert (await _answer(reader))[0] == 202  # kept alive, idle now
    # A stop that waited for these two would take the whole timeout (an hour).
    await asyncio.wait_for(adapter.stop(timeout=3600), TIMEOUT)
    assert await _closed(reader)
    assert await _closed(idle_before_request[0])
