"""MQTT 5 enhanced authentication with ``CONDUIT-TOKEN``: a broker token as the CONNECT's
Authentication Data, renewed in place by AUTH (0x19) on the open connection: the connection
outlives the first token, subscriptions the new token does not allow end; every misuse refused
with the spec's reason code."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from adapters.mqtt.codec import Auth, ConnAck, Disconnect, Properties, Publish, ReasonCode
from core.credentials import Credentials
from core.gateway import EXPIRED
from core.identity import Identity
from tests.conftest import Party, World
from tests.mqtt.conftest import RawClient

METHOD = "CONDUIT-TOKEN"


async def broker_token(world: World, party: Party, ttl: int) -> bytes:
    identity: Identity = await world.gateway.authenticate(Credentials(party.secret))
    token, _ = await world.gateway.broker_token(identity, ttl)
    return token.encode()


async def connect_with_token(
    raw: Callable[..., Any], token: bytes, method: str = METHOD, **kw: Any
) -> tuple[RawClient, ConnAck]:
    client: RawClient = await raw(5)
    props = Properties(authentication_method=method, authentication_data=token)
    ack = await client.connect(None, "reauth", properties=props, **kw)
    return client, ack


async def reauth(client: RawClient, token: bytes, reason: int = 0x19, method: str = METHOD) -> None:
    props = Properties(authentication_method=method, authentication_data=token)
    await client.send(Auth(reason, props))


async def test_a_connection_renewed_in_place_outlives_its_first_token(
    world: World, raw: Callable[..., Any]
) -> None:
    first = await broker_token(world, world.both, ttl=2)
    client, ack = await connect_with_token(raw, first)
    assert ack.reason_code == 0 and ack.properties.authentication_method == METHOD
    assert (await client.subscribe("m/acme/c/temps/#", qos=0)).reason_codes == [0]
    await reauth(client, await broker_token(world, world.both, ttl=60))
    answer = await client.recv()
    assert answer == Auth(ReasonCode.SUCCESS, Properties(authentication_method=METHOD))
    await asyncio.sleep(3.0)  # past the first token's end (2 s, whole seconds)
    publisher = await world.gateway.authenticate(Credentials(world.publisher.secret))
    await world.gateway.publish(publisher, "m/acme/c/temps/t", b"still here", "text/plain", "http")
    got = await client.expect(Publish, timeout=5)
    assert got.payload == b"still here"


async def test_rights_follow_the_new_token(world: World, raw: Callable[..., Any]) -> None:
    """The client lost its subscribe right since: the new token has none, and the subscription
    made under the first ends."""
    client, _ = await connect_with_token(raw, await broker_token(world, world.both, 60))
    assert (await client.subscribe("m/acme/c/temps/#")).reason_codes == [0]
    await world.gateway.provisioning.connect("acme", world.both.id, "temps", True, False)
    await reauth(client, await broker_token(world, world.both, 60))
    assert (await client.recv()).reason_code == ReasonCode.SUCCESS  # type: ignore[union-attr]
    publisher = await world.gateway.authenticate(Credentials(world.publisher.secret))
    await world.gateway.publish(publisher, "m/acme/c/temps/t", b"not for you", "text/plain", "http")
    try:
        packet = await client.recv(timeout=1)
    except TimeoutError:
        packet = None
    assert packet is None


async def test_what_enhanced_authentication_refuses(world: World, raw: Callable[..., Any]) -> None:
    token = await broker_token(world, world.both, 60)
    _, ack = await connect_with_token(raw, token, method="SCRAM-SHA-256")
    assert ack.reason_code == ReasonCode.BAD_AUTHENTICATION_METHOD
    _, ack = await connect_with_token(raw, token, password=b"also a password")
    assert ack.reason_code == ReasonCode.BAD_AUTHENTICATION_METHOD
    _, ack = await connect_with_token(raw, world.both.secret.encode())  # a secret, not a token
    assert ack.reason_code == ReasonCode.BAD_USER_NAME_OR_PASSWORD
    assert ack.properties.reason_string == (
        "CONDUIT-TOKEN carries a broker token (a JWT) as the Authentication Data"
    )
    # On an open connection: another client's token, an invalid one, a wrong method or reason.
    other = await broker_token(world, world.publisher, 60)
    cases = [
        (other, 0x19, METHOD, ReasonCode.NOT_AUTHORIZED,
         "re-authentication with another client's token"),
        (b"eyJhbGciOiJub25lIn0.e30.", 0x19, METHOD, ReasonCode.NOT_AUTHORIZED, None),
        (token, 0x19, "OTHER", ReasonCode.PROTOCOL_ERROR, None),
        (token, 0x18, METHOD, ReasonCode.PROTOCOL_ERROR, None),
    ]  # fmt: skip
    for data, reason, method, code, detail in cases:
        client, _ = await connect_with_token(raw, token)
        await reauth(client, data, reason, method)
        [disconnect] = await client.until_closed(5)
        assert isinstance(disconnect, Disconnect) and disconnect.reason_code == code, disconnect
        if detail is not None:
            assert disconnect.properties.reason_string == detail
    # AUTH on a connection without enhanced authentication: a protocol error.
    client = await raw(5)
    assert (await client.connect(world.both)).reason_code == 0
    await reauth(client, token)
    [disconnect] = await client.until_closed(5)
    assert disconnect.reason_code == ReasonCode.PROTOCOL_ERROR  # type: ignore[union-attr]


async def test_without_renewal_the_connection_ends_at_expiry(
    world: World, raw: Callable[..., Any]
) -> None:
    client, _ = await connect_with_token(raw, await broker_token(world, world.both, 1))
    [disconnect] = await client.until_closed(5)
    assert disconnect == Disconnect(ReasonCode.NOT_AUTHORIZED, Properties(reason_string=EXPIRED))
