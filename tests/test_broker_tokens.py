"""Broker tokens: a client's secret traded for a short-lived JWT at ``POST /clients/tokens``,
accepted on every protocol with the rights it carries and cut off when it expires; every forged
or misused token refused with its reason and nothing published; the JWKS that verifies them;
the signing keys sealed at rest and rotated without breaking the tokens already out."""

from __future__ import annotations

import asyncio
import base64
import json
import sqlite3
import time
from pathlib import Path
from typing import Any

import aiocoap
import aiohttp
import jwt
import pytest
import websockets
from aiocoap.numbers.codes import Code
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from adapters.mqtt.codec import Disconnect, Properties, Publish, ReasonCode, SubAck
from core.bus import Change, Subscription
from core.gateway import EXPIRED
from tests.coap.conftest import Observer
from tests.conftest import Party, World, drain
from tests.mqtt.conftest import RawClient
from tests.test_identities import adapters  # noqa: F401  (a fixture: the four adapters)


async def trade(http: str, authorization: str | None, body: Any = None) -> tuple[int, Any]:
    headers = {"Authorization": authorization} if authorization else {}
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{http}/clients/tokens", headers=headers, json=body) as r:
            return r.status, await r.json()


async def token_of(http: str, party: Party, ttl: int | None = None) -> str:
    status, answer = await trade(
        http, f"Client {party.secret}", {"ttl": ttl} if ttl is not None else None
    )
    assert status == 200, answer
    return str(answer["token"])


async def publish(http: str, token: str, body: bytes = b"x") -> tuple[int, Any]:
    async with aiohttp.ClientSession() as s:
        async with s.post(
            f"{http}/m/acme/c/temps/t", data=body, headers={"Authorization": f"Bearer {token}"}
        ) as r:
            return r.status, (await r.json() if r.status != 202 else None)


async def test_a_secret_traded_for_a_token(http: str, world: World, watch: Subscription) -> None:
    before = int(time.time())
    status, answer = await trade(http, f"Client {world.publisher.secret}")
    assert status == 200 and answer["token_type"] == "Bearer"
    assert before + 900 <= answer["expires_at"] <= int(time.time()) + 900
    claims = jwt.decode(answer["token"], options={"verify_signature": False})
    assert claims["sub"] == world.publisher.id and claims["dom"] == "acme"
    assert claims["rules"] == {"publish": ["m/acme/c/temps/#"], "subscribe": []}
    assert claims["aud"] == "conduit:broker" and claims["iss"] == "conduit"
    assert jwt.get_unverified_header(answer["token"])["typ"] == "broker+jwt"
    assert await publish(http, answer["token"], b"with a token") == (202, None)
    assert [m.payload for m in drain(watch)] == [b"with a token"]
    # Basic works as a publish does; a shorter life on request.
    basic = base64.b64encode(f"{world.both.id}:{world.both.secret}".encode()).decode()
    status, short = await trade(http, f"Basic {basic}", {"ttl": 60})
    assert status == 200 and short["expires_at"] <= int(time.time()) + 60
    # The token's rules, not the store, decide: the publisher's token cannot subscribe, and
    # a right taken from the client after the token was made stays in it until it expires.
    await world.gateway.provisioning.disconnect("acme", world.publisher.id, "temps")
    assert await publish(http, answer["token"], b"still allowed") == (202, None)
    assert [m.payload for m in drain(watch)] == [b"still allowed"]


async def test_what_a_token_request_refuses(http: str, world: World) -> None:
    secret = f"Client {world.publisher.secret}"
    assert await trade(http, secret, {"ttl": 0}) == (
        400,
        {"type": "about:blank", "title": "Invalid request", "status": 400,
         "detail": "'ttl' is at least 1 second"},
    )  # fmt: skip
    status, problem = await trade(http, secret, {"ttl": 86401})
    assert (status, problem["detail"]) == (400, "'ttl' is at most 86400 seconds")
    status, problem = await trade(http, secret, {"ttl": "long"})
    assert (status, problem["detail"]) == (400, "'ttl' is a number of seconds")
    status, problem = await trade(http, secret, {"ttl": 5, "rules": ["m/#"]})
    assert (status, problem["detail"]) == (400, 'the body is a JSON object with at most "ttl"')
    status, problem = await trade(http, None)
    assert status == 401 and problem["title"] == "No credentials"
    status, problem = await trade(http, "Client not-a-secret")
    assert status == 401 and problem["title"] == "Bad credentials"
    token = await token_of(http, world.publisher)
    status, problem = await trade(http, f"Bearer {token}")
    assert (status, problem["detail"]) == (
        401,
        "a token cannot be exchanged for another: present the client's secret or certificate",
    )
    await world.gateway.provisioning.set_client_enabled("acme", world.publisher.id, False)
    status, problem = await trade(http, secret)
    assert status == 401
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{http}/clients/tokens") as r:
            assert (r.status, r.headers["Allow"]) == (405, "POST")


