"""HTTP adapter (aiohttp): ``POST /m/<domain>/c/<channel>[/<subtopic>...]`` publishes,
``GET`` on the same path with ``Accept: text/event-stream`` subscribes (Server-Sent Events).

Refusals follow the error table of ``core.errors`` as ``application/problem+json`` (RFC 9457).

It runs on aiohttp's low-level ``web.Server`` with a dispatch of its own (:data:`ROUTES`): the
Application/router layer cost about 16% of the instructions of a request (callgrind,
docs/performance.md). ``GET /openapi.json`` serves the description of these routes
(:mod:`adapters.http.openapi`).
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import functools
import hashlib
import logging
import math
import ssl
import time
from collections.abc import Awaitable, Sequence
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import HttpVersion11, web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.http import SERVER_SOFTWARE
from yarl import URL

from adapters.http.openapi import spec as openapi_spec
from adapters.http.server import Handler, Listener
from core.bus import Subscription
from core.content import normalize
from core.credentials import Credentials, from_authorization, with_certificate
from core.errors import (
    PROBLEM_JSON,
    WWW_AUTHENTICATE,
    AuthenticationError,
    AuthorizationError,
    Condition,
    ConduitError,
    RateLimitError,
    RequestTimeoutError,
    TooLargeError,
    TopicError,
    UnavailableError,
    challenge,
    plain_problem,
)
from core.errors import problem as problem_document
from core.gateway import Gateway
from core.identity import Identity
from core.limits import ListenerLimits
from core.listeners import Endpoint, Listening, peer_certificate, verifies_clients
from core.message import Message, envelope_json
from core.topics import parse_path, path_topic

if TYPE_CHECKING:
    from core.idps import Exchange
    from core.signin import SignIn

log = logging.getLogger("conduit.http")

SSE_KEEPALIVE = 15.0
# Seconds a verifier may keep the JWKS: a key made by a rotation signs at once, so a verifier
# that meets an unknown key id should fetch the set again rather than wait this long.
JWKS_MAX_AGE = 300
# The cookies a provider sign-in leaves: HTTP-only, Secure, SameSite=Lax.
ACCESS_COOKIE = "conduit_access"
REFRESH_COOKIE = "conduit_refresh"
SSE_WRITE_LIMIT = 256 * 1024  # bytes a stream may have unsent before messages are dropped
# Seconds a client may keep /openapi.json before asking again (with its ETag): it changes only
# with an upgrade of Conduit.
OPENAPI_MAX_AGE = 3600

# What this listener serves: path -> method -> the handler (a method of HTTPAdapter taking the
# request). A path ending in "/" is a prefix. handle() routes by this table, and the test of the
# OpenAPI description (adapters.http.openapi) checks that the two name the same operations.
# handle() dispatches the messaging prefix first, without a lookup (every publish comes that
# way), to the methods listed here; the same test checks a running adapter serves just those.
MESSAGING = "/m/"
ROUTES: dict[str, dict[str, str]] = {
    MESSAGING: {"GET": "subscribe", "POST": "publish", "PUT": "publish"},
    "/health": {"GET": "health", "HEAD": "health"},
    "/openapi.json": {"GET": "openapi", "HEAD": "openapi"},
    "/.well-known/jwks.json": {"GET": "jwks", "HEAD": "jwks"},
    "/clients/tokens": {"POST": "broker_token"},
    "/users/tokens": {"POST": "login", "DELETE": "logout"},
    "/users/tokens/refresh": {"POST": "refresh"},
    "/users/me": {"GET": "me"},
    "/password/recovery": {"POST": "recovery"},
    "/password/reset": {"POST": "reset_password"},
    "/auth/exchange": {"POST": "exchange_token", "OPTIONS": "preflight"},
    "/auth/refresh": {"POST": "refresh_exchanged", "OPTIONS": "preflight"},
    "/oauth/": {"GET": "oauth"},
}
# The prefixes handle() looks up after the exact paths, and the Allow header of a 405 on each.
_PREFIXES = tuple(path for path in ROUTES if path.endswith("/") and path != MESSAGING)
_ALLOW = {path: ", ".join(sorted(methods)) for path, methods in ROUTES.items()}


def problem(error: ConduitError) -> web.Response:
    """An RFC 9457 problem response for a refusal."""
    status = error.condition.answer.http
    headers = {"WWW-Authenticate": WWW_AUTHENTICATE} if challenge(error) else {}
    return web.Response(
        status=status,
        body=orjson.dumps(problem_document(error, status)),
        content_type=PROBLEM_JSON,
        headers=headers,
    )


def _chunk(data: bytes) -> bytes:
    """One HTTP/1.1 chunk (the event stream has no Content-Length)."""
    return b"%x\r\n%b\r\n" % (len(data), data)


class EventStream:
    """One SSE subscriber: the bus's sink hands messages to the stream, the adapter writes them.

    A message is kept as it arrives; once per loop turn the adapter encodes the messages of that
    turn, each once whatever the number of streams, and writes each stream's events in one write
    (:meth:`HTTPAdapter.flush_streams`). A connection that stops reading fills its transport
    buffer; past ``SSE_WRITE_LIMIT`` the sink refuses messages (counted drops) until the
    subscription gives up on it.
    """

    __slots__ = ("_adapter", "_pending", "closed", "finished", "transport")

    def __init__(self, adapter: HTTPAdapter, transport: asyncio.Transport) -> None:
        self._adapter = adapter
        self.transport = transport
        self._pending: list[Message] = []
        self.closed: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        # Set once the closing event is written: the response is over, and its connection may
        # carry another request, so nothing more may be written for this stream.
        self.finished = False

    def sink(self, message: Message) -> bool:
        transport = self.transport
        if transport.is_closing():
            self.end("client went away")
            return True  # not a slow subscriber: a gone one
        if transport.get_write_buffer_size() > SSE_WRITE_LIMIT:
            return False
        if not self._pending:
            self._adapter.to_flush(self)
        self._pending.append(message)
        return True

    def flush(self, encoded: dict[int, tuple[Message, bytes]]) -> None:
        """Write the pending messages as one chunk of events. ``encoded`` holds the events
        already encoded in this turn, by message."""
        pending = self._pending
        if not pending or self.finished or self.transport.is_closing():
            pending.clear()
            return
        events = []
        for message in pending:
            entry = encoded.get(id(message))
            if entry is None or entry[0] is not message:
                entry = encoded[id(message)] = (message, _event(message))
            events.append(entry[1])
        self.transport.write(_chunk(b"".join(events)))
        self._adapter.gateway.delivered(HTTPAdapter.protocol, len(pending))
        pending.clear()

    def write(self, data: bytes) -> None:
        """Write ``data`` after the events still pending (keep-alives, the closing event)."""
        self.flush({})
        if not self.transport.is_closing():
            self.transport.write(_chunk(data))

    def end(self, reason: str) -> None:
        if not self.closed.done():
            self.closed.set_result(reason)


def _event(message: Message) -> bytes:
    return envelope_json(message, b"event: message\ndata: ", b"\n\n")


class HTTPAdapter(Listening):
    protocol = "http"

    def __init__(
        self,
        gateway: Gateway,
        host: str = "0.0.0.0",
        port: int = 8008,
        ssl_context: ssl.SSLContext | None = None,
        limits: ListenerLimits | None = None,
        *,
        endpoints: Sequence[Endpoint] | None = None,
        signin: SignIn | None = None,
        exchange: Exchange | None = None,
    ) -> None:
        """Serve ``endpoints`` (plain and TLS side by side), or one endpoint made of ``host``,
        ``port`` and ``ssl_context``; ``signin``: the providers users sign in with."""
        self.gateway = gateway
        self.signin = signin
        self.exchange = exchange
        self.endpoints = list(endpoints or [Endpoint("http", host, port, ssl_context)])
        # Client certificates are read only where a listener asks for them (mutual TLS).
        self._mtls = verifies_clients(self.endpoints)
        self.limits = limits or ListenerLimits()
        self._streams: dict[Subscription, EventStream] = {}
        self._listeners: list[Listener] = []
        self._bound: dict[str, int] = {}
        self._to_flush: list[EventStream] = []
        self._loop: asyncio.AbstractEventLoop  # set by start()
        self._routes: dict[str, dict[str, Handler]] = {
            path: {method: getattr(self, name) for method, name in methods.items()}
            for path, methods in ROUTES.items()
        }

    # lifecycle
    async def start(self) -> None:
        """Listen on every endpoint (:class:`~core.listeners.ListenError` if one is taken)."""
        self._loop = asyncio.get_running_loop()
        # The request factory of the low-level server: aiohttp's own, with the gateway's payload
        # limit as the body limit.
        request_factory = functools.partial(
            web.BaseRequest,
            loop=self._loop,
            client_max_size=self.gateway.limits.max_payload,
        )
        try:
            for endpoint in self.endpoints:
                listener = Listener(
                    self.gateway,
                    self.protocol,
                    self.handle,
                    endpoint,
                    limits=self.limits,
                    request_factory=request_factory,
                )
                await listener.start()
                self._listeners.append(listener)
                self._bound[endpoint.name] = listener.port
        except BaseException:
            await self.stop(0)
            raise

    async def stop(self, timeout: float = 10.0) -> None:
        """Stop accepting, end event streams, let in-flight requests finish."""
        listeners, self._listeners = self._listeners, []
        for listener in listeners:
            await listener.stop_accepting()
        for sub in list(self._streams):
            await self.gateway.unsubscribe(sub, "server shutting down")
        await asyncio.gather(*(listener.stop(timeout) for listener in listeners))

    # dispatch
    def handle(self, request: web.BaseRequest) -> Awaitable[web.StreamResponse]:
        """Route a request (:data:`ROUTES`). Not a coroutine itself: it hands aiohttp the
        handler's coroutine, one coroutine frame less per request."""
        path = _path(request)
        method = request.method
        # MESSAGING, first and as a literal (no lookup): every publish comes this way.
        if path.startswith("/m/"):
            if method == "POST" or method == "PUT":
                return self.publish(request)
            if method == "GET":
                return self.subscribe(request)
            return _ready(_not_allowed(method, MESSAGING))
        route = path
        methods = self._routes.get(path)
        if methods is None:
            route = next((prefix for prefix in _PREFIXES if path.startswith(prefix)), "")
            methods = self._routes.get(route)
        if methods is None:
            return _ready(
                self._refuse(
                    TopicError(f"{path} is not a messaging path", "path", Condition.NOT_FOUND)
                )
            )
        handler = methods.get(method)
        if handler is None:
            return _ready(_not_allowed(method, route))
        return handler(request)

    # handlers
    def _refuse(self, error: ConduitError, client_id: str | None = None) -> web.Response:
        self.gateway.refused(self.protocol, error, client_id)
        return problem(error)

    def _credentials(self, request: web.BaseRequest) -> Credentials:
        """The request's Authorization header, and its TLS client certificate if any."""
        header = request.headers.get("Authorization")
        if self._mtls:
            der = peer_certificate(request.transport)
            if der is not None:
                return with_certificate(header, der)
        return from_authorization(header)

    async def _identity(self, request: web.BaseRequest) -> Identity:
        credentials = self._credentials(request)
        identity = self.gateway.authenticate_nowait(credentials)
        return identity or await self.gateway.authenticate(credentials)

    async def health(self, request: web.BaseRequest) -> web.Response:
        status = await self.gateway.health()
        return web.Response(
            status=200 if status["status"] == "ok" else 503,
            body=orjson.dumps(status),
            content_type="application/json",
        )

    async def openapi(self, request: web.BaseRequest) -> web.Response:
        """``GET /openapi.json``: the OpenAPI 3.1 description of this listener, with an ETag
        (``If-None-Match`` answers 304)."""
        body, etag = _openapi_document()
        headers = {"Cache-Control": f"public, max-age={OPENAPI_MAX_AGE}", "ETag": etag}
        if _etag_matches(request.headers.get("If-None-Match"), etag):
            return web.Response(status=304, headers=headers)
        return web.Response(body=body, content_type="application/json", headers=headers)

    async def broker_token(self, request: web.BaseRequest) -> web.Response:
        """``POST /clients/tokens``: a client's secret (or certificate) traded for a broker
        token; an optional JSON body ``{"ttl": seconds}`` asks for a shorter life."""
        identity: Identity | None = None
        try:
            identity = await self._identity(request)
            ttl = await self._ttl(request)
            token, expires = await self.gateway.broker_token(identity, ttl)
        except ConduitError as exc:
            return self._refuse(exc, identity.client_id if identity else None)
        except ValueError as exc:
            return _problem(400, "Invalid request", str(exc))
        body = {"token": token, "token_type": "Bearer", "expires_at": expires}
        return web.Response(
            body=orjson.dumps(body),
            content_type="application/json",
            headers={"Cache-Control": "no-store"},
        )

    async def _ttl(self, request: web.BaseRequest) -> float | None:
        if not request.can_read_body:
            return None
        data = await self._body(request)
        if not data.strip():
            return None
        try:
            body = orjson.loads(data)
        except orjson.JSONDecodeError:
            raise ValueError("the body is not valid JSON") from None
        if not isinstance(body, dict) or set(body) - {"ttl"}:
            raise ValueError('the body is a JSON object with at most "ttl"')
        ttl = body.get("ttl")
        if ttl is not None and (not isinstance(ttl, int | float) or isinstance(ttl, bool)):
            raise ValueError("'ttl' is a number of seconds")
        return ttl

    # users: sign in, refresh, sign out
    async def _fields(self, request: web.BaseRequest, *names: str) -> list[str]:
        """The named string fields of a JSON object body (ValueError otherwise)."""
        try:
            body = orjson.loads(await self._body(request))
        except orjson.JSONDecodeError:
            raise ValueError("the body is not valid JSON") from None
        if not isinstance(body, dict):
            raise ValueError("the body is a JSON object")
        values = [body.get(name) for name in names]
        for name, value in zip(names, values, strict=True):
            if not isinstance(value, str):
                raise ValueError(f"{name!r} is required (a string)")
        return values  # type: ignore[return-value]

    async def _users_call(
        self, request: web.BaseRequest, names: tuple[str, ...], call: Any
    ) -> web.Response:
        users = self.gateway.users
        if users is None:
            return _problem(404, "Not found", "this gateway has no users")
        try:
            answer = await call(users, *(await self._fields(request, *names)))
        except ConduitError as exc:
            return self._refuse(exc)
        except ValueError as exc:  # a bad body, email or password (core.users.InvalidUser)
            return _problem(400, "Invalid request", str(exc))
        if answer is None:
            return web.Response(status=204)
        return web.Response(
            body=orjson.dumps(answer),
            content_type="application/json",
            headers={"Cache-Control": "no-store"},
        )

    async def login(self, request: web.BaseRequest) -> web.Response:
        """``POST /users/tokens`` ``{email, password}``: an access and a refresh token."""
        source = request.remote
        return await self._users_call(
            request, ("email", "password"), lambda u, e, p: u.login(e, p, source)
        )

    async def refresh(self, request: web.BaseRequest) -> web.Response:
        """``POST /users/tokens/refresh`` ``{refresh_token}``: a new pair; the one used is
        spent."""
        return await self._users_call(request, ("refresh_token",), lambda u, t: u.refresh(t))

    async def logout(self, request: web.BaseRequest) -> web.Response:
        """``DELETE /users/tokens`` ``{refresh_token}``: the sign-in ends (204)."""
        return await self._users_call(request, ("refresh_token",), lambda u, t: u.logout(t))

    async def recovery(self, request: web.BaseRequest) -> web.Response:
        """``POST /password/recovery`` ``{email}``: 202 whether the email is a user's or not;
        a user gets a recovery key by mail."""

        async def ask(users: Any, email: str) -> None:
            users.request_recovery(email)

        users = self.gateway.users
        if users is not None and users.mailer is None:
            return _problem(404, "Not found", "password recovery is off (no smtp_host)")
        response = await self._users_call(request, ("email",), ask)
        if response.status == 204:
            response = web.Response(status=202)
        return response

    async def reset_password(self, request: web.BaseRequest) -> web.Response:
        """``POST /password/reset`` ``{key, password}``: the new password (204); every sign-in
        of the user ends."""
        return await self._users_call(
            request, ("key", "password"), lambda u, k, p: u.reset_password(k, p)
        )

    # external identity providers
    async def preflight(self, request: web.BaseRequest) -> web.Response:
        """A browser's CORS preflight of the exchange: allowed for an origin one of the
        domains' providers lists (``cors_origins``)."""
        origin = request.headers.get("Origin")
        if self.exchange is None or origin is None or origin not in await self.exchange.origins():
            return web.Response(status=403, headers={"Vary": "Origin"})
        return web.Response(status=204, headers={
            "Access-Control-Allow-Origin": origin, "Access-Control-Allow-Methods": "POST",
            "Access-Control-Allow-Headers": "Content-Type", "Access-Control-Max-Age": "600",
            "Vary": "Origin",
        })  # fmt: skip

    def exchange_token(self, request: web.BaseRequest) -> Awaitable[web.Response]:
        """``POST /auth/exchange``."""
        return self._exchange_or_refresh(request, refresh=False)

    def refresh_exchanged(self, request: web.BaseRequest) -> Awaitable[web.Response]:
        """``POST /auth/refresh``."""
        return self._exchange_or_refresh(request, refresh=True)

    async def _exchange_or_refresh(self, request: web.BaseRequest, refresh: bool) -> web.Response:
        """The exchange or the refresh, and for a browser the CORS header when its origin is
        one the request's domain allows (any domain's, when the domain is not known)."""
        body: dict[str, Any] = {}
        response = await self._exchange_token(request, refresh, body)
        origin = request.headers.get("Origin")
        if origin is not None and self.exchange is not None:
            domain = body.get("domain") if isinstance(body.get("domain"), str) else None
            if origin in await self.exchange.origins(domain):
                response.headers["Access-Control-Allow-Origin"] = origin
            response.headers["Vary"] = "Origin"
        return response

    async def _exchange_token(
        self, request: web.BaseRequest, refresh: bool, read: dict[str, Any]
    ) -> web.Response:
        """``POST /auth/exchange`` ``{domain, provider, token, ttl?}``: broker credentials for
        a token of the domain's identity provider; ``POST /auth/refresh`` ``{token_id,
        password}``: fresh ones for the current. Each failure has its own problem ``type``."""
        if self.exchange is None:
            return _problem(404, "Not found", "this gateway exchanges no tokens")
        try:
            body = orjson.loads(await self._body(request))
        except orjson.JSONDecodeError:
            return self._exchange_refusal(400, "invalid-request", "the body is not valid JSON")
        except ConduitError as exc:
            return self._refuse(exc)
        if isinstance(body, dict) and not refresh:
            read.update(body)
        fields = ("token_id", "password") if refresh else ("domain", "provider", "token")
        if not isinstance(body, dict) or not all(isinstance(body.get(k), str) for k in fields):
            names = " and ".join(f"'{k}'" for k in fields)
            return self._exchange_refusal(400, "invalid-request", f"{names} are required (strings)")
        ttl = body.get("ttl")
        if ttl is not None and (not isinstance(ttl, int) or isinstance(ttl, bool)):
            return self._exchange_refusal(400, "invalid-request", "'ttl' is a number of seconds")
        from core.idps import NotRegistered, ProviderError, SessionEnded

        try:
            self.exchange.check_rate(None if refresh else body["domain"], request.remote)
            if refresh:
                answer = await self.exchange.refresh(body["token_id"], body["password"])
            else:
                answer = await self.exchange.exchange(
                    body["domain"], body["provider"], body["token"], ttl
                )
        except NotRegistered as exc:
            return self._exchange_refusal(404, f"{exc.what}-not-found", str(exc))
        except AuthorizationError as exc:
            return self._exchange_refusal(403, "no-rule-matched", exc.detail)
        except RateLimitError as exc:
            response = self._exchange_refusal(429, "rate-limited", exc.detail)
            response.headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after or 1)))
            return response
        except SessionEnded as exc:
            return self._exchange_refusal(401, "session-ended", exc.detail)
        except AuthenticationError as exc:
            expired = exc.detail == "the token has expired"
            kind = "token-expired" if expired else "token-invalid"
            if exc.detail == "the token's subject was revoked":
                kind = "subject-revoked"
            return self._exchange_refusal(401, kind, exc.detail)
        except UnavailableError as exc:
            return self._exchange_refusal(503, "provider-unreachable", exc.detail)
        except ProviderError as exc:
            return self._exchange_refusal(503, "provider-misconfigured", str(exc))
        except ValueError as exc:
            return self._exchange_refusal(400, "invalid-request", str(exc))
        if self.exchange.listeners is not None:
            from core.idps import endpoint_urls

            host = request.url.host or "localhost"
            answer["endpoints"] = endpoint_urls(host, self.exchange.listeners())
        return web.Response(
            body=orjson.dumps(answer),
            content_type="application/json",
            headers={"Cache-Control": "no-store"},
        )

    def _exchange_refusal(self, status: int, kind: str, detail: str) -> web.Response:
        """Log and count a refused exchange or refresh (sampled: anyone can send them), and
        answer it."""
        self.gateway.refused_input(self.protocol, "exchange_" + kind.replace("-", "_"), detail)
        return _exchange_problem(status, kind, detail)

    # sign-in with an identity provider
    async def oauth(self, request: web.BaseRequest) -> web.Response:
        """``GET /oauth/<provider>/login`` and ``/oauth/<provider>/callback``."""
        if self.signin is None:
            return _problem(404, "Not found", "this gateway has no sign-in providers")
        path = _path(request)
        parts = path.split("/")
        if len(parts) != 4 or parts[3] not in ("login", "callback"):
            return _problem(404, "Not found", f"{path} is not a sign-in path")
        from core.signin import SignInError, cookie_name

        name, step = parts[2], parts[3]
        try:
            provider = self.signin.provider(name)
        except SignInError as exc:
            return _problem(404, "Not found", str(exc))
        login_cookie = cookie_name(name)
        scope = f"/oauth/{name}/"
        if step == "login":
            try:
                url, sealed = await self.signin.start(name)
            except SignInError as exc:
                return _redirect(provider.failure_url, {"error": str(exc)})
            response = _redirect(url)
            response.set_cookie(login_cookie, sealed, max_age=600, path=scope, httponly=True,
                                secure=True, samesite="Lax")  # fmt: skip
            return response
        params = {k: v for k, v in request.query.items()}
        try:
            user, pair = await self.signin.finish(name, params, request.cookies.get(login_cookie))
        except SignInError as exc:
            log.info("sign-in with %s refused: %s", name, exc)
            response = _redirect(provider.failure_url, {"error": str(exc)})
        else:
            log.info("user %s signed in with %s", user.id, name)
            response = _redirect(provider.success_url)
            now = time.time()
            for cookie, token, expires, where in (
                (ACCESS_COOKIE, pair["access_token"], pair["expires_at"], "/"),
                (REFRESH_COOKIE, pair["refresh_token"], pair["refresh_expires_at"],
                 "/users/tokens"),
            ):  # fmt: skip
                response.set_cookie(cookie, token, max_age=int(expires - now), path=where,
                                    httponly=True, secure=True, samesite="Lax")  # fmt: skip
        response.del_cookie(login_cookie, path=scope)
        return response

    async def me(self, request: web.BaseRequest) -> web.Response:
        """``GET /users/me``: the signed-in user (an access token as Bearer, or the cookie a
        provider sign-in left)."""
        users = self.gateway.users
        header = request.headers.get("Authorization", "")
        token = header[7:].strip() if header[:7].lower() == "bearer " else ""
        token = token or request.cookies.get(ACCESS_COOKIE, "")
        if users is None or not token:
            return _problem(401, "Unauthorized", "sign in first: no access token")
        try:
            principal = await users.principal(token)
        except ConduitError as exc:
            return _problem(401, "Unauthorized", exc.detail)
        assert principal.user is not None
        body = {"id": principal.user.id, "email": principal.user.email,
                "name": principal.user.name, "roles": principal.roles}  # fmt: skip
        return web.Response(
            body=orjson.dumps(body),
            content_type="application/json",
            headers={"Cache-Control": "no-store"},
        )

    async def jwks(self, request: web.BaseRequest) -> web.Response:
        """``GET /.well-known/jwks.json``: the keys that verify Conduit's tokens."""
        if self.gateway.tokens is None:
            return _problem(404, "Not found", "this gateway issues no tokens")
        return web.Response(
            body=orjson.dumps(self.gateway.tokens.keyring.jwks()),
            content_type="application/json",
            headers={"Cache-Control": f"public, max-age={JWKS_MAX_AGE}"},
        )

    async def publish(self, request: web.BaseRequest) -> web.StreamResponse:
        self.gateway.metrics.reqs[self.protocol].value += 1
        identity: Identity | None = None
        try:
            # _identity() and _body(), with their common case inline (no coroutine each).
            credentials = (
                self._credentials(request)
                if self._mtls
                else from_authorization(request.headers.get("Authorization"))
            )
            identity = self.gateway.authenticate_nowait(credentials)
            if identity is None:
                identity = await self.gateway.authenticate(credentials)
            content_type = normalize(request.headers.get("Content-Type"))
            content = request.content
            # When the whole body came with the headers (a small POST), it is taken from the
            # buffer. request.read() loops on the stream for the same bytes: a bare low-level
            # aiohttp server answered in 144k instructions per request without it, 165k with.
            body = content.read_nowait() if content.is_eof() else await self._body(request)
            topic = path_topic(_path(request))
            if not self.gateway.publish_nowait(identity, topic, body, content_type, self.protocol):
                await self.gateway.publish(identity, topic, body, content_type, self.protocol)
        except ConduitError as exc:
            response = self._refuse(exc, identity.client_id if identity else None)
            if isinstance(exc, RequestTimeoutError):
                response.force_close()  # the rest of the body would be read as a request
            return response
        return Accepted()

    async def _body(self, request: web.BaseRequest) -> bytes:
        """The request body as it arrives. Past the gateway's payload limit it raises, before
        reading when the length is announced (the gateway checks the size it is given too)."""
        limit = self.gateway.limits.max_payload
        length = request.content_length
        if length is not None and length > limit:
            raise TooLargeError(f"body of {length} bytes exceeds {limit}")
        expect = request.headers.get("Expect")
        if expect is not None and expect.lower() == "100-continue" and request.version >= (1, 1):
            # The client waits for this before sending the body (RFC 9110 sec 10.1.1);
            # aiohttp's low-level server leaves it to the handler.
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        timeout = self.limits.body_timeout
        try:
            async with asyncio.timeout(timeout):
                return await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise TooLargeError(f"body exceeds {limit} bytes") from None
        except TimeoutError:
            raise RequestTimeoutError(f"the body did not arrive within {timeout:g} s") from None

    def to_flush(self, stream: EventStream) -> None:
        """Have a stream's pending messages written at the end of this loop turn."""
        if not self._to_flush:
            # The loop kept at start: asyncio.get_running_loop() makes a getpid() system call
            # on Python 3.11 (strace).
            self._loop.call_soon(self.flush_streams)
        self._to_flush.append(stream)

    def flush_streams(self) -> None:
        """Write the messages of the turn to every stream that has some. They are encoded here
        rather than as each arrives: encoding them in one run cost about 3 us less per message
        under load (40.7 against 43.6 us of CPU per publish, docs/performance.md), for the same
        instructions."""
        streams, self._to_flush = self._to_flush, []
        encoded: dict[int, tuple[Message, bytes]] = {}
        for stream in streams:
            stream.flush(encoded)

    async def subscribe(self, request: web.BaseRequest) -> web.StreamResponse:
        self.gateway.metrics.reqs[self.protocol].inc()
        if "text/event-stream" not in request.headers.get("Accept", ""):
            return _problem(
                406,
                "Not acceptable",
                "GET subscribes with Server-Sent Events: send Accept: text/event-stream",
            )
        transport = request.transport
        if transport is None:  # the client is already gone
            return web.Response(status=499)
        stream = EventStream(self, transport)
        identity: Identity | None = None
        try:
            identity = await self._identity(request)
            sub = await self.gateway.subscribe(
                identity,
                parse_path(_path(request)),
                self.protocol,
                sink=stream.sink,
                on_close=lambda _sub, reason: stream.end(reason),
            )
        except ConduitError as exc:
            return self._refuse(exc, identity.client_id if identity else None)
        self._streams[sub] = stream
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",
            }
        )
        try:
            await response.prepare(request)
            # Through aiohttp's writer first, so the headers are sent before any direct write.
            await response.write(b": subscribed to " + str(sub.filter).encode() + b"\n\n")
            while True:
                done, _ = await asyncio.wait((stream.closed,), timeout=SSE_KEEPALIVE)
                if done:
                    break
                stream.write(b": keep-alive\n\n")
                if transport.is_closing():
                    stream.end("client went away")
            reason = stream.closed.result()
            stream.write(b"event: close\ndata: " + orjson.dumps({"reason": reason}) + b"\n\n")
            stream.finished = True
            with contextlib.suppress(ConnectionError):
                await response.write_eof()
        except ConnectionError:
            pass
        finally:
            del self._streams[sub]
            await self.gateway.unsubscribe(sub, "stream closed")
        return response


