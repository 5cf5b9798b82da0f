"""The Python SDK (``sdk/python``, ``conduit_sdk``) against a real Conduit and a local identity
provider minting tokens shaped like Supabase's, Firebase's, Auth0's and a generic OIDC
issuer's: connect with each, publish and receive; renew in place across several token lifetimes
with messages flowing both ways and none lost; a revoked subject's auth error; a provider down
with its keys cached; each refusal with its stable kind and nothing connected."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from conduit_sdk import AuthError, Client, ConduitError, Message, RefusedError, TokenError, matches

from core.credentials import Credentials
from tests.sdk.conftest import Gateway, Provider

KINDS = ("supabase", "firebase", "auth0", "oidc")


class Events:
    """What a client's callbacks reported, in order."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, Any]] = []

    def callbacks(self) -> dict[str, Any]:
        async def refreshed(credentials: Any) -> None:  # an async one, as apps write them
            self.seen.append(("refreshed", credentials))

        return {
            "on_token_refreshed": refreshed,
            "on_token_expiring": lambda at: self.seen.append(("expiring", at)),
            "on_token_error": lambda error, kind: self.seen.append(("token_error", kind)),
            "on_auth_error": lambda error: self.seen.append(("auth_error", error)),
            "on_connection_status": lambda status: self.seen.append(("status", status)),
        }

    def of(self, name: str) -> list[Any]:
        return [value for what, value in self.seen if what == name]


async def next_message(messages: Any, timeout: float = 5.0) -> Message:
    return await asyncio.wait_for(messages.__anext__(), timeout)  # type: ignore[no-any-return]


async def published_by_http(gw: Gateway, topic: str, payload: bytes) -> None:
    """Publish as a provisioned client, from outside the SDK."""
    world = gw.world
    identity = await world.gateway.authenticate(Credentials(world.both.secret))
    await world.gateway.publish(identity, topic, payload, "text/plain", "http")


@pytest.mark.parametrize("kind", KINDS)
async def test_connect_publish_and_receive_with_each_provider(
    gateway: Gateway, provider: Provider, kind: str
) -> None:
    await gateway.register(provider.registration(kind))
    events = Events()
    async with Client(gateway.http, **events.callbacks()) as client:
        credentials = await client.connect_with_token(
            domain="acme", provider=kind, external_token=provider.token(kind, sub="u1")
        )
        assert credentials.username == f"{kind}:u1"
        assert credentials.rules["subscribe"] == ["m/acme/c/temps/u1/#"]
        assert client.status == "connected"
        async with client.subscribe("m/acme/c/temps/u1/#") as messages:
            await client.publish("m/acme/c/temps/u1/hello", b"from the app")
            got = await next_message(messages)
            assert (got.topic, got.payload) == ("m/acme/c/temps/u1/hello", b"from the app")
            await published_by_http(gateway, "m/acme/c/temps/u1/cmd", b"from a backend")
            assert (await next_message(messages)).payload == b"from a backend"
        # The endpoint came from the exchange's answer: this gateway serves plain MQTT.
        assert credentials.endpoints["mqtt"] == gateway.mqtt_url
    assert events.of("status") == ["connecting", "connected", "disconnected"]