def forge(world: World, claims: dict[str, Any], **header: Any) -> str:
    """A token signed with the gateway's own signing key, with claims changed."""
    tokens = world.gateway.tokens
    assert tokens is not None
    key = tokens.keyring.signing
    now = int(time.time())
    payload = {
        "iss": "conduit", "aud": "conduit:broker", "sub": world.both.id, "iat": now,
        "nbf": now, "exp": now + 600, "jti": "j", "dom": "acme", "name": "both",
        "rules": {"publish": ["m/acme/c/temps/#"], "subscribe": []},
    }  # fmt: skip
    payload.update(claims)
    payload = {k: v for k, v in payload.items() if v is not None}
    headers = {"kid": key.kid, "typ": "broker+jwt", **header}
    return jwt.encode(payload, key.private, "EdDSA", headers)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unsigned(token: str) -> str:
    """The token with ``alg: none`` and no signature."""
    _, payload, _ = token.split(".")
    header = json.loads(base64.urlsafe_b64decode(token.split(".")[0] + "=="))
    return f"{b64(json.dumps({**header, 'alg': 'none'}).encode())}.{payload}."


def hs256_with_the_public_key(world: World) -> str:
    """The algorithm-confusion attack: HMAC keyed with the server's public key bytes."""
    tokens = world.gateway.tokens
    assert tokens is not None
    key = tokens.keyring.signing
    public = key.public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    good = jwt.decode(forge(world, {}), options={"verify_signature": False})
    header = {"kid": key.kid, "typ": "broker+jwt", "alg": "HS256"}
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(good).encode())}"
    import hashlib
    import hmac

    mac = hmac.new(public, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(mac)}"


def tampered(world: World) -> str:
    """A valid token whose payload was changed after signing (more rights)."""
    head, _, signature = forge(world, {}).split(".")
    claims = jwt.decode(forge(world, {}), options={"verify_signature": False})
    claims["rules"]["publish"] = ["m/acme/c/other/#"]
    return f"{head}.{b64(json.dumps(claims).encode())}.{signature}"


def another_key_same_kid(world: World) -> str:
    tokens = world.gateway.tokens
    assert tokens is not None
    payload = jwt.decode(forge(world, {}), options={"verify_signature": False})
    header = {"kid": tokens.keyring.signing.kid, "typ": "broker+jwt"}
    return jwt.encode(payload, ed25519.Ed25519PrivateKey.generate(), "EdDSA", header)


def junk_header(world: World) -> str:
    """Our issuer's claims behind a header that is not JSON."""
    _, payload, signature = forge(world, {}).split(".")
    return f"{b64(b'not json')}.{payload}.{signature}"


def junk_in_signature(world: World) -> str:
    """A character outside base64url in the signature: the routing read ignores the signature,
    PyJWT refuses it."""
    head, payload, signature = forge(world, {}).split(".")
    return f"{head}.{payload}.{signature[:10]}!{signature[11:]}"


