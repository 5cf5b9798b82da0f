"""Hostile SenML end to end: the payloads an outside tester used to take the server down, sent
by real clients over real sockets to each adapter. Each is refused in its protocol's idiom for
invalid SenML (HTTP 400, MQTT 5 PUBACK 0x99, MQTT 3.1.1 disconnect, WebSocket close 1007, CoAP
4.00), nothing is published, and another client, connected before, publishes right after.

- a 64 kB SenML CBOR pack using value sharing (tags 28 and 29): one map of 5,000 labels as
  10,000 records, which took 14 s to check and was accepted;
- a 2 kB SenML JSON pack nested 997 levels deep, which raised RecursionError (HTTP 500, MQTT
  dropped, WebSocket 1011, CoAP 5.00).

The rules themselves are tested in tests/test_senml.py."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from urllib.parse import quote

import aiocoap
import aiohttp
import cbor2
import paho.mqtt.client as paho
import pytest
from aiocoap.numbers.codes import Code
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties as PahoProperties
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from adapters.coap import CoAPAdapter
from adapters.http import HTTPAdapter
from adapters.mqtt import MQTTAdapter
from adapters.mqtt.codec import Properties, PubAck, Publish
from adapters.ws import WSAdapter
from core.bus import Subscription
from core.message import Message
from tests.coap.conftest import client_context, request
from tests.conftest import Party, World, drain, running
from tests.mqtt.conftest import HOST, RawClient, paho_client, until

TOPIC = "m/acme/c/temps/hostile"


@dataclass(frozen=True)
class Case:
    payload: bytes
    content_type: str
    content_format: int  # CoAP
    detail: str
    record: int | None
    valid: bytes  # a pack of the same content type, for the client that must not notice


def value_sharing_bomb() -> bytes:
    """One map of 5,000 labels (a name, a value and 4,998 extension labels) as 10,000 records:
    cbor2 writes the map once (tag 28) and a reference to it (tag 29) for each record."""
    labels = {0: "temp", 2: 21.5, **{f"l{i:04d}": 0 for i in range(4998)}}
    return cbor2.dumps([labels] * 10_000, value_sharing=True)


VALUE_SHARING = Case(
    value_sharing_bomb(),
    "application/senml+cbor",
    112,
    "CBOR value sharing (tag 28) is not accepted in SenML: a pack spells out each value where "
    "it is used, so that checking it costs what its bytes do",
    None,
    cbor2.dumps([{0: "temp", 2: 21.5}]),
)
DEEP_JSON = Case(
    b"[" * 997 + b"]" * 997,
    "application/senml+json",
    110,
    "record 0: the pack nests arrays and objects deeper than 16 levels (the pack is level 1, "
    "its records level 2)",
    0,
    json.dumps([{"n": "temp", "v": 21.5}]).encode(),
)
CASES = [
    pytest.param(VALUE_SHARING, id="cbor-value-sharing"),
    pytest.param(DEEP_JSON, id="json-997-deep"),
]


def test_the_payloads_are_the_testers() -> None:
    assert 60_000 < len(VALUE_SHARING.payload) < 70_000
    assert b"\xd8\x1c" in VALUE_SHARING.payload and b"\xd8\x1d" in VALUE_SHARING.payload
    assert len(DEEP_JSON.payload) < 2_048


def refusals(world: World, protocol: str) -> float:
    value = world.gateway.metrics.registry.get_sample_value(
        "conduit_refusals_total", {"protocol": protocol, "reason": "invalid_senml"}
    )
    return value or 0.0


async def published(watch: Subscription) -> Message:
    message = await asyncio.wait_for(watch.get(), 10)
    assert message is not None
    return message


def secret(party: Party) -> dict[str, str]:
    return {"Authorization": f"Client {party.secret}"}


# --- HTTP --------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
async def test_http_400_problem(world: World, watch: Subscription, case: Case) -> None:
    async with (
        running(HTTPAdapter(world.gateway, "127.0.0.1", 0)) as adapter,
        aiohttp.ClientSession() as hostile,
        aiohttp.ClientSession() as other,
    ):
        url = f"http://127.0.0.1:{adapter.port}/{TOPIC}"
        headers = {"Content-Type": case.content_type}
        # The other client's connection is open (kept alive) before the hostile payload.
        async with other.post(url, data=case.valid, headers={**headers, **secret(world.both)}) as r:
            assert r.status == 202
        assert (await published(watch)).publisher == world.both.id

        async with hostile.post(
            url, data=case.payload, headers={**headers, **secret(world.publisher)}
        ) as r:
            assert r.status == 400
            assert r.headers["Content-Type"] == "application/problem+json"
            problem = await r.json(content_type=None)
        assert problem == {
            "type": "urn:conduit:error:invalid_senml",
            "title": "Invalid SenML",
            "status": 400,
            "detail": case.detail,
            "record": case.record,
            "field": None,
        }
        assert drain(watch) == []
        assert refusals(world, "http") == 1

        async with other.post(url, data=case.valid, headers={**headers, **secret(world.both)}) as r:
            assert r.status == 202
        message = await published(watch)
        assert (message.publisher, message.payload) == (world.both.id, case.valid)


# --- MQTT --------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
async def test_mqtt5_puback_0x99(world: World, watch: Subscription, case: Case) -> None:
    """The Content Type property says SenML (the adapter's default is opaque bytes)."""
    async with running(MQTTAdapter(world.gateway, HOST, 0, ws_port=0)) as adapter:
        with paho_client(adapter.port, world.both, "other", protocol=paho.MQTTv5) as other:
            await until(lambda: other.connack)
            assert not other.connack[1].is_failure
            hostile = await RawClient.open(adapter.port, 5)
            try:
                assert (await hostile.connect(world.publisher, "hostile")).reason_code == 0
                props = Properties(content_type=case.content_type)
                answer = await hostile.publish(TOPIC, case.payload, 1, 1, properties=props)
                assert isinstance(answer, PubAck)
                assert (answer.packet_id, answer.reason_code) == (1, 0x99)
                assert answer.properties.reason_string == case.detail
                assert drain(watch) == []
                assert refusals(world, "mqtt") == 1
                # MQTT 5 refuses the message, not the connection: the next publish passes.
                ok = await hostile.publish(TOPIC, case.valid, 1, 2, properties=props)
                assert ok == PubAck(2)
                assert (await published(watch)).publisher == world.publisher.id
            finally:
                await hostile.close()

            paho_props = PahoProperties(PacketTypes.PUBLISH)
            paho_props.ContentType = case.content_type
            info = other.client.publish(TOPIC, case.valid, qos=1, properties=paho_props)
            await until(lambda: info.mid in other.acked)
            message = await published(watch)
            assert (message.publisher, message.content_type) == (world.both.id, case.content_type)
            assert other.disconnected is None


@pytest.mark.parametrize("case", CASES)
async def test_mqtt311_disconnect(world: World, watch: Subscription, case: Case) -> None:
    """MQTT 3.1.1 has no content type: the adapter is configured to take payloads as SenML,
    and can only close the connection of a client that sends invalid SenML."""
    adapter = MQTTAdapter(world.gateway, HOST, 0, ws_port=0, content_type=case.content_type)
    async with running(adapter):
        other = await RawClient.open(adapter.port, 4)
        hostile = await RawClient.open(adapter.port, 4)
        try:
            assert (await other.connect(world.both, "other")).reason_code == 0
            assert (await hostile.connect(world.publisher, "hostile")).reason_code == 0
            await hostile.send(Publish(TOPIC, case.payload, 1, False, False, 1))
            assert await hostile.until_closed() == []  # no PUBACK: the connection is closed
            assert drain(watch) == []
            assert refusals(world, "mqtt") == 1

            assert await other.publish(TOPIC, case.valid, 1, 1) == PubAck(1)
            message = await published(watch)
            assert (message.publisher, message.payload) == (world.both.id, case.valid)
        finally:
            await other.close()
            await hostile.close()


# --- WebSocket ---------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
async def test_websocket_close_1007(world: World, watch: Subscription, case: Case) -> None:
    async with running(WSAdapter(world.gateway, "127.0.0.1", 0)) as adapter:
        url = f"ws://127.0.0.1:{adapter.port}/{TOPIC}?ct={quote(case.content_type, safe='/')}"
        async with (
            connect(url, additional_headers=secret(world.both)) as other,
            connect(url, additional_headers=secret(world.publisher)) as hostile,
        ):
            await hostile.send(case.payload)  # bytes: a binary frame
            with pytest.raises(ConnectionClosed):
                await asyncio.wait_for(hostile.recv(), 10)
            assert hostile.close_code == 1007
            # A close reason holds 123 bytes: a longer detail is cut.
            reason = case.detail if len(case.detail) <= 123 else case.detail[:120] + "..."
            assert hostile.close_reason == reason
            assert drain(watch) == []
            assert refusals(world, "ws") == 1

            await other.send(case.valid)
            message = await published(watch)
            assert (message.publisher, message.payload) == (world.both.id, case.valid)


# --- CoAP --------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def coap_client() -> AsyncIterator[aiocoap.Context]:
    context = await client_context()
    try:
        yield context
    finally:
        await context.shutdown()


@pytest.mark.parametrize("case", CASES)
async def test_coap_4_00(world: World, watch: Subscription, case: Case) -> None:
    """The 64 kB pack goes up in Block1 blocks; the answer to the last one refuses it."""
    async with (
        running(CoAPAdapter(world.gateway, "127.0.0.1", 0)) as adapter,
        coap_client() as hostile,
        coap_client() as other,
    ):
        uri = f"coap://127.0.0.1:{adapter.port}/{TOPIC}?auth="
        cf = case.content_format
        response = await request(other, Code.POST, uri + world.both.secret, case.valid,
                                 content_format=cf)  # fmt: skip
        assert response.code == Code.CHANGED
        assert (await published(watch)).publisher == world.both.id

        response = await request(
            hostile, Code.POST, uri + world.publisher.secret, case.payload, content_format=cf
        )
        assert response.code == Code.BAD_REQUEST
        assert response.payload.decode() == case.detail  # the diagnostic payload
        assert drain(watch) == []
        assert refusals(world, "coap") == 1

        response = await request(other, Code.POST, uri + world.both.secret, case.valid,
                                 content_format=cf)  # fmt: skip
        assert response.code == Code.CHANGED
        message = await published(watch)
        assert (message.publisher, message.payload) == (world.both.id, case.valid)
