"""Persistent sessions survive the server: a real `conduit serve` killed with SIGKILL and started
again on the same data directory gives a paho client its session back (subscriptions and every
QoS 1 message queued while it was away, in order), and keeps retained messages. A clean session
leaves nothing in the session store; a publisher's PUBACK means the queued copy is stored."""

from __future__ import annotations

import os
import signal
import sqlite3
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties as PahoProperties

from tests.conftest import Party
from tests.mqtt.conftest import paho_client, until
from tests.test_serve import Server, start

N = 50


def provision(server: Server) -> Party:
    server.cli("domains", "create", "acme")
    server.cli("channels", "create", "--domain", "acme", "temps")
    dev = server.cli_json("clients", "create", "--domain", "acme", "dev")
    server.cli("connect", "--domain", "acme", "--client", "dev", "--channel", "temps")
    return Party(dev["id"], dev["secret"])  # type: ignore[index]


def persistent(protocol: int) -> dict[str, object]:
    """Connect options of a session that outlives its connection, in the protocol's idiom."""
    if protocol == paho.MQTTv311:
        return {"protocol": protocol, "clean": False}
    props = PahoProperties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 3600
    return {"protocol": protocol, "clean": False, "properties": props}


def kill(server: Server) -> None:
    if server.proc.poll() is None:
        os.kill(server.proc.pid, signal.SIGKILL)
        server.proc.wait()


@pytest.mark.parametrize("protocol", [paho.MQTTv311, paho.MQTTv5], ids=["3.1.1", "5"])
async def test_queued_messages_and_retained_survive_kill_9(tmp_path: Path, protocol: int) -> None:
    data = tmp_path / "data"
    server = start(data)
    try:
        party = provision(server)
        port = server.ports["mqtt"]
        with paho_client(port, party, "durable", **persistent(protocol)) as sub:
            await until(lambda: sub.connack)
            sub.client.subscribe("m/acme/c/temps/#", qos=1)
            await until(lambda: sub.subacks)
        # The subscriber is away; a publisher is told each message is safe (PUBACK).
        with paho_client(port, party, "pub", paho.MQTTv5) as pub:
            await until(lambda: pub.connack)
            infos = [pub.client.publish("m/acme/c/temps/n", b"%d" % i, qos=1) for i in range(N)]
            infos.append(pub.client.publish("m/acme/c/temps/status", b"on", qos=1, retain=True))
            await until(lambda: all(info.is_published() for info in infos), timeout=20)
        kill(server)  # at once: no shutdown, nothing flushed on the way out
        # Only the persistent session is in the store, with its queued messages.
        with sqlite3.connect(data / "conduit.db") as db:
            assert db.execute("SELECT count(*) FROM sessions").fetchone() == (1,)
            assert db.execute("SELECT count(*) FROM session_messages").fetchone() == (N + 1,)
        server = start(data)
        port = server.ports["mqtt"]
        with paho_client(port, party, "durable", **persistent(protocol)) as sub:
            flags, rc, _ = await until(lambda: sub.connack)
            assert rc == 0 and flags.session_present
            await until(lambda: len(sub.messages) >= N + 1, timeout=20)
            assert [(m.topic, m.payload, m.qos) for m in sub.messages] == [
                *(("m/acme/c/temps/n", b"%d" % i, 1) for i in range(N)),
                ("m/acme/c/temps/status", b"on", 1),
            ]
        # Acknowledged: nothing is left to deliver.
        with paho_client(port, party, "durable", **persistent(protocol)) as sub:
            flags, rc, _ = await until(lambda: sub.connack)
            assert flags.session_present
            # The subscription came back too: a new publish arrives without a SUBSCRIBE.
            with paho_client(port, party, "pub", paho.MQTTv5) as pub:
                await until(lambda: pub.connack)
                pub.client.publish("m/acme/c/temps/n", b"live", qos=1)
                await until(lambda: sub.messages)
            assert [m.payload for m in sub.messages] == [b"live"]
        # The retained message survived the kill as well.
        with paho_client(port, party, "fresh", paho.MQTTv5) as fresh:
            await until(lambda: fresh.connack)
            fresh.client.subscribe("m/acme/c/temps/status", qos=1)
            (retained,) = await until(lambda: fresh.messages)
            assert (retained.payload, retained.retain) == (b"on", True)
    finally:
        kill(server)


async def test_a_graceful_restart_keeps_the_session_too(tmp_path: Path) -> None:
    """SIGTERM: the server says goodbye (DISCONNECT 0x8B) and keeps the session."""
    data = tmp_path / "data"
    server = start(data)
    try:
        party = provision(server)
        with paho_client(server.ports["mqtt"], party, "durable", **persistent(paho.MQTTv5)) as sub:
            await until(lambda: sub.connack)
            sub.client.subscribe("m/acme/c/temps/#", qos=1)
            await until(lambda: sub.subacks)
            server.proc.send_signal(signal.SIGTERM)
            assert server.proc.wait(timeout=20) == 0
            assert await until(lambda: sub.disconnected) == 0x8B
        server = start(data)
        port = server.ports["mqtt"]
        with paho_client(port, party, "pub", paho.MQTTv5) as pub:
            await until(lambda: pub.connack)
            pub.client.publish("m/acme/c/temps/n", b"x", qos=1).wait_for_publish(10)
            pub.client.publish("m/acme/c/temps/n", b"while away", qos=1).wait_for_publish(10)
        with paho_client(port, party, "durable", **persistent(paho.MQTTv5)) as sub:
            flags, _, _ = await until(lambda: sub.connack)
            assert flags.session_present
            await until(lambda: len(sub.messages) >= 2)
            assert [m.payload for m in sub.messages] == [b"x", b"while away"]
    finally:
        kill(server)