REFUSALS = [
    ("no exp", lambda w: forge(w, {"exp": None}), "the token has no 'exp' claim"),
    ("no jti", lambda w: forge(w, {"jti": None}), "the token has no 'jti' claim"),
    ("expired", lambda w: forge(w, {"exp": int(time.time()) - 120}), "the token has expired"),
    ("not yet valid", lambda w: forge(w, {"nbf": int(time.time()) + 600}),
     "the token is not valid yet (nbf or iat)"),
    ("alg none", lambda w: unsigned(forge(w, {})),
     "the token's algorithm is not its key's (EdDSA)"),
    ("HS256 keyed with the public key", hs256_with_the_public_key,
     "the token's algorithm is not its key's (EdDSA)"),
    ("another audience", lambda w: forge(w, {"aud": "conduit:api"}),
     "the token is not a broker token (aud)"),
    ("a refresh token", lambda w: forge(w, {"aud": "conduit:refresh"}, typ="refresh+jwt"),
     "the token is not a broker token (aud)"),
    ("another type in the header", lambda w: forge(w, {}, typ="access+jwt"),
     "the token is not a broker token (typ)"),
    ("another issuer", lambda w: forge(w, {"iss": "https://elsewhere"}),
     "no identity provider of this gateway knows this token"),
    ("an unknown key", lambda w: forge(w, {}, kid="no-such-key"),
     "the token's signing key is unknown or retired"),
    ("no key id", lambda w: forge(w, {}),
     "the token names no signing key (kid)"),
    ("a changed payload", tampered, "the token's signature does not verify"),
    ("another key under the same id", another_key_same_kid,
     "the token's signature does not verify"),
    ("malformed rules", lambda w: forge(w, {"rules": {"publish": ["m/#"]}}),
     "the broker token's rules are malformed"),
    ("a header that is not JSON", junk_header, "the token is not a JWT"),
    ("junk in the signature", junk_in_signature, "the token is malformed"),
    ("four segments", lambda w: forge(w, {}) + ".x",
     "no identity provider of this gateway knows this token"),
]  # fmt: skip


@pytest.mark.parametrize(("case", "make", "detail"), REFUSALS, ids=[r[0] for r in REFUSALS])
async def test_a_forged_or_misused_token_is_refused(
    http: str, world: World, watch: Subscription, case: str, make: Any, detail: str
) -> None:
    token = make(world)
    if case == "no key id":
        header, payload, signature = token.split(".")
        fields = json.loads(base64.urlsafe_b64decode(header + "=="))
        fields.pop("kid")
        token = f"{b64(json.dumps(fields).encode())}.{payload}.{signature}"
    status, problem = await publish(http, token)
    assert (status, problem["title"], problem["detail"]) == (401, "Bad credentials", detail)
    assert drain(watch) == []


async def test_the_jwks_verifies_the_tokens(http: str, world: World) -> None:
    """What another service does: fetch the JWKS, pick the key by ``kid``, verify."""
    token = await token_of(http, world.publisher)
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{http}/.well-known/jwks.json") as r:
            assert r.status == 200 and r.headers["Cache-Control"] == "public, max-age=300"
            jwks = await r.json()
    [key] = jwks["keys"]
    assert (key["kty"], key["crv"], key["alg"], key["use"]) == ("OKP", "Ed25519", "EdDSA", "sig")
    assert "d" not in key  # the public half only
    client = jwt.PyJWKClient(f"{http}/.well-known/jwks.json")
    signing = await asyncio.to_thread(client.get_signing_key_from_jwt, token)
    claims = jwt.decode(token, signing.key, algorithms=["EdDSA"], audience="conduit:broker")
    assert claims["sub"] == world.publisher.id


async def test_rotation_keeps_the_tokens_out_good(http: str, world: World) -> None:
    tokens = world.gateway.tokens
    assert tokens is not None
    old = await token_of(http, world.publisher)
    old_kid = tokens.keyring.signing.kid
    await tokens.keyring.rotate()
    new = await token_of(http, world.publisher)
    assert jwt.get_unverified_header(new)["kid"] == tokens.keyring.signing.kid != old_kid
    assert await publish(http, old) == (202, None)
    assert await publish(http, new) == (202, None)
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{http}/.well-known/jwks.json") as r:
            kids = [k["kid"] for k in (await r.json())["keys"]]
    assert kids == [tokens.keyring.signing.kid, old_kid]  # the one that signs first
    # A key rotated out with no grace period verifies no more, nor do its tokens (on this
    # node at once, through the announced change); the first key keeps its own grace.
    tokens.keyring.grace = 0.0
    await tokens.keyring.rotate()
    await world.gateway.bus.announce(Change("keys", ""))
    status, problem = await publish(http, new)
    assert (status, problem["detail"]) == (401, "the token's signing key is unknown or retired")
    assert await publish(http, old) == (202, None)


