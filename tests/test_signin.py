"""Sign-in with an OpenID Connect provider: a small provider of our own (discovery, authorize that
redirects back at once, token with PKCE, JWKS with keys it makes), the whole redirect chain
driven by a real HTTP client that follows redirects and keeps cookies, then by headless
Chromium; a replayed state, a wrong nonce, an unverified email, an ID token for another
audience, a changed state: each refused, and the browser sent to the failure URL with the
reason."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import secrets
import shutil
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from joserfc import jwt
from joserfc.jwk import RSAKey
from yarl import URL

from adapters.http import HTTPAdapter
from core.sealing import master_key
from core.signin import Provider, SignIn
from tests.conftest import World, require_command, running

CLIENT_ID, CLIENT_SECRET = "conduit-test", "s3cret-of-the-client"


@dataclass
class IdP:
    """A local OpenID provider; ``claims`` changes what its next ID token says."""

    base: str = ""
    key: RSAKey = field(default_factory=lambda: RSAKey.generate_key(2048, {"kid": "k1"}))
    codes: dict[str, dict[str, str]] = field(default_factory=dict)
    claims: dict[str, Any] = field(default_factory=dict)
    email: str = "grace@example.com"
    tokens_asked: int = 0

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/.well-known/openid-configuration", self.discovery)
        app.router.add_get("/authorize", self.authorize)
        app.router.add_post("/token", self.token)
        app.router.add_get("/jwks", self.jwks)
        app.router.add_get("/done", self.done)
        return app

    async def discovery(self, request: web.Request) -> web.Response:
        return web.json_response({
            "issuer": self.base, "authorization_endpoint": f"{self.base}/authorize",
            "token_endpoint": f"{self.base}/token", "jwks_uri": f"{self.base}/jwks",
            "id_token_signing_alg_values_supported": ["RS256"],
        })  # fmt: skip

    async def authorize(self, request: web.Request) -> web.Response:
        q = request.query
        assert q["client_id"] == CLIENT_ID and q["response_type"] == "code"
        assert q["code_challenge_method"] == "S256" and "openid" in q["scope"].split()
        code = secrets.token_urlsafe(16)
        self.codes[code] = {"nonce": q["nonce"], "challenge": q["code_challenge"],
                            "redirect_uri": q["redirect_uri"]}  # fmt: skip
        location = URL(q["redirect_uri"]).update_query(code=code, state=q["state"])
        raise web.HTTPFound(str(location))

    async def token(self, request: web.Request) -> web.Response:
        self.tokens_asked += 1
        form = await request.post()
        basic = base64.b64decode(request.headers["Authorization"].split()[1]).decode()
        if basic != f"{CLIENT_ID}:{CLIENT_SECRET}":
            return web.json_response({"error": "invalid_client"}, status=401)
        grant = self.codes.pop(str(form["code"]), None)
        verifier = str(form.get("code_verifier", ""))
        challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest())
        if grant is None or challenge.rstrip(b"=").decode() != grant["challenge"]:
            return web.json_response({"error": "invalid_grant"}, status=400)
        now = int(time.time())
        claims = {"iss": self.base, "aud": CLIENT_ID, "sub": "idp-user-1", "iat": now,
                  "exp": now + 300, "nonce": grant["nonce"], "email": self.email,
                  "email_verified": True, "name": "Grace", **self.claims}  # fmt: skip
        id_token = jwt.encode({"alg": "RS256", "kid": "k1"}, claims, self.key)
        return web.json_response(
            {"access_token": "provider-access", "token_type": "Bearer", "id_token": id_token}
        )

    async def jwks(self, request: web.Request) -> web.Response:
        return web.json_response({"keys": [self.key.as_dict(private=False)]})

    async def done(self, request: web.Request) -> web.Response:
        return web.Response(text=f"failed: {request.query.get('error', '')}")


@pytest.fixture
async def idp() -> AsyncIterator[IdP]:
    provider = IdP()
    runner = web.AppRunner(provider.app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    provider.base = f"http://127.0.0.1:{port}"
    yield provider
    await runner.cleanup()


@pytest.fixture
async def conduit(world: World, idp: IdP, tmp_path: Path) -> AsyncIterator[str]:
    """Conduit's HTTP listener with the provider ``test``; success goes to /users/me."""
    users = world.gateway.users
    assert users is not None
    adapter = HTTPAdapter(world.gateway, "127.0.0.1", 0)
    async with running(adapter):
        base = f"http://127.0.0.1:{adapter.port}"
        provider = Provider(
            "test", idp.base, CLIENT_ID, CLIENT_SECRET, f"{base}/oauth/test/callback",
            f"{base}/users/me", f"{idp.base}/done",
        )  # fmt: skip
        adapter.signin = SignIn([provider], users, master_key(tmp_path, None))
        yield base


def jar(base: str) -> aiohttp.CookieJar:
    """Cookies as a browser keeps them; the test origin (plain HTTP on loopback) counts as a
    secure one, as browsers count localhost, so Secure cookies are sent to it."""
    return aiohttp.CookieJar(unsafe=True, treat_as_secure_origin=[URL(base)])