async def test_renewed_in_place_across_expiries_with_nothing_lost(
    gateway: Gateway, provider: Provider
) -> None:
    """Broker tokens of 3 s, renewed at 80 %: over 9 s the one MQTT 5 connection lives
    through several of them (no reconnect), while the app publishes and a backend publishes
    to it, QoS 1 both ways: every message arrives."""
    await gateway.register({**provider.registration("supabase"), "ttl": 3})
    events = Events()
    async with Client(gateway.http, **events.callbacks()) as client:
        first = await client.connect_with_token(
            domain="acme", provider="supabase", external_token=provider.token("supabase", "u2")
        )
        assert first.expires_at - time.time() <= 3
        sent_up, sent_down = [], []

        async def app_publishes() -> None:
            for i in range(90):
                payload = f"up {i}".encode()
                await client.publish("m/acme/c/temps/u2/up", payload, qos=1)
                sent_up.append(payload)
                await asyncio.sleep(0.1)

        async def backend_publishes() -> None:
            for i in range(90):
                payload = f"down {i}".encode()
                await published_by_http(gateway, "m/acme/c/temps/u2/down", payload)
                sent_down.append(payload)
                await asyncio.sleep(0.1)

        async with client.subscribe("m/acme/c/temps/u2/#") as messages:
            await asyncio.gather(app_publishes(), backend_publishes())
            received = []
            try:
                while len(received) < 180:
                    received.append((await next_message(messages)).payload)
            except TimeoutError:
                missing = set(sent_up + sent_down) - set(received)
                raise AssertionError(f"{sorted(missing)} {events.seen}") from None
        assert sorted(received) == sorted(sent_up + sent_down)
        refreshed = events.of("refreshed")
        assert len(refreshed) >= 3
        assert all(c.password != first.password for c in refreshed)
        assert client.credentials is not None and client.credentials.expires_at > time.time()
    # One connection all along: never reconnected, no token or auth error.
    assert events.of("status") == ["connecting", "connected", "disconnected"]
    assert events.of("token_error") == [] and events.of("auth_error") == []


async def test_a_revoked_subject_is_an_auth_error_that_stops_reconnecting(
    gateway: Gateway, provider: Provider
) -> None:
    await gateway.register(provider.registration("oidc"))
    events = Events()
    client = Client(gateway.http, **events.callbacks())
    credentials = await client.connect_with_token(
        domain="acme", provider="oidc", external_token=provider.token("oidc", "u3")
    )
    async with client.subscribe("m/acme/c/temps/u3/#") as messages:
        status, _ = await gateway.call(
            "POST", "/domains/acme/revocations", {"subject": credentials.username}
        )
        assert status == 200
        with pytest.raises(AuthError) as refused:
            await next_message(messages)
    assert (refused.value.kind, refused.value.reason_code) == ("not-authorized", 0x87)
    assert refused.value.detail == "credentials revoked"
    await asyncio.sleep(0.5)
    assert client.status == "disconnected"
    assert [e.kind for e in events.of("auth_error")] == ["not-authorized"]
    assert events.of("status") == ["connecting", "connected", "disconnected"]
    with pytest.raises(ConduitError) as offline:
        await client.publish("m/acme/c/temps/u3/x", b"after")
    assert offline.value.kind == "not-connected"
    await client.disconnect()


async def test_the_provider_down_with_its_keys_cached(gateway: Gateway, provider: Provider) -> None:
    await gateway.register(provider.registration("auth0"))
    async with Client(gateway.http) as client:
        await client.connect_with_token(
            domain="acme", provider="auth0", external_token=provider.token("auth0", "u4")
        )
    provider.down = True
    async with Client(gateway.http) as client:  # the keys fetched before still verify
        await client.connect_with_token(
            domain="acme", provider="auth0", external_token=provider.token("auth0", "u5")
        )
        await client.publish("m/acme/c/temps/u5/x", b"while the provider is down")
    # A provider never reached: unavailable (503), not a bad token.
    await gateway.register(provider.registration("firebase"))
    with pytest.raises(TokenError) as unreachable:
        await Client(gateway.http).connect_with_token(
            domain="acme", provider="firebase", external_token=provider.token("firebase")
        )
    assert (unreachable.value.kind, unreachable.value.status) == ("provider-unreachable", 503)
    assert not unreachable.value.terminal


