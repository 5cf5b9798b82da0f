"""How the server ends a connection: the reason it sends (DISCONNECT, a refusing CONNACK, a
WebSocket close frame) reaches the client even when the client is still sending. The server
stops processing input but keeps reading and discarding it until the client closes (or a short
linger passes): closing a socket with unread input makes the kernel send RST, and a client that
gets RST loses what it had not read yet.

A burst of 200 small packets fits one read of the server (256 KiB) and leaves nothing unread:
the bursts here carry 2 KiB payloads (about 410 KiB), which showed the RST on the code before
the linger."""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from websockets.client import ClientProtocol
from websockets.frames import Close, Frame, Opcode
from websockets.http11 import Response
from websockets.protocol import State
from websockets.typing import Subprotocol
from websockets.uri import parse_uri

from adapters.mqtt import MQTTAdapter, connection
from adapters.mqtt.channel import State as ChannelState
from adapters.mqtt.codec import (
    ConnAck,
    Connect,
    Decoder,
    Disconnect,
    Packet,
    PingReq,
    PingResp,
    Publish,
    encode,
)
from core.bus import Subscription
from tests.conftest import World, running
from tests.mqtt.conftest import HOST, RawClient, connected, drain, refusals, until

MAX_INFLIGHT = 10
BURST = 200
PAYLOAD = b"x" * 2048
TOPIC = "m/acme/c/temps/a"


@pytest.fixture
def mqtt_options() -> dict[str, Any]:
    return {"max_inflight": MAX_INFLIGHT}


def error_records(caplog: pytest.LogCaptureFixture) -> list[str]:
    """What was logged at ERROR and above (asyncio logs an exception raised in a protocol
    callback at ERROR: "protocol.data_received() call failed")."""
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


def qos2_burst(count: int = BURST, payload: bytes = PAYLOAD, level: int = 5) -> list[bytes]:
    return [encode(Publish(TOPIC, payload, 2, packet_id=i + 1), level) for i in range(count)]


def connect_bytes(
    world: World, client_id: str, level: int = 5, password: bytes | None = None
) -> bytes:
    party = world.publisher
    secret = party.secret.encode() if password is None else password
    return encode(Connect(level, True, 0, client_id, party.id, secret), level)


async def read_to_end(
    reader: asyncio.StreamReader, level: int = 5, timeout: float = 10.0
) -> list[Packet]:
    """Every packet until EOF; raises ConnectionResetError if the server resets instead."""
    decoder = Decoder(protocol_level=level)
    packets: list[Packet] = []
    async with asyncio.timeout(timeout):
        while data := await reader.read(65536):
            decoder.feed(data)
            packets.extend(decoder)
    return packets


async def undisturbed(bystander: RawClient, publishes: int) -> None:
    """The bystander got ``publishes`` deliveries and still answers."""
    await bystander.send(PingReq())
    received = 0
    while not isinstance(packet := await bystander.recv(), PingResp):
        received += isinstance(packet, Publish)
    assert received == publishes


# --- TCP and TLS ------------------------------------------------------------------------------