async def _ready(response: web.StreamResponse) -> web.StreamResponse:
    return response


def _path(request: web.BaseRequest) -> str:
    """The decoded path. Topic paths rarely hold an escape or a query, and then the raw path
    is the path, without building it through yarl."""
    raw = request.raw_path
    if "%" in raw or "?" in raw:
        return request.path
    return raw


class Accepted(web.StreamResponse):
    """``202 Accepted`` with an empty body, the answer to every publish.

    On a keep-alive HTTP/1.1 request, the usual case, the response is bytes made once a second
    (for the ``Date`` header): the same status line and headers that aiohttp writes, without
    building them per request. That machinery (headers object, preparation, serialization)
    cost 34k of 246k instructions per publish under load (callgrind, docs/performance.md).
    They go to the transport at once when nothing is waiting to be sent, else through the
    request's writer, which waits for the client to read (aiohttp's flow control). Any other
    request (HTTP/1.0, ``Connection: close``) gets aiohttp's own response.
    """

    _direct = False

    def __init__(self) -> None:
        super().__init__(status=202)

    async def prepare(self, request: web.BaseRequest) -> AbstractStreamWriter | None:
        if request.version != HttpVersion11 or not request.keep_alive:
            self.content_length = 0
            return await super().prepare(request)
        self._direct = True
        transport = request.transport
        if transport is not None and not transport.get_write_buffer_size():
            transport.write(_accepted_bytes())
        else:  # the client is behind on reading: the writer waits until it catches up
            await request.writer.write_eof(_accepted_bytes())
        return None

    async def write_eof(self, data: bytes = b"") -> None:
        if not self._direct:
            await super().write_eof(data)

    @property
    def keep_alive(self) -> bool | None:
        return True if self._direct else super().keep_alive


