"""The NATS bus across nodes: two buses (two nodes) on one NATS and one subject prefix, and a
NATS server of the test's own that is stopped and started again. What every bus must do is in
tests/contracts/test_bus_contract.py; here is what only a bus of several nodes can show."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from pydantic import ValidationError

from adapters.http import HTTPAdapter
from adapters.mqtt import MQTTAdapter
from adapters.mqtt.codec import Disconnect, Publish
from conduit.app import nats_options
from conduit.settings import Settings
from core.auth import store_auth
from core.bus import Change, Subscription
from core.bus.nats import NatsBus, NatsOptions, filter_subjects, queue_name
from core.credentials import Credentials
from core.errors import UnavailableError
from core.gateway import CLIENT_REVOKED, Gateway
from core.message import Message
from core.sealing import master_key
from core.signing import Keyring
from core.store.sqlite import SQLiteStore
from core.tokens import Tokens
from core.topics import parse_filter
from tests import natsserver
from tests.buses import message, subscribed, taken
from tests.conftest import World, provision, running
from tests.mqtt.conftest import RawClient, connected
from tests.test_serve import CONDUIT
from tests.test_serve import start as serve_process

PASSWORD = "nats-password-3f9c"  # distinctive: "pw" alone turns up in random log text


async def _until(check: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("not within the time allowed")
        await asyncio.sleep(0.01)


async def _settle() -> None:
    await asyncio.sleep(0.2)


@pytest.fixture
def opts() -> NatsOptions:
    if (reason := natsserver.unreachable()) is not None:
        pytest.skip(reason)
    return natsserver.options()


@pytest.fixture
async def two(opts: NatsOptions) -> AsyncIterator[tuple[NatsBus, NatsBus]]:
    async with natsserver.nodes(opts, 2) as (a, b):
        yield a, b


# --- subjects ------------------------------------------------------------------------------


def test_filters_become_subjects_and_groups_queues() -> None:
    assert filter_subjects(parse_filter("m/acme/c/temps/a/+"), "p") == ["p.acme.temps.a.*"]
    assert filter_subjects(parse_filter("m/acme/c/temps"), "p") == ["p.acme.temps"]
    # '#' also matches its parent level, which NATS's '>' does not
    assert filter_subjects(parse_filter("m/acme/c/temps/#"), "p") == [
        "p.acme.temps.>",
        "p.acme.temps",
    ]
    assert filter_subjects(parse_filter("m/acme/c/temps/a.b/#"), "p") == [
        "p.acme.temps.a%2Eb.>",
        "p.acme.temps.a%2Eb",
    ]
    q = queue_name("my group.x", parse_filter("m/acme/c/temps/#"))
    assert q.startswith("share.my%20group%2Ex.") and " " not in q
    assert q != queue_name("my group.x", parse_filter("m/acme/c/temps/+"))
    assert q != queue_name("other", parse_filter("m/acme/c/temps/#"))


# --- two nodes ------------------------------------------------------------------------------


async def test_a_message_published_on_one_node_reaches_subscribers_on_both_once(
    two: tuple[NatsBus, NatsBus],
) -> None:
    a, b = two
    there = await subscribed(b, "m/acme/c/temps/#")
    here = await subscribed(a, "m/acme/c/temps/#")
    # a second filter of the same node matching the same message: each subscriber once
    exact = await subscribed(a, "m/acme/c/temps/x.y/*z")
    await a.publish(message("x.y/*z", b"1"))
    await b.publish(message("", b"2"))
    await _until(lambda: len(there._queue) == 2 and len(here._queue) == 2)
    await _settle()
    # two publishers: NATS keeps each one's order, not an order between them
    assert sorted(taken(there)) == [b"1", b"2"]
    assert sorted(taken(here)) == [b"1", b"2"]
    assert taken(exact) == [b"1"]


async def test_a_shared_subscription_delivers_once_across_nodes(
    two: tuple[NatsBus, NatsBus],
) -> None:
    a, b = two
    members = [
        await subscribed(a, "m/acme/c/temps/#", group="workers"),
        await subscribed(b, "m/acme/c/temps/#", group="workers"),
        await subscribed(b, "m/acme/c/temps/#", group="workers"),
    ]
    other_group = await subscribed(b, "m/acme/c/temps/#", group="auditors")
    plain = await subscribed(a, "m/acme/c/temps/#")
    sent = [b"%d" % i for i in range(200)]
    for i, payload in enumerate(sent):
        await (a if i % 2 else b).publish(message("s", payload))
    await _until(lambda: len(plain._queue) == len(sent))
    await _settle()
    got = [taken(m) for m in members]
    assert sorted(p for payloads in got for p in payloads) == sorted(sent)  # once in total
    assert got[0] and (got[1] or got[2])  # both nodes took a share
    assert sorted(taken(other_group)) == sorted(sent)  # another group: its own copy
    assert len(taken(plain)) == len(sent)


async def test_changes_reach_every_node_and_the_announcer_once(
    two: tuple[NatsBus, NatsBus],
) -> None:
    a, b = two
    heard_a: list[Change] = []
    heard_b: list[tuple[Change, float]] = []

    async def on_a(change: Change) -> None:
        heard_a.append(change)

    async def on_b(change: Change) -> None:
        heard_b.append((change, time.monotonic()))

    a.on_change(on_a)
    b.on_change(on_b)
    change = Change("client", "acme", "id-1")
    start = time.monotonic()
    await a.announce(change)
    assert heard_a == [change]  # before announce returns
    await _until(lambda: bool(heard_b), timeout=1.0)  # the bound: within a second
    assert heard_b[0][0] == change and heard_b[0][1] - start < 1.0
    await _settle()
    assert heard_a == [change] and len(heard_b) == 1  # its own announcement came back: skipped


async def test_last_from_another_node(two: tuple[NatsBus, NatsBus]) -> None:
    a, b = two
    await a.publish(message("a.b", b"1"))
    await a.publish(message("a.b", b"2"))
    await a.publish(message("a.b/c", b"3"))

    async def latest() -> Message | None:
        return await b.last("acme", "temps", "a.b")

    deadline = time.monotonic() + 5
    while (got := await latest()) is None or got.payload != b"2":
        assert time.monotonic() < deadline, got
        await asyncio.sleep(0.02)
    assert got.subtopic == "a.b" and got.publisher == "pub"
    assert await b.last("acme", "temps", "a") is None
    assert await b.last("acme", "other", "a.b") is None


async def test_a_node_subscribes_on_nats_to_what_its_subscribers_hold_only(
    two: tuple[NatsBus, NatsBus],
) -> None:
    a, b = two
    assert b.subjects() == []
    exact = await subscribed(b, "m/acme/c/temps/a")
    exact2 = await subscribed(b, "m/acme/c/temps/a")  # the same filter: no second subscription
    shared = await subscribed(b, "m/acme/c/temps/+", group="g")
    p = a.prefix
    assert sorted(b.subjects()) == sorted(
        [(f"{p}.acme.temps.a", ""), (f"{p}.acme.temps.*", queue_name("g", shared.filter))]
    )
    assert a.subjects() == []
    assert b.nc is not None and b.qc is not None

    def arrived() -> int:  # on both of the node's connections
        assert b.nc is not None and b.qc is not None
        return int(b.nc.stats["in_msgs"] + b.qc.stats["in_msgs"])

    received = arrived()
    for subtopic, channel in (("b/c", "temps"), ("", "temps"), ("a", "other")):
        await a.publish(message(subtopic, channel=channel))
    await a.publish(message("a", b"wanted"))
    await _until(lambda: len(exact._queue) == 1)
    await _settle()
    # NATS brought this node the one message it has subscribers for, once per filter holding
    # it (the exact filter and the shared one), nothing else
    assert arrived() - received == 2
    assert taken(exact) == taken(exact2) == taken(shared) == [b"wanted"]
    await b.unsubscribe(exact)
    assert len(b.subjects()) == 2  # exact2 still holds it
    await b.unsubscribe(exact2)
    await b.unsubscribe(shared)
    assert b.subjects() == []
    await b.sync()  # the server has the UNSUBs
    received = b.nc.stats["in_msgs"]
    await a.publish(message("a"))
    await _settle()
    assert b.nc.stats["in_msgs"] == received


async def test_a_deployment_hears_nothing_of_another_on_the_same_nats(
    opts: NatsOptions,
) -> None:
    other = natsserver.options()
    async with natsserver.nodes(opts, 1) as (a,), natsserver.nodes(other, 1) as (b,):
        heard: list[Change] = []

        async def on_b(change: Change) -> None:
            heard.append(change)

        b.on_change(on_b)
        sub = await subscribed(b, "m/acme/c/temps/#")
        await a.publish(message("a"))
        await a.announce(Change("client", "acme", "x"))
        await _settle()
        assert taken(sub) == [] and heard == []
        assert await b.last("acme", "temps", "a") is None


# --- NATS away and back -----------------------------------------------------------------------


async def test_start_without_nats_says_so() -> None:
    opts = natsserver.options(f"nats://127.0.0.1:{natsserver.free_port()}", connect_timeout=0.5)
    bus = NatsBus(opts)
    with pytest.raises(UnavailableError, match=r"cannot reach NATS at nats://127\.0\.0\.1:"):
        await bus.start()
    with pytest.raises(UnavailableError):
        await bus.ping()


async def test_service_stops_and_resumes_with_nats_without_restarting_the_bus(
    tmp_path: Path,
) -> None:
    """Its own nats-server on a free port: stopped (publishing, subscribing, last and ping
    raise UnavailableError), started again on the same port and store; the same buses carry
    messages again, their subscriptions back in place, the stream's latest messages kept."""
    server = natsserver.OwnServer(tmp_path / "nats")
    await server.start()
    opts = natsserver.options(server.url)
    try:
        async with natsserver.nodes(opts, 2) as (a, b):
            heard: list[Change] = []

            async def on_b(change: Change) -> None:
                heard.append(change)

            b.on_change(on_b)
            sub = await subscribed(b, "m/acme/c/temps/#")
            await a.publish(message("kept", b"k"))
            await a.publish(message("a", b"before"))
            await _until(lambda: len(sub._queue) == 2)
            assert taken(sub) == [b"k", b"before"]

            await server.stop()
            await _until(lambda: a.nc is not None and not a.nc.is_connected)
            with pytest.raises(UnavailableError, match="NATS unreachable"):
                await a.publish(message("a", b"lost"))
            with pytest.raises(UnavailableError):
                a.publish_nowait(message("a", b"lost"))
            with pytest.raises(UnavailableError):
                await a.ping()
            with pytest.raises(UnavailableError):
                await a.subscribe(Subscription(parse_filter("m/acme/c/other")))
            with pytest.raises(UnavailableError):
                await a.last("acme", "temps", "a")

            await server.start()  # the same port, the same store directory
            await _until(lambda: all(n.nc is not None and n.nc.is_connected for n in (a, b)), 20)
            await a.ping()
            await b.ping()
            await a.publish(message("a", b"after"))
            await _until(lambda: len(sub._queue) == 1)
            assert taken(sub) == [b"after"]
            await _until(lambda: Change("bus", "") in heard)  # told to drop what it cached
            last = await b.last("acme", "temps", "a")
            assert last is not None and last.payload == b"after"
            kept = await b.last("acme", "temps", "kept")  # the stream's file outlived NATS
            assert kept is not None and kept.payload == b"k"
    finally:
        await server.stop()


