"""Users: created through the management API, signing in on the HTTP listener for an access and
a refresh token, refresh rotation with reuse detection, sign-out, and every management route
taken with a user's access token under its role: 401 without a valid token, 403 where the role
does not reach, the exact answers."""

from __future__ import annotations

import asyncio
import email
import email.policy
import socket
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest

from adapters.http.server import Listener
from conduit.api import ManagementAPI
from core.limits import ListenerLimits
from core.listeners import Endpoint
from tests.conftest import World

KEY = "test-admin-key-" + "0" * 32
PASSWORD = "correct horse battery"


@pytest.fixture
async def api(world: World) -> AsyncIterator[str]:
    app = ManagementAPI(world.gateway, KEY).app
    listener = Listener(
        world.gateway, "api", app, Endpoint("api", "127.0.0.1", 0), limits=ListenerLimits()
    )
    await listener.start()
    yield f"http://127.0.0.1:{listener.port}"
    await listener.stop(2)


async def call(
    base: str, method: str, path: str, token: str | None = KEY, body: Any = None
) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession() as s:
        async with s.request(method, base + path, json=body, headers=headers) as r:
            if r.status in (202, 204):
                return r.status, None
            return r.status, await r.json()


async def user(api: str, email: str, **extra: Any) -> dict[str, Any]:
    status, made = await call(
        api, "POST", "/users", body={"email": email, "name": email.split("@")[0],
                                     "password": PASSWORD, **extra},
    )  # fmt: skip
    assert status == 201, made
    return made  # type: ignore[no-any-return]


async def login(http: str, email: str, password: str = PASSWORD) -> tuple[int, Any]:
    return await call(http, "POST", "/users/tokens", None, {"email": email, "password": password})


async def test_sign_in_refresh_and_sign_out(api: str, http: str, world: World) -> None:
    alice = await user(api, "Alice@Example.com")
    # Sign in, in any case of the email.
    status, pair = await login(http, "alice@example.COM")
    assert status == 200 and pair["token_type"] == "Bearer"
    for name, aud in (("access_token", "conduit:api"), ("refresh_token", "conduit:refresh")):
        claims = jwt.decode(pair[name], options={"verify_signature": False})
        assert (claims["sub"], claims["aud"]) == (alice["id"], aud)
    assert pair["refresh_expires_at"] - pair["expires_at"] == 86400 - 900
    # The access token works on the management API; the refresh token does not.
    assert (await call(api, "GET", "/domains", pair["access_token"]))[0] == 200
    status, problem = await call(api, "GET", "/domains", pair["refresh_token"])
    assert (status, problem["detail"]) == (401, "the token is not an access token (aud)")
    # Nor is an access token a broker token on the messaging side.
    async with aiohttp.ClientSession() as s:
        bearer = {"Authorization": f"Bearer {pair['access_token']}"}
        async with s.post(f"{http}/m/acme/c/temps", data=b"x", headers=bearer) as r:
            assert (r.status, (await r.json())["detail"]) == (
                401,
                "the token is not a broker token (aud)",
            )
    # Refresh: a new pair; the refresh token used is spent.
    status, second = await call(
        http, "POST", "/users/tokens/refresh", None, {"refresh_token": pair["refresh_token"]}
    )
    assert status == 200 and second["refresh_token"] != pair["refresh_token"]
    assert (await call(api, "GET", "/domains", second["access_token"]))[0] == 200
    # Its replay revokes the whole sign-in: the new pair too.
    status, problem = await call(
        http, "POST", "/users/tokens/refresh", None, {"refresh_token": pair["refresh_token"]}
    )
    assert (status, problem["detail"]) == (
        401,
        "this refresh token was used before: every token of its sign-in is revoked",
    )
    for token in (second["access_token"], pair["access_token"]):
        status, problem = await call(api, "GET", "/domains", token)
        assert (status, problem["detail"]) == (
            401,
            "this sign-in has ended (signed out, or user disabled)",
        )
    status, problem = await call(
        http, "POST", "/users/tokens/refresh", None, {"refresh_token": second["refresh_token"]}
    )
    assert status == 401
    # Sign out: the family ends.
    _, third = await login(http, "alice@example.com")
    assert await call(
        http, "DELETE", "/users/tokens", None, {"refresh_token": third["refresh_token"]}
    ) == (204, None)
    assert (await call(api, "GET", "/domains", third["access_token"]))[0] == 401
    # last_login is kept.
    _, shown = await call(api, "GET", f"/users/{alice['id']}")
    assert shown["last_login"] is not None and shown["roles"] == {}


