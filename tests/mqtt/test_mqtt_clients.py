"""Real clients over real sockets: paho-mqtt (3.1.1 and 5.0, TCP and WebSocket), aiomqtt and
Debian's mosquitto_pub / mosquitto_sub; and across protocols: HTTP POST to an MQTT subscriber,
MQTT publish to an HTTP Server-Sent Events subscriber."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import aiomqtt
import paho.mqtt.client as paho
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties as PahoProperties

from adapters.mqtt import MQTTAdapter
from core.bus import Subscription
from tests.conftest import Party, World, require_command
from tests.mqtt.conftest import drain, paho_client, until

TOPIC = "m/acme/c/temps/room1"


def subscribed(adapter: MQTTAdapter, n: int = 1) -> bool:
    return sum(len(s.subs) for s in adapter.sessions.values()) >= n


@pytest.mark.parametrize("protocol", [paho.MQTTv311, paho.MQTTv5])
@pytest.mark.parametrize("transport", ["tcp", "websockets"])
async def test_paho_pubsub(
    world: World, mqtt_adapter: MQTTAdapter, protocol: int, transport: str
) -> None:
    port = mqtt_adapter.port if transport == "tcp" else mqtt_adapter.ws_port
    assert port is not None
    with (
        paho_client(port, world.subscriber, "sub", protocol, transport) as sub,
        paho_client(port, world.publisher, "pub", protocol, transport) as pub,
    ):
        await until(lambda: sub.connack and pub.connack)
        assert sub.connack[1] == 0 and pub.connack[1] == 0
        sub.client.subscribe(TOPIC, qos=2)
        await until(lambda: sub.subacks)
        for qos in (0, 1, 2):
            pub.client.publish(TOPIC, b"qos%d" % qos, qos=qos)
        await until(lambda: len(sub.messages) == 3)
        assert sorted((m.payload, m.qos) for m in sub.messages) == [
            (b"qos0", 0),
            (b"qos1", 1),
            (b"qos2", 2),
        ]
        await until(lambda: len(pub.acked) == 3)


async def test_paho_v5_properties(world: World, mqtt_adapter: MQTTAdapter) -> None:
    with (
        paho_client(mqtt_adapter.port, world.subscriber, "sub", paho.MQTTv5) as sub,
        paho_client(mqtt_adapter.port, world.publisher, "pub", paho.MQTTv5) as pub,
    ):
        await until(lambda: sub.connack and pub.connack)
        sub.client.subscribe(TOPIC, qos=1)
        await until(lambda: sub.subacks)
        props = PahoProperties(PacketTypes.PUBLISH)
        props.ContentType = "application/json"
        props.ResponseTopic = "m/acme/c/temps/reply"
        props.CorrelationData = b"42"
        props.UserProperty = [("site", "lab")]
        pub.client.publish(TOPIC, b"{}", qos=1, properties=props)
        (message,) = await until(lambda: sub.messages)
        got = message.properties
        assert got.ContentType == "application/json"
        assert got.ResponseTopic == "m/acme/c/temps/reply"
        assert got.CorrelationData == b"42"
        assert got.UserProperty == [("site", "lab")]


@pytest.mark.parametrize("protocol", [paho.MQTTv311, paho.MQTTv5])
async def test_paho_refused(world: World, mqtt_adapter: MQTTAdapter, protocol: int) -> None:
    with paho_client(
        mqtt_adapter.port, Party(world.publisher.id, "wrong"), "dev", protocol
    ) as client:
        _, rc, _ = await until(lambda: client.connack)
        assert rc == 134  # paho maps 3.1.1 return code 4 to "Bad user name or password"
        assert str(rc) == "Bad user name or password"


@pytest.mark.parametrize("protocol", [aiomqtt.ProtocolVersion.V311, aiomqtt.ProtocolVersion.V5])
async def test_aiomqtt(world: World, mqtt_adapter: MQTTAdapter, protocol: Any) -> None:
    async with (
        aiomqtt.Client(
            "127.0.0.1",
            mqtt_adapter.port,
            identifier="sub",
            username=world.subscriber.id,
            password=world.subscriber.secret,
            protocol=protocol,
        ) as sub,
        aiomqtt.Client(
            "127.0.0.1",
            mqtt_adapter.port,
            identifier="pub",
            username=world.publisher.id,
            password=world.publisher.secret,
            protocol=protocol,
        ) as pub,
    ):
        await sub.subscribe("m/acme/c/temps/#", qos=1)
        await pub.publish(TOPIC, b"hello", qos=1)
        async with asyncio.timeout(5):
            async for message in sub.messages:
                assert message.topic.matches("m/acme/c/temps/room1")
                assert message.payload == b"hello" and message.qos == 1
                break


async def test_aiomqtt_refused(world: World, mqtt_adapter: MQTTAdapter) -> None:
    client = aiomqtt.Client(
        "127.0.0.1",
        mqtt_adapter.port,
        identifier="x",
        username=world.publisher.id,
        password="wrong",
    )
    with pytest.raises(aiomqtt.MqttCodeError) as info:
        async with client:
            pass
    assert info.value.rc == 134  # 3.1.1 return code 4 as paho names it
    assert "Bad user name or password" in str(info.value)


async def run(*cmd: str, timeout: float = 10) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *cmd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@pytest.mark.parametrize("version", ["mqttv311", "mqttv5"])
async def test_mosquitto_clients(world: World, mqtt_adapter: MQTTAdapter, version: str) -> None:
    sub_cmd = require_command("mosquitto_sub", "mosquitto-clients")
    pub_cmd = require_command("mosquitto_pub", "mosquitto-clients")
    port = str(mqtt_adapter.port)
    sub = asyncio.create_task(
        run(
            sub_cmd,
            "-h",
            "127.0.0.1",
            "-p",
            port,
            "-V",
            version,
            "-i",
            "msub",
            "-u",
            world.subscriber.id,
            "-P",
            world.subscriber.secret,
            "-t",
            "m/acme/c/temps/#",
            "-q",
            "1",
            "-C",
            "2",
            "-v",
            "-W",
            "10",
        )
    )
    await until(lambda: subscribed(mqtt_adapter))
    for payload in ("21.5", "22.0"):
        rc, out, err = await run(
            pub_cmd,
            "-h",
            "127.0.0.1",
            "-p",
            port,
            "-V",
            version,
            "-i",
            "mpub",
            "-u",
            world.publisher.id,
            "-P",
            world.publisher.secret,
            "-t",
            TOPIC,
            "-q",
            "1",
            "-m",
            payload,
        )
        assert rc == 0, err
    rc, out, err = await sub
    assert rc == 0, err
    assert out.splitlines() == [f"{TOPIC} 21.5", f"{TOPIC} 22.0"]


async def test_mosquitto_v5_content_type(world: World, mqtt_adapter: MQTTAdapter) -> None:
    """The docs' example: a SenML pack with its content type, seen by a 5.0 subscriber."""
    sub_cmd = require_command("mosquitto_sub", "mosquitto-clients")
    pub_cmd = require_command("mosquitto_pub", "mosquitto-clients")
    port = str(mqtt_adapter.port)
    sub = asyncio.create_task(
        run(
            sub_cmd,
            "-h",
            "127.0.0.1",
            "-p",
            port,
            "-V",
            "mqttv5",
            "-u",
            world.subscriber.id,
            "-P",
            world.subscriber.secret,
            "-t",
            "m/acme/c/temps/#",
            "-q",
            "1",
            "-C",
            "1",
            "-F",
            "%t %C %p",
            "-W",
            "10",
        )
    )
    await until(lambda: subscribed(mqtt_adapter))
    senml = '[{"bn":"urn:dev:s1:","n":"temp","u":"Cel","v":21.5}]'
    rc, out, err = await run(
        pub_cmd,
        "-h",
        "127.0.0.1",
        "-p",
        port,
        "-V",
        "mqttv5",
        "-u",
        world.publisher.id,
        "-P",
        world.publisher.secret,
        "-t",
        TOPIC,
        "-q",
        "1",
        "-D",
        "publish",
        "content-type",
        "application/senml+json",
        "-m",
        senml,
    )
    assert rc == 0, err
    rc, out, err = await sub
    assert rc == 0, err
    assert out.strip() == f"{TOPIC} application/senml+json {senml}"