# --- gateways on the NATS bus -----------------------------------------------------------------


async def _gateway(data: Path, opts: NatsOptions) -> Gateway:
    """A node: a gateway on the NATS bus and on the SQLite file every node of the test shares
    (the PostgreSQL store's role in a deployment)."""
    store = SQLiteStore(data / "conduit.db")
    tokens = Tokens(Keyring(store, master_key(data, None)), "conduit")
    gateway = Gateway(store, NatsBus(opts), *store_auth(store, tokens=tokens), tokens=tokens)
    await gateway.start()
    return gateway


@pytest.fixture
async def nodes(tmp_path: Path, opts: NatsOptions) -> AsyncIterator[tuple[World, Gateway]]:
    a = await _gateway(tmp_path, opts)
    b = await _gateway(tmp_path, opts)
    try:
        yield await provision(a), b
    finally:
        await b.close()
        await a.close()
        await natsserver.delete_stream(opts)


async def test_a_client_disabled_on_one_node_is_cut_off_on_the_other(
    nodes: tuple[World, Gateway],
) -> None:
    world, b = nodes
    identity = await b.authenticate(Credentials(world.subscriber.secret))
    closed: list[tuple[str, float]] = []
    sub = await b.subscribe(
        identity,
        "m/acme/c/temps/#",
        "ws",
        on_close=lambda _s, reason: closed.append((reason, time.monotonic())),
    )
    start = time.monotonic()
    await world.gateway.provisioning.set_client_enabled("acme", world.subscriber.id, False)
    await _until(lambda: bool(closed), timeout=1.0)  # within a second, as the issue asks
    assert sub.closed is not None
    assert closed[0][0] in (CLIENT_REVOKED, "authorization revoked")
    assert closed[0][1] - start < 1.0