async def test_what_sign_in_refuses(api: str, http: str, world: World) -> None:
    await user(api, "bob@example.com")
    unknown = await login(http, "nobody@example.com")
    wrong = await login(http, "bob@example.com", "not the password at all")
    assert unknown == wrong  # no answer tells whether an email exists
    assert unknown[0] == 401 and unknown[1]["detail"] == "wrong email or password"
    status, problem = await call(http, "POST", "/users/tokens", None, {"email": "bob@example.com"})
    assert (status, problem["detail"]) == (400, "'password' is required (a string)")
    # Disabled: no sign-in, and its open sign-ins end at once.
    _, pair = await login(http, "bob@example.com")
    await call(api, "POST", "/users/bob@example.com/disable")
    status, problem = await login(http, "bob@example.com")
    assert (status, problem["detail"]) == (401, "this user is disabled")
    assert (await call(api, "GET", "/domains", pair["access_token"]))[0] == 401
    # A new password replaces the old one.
    await call(api, "POST", "/users/bob@example.com/enable")
    status, _ = await call(
        api, "PUT", "/users/bob@example.com/password", body={"password": "another long one!"}
    )
    assert status == 200
    assert (await login(http, "bob@example.com"))[0] == 401
    assert (await login(http, "bob@example.com", "another long one!"))[0] == 200


async def test_what_user_creation_refuses(api: str) -> None:
    await user(api, "carol@example.com")
    cases = [
        ({"email": "CAROL@example.com", "name": "c", "password": PASSWORD}, 409,
         "a user with email 'CAROL@example.com' exists"),
        ({"email": "not-an-email", "name": "c", "password": PASSWORD}, 400,
         "'not-an-email' is not an email address"),
        ({"email": "dan@example.com", "name": "d", "password": "short"}, 400,
         "a password has 12 to 1024 characters"),
        ({"email": "dan@example.com", "name": "d", "platform_admin": "yes"}, 400,
         "'platform_admin' is a boolean"),
    ]  # fmt: skip
    for body, status, detail in cases:
        assert await call(api, "POST", "/users", body=body) == (
            status,
            {"type": "about:blank", "title": {400: "Invalid request", 409: "Conflict"}[status],
             "status": status, "detail": detail},
        )  # fmt: skip


async def test_passwords_are_argon2id_hashes(api: str, world: World, tmp_path: Path) -> None:
    await user(api, "erin@example.com")
    with sqlite3.connect(tmp_path / "conduit.db") as db:
        (hashed,) = db.execute("SELECT password_hash FROM users").fetchone()
    assert hashed.startswith("$argon2id$") and PASSWORD not in hashed


