"""Fixtures of the SDK tests: a local identity provider that mints tokens shaped like each
provider's, and a real Conduit (HTTP with the exchange, MQTT, the management API) on ephemeral
ports."""

from __future__ import annotations

import datetime
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import jwt
import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from adapters.http import HTTPAdapter
from adapters.http.server import Listener
from adapters.mqtt import MQTTAdapter
from conduit.api import ManagementAPI
from core.idps import Exchange
from core.limits import ListenerLimits
from core.listeners import Endpoint
from tests.conftest import World, running

KEY = "test-admin-key-" + "0" * 32
PROJECT = "demo-project"
TENANT = "acme.eu.auth0.com"
API = "https://api.acme.example"
RULES = [{"when": {}, "publish": ["m/acme/c/temps/{sub}/#"],
          "subscribe": ["m/acme/c/temps/{sub}/#"]}]  # fmt: skip


@dataclass
class Provider:
    """A local identity provider with the key material and endpoints of each kind: Supabase
    (ES256, JWKS under /auth/v1), Firebase (RS256, Google's X.509 document), Auth0 (RS256,
    JWKS) and a generic OIDC issuer (discovery, RS256)."""

    base: str = ""
    ec_key: ec.EllipticCurvePrivateKey = field(
        default_factory=lambda: ec.generate_private_key(ec.SECP256R1())
    )
    rsa_key: rsa.RSAPrivateKey = field(
        default_factory=lambda: rsa.generate_private_key(65537, 2048)
    )
    down: bool = False
    fetches: int = 0

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/auth/v1/.well-known/jwks.json", self.supabase_jwks)
        app.router.add_get("/x509", self.firebase_certificates)
        app.router.add_get("/.well-known/jwks.json", self.rsa_jwks)
        app.router.add_get("/.well-known/openid-configuration", self.discovery)
        app.router.add_get("/jwks", self.rsa_jwks)
        return app

    def _serving(self) -> None:
        self.fetches += 1
        if self.down:
            raise web.HTTPServiceUnavailable()

    async def supabase_jwks(self, request: web.Request) -> web.Response:
        self._serving()
        jwk = jwt.algorithms.ECAlgorithm.to_jwk(self.ec_key.public_key(), as_dict=True)
        return web.json_response({"keys": [{**jwk, "kid": "sb-1", "alg": "ES256"}]})

    async def rsa_jwks(self, request: web.Request) -> web.Response:
        self._serving()
        jwk = jwt.algorithms.RSAAlgorithm.to_jwk(self.rsa_key.public_key(), as_dict=True)
        keys = [{**jwk, "kid": kid, "alg": "RS256", "use": "sig"} for kid in ("a0-1", "oidc-1")]
        return web.json_response({"keys": keys})

    async def discovery(self, request: web.Request) -> web.Response:
        return web.json_response({"issuer": self.base, "jwks_uri": f"{self.base}/jwks"})

    async def firebase_certificates(self, request: web.Request) -> web.Response:
        self._serving()
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "securetoken")])
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(self.rsa_key.public_key()).serial_number(1)
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .sign(self.rsa_key, hashes.SHA256())
        )  # fmt: skip
        return web.json_response({"fb-1": cert.public_bytes(serialization.Encoding.PEM).decode()})

    def registration(self, kind: str) -> dict[str, Any]:
        """The body of ``POST /domains/acme/idps`` for a provider of this kind."""
        given: dict[str, Any] = {
            "supabase": {"url": self.base},
            "firebase": {"project_id": PROJECT, "keys_url": f"{self.base}/x509"},
            "auth0": {"tenant": TENANT, "audience": API,
                      "keys_url": f"{self.base}/.well-known/jwks.json"},
            "oidc": {"issuer": self.base, "audience": "conduit-app"},
        }[kind]  # fmt: skip
        return {"name": kind, "type": kind, "rules": RULES, **given}

    def token(self, kind: str, sub: str | None = None, ttl: int = 600, **claims: Any) -> str:
        """A login token as that kind of provider issues it."""
        now = int(time.time())
        sub = sub or f"user-{uuid.uuid4().hex[:8]}"
        base = {"sub": sub, "iat": now, "exp": now + ttl, **claims}
        if kind == "supabase":
            payload = {"iss": f"{self.base}/auth/v1", "aud": "authenticated",
                       "role": "authenticated", "email": f"{sub}@example.com", **base}  # fmt: skip
            return jwt.encode(payload, self.ec_key, "ES256", {"kid": "sb-1"})
        if kind == "firebase":
            payload = {"iss": f"https://securetoken.google.com/{PROJECT}", "aud": PROJECT,
                       "auth_time": now, "user_id": sub, **base}  # fmt: skip
            return jwt.encode(payload, self.rsa_key, "RS256", {"kid": "fb-1"})
        if kind == "auth0":
            payload = {"iss": f"https://{TENANT}/", "aud": API, "permissions": [], **base}
            return jwt.encode(payload, self.rsa_key, "RS256", {"kid": "a0-1"})
        payload = {"iss": self.base, "aud": "conduit-app", **base}
        return jwt.encode(payload, self.rsa_key, "RS256", {"kid": "oidc-1"})


@pytest.fixture
async def provider() -> AsyncIterator[Provider]:
    idp = Provider()
    runner = web.AppRunner(idp.app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    idp.base = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
    yield idp
    await runner.cleanup()


@dataclass
class Gateway:
    """A running Conduit: its HTTP base (the exchange), MQTT port and management API."""

    world: World
    http: str
    api: str
    mqtt_port: int
    mqtt_ws_port: int

    @property
    def mqtt_url(self) -> str:
        return f"mqtt://127.0.0.1:{self.mqtt_port}"

    async def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {KEY}"}
        async with aiohttp.ClientSession() as s:
            async with s.request(method, self.api + path, json=body, headers=headers) as r:
                return r.status, (await r.json() if r.status != 204 else None)

    async def register(self, body: dict[str, Any]) -> None:
        status, answer = await self.call("POST", "/domains/acme/idps", body)
        assert status == 201, answer


@pytest.fixture
def exchange_options() -> dict[str, Any]:
    """Options of the gateway's exchange (a test parametrizes it to change them)."""
    return {}


@pytest.fixture
async def gateway(world: World, exchange_options: dict[str, Any]) -> AsyncIterator[Gateway]:
    tokens = world.gateway.tokens
    assert tokens is not None
    exchange = Exchange(world.gateway.store, tokens, refetch_every=1.0, **exchange_options)
    world.gateway.on_change(exchange.changed)  # as conduit serve does: providers are kept
    api = Listener(world.gateway, "api", ManagementAPI(world.gateway, KEY).app,
                   Endpoint("api", "127.0.0.1", 0), limits=ListenerLimits())  # fmt: skip
    await api.start()
    async with (
        running(MQTTAdapter(world.gateway, "127.0.0.1", 0, ws_port=0)) as mqtt,
        running(HTTPAdapter(world.gateway, "127.0.0.1", 0, exchange=exchange)) as http,
    ):
        exchange.listeners = lambda: {"http": http.port, "mqtt": mqtt.port}
        yield Gateway(world, f"http://127.0.0.1:{http.port}", f"http://127.0.0.1:{api.port}",
                      mqtt.port, mqtt.ws_port)  # fmt: skip
    await api.stop(2)
