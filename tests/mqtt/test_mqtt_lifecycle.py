"""The adapter's life: ports (a taken port raises ListenError), graceful stop (MQTT 5
DISCONNECT 0x8B), slow subscribers cut off with a reason, MQTT over WebSocket refusals."""

from __future__ import annotations

import asyncio
import errno
import socket
import ssl
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from adapters.mqtt import MQTTAdapter
from adapters.mqtt.codec import Connect, Decoder, Disconnect, Properties, Publish, encode
from core.limits import Limits
from core.listeners import Endpoint, ListenError
from tests.conftest import World
from tests.mqtt.conftest import RawClient, connected, paho_client, refusals, until


@pytest.mark.parametrize("which", ["mqtt", "mqtt-ws"])
async def test_taken_port_raises_listen_error(world: World, which: str) -> None:
    """The endpoint that cannot be bound is named; none of the others stays bound."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        taken = s.getsockname()[1]
        free = socket.socket()
        free.bind(("127.0.0.1", 0))
        other = free.getsockname()[1]
        free.close()
        ports = {"mqtt": other, "mqtt-ws": other, which: taken}
        adapter = MQTTAdapter(
            world.gateway,
            endpoints=[
                Endpoint("mqtt", "127.0.0.1", ports["mqtt"]),
                Endpoint("mqtt-ws", "127.0.0.1", ports["mqtt-ws"], websocket=True),
            ],
        )
        with pytest.raises(ListenError) as info:
            await adapter.start()
        assert info.value.endpoint.name == which
        assert info.value.errno == errno.EADDRINUSE
        with pytest.raises(OSError):  # the endpoint bound before the failure is closed
            await RawClient.open(other, 4)
        await adapter.stop()


async def test_bound_ports_reported(world: World, mqtt_adapter: MQTTAdapter) -> None:
    assert mqtt_adapter.port > 0 and mqtt_adapter.ws_port and mqtt_adapter.ws_port > 0
    assert mqtt_adapter.ports == {"mqtt": mqtt_adapter.port, "mqtt-ws": mqtt_adapter.ws_port}


async def test_stop_disconnects_with_0x8b(world: World) -> None:
    adapter = MQTTAdapter(world.gateway, "127.0.0.1", 0, ws_port=None)
    await adapter.start()
    v5 = await RawClient.open(adapter.port, 5)
    await v5.connect(world.both, "a", will=None)
    v4 = await RawClient.open(adapter.port, 4)
    await v4.connect(world.both, "b")
    await v5.subscribe("m/acme/c/temps/#")
    await adapter.stop(timeout=2)
    assert await v5.until_closed() == [
        Disconnect(0x8B, Properties(reason_string="server shutting down"))
    ]
    assert await v4.until_closed() == []
    assert not world.gateway._subs  # every bus subscription ended
    with pytest.raises(OSError):
        await RawClient.open(adapter.port, 4)


class TestSlowSubscriber:
    @pytest.fixture
    def limits(self) -> Limits:
        return Limits(max_dropped=20)

    @pytest.fixture
    def mqtt_options(self) -> dict[str, Any]:
        return {"max_write_buffer": 16 * 1024}

    async def test_slow_subscriber_is_disconnected_0x97(
        self, world: World, port: int, raw: Any
    ) -> None:
        # a subscriber that never reads, with a tiny receive buffer
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", port))
        sock.setblocking(False)
        reader, writer = await asyncio.open_connection(sock=sock)
        slow = RawClient(reader, writer, 5)
        await slow.connect(world.subscriber, "slow")
        await slow.subscribe("m/acme/c/temps/#")
        pub = await connected(raw, world.publisher, "pub", 5)
        payload = b"x" * 1000
        for _ in range(2000):
            await pub.publish("m/acme/c/temps/a", payload)
            if refusals(world, "slow_subscriber"):
                break
        await until(lambda: refusals(world, "slow_subscriber") == 1)
        # the slow one gets (after what was queued) DISCONNECT 0x97 and is closed
        decoder = Decoder(protocol_level=5)
        last = None
        async with asyncio.timeout(10):
            while data := await reader.read(65536):
                decoder.feed(data)
                for packet in decoder:
                    last = packet
        assert isinstance(last, Disconnect) and last.reason_code == 0x97
        assert "subscriber too slow" in (last.properties.reason_string or "")
        # the publisher was never slowed down or cut off
        await pub.publish("m/acme/c/temps/a", b"ok", 1, packet_id=1)


async def test_ws_wrong_path_is_404(world: World, mqtt_adapter: MQTTAdapter) -> None:
    with pytest.raises(InvalidStatus) as info:
        async with ws_connect(
            f"ws://127.0.0.1:{mqtt_adapter.ws_port}/other", subprotocols=["mqtt"]
        ):  # type: ignore[list-item]
            pass
    assert info.value.response.status_code == 404
    assert refusals(world, "bad_upgrade") == 1


async def test_ws_mqtt_in_split_frames(world: World, mqtt_adapter: MQTTAdapter) -> None:
    async with ws_connect(
        f"ws://127.0.0.1:{mqtt_adapter.ws_port}/mqtt",
        subprotocols=["mqtt"],  # type: ignore[list-item]
    ) as ws:
        assert ws.subprotocol == "mqtt"
        data = encode(Connect(5, True, 0, "w", world.both.id, world.both.secret.encode()), 5)
        data += b"\xc0\x00"  # PINGREQ
        for i in range(0, len(data), 7):  # one MQTT stream, any split
            await ws.send(data[i : i + 7])
        decoder = Decoder(protocol_level=5)
        packets: list[Any] = []
        while len(packets) < 2:
            decoder.feed(await asyncio.wait_for(ws.recv(), 5))  # type: ignore[arg-type]
            packets.extend(decoder)
        assert [type(p).__name__ for p in packets] == ["ConnAck", "PingResp"]
        await ws.send(b"\xe0\x00")  # DISCONNECT
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 5)


async def test_ws_text_frame_is_1003(world: World, mqtt_adapter: MQTTAdapter) -> None:
    async with ws_connect(
        f"ws://127.0.0.1:{mqtt_adapter.ws_port}/mqtt",
        subprotocols=["mqtt"],  # type: ignore[list-item]
    ) as ws:
        await ws.send("hello")
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 5)
        assert ws.close_code == 1003


async def test_tls(world: World, certificate: tuple[Path, Path]) -> None:
    """With a TLS context both listeners speak TLS (mqtts, wss): a real client over TLS."""
    key, cert = certificate
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    adapter = MQTTAdapter(world.gateway, "127.0.0.1", 0, ws_port=0, ssl_context=server_ctx)
    await adapter.start()
    try:
        client_ctx = ssl.create_default_context(cafile=str(cert))
        reader, writer = await asyncio.open_connection("127.0.0.1", adapter.port, ssl=client_ctx)
        client = RawClient(reader, writer, 5)
        ack = await client.connect(world.both, "tls")
        assert ack.reason_code == 0
        await client.subscribe("m/acme/c/temps/#")
        await client.publish("m/acme/c/temps/a", b"secret stuff")
        got = await client.recv()
        assert isinstance(got, Publish) and got.payload == b"secret stuff"
        await client.disconnect()
        with paho_client(
            adapter.ws_port, world.both, "tls-ws", transport="websockets", tls=str(cert)
        ) as ws_client:
            await until(lambda: ws_client.connack)
            assert ws_client.connack[1] == 0
    finally:
        await adapter.stop(timeout=1)