async def test_roles_on_every_route(api: str, http: str, world: World) -> None:
    """A member of acme reads acme; an admin of acme manages it; neither reaches another
    domain, users, certificates or keys; a platform administrator reaches everything."""
    await call(api, "POST", "/domains", body={"name": "globex"})
    for address in ("member@x.io", "admin@x.io", "outsider@x.io", "target@x.io"):
        await user(api, address)
    await user(api, "root@x.io", platform_admin=True)
    assert (await call(api, "PUT", "/domains/acme/members/member@x.io", body={"role": "member"}))[
        0
    ] == 200
    await call(api, "PUT", "/domains/acme/members/admin@x.io", body={"role": "admin"})
    status, problem = await call(
        api, "PUT", "/domains/acme/members/admin@x.io", body={"role": "owner"}
    )
    assert (status, problem["detail"]) == (400, "'role' is admin or member")
    tokens = {}
    for address in ("member@x.io", "admin@x.io", "outsider@x.io", "root@x.io"):
        tokens[address] = (await login(http, address))[1]["access_token"]
    member, admin, outsider, root = (tokens[e] for e in tokens)

    # (method, path, body, allowed for: member, admin, outsider, root)
    routes: list[tuple[str, str, Any, tuple[bool, bool, bool, bool]]] = [
        ("GET", "/domains/acme", None, (True, True, False, True)),
        ("GET", "/domains/acme/clients", None, (True, True, False, True)),
        ("GET", "/domains/acme/channels", None, (True, True, False, True)),
        ("GET", "/domains/acme/connections", None, (True, True, False, True)),
        ("GET", "/domains/acme/members", None, (True, True, False, True)),
        ("POST", "/domains/acme/channels", {"name": "made"}, (False, True, False, True)),
        ("DELETE", "/domains/acme/channels/made", None, (False, True, False, True)),
        ("POST", "/domains/acme/clients", {"name": "dev"}, (False, True, False, True)),
        ("PUT", "/domains/acme/members/outsider@x.io", {"role": "member"},
         (False, True, False, True)),
        ("DELETE", "/domains/acme/members/outsider@x.io", None, (False, True, False, True)),
        ("GET", "/domains/globex", None, (False, False, False, True)),
        ("GET", "/domains/globex/clients", None, (False, False, False, True)),
        ("POST", "/domains/globex/channels", {"name": "x"}, (False, False, False, True)),
        ("POST", "/domains", {"name": "initech"}, (False, False, False, True)),
        ("DELETE", "/domains/initech", None, (False, False, False, True)),
        ("GET", "/users", None, (False, False, False, True)),
        ("POST", "/users/target@x.io/disable", None, (False, False, False, True)),
        ("POST", "/users/target@x.io/enable", None, (False, False, False, True)),
        ("GET", "/certs", None, (False, False, False, True)),
        ("GET", "/keys", None, (False, False, False, True)),
    ]  # fmt: skip
    for method, path, body, allowed in routes:
        callers = zip(
            ("member", "admin", "outsider", "root"), (member, admin, outsider, root), allowed,
            strict=True,
        )  # fmt: skip
        for who, token, ok in callers:
            status, answer = await call(api, method, path, token, body)
            if ok:  # let through: done, or already done by the one before (404, 409)
                assert status in (200, 201, 204, 404, 409), (method, path, who, status, answer)
            else:
                assert (status, answer["title"]) == (403, "Forbidden"), (method, path, who)
    # Listing domains: each user sees its own.
    names = {
        who: [d["name"] for d in (await call(api, "GET", "/domains", token))[1]]
        for who, token in (("member", member), ("outsider", outsider), ("root", root))
    }
    assert names == {"member": ["acme"], "outsider": [], "root": ["acme", "globex"]}
    # No token, a bad one, a broker token: 401.
    for token in (None, "not-a-token", "eyJhbGciOiJFZERTQSJ9.e30.sig"):
        status, answer = await call(api, "GET", "/domains", token)
        assert status == 401, token


@pytest.fixture
async def smtp() -> AsyncIterator[tuple[int, asyncio.Queue[Any]]]:
    """A real SMTP server (aiosmtpd) on a free port; what it receives lands in the queue."""
    from aiosmtpd.controller import Controller

    received: asyncio.Queue[Any] = asyncio.Queue()
    loop = asyncio.get_running_loop()

    class Handler:
        async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
            message = email.message_from_bytes(envelope.content, policy=email.policy.default)
            loop.call_soon_threadsafe(received.put_nowait, message)
            return "250 OK"

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    controller = Controller(Handler(), hostname="127.0.0.1", port=port)
    controller.start()
    yield port, received
    controller.stop()


