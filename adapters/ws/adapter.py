"""WebSocket adapter (``websockets``): the upgrade path is the topic.

``GET /m/<domain>/c/<channel>[/<subtopic>...]`` with ``Upgrade: websocket`` opens a connection
bound to that topic. Frames the client sends are published to it; every message published on it,
by any protocol, is written to the client. A subtopic with ``+`` or ``#`` (``#`` sent as ``%23``)
makes the connection a subscriber only.

Rights, checked at the upgrade:

- a concrete topic subscribes when the client has the subscribe right and accepts frames when it
  has the publish right; with neither the upgrade is refused (403). ``?mode=publish`` or
  ``?mode=subscribe`` asks for one role only, and is refused (403) without that right;
- a wildcard topic needs the subscribe right; frames sent on it close the connection (1008).

A ``format=envelope`` connection takes an in-band ``{"type": "auth", "token": ...}`` message: a
fresh broker token of the same client, which renews the connection's rights and expiry in place
(answered ``{"type": "auth", "status": "ok", ...}``; refused with a close 1008).

Query parameters: ``authorization`` (credentials, for browsers, which cannot set headers on a
WebSocket; the ``Authorization`` header wins when both are sent), ``ct`` (content type of the
frames the client sends; default ``application/json`` for text frames and
``application/octet-stream`` for binary frames), ``format`` (``raw``, the default: each message
as its payload; ``envelope``: a JSON object per message), ``mode`` (see above).

Refusals at the upgrade are HTTP responses with an ``application/problem+json`` body (status
from the error table: 401, 403, 400, 404, 415, 503); once open, a refused frame closes the
connection with the table's close code (1007, 1008, 1009, 1011) and the refusal's detail as the
reason. Nothing is published unless every check passed.

Delivery writes pre-encoded frames through a bounded :class:`~adapters.ws.outbox.Outbox` per
connection; the size limit (close 1009) and the closing handshake are ``websockets``'; the
keep-alive pings are the adapter's (in rounds, one timer for many connections, instead of the
library's task per connection). On :meth:`WSAdapter.stop` connections are closed with 1001.
``GET /`` (no upgrade) serves a small live dashboard page (``live.html``).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import hashlib
import http
import importlib.resources
import logging
import math
import re
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, cast
from urllib.parse import parse_qs, unquote, urlsplit

import orjson
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConcurrencyError, ConnectionClosed
from websockets.http11 import Request, Response
from websockets.protocol import CONNECTING, OPEN

from adapters.ws.frames import FORMATS, FrameCache
from adapters.ws.outbox import Outbox
from core.bus import Subscription
from core.content import JSON, OCTETS, normalize
from core.credentials import Credentials, from_authorization, is_token, with_certificate
from core.errors import (
    PROBLEM_JSON,
    WWW_AUTHENTICATE,
    AuthenticationError,
    AuthorizationError,
    Condition,
    ConduitError,
    TooLargeError,
    TopicError,
    UnavailableError,
    challenge,
    plain_problem,
    problem,
)
from core.gateway import Gateway
from core.identity import Identity
from core.limits import ListenerLimits
from core.listeners import Endpoint, ListenError, Listening, peer_certificate, verifies_clients
from core.noise import redact
from core.topics import Topic, TopicFilter, parse_filter, parse_path

log = logging.getLogger("conduit.ws")

MODES = ("publish", "subscribe")
GOING_AWAY = 1001
POLICY_VIOLATION = 1008
INTERNAL_ERROR = 1011
MAX_REASON_BYTES = 123  # RFC 6455 5.5: a close frame's payload is at most 125 bytes


@dataclass(slots=True)
class Session:
    """What the upgrade decided for one connection."""

    identity: Identity
    filter: TopicFilter
    topic: Topic | None  # where frames are published; None when they are refused
    refusal: ConduitError | None  # why frames are refused, when topic is None
    subscribes: bool
    content_type: str | None  # of published frames; None: by frame kind
    envelope: bool
    publishes: bool = False  # frames may be published (a concrete topic, not mode=subscribe)
    certificate: bytes | None = None  # the client certificate of the upgrade (mutual TLS)


_TOO_MANY = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/problem+json\r\n"
    b"Connection: close\r\nRetry-After: 5\r\nContent-Length: %d\r\n\r\n%b"
)


_READ = Headers()  # what a connection keeps of its upgrade's headers, once read; never written


class WSConnection(ServerConnection):
    """A websockets server connection that carries its session and wakes its outbox when the
    transport has room again. Each adapter makes its own subclass, with ``adapter`` set."""

    # Slots: set after websockets' own attributes, they would make the instance's dict grow
    # past its shared keys (1.5 kB per connection).
    __slots__ = ("next_ping", "outbox", "refused", "session", "unregister")
    adapter: WSAdapter

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.session: Session | None = None
        self.outbox: Outbox | None = None
        self.refused = False  # Conduit closed it for a refusal (already counted)
        self.unregister: Callable[[], None] | None = None  # from the gateway's connections
        self.next_ping: int | None = None  # the keep-alive round of its next ping

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        adapter = self.adapter
        if len(adapter.tcp_connections) >= adapter.limits.max_connections:
            adapter.gateway.refused_input(
                adapter.protocol, "connection_limit", "too many connections", None
            )
            body = orjson.dumps(
                plain_problem(503, "Service Unavailable", "too many connections; retry later")
            )
            transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
            transport.write(_TOO_MANY % (len(body), body))
            transport.close()
            return
        adapter.tcp_connections.add(self)
        super().connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.adapter.no_ping(self)
        if self in self.adapter.tcp_connections:
            self.adapter.tcp_connections.discard(self)
            super().connection_lost(exc)

    def resume_writing(self) -> None:
        super().resume_writing()
        # asyncio's transports allow writing from resume_writing (it "may append to buffer").
        if self.outbox is not None:
            self.outbox.flush()


async def _discard(connection: ServerConnection) -> None:
    """Read and drop what the client still sends, until the connection closes (unless the
    connection's own task is reading already: then it drains it)."""
    with contextlib.suppress(ConnectionClosed, ConcurrencyError):
        while True:
            await connection.recv()


class _RedactingLogger(logging.LoggerAdapter):  # type: ignore[type-arg]
    """What websockets logs, without credentials: at debug level it logs each request line
    (with ``?authorization=``) and each header (with ``Authorization``)."""

    def log(self, level: int, msg: object, *args: object, **kwargs: Any) -> None:
        if self.isEnabledFor(level):
            text = str(msg) % args if args else str(msg)
            self.logger.log(level, "%s", redact(text), **kwargs)


def close_reason(text: str) -> str:
    """A close reason within the 123 bytes a close frame allows, cut on a character boundary."""
    data = text.encode()
    if len(data) <= MAX_REASON_BYTES:
        return text
    return data[: MAX_REASON_BYTES - 3].decode(errors="ignore") + "..."


def refusal_response(error: ConduitError) -> Response:
    """The HTTP answer refusing an upgrade: the error table's status, an RFC 9457 body."""
    cond = error.condition
    status = cond.answer.ws_upgrade or cond.answer.http
    body = orjson.dumps(problem(error, status))
    headers = Headers(
        [
            ("Connection", "close"),
            ("Content-Type", PROBLEM_JSON),
            ("Content-Length", str(len(body))),
        ]
    )
    if challenge(error):
        headers["WWW-Authenticate"] = WWW_AUTHENTICATE
    return Response(status, http.HTTPStatus(status).phrase, headers, body)


def auth_token(frame: str) -> str | None:
    """The token of an in-band ``{"type": "auth", "token": "<broker token>"}`` message, or None
    when the frame is not one (then it is published like any other). AuthenticationError for
    an ``auth`` message without a token."""
    if '"auth"' not in frame or not frame.lstrip().startswith("{"):
        return None
    try:
        message = orjson.loads(frame)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(message, dict) or message.get("type") != "auth":
        return None
    token = message.get("token")
    if not isinstance(token, str) or not is_token(token):
        raise AuthenticationError("an auth message carries a broker token (a JWT) as 'token'")
    return token


def _first(query: dict[str, list[str]], name: str) -> str | None:
    values = query.get(name)
    return values[0] if values else None


class Dashboard:
    """The live page served on ``GET /``, with a Content-Security-Policy that allows exactly its
    own inline script and style, and WebSocket connections to this server."""

    def __init__(self) -> None:
        page = importlib.resources.files("adapters.ws").joinpath("live.html").read_bytes()
        self.body = page

        def digest(tag: str) -> str:
            match = re.search(rb"<%s>(.*?)</%s>" % (tag.encode(), tag.encode()), page, re.S)
            content = match.group(1) if match else b""
            return "'sha256-" + base64.b64encode(hashlib.sha256(content).digest()).decode() + "'"

        self.csp = (
            "default-src 'none'; "
            f"script-src {digest('script')}; style-src {digest('style')}; "
            "connect-src 'self' ws: wss:; img-src data:; "
            "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
        )

    def response(self) -> Response:
        headers = Headers(
            [
                ("Content-Type", "text/html; charset=utf-8"),
                ("Content-Length", str(len(self.body))),
                ("Cache-Control", "no-cache"),
                ("X-Content-Type-Options", "nosniff"),
                ("Content-Security-Policy", self.csp),
                ("Connection", "close"),
            ]
        )
        return Response(200, "OK", headers, self.body)


class WSAdapter(Listening):
    """The WebSocket listener. ``port`` is the bound port once started (when 0 was given)."""

    protocol = "ws"

    def __init__(
        self,
        gateway: Gateway,
        host: str = "0.0.0.0",
        port: int = 8186,
        ssl_context: ssl.SSLContext | None = None,
        *,
        ping_interval: float | None = 20.0,
        ping_timeout: float | None = 20.0,
        close_timeout: float = 10.0,
        write_limit: int = 64 * 1024,
        origins: list[str] | None = None,
        dashboard: bool = True,
        limits: ListenerLimits | None = None,
        endpoints: Sequence[Endpoint] | None = None,
    ) -> None:
        """``ping_interval``/``ping_timeout``: keep-alive (None disables it); ``write_limit``:
        bytes a connection's transport buffers before its outbox backlog takes over;
        ``origins``: the browser origins allowed (None: any, since credentials are never
        ambient cookies; clients that send no ``Origin`` header, devices, are not browsers and
        are always allowed); ``dashboard``: serve the live page on ``GET /``; ``limits``:
        ``header_timeout`` bounds the whole upgrade (request head, checks, 101) and
        ``max_connections`` the open connections, of all endpoints together; ``endpoints``:
        where to listen (plain and TLS), else one endpoint of ``host``, ``port`` and
        ``ssl_context``."""
        self.gateway = gateway
        self.endpoints = list(endpoints or [Endpoint("ws", host, port, ssl_context)])
        self._mtls = verifies_clients(self.endpoints)
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self.close_timeout = close_timeout
        self.write_limit = write_limit
        self.origins = origins
        self.dashboard = Dashboard() if dashboard else None
        self.limits = limits or ListenerLimits()
        # Every TCP connection, upgraded or not (websockets' own list has the upgraded ones).
        self.tcp_connections: set[WSConnection] = set()
        self._connection_class = type("WSConnection", (WSConnection,), {"adapter": self})
        self._servers: list[Server] = []
        self._bound: dict[str, int] = {}
        self._frames = FrameCache()
        self._tasks: set[asyncio.Task[None]] = set()
        self._rounds: dict[int, set[WSConnection]] = {}  # keep-alive rounds, by due time
        self._stopping = False
        self._uncounted = 0
        self._count_scheduled = False

    # lifecycle
    async def start(self) -> None:
        """Listen on every endpoint (:class:`~core.listeners.ListenError` if one is taken)."""
        try:
            for endpoint in self.endpoints:
                try:
                    server = await serve(
                        self._serve,
                        endpoint.host,
                        endpoint.port,
                        process_request=self._upgrade,
                        create_connection=self._connection_class,
                        open_timeout=self.limits.header_timeout,
                        logger=_RedactingLogger(log.getChild("websockets"), {}),
                        compression=None,  # frames are encoded once for every subscriber
                        max_size=self.gateway.limits.max_payload,
                        ping_interval=None,  # the adapter's keep-alive (_keep_alive)
                        ping_timeout=None,
                        close_timeout=self.close_timeout,
                        write_limit=self.write_limit,
                        ssl=endpoint.tls,
                        server_header=None,
                        reuse_address=True,
                    )
                except OSError as exc:
                    raise ListenError(endpoint, exc) from exc
                self._servers.append(server)
                self._bound[endpoint.name] = server.sockets[0].getsockname()[1]
        except BaseException:
            await self.stop(0)
            raise

    async def stop(self, timeout: float = 10.0) -> None:
        """Stop accepting, close every connection with 1001, wait up to ``timeout``."""
        servers, self._servers = self._servers, []
        if not servers:
            return
        self._stopping = True
        for server in servers:
            server.close(close_connections=True, code=GOING_AWAY, reason="server shutting down")
        for pending in list(self.tcp_connections):  # not upgraded yet: nothing to finish
            if pending.protocol.state is CONNECTING:
                pending.transport.abort()
        try:
            async with asyncio.timeout(timeout):
                await asyncio.gather(*(server.wait_closed() for server in servers))
        except TimeoutError:
            # Peers that do not read cannot complete the closing handshake.
            for server in servers:
                for connection in server.connections:
                    connection.transport.abort()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await asyncio.gather(*(server.wait_closed() for server in servers))
        self._flush_count()

    @property
    def connections(self) -> list[ServerConnection]:
        """The open WebSocket connections."""
        return [c for server in self._servers for c in server.connections]

    # upgrade
    async def _upgrade(self, connection: ServerConnection, request: Request) -> Response | None:
        """Authenticate and authorize before the 101: refusals are plain HTTP answers."""
        gateway = self.gateway
        gateway.metrics.reqs[self.protocol].inc()
        url = urlsplit(request.path)
        path = unquote(url.path)
        if self.dashboard is not None and path == "/" and "Upgrade" not in request.headers:
            return self.dashboard.response()
        identity: Identity | None = None
        try:
            if not path.startswith("/m/"):
                raise TopicError(f"{path} is not a messaging path", "path", Condition.NOT_FOUND)
            if self.origins is not None:
                origin = request.headers.get_all("Origin")
                if len(origin) > 1 or (origin and origin[0] not in self.origins):
                    raise AuthorizationError(f"origin {', '.join(origin)!r} is not allowed")
            query = parse_qs(url.query, keep_blank_values=True)
            headers = request.headers.get_all("Authorization")
            if len(headers) > 1:
                raise AuthenticationError("more than one Authorization header")
            value = headers[0] if headers else _first(query, "authorization")
            der = peer_certificate(connection.transport) if self._mtls else None
            credentials = from_authorization(value) if der is None else with_certificate(value, der)
            identity = await gateway.authenticate(credentials)
            session = await self._session(identity, parse_path(path), query)
        except ConduitError as exc:
            gateway.refused(self.protocol, exc, identity.client_id if identity else None)
            return refusal_response(exc)
        assert isinstance(connection, WSConnection)
        session.certificate = der
        connection.session = session
        return None

    async def _session(
        self, identity: Identity, topic: str, query: dict[str, list[str]]
    ) -> Session:
        flt = parse_filter(topic)
        ct = _first(query, "ct")
        content_type = normalize(ct) if ct else None
        fmt = _first(query, "format") or "raw"
        if fmt not in FORMATS:
            raise ConduitError(
                f"format {fmt!r} is not one of {', '.join(FORMATS)}", Condition.BAD_TOPIC
            )
        mode = _first(query, "mode")
        if mode is not None and mode not in MODES:
            raise ConduitError(
                f"mode {mode!r} is not one of {', '.join(MODES)}", Condition.BAD_TOPIC
            )
        envelope = fmt == "envelope"
        if flt.wildcard:
            if mode == "publish":
                raise TopicError("wildcards are not allowed when publishing", "subtopic")
            denied = await self._check(identity, flt, "subscribe")
            if denied is not None:
                raise denied
            wildcard = TopicError(
                f"{flt} has wildcards: this connection subscribes only", "subtopic"
            )
            return Session(identity, flt, None, wildcard, True, content_type, envelope)

        pub_denied = await self._check(identity, flt, "publish") if mode != "subscribe" else None
        sub_denied = await self._check(identity, flt, "subscribe") if mode != "publish" else None
        if mode == "publish" and pub_denied is not None:
            raise pub_denied
        if mode == "subscribe" and sub_denied is not None:
            raise sub_denied
        if pub_denied is not None and sub_denied is not None:
            if identity.domain != flt.domain:
                raise pub_denied
            raise AuthorizationError(
                f"client may neither publish nor subscribe on channel {flt.channel!r}"
            )
        no_publish: ConduitError | None = pub_denied
        if mode == "subscribe":
            no_publish = AuthorizationError(
                "connection opened with mode=subscribe: it cannot publish"
            )
        return Session(
            identity,
            flt,
            Topic(flt.domain, flt.channel, flt.subtopic) if no_publish is None else None,
            no_publish,
            mode != "publish" and sub_denied is None,
            content_type,
            envelope,
            publishes=mode != "subscribe",
        )

    async def _check(
        self, identity: Identity, flt: TopicFilter, action: Literal["publish", "subscribe"]
    ) -> AuthorizationError | None:
        """The refusal of ``action`` on the filter's channel, or None when allowed."""
        target = flt if action == "subscribe" else Topic(flt.domain, flt.channel, flt.subtopic)
        try:
            await self.gateway.authorize(identity, target, action)
        except AuthorizationError as exc:
            return exc
        return None

    # connection
    async def _serve(self, connection: ServerConnection) -> None:
        assert isinstance(connection, WSConnection) and connection.session is not None
        # The upgrade's headers were read: websockets keeps the request and the response
        # for the life of the connection (2-3 kB), their headers are never read again.
        assert connection.request is not None and connection.response is not None
        connection.request.headers = connection.response.headers = _READ
        session = connection.session
        gateway = self.gateway
        client_id = session.identity.client_id
        sub: Subscription | None = None
        counted = False
        connection.unregister = gateway.connected(
            session.identity, functools.partial(self._end, connection)
        )
        self._keep_alive(connection)
        try:
            if session.subscribes:
                outbox = Outbox(
                    connection,
                    self._frames.envelope if session.envelope else self._frames.raw,
                    gateway.limits.queue_size,
                    self._count,
                )
                try:
                    sub = await gateway.subscribe(
                        session.identity,
                        session.filter,
                        self.protocol,
                        sink=outbox.offer,
                        on_close=functools.partial(self._subscription_closed, connection),
                    )
                except ConduitError as exc:
                    gateway.refused(self.protocol, exc, client_id)
                    await self._close(connection, exc)
                    return
                connection.outbox = outbox
            else:
                gateway.metrics.conns[self.protocol].inc()
                counted = True
            publish = gateway.publish
            recv = connection.recv
            while True:
                data = await recv()  # ConnectionClosed when it ends
                try:
                    if session.envelope and isinstance(data, str):
                        token = auth_token(data)
                        if token is not None:
                            await self._reauthenticate(connection, token, sub)
                            continue
                    topic = session.topic
                    if topic is None:
                        assert session.refusal is not None
                        raise session.refusal
                    if isinstance(data, str):
                        payload = data.encode()
                        content_type = session.content_type or JSON
                    else:
                        payload = data
                        content_type = session.content_type or OCTETS
                    await publish(session.identity, topic, payload, content_type, self.protocol)
                except ConduitError as exc:
                    gateway.refused(self.protocol, exc, client_id)
                    await self._close(connection, exc)
                    break
        except ConnectionClosed:
            pass
        except Exception:
            log.exception("ws connection of client %s failed", client_id)
            await self._close(connection, UnavailableError("internal error"))
        finally:
            if connection.unregister is not None:
                connection.unregister()
                connection.unregister = None
            connection.outbox = None
            if sub is not None:
                await gateway.unsubscribe(sub, "connection closed")
            if counted:
                gateway.metrics.conns[self.protocol].dec()
            self._closed_by_websockets(connection, client_id)

    async def _reauthenticate(
        self, connection: WSConnection, token: str, sub: Subscription | None
    ) -> None:
        """An in-band ``auth`` message: a fresh broker token of the same client. The
        connection's rights and expiry become the new token's, in place: it publishes only if
        the new token allows it, and its subscription ends (closing it, 1008) if that is no
        longer allowed. Answered ``{"type": "auth", "status": "ok", "expires_at": ...}``;
        ConduitError when refused (the caller closes the connection with its code)."""
        session = connection.session
        assert session is not None
        gateway = self.gateway
        old = session.identity
        identity = await gateway.authenticate(
            Credentials(token=token, certificate=session.certificate)
        )
        if (identity.domain, identity.client_id) != (old.domain, old.client_id):
            raise AuthenticationError("re-authentication with another client's token")
        session.identity = identity
        if connection.unregister is not None:
            connection.unregister()
        connection.unregister = gateway.connected(
            identity, functools.partial(self._end, connection)
        )
        if session.publishes:
            flt = session.filter
            session.refusal = await self._check(identity, flt, "publish")
            session.topic = (
                Topic(flt.domain, flt.channel, flt.subtopic) if session.refusal is None else None
            )
        if sub is not None:
            await gateway.reauthenticate([sub], identity)
        expires = int(identity.expires) if identity.expires is not None else None
        answer = {"type": "auth", "status": "ok", "expires_at": expires}
        await connection.send(orjson.dumps(answer).decode())

    async def _close(self, connection: WSConnection, error: ConduitError) -> None:
        connection.refused = True
        code = error.condition.answer.ws_close or INTERNAL_ERROR
        await self._close_with(connection, code, error.detail)

    async def _close_with(self, connection: ServerConnection, code: int, reason: str) -> None:
        # close() waits for the transport to drain: a peer that stopped reading would hold it
        # forever, so the closing handshake gets close_timeout, then the TCP connection goes.
        # Frames the client sent before it saw the close are read and dropped meanwhile:
        # left in websockets' queue they would stop it reading, and the client's close frame
        # behind them would wait for the timeout.
        discard = asyncio.ensure_future(_discard(connection))
        try:
            async with asyncio.timeout(self.close_timeout):
                await connection.close(code, close_reason(reason))
        except TimeoutError:
            connection.transport.abort()
        finally:
            discard.cancel()

    # keep-alive: websockets' own is a task per connection that sleeps between pings (1.4 kB
    # each), and a timer per connection costs 0.7 kB in uvloop. Here the connections due for
    # a ping are grouped in rounds of a tenth of the interval (at most a second), one timer
    # per round: an idle connection is one entry in a set.
    def _keep_alive(self, connection: WSConnection) -> None:
        """Ping ``connection`` once ``ping_interval`` seconds have passed (up to a round more)."""
        if self.ping_interval is None or connection.protocol.state is not OPEN:
            return
        loop = asyncio.get_running_loop()
        tick = min(1.0, self.ping_interval / 10)
        due = math.ceil((loop.time() + self.ping_interval) / tick)
        round_ = self._rounds.get(due)
        if round_ is None:
            round_ = self._rounds[due] = set()
            loop.call_at(due * tick, self._ping_round, due)
        round_.add(connection)
        connection.next_ping = due

    def no_ping(self, connection: WSConnection) -> None:
        """The connection ended: out of its keep-alive round."""
        round_ = self._rounds.get(connection.next_ping) if connection.next_ping else None
        if round_ is not None:
            round_.discard(connection)
        connection.next_ping = None

    def _ping_round(self, due: int) -> None:
        loop = asyncio.get_running_loop()
        for connection in self._rounds.pop(due, ()):
            connection.next_ping = None
            task = loop.create_task(self._ping_and_wait(connection))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _ping_and_wait(self, connection: WSConnection) -> None:
        """One ping; the next one once its pong came, or a close 1011 when no pong came within
        ``ping_timeout`` (as websockets' keep-alive does)."""
        try:
            pong = await connection.ping()
            async with asyncio.timeout(self.ping_timeout):
                await pong
        except ConnectionClosed:
            return
        except TimeoutError:
            log.info("closing ws connection: no pong within %g s", self.ping_timeout)
            await self._close_with(connection, INTERNAL_ERROR, "keepalive ping timeout")
            return
        self._keep_alive(connection)

    def _subscription_closed(
        self, connection: WSConnection, sub: Subscription, reason: str
    ) -> None:
        """The bus closed the subscription (too slow, right revoked, shutdown): so goes the
        connection, with the reason."""
        self._end(connection, reason)

    def _end(self, connection: WSConnection, reason: str) -> None:
        """Close an open connection from outside its task (its subscription ended, its client
        was disabled or deleted), with the reason."""
        if connection.protocol.state is not OPEN or connection.refused:
            return
        connection.refused = True
        if connection.outbox is not None:
            connection.outbox.clear()
        code = GOING_AWAY if self._stopping or self.gateway.closing else POLICY_VIOLATION
        client_id = connection.session.identity.client_id if connection.session else "-"
        log.info("closing ws client=%s code=%d: %s", client_id, code, reason)
        task = asyncio.get_running_loop().create_task(self._close_with(connection, code, reason))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _closed_by_websockets(self, connection: WSConnection, client_id: str) -> None:
        """Count what websockets itself refused: a message over the size limit (1009)."""
        sent = connection.protocol.close_sent
        if sent is None or connection.refused:
            return
        if sent.code == TooLargeError.condition.answer.ws_close:
            self.gateway.refused(self.protocol, TooLargeError(sent.reason), client_id)
        elif sent.code not in (1000, GOING_AWAY):
            log.info("ws client=%s closed with %d: %s", client_id, sent.code, sent.reason)

    # delivery count: one metrics update per event-loop turn, not one per frame
    def _count(self, n: int) -> None:
        self._uncounted += n
        if not self._count_scheduled:
            self._count_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush_count)

    def _flush_count(self) -> None:
        self._count_scheduled = False
        if self._uncounted:
            self.gateway.delivered(self.protocol, self._uncounted)
            self._uncounted = 0
