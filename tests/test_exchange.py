"""External identity providers and the token exchange: providers registered through the
management API (what each type derives), tokens of a local provider (its own keys, served as a
JWKS or as Google's X.509 document) exchanged at ``POST /auth/exchange`` for broker credentials
whose rights come from the claims, used on MQTT and HTTP; every refusal with its stable problem
type; keys cached, kept while the provider is down, and an unknown ``kid`` fetched again at most
once per interval; a claim that would widen a filter never does."""

from __future__ import annotations

import asyncio
import base64
import datetime
import hashlib
import hmac
import logging
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import orjson
import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from adapters.http import HTTPAdapter
from adapters.http.server import Listener
from conduit.api import ManagementAPI
from core.bus import Subscription
from core.idps import FIREBASE_KEYS, REFETCH_EVERY, Exchange, ProviderError, derive, stored
from core.limits import ListenerLimits
from core.listeners import Endpoint
from core.sealing import SealingKey
from tests.conftest import World, drain, running

KEY = "test-admin-key-" + "0" * 32
RULES = [
    {"when": {"role": "device"}, "publish": ["m/acme/c/temps/{sub}/#"],
     "subscribe": ["m/acme/c/temps/{sub}/#"]},
    {"when": {"permissions": {"contains": "alerts:read"}}, "subscribe": ["m/acme/c/temps/alerts"]},
    {"when": {"org": {"one_of": ["acme", "acme-labs"]}},
     "subscribe": ["m/acme/c/temps/{claim:org}/#"]},
]  # fmt: skip


@dataclass
class Issuer:
    """A local identity provider: its keys, served as a JWKS (and as X.509 certificates)."""

    base: str = ""
    key: rsa.RSAPrivateKey = field(default_factory=lambda: rsa.generate_private_key(65537, 2048))
    kid: str = "key-1"
    fetches: int = 0
    down: bool = False

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/.well-known/openid-configuration", self.discovery)
        app.router.add_get("/jwks", self.jwks)
        app.router.add_get("/x509", self.certificates)
        return app

    async def discovery(self, request: web.Request) -> web.Response:
        return web.json_response({"issuer": self.base, "jwks_uri": f"{self.base}/jwks"})

    async def jwks(self, request: web.Request) -> web.Response:
        self.fetches += 1
        if self.down:
            return web.Response(status=503)
        jwk = jwt.algorithms.RSAAlgorithm.to_jwk(self.key.public_key(), as_dict=True)
        return web.json_response(
            {"keys": [{**jwk, "kid": self.kid, "alg": "RS256", "use": "sig"}]},
            headers={"Cache-Control": "public, max-age=600"},
        )

    async def certificates(self, request: web.Request) -> web.Response:
        self.fetches += 1
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "securetoken")])
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(self.key.public_key()).serial_number(1)
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .sign(self.key, hashes.SHA256())
        )  # fmt: skip
        return web.json_response({self.kid: cert.public_bytes(serialization.Encoding.PEM).decode()})

    def token(self, claims: dict[str, Any], **header: Any) -> str:
        now = int(time.time())
        payload = {"iss": self.base, "aud": "conduit-app", "sub": "dev-7", "iat": now,
                   "exp": now + 600, "role": "device", **claims}  # fmt: skip
        payload = {k: v for k, v in payload.items() if v is not None}
        return jwt.encode(payload, self.key, "RS256", {"kid": self.kid, **header})


