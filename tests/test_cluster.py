"""Three `conduit serve` nodes as one gateway, on the local PostgreSQL (a schema of their own)
and the local NATS (a subject prefix and stream of their own): a message published on one node
over any protocol reaches subscribers on another over every protocol; a client disabled
through one node's API is cut off on another within a second; an MQTT session is taken over
from another node; a node killed (-9) loses no QoS 1 message it had written and no retained
message; a will published on one node reaches the others."""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import signal
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiocoap
import aiohttp
import aiomqtt
import pytest
from aiocoap.numbers.codes import Code
from websockets.asyncio.client import connect as ws_connect

from adapters.mqtt.codec import Disconnect, Properties, PubAck, Publish, Will
from tests.conftest import Party
from tests.mqtt.conftest import RawClient
from tests.postgres import fresh_schema
from tests.test_serve import Server, start

NATS = ("127.0.0.1", 4222)
TIMEOUT = 10.0


def nats_reachable() -> str:
    try:
        socket.create_connection(NATS, timeout=2).close()
    except OSError as exc:
        return f"{type(exc).__name__}: {exc}"
    return ""


@pytest.fixture
async def cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[list[Server]]:
    why = nats_reachable()
    if why:
        pytest.skip(f"NATS at {NATS[0]}:{NATS[1]} is not reachable: {why}")
    async with fresh_schema() as schema:
        from tests.postgres import DSN

        prefix = f"ct{secrets.token_hex(4)}"
        # The nodes of one gateway share the master key (the signing keys are sealed with it).
        monkeypatch.setenv("CONDUIT_ENCRYPTION_KEY", secrets.token_hex(32))
        monkeypatch.setenv("CONDUIT_POSTGRES_DSN", DSN)
        args = ("--store", "postgres", "--postgres-schema", schema, "--bus", "nats",
                "--nats-url", f"nats://{NATS[0]}:{NATS[1]}", "--nats-prefix", prefix)  # fmt: skip
        nodes: list[Server] = []
        try:
            for i in range(3):
                nodes.append(start(tmp_path / f"node{i}", *args))
            yield nodes
        finally:
            for node in nodes:
                if node.proc.poll() is None:
                    node.proc.terminate()
            for node in nodes:
                try:
                    node.proc.wait(10)
                except Exception:
                    node.proc.kill()


def provision(node: Server) -> dict[str, Any]:
    node.cli("domains", "create", "acme")
    node.cli("channels", "create", "--domain", "acme", "temps")
    dev: dict[str, Any] = node.cli_json("clients", "create", "--domain", "acme", "dev")  # type: ignore[assignment]
    node.cli("connect", "--domain", "acme", "--client", "dev", "--channel", "temps")
    return dev


class Receivers:
    """A subscriber of every protocol on one node: SSE, WebSocket, MQTT, CoAP observe."""

    def __init__(self, node: Server, client: dict[str, Any]) -> None:
        self.node, self.secret, self.client_id = node, client["secret"], client["id"]
        self.got: dict[str, list[bytes]] = {"sse": [], "ws": [], "mqtt": [], "coap": []}
        self.changed = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._ready: list[asyncio.Event] = []

    def _start(self, name: str, coro: Any) -> None:
        ready = asyncio.Event()
        self._ready.append(ready)
        self._tasks.append(asyncio.create_task(coro(ready), name=name))

    async def __aenter__(self) -> Receivers:
        self._start("sse", self._sse)
        self._start("ws", self._ws)
        self._start("mqtt", self._mqtt)
        self._start("coap", self._coap)
        try:
            await asyncio.wait_for(asyncio.gather(*(r.wait() for r in self._ready)), TIMEOUT)
        except TimeoutError:
            failed = {t.get_name(): t.exception() for t in self._tasks if t.done()}
            raise AssertionError(f"receivers not ready: {failed}") from None
        await asyncio.sleep(0.5)  # the node's bus subscriptions reach NATS
        return self

    def add(self, protocol: str, payload: bytes) -> None:
        self.got[protocol].append(payload)
        self.changed.set()

    async def until(self, n: int) -> None:
        """Until every receiver has ``n`` messages (TimeoutError after TIMEOUT)."""
        async with asyncio.timeout(TIMEOUT):
            while any(len(got) < n for got in self.got.values()):
                self.changed.clear()
                await self.changed.wait()

    async def __aexit__(self, *exc: object) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _sse(self, ready: asyncio.Event) -> None:
        url = f"http://127.0.0.1:{self.node.ports['http']}/m/acme/c/temps/%23"
        headers = {"Accept": "text/event-stream", "Authorization": f"Client {self.secret}"}
        async with aiohttp.ClientSession() as s, s.get(url, headers=headers) as r:
            assert r.status == 200
            ready.set()
            async for line in r.content:
                data = json.loads(line[5:]) if line.startswith(b"data:") else {}
                if "payload" in data:  # a message: a SenML pack as JSON, or text
                    payload = data["payload"]
                    if not isinstance(payload, str):
                        payload = json.dumps(payload, separators=(",", ":"))
                    self.add("sse", payload.encode())

    async def _ws(self, ready: asyncio.Event) -> None:
        url = (f"ws://127.0.0.1:{self.node.ports['ws']}/m/acme/c/temps/%23"
               f"?authorization=Client%20{self.secret}")  # fmt: skip
        async with ws_connect(url) as ws:
            ready.set()
            async for frame in ws:
                self.add("ws", frame.encode() if isinstance(frame, str) else frame)

    async def _mqtt(self, ready: asyncio.Event) -> None:
        async with aiomqtt.Client("127.0.0.1", self.node.ports["mqtt"], username=self.client_id,
                                  password=self.secret, identifier="rx") as client:  # fmt: skip
            await client.subscribe("m/acme/c/temps/#")
            ready.set()
            async for message in client.messages:
                self.add("mqtt", bytes(message.payload))  # type: ignore[arg-type]

    async def _coap(self, ready: asyncio.Event) -> None:
        ctx = await aiocoap.Context.create_client_context(transports=["udp6"])
        try:
            uri = f"coap://127.0.0.1:{self.node.ports['coap']}/m/acme/c/temps/t?auth={self.secret}"
            request = ctx.request(aiocoap.Message(code=Code.GET, uri=uri, observe=0))
            await asyncio.wait_for(request.response, TIMEOUT)
            ready.set()
            assert request.observation is not None
            async for notification in request.observation:
                self.add("coap", notification.payload)
        finally:
            await ctx.shutdown()