async def test_each_refusal_has_its_kind(gateway: Gateway, provider: Provider) -> None:
    await gateway.register(provider.registration("oidc"))
    await gateway.register(
        {**provider.registration("supabase"), "rules": [
            {"when": {"role": "admin"}, "subscribe": ["m/acme/c/temps/#"]}]}
    )  # fmt: skip
    other = Provider(base=provider.base)  # the same issuer, other keys: a forged token
    cases = [
        ("acme", "oidc", provider.token("oidc", ttl=-120), "token-expired", 401),
        ("acme", "oidc", other.token("oidc"), "token-invalid", 401),
        ("acme", "oidc", "not a token", "token-invalid", 401),
        ("acme", "supabase", provider.token("supabase"), "no-rule-matched", 403),
        ("acme", "nope", provider.token("oidc"), "provider-not-found", 404),
        ("globex", "oidc", provider.token("oidc"), "domain-not-found", 404),
    ]
    before = len(gateway.world.gateway._connections)
    for domain, name, token, kind, status in cases:
        events = Events()
        client = Client(gateway.http, **events.callbacks())
        with pytest.raises(TokenError) as refused:
            await client.connect_with_token(domain=domain, provider=name, external_token=token)
        assert (refused.value.kind, refused.value.status) == (kind, status), token
        assert refused.value.terminal
        assert client.status == "disconnected" and events.of("status") == []
        await client.disconnect()
    assert len(gateway.world.gateway._connections) == before  # nothing connected


@pytest.mark.parametrize("exchange_options", [{"per_address": 2}])
async def test_rate_limited_says_when_to_retry(gateway: Gateway, provider: Provider) -> None:
    await gateway.register(provider.registration("oidc"))
    for _ in range(2):
        async with Client(gateway.http) as client:
            await client.connect_with_token(
                domain="acme", provider="oidc", external_token=provider.token("oidc")
            )
    with pytest.raises(TokenError) as limited:
        await Client(gateway.http).connect_with_token(
            domain="acme", provider="oidc", external_token=provider.token("oidc")
        )
    assert (limited.value.kind, limited.value.status) == ("rate-limited", 429)
    assert limited.value.retry_after is not None and limited.value.retry_after > 0
    assert not limited.value.terminal


async def test_mqtt_over_websocket(gateway: Gateway) -> None:
    world = gateway.world
    url = f"ws://127.0.0.1:{gateway.mqtt_ws_port}/mqtt"
    async with Client(mqtt_url=url) as client:
        await client.connect_with_secret(client_id=world.both.id, secret=world.both.secret)
        async with client.subscribe("m/acme/c/temps/#") as messages:
            await client.publish(
                "m/acme/c/temps/ws", b"over a websocket", content_type="text/plain"
            )
            got = await next_message(messages)
            assert (got.payload, got.content_type) == (b"over a websocket", "text/plain")


async def test_a_bad_secret_is_refused_at_connect(gateway: Gateway) -> None:
    client = Client(mqtt_url=gateway.mqtt_url)
    with pytest.raises(AuthError) as refused:
        await client.connect_with_secret(client_id=gateway.world.both.id, secret="wrong")
    assert (refused.value.kind, refused.value.reason_code) == ("bad-credentials", 0x86)
    assert client.status == "disconnected"


async def test_with_a_secret_and_a_refused_publish_and_subscription(gateway: Gateway) -> None:
    world = gateway.world
    async with Client(mqtt_url=gateway.mqtt_url, preset="server") as client:
        await client.connect_with_secret(
            client_id=world.subscriber.id, secret=world.subscriber.secret
        )
        with pytest.raises(RefusedError) as refused:
            await client.publish("m/acme/c/temps/x", b"no right to publish")
        assert refused.value.reason_code == 0x87
        with pytest.raises(RefusedError) as refused:
            async with client.subscribe("m/acme/c/other/#"):
                pass
        assert refused.value.reason_code == 0x87
        async with client.subscribe("m/acme/c/temps/#") as messages:
            await published_by_http(gateway, "m/acme/c/temps/x", b"allowed")
            assert (await next_message(messages)).payload == b"allowed"


