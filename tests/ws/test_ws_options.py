"""Adapter options: WSS with a TLS context, and the browser origins allowed."""

from __future__ import annotations

import asyncio
import json
import ssl
from pathlib import Path

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from adapters.ws import WSAdapter
from tests.conftest import World, running


async def test_wss(world: World, certificate: tuple[Path, Path]) -> None:
    key, cert = certificate
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert, key)
    async with running(WSAdapter(world.gateway, "127.0.0.1", 0, server_ctx)) as adapter:
        client_ctx = ssl.create_default_context(cafile=str(cert))
        url = f"wss://127.0.0.1:{adapter.port}/m/acme/c/temps"
        headers = {"Authorization": f"Client {world.both.secret}"}
        async with connect(url, ssl=client_ctx, additional_headers=headers) as conn:
            await conn.send("over tls")
            assert await asyncio.wait_for(conn.recv(), 5) == "over tls"


async def test_origins(world: World) -> None:
    async with running(
        WSAdapter(world.gateway, "127.0.0.1", 0, origins=["https://dash.example"])
    ) as adapter:
        url = f"ws://127.0.0.1:{adapter.port}/m/acme/c/temps"
        auth = {"Authorization": f"Client {world.subscriber.secret}"}
        async with connect(url, additional_headers=auth, origin="https://dash.example"):
            pass
        async with connect(url, additional_headers=auth):  # no Origin: not a browser
            pass
        with pytest.raises(InvalidStatus) as info:
            async with connect(url, additional_headers=auth, origin="https://evil.example"):
                pass
        response = info.value.response
        assert response.status_code == 403
        assert json.loads(response.body)["detail"] == "origin 'https://evil.example' is not allowed"


async def test_dashboard_can_be_turned_off(world: World) -> None:
    async with running(WSAdapter(world.gateway, "127.0.0.1", 0, dashboard=False)) as adapter:
        reader, writer = await asyncio.open_connection("127.0.0.1", adapter.port)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 404")
        writer.close()