async def publish_all(node: Server, client: dict[str, Any]) -> list[bytes]:
    """One message over each protocol on ``node``, on m/acme/c/temps/t."""
    secret = client["secret"]
    sent = [f'[{{"n":"{p}","v":1}}]'.encode() for p in ("http", "ws", "mqtt", "coap")]
    base = f"127.0.0.1:{node.ports['http']}"
    async with aiohttp.ClientSession() as s:
        headers = {"Authorization": f"Client {secret}", "Content-Type": "application/senml+json"}
        async with s.post(f"http://{base}/m/acme/c/temps/t", data=sent[0], headers=headers) as r:
            assert r.status == 202
    url = (f"ws://127.0.0.1:{node.ports['ws']}/m/acme/c/temps/t?mode=publish"
           f"&ct=application/senml%2Bjson&authorization=Client%20{secret}")  # fmt: skip
    async with ws_connect(url) as ws:
        await ws.send(sent[1].decode())
    async with aiomqtt.Client("127.0.0.1", node.ports["mqtt"], username=client["id"],
                              password=secret, identifier="tx") as mqtt:  # fmt: skip
        await mqtt.publish("m/acme/c/temps/t", sent[2], qos=1)
    ctx = await aiocoap.Context.create_client_context(transports=["udp6"])
    try:
        uri = f"coap://127.0.0.1:{node.ports['coap']}/m/acme/c/temps/t?auth={secret}"
        message = aiocoap.Message(code=Code.POST, uri=uri, payload=sent[3],
                                  content_format=110)  # fmt: skip
        answer = await asyncio.wait_for(ctx.request(message).response, TIMEOUT)
        assert answer.code == Code.CHANGED, answer
    finally:
        await ctx.shutdown()
    return sent


async def test_every_protocol_to_every_protocol_across_nodes(cluster: list[Server]) -> None:
    a, b, _ = cluster
    dev = provision(a)
    async with Receivers(b, dev) as receivers:
        sent = await publish_all(a, dev)
        with contextlib.suppress(TimeoutError):
            await receivers.until(len(sent))
    assert {p: sorted(got) for p, got in receivers.got.items()} == {
        p: sorted(sent) for p in receivers.got
    }


async def test_a_client_disabled_on_one_node_is_cut_off_on_another(cluster: list[Server]) -> None:
    a, _, c = cluster
    dev = provision(a)
    async with aiomqtt.Client("127.0.0.1", c.ports["mqtt"], username=dev["id"],
                              password=dev["secret"], identifier="held") as client:  # fmt: skip
        await client.subscribe("m/acme/c/temps/#")
        key = (Path(a.env["CONDUIT_DATA_DIR"]) / "admin.key").read_text().strip()
        url = f"http://127.0.0.1:{a.ports['api']}/domains/acme/clients/dev/disable"
        async with aiohttp.ClientSession() as s:
            async with s.post(url, headers={"Authorization": f"Bearer {key}"}) as r:
                assert r.status == 200, await r.text()
        disabled = time.monotonic()
        with pytest.raises(aiomqtt.MqttError):
            async with asyncio.timeout(5):
                async for _ in client.messages:
                    pass
        # The bound, measured from the API's answer on node A to the end on node C.
        assert time.monotonic() - disabled < 1.0