@pytest.mark.parametrize(
    ("version", "who", "topic", "message"),
    [
        ("mqttv311", "wrong", TOPIC, "Connection Refused: bad user name or password"),
        ("mqttv5", "wrong", TOPIC, "Connection error: Bad User Name or Password"),
        # 3.1.1 has no PUBACK code: the connection is closed
        ("mqttv311", "subscriber", TOPIC, "The connection was lost"),
        # 5.0: PUBACK 0x87 with the reason string (mosquitto_pub warns, exits 0)
        (
            "mqttv5",
            "subscriber",
            TOPIC,
            "Publish 1 failed: Not authorized.\nclient may not publish on channel 'temps'",
        ),
    ],
)
async def test_mosquitto_pub_refused(
    world: World,
    mqtt_adapter: MQTTAdapter,
    watch: Subscription,
    version: str,
    who: str,
    topic: str,
    message: str,
) -> None:
    pub_cmd = require_command("mosquitto_pub", "mosquitto-clients")
    party = getattr(world, who, None)
    user = party.id if party else world.publisher.id
    secret = party.secret if party else "wrong"
    rc, out, err = await run(
        pub_cmd,
        "-h",
        "127.0.0.1",
        "-p",
        str(mqtt_adapter.port),
        "-V",
        version,
        "-u",
        user,
        "-P",
        secret,
        "-t",
        topic,
        "-q",
        "1",
        "-m",
        "x",
    )
    assert message in out + err
    assert (rc == 0) == ("Publish 1 failed" in message)
    assert drain(watch) == []