async def test_signing_keys_are_sealed_at_rest(world: World, tmp_path: Path) -> None:
    tokens = world.gateway.tokens
    assert tokens is not None
    key = tokens.keyring.signing
    raw = key.private.private_bytes(
        serialization.Encoding.Raw,
        serialization.PrivateFormat.Raw,
        serialization.NoEncryption(),
    )
    with sqlite3.connect(tmp_path / "conduit.db") as db:
        rows = db.execute("SELECT kid, sealed FROM signing_keys").fetchall()
    assert [kid for kid, _ in rows] == [key.kid]
    assert raw not in rows[0][1]
    assert (tmp_path / "encryption.key").stat().st_mode & 0o777 == 0o600


async def test_a_token_on_every_protocol_until_it_expires(
    world: World,
    adapters: tuple[str, str, str, int],  # noqa: F811
) -> None:
    """One broker token of the ``both`` client, good for 2 s: SSE, WebSocket (header and
    ?authorization=), CoAP Observe (auth=), MQTT 5 (token alone) and 3.1.1 (client id as user
    name) subscribe and receive with it; when it expires each ends in its idiom; then a
    publish with it is refused."""
    http, ws, coap, mqtt = adapters
    token = await token_of(http, world.both, ttl=2)
    bearer = {"Authorization": f"Bearer {token}"}
    mqtt5, mqtt4 = await RawClient.open(mqtt, 5), await RawClient.open(mqtt, 4)
    assert (await mqtt5.connect(None, "a", password=token.encode())).reason_code == 0
    assert (await mqtt4.connect(Party(world.both.id, token), "b")).reason_code == 0
    for mqtt_client in (mqtt5, mqtt4):
        assert (await mqtt_client.subscribe("m/acme/c/temps/#")).reason_codes == [0]
    # Outside its rules: refused (the other channel).
    refused = await mqtt5.subscribe("m/acme/c/other/#")
    assert isinstance(refused, SubAck) and refused.reason_codes == [0x87]
    async with aiohttp.ClientSession() as s:
        sse = await s.get(
            f"{http}/m/acme/c/temps/%23", headers={**bearer, "Accept": "text/event-stream"}
        )
        assert sse.status == 200
        await sse.content.readline()
        socket = await websockets.connect(f"{ws}/m/acme/c/temps/x", additional_headers=bearer)
        query = await websockets.connect(f"{ws}/m/acme/c/temps/x?authorization=Bearer%20{token}")
        client = await aiocoap.Context.create_client_context()
        try:
            observer = Observer(client, f"{coap}/m/acme/c/temps/x?auth={token}")
            assert (await observer.first()).code == Code.CONTENT
            async with s.post(f"{http}/m/acme/c/temps/x", data=b"before", headers=bearer) as r:
                assert r.status == 202
            for websocket in (socket, query):
                assert await asyncio.wait_for(websocket.recv(), 10) == b"before"
            assert (await observer.next()).payload == b"before"
            for mqtt_client in (mqtt5, mqtt4):
                assert (await mqtt_client.expect(Publish)).payload == b"before"
            body = (await asyncio.wait_for(sse.content.read(), 10)).decode()
            assert body.endswith('event: close\ndata: {"reason":"credentials expired"}\n\n')
            for websocket in (socket, query):
                await asyncio.wait_for(websocket.wait_closed(), 10)
                assert (websocket.close_code, websocket.close_reason) == (1008, EXPIRED)
            last = await observer.next()
            assert (last.code, last.payload) == (Code.UNAUTHORIZED, EXPIRED.encode())
            assert await mqtt5.until_closed(10) == [
                Disconnect(ReasonCode.NOT_AUTHORIZED, Properties(reason_string=EXPIRED))
            ]
            assert await mqtt4.until_closed(10) == []
        finally:
            await client.shutdown()
        status, problem = await publish(http, token)
        assert (status, problem["detail"]) == (401, "the token has expired")
    assert world.gateway._expiries == {}
    assert not world.gateway._subs


