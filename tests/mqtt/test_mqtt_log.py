"""What the log shows of what a client sent: never the CONNECT user name as such (a device may
put its secret there), a claimed client id only when it has the shape of one, and no line a
client could forge with a CR/LF (control characters are escaped)."""

from __future__ import annotations

import logging
from typing import Any

import paho.mqtt.client as paho
import pytest

from adapters.mqtt import MQTTAdapter
from adapters.mqtt.codec import ConnAck, Connect, PingReq, PingResp, Properties, SubAck
from core.noise import claimed_client, printable
from tests.conftest import World
from tests.mqtt.conftest import Paho, RawClient, connected, until

FORGED = "refused mqtt client=admin reason=forged: injected"


@pytest.fixture
def log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    """Everything logged, from DEBUG up, on the root logger."""
    caplog.set_level(logging.DEBUG)
    return caplog


def messages(log: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in log.records]


def refusal_lines(log: pytest.LogCaptureFixture) -> list[str]:
    return [m for m in messages(log) if m.startswith("refused mqtt")]


def assert_no_forged_line(log: pytest.LogCaptureFixture) -> None:
    """No message holds a raw CR or LF next to what the client injected."""
    for message in messages(log):
        if "forged" in message or "injected" in message:
            assert "\r" not in message and "\n" not in message, message


@pytest.mark.parametrize("protocol", [paho.MQTTv311, paho.MQTTv5], ids=["3.1.1", "5"])
async def test_secret_as_user_name_is_never_logged(
    world: World, mqtt_adapter: MQTTAdapter, raw: Any, log: pytest.LogCaptureFixture, protocol: int
) -> None:
    """A device sends its secret as the user name and a wrong password: refused (CONNACK 4 /
    0x86), logged with ``client=-``, and the secret appears nowhere in the log."""
    secret = world.publisher.secret
    client = Paho(mqtt_adapter.port, None, "leaky", protocol=protocol)
    client.client.username_pw_set(secret, "wrong password")
    client.start()
    try:
        await until(lambda: client.connack)
        assert client.connack[1] != 0  # refused
    finally:
        client.stop()
    await until(lambda: refusal_lines(log))
    assert not any(secret in m for m in messages(log))
    assert secret not in log.text
    assert refusal_lines(log) == ["refused mqtt client=- reason=bad_credentials: " + detail(log)]
    # a bystander is not disturbed
    other = await connected(raw, world.both, "other", 5)
    await other.send(PingReq())
    assert isinstance(await other.recv(), PingResp)


def detail(log: pytest.LogCaptureFixture) -> str:
    (line,) = refusal_lines(log)
    return line.split(": ", 1)[1]


async def test_claimed_client_id_is_logged(
    world: World, raw: Any, log: pytest.LogCaptureFixture
) -> None:
    """A user name with the shape of a client id (here, a real one with a wrong password) is
    worth logging: it names who is failing to connect."""
    client: RawClient = await raw(5)
    await client.send(Connect(5, True, 0, "dev", world.publisher.id, b"wrong"))
    ack = await client.recv()
    assert isinstance(ack, ConnAck) and ack.reason_code == 0x86
    await until(lambda: refusal_lines(log))
    (line,) = refusal_lines(log)
    assert line.startswith(f"refused mqtt client={world.publisher.id} reason=bad_credentials")


@pytest.mark.parametrize("level", [4, 5])
@pytest.mark.parametrize("password", [b"wrong", None, b"\xff"], ids=["bad", "none", "not-utf8"])
async def test_crlf_in_user_name_cannot_forge_a_line(
    world: World, raw: Any, log: pytest.LogCaptureFixture, level: int, password: bytes | None
) -> None:
    """A CR/LF in the user name, whatever the refusal: no log line carries it raw."""
    client: RawClient = await raw(level)
    await client.send(Connect(level, True, 0, "dev", "x\r\n" + FORGED, password))
    ack = await client.recv()
    assert isinstance(ack, ConnAck) and ack.reason_code != 0
    await until(lambda: refusal_lines(log))
    assert_no_forged_line(log)
    assert all(line.startswith("refused mqtt client=- ") for line in refusal_lines(log))


async def test_crlf_in_user_name_with_other_connect_refusals(
    world: World, raw: Any, log: pytest.LogCaptureFixture
) -> None:
    """The refusals decided before the credentials are checked (an authentication method, an
    empty client id without clean session) do not log the user name either."""
    v5: RawClient = await raw(5)
    props = Properties(authentication_method="SCRAM\r\n" + FORGED)
    await v5.send(Connect(5, True, 0, "dev", "x\r\n" + FORGED, b"pw", None, props))
    ack = await v5.recv()
    assert isinstance(ack, ConnAck) and ack.reason_code == 0x8C
    v4: RawClient = await raw(4)
    await v4.send(Connect(4, False, 0, "", "x\r\n" + FORGED, b"pw"))
    assert await v4.recv() == ConnAck(False, 2)
    await until(lambda: len(refusal_lines(log)) == 2)
    assert_no_forged_line(log)
    assert all(line.startswith("refused mqtt client=- ") for line in refusal_lines(log))


async def test_crlf_in_share_group_cannot_forge_the_subscription_closed_line(
    world: World, raw: Any, log: pytest.LogCaptureFixture
) -> None:
    """A ``$share`` group name is the client's own text and appears in log lines about the
    subscription (here: the subscription ends because the client lost its right)."""
    client = await connected(raw, world.subscriber, "sub", 5)
    ack = await client.subscribe(f"$share/g\r\n{FORGED}/m/acme/c/temps/#")
    assert isinstance(ack, SubAck) and ack.reason_codes == [0]
    await world.gateway.provisioning.disconnect("acme", world.subscriber.id, "temps")
    await until(lambda: any("subscription closed" in m for m in messages(log)))
    assert_no_forged_line(log)
    (line,) = [m for m in messages(log) if "subscription closed" in m]
    assert "g\\r\\nrefused mqtt" in line


def test_printable_and_claimed_client() -> None:
    assert printable("m/acme/c/temps/#") == "m/acme/c/temps/#"
    assert printable("a\r\nb\x1b[2J\u2028c\\n") == "a\\r\\nb\\x1b[2J\\u2028c\\n"
    assert claimed_client("0f8e5c6a-1b2c-4d3e-8f90-a1b2c3d4e5f6") == (
        "0f8e5c6a-1b2c-4d3e-8f90-a1b2c3d4e5f6"
    )
    for not_an_id in (None, "", "kitchen-1", "0F8E5C6A-1B2C-4D3E-8F90-A1B2C3D4E5F6",
                      "0f8e5c6a-1b2c-4d3e-8f90-a1b2c3d4e5f6\n", "x" * 43):  # fmt: skip
        assert claimed_client(not_an_id) is None