async def test_mqtt_no_local_over_nats(nodes: tuple[World, Gateway], tmp_path: Path) -> None:
    """The message comes back from NATS to the node that published it; the publishing session
    still does not get it (No Local), another session on that node and one on the other do."""
    world, b = nodes
    async with (
        running(MQTTAdapter(world.gateway, "127.0.0.1", 0, ws_port=0)) as on_a,
        running(MQTTAdapter(b, "127.0.0.1", 0, ws_port=0)) as on_b,
    ):
        clients: list[RawClient] = []

        async def raw(level: int = 4, port: int = on_a.port) -> RawClient:
            client = await RawClient.open(port, level)
            clients.append(client)
            return client

        def raw_on_b(level: int = 4) -> Any:
            return raw(level, on_b.port)

        try:
            me = await connected(raw, world.both, "me", 5)
            await me.subscribe("m/acme/c/temps/#", no_local=True)
            neighbour = await connected(raw, world.both, "neighbour", 5)
            await neighbour.subscribe("m/acme/c/temps/#")
            far = await connected(raw_on_b, world.both, "far", 5)
            await far.subscribe("m/acme/c/temps/#")
            await me.publish("m/acme/c/temps/a", b"mine")
            for client in (neighbour, far):
                got = await client.recv()
                assert isinstance(got, Publish) and got.payload == b"mine"
            await far.publish("m/acme/c/temps/a", b"theirs")
            got = await me.recv()  # "mine" never came: the next is theirs
            assert isinstance(got, Publish) and got.payload == b"theirs"
        finally:
            for client in clients:
                await client.close()