_ACCEPTED = b"HTTP/1.1 202 Accepted\r\nContent-Length: 0\r\nServer: %s\r\nDate: %s\r\n\r\n"
_accepted_cache: tuple[int, bytes] = (0, b"")


def _accepted_bytes() -> bytes:
    """The bytes of :class:`Accepted`, remade when the second changes."""
    global _accepted_cache
    second, data = _accepted_cache
    now = int(time.time())
    if now != second:
        date = email.utils.formatdate(now, usegmt=True)
        data = _ACCEPTED % (SERVER_SOFTWARE.encode(), date.encode())
        _accepted_cache = (now, data)
    return data


def _exchange_problem(status: int, kind: str, detail: str) -> web.Response:
    """A refusal of the token exchange, with a stable ``type`` an SDK can switch on."""
    body = {"type": f"urn:conduit:exchange:{kind}", "title": kind.replace("-", " "),
            "status": status, "detail": detail}  # fmt: skip
    return web.Response(status=status, body=orjson.dumps(body), content_type=PROBLEM_JSON)


@functools.cache
def _openapi_document() -> tuple[bytes, str]:
    """The description as served, made once, and its entity tag."""
    body = orjson.dumps(openapi_spec())
    return body, f'"{hashlib.sha256(body).hexdigest()[:32]}"'


def _etag_matches(header: str | None, etag: str) -> bool:
    """Whether an ``If-None-Match`` value names ``etag`` (weak comparison, RFC 9110 13.1.2)."""
    if not header:
        return False
    tags = [tag.strip().removeprefix("W/") for tag in header.split(",")]
    return "*" in tags or etag in tags


def _not_allowed(method: str, route: str) -> web.Response:
    """405 for a method the route does not serve, with the methods it does."""
    response = _problem(405, "Method not allowed", f"{method} is not allowed here")
    response.headers["Allow"] = _ALLOW[route]
    return response


def _redirect(url: str, query: dict[str, str] | None = None) -> web.Response:
    """A 302 to ``url``, with ``query`` added to its own."""
    if query:
        url = str(URL(url).update_query(query))
    return web.Response(status=302, headers={"Location": url, "Cache-Control": "no-store"})


def _problem(status: int, title: str, detail: str) -> web.Response:
    body = orjson.dumps(plain_problem(status, title, detail))
    return web.Response(status=status, body=body, content_type=PROBLEM_JSON)