async def test_password_recovery_by_mail(
    api: str, http: str, world: World, smtp: tuple[int, asyncio.Queue[Any]]
) -> None:
    """The key arrives by mail (a real SMTP server), resets the password once, and ends every
    sign-in; an unknown email gets the same answer and no mail."""
    from core.mail import Mailer

    port, received = smtp
    users = world.gateway.users
    assert users is not None
    users.mailer = Mailer("127.0.0.1", port, sender="Conduit <conduit@test>", starttls=False)
    users.recovery_url = "https://app.example/reset?key={key}"
    await user(api, "frank@example.com")
    _, pair = await login(http, "frank@example.com")
    ask = {"email": "FRANK@example.com"}
    assert await call(http, "POST", "/password/recovery", None, ask) == (202, None)
    message = await asyncio.wait_for(received.get(), 10)
    assert message["To"] == "frank@example.com" and message["From"] == "Conduit <conduit@test>"
    body = message.get_content()
    key = body.split("https://app.example/reset?key=")[1].split()[0]
    assert jwt.get_unverified_header(key)["typ"] == "recovery+jwt"
    # The key is not a sign-in; it sets a new password once.
    assert (await call(api, "GET", "/domains", key))[0] == 401
    new = {"key": key, "password": "a brand new password"}
    assert await call(http, "POST", "/password/reset", None, new) == (204, None)
    status, problem = await call(http, "POST", "/password/reset", None, new)
    assert (status, problem["detail"]) == (
        401,
        "this recovery key was used, or the password changed since",
    )
    assert (await login(http, "frank@example.com"))[0] == 401
    assert (await login(http, "frank@example.com", "a brand new password"))[0] == 200
    assert (await call(api, "GET", "/domains", pair["access_token"]))[0] == 401  # signed out
    # Unknown and malformed emails.
    nobody = {"email": "nobody@example.com"}
    assert await call(http, "POST", "/password/recovery", None, nobody) == (202, None)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(received.get(), 1)
    status, problem = await call(http, "POST", "/password/recovery", None, {"email": "x"})
    assert (status, problem["detail"]) == (400, "'x' is not an email address")
    status, problem = await call(http, "POST", "/password/reset", None, {"key": key})
    assert (status, problem["detail"]) == (400, "'password' is required (a string)")


async def test_recovery_is_off_without_smtp(http: str, world: World) -> None:
    status, problem = await call(
        http, "POST", "/password/recovery", None, {"email": "a@example.com"}
    )
    assert (status, problem["detail"]) == (404, "password recovery is off (no smtp_host)")


def test_conduit_login_keeps_and_refreshes_the_tokens(tmp_path: Path) -> None:
    """`conduit login` signs in over HTTP and keeps the pair in a 0600 file; the management
    commands then act as the user (its role: it sees its own domain only); an expired access
    token is refreshed on the next command; `conduit logout` ends the sign-in."""
    import json as json_module

    from tests.test_serve import start

    server = start(tmp_path / "data")
    try:
        server.cli("domains", "create", "acme")
        server.cli("domains", "create", "globex")
        made = server.cli(
            "users", "create", "ida@example.com", "--name", "Ida", "--password-stdin",
            input_text=PASSWORD + "\n",
        )  # fmt: skip
        assert made.returncode == 0, made.stderr
        server.cli("members", "grant", "--domain", "acme", "ida@example.com", "--role", "member")
        kept = tmp_path / "login.json"
        env = {"CONDUIT_LOGIN_FILE": str(kept),
               "CONDUIT_HTTP_URL": f"http://127.0.0.1:{server.ports['http']}"}  # fmt: skip
        signed = server.cli("login", "ida@example.com", "--password-stdin",
                            input_text=PASSWORD + "\n", env=env)  # fmt: skip
        assert signed.returncode == 0 and "signed in as ida@example.com" in signed.stdout
        assert kept.stat().st_mode & 0o777 == 0o600
        listed = json_module.loads(server.cli("domains", "list", "--json", env=env).stdout)
        assert [d["name"] for d in listed] == ["acme"]
        denied = server.cli("channels", "create", "--domain", "acme", "x", env=env, check=False)
        assert denied.returncode != 0 and "403" in denied.stderr
        # An access token past its time: refreshed (and the file rewritten) on the next call.
        saved = json_module.loads(kept.read_text())
        saved["expires_at"] = 0
        kept.write_text(json_module.dumps(saved))
        assert server.cli("domains", "list", env=env).returncode == 0
        renewed = json_module.loads(kept.read_text())
        assert renewed["refresh_token"] != saved["refresh_token"]
        assert renewed["expires_at"] > 0
        out = server.cli("logout", env=env)
        assert out.returncode == 0 and not kept.exists()
        # Signed out: back to the admin key of the data directory (every domain).
        listed = json_module.loads(server.cli("domains", "list", "--json", env=env).stdout)
        assert [d["name"] for d in listed] == ["acme", "globex"]
    finally:
        server.proc.terminate()
        server.proc.wait()


