"""Fixtures of the WebSocket tests: the adapter on an ephemeral port, a watcher that shows what
was published, and small client helpers."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from adapters.ws import WSAdapter
from tests.conftest import World, running
from tests.conftest import drain as drain  # re-exported for this package's tests


@pytest.fixture
async def ws_adapter(world: World) -> AsyncIterator[WSAdapter]:
    """The WebSocket adapter on an ephemeral port, with a fast keep-alive."""
    adapter = WSAdapter(
        world.gateway, "127.0.0.1", 0, ping_interval=5, ping_timeout=5, close_timeout=2
    )
    async with running(adapter):
        yield adapter


@pytest.fixture
def ws(ws_adapter: WSAdapter) -> str:
    """Base URL of the WebSocket adapter."""
    return f"ws://127.0.0.1:{ws_adapter.port}"


async def raw_upgrade(
    port: int, secret: str, path: str = "/m/acme/c/temps"
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A WebSocket opened by hand on a plain socket (for what a client library would not do),
    its 101 read."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        b"GET %s HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
        b"Authorization: Client %s\r\n\r\n" % (path.encode(), secret.encode())
    )
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 101"), head
    return reader, writer


def masked_frame(first: int, payload: bytes) -> bytes:
    """A client's frame (masked, RFC 6455 5.3) of fewer than 126 bytes; ``first`` is its first
    byte (FIN and opcode)."""
    mask = b"\x01\x02\x03\x04"
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes((first, 0x80 | len(payload))) + mask + masked