# --- across protocols ---------------------------------------------------------------------


async def test_http_post_reaches_mqtt_subscriber(
    world: World, mqtt_adapter: MQTTAdapter, http: str
) -> None:
    with paho_client(mqtt_adapter.port, world.subscriber, "sub", paho.MQTTv5) as sub:
        await until(lambda: sub.connack)
        sub.client.subscribe("m/acme/c/temps/#", qos=1)
        await until(lambda: sub.subacks)
        async with aiohttp.ClientSession() as session:
            r = await session.post(
                f"{http}/m/acme/c/temps/room1",
                data=b'[{"n":"temp","u":"Cel","v":21.5}]',
                headers={
                    "Authorization": f"Client {world.publisher.secret}",
                    "Content-Type": "application/senml+json",
                },
            )
            assert r.status == 202
        (message,) = await until(lambda: sub.messages)
        assert message.topic == TOPIC
        assert json.loads(message.payload) == [{"n": "temp", "u": "Cel", "v": 21.5}]
        assert message.properties.ContentType == "application/senml+json"


async def test_mqtt_publish_reaches_sse_subscriber(
    world: World, mqtt_adapter: MQTTAdapter, http: str
) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.get(
            f"{http}/m/acme/c/temps/room1",
            headers={
                "Authorization": f"Client {world.subscriber.secret}",
                "Accept": "text/event-stream",
            },
        ) as r:
            assert r.status == 200
            assert (await r.content.readline()).startswith(b": subscribed")
            props = PahoProperties(PacketTypes.PUBLISH)
            props.UserProperty = [("site", "lab")]
            with paho_client(mqtt_adapter.port, world.publisher, "pub", paho.MQTTv5) as pub:
                await until(lambda: pub.connack)
                pub.client.publish(TOPIC, b"21.5", qos=1, properties=props)
                await until(lambda: pub.acked)
            event = b""
            async with asyncio.timeout(5):
                while not event.endswith(b"\n\n"):
                    event += await r.content.readline()
    lines = dict(line.split(": ", 1) for line in event.decode().strip().splitlines())
    assert lines["event"] == "message"
    data = json.loads(lines["data"])
    assert data["topic"] == TOPIC
    assert data["payload"] == "21.5"
    assert data["protocol"] == "mqtt"
    assert data["publisher"] == world.publisher.id
    assert data["metadata"]["site"] == "lab"
