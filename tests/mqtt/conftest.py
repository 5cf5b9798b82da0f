"""Fixtures of the MQTT tests: the adapter on ephemeral ports, a watcher that shows what was
published, and a raw client (the codec over a real socket) that sends exactly the bytes a test
wants and shows exactly the packets the server answers."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import paho.mqtt.client as paho
import pytest

from adapters.mqtt import MQTTAdapter
from adapters.mqtt.codec import (
    EMPTY_PROPERTIES,
    ConnAck,
    Connect,
    Decoder,
    Disconnect,
    Packet,
    Properties,
    PubAck,
    Publish,
    PubRec,
    SubAck,
    Subscribe,
    Subscription,
    Will,
    encode,
)
from tests.conftest import Party, World, running
from tests.conftest import drain as drain  # re-exported for this package's tests

HOST = "127.0.0.1"


@pytest.fixture
def mqtt_options() -> dict[str, Any]:
    """Override in a test module to start the adapter with other options."""
    return {}


@pytest.fixture
async def mqtt_adapter(world: World, mqtt_options: dict[str, Any]) -> AsyncIterator[MQTTAdapter]:
    """The MQTT adapter on ephemeral TCP and WebSocket ports."""
    options: dict[str, Any] = {"connect_timeout": 2.0, **mqtt_options}
    async with running(MQTTAdapter(world.gateway, HOST, 0, ws_port=0, **options)) as adapter:
        yield adapter


@pytest.fixture
def port(mqtt_adapter: MQTTAdapter) -> int:
    return mqtt_adapter.port


def refusals(world: World, reason: str) -> float:
    value = world.gateway.metrics.registry.get_sample_value(
        "conduit_refusals_total", {"protocol": "mqtt", "reason": reason}
    )
    return value or 0.0


class Closed(Exception):
    """The server closed the connection."""


class RawClient:
    """An MQTT client that is only the codec over a socket: nothing hidden, nothing fixed up."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, level: int
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.level = level
        self.decoder = Decoder(protocol_level=level)

    @classmethod
    async def open(cls, port: int, level: int = 4) -> RawClient:
        reader, writer = await asyncio.open_connection(HOST, port)
        return cls(reader, writer, level)

    async def send(self, packet: Packet | bytes) -> None:
        data = packet if isinstance(packet, bytes) else encode(packet, self.level)
        self.writer.write(data)
        await self.writer.drain()

    async def recv(self, timeout: float = 5.0) -> Packet:
        """The next packet; raises :class:`Closed` if the server closes first."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            packet = self.decoder.next_packet()
            if packet is not None:
                return packet
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                raise TimeoutError("no packet from the server")
            data = await asyncio.wait_for(self.reader.read(65536), left)
            if not data:
                raise Closed
            self.decoder.feed(data)

    async def until_closed(self, timeout: float = 5.0) -> list[Packet]:
        """Every packet received until the server closes the connection."""
        packets = []
        with contextlib.suppress(ConnectionError):
            while True:
                try:
                    packets.append(await self.recv(timeout))
                except Closed:
                    return packets
        return packets

    async def connect(
        self,
        party: Party | None,
        client_id: str = "",
        *,
        clean: bool = True,
        keep_alive: int = 0,
        will: Will | None = None,
        properties: Properties = EMPTY_PROPERTIES,
        password: bytes | None = None,
    ) -> ConnAck:
        username = party.id if party else None
        if password is None and party is not None:
            password = party.secret.encode()
        await self.send(
            Connect(
                self.level,
                clean,
                keep_alive,
                client_id,
                username,
                password,
                will,
                properties,
            )
        )
        ack = await self.recv()
        assert isinstance(ack, ConnAck), ack
        return ack

    async def subscribe(
        self, *filters: str, qos: int = 0, packet_id: int = 1, **options: Any
    ) -> SubAck:
        props = options.pop("properties", EMPTY_PROPERTIES)
        await self.send(
            Subscribe(packet_id, [Subscription(f, qos, **options) for f in filters], props)
        )
        return await self.expect(SubAck)

    async def publish(
        self,
        topic: str,
        payload: bytes,
        qos: int = 0,
        packet_id: int = 0,
        retain: bool = False,
        properties: Properties = EMPTY_PROPERTIES,
    ) -> Packet | None:
        """Publish; for QoS 1/2 the server's answer (PUBACK or PUBREC, or whatever came)."""
        await self.send(Publish(topic, payload, qos, retain, False, packet_id, properties))
        if qos == 0:
            return None
        return await self.recv()

    async def expect(self, cls: type[Any], timeout: float = 5.0) -> Any:
        """The next packet of this type, skipping PUBLISHes that arrive before it."""
        while True:
            packet = await self.recv(timeout)
            if isinstance(packet, cls):
                return packet
            if not isinstance(packet, Publish):
                raise AssertionError(f"expected {cls.__name__}, got {packet!r}")

    async def disconnect(self, reason_code: int = 0) -> None:
        with contextlib.suppress(ConnectionError):
            await self.send(Disconnect(reason_code))
        await self.close()

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()