async def test_a_new_app_token_renews_in_place_and_sign_out_disconnects(
    gateway: Gateway, provider: Provider
) -> None:
    await gateway.register(provider.registration("firebase"))
    events = Events()
    client = Client(gateway.http, **events.callbacks())
    first = await client.connect_with_token(
        domain="acme", provider="firebase", external_token=provider.token("firebase", "u6")
    )
    await client.update_external_token(provider.token("firebase", "u6"))
    assert client.credentials is not None and client.credentials.token_id != first.token_id
    await client.publish("m/acme/c/temps/u6/x", b"still connected")
    assert events.of("status") == ["connecting", "connected"]  # renewed in place
    await client.update_external_token(None)  # signed out
    assert client.status == "disconnected"


async def test_publishes_wait_offline_and_go_on_reconnect(gateway: Gateway) -> None:
    """The MQTT listener goes away and comes back on the same port: the client reconnects with
    back-off, restores its subscription, and sends what was published meanwhile; past the
    offline queue a publish is refused at once."""
    from adapters.mqtt import MQTTAdapter
    from tests.conftest import running

    world = gateway.world
    own = MQTTAdapter(world.gateway, "127.0.0.1", 0, ws_port=None)
    await own.start()
    port = own.port
    events = Events()
    client = Client(mqtt_url=f"mqtt://127.0.0.1:{port}", backoff_initial=0.1, backoff_max=0.3,
                    offline_queue=3, **events.callbacks())  # fmt: skip
    await client.connect_with_secret(client_id=world.both.id, secret=world.both.secret)
    async with client.subscribe("m/acme/c/temps/#") as messages:
        await own.stop(1)
        await asyncio.sleep(0.3)
        assert client.status == "reconnecting"
        waiting = [asyncio.create_task(client.publish("m/acme/c/temps/q", f"{i}".encode()))
                   for i in range(3)]  # fmt: skip
        await asyncio.sleep(0.1)
        with pytest.raises(ConduitError) as full:
            await client.publish("m/acme/c/temps/q", b"one too many")
        assert full.value.kind == "offline-queue-full"
        async with running(MQTTAdapter(world.gateway, "127.0.0.1", port, ws_port=None)):
            await asyncio.wait_for(asyncio.gather(*waiting), 10)
            got = sorted([(await next_message(messages)).payload for _ in range(3)])
            assert got == [b"0", b"1", b"2"]
            await client.disconnect()
    assert events.of("status")[:3] == ["connecting", "connected", "reconnecting"]
    assert "connected" in events.of("status")[3:]


async def test_mqtt_3_renews_by_reconnecting(gateway: Gateway, provider: Provider) -> None:
    await gateway.register({**provider.registration("oidc"), "ttl": 3})
    events = Events()
    async with Client(gateway.http, mqtt_version=4, **events.callbacks()) as client:
        await client.connect_with_token(
            domain="acme", provider="oidc", external_token=provider.token("oidc", "u7")
        )
        async with client.subscribe("m/acme/c/temps/u7/#") as messages:
            await asyncio.sleep(4.5)  # past the first token's end
            await client.publish("m/acme/c/temps/u7/x", b"on new credentials")
            assert (await next_message(messages)).payload == b"on new credentials"
    assert len(events.of("refreshed")) >= 1
    assert events.of("status")[:4] == ["connecting", "connected", "reconnecting", "connected"]
    assert events.of("auth_error") == []


async def test_expiring_is_told_when_auto_refresh_is_off(
    gateway: Gateway, provider: Provider
) -> None:
    await gateway.register({**provider.registration("oidc"), "ttl": 3})
    events = Events()
    async with Client(gateway.http, auto_refresh=False, expiring_within=2.0,
                      **events.callbacks()) as client:  # fmt: skip
        first = await client.connect_with_token(
            domain="acme", provider="oidc", external_token=provider.token("oidc", "u8")
        )
        await asyncio.sleep(1.5)
        assert events.of("expiring") == [first.expires_at]
        await client.refresh()  # what the app does when told
        assert events.of("status") == ["connecting", "connected"]


