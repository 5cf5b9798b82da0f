"""One gateway, several adapters, real clients: what one protocol publishes, the others receive.

HTTP <-> MQTT, HTTP <-> WS and HTTP -> CoAP have their own tests beside each adapter; this file
covers the pairs that need two of the later adapters at once: WebSocket <-> MQTT, and what
HTTP and WebSocket publishers cannot carry to MQTT subscribers.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import aiohttp
import aiomqtt
import pytest
from websockets.asyncio.client import connect

from adapters.mqtt import MQTTAdapter
from adapters.ws import WSAdapter
from tests.conftest import World


@pytest.fixture
async def adapters(world: World) -> AsyncIterator[tuple[int, str]]:
    mqtt = MQTTAdapter(world.gateway, "127.0.0.1", 0, ws_port=None)
    ws = WSAdapter(world.gateway, "127.0.0.1", 0, dashboard=False)
    await mqtt.start()
    await ws.start()
    try:
        yield mqtt.port, f"ws://127.0.0.1:{ws.port}"
    finally:
        await ws.stop(2)
        await mqtt.stop(2)


async def test_websocket_publish_reaches_mqtt_subscriber(
    world: World, adapters: tuple[int, str]
) -> None:
    port, ws = adapters
    async with aiomqtt.Client(
        "127.0.0.1", port, username=world.subscriber.id, password=world.subscriber.secret,
        identifier="mqtt-sub",
    ) as mqtt:
        await mqtt.subscribe("m/acme/c/temps/#", qos=1)
        url = f"{ws}/m/acme/c/temps/hall?authorization=Client%20{world.publisher.secret}"
        async with connect(url) as conn:
            await conn.send('{"door": "open"}')
            message = await asyncio.wait_for(anext(aiter(mqtt.messages)), 5)
    assert str(message.topic) == "m/acme/c/temps/hall"
    assert message.payload == b'{"door": "open"}'


async def test_mqtt_publish_reaches_websocket_subscriber(
    world: World, adapters: tuple[int, str]
) -> None:
    port, ws = adapters
    url = (f"{ws}/m/acme/c/temps/%23?format=envelope"
           f"&authorization=Client%20{world.subscriber.secret}")
    async with connect(url) as conn:
        async with aiomqtt.Client(
            "127.0.0.1", port, username=world.publisher.id, password=world.publisher.secret,
            identifier="mqtt-pub",
        ) as mqtt:
            await mqtt.publish("m/acme/c/temps/kitchen", b"21.5", qos=1)
        event = json.loads(await asyncio.wait_for(conn.recv(), 5))
    assert (event["subtopic"], event["protocol"], event["payload"]) == ("kitchen", "mqtt", "21.5")
    assert event["publisher"] == world.publisher.id


async def test_no_other_protocol_can_set_mqtt_metadata(
    world: World, adapters: tuple[int, str], http: str
) -> None:
    """MQTT's reserved metadata (``mqtt:qos``, ``mqtt:client``, ...) comes only from a PUBLISH
    itself: an HTTP header or an envelope-shaped WebSocket frame carries none of it, so a QoS 2
    subscriber gets QoS 2 and sees no properties it did not come with."""
    port, ws = adapters
    forged = {"mqtt:qos": "0", "mqtt:client": "1", "mqtt:response_topic": "m/acme/c/temps/#"}
    async with aiomqtt.Client(
        "127.0.0.1", port, username=world.subscriber.id, password=world.subscriber.secret,
        identifier="mqtt-sub", protocol=aiomqtt.ProtocolVersion.V5,
    ) as mqtt:
        await mqtt.subscribe("m/acme/c/temps/#", qos=2)
        headers = {"Authorization": f"Client {world.publisher.secret}",
                   "Mqtt-Qos": "0", "Mqtt-Client": "1", "User-Property": "mqtt:qos=0"}
        async with aiohttp.ClientSession() as s:
            async with s.post(f"{http}/m/acme/c/temps/a", data=b"from http",
                              headers=headers) as r:
                assert r.status == 202
        url = f"{ws}/m/acme/c/temps/b?authorization=Client%20{world.publisher.secret}"
        frame = json.dumps({"metadata": forged, "payload": "from ws"})
        async with connect(url) as conn:
            await conn.send(frame)
        received = [await asyncio.wait_for(anext(aiter(mqtt.messages)), 5) for _ in range(2)]
    by_topic = {str(m.topic): m for m in received}
    assert by_topic["m/acme/c/temps/a"].payload == b"from http"
    assert by_topic["m/acme/c/temps/b"].payload == frame.encode()  # the frame, as sent
    for message in received:
        assert message.qos == 2
        props = message.properties
        assert getattr(props, "UserProperty", None) is None
        assert getattr(props, "ResponseTopic", None) is None