@pytest.fixture
async def raw(port: int) -> AsyncIterator[Callable[..., Any]]:
    """Open raw clients: ``await raw(level)``; all are closed at the end of the test."""
    clients: list[RawClient] = []

    async def open_client(level: int = 4) -> RawClient:
        client = await RawClient.open(port, level)
        clients.append(client)
        return client

    yield open_client
    for client in clients:
        await client.close()


async def connected(
    raw: Callable[..., Any], party: Party, client_id: str = "", level: int = 4, **kw: Any
) -> RawClient:
    client: RawClient = await raw(level)
    ack = await client.connect(party, client_id, **kw)
    assert ack.reason_code == 0, ack
    return client


def puback(packet: Packet | None) -> int:
    assert isinstance(packet, PubAck | PubRec), packet
    return packet.reason_code


# --- paho-mqtt in its own thread -----------------------------------------------------------


class Paho:
    """A paho-mqtt client run in its network thread, with its events collected."""

    def __init__(
        self,
        port: int,
        party: Party | None,
        client_id: str = "",
        protocol: int = paho.MQTTv311,
        transport: str = "tcp",
        clean: bool = True,
        properties: Any = None,
        tls: str | None = None,
    ) -> None:
        self.messages: list[paho.MQTTMessage] = []
        self.connack: Any = None
        self.disconnected: Any = None
        self.subacks: dict[int, Any] = {}
        self.acked: set[int] = set()
        self._event = threading.Event()
        kwargs: dict[str, Any] = {"client_id": client_id, "protocol": protocol}
        if protocol != paho.MQTTv5:
            kwargs["clean_session"] = clean
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2, transport=transport, **kwargs)  # type: ignore[arg-type]
        if transport == "websockets":
            self.client.ws_set_options(path="/mqtt")
        if tls is not None:
            self.client.tls_set(ca_certs=tls)
        if party is not None:
            self.client.username_pw_set(party.id, party.secret)
        self.client.on_connect = self._on_connect
        self.client.on_message = lambda c, u, m: self.messages.append(m)
        self.client.on_subscribe = self._on_subscribe
        self.client.on_disconnect = self._on_disconnect
        self.client.on_publish = lambda c, u, mid, rc, props: self.acked.add(mid)
        self.port = port
        self.protocol = protocol
        self.clean = clean
        self.properties = properties

    def _on_connect(self, c: Any, u: Any, flags: Any, rc: Any, props: Any = None) -> None:
        self.connack = (flags, rc, props)

    def _on_subscribe(self, c: Any, u: Any, mid: int, rcs: Any, props: Any = None) -> None:
        self.subacks[mid] = rcs

    def _on_disconnect(self, c: Any, u: Any, flags: Any, rc: Any, props: Any = None) -> None:
        self.disconnected = rc

    def start(self) -> Paho:
        kwargs: dict[str, Any] = {}
        if self.protocol == paho.MQTTv5:
            kwargs["clean_start"] = self.clean
            if self.properties is not None:
                kwargs["properties"] = self.properties
        # connect_async: the WebSocket handshake needs this event loop, which must not block
        self.client.connect_async(HOST, self.port, keepalive=30, **kwargs)
        self.client.loop_start()
        return self

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.client.disconnect()
        self.client.loop_stop()


@contextlib.contextmanager
def paho_client(*args: Any, **kwargs: Any) -> Iterator[Paho]:
    client = Paho(*args, **kwargs).start()
    try:
        yield client
    finally:
        client.stop()


async def until(check: Callable[[], Any], timeout: float = 5.0) -> Any:
    """Wait (without blocking the loop) until ``check()`` returns something truthy."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


@pytest.fixture
def mqtt_log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, logger="conduit")
    return caplog