@pytest.fixture
async def issuer() -> AsyncIterator[Issuer]:
    provider = Issuer()
    runner = web.AppRunner(provider.app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    provider.base = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
    yield provider
    await runner.cleanup()


@dataclass
class Gateway:
    http: str
    api: str


@pytest.fixture
async def gateway(world: World, issuer: Issuer) -> AsyncIterator[Gateway]:
    tokens = world.gateway.tokens
    assert tokens is not None
    exchange = Exchange(
        world.gateway.store, tokens, refetch_every=1.0, sealing=world.gateway.sealing
    )
    world.gateway.on_change(exchange.changed)  # as conduit serve does: providers are kept
    app = ManagementAPI(world.gateway, KEY).app
    api = Listener(world.gateway, "api", app, Endpoint("api", "127.0.0.1", 0),
                   limits=ListenerLimits())  # fmt: skip
    await api.start()
    async with running(HTTPAdapter(world.gateway, "127.0.0.1", 0, exchange=exchange)) as http:
        yield Gateway(f"http://127.0.0.1:{http.port}", f"http://127.0.0.1:{api.port}")
    await api.stop(2)


async def call(url: str, method: str, body: Any = None, key: str | None = None) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with aiohttp.ClientSession() as s:
        async with s.request(method, url, json=body, headers=headers) as r:
            return r.status, (await r.json() if r.status != 204 else None)


async def register(gw: Gateway, body: dict[str, Any]) -> tuple[int, Any]:
    return await call(f"{gw.api}/domains/acme/idps", "POST", {"rules": RULES, **body}, KEY)


async def exchange(gw: Gateway, token: str, provider: str = "app", **more: Any) -> tuple[int, Any]:
    body = {"domain": "acme", "provider": provider, "token": token, **more}
    return await call(f"{gw.http}/auth/exchange", "POST", body)


async def test_an_oidc_token_exchanged_and_used(
    gateway: Gateway, issuer: Issuer, watch: Subscription
) -> None:
    status, shown = await register(
        gateway, {"name": "app", "type": "oidc", "issuer": issuer.base, "audience": "conduit-app"}
    )
    assert status == 201, shown
    assert (shown["issuer"], shown["audience"], shown["keys_url"]) == (
        issuer.base, "conduit-app", None,
    )  # fmt: skip
    status, creds = await exchange(gateway, issuer.token({}), ttl=120)
    assert status == 200, creds
    assert creds["username"] == "app:dev-7"
    assert creds["rules"] == {"publish": ["m/acme/c/temps/dev-7/#"],
                              "subscribe": ["m/acme/c/temps/dev-7/#"]}  # fmt: skip
    now = time.time()
    assert now + 110 < creds["expires_at"] <= now + 121
    assert creds["refresh_at"] < creds["expires_at"]
    bearer = {"Authorization": f"Bearer {creds['password']}", "Content-Type": "text/plain"}
    async with aiohttp.ClientSession() as s:
        async with s.post(
            f"{gateway.http}/m/acme/c/temps/dev-7/t", data=b"ok", headers=bearer
        ) as r:
            assert r.status == 202
        async with s.post(
            f"{gateway.http}/m/acme/c/temps/dev-8/t", data=b"no", headers=bearer
        ) as r:
            assert r.status == 403
    assert [m.payload for m in drain(watch)] == [b"ok"]
    # Keys fetched once (discovery, then the JWKS), then cached.
    assert (await exchange(gateway, issuer.token({})))[0] == 200
    assert issuer.fetches == 1


@pytest.mark.parametrize(
    ("claims", "rules"),
    [
        ({"role": "viewer", "permissions": ["alerts:read"]},
         {"publish": [], "subscribe": ["m/acme/c/temps/alerts"]}),
        ({"role": "viewer", "permissions": "profile alerts:read"},
         {"publish": [], "subscribe": ["m/acme/c/temps/alerts"]}),
        ({"role": "viewer", "org": "acme-labs"},
         {"publish": [], "subscribe": ["m/acme/c/temps/acme-labs/#"]}),
    ],
    ids=["contains in a list", "contains in a string", "one of"],
)  # fmt: skip
async def test_conditions_on_claims(
    gateway: Gateway, issuer: Issuer, claims: dict[str, Any], rules: dict[str, Any]
) -> None:
    await register(gateway, {"name": "app", "type": "oidc", "issuer": issuer.base,
                             "audience": "conduit-app"})  # fmt: skip
    status, creds = await exchange(gateway, issuer.token(claims))
    assert status == 200 and creds["rules"] == rules


@pytest.mark.parametrize("sub", ["a/b", "+", "#", "x\nq", "dev\x00", "\u200b"])
async def test_a_claim_that_would_widen_a_filter_never_does(
    gateway: Gateway, issuer: Issuer, sub: str
) -> None:
    """The device rule does not apply (its placeholder would change the filter); no other rule
    matches: 403 with its type."""
    await register(gateway, {"name": "app", "type": "oidc", "issuer": issuer.base,
                             "audience": "conduit-app"})  # fmt: skip
    status, problem = await exchange(gateway, issuer.token({"sub": sub}))
    assert (status, problem["type"]) == (403, "urn:conduit:exchange:no-rule-matched")
    assert problem["detail"] == "no rule of provider 'app' matches this token's claims"


async def test_every_refusal_has_its_type(gateway: Gateway, issuer: Issuer) -> None:
    await register(gateway, {"name": "app", "type": "oidc", "issuer": issuer.base,
                             "audience": "conduit-app"})  # fmt: skip
    other = rsa.generate_private_key(65537, 2048)
    now = int(time.time())
    forged = jwt.encode({"iss": issuer.base, "aud": "conduit-app", "sub": "x", "exp": now + 60,
                         "role": "device"}, other, "RS256", {"kid": issuer.kid})  # fmt: skip
    claims = {"iss": issuer.base, "aud": "conduit-app", "sub": "x", "exp": now + 60}
    hs256 = jwt.encode(claims, "a-shared-secret-of-enough-length", "HS256", {"kid": issuer.kid})
    cases = [
        ({"provider": "nope"}, issuer.token({}), 404, "provider-not-found"),
        ({"domain": "nope"}, issuer.token({}), 404, "domain-not-found"),
        ({}, issuer.token({"exp": now - 120}), 401, "token-expired"),
        ({}, issuer.token({"exp": None}), 401, "token-invalid"),
        ({}, issuer.token({"aud": "another-app"}), 401, "token-invalid"),
        ({}, issuer.token({"iss": "https://elsewhere"}), 401, "token-invalid"),
        ({}, forged, 401, "token-invalid"),
        ({}, hs256, 401, "token-invalid"),
        ({}, "not-a-jwt", 401, "token-invalid"),
        ({}, issuer.token({"role": "nobody"}), 403, "no-rule-matched"),
        ({"ttl": 10**6}, issuer.token({}), 400, "invalid-request"),
    ]
    for more, token, status, kind in cases:
        got, problem = await exchange(gateway, token, **more)
        assert (got, problem["type"]) == (status, f"urn:conduit:exchange:{kind}"), (kind, problem)
    # Disabled: its tokens are refused.
    status, _ = await call(f"{gateway.api}/domains/acme/idps/app", "PATCH", {"enabled": False},
                           KEY)  # fmt: skip
    assert status == 200
    got, problem = await exchange(gateway, issuer.token({}))
    assert (got, problem["detail"]) == (401, "provider 'app' is disabled")


async def test_keys_kept_while_down_and_unknown_kids_fetched_at_most_once(
    gateway: Gateway, issuer: Issuer
) -> None:
    await register(gateway, {"name": "app", "type": "oidc", "issuer": issuer.base,
                             "audience": "conduit-app",
                             "keys_url": f"{issuer.base}/jwks"})  # fmt: skip
    assert (await exchange(gateway, issuer.token({})))[0] == 200
    assert issuer.fetches == 1
    issuer.down = True
    assert (await exchange(gateway, issuer.token({})))[0] == 200  # the key kept
    # A stream of unknown key ids right after a fetch: none fetched again (the interval is 1 s
    # here, 30 s by default); one second later, one fetch for the five.
    for i in range(5):
        got, problem = await exchange(gateway, issuer.token({}, kid=f"unknown-{i}"))
        assert (got, problem["type"]) == (401, "urn:conduit:exchange:token-invalid")
    assert issuer.fetches == 1
    await asyncio.sleep(1.1)
    for i in range(5):
        got, problem = await exchange(gateway, issuer.token({}, kid=f"unknown-{i}"))
        assert (got, problem["type"]) == (401, "urn:conduit:exchange:token-invalid")
    assert issuer.fetches == 2
    assert REFETCH_EVERY == 30
    # Still down: the key it had still verifies.
    assert (await exchange(gateway, issuer.token({})))[0] == 200


async def test_a_provider_that_cannot_be_reached_is_503(gateway: Gateway, issuer: Issuer) -> None:
    await register(gateway, {"name": "gone", "type": "oidc", "issuer": "http://127.0.0.1:9",
                             "audience": "conduit-app"})  # fmt: skip
    got, problem = await exchange(gateway, issuer.token({}), provider="gone")
    assert (got, problem["type"]) == (503, "urn:conduit:exchange:provider-unreachable")


async def test_firebase_keys_from_google_s_certificate_document(
    gateway: Gateway, issuer: Issuer
) -> None:
    status, shown = await register(gateway, {
        "name": "fb", "type": "firebase", "project_id": "my-proj",
        "keys_url": f"{issuer.base}/x509",
    })  # fmt: skip
    assert status == 201 and shown["issuer"] == "https://securetoken.google.com/my-proj"
    token = issuer.token({"iss": "https://securetoken.google.com/my-proj", "aud": "my-proj"})
    status, creds = await exchange(gateway, token, provider="fb")
    assert status == 200 and creds["username"] == "fb:dev-7"


def test_what_each_type_derives() -> None:
    rules = [{"when": {}, "subscribe": ["m/acme/c/temps/#"]}]
    supa = derive("acme", "s", "supabase", {"url": "https://abc.supabase.co/", "rules": rules})
    assert (supa.issuer, supa.audience, supa.keys_url, supa.algorithms) == (
        "https://abc.supabase.co/auth/v1", "authenticated",
        "https://abc.supabase.co/auth/v1/.well-known/jwks.json", ("ES256", "RS256"),
    )  # fmt: skip
    fire = derive("acme", "f", "firebase", {"project_id": "p1", "rules": rules})
    assert (fire.issuer, fire.audience, fire.keys_url, fire.algorithms) == (
        "https://securetoken.google.com/p1", "p1", FIREBASE_KEYS, ("RS256",),
    )  # fmt: skip
    auth0 = derive("acme", "a", "auth0", {"tenant": "acme.eu.auth0.com", "audience": "api://x",
                                           "rules": rules})  # fmt: skip
    assert (auth0.issuer, auth0.keys_url) == (
        "https://acme.eu.auth0.com/", "https://acme.eu.auth0.com/.well-known/jwks.json",
    )  # fmt: skip
    refusals = [
        ("oidc", {"issuer": "http://example.com", "audience": "a", "rules": rules},
         "'http://example.com' is not an https URL (plain http only on a loopback address)"),
        ("oidc", {"issuer": "https://x", "rules": rules},
         "type oidc needs 'audience' (a string)"),
        ("auth0", {"tenant": "t", "audience": "a", "rules": rules, "algorithms": ["HS256"]},
         "'algorithms' is a list of RS256, RS384, RS512, PS256, PS384, PS512, ES256, ES384, "
         "ES512, EdDSA"),
        ("firebase", {"project_id": "p", "rules": [{"when": {}, "publish": ["m/globex/c/x"]}]},
         "rule 0: 'm/globex/c/x' is not in domain 'acme'"),
        ("firebase", {"project_id": "p", "rules": []},
         "'rules' is a non-empty list of {when, publish, subscribe}"),
        ("ldap", {"rules": rules}, "type 'ldap' is one of supabase, firebase, auth0, oidc"),
    ]  # fmt: skip
    for type_, config, message in refusals:
        with pytest.raises(ProviderError) as error:
            derive("acme", "x", type_, config)
        assert str(error.value) == message


async def test_providers_through_the_management_api(gateway: Gateway, issuer: Issuer) -> None:
    base = f"{gateway.api}/domains/acme/idps"
    bad = {"name": "bad", "type": "oidc", "issuer": "http://example.com", "audience": "a"}
    status, problem = await register(gateway, bad)
    assert status == 400 and "not an https URL" in problem["detail"]
    await register(gateway, {"name": "app", "type": "oidc", "issuer": issuer.base,
                             "audience": "conduit-app"})  # fmt: skip
    assert (await register(gateway, {"name": "app", "type": "oidc", "issuer": issuer.base,
                                     "audience": "x"}))[0] == 409  # fmt: skip
    status, listed = await call(base, "GET", key=KEY)
    assert status == 200 and [p["name"] for p in listed] == ["app"]
    status, changed = await call(f"{base}/app", "PATCH", {"audience": "other", "ttl": 60}, KEY)
    assert status == 200 and (changed["audience"], changed["ttl"]) == ("other", 60)
    assert await call(f"{base}/app", "DELETE", key=KEY) == (204, None)
    assert (await call(f"{base}/app", "GET", key=KEY))[0] == 404


def test_conduit_idps_commands(tmp_path: Path) -> None:
    import json

    from tests.test_serve import start

    server = start(tmp_path / "data")
    try:
        server.cli("domains", "create", "acme")
        config = tmp_path / "supabase.json"
        config.write_text(json.dumps({"url": "https://abc.supabase.co", "rules": RULES}))
        added = server.cli("idps", "add", "--domain", "acme", "app", "--type", "supabase",
                           "--config", str(config), "--json")  # fmt: skip
        shown = json.loads(added.stdout)
        assert shown["issuer"] == "https://abc.supabase.co/auth/v1"
        assert shown["audience"] == "authenticated"
        config.write_text(json.dumps({"ttl": 120}))
        server.cli("idps", "update", "--domain", "acme", "app", "--config", str(config))
        listed = json.loads(server.cli("idps", "list", "--domain", "acme", "--json").stdout)
        assert [(p["name"], p["ttl"]) for p in listed] == [("app", 120)]
        server.cli("idps", "remove", "--domain", "acme", "app")
        missing = server.cli("idps", "show", "--domain", "acme", "app", check=False)
        assert (
            missing.returncode == 1 and "404: no provider 'app' in domain 'acme'" in missing.stderr
        )
    finally:
        server.proc.terminate()
        server.proc.wait()


async def test_refresh_and_its_limits(
    gateway: Gateway, issuer: Issuer, monkeypatch: pytest.MonkeyPatch
) -> None:
    await register(gateway, {"name": "app", "type": "oidc", "issuer": issuer.base,
                             "audience": "conduit-app", "max_ttl": 3600,
                             "max_session": 7200})  # fmt: skip
    _, creds = await exchange(gateway, issuer.token({}))
    refresh = f"{gateway.http}/auth/refresh"
    status, fresh = await call(refresh, "POST", {"token_id": creds["token_id"],
                                                 "password": creds["password"]})  # fmt: skip
    assert status == 200, fresh
    assert (fresh["token_id"], fresh["username"], fresh["rules"]) == (
        creds["token_id"], creds["username"], creds["rules"],
    )  # fmt: skip
    assert fresh["password"] != creds["password"]
    # The refreshed password works, and refreshes again.
    status, _ = await call(refresh, "POST", {"token_id": fresh["token_id"],
                                             "password": fresh["password"]})  # fmt: skip
    assert status == 200
    # Another exchange's id; not a password of ours.
    status, problem = await call(refresh, "POST", {"token_id": "other",
                                                   "password": fresh["password"]})  # fmt: skip
    assert (status, problem["type"]) == (401, "urn:conduit:exchange:token-invalid")
    status, problem = await call(refresh, "POST", {"token_id": "x", "password": "eyJ.x.y"})
    assert (status, problem["type"]) == (401, "urn:conduit:exchange:token-invalid")
    # Past the provider's max_session (the clock of core.idps moved two hours on).
    import core.idps

    class Later:
        monotonic = staticmethod(time.monotonic)

        @staticmethod
        def time() -> float:
            return time.time() + 7201

    monkeypatch.setattr(core.idps, "time", Later)
    status, problem = await call(refresh, "POST", {"token_id": fresh["token_id"],
                                                   "password": fresh["password"]})  # fmt: skip
    assert (status, problem["type"]) == (401, "urn:conduit:exchange:session-ended")
    monkeypatch.undo()
    # A disabled provider refreshes nothing.
    await call(f"{gateway.api}/domains/acme/idps/app", "PATCH", {"enabled": False}, KEY)
    status, problem = await call(refresh, "POST", {"token_id": fresh["token_id"],
                                                   "password": fresh["password"]})  # fmt: skip
    assert (status, problem["detail"]) == (401, "provider 'app' is disabled")


async def test_a_revoked_subject_is_cut_off_everywhere(
    gateway: Gateway, issuer: Issuer, world: World
) -> None:
    """Its open MQTT connection ends (0x87, credentials revoked), its credentials are not
    refreshed and no longer authenticate; a new sign-in (a token issued later) works again."""
    from adapters.mqtt import MQTTAdapter
    from adapters.mqtt.codec import Disconnect, Properties, ReasonCode
    from core.gateway import SUBJECT_REVOKED
    from tests.mqtt.conftest import RawClient

    await register(gateway, {"name": "app", "type": "oidc", "issuer": issuer.base,
                             "audience": "conduit-app"})  # fmt: skip
    _, creds = await exchange(gateway, issuer.token({}))
    async with running(MQTTAdapter(world.gateway, "127.0.0.1", 0, ws_port=None)) as mqtt:
        client = await RawClient.open(mqtt.port, 5)
        ack = await client.connect(None, "dev", password=creds["password"].encode())
        assert ack.reason_code == 0
        status, revoked = await call(f"{gateway.api}/domains/acme/revocations", "POST",
                                     {"subject": "app:dev-7"}, KEY)  # fmt: skip
        assert status == 200 and revoked["subject"] == "app:dev-7"
        assert await client.until_closed(5) == [
            Disconnect(ReasonCode.NOT_AUTHORIZED, Properties(reason_string=SUBJECT_REVOKED))
        ]
        again = await RawClient.open(mqtt.port, 5)
        refused = await again.connect(None, "dev", password=creds["password"].encode())
        assert refused.reason_code == ReasonCode.BAD_USER_NAME_OR_PASSWORD
        await again.close()
    body = {"token_id": creds["token_id"], "password": creds["password"]}
    status, problem = await call(f"{gateway.http}/auth/refresh", "POST", body)
    assert (status, problem["type"]) == (401, "urn:conduit:exchange:subject-revoked")
    await asyncio.sleep(1.1)  # a token issued in a later second than the revocation
    status, fresh = await exchange(gateway, issuer.token({}))
    assert status == 200
    bearer = {"Authorization": f"Bearer {fresh['password']}", "Content-Type": "text/plain"}
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{gateway.http}/m/acme/c/temps/dev-7/t", data=b"x", headers=bearer) as r:
            assert r.status == 202


async def test_exchanges_are_rate_limited(world: World, issuer: Issuer, gateway: Gateway) -> None:
    """Two a minute from one address here: the third is 429 with Retry-After, before the
    token is even looked at."""
    tokens = world.gateway.tokens
    assert tokens is not None
    limited = Exchange(world.gateway.store, tokens, per_address=2)
    await register(gateway, {"name": "app", "type": "oidc", "issuer": issuer.base,
                             "audience": "conduit-app"})  # fmt: skip
    async with running(HTTPAdapter(world.gateway, "127.0.0.1", 0, exchange=limited)) as http:
        url = f"http://127.0.0.1:{http.port}/auth/exchange"
        body = {"domain": "acme", "provider": "app", "token": issuer.token({})}
        async with aiohttp.ClientSession() as s:
            for _ in range(2):
                async with s.post(url, json=body) as r:
                    assert r.status == 200
            async with s.post(url, json={**body, "token": "not even a token"}) as r:
                problem = await r.json()
                assert (r.status, problem["type"]) == (429, "urn:conduit:exchange:rate-limited")
                assert problem["detail"] == "more than 2 token exchanges a minute from this address"
                assert 1 <= int(r.headers["Retry-After"]) <= 30


async def test_a_real_server_answers_with_its_endpoints(issuer: Issuer, tmp_path: Path) -> None:
    """`conduit serve`: the exchange's answer lists the URLs of its listeners, on the host the
    client asked, and its MQTT URL takes the credentials."""
    import json

    from tests.test_serve import start

    server = start(tmp_path / "data")
    try:
        server.cli("domains", "create", "acme")
        config = tmp_path / "app.json"
        config.write_text(json.dumps({"issuer": issuer.base, "audience": "conduit-app",
                                      "rules": RULES}))  # fmt: skip
        server.cli("idps", "add", "--domain", "acme", "app", "--type", "oidc",
                   "--config", str(config))  # fmt: skip
        http = f"http://127.0.0.1:{server.ports['http']}"
        body = {"domain": "acme", "provider": "app", "token": issuer.token({})}
        status, creds = await call(f"{http}/auth/exchange", "POST", body)
        assert status == 200, creds
        ports = server.ports
        assert creds["endpoints"] == {
            "http": f"http://127.0.0.1:{ports['http']}",
            "ws": f"ws://127.0.0.1:{ports['ws']}",
            "coap": f"coap://127.0.0.1:{ports['coap']}",
            "mqtt": f"mqtt://127.0.0.1:{ports['mqtt']}",
            "mqtt-ws": f"ws://127.0.0.1:{ports['mqtt-ws']}/mqtt",
        }
        from tests.mqtt.conftest import RawClient

        client = await RawClient.open(ports["mqtt"], 5)
        ack = await client.connect(None, "dev", password=creds["password"].encode())
        assert ack.reason_code == 0
        await client.close()
    finally:
        server.proc.terminate()
        server.proc.wait()


async def test_cors_for_the_origins_a_domain_allows(gateway: Gateway, issuer: Issuer) -> None:
    status, shown = await register(gateway, {"name": "app", "type": "oidc", "issuer": issuer.base,
                                             "audience": "conduit-app",
                                             "cors_origins": ["https://app.example"]})  # fmt: skip
    assert status == 201 and shown["cors_origins"] == ["https://app.example"]
    url = f"{gateway.http}/auth/exchange"
    ask = {
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type",
    }
    async with aiohttp.ClientSession() as s:
        async with s.options(url, headers={**ask, "Origin": "https://app.example"}) as r:
            assert r.status == 204
            assert r.headers["Access-Control-Allow-Origin"] == "https://app.example"
            assert r.headers["Access-Control-Allow-Methods"] == "POST"
            assert r.headers["Access-Control-Allow-Headers"] == "Content-Type"
        async with s.options(url, headers={**ask, "Origin": "https://evil.example"}) as r:
            assert r.status == 403 and "Access-Control-Allow-Origin" not in r.headers
        body = {"domain": "acme", "provider": "app", "token": issuer.token({})}
        async with s.post(url, json=body, headers={"Origin": "https://app.example"}) as r:
            assert r.status == 200
            assert r.headers["Access-Control-Allow-Origin"] == "https://app.example"
        async with s.post(url, json=body, headers={"Origin": "https://evil.example"}) as r:
            assert "Access-Control-Allow-Origin" not in r.headers
    bad = {"name": "x", "type": "oidc", "issuer": issuer.base, "audience": "a",
           "cors_origins": ["https://app.example/path"]}  # fmt: skip
    status, problem = await register(gateway, bad)
    assert (status, problem["detail"]) == (
        400,
        "'cors_origins' is a list of origins: scheme://host[:port]",
    )


async def test_a_token_tested_through_the_management_api(gateway: Gateway, issuer: Issuer) -> None:
    await register(gateway, {"name": "app", "type": "oidc", "issuer": issuer.base,
                             "audience": "conduit-app"})  # fmt: skip
    url = f"{gateway.api}/domains/acme/idps/app/test"
    status, seen = await call(url, "POST", {"token": issuer.token({})}, KEY)
    assert status == 200 and seen["username"] == "app:dev-7"
    assert seen["claims"]["sub"] == "dev-7" and seen["rules"]["publish"] == [
        "m/acme/c/temps/dev-7/#"
    ]
    status, problem = await call(url, "POST", {"token": issuer.token({"role": "x"})}, KEY)
    assert (status, problem["detail"]) == (
        403,
        "no rule of provider 'app' matches this token's claims",
    )
    status, problem = await call(url, "POST", {"token": issuer.token({"aud": "x"})}, KEY)
    assert status == 401


async def test_a_client_s_own_broker_tokens_can_be_revoked(gateway: Gateway, world: World) -> None:
    async with aiohttp.ClientSession() as s:
        headers = {"Authorization": f"Client {world.both.secret}"}
        async with s.post(f"{gateway.http}/clients/tokens", headers=headers) as r:
            token = (await r.json())["token"]
        bearer = {"Authorization": f"Bearer {token}", "Content-Type": "text/plain"}
        async with s.post(f"{gateway.http}/m/acme/c/temps/t", data=b"x", headers=bearer) as r:
            assert r.status == 202
        status, _ = await call(f"{gateway.api}/domains/acme/revocations", "POST",
                               {"subject": world.both.id}, KEY)  # fmt: skip
        assert status == 200
        async with s.post(f"{gateway.http}/m/acme/c/temps/t", data=b"x", headers=bearer) as r:
            assert (r.status, (await r.json())["detail"]) == (
                401,
                "the token's subject was revoked",
            )
        # The secret still works: it was the tokens that were revoked, not the client.
        headers = {"Authorization": f"Client {world.both.secret}", "Content-Type": "text/plain"}
        async with s.post(f"{gateway.http}/m/acme/c/temps/t", data=b"x", headers=headers) as r:
            assert r.status == 202


# --- Supabase's legacy shared secret (HS256) ----------------------------------------------------


def supabase_token(url: str, secret: str, **claims: Any) -> str:
    """A Supabase access token signed with the project's legacy JWT secret."""
    now = int(time.time())
    payload = {"iss": f"{url}/auth/v1", "aud": "authenticated", "sub": "dev-7", "iat": now,
               "exp": now + 600, "role": "device", **claims}  # fmt: skip
    return jwt.encode(payload, secret, "HS256")


async def test_supabase_s_legacy_jwt_secret(
    gateway: Gateway, issuer: Issuer, world: World, watch: Subscription, tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    """HS256 tokens verified with the secret, never fetching keys (the project URL is the local
    issuer's, which has no Supabase key set: a fetch would be a 503); the secret stored only
    sealed, bound to its provider, never shown nor logged; PATCH replaces or removes it."""
    caplog.set_level(logging.DEBUG)
    url, secret = issuer.base, secrets.token_urlsafe(32)  # 43 characters, as Supabase's 40+
    base = f"{gateway.api}/domains/acme/idps"
    status, shown = await register(gateway, {"name": "app", "type": "supabase", "url": url,
                                             "jwt_secret": secret})  # fmt: skip
    assert status == 201, shown
    assert (shown["jwt_secret"], shown["algorithms"], shown["keys_url"], shown["issuer"]) == (
        "set", ["HS256"], None, f"{url}/auth/v1",
    )  # fmt: skip
    # Stored sealed: not in the row, nor anywhere in the database files; it opens only for
    # this provider.
    _, config = await world.gateway.store.get_idp("acme", "app")
    assert "jwt_secret" not in config and secret not in str(config)
    sealed = base64.b64decode(config["jwt_secret_sealed"])
    sealing = world.gateway.sealing
    assert sealing is not None
    assert sealing.open(sealed, "idp-secret:acme/app") == secret.encode()
    files = [f.read_bytes() for f in tmp_path.glob("conduit.db*")]  # noqa: ASYNC240
    assert files and not any(secret.encode() in data for data in files)
    # Shown as set, never as the value nor the sealed form.
    for got in (await call(f"{base}/app", "GET", key=KEY), await call(base, "GET", key=KEY)):
        assert got[0] == 200 and "set" in str(got[1])
        assert secret not in str(got[1]) and config["jwt_secret_sealed"] not in str(got[1])

    status, creds = await exchange(gateway, supabase_token(url, secret))
    assert status == 200, creds
    assert creds["username"] == "app:dev-7"
    bearer = {"Authorization": f"Bearer {creds['password']}", "Content-Type": "text/plain"}
    async with aiohttp.ClientSession() as s:
        async with s.post(
            f"{gateway.http}/m/acme/c/temps/dev-7/t", data=b"ok", headers=bearer
        ) as r:
            assert r.status == 202
    assert [m.payload for m in drain(watch)] == [b"ok"]

    other = secrets.token_urlsafe(32)
    rs256 = issuer.token({"iss": f"{url}/auth/v1", "aud": "authenticated"})
    for token, detail in [
        (supabase_token(url, other), "the token is not valid: Signature verification failed"),
        (rs256, "the token's algorithm is not one of HS256"),
        (supabase_token(url, secret, aud="anon"), "the token is not valid: Audience doesn't match"),
        (supabase_token(url, secret, exp=int(time.time()) - 120), "the token has expired"),
    ]:
        got, problem = await exchange(gateway, token)
        kind = "token-expired" if "expired" in detail else "token-invalid"
        assert (got, problem["type"], problem["detail"]) == (
            401, f"urn:conduit:exchange:{kind}", detail,
        )  # fmt: skip
    assert issuer.fetches == 0
    assert drain(watch) == []

    # Rotated: the old secret's tokens are refused, the new one's exchanged.
    new = secrets.token_urlsafe(32)
    status, shown = await call(f"{base}/app", "PATCH", {"jwt_secret": new}, KEY)
    assert status == 200 and shown["jwt_secret"] == "set" and new not in str(shown)
    _, changed = await world.gateway.store.get_idp("acme", "app")
    assert changed["jwt_secret_sealed"] != config["jwt_secret_sealed"]
    got, problem = await exchange(gateway, supabase_token(url, secret))
    assert (got, problem["type"]) == (401, "urn:conduit:exchange:token-invalid")
    assert (await exchange(gateway, supabase_token(url, new)))[0] == 200
    # Other changes keep it.
    status, shown = await call(f"{base}/app", "PATCH", {"ttl": 120}, KEY)
    assert status == 200 and shown["jwt_secret"] == "set"
    assert (await exchange(gateway, supabase_token(url, new)))[0] == 200

    # Removed (with the project's key set given): HS256 is refused before any key is fetched;
    # the project's asymmetric tokens are exchanged.
    status, shown = await call(f"{base}/app", "PATCH",
                               {"jwt_secret": None, "keys_url": f"{url}/jwks"}, KEY)  # fmt: skip
    assert status == 200 and "jwt_secret" not in shown
    assert shown["algorithms"] == ["ES256", "RS256"]
    _, config = await world.gateway.store.get_idp("acme", "app")
    assert "jwt_secret_sealed" not in config
    got, problem = await exchange(gateway, supabase_token(url, new))
    assert (got, problem["type"], problem["detail"]) == (
        401, "urn:conduit:exchange:token-invalid",
        "the token's algorithm is not one of ES256, RS256",
    )  # fmt: skip
    assert issuer.fetches == 0
    assert (await exchange(gateway, rs256))[0] == 200
    assert drain(watch) == []
    for value in (secret, new):
        assert value not in caplog.text


async def test_a_sealed_secret_opens_only_for_its_provider(gateway: Gateway, world: World) -> None:
    """A sealed secret copied onto another provider's row does not open: that provider is
    misconfigured (503), its tokens verified with nothing."""
    url, secret = "https://abcd.supabase.co", secrets.token_urlsafe(32)
    await register(gateway, {"name": "app", "type": "supabase", "url": url, "jwt_secret": secret})
    type_, config = await world.gateway.store.get_idp("acme", "app")
    await world.gateway.store.put_idp("acme", "copy", type_, config, create=True)
    got, problem = await exchange(gateway, supabase_token(url, secret), provider="copy")
    assert (got, problem["type"]) == (503, "urn:conduit:exchange:provider-misconfigured")
    assert problem["detail"].startswith("provider 'copy': idp-secret:acme/copy: the sealed value")
    assert secret not in problem["detail"]
    status, problem = await call(f"{gateway.api}/domains/acme/idps/copy/test", "POST",
                                 {"token": supabase_token(url, secret)}, KEY)  # fmt: skip
    assert (status, problem["title"]) == (503, "Provider misconfigured")
    assert (await exchange(gateway, supabase_token(url, secret)))[0] == 200


async def test_jwt_secret_refusals(gateway: Gateway, world: World) -> None:
    """Each with its 400 and why; nothing registered."""
    url, secret = "https://abcd.supabase.co", secrets.token_urlsafe(32)
    supa = {"name": "app", "type": "supabase", "url": url}
    for body, detail in [
        ({**supa, "jwt_secret": "x" * 31},
         "'jwt_secret' is a string of at least 32 characters (the project's legacy JWT secret)"),
        ({**supa, "jwt_secret": 12345678901234567890123456789012345},
         "'jwt_secret' is a string of at least 32 characters (the project's legacy JWT secret)"),
        ({"name": "app", "type": "oidc", "issuer": url, "audience": "a", "jwt_secret": secret},
         "'jwt_secret' is for type supabase only (its legacy HS256 secret)"),
        ({"name": "app", "type": "firebase", "project_id": "p", "jwt_secret": secret},
         "'jwt_secret' is for type supabase only (its legacy HS256 secret)"),
        ({**supa, "jwt_secret": secret, "algorithms": ["HS256", "RS256"]},
         "with 'jwt_secret', 'algorithms' is [\"HS256\"]: a shared secret never goes with"
         " asymmetric algorithms"),
        ({**supa, "jwt_secret": secret, "keys_url": f"{url}/jwks"},
         "a provider with 'jwt_secret' fetches no keys: drop 'keys_url'"),
        ({**supa, "algorithms": ["HS256"]},
         "'algorithms' is a list of RS256, RS384, RS512, PS256, PS384, PS512, ES256, ES384, "
         "ES512, EdDSA"),
        ({**supa, "jwt_secret_sealed": base64.b64encode(b"x" * 40).decode()},
         "'jwt_secret_sealed' is Conduit's own: give 'jwt_secret'"),
    ]:  # fmt: skip
        status, problem = await register(gateway, body)
        assert (status, problem["type"], problem["detail"]) == (400, "about:blank", detail)
        assert secret not in str(problem)
    assert await world.gateway.store.list_idps("acme") == []
    # Changes are checked the same way: a short one, or a type that cannot have one.
    base = f"{gateway.api}/domains/acme/idps/app"
    assert (await register(gateway, {**supa, "jwt_secret": secret}))[0] == 201
    _, before = await world.gateway.store.get_idp("acme", "app")
    for change, detail in [
        ({"jwt_secret": "short"},
         "'jwt_secret' is a string of at least 32 characters (the project's legacy JWT secret)"),
        ({"type": "oidc", "issuer": url, "audience": "a"},
         "'jwt_secret' is for type supabase only (its legacy HS256 secret)"),
        ({"algorithms": ["ES256"]},
         "with 'jwt_secret', 'algorithms' is [\"HS256\"]: a shared secret never goes with"
         " asymmetric algorithms"),
    ]:  # fmt: skip
        status, problem = await call(base, "PATCH", change, KEY)
        assert (status, problem["detail"]) == (400, detail)
    assert (await world.gateway.store.get_idp("acme", "app"))[1] == before


async def test_an_hs256_token_to_a_provider_of_keys(gateway: Gateway, issuer: Issuer) -> None:
    """A supabase provider verifying with the project's keys (no secret) refuses HS256 tokens,
    whatever they were signed with, the provider's public key included (the algorithm confusion
    attack), before any key is fetched."""
    url = issuer.base
    status, _ = await register(gateway, {"name": "app", "type": "supabase", "url": url,
                                         "keys_url": f"{url}/jwks"})  # fmt: skip
    assert status == 201
    pem = issuer.key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    now = int(time.time())
    claims = {"iss": f"{url}/auth/v1", "aud": "authenticated", "sub": "x", "exp": now + 60,
              "role": "device"}  # fmt: skip

    def b64(data: bytes) -> bytes:
        return base64.urlsafe_b64encode(data).rstrip(b"=")

    # PyJWT refuses to sign HS256 with a PEM key: the forger's token, made by hand.
    header = {"alg": "HS256", "typ": "JWT", "kid": issuer.kid}
    signing_input = b".".join(b64(orjson.dumps(part)) for part in (header, claims))
    confused = signing_input + b"." + b64(hmac.new(pem, signing_input, hashlib.sha256).digest())
    for token in (supabase_token(url, secrets.token_urlsafe(32)), confused.decode()):
        got, problem = await exchange(gateway, token)
        assert (got, problem["type"], problem["detail"]) == (
            401, "urn:conduit:exchange:token-invalid",
            "the token's algorithm is not one of ES256, RS256",
        )  # fmt: skip
    assert issuer.fetches == 0
    rs256 = issuer.token({"iss": f"{url}/auth/v1", "aud": "authenticated"})
    assert (await exchange(gateway, rs256))[0] == 200


def test_a_jwt_secret_is_stored_sealed() -> None:
    rules = [{"when": {}, "subscribe": ["m/acme/c/temps/#"]}]
    key, secret = SealingKey.generate(), "s" * 40
    given = {"url": "https://abc.supabase.co", "rules": rules, "jwt_secret": secret}
    config = stored("acme", "app", "supabase", given, key)
    assert set(config) == {"url", "rules", "jwt_secret_sealed"}
    provider = derive("acme", "app", "supabase", config)
    assert (provider.algorithms, provider.keys_url, provider.shown()["jwt_secret"]) == (
        ("HS256",), None, "set",
    )  # fmt: skip
    assert secret not in repr(provider) and secret not in str(provider.shown())
    # A merge that leaves it, one that removes it.
    assert (
        stored("acme", "app", "supabase", {"ttl": 60}, key, config)["jwt_secret_sealed"]
        == (config["jwt_secret_sealed"])
    )
    removed = stored("acme", "app", "supabase", {"jwt_secret": None}, key, config)
    assert "jwt_secret_sealed" not in removed
    assert derive("acme", "app", "supabase", removed).algorithms == ("ES256", "RS256")
    for call_, message in [
        (lambda: stored("acme", "app", "supabase", given, None),
         "'jwt_secret' is kept sealed: this gateway has no encryption key"),
        (lambda: derive("acme", "app", "supabase", given),
         "'jwt_secret' is kept only sealed"),
        (lambda: derive("acme", "app", "supabase", {**config, "jwt_secret_sealed": "not base64!"}),
         "'jwt_secret_sealed' is not a sealed secret"),
    ]:  # fmt: skip
        with pytest.raises(ProviderError) as error:
            call_()
        assert str(error.value) == message


def test_conduit_idps_jwt_secret_from_a_file_or_stdin(tmp_path: Path) -> None:
    """The CLI reads the secret from a file or standard input, never from its arguments; it is
    shown as set, and the server's log (at debug) never holds it."""
    import json

    from tests.test_serve import start

    server = start(tmp_path / "data", "--log-level", "debug")
    first, second = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
    try:
        server.cli("domains", "create", "acme")
        config = tmp_path / "supabase.json"
        config.write_text(json.dumps({"url": "https://abc.supabase.co", "rules": RULES}))
        secret_file = tmp_path / "jwt-secret"
        secret_file.write_text(first + "\n")
        added = server.cli("idps", "add", "--domain", "acme", "app", "--type", "supabase",
                           "--config", str(config), "--jwt-secret-file", str(secret_file),
                           "--json")  # fmt: skip
        shown = json.loads(added.stdout)
        assert (shown["jwt_secret"], shown["algorithms"]) == ("set", ["HS256"])
        assert first not in added.stdout + added.stderr
        http = f"http://127.0.0.1:{server.ports['http']}"
        body = {"domain": "acme", "provider": "app",
                "token": supabase_token("https://abc.supabase.co", first)}  # fmt: skip
        assert asyncio.run(call(f"{http}/auth/exchange", "POST", body))[0] == 200
        updated = server.cli("idps", "update", "--domain", "acme", "app", "--jwt-secret-file",
                             "-", "--json", input_text=second)  # fmt: skip
        assert json.loads(updated.stdout)["jwt_secret"] == "set"
        body["token"] = supabase_token("https://abc.supabase.co", second)
        assert asyncio.run(call(f"{http}/auth/exchange", "POST", body))[0] == 200
        body["token"] = supabase_token("https://abc.supabase.co", first)
        assert asyncio.run(call(f"{http}/auth/exchange", "POST", body))[0] == 401
        empty = server.cli("idps", "update", "--domain", "acme", "app", "--jwt-secret-file", "-",
                           input_text="\n", check=False)  # fmt: skip
        assert empty.returncode == 1 and "no JWT secret in it" in empty.stderr
        neither = server.cli("idps", "update", "--domain", "acme", "app", check=False)
        assert neither.returncode == 2 and "give --config, --jwt-secret-file" in neither.stderr
        shown_again = server.cli("idps", "show", "--domain", "acme", "app").stdout
        assert first not in shown_again and second not in shown_again
    finally:
        server.proc.terminate()
        _, log = server.proc.communicate(timeout=30)
    assert " DEBUG " in log and "conduit ready" in log  # the server's log, at debug
    assert first not in log and second not in log


async def test_a_refused_exchange_is_logged_and_counted(
    gateway: Gateway, issuer: Issuer, world: World, caplog: pytest.LogCaptureFixture
) -> None:
    await register(gateway, {"name": "app", "type": "oidc", "issuer": issuer.base,
                             "audience": "conduit-app"})  # fmt: skip
    token = issuer.token({"exp": int(time.time()) - 120})
    with caplog.at_level("INFO", logger="conduit"):
        status, problem = await exchange(gateway, token)
    assert (status, problem["type"]) == (401, "urn:conduit:exchange:token-expired")
    counted = world.gateway.metrics.refusals.labels("http", "exchange_token_expired")
    assert counted.value == 1
    logged = [r.getMessage() for r in caplog.records if "exchange_token_expired" in r.getMessage()]
    assert logged == ["refused http client=- reason=exchange_token_expired: the token has expired"]
    assert token not in caplog.text


@pytest.mark.parametrize("token", ["not a token", "", "eyJ.", "!!!.x.y", "bnVsbA.x.y", "W10.x.y"])
async def test_what_is_not_a_jwt_is_refused_before_any_key(
    gateway: Gateway, issuer: Issuer, token: str
) -> None:
    await register(gateway, {"name": "app", "type": "oidc", "issuer": issuer.base,
                             "audience": "conduit-app"})  # fmt: skip
    status, problem = await exchange(gateway, token)
    expected = (401, "urn:conduit:exchange:token-invalid", "the token is not a JWT")
    assert (status, problem["type"], problem["detail"]) == expected
    assert issuer.fetches == 0