def test_topic_matching() -> None:
    assert matches("m/a/c/t/#", "m/a/c/t") and matches("m/a/c/t/#", "m/a/c/t/x/y")
    assert matches("m/a/c/+/x", "m/a/c/t/x") and not matches("m/a/c/+/x", "m/a/c/t/y")
    assert matches("$share/g/m/a/c/t", "m/a/c/t") and not matches("m/a/c/t", "m/a/c/t/x")


def test_the_sdk_imports_without_the_server() -> None:
    """An app installs the SDK alone: importing it loads none of the gateway's packages."""
    code = (
        "import sys, conduit_sdk; "
        "bad = sorted({m.split('.')[0] for m in sys.modules} & "
        "{'core', 'adapters', 'conduit', 'certs'}); "
        "assert not bad, bad"
    )
    root = Path(__file__).resolve().parents[2]
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root / "sdk" / "python")


async def test_a_real_server_over_tls(provider: Provider, tmp_path: Path) -> None:
    """`conduit serve` with HTTPS and MQTTS on certificates of Conduit's own PKI tool: the SDK
    exchanges over HTTPS, takes the MQTTS endpoint from the answer, verifies the server with
    the private CA, renews in place, and receives what another protocol published."""
    import json
    import ssl

    import aiohttp

    import certs
    from tests.test_serve import start

    pki = tmp_path / "pki"
    ca = certs.create_ca()
    certs.write(pki, "ca", ca)
    certs.write(pki, "server", certs.issue_server(ca, ["localhost", "127.0.0.1"]))
    server = start(tmp_path / "data", "--tls-cert", str(pki / "server.pem"),
                   "--tls-key", str(pki / "server.key"), "--https-port", "0",
                   "--mqtts-port", "0", "--no-http-enabled")  # fmt: skip
    try:
        server.cli("domains", "create", "acme")
        config = tmp_path / "app.json"
        config.write_text(json.dumps({**provider.registration("supabase"), "ttl": 3}))
        server.cli("idps", "add", "--domain", "acme", "app", "--type", "supabase",
                   "--config", str(config))  # fmt: skip
        https = f"https://127.0.0.1:{server.ports['https']}"
        tls = ssl.create_default_context(cafile=str(pki / "ca.pem"))
        events = Events()
        async with Client(https, ssl=tls, **events.callbacks()) as client:
            creds = await client.connect_with_token(
                domain="acme", provider="app", external_token=provider.token("supabase", "u9")
            )
            assert creds.endpoints["mqtts"] == f"mqtts://127.0.0.1:{server.ports['mqtts']}"
            assert "http" not in creds.endpoints and "mqtt" in creds.endpoints
            async with client.subscribe("m/acme/c/temps/u9/#") as messages:
                await asyncio.sleep(3.5)  # renewed in place at least once
                async with aiohttp.ClientSession() as s:
                    headers = {"Authorization": f"Bearer {creds.password}"}
                    url = f"{https}/m/acme/c/temps/u9/t"
                    async with s.post(url, data=b"ignored", headers=headers, ssl=tls) as r:
                        assert r.status == 401  # the first credentials ended meanwhile
                    headers = {"Authorization": f"Bearer {client.credentials.password}"}  # type: ignore[union-attr]
                    async with s.post(url, data=b"over https", headers={
                            **headers, "Content-Type": "text/plain"}, ssl=tls) as r:  # fmt: skip
                        assert r.status == 202
                assert (await next_message(messages)).payload == b"over https"
        assert len(events.of("refreshed")) >= 1
        assert events.of("status") == ["connecting", "connected", "disconnected"]
    finally:
        server.proc.terminate()
        server.proc.wait()