async def test_every_management_route_under_every_role(api: str, http: str, world: World) -> None:
    """Each route of the OpenAPI description, taken with no token (401), a member's, an admin's
    and an outsider's access token of ``acme``: a platform route is 403 for all three; under
    ``/domains/acme`` a read (GET) is let through for members and admins, a change for admins
    only; another domain's routes are 403 for all."""
    from conduit.openapi import OPERATIONS

    for address in ("m@acme.io", "a@acme.io", "o@acme.io"):
        await user(api, address)
    await call(api, "PUT", "/domains/acme/members/m@acme.io", body={"role": "member"})
    await call(api, "PUT", "/domains/acme/members/a@acme.io", body={"role": "admin"})
    await call(api, "POST", "/domains", body={"name": "globex"})
    token = {a: (await login(http, a))[1]["access_token"] for a in ("m@acme.io", "a@acme.io",
                                                                      "o@acme.io")}  # fmt: skip
    values = {"client": world.publisher.id, "channel": "temps", "user": "o@acme.io", "name": "app",
              "serial": "abc", "request": "MA"}  # fmt: skip
    checked = 0
    for method, template in sorted(OPERATIONS):
        if template in ("/health", "/metrics", "/openapi.json") or template.startswith("/pki/"):
            continue  # open routes
        for domain in ("acme", "globex"):
            if "{domain}" not in template and domain == "globex":
                continue
            path = template.format(domain=domain, **values)
            expected: dict[str, bool] = {}
            if template.startswith("/domains/{domain}/"):
                read = method == "get"
                for who, role in (("m@acme.io", "member"), ("a@acme.io", "admin"),
                                  ("o@acme.io", None)):  # fmt: skip
                    ok = domain == "acme" and (role == "admin" or (read and role == "member"))
                    expected[who] = ok
            elif template == "/domains/{domain}":
                for who in token:
                    expected[who] = method == "get" and domain == "acme" and who != "o@acme.io"
            elif template == "/domains":
                expected = {who: method == "get" for who in token}
            else:
                expected = {who: False for who in token}  # platform administrators only
            status, _ = await call(api, method.upper(), path, None)
            assert status == 401, (method, path)
            for who, ok in expected.items():
                if method == "delete" and ok:
                    continue  # not taken: it would remove what the next checks need
                status, answer = await call(api, method.upper(), path, token[who], {})
                if ok:
                    assert status not in (401, 403), (method, path, who, status, answer)
                else:
                    assert (status, answer["title"]) == (403, "Forbidden"), (method, path, who)
                checked += 1
    assert checked > 100


async def test_sign_in_attempts_are_limited(api: str, http: str, world: World) -> None:
    """Three attempts a minute here (ten by default), per email and per address: past that,
    429 without an Argon2 check, whatever the password."""
    from core.users import Users

    users = world.gateway.users
    assert users is not None
    world.gateway.users = Users(users.store, users.tokens, attempts_per_minute=3)
    await user(api, "judy@example.com")
    for _ in range(3):
        assert (await login(http, "judy@example.com", "a wrong password here"))[0] == 401
    limited = (429, "more than 3 sign-in attempts a minute: wait a minute")
    status, problem = await login(http, "judy@example.com", PASSWORD)  # the email's limit
    assert (status, problem["detail"]) == limited
    # The address: three attempts counted (the refused one was not), a fourth is refused.
    status, problem = await login(http, "kim@example.com", PASSWORD)
    assert (status, problem["detail"]) == limited
