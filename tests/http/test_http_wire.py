"""The 202 of a publish as it is on the wire: the bytes Conduit writes itself on a keep-alive
HTTP/1.1 connection, and aiohttp's own response for HTTP/1.0 and ``Connection: close``."""

from __future__ import annotations

import asyncio
import email.utils
import socket
import ssl
import time
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp

from adapters.http import HTTPAdapter
from core.credentials import Credentials
from tests.conftest import World, running


def _post(secret: str, body: bytes, version: str = "1.1", extra: str = "") -> bytes:
    return (
        f"POST /m/acme/c/temps HTTP/{version}\r\nHost: x\r\nContent-Type: text/plain\r\n"
        f"Authorization: Client {secret}\r\nContent-Length: {len(body)}\r\n{extra}\r\n"
    ).encode() + body


async def _response(reader: asyncio.StreamReader) -> tuple[bytes, dict[str, str]]:
    """A bodiless response: its status line and headers (names lower-cased)."""
    status = await asyncio.wait_for(reader.readline(), 5)
    headers: dict[str, str] = {}
    while (line := await asyncio.wait_for(reader.readline(), 5)) != b"\r\n":
        name, _, value = line.decode().partition(":")
        assert name.lower() not in headers, f"{name} twice"
        headers[name.lower()] = value.strip()
    return status, headers


def _check_date(value: str) -> None:
    sent = email.utils.parsedate_to_datetime(value).timestamp()
    assert abs(sent - time.time()) < 5
    assert value.endswith(" GMT")


async def test_keep_alive_202s_pipelined(world: World, http: str) -> None:
    ident = await world.gateway.authenticate(Credentials(world.subscriber.secret))
    watch = await world.gateway.subscribe(ident, "m/acme/c/temps/#", "http")
    url = urlsplit(http)
    reader, writer = await asyncio.open_connection(url.hostname, url.port)
    secret = world.publisher.secret
    writer.write(_post(secret, b"one") + _post(secret, b"two"))  # pipelined: one write
    for _ in range(2):
        status, headers = await _response(reader)
        assert status == b"HTTP/1.1 202 Accepted\r\n"
        assert set(headers) == {"content-length", "date", "server"}
        assert headers["content-length"] == "0"
        assert "aiohttp" in headers["server"]
        _check_date(headers["date"])
    # The connection stays open for the next request.
    writer.write(_post(secret, b"three"))
    status, _ = await _response(reader)
    assert status == b"HTTP/1.1 202 Accepted\r\n"
    writer.close()
    payloads = []
    while (message := watch.get_nowait()) is not None:
        payloads.append(message.payload)
    assert payloads == [b"one", b"two", b"three"]


async def test_keep_alive_202s_over_tls(world: World, certificate: tuple[Path, Path]) -> None:
    """The prepared 202 on a TLS transport: a real HTTPS client on one kept-alive connection."""
    key, cert = certificate
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert, key)
    client_ctx = ssl.create_default_context(cafile=str(cert))
    ident = await world.gateway.authenticate(Credentials(world.subscriber.secret))
    watch = await world.gateway.subscribe(ident, "m/acme/c/temps/#", "http")
    headers = {"Authorization": f"Client {world.publisher.secret}", "Content-Type": "text/plain"}
    connections = 0

    async def connected(*_: object) -> None:
        nonlocal connections
        connections += 1

    trace = aiohttp.TraceConfig()
    trace.on_connection_create_end.append(connected)
    async with (
        running(HTTPAdapter(world.gateway, "127.0.0.1", 0, ssl_context=server_ctx)) as adapter,
        aiohttp.ClientSession(trace_configs=[trace]) as session,
    ):
        url = f"https://127.0.0.1:{adapter.port}/m/acme/c/temps"
        for i in range(3):
            async with session.post(url, data=f"tls{i}", headers=headers, ssl=client_ctx) as r:
                assert r.status == 202 and await r.read() == b""
                assert r.headers["Content-Length"] == "0"
                _check_date(r.headers["Date"])
    assert connections == 1  # kept alive
    payloads = []
    while (message := watch.get_nowait()) is not None:
        payloads.append(message.payload)
    assert payloads == [b"tls0", b"tls1", b"tls2"]


async def test_202_that_closes_the_connection(world: World, http: str) -> None:
    """HTTP/1.0 without keep-alive, and HTTP/1.1 with ``Connection: close``: aiohttp's own
    response, and the server closes the connection after it."""
    ident = await world.gateway.authenticate(Credentials(world.subscriber.secret))
    watch = await world.gateway.subscribe(ident, "m/acme/c/temps/#", "http")
    url = urlsplit(http)
    for version, extra, connection in [
        ("1.0", "", None),
        ("1.1", "Connection: close\r\n", "close"),
    ]:
        reader, writer = await asyncio.open_connection(url.hostname, url.port)
        writer.write(_post(world.publisher.secret, b"bye", version, extra))
        status, headers = await _response(reader)
        assert status.startswith(f"HTTP/{version} 202".encode())
        assert headers["content-length"] == "0"
        assert headers.get("connection") == connection
        _check_date(headers["date"])
        assert await asyncio.wait_for(reader.read(), 5) == b""  # closed by the server
        writer.close()
        message = watch.get_nowait()
        assert message is not None and message.payload == b"bye"


async def test_http10_keep_alive(world: World, http: str) -> None:
    url = urlsplit(http)
    reader, writer = await asyncio.open_connection(url.hostname, url.port)
    for _ in range(2):
        writer.write(_post(world.publisher.secret, b"x", "1.0", "Connection: keep-alive\r\n"))
        status, headers = await _response(reader)
        assert status.startswith(b"HTTP/1.0 202")
        assert headers["connection"].lower() == "keep-alive"
    writer.close()


def _send_buffer_max() -> int:
    with open("/proc/sys/net/ipv4/tcp_wmem") as f:
        return int(f.read().split()[2])


async def test_client_that_does_not_read_its_202s(world: World, http: str) -> None:
    """A client pipelines POSTs without reading the answers: the server's send buffer fills,
    the 202s wait for the client (the server stops taking requests meanwhile), and once the
    client reads, every request has its 202 and every message was published once."""
    url = urlsplit(http)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a small receive window
    sock.connect((url.hostname, url.port))
    sock.setblocking(False)
    reader, writer = await asyncio.open_connection(sock=sock)
    request = _post(world.publisher.secret, b"p")
    # More answers than the server's socket can hold unread (its send buffer grows up to
    # tcp_wmem's maximum; an answer is about 120 bytes).
    batch = 500
    total = (_send_buffer_max() // 100 // batch + 20) * batch
    published = world.gateway.metrics.in_["http"]
    before = published.value

    async def send() -> None:
        for _ in range(total // batch):
            writer.write(request * batch)
            await writer.drain()

    sending = asyncio.create_task(send())
    # The server stops taking requests while its answers wait: the count stops growing short
    # of the total.
    count = 0
    for _ in range(60):
        await asyncio.sleep(0.5)
        if count == (count := published.value - before):
            break
    assert 0 < count < total
    for _ in range(total):
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 202 Accepted\r\n"), head
    await sending
    writer.close()
    assert published.value - before == total