async def burst_until_disconnect(
    world: World, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> list[Packet]:
    writer.write(connect_bytes(world, "burst"))
    ack = await RawClient(reader, writer, 5).recv()  # nothing else comes before the burst
    assert isinstance(ack, ConnAck) and ack.reason_code == 0
    writer.write(b"".join(qos2_burst()))  # one write; nothing is read until it is all sent
    return await read_to_end(reader)  # a reset raises ConnectionResetError here


def assert_receive_maximum_exceeded(packets: list[Packet]) -> None:
    assert [type(p).__name__ for p in packets] == ["PubRec"] * MAX_INFLIGHT + ["Disconnect"]
    last = packets[-1]
    assert isinstance(last, Disconnect) and last.reason_code == 0x93


async def test_receive_maximum_exceeded_reaches_a_client_that_keeps_sending(
    world: World, raw: Any, port: int, watch: Subscription, caplog: pytest.LogCaptureFixture
) -> None:
    """200 QoS 2 PUBLISHes, no PUBREL, in one burst: the client reads DISCONNECT 0x93 and then
    a clean EOF, never ECONNRESET; nothing of the burst past the limit is published."""
    caplog.set_level(logging.DEBUG)
    bystander = await connected(raw, world.both, "bystander", 5)
    await bystander.subscribe("m/acme/c/temps/#", qos=2)
    reader, writer = await asyncio.open_connection(HOST, port)
    packets = await burst_until_disconnect(world, reader, writer)
    assert_receive_maximum_exceeded(packets)
    writer.close()
    assert refusals(world, "receive_maximum_exceeded") == 1
    assert len(drain(watch)) == MAX_INFLIGHT
    await undisturbed(bystander, MAX_INFLIGHT)
    assert error_records(caplog) == []


@pytest.fixture
async def tls_adapter(
    world: World, certificate: tuple[Path, Path]
) -> AsyncIterator[tuple[MQTTAdapter, ssl.SSLContext]]:
    key, cert = certificate
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    adapter = MQTTAdapter(
        world.gateway, HOST, 0, ws_port=0, ssl_context=server_ctx, max_inflight=MAX_INFLIGHT
    )
    async with running(adapter):
        yield adapter, ssl.create_default_context(cafile=str(cert))


async def test_receive_maximum_exceeded_reaches_a_tls_client_that_keeps_sending(
    world: World,
    tls_adapter: tuple[MQTTAdapter, ssl.SSLContext],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The same over TLS, which cannot half-close: DISCONNECT 0x93, then the TLS close after
    the linger. (asyncio's TLS shutdown itself reads until the client's close_notify, so this
    held before the linger too; it guards the TLS branch of the close.)"""
    caplog.set_level(logging.DEBUG)
    adapter, client_ctx = tls_adapter
    reader, writer = await asyncio.open_connection(HOST, adapter.port, ssl=client_ctx)
    packets = await burst_until_disconnect(world, reader, writer)
    assert_receive_maximum_exceeded(packets)
    writer.close()
    assert refusals(world, "receive_maximum_exceeded") == 1
    assert error_records(caplog) == []


@pytest.mark.parametrize("level", [4, 5])
async def test_refusing_connack_reaches_a_client_that_keeps_sending(
    world: World, raw: Any, port: int, watch: Subscription, level: int
) -> None:
    """CONNECT with a wrong password and, pipelined behind it, a burst of PUBLISHes: the client
    reads the refusing CONNACK and a clean EOF; nothing is published."""
    bystander = await connected(raw, world.both, "bystander", 5)
    await bystander.subscribe("m/acme/c/temps/#", qos=1)
    reader, writer = await asyncio.open_connection(HOST, port)
    writer.write(connect_bytes(world, "refused", level, b"wrong"))
    writer.write(b"".join(qos2_burst(level=level)))
    packets = await read_to_end(reader, level)
    (ack,) = packets
    assert isinstance(ack, ConnAck) and ack.reason_code == (4 if level == 4 else 0x86)
    writer.close()
    assert drain(watch) == []
    await undisturbed(bystander, 0)


# --- MQTT over WebSocket -------------------------------------------------------------------


class WSClient:
    """A WebSocket client that is websockets' sans-I/O protocol over a socket: the frames a
    test builds go out in exactly one write, and what the server sends is seen as it comes."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, ws: ClientProtocol
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.ws = ws
        self.decoder = Decoder(protocol_level=5)
        self.packets: list[Packet] = []
        self.close_frame: Close | None = None

    @classmethod
    async def open(cls, port: int, path: str = "/mqtt") -> WSClient:
        reader, writer = await asyncio.open_connection(HOST, port)
        ws = ClientProtocol(
            parse_uri(f"ws://{HOST}:{port}{path}"), subprotocols=[Subprotocol("mqtt")]
        )
        client = cls(reader, writer, ws)
        ws.send_request(ws.connect())
        client.flush()
        response = None
        while response is None:
            for event in await client.read():
                if isinstance(event, Response):
                    response = event
        assert response.status_code == 101 and ws.state is State.OPEN
        return client

    def flush(self) -> None:
        for chunk in self.ws.data_to_send():
            if chunk:
                self.writer.write(chunk)
            elif self.writer.can_write_eof():
                self.writer.write_eof()

    def frames(self, *frames: tuple[Opcode, bytes]) -> bytes:
        """The masked frames as bytes (not sent)."""
        for opcode, data in frames:
            if opcode is Opcode.TEXT:
                self.ws.send_text(data)
            else:
                self.ws.send_binary(data)
        return b"".join(self.ws.data_to_send())

    async def read(self, timeout: float = 10.0) -> list[Any]:
        """One read from the socket, fed to the protocol: its events (ConnectionResetError if
        the server resets, EOFError at the end of the stream)."""
        data = await asyncio.wait_for(self.reader.read(65536), timeout)
        if data:
            self.ws.receive_data(data)
        else:
            self.ws.receive_eof()
        events = self.ws.events_received()
        for event in events:
            if isinstance(event, Frame):
                if event.opcode is Opcode.BINARY or event.opcode is Opcode.CONT:
                    self.decoder.feed(event.data)
                    self.packets.extend(self.decoder)
                elif event.opcode is Opcode.CLOSE:
                    self.close_frame = Close.parse(event.data)
        self.flush()  # the answer to a close frame, then EOF
        if not data:
            raise EOFError
        return events

    async def until(self, packets: int) -> None:
        while len(self.packets) < packets:
            await self.read()

    async def until_closed(self) -> None:
        """Read until the server ends the stream; a reset raises ConnectionResetError."""
        try:
            while True:
                await self.read()
        except EOFError:
            return

    def close(self) -> None:
        self.writer.close()


async def test_ws_receive_maximum_exceeded_reaches_a_client_that_keeps_sending(
    world: World,
    raw: Any,
    mqtt_adapter: MQTTAdapter,
    watch: Subscription,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Over WebSocket, the burst in binary frames (one write): DISCONNECT 0x93, then the close
    frame (1002: the client broke MQTT), then a clean end of the stream."""
    caplog.set_level(logging.DEBUG)
    bystander = await connected(raw, world.both, "bystander", 5)
    await bystander.subscribe("m/acme/c/temps/#", qos=2)
    client = await WSClient.open(mqtt_adapter.ws_port or 0)
    client.writer.write(client.frames((Opcode.BINARY, connect_bytes(world, "ws-burst"))))
    await client.until(1)
    assert isinstance(client.packets[0], ConnAck) and client.packets[0].reason_code == 0
    client.writer.write(client.frames(*((Opcode.BINARY, p) for p in qos2_burst())))
    await client.until_closed()
    assert_receive_maximum_exceeded(client.packets[1:])
    assert client.close_frame is not None and client.close_frame.code == 1002
    client.close()
    assert len(drain(watch)) == MAX_INFLIGHT
    await undisturbed(bystander, MAX_INFLIGHT)
    assert error_records(caplog) == []


@pytest.mark.parametrize("connected_first", [True, False], ids=["after-connect", "first-packet"])
async def test_ws_malformed_packet_then_text_frame_in_one_read(
    world: World,
    raw: Any,
    mqtt_adapter: MQTTAdapter,
    watch: Subscription,
    caplog: pytest.LogCaptureFixture,
    connected_first: bool,
) -> None:
    """A binary frame with a malformed MQTT packet and a text frame in one TCP write: the
    connection ends on the malformed packet (after CONNECT: DISCONNECT 0x81; as the first packet:
    no CONNACK, the version being unknown; close 1002 either way), the frames after it are
    ignored, and nothing is logged as an error (it once raised InvalidState inside
    data_received)."""
    caplog.set_level(logging.DEBUG)
    bystander = await connected(raw, world.both, "bystander", 5)
    await bystander.subscribe("m/acme/c/temps/#")
    client = await WSClient.open(mqtt_adapter.ws_port or 0)
    expected: list[Packet] = []
    if connected_first:
        client.writer.write(client.frames((Opcode.BINARY, connect_bytes(world, "ws-bad"))))
        await client.until(1)
        expected = [client.packets[0], Disconnect(0x81)]
    client.writer.write(
        client.frames(
            (Opcode.BINARY, b"\x00\x00"),  # reserved packet type 0
            (Opcode.TEXT, b"hello"),
            (Opcode.BINARY, encode(Publish(TOPIC, b"after the end"), 5)),
        )
    )
    await client.until_closed()
    got = [Disconnect(p.reason_code) if isinstance(p, Disconnect) else p for p in client.packets]
    assert got == expected
    assert client.close_frame is not None and client.close_frame.code == 1002
    client.close()
    assert error_records(caplog) == []
    # one refusal: the malformed packet (not CONNECT first, or reserved type); the text frame
    # was not even looked at
    assert refusals(world, "malformed_packet" if connected_first else "protocol_error") == 1
    assert refusals(world, "malformed_packet") + refusals(world, "protocol_error") == 1
    assert drain(watch) == []
    # others undisturbed: the bystander and a new WebSocket client
    other = await WSClient.open(mqtt_adapter.ws_port or 0)
    other.writer.write(
        other.frames(
            (Opcode.BINARY, connect_bytes(world, "ws-good")),
            (Opcode.BINARY, encode(Publish(TOPIC, b"fine"), 5)),
        )
    )
    await other.until(1)
    await until_published(watch, b"fine")
    other.close()
    await undisturbed(bystander, 1)


async def until_published(watch: Subscription, payload: bytes) -> None:
    async with asyncio.timeout(5):
        while True:
            if [m.payload for m in drain(watch)] == [payload]:
                return
            await asyncio.sleep(0.01)


async def test_ws_text_frame_first_is_1003(
    world: World, mqtt_adapter: MQTTAdapter, watch: Subscription, caplog: pytest.LogCaptureFixture
) -> None:
    """A text frame, then a binary frame with a valid PUBLISH, in one write: close 1003, the
    PUBLISH is never processed."""
    caplog.set_level(logging.DEBUG)
    client = await WSClient.open(mqtt_adapter.ws_port or 0)
    client.writer.write(client.frames((Opcode.BINARY, connect_bytes(world, "ws-text"))))
    await client.until(1)
    client.writer.write(
        client.frames((Opcode.TEXT, b"hello"), (Opcode.BINARY, encode(Publish(TOPIC, b"no"), 5)))
    )
    await client.until_closed()
    assert [type(p).__name__ for p in client.packets] == ["ConnAck"]
    assert client.close_frame is not None and client.close_frame.code == 1003
    client.close()
    assert drain(watch) == []
    assert refusals(world, "protocol_error") == 1
    assert error_records(caplog) == []


# --- the linger ends --------------------------------------------------------------------------


def conn_of(adapter: MQTTAdapter, party_id: str) -> Any:
    (conn,) = [c for c in adapter.conns if c.channel.client == party_id]
    return conn


async def test_linger_ends_for_a_client_that_never_closes(
    world: World, raw: Any, mqtt_adapter: MQTTAdapter, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The client reads the DISCONNECT and the end of the stream but keeps its socket open:
    the server closes after the linger (not before the client could read)."""
    monkeypatch.setattr(connection, "LINGER_TIMEOUT", 0.3)
    client = await connected(raw, world.publisher, "idle", 5)
    conn = conn_of(mqtt_adapter, world.publisher.id)
    await client.send(b"\x00\x00")  # reserved packet type: DISCONNECT 0x81
    (disconnect,) = await client.until_closed()  # end of stream: the write side is shut
    assert isinstance(disconnect, Disconnect) and disconnect.reason_code == 0x81
    assert conn in mqtt_adapter.conns  # lingering: the socket is still open
    await until(lambda: conn not in mqtt_adapter.conns, timeout=3)


async def test_client_that_never_reads_is_aborted_after_close_timeout(
    world: World, raw: Any, port: int, mqtt_adapter: MQTTAdapter, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A subscriber that reads nothing, disconnected with data still queued for it: the linger
    cannot end (its last bytes are not out), the close timeout aborts it."""
    monkeypatch.setattr(connection, "LINGER_TIMEOUT", 0.2)
    monkeypatch.setattr(connection, "CLOSE_TIMEOUT", 1.0)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((HOST, port))
    sock.setblocking(False)
    reader, writer = await asyncio.open_connection(sock=sock)
    stuck = RawClient(reader, writer, 5)
    await stuck.connect(world.subscriber, "stuck")
    await stuck.subscribe("m/acme/c/temps/#")
    conn = conn_of(mqtt_adapter, world.subscriber.id)
    pub = await connected(raw, world.publisher, "pub", 5)
    for _ in range(10_000):  # until the kernel's buffers are full and the server's fills
        await pub.publish(TOPIC, b"x" * 1000)
        if conn.transport.get_write_buffer_size():
            break
    assert conn.transport.get_write_buffer_size()
    await world.gateway.provisioning.set_client_enabled("acme", world.subscriber.id, False)
    await until(lambda: conn.channel.state is ChannelState.CLOSED)
    await asyncio.sleep(0.7)  # past the linger: still there, its bytes are not out
    assert conn in mqtt_adapter.conns
    await until(lambda: conn not in mqtt_adapter.conns, timeout=3)
    writer.close()
