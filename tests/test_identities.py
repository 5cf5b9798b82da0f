"""The authenticator as a chain of providers, identities whose rights are their own rules, and
identities that expire: cut off on every protocol when they do.

A provider that tests register stands for the token providers still to come: it resolves
tokens it issued to identities with rules and an expiry, and has no opinion on the rest.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator

import aiocoap
import aiohttp
import pytest
import websockets
from aiocoap.numbers.codes import Code

from adapters.coap import CoAPAdapter
from adapters.http import HTTPAdapter
from adapters.mqtt import MQTTAdapter
from adapters.mqtt.codec import Disconnect, Properties, Publish, ReasonCode
from adapters.ws import WSAdapter
from core.bus import Subscription
from core.credentials import Credentials, Kind
from core.errors import AuthenticationError, AuthorizationError
from core.gateway import EXPIRED
from core.identity import Identity, Rules
from core.topics import parse_filter
from tests.coap.conftest import Observer
from tests.conftest import Party, World, drain, running
from tests.mqtt.conftest import RawClient


class IssuedTokens:
    """A token provider for tests: what it issued, it knows; anything else is not its own."""

    kinds: frozenset[Kind] = frozenset({"token"})

    def __init__(self) -> None:
        self.issued: dict[str, Identity] = {}

    def issue(self, identity: Identity) -> str:
        token = f"eyJ{secrets.token_urlsafe(8)}.eyJ0ZXN0Ijp0cnVlfQ.{secrets.token_urlsafe(8)}"
        self.issued[token] = identity
        return token

    def identify_cached(self, credentials: Credentials, kind: Kind) -> Identity | None:
        return None

    async def identify(self, credentials: Credentials, kind: Kind) -> Identity | None:
        assert credentials.token is not None
        return self.issued.get(credentials.token)

    def invalidate(self) -> None:
        pass


class Certificates:
    """A certificate provider for tests: DER bytes it knows name a stored client."""

    kinds: frozenset[Kind] = frozenset({"certificate"})

    def __init__(self, known: dict[bytes, Identity]) -> None:
        self.known = known

    def identify_cached(self, credentials: Credentials, kind: Kind) -> Identity | None:
        assert credentials.certificate is not None
        return self.known.get(credentials.certificate)

    async def identify(self, credentials: Credentials, kind: Kind) -> Identity | None:
        return None


def device(world: World, expires: float | None = None) -> Identity:
    """dev-1 of acme: may publish below temps/dev-1 and subscribe there, and to temps/alerts."""
    rules = Rules(
        publish=(parse_filter("m/acme/c/temps/dev-1/#"),),
        subscribe=(parse_filter("m/acme/c/temps/dev-1/#"), parse_filter("m/acme/c/temps/alerts")),
    )
    return Identity("dev-1", "acme", "dev-1", rules, expires)


@pytest.fixture
def tokens(world: World) -> IssuedTokens:
    provider = IssuedTokens()
    world.gateway.authenticator.add(provider)
    return provider


async def test_credentials_that_name_two_clients_are_refused(world: World) -> None:
    gw = world.gateway
    publisher = await gw.authenticate(Credentials(world.publisher.secret))
    subscriber = await gw.authenticate(Credentials(world.subscriber.secret))
    gw.authenticator.add(Certificates({b"pub-cert": publisher, b"sub-cert": subscriber}))
    both = Credentials(world.publisher.secret).with_certificate(b"pub-cert")
    assert await gw.authenticate(both) == publisher
    mixed = Credentials(world.publisher.secret).with_certificate(b"sub-cert")
    with pytest.raises(AuthenticationError, match="the certificate and the secret name different"):
        await gw.authenticate(mixed)
    with pytest.raises(AuthenticationError, match="no identity provider of this gateway knows"):
        await gw.authenticate(Credentials(world.publisher.secret).with_certificate(b"other"))


async def test_a_kind_no_provider_understands_is_bad_credentials(world: World) -> None:
    from core.auth import Authenticator
    from core.auth.secrets import StoredSecrets

    secrets_only = Authenticator([StoredSecrets(world.gateway.store)])
    with pytest.raises(AuthenticationError, match="bearer tokens are not accepted"):
        await secrets_only.authenticate(Credentials(token="eyJa.b.c"))


async def test_a_provider_without_an_opinion_passes(world: World, tokens: IssuedTokens) -> None:
    with pytest.raises(AuthenticationError, match="no identity provider of this gateway knows"):
        await world.gateway.authenticate(Credentials(token="eyJnot.issued.here"))
    token = tokens.issue(device(world))
    assert (await world.gateway.authenticate(Credentials(token=token))).client_id == "dev-1"


async def test_rules_are_checked_without_the_store(world: World, watch: Subscription) -> None:
    gw = world.gateway
    dev = device(world)
    await gw.store.close()  # nothing below may need it
    await gw.authorize(dev, "m/acme/c/temps/dev-1/temp", "publish")
    for topic in ("m/acme/c/temps/dev-2/temp", "m/acme/c/temps", "m/acme/c/other/dev-1"):
        with pytest.raises(AuthorizationError):
            await gw.authorize(dev, topic, "publish")
    for allowed in ("m/acme/c/temps/dev-1/#", "m/acme/c/temps/dev-1/+/x", "m/acme/c/temps/alerts"):
        await gw.authorize(dev, allowed, "subscribe")
    for refused in ("m/acme/c/temps/#", "m/acme/c/temps/+/temp", "m/acme/c/temps/alerts/x"):
        with pytest.raises(AuthorizationError):
            await gw.authorize(dev, refused, "subscribe")
    message = gw.publish_nowait(dev, "m/acme/c/temps/dev-1/t", b"1", "text/plain", "http")
    assert message is not None and [m.payload for m in drain(watch)] == [b"1"]
    with pytest.raises(AuthorizationError):
        gw.publish_nowait(dev, "m/acme/c/temps/dev-2/t", b"1", "text/plain", "http")
    with pytest.raises(AuthorizationError, match="not in domain"):
        await gw.authorize(dev, "m/globex/c/temps/dev-1", "publish")


async def test_an_expired_identity_has_no_rights(world: World) -> None:
    dev = device(world, expires=time.time() - 1)
    with pytest.raises(AuthorizationError, match="credentials expired"):
        await world.gateway.authorize(dev, "m/acme/c/temps/dev-1/t", "publish")


@pytest.fixture
async def adapters(world: World) -> AsyncIterator[tuple[str, str, str, int]]:
    async with (
        running(HTTPAdapter(world.gateway, "127.0.0.1", 0)) as http,
        running(WSAdapter(world.gateway, "127.0.0.1", 0, dashboard=False)) as ws,
        running(CoAPAdapter(world.gateway, "127.0.0.1", 0)) as coap,
        running(MQTTAdapter(world.gateway, "127.0.0.1", 0, ws_port=None)) as mqtt,
    ):
        yield (
            f"http://127.0.0.1:{http.port}",
            f"ws://127.0.0.1:{ws.port}",
            f"coap://127.0.0.1:{coap.port}",
            mqtt.port,
        )


async def test_expiry_cuts_off_every_protocol(
    world: World, tokens: IssuedTokens, adapters: tuple[str, str, str, int]
) -> None:
    """One token, valid for a short while: an SSE stream, a WebSocket, a CoAP observation and
    MQTT 5 and 3.1.1 connections opened with it end when it expires, each in its protocol's
    idiom, with the reason; the gateway keeps nothing of them. A publish with it after that is
    refused."""
    http, ws, coap, mqtt = adapters
    expires = time.time() + 1.5
    token = tokens.issue(device(world, expires))
    bearer = {"Authorization": f"Bearer {token}"}
    mqtt5, mqtt4 = await RawClient.open(mqtt, 5), await RawClient.open(mqtt, 4)
    # MQTT 5 may send the token alone; 3.1.1 has no password without a user name: the client id.
    assert (await mqtt5.connect(None, "a", password=token.encode())).reason_code == 0
    assert (await mqtt4.connect(Party("dev-1", token), "b")).reason_code == 0
    for mqtt_client in (mqtt5, mqtt4):
        assert (await mqtt_client.subscribe("m/acme/c/temps/dev-1/#")).reason_codes == [0]
    async with aiohttp.ClientSession() as s:
        sse = await s.get(f"{http}/m/acme/c/temps/dev-1/%23",
                          headers={**bearer, "Accept": "text/event-stream"})  # fmt: skip
        assert sse.status == 200
        await sse.content.readline()
        socket = await websockets.connect(
            f"{ws}/m/acme/c/temps/dev-1/x", additional_headers=bearer
        )
        client = await aiocoap.Context.create_client_context()
        try:
            observer = Observer(client, f"{coap}/m/acme/c/temps/dev-1/x?auth={token}")
            assert (await observer.first()).code == Code.CONTENT
            # While valid: a publish with the token arrives at all three.
            async with s.post(f"{http}/m/acme/c/temps/dev-1/x", data=b"before",
                              headers=bearer) as r:  # fmt: skip
                assert r.status == 202
            assert await asyncio.wait_for(socket.recv(), 10) == b"before"
            assert (await observer.next()).payload == b"before"
            for mqtt_client in (mqtt5, mqtt4):
                assert (await mqtt_client.expect(Publish)).payload == b"before"
            # Then it expires.
            body = (await asyncio.wait_for(sse.content.read(), 10)).decode()
            assert body.endswith('event: close\ndata: {"reason":"credentials expired"}\n\n')
            await asyncio.wait_for(socket.wait_closed(), 10)
            assert (socket.close_code, socket.close_reason) == (1008, EXPIRED)
            last = await observer.next()
            assert (last.code, last.payload) == (Code.UNAUTHORIZED, EXPIRED.encode())
            with pytest.raises(StopAsyncIteration):
                await observer.next()
            assert await mqtt5.until_closed(10) == [
                Disconnect(ReasonCode.NOT_AUTHORIZED, Properties(reason_string=EXPIRED))
            ]
            assert await mqtt4.until_closed(10) == []  # 3.1.1 has no DISCONNECT from a server
        finally:
            await client.shutdown()
        assert time.time() >= expires
        async with s.post(f"{http}/m/acme/c/temps/dev-1/x", data=b"after", headers=bearer) as r:
            assert r.status == 403
            assert (await r.json())["detail"] == "credentials expired"
    assert world.gateway._expiries == {}  # nothing left scheduled
    assert not world.gateway._subs