async def test_protocols_answer_unavailable_while_nats_is_away_and_resume(
    tmp_path: Path,
) -> None:
    """The error table's "bus or store unavailable" through real adapters, a gateway on a NATS
    of the test's own: HTTP 503 and /health naming the bus; MQTT 5 DISCONNECT 0x89 (0x88 has
    no PUBLISH-side form); then, with NATS back, 202 and delivery again."""
    server = natsserver.OwnServer(tmp_path / "nats")
    await server.start()
    opts = natsserver.options(server.url)
    gateway = await _gateway(tmp_path, opts)
    try:
        world = await provision(gateway)
        watch = await gateway.subscribe(
            await gateway.authenticate(Credentials(world.subscriber.secret)),
            "m/acme/c/temps/#",
            "ws",
        )
        headers = {
            "Authorization": f"Client {world.publisher.secret}",
            "Content-Type": "text/plain",
        }
        async with (
            running(HTTPAdapter(gateway, "127.0.0.1", 0)) as http,
            running(MQTTAdapter(gateway, "127.0.0.1", 0, ws_port=0)) as mqtt,
            aiohttp.ClientSession() as session,
        ):
            url = f"http://127.0.0.1:{http.port}"
            mqtt_client = await RawClient.open(mqtt.port, 5)
            try:
                assert (await mqtt_client.connect(world.both, "dev")).reason_code == 0
                async with session.post(f"{url}/m/acme/c/temps/a", data=b"1", headers=headers) as r:
                    assert r.status == 202
                await _until(lambda: len(watch._queue) == 1)

                await server.stop()
                bus = gateway.bus
                assert isinstance(bus, NatsBus)
                await _until(lambda: bus.nc is not None and not bus.nc.is_connected)
                async with session.post(f"{url}/m/acme/c/temps/a", data=b"2", headers=headers) as r:
                    assert r.status == 503
                    assert "NATS unreachable" in (await r.json())["detail"]
                async with session.get(f"{url}/health") as r:
                    health = await r.json()
                    assert r.status == 503 and health["store"] == "ok"
                    assert health["bus"].startswith("unavailable: NATS unreachable")
                await mqtt_client.send(Publish("m/acme/c/temps/a", b"3", 1, packet_id=1))
                packets = await mqtt_client.until_closed()
                assert len(packets) == 1 and isinstance(packets[0], Disconnect)
                assert packets[0].reason_code == 0x89
            finally:
                await mqtt_client.close()

            await server.start()
            await _until(lambda: bus.nc is not None and bus.nc.is_connected, 20)
            async with session.post(f"{url}/m/acme/c/temps/a", data=b"4", headers=headers) as r:
                assert r.status == 202
            async with session.get(f"{url}/health") as r:
                assert r.status == 200
            await _until(lambda: len(watch._queue) == 2)
            assert taken(watch) == [b"1", b"4"]
    finally:
        await gateway.close()
        await natsserver.delete_stream(opts)
        await server.stop()


