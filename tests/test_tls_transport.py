"""The TLS transport of the TLS endpoints (``adapters.tls``: OpenSSL on the socket, driven by
the event loop) under a plain protocol, with real TLS clients: order and flow control of large
writes to a client that reads slowly, reading paused and resumed, close_notify, and handshakes
that fail or never finish, which make no protocol."""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

import certs
from adapters import tls

TIMEOUT = 10.0


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    ca = certs.create_ca()
    certs.write(tmp_path, "ca", ca)
    certs.write(tmp_path, "server", certs.issue_server(ca, ["127.0.0.1"]))
    certs.write(tmp_path, "client", certs.issue_client(ca, "dev-1"))
    return tmp_path


def server_context(pki: Path, client_auth: ssl.VerifyMode = ssl.CERT_OPTIONAL) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pki / "server.pem", pki / "server.key")
    context.load_verify_locations(pki / "ca.pem")
    context.verify_mode = client_auth
    return context


def client_context(pki: Path, certificate: bool = True) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki / "ca.pem"))
    if certificate:
        context.load_cert_chain(pki / "client.pem", pki / "client.key")
    return context


class Recorder(asyncio.Protocol):
    """Keeps what it is told; ``made`` lists every instance made."""

    made: list[Recorder] = []

    def __init__(self) -> None:
        self.transport: tls.TLSTransport | None = None
        self.certificate: bytes | None = None  # the client's, as the handshake left it
        self.on_resume = b""  # written when told it may write again
        self.data = bytearray()
        self.events: list[str] = []
        self.lost: asyncio.Future[Exception | None] = asyncio.get_running_loop().create_future()
        Recorder.made.append(self)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, tls.TLSTransport)
        self.transport = transport
        self.certificate = transport.get_extra_info("ssl_object").getpeercert(binary_form=True)
        self.events.append("made")

    def data_received(self, data: bytes) -> None:
        self.data += data

    def eof_received(self) -> bool | None:
        self.events.append("eof")
        return None

    def pause_writing(self) -> None:
        self.events.append("pause")

    def resume_writing(self) -> None:
        self.events.append("resume")
        if self.on_resume and self.transport is not None:
            self.transport.write(self.on_resume)  # as a protocol that waited for room does

    def connection_lost(self, exc: Exception | None) -> None:
        self.events.append("lost")
        self.lost.set_result(exc)


@pytest.fixture
async def server(pki: Path) -> AsyncIterator[tls.TLSServer]:
    Recorder.made = []
    srv = await tls.create_server(
        Recorder, "127.0.0.1", 0, server_context(pki), handshake_timeout=1
    )
    yield srv
    srv.close()


def port(server: tls.TLSServer) -> int:
    port: int = server.sockets[0].getsockname()[1]
    return port


async def until(condition: object, timeout: float = TIMEOUT) -> None:
    for _ in range(int(timeout / 0.01)):
        if callable(condition) and condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached")


async def ended(reader: asyncio.StreamReader) -> bool:
    """Whether the server ended the connection: EOF, or a reset when bytes the client sent
    were still unread in the server's socket (the kernel then answers the close with RST)."""
    try:
        return await asyncio.wait_for(reader.read(), TIMEOUT) == b""
    except ConnectionResetError:
        return True


async def test_the_peer_certificate_data_both_ways_and_close_notify(
    server: tls.TLSServer, pki: Path
) -> None:
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port(server), ssl=client_context(pki)
    )
    writer.write(b"hello")  # sent with, or right after, the client's Finished
    await until(lambda: Recorder.made and Recorder.made[0].data == b"hello")
    (proto,) = Recorder.made
    assert proto.transport is not None
    der = proto.certificate
    pem = (pki / "client.pem").read_text()
    first = pem[: pem.index("-----END CERTIFICATE-----") + len("-----END CERTIFICATE-----")]
    assert der == ssl.PEM_cert_to_DER_cert(first)
    assert proto.transport.get_extra_info("peername")[0] == "127.0.0.1"
    proto.transport.write(b"world")
    proto.transport.close()
    assert await asyncio.wait_for(reader.read(), TIMEOUT) == b"world"  # then close_notify
    assert await asyncio.wait_for(proto.lost, TIMEOUT) is None
    assert proto.events == ["made", "lost"]
    writer.close()


async def test_large_writes_to_a_slow_reader_arrive_whole_in_order_with_flow_control(
    server: tls.TLSServer, pki: Path
) -> None:
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port(server), ssl=client_context(pki), limit=65536
    )
    writer.write(b"go")
    await until(lambda: Recorder.made and Recorder.made[0].data == b"go")
    (proto,) = Recorder.made
    assert proto.transport is not None
    sock = proto.transport.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 32768)  # fills sooner
    chunks = [bytes([i % 251]) * (7_000 + i) for i in range(400)]  # about 4 MB, more than
    for chunk in chunks:  # the socket buffers take: the transport buffers the rest
        proto.transport.write(chunk)
    assert proto.events[-1] == "pause" and proto.transport.get_write_buffer_size() > 0
    proto.on_resume = b"TAIL"  # written while the transport still drains its buffer
    expected = b"".join(chunks) + b"TAIL"
    got = bytearray()
    while len(got) < len(expected):
        await asyncio.sleep(0.001)  # a slow reader
        got += await asyncio.wait_for(reader.read(65536), TIMEOUT)
    assert bytes(got) == expected
    assert proto.events.count("resume") == 1
    assert proto.transport.get_write_buffer_size() == 0
    writer.close()  # close_notify, then FIN
    assert await asyncio.wait_for(proto.lost, TIMEOUT) is None
    assert proto.events[-2:] == ["eof", "lost"]