def test_tokens_with_real_clients_across_rotation_and_restart(tmp_path: Path) -> None:
    """curl trades a secret for a token; mosquitto_sub and mosquitto_pub use it as their MQTT
    password; `conduit keys rotate` makes a new key and the token out keeps working, and so it
    does after a restart (the keys are kept in the store)."""
    import shutil
    import subprocess

    from tests.test_serve import start

    for tool in ("curl", "mosquitto_pub", "mosquitto_sub"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    data = tmp_path / "data"
    server = start(data)
    try:
        server.cli("domains", "create", "acme")
        server.cli("channels", "create", "--domain", "acme", "temps")
        dev: Any = server.cli_json("clients", "create", "--domain", "acme", "dev")
        server.cli("connect", "--domain", "acme", "--client", "dev", "--channel", "temps")
        http = f"http://127.0.0.1:{server.ports['http']}"
        r = subprocess.run(
            ["curl", "-sS", "-X", "POST", "-H", f"Authorization: Client {dev['secret']}",
             f"{http}/clients/tokens"],
            capture_output=True, text=True, timeout=30, check=True,
        )  # fmt: skip
        token = json.loads(r.stdout)["token"]
        mqtt = ["-h", "127.0.0.1", "-p", str(server.ports["mqtt"]), "-u", dev["id"], "-P", token]
        sub = subprocess.Popen(
            ["mosquitto_sub", *mqtt, "-i", "sub", "-t", "m/acme/c/temps/#", "-C", "1", "-W", "20"],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        time.sleep(1.0)  # the subscription is made
        subprocess.run(["mosquitto_pub", *mqtt, "-i", "pub", "-t", "m/acme/c/temps/t", "-q", "1",
                        "-m", "with a token"], check=True, timeout=30)  # fmt: skip
        assert sub.communicate(timeout=30)[0].strip() == "with a token"
        [first] = server.cli_json("keys", "list")  # type: ignore[misc]
        assert first["signs"] is True and first["algorithm"] == "EdDSA"
        rotated: Any = server.cli_json("keys", "rotate")
        assert rotated["kid"] != first["kid"] and rotated["signs"] is True
        listed: Any = server.cli_json("keys", "list")
        assert [(k["kid"], k["signs"]) for k in listed] == [
            (rotated["kid"], True),
            (first["kid"], False),
        ]
        assert listed[1]["retires"] > time.time() + 86400  # the grace period: 2 days

        def post() -> str:
            return subprocess.run(
                ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "-H",
                 f"Authorization: Bearer {token}", "-H", "Content-Type: text/plain",
                 "--data-binary", "x",
                 f"http://127.0.0.1:{server.ports['http']}/m/acme/c/temps/t"],
                capture_output=True, text=True, timeout=30,
            ).stdout  # fmt: skip

        assert post() == "202"
    finally:
        server.proc.terminate()
        server.proc.wait()
    server = start(data)
    try:
        assert post() == "202"
    finally:
        server.proc.terminate()
        server.proc.wait()


def test_keys_rotate_on_their_schedule(tmp_path: Path) -> None:
    """With signing_key_rotation = 2 s a running server makes a new signing key by itself; the
    previous one keeps verifying (its grace period), and a token signed by it still works."""
    import subprocess

    from tests.test_serve import start

    server = start(tmp_path / "data", "--signing-key-rotation", "2")
    try:
        server.cli("domains", "create", "acme")
        server.cli("channels", "create", "--domain", "acme", "temps")
        dev: Any = server.cli_json("clients", "create", "--domain", "acme", "dev")
        server.cli("connect", "--domain", "acme", "--client", "dev", "--channel", "temps")
        http = f"http://127.0.0.1:{server.ports['http']}"

        def curl(*args: str) -> str:
            return subprocess.run(["curl", "-sS", *args], capture_output=True, text=True,
                                  timeout=30, check=True).stdout  # fmt: skip

        token = json.loads(curl("-X", "POST", "-H", f"Authorization: Client {dev['secret']}",
                                f"{http}/clients/tokens"))["token"]  # fmt: skip
        first = jwt.get_unverified_header(token)["kid"]
        deadline = time.monotonic() + 20
        while True:
            keys: Any = server.cli_json("keys", "list")
            if len(keys) >= 2 and keys[0]["kid"] != first:  # a rotation after the token's
                break
            assert time.monotonic() < deadline, "no rotation"
            time.sleep(0.5)
        assert keys[0]["signs"] and keys[0]["kid"] != first
        assert any(k["kid"] == first and not k["signs"] for k in keys)
        status = curl("-o", "/dev/null", "-w", "%{http_code}", "-H",
                      f"Authorization: Bearer {token}", "-H", "Content-Type: text/plain",
                      "--data-binary", "x", f"{http}/m/acme/c/temps/t")  # fmt: skip
        assert status == "202"
    finally:
        server.proc.terminate()
        server.proc.wait()