# --- the composition root ---------------------------------------------------------------------


def test_settings_reach_the_bus(tmp_path: Path) -> None:
    s = Settings(
        bus="nats",
        nats_url="nats://u:secret@n1:4222,nats://n2:4222",
        nats_token="t",
        nats_prefix="prod",
        nats_stream="prod-last",
        nats_stream_storage="memory",
        nats_stream_max_age=3600,
        nats_stream_max_msgs_per_subject=2,
    )
    o = nats_options(s)
    assert o is not None
    assert o.servers == ["nats://u:secret@n1:4222", "nats://n2:4222"]
    assert o.shown_url == "nats://n1:4222,nats://n2:4222"  # what errors and logs may say
    assert (o.token, o.prefix, o.stream, o.stream_storage) == ("t", "prod", "prod-last", "memory")
    assert (o.stream_max_age, o.stream_max_msgs_per_subject) == (3600, 2)
    assert nats_options(Settings()) is None
    with pytest.raises(ValidationError, match="nats_tls_cert and nats_tls_key"):
        Settings(nats_tls_cert=tmp_path / "c.pem")
    with pytest.raises(ValidationError, match="nats_prefix"):
        Settings(nats_prefix="a.b")


def test_serve_on_nats(tmp_path: Path, opts: NatsOptions) -> None:
    """`conduit serve --bus nats` as a user runs it: ready, healthy, publishing; and a NATS
    out of reach stops the start with one line saying so."""
    server = serve_process(
        tmp_path / "data",
        *("--bus", "nats", "--nats-url", opts.url, "--nats-prefix", opts.prefix),
        *("--nats-stream", opts.stream, "--nats-stream-max-bytes", str(opts.stream_max_bytes)),
    )
    try:

        async def check() -> None:
            async with aiohttp.ClientSession() as session:
                url = f"http://127.0.0.1:{server.ports['http']}/health"
                async with session.get(url) as r:
                    assert r.status == 200
                    assert (await r.json())["bus"] == "ok"

        asyncio.run(check())
    finally:
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(15) == 0
        asyncio.run(natsserver.delete_stream(opts))

    port = natsserver.free_port()
    r = subprocess.run(
        [*CONDUIT, "serve", "--host", "127.0.0.1", "--bus", "nats",
         "--nats-url", f"nats://conduit:{PASSWORD}@127.0.0.1:{port}",
         "--nats-connect-timeout", "0.5"],
        env={**os.environ, "CONDUIT_DATA_DIR": str(tmp_path / "data2")},
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert r.returncode == 1
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith(f"Error: nats bus: cannot reach NATS at nats://127.0.0.1:{port} within")
    assert PASSWORD not in r.stderr


async def test_a_stream_that_cannot_be_made_or_kept_is_said_at_start(opts: NatsOptions) -> None:
    """Another stream on the same subjects (a second deployment with the same prefix), or a
    stream kept in other storage than the settings say: the start says which, in one line."""
    async with natsserver.nodes(opts, 1):
        same_prefix = natsserver.options(prefix=opts.prefix)
        with pytest.raises(UnavailableError, match=f"stream {same_prefix.stream} cannot be made"):
            await NatsBus(same_prefix).start()
        in_memory = natsserver.options(
            prefix=opts.prefix, stream=opts.stream, stream_storage="memory"
        )
        with pytest.raises(UnavailableError, match="kept in file storage, not memory"):
            await NatsBus(in_memory).start()


async def test_this_node_s_own_messages_reach_its_subscribers_without_nats(
    two: tuple[NatsBus, NatsBus],
) -> None:
    """A plain subscriber gets what its own node publishes at once, not back from NATS (the
    connection asks NATS for no echo); a shared group whose only member is on the publishing
    node still gets its share (its queue subscription is on a connection with echo)."""
    a, _ = two
    plain = await subscribed(a, "m/acme/c/temps/a")
    shared = await subscribed(a, "m/acme/c/temps/a", group="g")
    assert a.nc is not None and a.qc is not None
    before = a.nc.stats["in_msgs"], a.qc.stats["in_msgs"]
    await a.publish(message("a", b"here"))
    assert taken(plain) == [b"here"]  # delivered before the publish returned
    await _until(lambda: len(shared._queue) == 1)
    await _settle()
    assert taken(shared) == [b"here"]
    assert taken(plain) == []  # once
    assert (a.nc.stats["in_msgs"] - before[0], a.qc.stats["in_msgs"] - before[1]) == (0, 1)