async def test_reading_paused_holds_data_until_resumed(server: tls.TLSServer, pki: Path) -> None:
    _, writer = await asyncio.open_connection("127.0.0.1", port(server), ssl=client_context(pki))
    writer.write(b"a")
    await until(lambda: Recorder.made and Recorder.made[0].data == b"a")
    (proto,) = Recorder.made
    assert proto.transport is not None
    proto.transport.pause_reading()
    assert not proto.transport.is_reading()
    writer.write(b"b" * 100_000)
    await writer.drain()
    await asyncio.sleep(0.2)
    assert proto.data == b"a"
    proto.transport.resume_reading()
    await until(lambda: len(proto.data) == 100_001)
    writer.close()
    await asyncio.wait_for(proto.lost, TIMEOUT)


async def test_a_refused_handshake_makes_no_protocol(pki: Path) -> None:
    Recorder.made = []
    srv = await tls.create_server(
        Recorder, "127.0.0.1", 0, server_context(pki, ssl.CERT_REQUIRED), handshake_timeout=5
    )
    try:
        with pytest.raises((ssl.SSLError, ConnectionError)):
            reader, _ = await asyncio.open_connection(
                "127.0.0.1", port(srv), ssl=client_context(pki, certificate=False)
            )
            # TLS 1.3: the client learns of the refusal on its first read
            await asyncio.wait_for(reader.read(1), TIMEOUT)
        await until(lambda: not srv.handshaking)
        assert Recorder.made == []
    finally:
        srv.close()


async def test_a_handshake_that_never_finishes_is_cut_off(server: tls.TLSServer, pki: Path) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port(server))  # no TLS
    writer.write(b"\x16\x03\x01")  # the start of a record, and nothing more
    await until(lambda: len(server.handshaking) == 1)
    assert await ended(reader)  # after handshake_timeout (1 s)
    assert not server.handshaking and Recorder.made == []
    writer.close()


async def test_close_of_the_server_cuts_handshakes_in_progress(
    server: tls.TLSServer, pki: Path
) -> None:
    bound = port(server)
    reader, writer = await asyncio.open_connection("127.0.0.1", bound)
    writer.write(b"\x16\x03\x01")
    await until(lambda: len(server.handshaking) == 1)
    server.close()
    assert await ended(reader)
    assert not server.handshaking
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", bound)
    writer.close()


class Echo(Recorder):
    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        assert self.transport is not None
        self.transport.write(data)


def resumes(port: int, pki: Path) -> tuple[bool, bool]:
    """A blocking client connects twice, the second time with the first's session: whether a
    ticket came, and whether the second handshake resumed."""
    context = client_context(pki)
    with context.wrap_socket(
        socket.create_connection(("127.0.0.1", port)), server_hostname="127.0.0.1"
    ) as first:
        first.sendall(b"x")
        assert first.recv(1) == b"x"  # the tickets come before it
        session = first.session
    assert session is not None
    with context.wrap_socket(
        socket.create_connection(("127.0.0.1", port)), server_hostname="127.0.0.1", session=session
    ) as second:
        second.sendall(b"y")
        assert second.recv(1) == b"y"
        return session.has_ticket, second.session_reused


@pytest.mark.parametrize("tickets", [1, 0])
async def test_session_tickets_resume_with_the_client_certificate(pki: Path, tickets: int) -> None:
    """With the default (one TLS 1.3 ticket) a client resumes, and the resumed connection still
    carries its certificate, its identity; with 0 it makes a full handshake again."""
    from conduit.tls import SESSION_TICKETS
    from conduit.tls import server_context as conduit_context

    assert SESSION_TICKETS == 1
    context = conduit_context(
        pki / "server.pem", pki / "server.key", pki / "ca.pem", "optional",
        session_tickets=tickets,
    )  # fmt: skip
    assert context is not None
    Recorder.made = []
    srv = await tls.create_server(Echo, "127.0.0.1", 0, context)
    try:
        ticket, reused = await asyncio.to_thread(resumes, port(srv), pki)
        assert (ticket, reused) == ((True, True) if tickets else (False, False))
        await until(lambda: len(Recorder.made) == 2)
        first, second = (made.certificate for made in Recorder.made)
        assert first is not None and second == first
    finally:
        srv.close()


async def test_no_tickets_when_a_crl_is_checked(pki: Path) -> None:
    """A resumed handshake skips the certificate checks, the CRL's too: with a CRL there is no
    resumption."""
    from conduit.tls import server_context as conduit_context

    ca = certs.load_ca(pki)
    (pki / "crl.pem").write_bytes(certs.make_crl(ca, {}))
    context = conduit_context(
        pki / "server.pem", pki / "server.key", pki / "ca.pem", "optional", pki / "crl.pem"
    )
    assert context is not None and context.num_tickets == 0
    Recorder.made = []
    srv = await tls.create_server(Echo, "127.0.0.1", 0, context)
    try:
        assert await asyncio.to_thread(resumes, port(srv), pki) == (False, False)
    finally:
        srv.close()


class Failing(Recorder):
    def data_received(self, data: bytes) -> None:
        raise RuntimeError("a bug")


async def test_a_protocol_that_fails_on_data_ends_its_connection_alone(
    pki: Path, caplog: pytest.LogCaptureFixture
) -> None:
    Recorder.made = []
    srv = await tls.create_server(Failing, "127.0.0.1", 0, server_context(pki))
    try:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port(srv), ssl=client_context(pki)
        )
        writer.write(b"boom")
        assert await ended(reader)
        (proto,) = Recorder.made
        assert isinstance(await asyncio.wait_for(proto.lost, TIMEOUT), RuntimeError)
        assert "the protocol failed on data" in caplog.text
        writer.close()
    finally:
        srv.close()