def session_props(expiry: int = 300) -> Properties:
    return Properties(session_expiry_interval=expiry)


async def test_a_session_taken_over_from_another_node(cluster: list[Server]) -> None:
    """The same client identifier connecting on node B ends its connection on node A
    (DISCONNECT 0x8E) and resumes its session there: its subscription, and what was published
    meanwhile."""
    a, b, c = cluster
    dev = provision(a)
    party = Party(dev["id"], dev["secret"])
    on_a = await RawClient.open(a.ports["mqtt"], 5)
    ack = await on_a.connect(party, "phone", clean=False, properties=session_props())
    assert ack.reason_code == 0 and not ack.session_present
    assert (await on_a.subscribe("m/acme/c/temps/#", qos=1)).reason_codes == [1]
    on_b = await RawClient.open(b.ports["mqtt"], 5)
    ack = await on_b.connect(party, "phone", clean=False, properties=session_props())
    assert ack.reason_code == 0 and ack.session_present  # the session came from node A
    closed = await on_a.until_closed(5)
    assert [p.reason_code for p in closed if isinstance(p, Disconnect)] == [0x8E]
    publisher = await RawClient.open(c.ports["mqtt"], 5)
    await publisher.connect(party, "backend")
    assert isinstance(await publisher.publish("m/acme/c/temps/t", b"to the phone", 1, 1), PubAck)
    got = await on_b.expect(Publish, 10)
    assert got.payload == b"to the phone"
    for client in (on_b, publisher):
        await client.disconnect()


async def test_a_node_killed_loses_no_persisted_message(cluster: list[Server]) -> None:
    """kill -9 of the node holding an offline session: the QoS 1 messages it had queued and
    written, and a retained message, are there on another node."""
    a, b, c = cluster
    dev = provision(a)
    party = Party(dev["id"], dev["secret"])
    phone = await RawClient.open(a.ports["mqtt"], 5)
    await phone.connect(party, "phone", clean=False, properties=session_props())
    assert (await phone.subscribe("m/acme/c/temps/#", qos=1)).reason_codes == [1]
    await phone.disconnect()  # offline; node A holds the session and queues for it
    publisher = await RawClient.open(b.ports["mqtt"], 5)
    await publisher.connect(party, "backend")
    sent = [f"queued {i}".encode() for i in range(5)]
    for i, payload in enumerate(sent, start=1):
        assert isinstance(await publisher.publish("m/acme/c/temps/t", payload, 1, i), PubAck)
    answer = await publisher.publish("m/acme/c/temps/status", b"retained", 1, 9, retain=True)
    assert isinstance(answer, PubAck)
    await publisher.disconnect()
    await asyncio.sleep(1.0)  # node A receives them over NATS and writes them (once a turn)
    a.proc.send_signal(signal.SIGKILL)
    a.proc.wait(10)
    phone = await RawClient.open(c.ports["mqtt"], 5)
    ack = await phone.connect(party, "phone", clean=False, properties=session_props())
    assert ack.reason_code == 0 and ack.session_present  # taken from the dead node
    got = [(await phone.expect(Publish, 10)).payload for _ in sent]
    assert got == sent
    viewer = await RawClient.open(b.ports["mqtt"], 5)
    await viewer.connect(party, "viewer")
    await viewer.subscribe("m/acme/c/temps/status", qos=1)
    retained = await viewer.expect(Publish, 10)
    assert (retained.payload, retained.retain) == (b"retained", True)
    for client in (phone, viewer):
        await client.disconnect()


async def test_a_will_reaches_the_other_nodes(cluster: list[Server]) -> None:
    """A client that vanishes from node A (its TCP connection dropped): its will reaches a
    subscriber on node B."""
    a, b, _ = cluster
    dev = provision(a)
    party = Party(dev["id"], dev["secret"])
    watcher = await RawClient.open(b.ports["mqtt"], 5)
    await watcher.connect(party, "watcher")
    await watcher.subscribe("m/acme/c/temps/status/#", qos=1)
    device = await RawClient.open(a.ports["mqtt"], 5)
    ack = await device.connect(party, "device", will=Will("m/acme/c/temps/status/device",
                                                         b"offline", 1))  # fmt: skip
    assert ack.reason_code == 0
    device.writer.transport.abort()  # no DISCONNECT: the will is due
    got = await watcher.expect(Publish, 10)
    assert (got.topic, got.payload) == ("m/acme/c/temps/status/device", b"offline")
    await watcher.disconnect()