async def test_the_whole_chain_with_a_client_that_follows_redirects(
    conduit: str, idp: IdP, world: World
) -> None:
    async with aiohttp.ClientSession(cookie_jar=jar(conduit)) as s:
        async with s.get(f"{conduit}/oauth/test/login") as r:
            assert r.status == 200 and str(r.url) == f"{conduit}/users/me"
            me = await r.json()
        assert me["email"] == "grace@example.com" and me["name"] == "Grace"
        hops = [str(h.url).split("?")[0] for h in r.history]
        assert hops == [f"{conduit}/oauth/test/login", f"{idp.base}/authorize",
                        f"{conduit}/oauth/test/callback"]  # fmt: skip
        cookies = {c.key: c for c in s.cookie_jar}
        for name, path in (("conduit_access", "/"), ("conduit_refresh", "/users/tokens")):
            assert cookies[name]["httponly"] and cookies[name]["secure"]
            assert (cookies[name]["samesite"], cookies[name]["path"]) == ("Lax", path)
        assert "conduit_login_test" not in cookies  # spent
    # The user was made at its first sign-in, without a password; the second finds it.
    made = await world.gateway.store.get_user("grace@example.com")
    assert made.name == "Grace" and made.last_login is not None
    async with aiohttp.ClientSession(cookie_jar=jar(conduit)) as s:
        async with s.get(f"{conduit}/oauth/test/login") as r:
            assert (await r.json())["id"] == made.id
    assert await world.gateway.store.user_password("grace@example.com") == (
        await world.gateway.store.get_user(made.id),
        None,
    )


async def steps(conduit: str) -> tuple[str, str]:
    """The login step alone: the provider URL to go to, and the login cookie set."""
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{conduit}/oauth/test/login", allow_redirects=False) as r:
            assert r.status == 302
            return r.headers["Location"], r.cookies["conduit_login_test"].value


async def callback(conduit: str, url: str, cookie: str | None) -> str:
    """Follow the provider's redirect to the callback with ``cookie``: where Conduit sends the
    browser next."""
    headers = {"Cookie": f"conduit_login_test={cookie}"} if cookie else {}
    async with aiohttp.ClientSession() as s:
        async with s.get(url, allow_redirects=False, headers=headers) as r:
            assert r.status == 302
            return r.headers["Location"]


async def authorized(idp_url: str) -> str:
    async with aiohttp.ClientSession() as s:
        async with s.get(idp_url, allow_redirects=False) as r:
            return r.headers["Location"]


def error_of(location: str) -> str:
    return URL(location).query.get("error", "")


async def test_a_replayed_or_changed_state_is_refused(conduit: str, idp: IdP) -> None:
    go, cookie = await steps(conduit)
    back = await authorized(go)
    assert (await callback(conduit, back, cookie)).startswith(f"{conduit}/users/me")
    # The same callback again, with the same cookie: the state was used.
    again = await callback(conduit, back, cookie)
    assert error_of(again) == "this login was completed already"
    assert again.startswith(f"{idp.base}/done")
    # Another login's state with this cookie; no cookie at all; a forged cookie.
    go2, cookie2 = await steps(conduit)
    back2 = await authorized(go2)
    assert error_of(await callback(conduit, back2, cookie)) == (
        "the state does not match this browser's login"
    )
    assert error_of(await callback(conduit, back2, None)) == (
        "this browser started no login (no login cookie)"
    )
    forged = base64.urlsafe_b64encode(b"x" * 64).decode()
    assert error_of(await callback(conduit, back2, forged)) == (
        "the login cookie is not one this gateway made"
    )
    # The right one still works (nothing above spent it).
    assert (await callback(conduit, back2, cookie2)).startswith(f"{conduit}/users/me")


@pytest.mark.parametrize(
    ("claims", "error"),
    [
        ({"nonce": "another-nonce"}, "the ID token is not for this login: "),
        ({"email_verified": False}, "the provider has not verified this email"),
        ({"aud": "another-client"}, "the ID token is not for this login: "),
        ({"iss": "https://elsewhere"}, "the ID token is not for this login: "),
        ({"exp": int(time.time()) - 600}, "the ID token is not for this login: "),
    ],
    ids=["wrong nonce", "unverified email", "another audience", "another issuer", "expired"],
)
async def test_an_id_token_that_is_not_for_this_login_is_refused(
    conduit: str, idp: IdP, world: World, claims: dict[str, Any], error: str
) -> None:
    idp.claims = claims
    go, cookie = await steps(conduit)
    location = await callback(conduit, await authorized(go), cookie)
    assert location.startswith(f"{idp.base}/done?error=")
    assert error_of(location).startswith(error), error_of(location)
    with pytest.raises(Exception, match="no user"):
        await world.gateway.store.get_user("grace@example.com")


async def test_a_disabled_user_is_refused(conduit: str, idp: IdP, world: World) -> None:
    users = world.gateway.users
    assert users is not None
    await users.create("grace@example.com", "Grace", None)
    await world.gateway.store.set_user_enabled("grace@example.com", False)
    go, cookie = await steps(conduit)
    assert error_of(await callback(conduit, await authorized(go), cookie)) == (
        "this user is disabled"
    )


async def test_headless_chromium_signs_in(conduit: str, idp: IdP) -> None:
    """A real browser through the whole chain: it ends on /users/me, which it could only
    read with the access cookie the callback set."""
    chromium = require_command("chromium", "chromium")
    profile = Path("/tmp") / f"chromium-{secrets.token_hex(4)}"
    # Not subprocess.run: the gateway and the provider answer on this event loop.
    proc = await asyncio.create_subprocess_exec(
        chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
        f"--user-data-dir={profile}", "--dump-dom", f"{conduit}/oauth/test/login",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    shutil.rmtree(profile, ignore_errors=True)
    page = out.decode()
    assert '"email":"grace@example.com"' in page, page + err.decode()[-2000:]
