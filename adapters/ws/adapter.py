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

Each connection is an asyncio protocol of the adapter's (:class:`WSConnection`) around the
sans-I/O ``websockets.server.ServerProtocol``, as MQTT over WebSocket is: the request's parsing,
the framing, the size limit (close 1009) and the closing handshake are the library's; an idle
connection has no task. Delivery writes pre-encoded frames through a bounded
:class:`~adapters.ws.outbox.Outbox` per connection; the keep-alive pings go in rounds, one
timer for many connections. On :meth:`WSAdapter.stop` connections are closed with 1001.
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
import random
import re
import ssl
import struct
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, cast
from urllib.parse import parse_qs, unquote, urlsplit

import orjson
from websockets.datastructures import Headers
from websockets.frames import CloseCode, Frame, Opcode
from websockets.http11 import Request, Response
from websockets.protocol import CONNECTING, OPEN, Event
from websockets.server import ServerProtocol

from adapters import tls
from adapters.tls import TLSServer
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


class WSConnection(asyncio.Protocol):
    """One TCP (or TLS) connection of the listener: websockets' sans-I/O ``ServerProtocol``
    for the upgrade and the framing, and what the upgrade decided.

    Events are handled as they are read, in order, each at once when it can be (a publish
    whose rights are cached, a pong, a control frame). One that must wait (the upgrade's
    checks, a publish that waits for the bus, an ``auth`` message) goes to a short task with
    the events after it, and reading pauses until it is done: an idle connection has no task,
    and holds no timer but its keep-alive round's entry."""

    __slots__ = (
        "adapter", "busy", "closing", "counted", "fragments", "gone", "latency", "next_ping",
        "outbox", "paused", "ping", "refused", "session", "sub", "text", "timer", "transport",
        "unregister", "ws",
    )  # fmt: skip

    def __init__(self, adapter: WSAdapter) -> None:
        self.adapter = adapter
        self.transport: asyncio.Transport = None  # type: ignore[assignment]  # connection_made
        self.ws = ServerProtocol(max_size=adapter.gateway.limits.max_payload, logger=adapter.logger)
        self.session: Session | None = None
        self.outbox: Outbox | None = None
        self.sub: Subscription | None = None
        self.refused = False  # Conduit closed it for a refusal (already counted)
        self.unregister: Callable[[], None] | None = None  # from the gateway's connections
        self.next_ping: int | None = None  # the keep-alive round of its next ping
        self.ping: tuple[bytes, float] | None = None  # the ping awaiting its pong, and when
        self.latency = 0.0  # of the last ping answered, in seconds
        self.timer: asyncio.TimerHandle | None = None  # upgrade, pong or closing deadline
        self.fragments: list[bytes] | None = None  # a fragmented message's frames so far
        self.text = False  # whether that message is text
        self.counted = False  # counted in the open connections (a publisher only)
        self.busy = False  # a task handles an event; the events after it wait for it
        self.paused = False  # the transport's buffer is full
        self.closing = False  # the closing handshake started: its deadline is set
        self.gone = False  # connection_lost

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        adapter = self.adapter
        transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        self.transport = transport
        if len(adapter.tcp_connections) >= adapter.limits.max_connections:
            self.gone = True
            adapter.gateway.refused_input(
                adapter.protocol, "connection_limit", "too many connections", None
            )
            body = orjson.dumps(
                plain_problem(503, "Service Unavailable", "too many connections; retry later")
            )
            transport.write(_TOO_MANY % (len(body), body))
            transport.close()
            return
        adapter.tcp_connections.add(self)
        transport.set_write_buffer_limits(adapter.write_limit)
        self.deadline(adapter.limits.header_timeout, transport.abort)

    def data_received(self, data: bytes) -> None:
        if self.gone:
            return
        try:
            self.ws.receive_data(data)
        except EOFError:  # data after the end of the stream
            return
        self.flush()
        if not self.busy:
            self._handle(self.ws.events_received())

    def eof_received(self) -> bool | None:
        self.ws.receive_eof()
        self.flush()
        if not self.busy:
            self._handle(self.ws.events_received())
        return None  # the transport closes: WebSocket has its own closing handshake

    def connection_lost(self, exc: Exception | None) -> None:
        if self.gone:
            return
        self.gone = True
        with contextlib.suppress(EOFError):
            self.ws.receive_eof()  # CLOSED: sinks and pings see it
        self.deadline(None, None)
        self.adapter.ended(self)

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        # asyncio's transports allow writing from resume_writing (it "may append to buffer").
        if self.outbox is not None:
            self.outbox.flush()

    # events
    def _handle(self, events: list[Event]) -> None:
        """Handle ``events`` in order; the first that must wait takes the rest to its task."""
        for i, event in enumerate(events):
            waiting = self._event(event)
            if waiting is not None:
                self.busy = True
                if not self.transport.is_closing():
                    self.transport.pause_reading()
                self.adapter.spawn(self._after(waiting, events[i + 1 :]))
                return
        self.flush()

    async def _after(self, waiting: Awaitable[object], events: list[Event]) -> None:
        try:
            await waiting
        except ConduitError as exc:  # a refusal of the awaited publish or re-authentication
            self.refuse(exc)
        except Exception:
            log.exception("ws connection of client %s failed", self.client_id)
            self.refuse(UnavailableError("internal error"))
        finally:
            self.busy = False
        if self.gone:
            return
        if not self.transport.is_closing():
            self.transport.resume_reading()
        self._handle(events + self.ws.events_received())

    def _event(self, event: Event) -> Awaitable[object] | None:
        if isinstance(event, Request):
            return self.adapter.open(self, event)
        if not isinstance(event, Frame):
            return None  # a server receives no HTTP response
        opcode = event.opcode
        if opcode is Opcode.PONG:
            self._pong(bytes(event.data))
            return None
        if opcode is Opcode.TEXT or opcode is Opcode.BINARY:
            if not event.fin:
                self.fragments = [bytes(event.data)]
                self.text = opcode is Opcode.TEXT
                return None
            return self._message(bytes(event.data), opcode is Opcode.TEXT)
        if opcode is Opcode.CONT and self.fragments is not None:
            self.fragments.append(bytes(event.data))
            if not event.fin:
                return None
            data, self.fragments = b"".join(self.fragments), None
            return self._message(data, self.text)
        return None  # ping, close: answered by the protocol

    def _message(self, data: bytes, text: bool) -> Awaitable[object] | None:
        """A whole message from the client: published to the connection's topic, or an
        in-band ``auth`` message (envelope format)."""
        session = self.session
        if session is None or self.refused:
            # Closed by Conduit: what the client still sends is read and dropped. (The
            # protocol's state is not the test: a close frame read with this message has
            # moved it on already, and what came before the close counts.)
            return None
        adapter = self.adapter
        try:
            if text:
                try:
                    frame = data.decode()
                except UnicodeDecodeError as exc:
                    self.fail(CloseCode.INVALID_DATA, f"{exc.reason} at position {exc.start}")
                    return None
                if session.envelope:
                    token = auth_token(frame)
                    if token is not None:
                        return adapter.reauthenticate(self, token)
            topic = session.topic
            if topic is None:
                assert session.refusal is not None
                raise session.refusal
            content_type = session.content_type or (JSON if text else OCTETS)
            published = adapter.gateway.publish_nowait(
                session.identity, topic, data, content_type, adapter.protocol
            )
            if published is None:  # rights not cached, or a bus that must wait
                return adapter.gateway.publish(
                    session.identity, topic, data, content_type, adapter.protocol
                )
        except ConduitError as exc:
            self.refuse(exc)
        return None

    # writing and closing
    def flush(self) -> None:
        """Write what the protocol has to send; at its end of stream, half-close (TCP) or
        close (TLS), and give the client ``close_timeout`` to close its side."""
        transport = self.transport
        for data in self.ws.data_to_send():
            if data:
                transport.write(data)
            else:
                if transport.can_write_eof():
                    with contextlib.suppress(Exception):  # uvloop may raise RuntimeError
                        transport.write_eof()
                else:
                    transport.close()
                self._closing()
        if not self.closing and self.ws.close_expected():
            self._closing()

    def send_text(self, text: bytes) -> None:
        if self.ws.state is OPEN:
            self.ws.send_text(text)
            self.flush()

    def refuse(self, error: ConduitError) -> None:
        """Close for a refusal (counted), with the error table's close code and the detail."""
        if self.refused:
            return
        self.adapter.gateway.refused(self.adapter.protocol, error, self.client_id)
        self.close(error.condition.answer.ws_close or INTERNAL_ERROR, error.detail)

    def close(self, code: int, reason: str) -> None:
        """Start the closing handshake (nothing more is delivered or published)."""
        self.refused = True
        if self.outbox is not None:
            self.outbox.clear()
        if self.ws.state is OPEN:
            self.ws.send_close(code, close_reason(reason))
            self.flush()

    def fail(self, code: int, reason: str) -> None:
        self.refused = True
        self.ws.fail(code, reason)
        self.flush()

    def _closing(self) -> None:
        if not self.closing:
            self.closing = True
            self.deadline(self.adapter.close_timeout, self.transport.abort)

    def deadline(self, delay: float | None, then: Callable[[], None] | None) -> None:
        """The connection's one timer: the upgrade's, the pong's or the closing's."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if delay is not None and then is not None:
            self.timer = asyncio.get_running_loop().call_later(delay, then)

    # keep-alive
    def send_ping(self) -> None:
        if self.ws.state is not OPEN or self.closing:
            return
        data = struct.pack("!I", random.getrandbits(32))
        self.ping = (data, asyncio.get_running_loop().time())
        self.ws.send_ping(data)
        self.flush()
        if self.adapter.ping_timeout is not None:
            self.deadline(self.adapter.ping_timeout, self._no_pong)

    def _pong(self, data: bytes) -> None:
        ping = self.ping
        if ping is None or data != ping[0] or self.closing:
            return  # unsolicited
        self.latency = asyncio.get_running_loop().time() - ping[1]
        self.ping = None
        self.deadline(None, None)
        self.adapter.keep_alive(self)

    def _no_pong(self) -> None:
        self.timer = None
        log.info("closing ws connection: no pong within %g s", self.adapter.ping_timeout)
        self.close(INTERNAL_ERROR, "keepalive ping timeout")

    @property
    def client_id(self) -> str:
        return self.session.identity.client_id if self.session is not None else "-"


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
        self.logger = _RedactingLogger(log.getChild("websockets"), {})
        self._servers: list[asyncio.Server | TLSServer] = []
        self._bound: dict[str, int] = {}
        self._frames = FrameCache()
        self._tasks: set[asyncio.Task[None]] = set()
        self._rounds: dict[int, set[WSConnection]] = {}  # keep-alive rounds, by due time
        self._stopping = False
        self._empty: asyncio.Event | None = None  # set when the last connection ends (stop)
        self._uncounted = 0
        self._count_scheduled = False

    # lifecycle
    async def start(self) -> None:
        """Listen on every endpoint (:class:`~core.listeners.ListenError` if one is taken)."""
        loop = asyncio.get_running_loop()
        try:
            for endpoint in self.endpoints:
                factory = functools.partial(WSConnection, self)
                try:
                    if endpoint.tls is not None:
                        server: asyncio.Server | TLSServer = await tls.create_server(
                            factory, endpoint.host, endpoint.port, endpoint.tls
                        )
                    else:
                        server = await loop.create_server(
                            factory, endpoint.host, endpoint.port, reuse_address=True
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
            server.close()
        for connection in list(self.tcp_connections):
            if connection.ws.state is CONNECTING:  # not upgraded yet: nothing to finish
                connection.transport.abort()
            else:
                self._end(connection, "server shutting down")
        if not await self._drained(timeout):
            for connection in list(self.tcp_connections):  # peers that do not read
                connection.transport.abort()
            await self._drained(1.0)
        if self._tasks:  # unsubscriptions of the connections that ended
            await asyncio.wait(list(self._tasks), timeout=1.0)
        self._flush_count()

    async def _drained(self, timeout: float) -> bool:
        """Whether every connection ended within ``timeout`` seconds."""
        if self.tcp_connections:
            self._empty = asyncio.Event()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._empty.wait()
        return not self.tcp_connections

    @property
    def connections(self) -> list[WSConnection]:
        """The upgraded connections, until they end."""
        return [c for c in self.tcp_connections if c.ws.state is not CONNECTING]

    def spawn(self, work: Awaitable[None]) -> None:
        """Run ``work`` in a task the adapter keeps until it is done."""
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # upgrade
    async def _upgrade(self, connection: WSConnection, request: Request) -> Response | None:
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
    async def open(self, connection: WSConnection, request: Request) -> None:
        """The upgrade: the checks, then the 101 (or the refusal), then the subscription."""
        ws = connection.ws
        response = await self._upgrade(connection, request)
        if connection.gone:
            return
        if response is None:
            response = ws.accept(request)
        # The protocol's parser keeps the request for the connection's life; its headers
        # (2-3 kB) are not read again.
        request.headers = _READ
        ws.send_response(response)
        connection.flush()
        if response.status_code == 101 and connection.session is not None:
            connection.deadline(None, None)  # the upgrade's deadline
            await self._opened(connection, connection.session)

    async def _opened(self, connection: WSConnection, session: Session) -> None:
        gateway = self.gateway
        connection.unregister = gateway.connected(
            session.identity, functools.partial(self._end, connection)
        )
        self.keep_alive(connection)
        if not session.subscribes:
            gateway.metrics.conns[self.protocol].inc()
            connection.counted = True
            return
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
            connection.refuse(exc)
            return
        if connection.gone:  # it ended while the subscription was made
            await gateway.unsubscribe(sub, "connection closed")
            return
        connection.sub = sub
        connection.outbox = outbox

    def ended(self, connection: WSConnection) -> None:
        """The connection is gone: it leaves the adapter, the gateway and the bus."""
        self.tcp_connections.discard(connection)
        if not self.tcp_connections and self._empty is not None:
            self._empty.set()
        self.no_ping(connection)
        if connection.unregister is not None:
            connection.unregister()
            connection.unregister = None
        if connection.outbox is not None:
            connection.outbox.clear()
            connection.outbox = None
        if connection.sub is not None:
            self.spawn(self.gateway.unsubscribe(connection.sub, "connection closed"))
            connection.sub = None
        if connection.counted:
            connection.counted = False
            self.gateway.metrics.conns[self.protocol].dec()
        if connection.session is not None:
            self._closed_by_websockets(connection)

    async def reauthenticate(self, connection: WSConnection, token: str) -> None:
        """An in-band ``auth`` message: a fresh broker token of the same client. The
        connection's rights and expiry become the new token's, in place: it publishes only if
        the new token allows it, and its subscription ends (closing it, 1008) if that is no
        longer allowed. Answered ``{"type": "auth", "status": "ok", "expires_at": ...}``;
        ConduitError when refused (the connection closes with its code)."""
        session = connection.session
        assert session is not None
        gateway = self.gateway
        old = session.identity
        identity = await gateway.authenticate(
            Credentials(token=token, certificate=session.certificate)
        )
        if (identity.domain, identity.client_id) != (old.domain, old.client_id):
            raise AuthenticationError("re-authentication with another client's token")
        if connection.gone:
            return
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
        if connection.sub is not None:
            await gateway.reauthenticate([connection.sub], identity)
        expires = int(identity.expires) if identity.expires is not None else None
        connection.send_text(orjson.dumps({"type": "auth", "status": "ok", "expires_at": expires}))

    # keep-alive: websockets' own is a task per connection that sleeps between pings (1.4 kB
    # each), and a timer per connection costs 0.7 kB in uvloop. Here the connections due for
    # a ping are grouped in rounds of a tenth of the interval (at most a second), one timer
    # per round: an idle connection is one entry in a set.
    def keep_alive(self, connection: WSConnection) -> None:
        """Ping ``connection`` once ``ping_interval`` seconds have passed (up to a round more)."""
        if self.ping_interval is None or connection.ws.state is not OPEN:
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
        """One ping to each connection of the round; each comes back in a round when its pong
        comes, or is closed (1011) when none came within ``ping_timeout``."""
        for connection in self._rounds.pop(due, ()):
            connection.next_ping = None
            connection.send_ping()

    def _subscription_closed(
        self, connection: WSConnection, sub: Subscription, reason: str
    ) -> None:
        """The bus closed the subscription (too slow, right revoked, shutdown): so goes the
        connection, with the reason."""
        self._end(connection, reason)

    def _end(self, connection: WSConnection, reason: str) -> None:
        """Close an open connection from outside (its subscription ended, its client was
        disabled or deleted, the server stops), with the reason."""
        if connection.ws.state is not OPEN or connection.refused:
            return
        code = GOING_AWAY if self._stopping or self.gateway.closing else POLICY_VIOLATION
        log.info("closing ws client=%s code=%d: %s", connection.client_id, code, reason)
        connection.close(code, reason)

    def _closed_by_websockets(self, connection: WSConnection) -> None:
        """Count what websockets itself refused: a message over the size limit (1009)."""
        sent = connection.ws.close_sent
        if sent is None or connection.refused:
            return
        if sent.code == TooLargeError.condition.answer.ws_close:
            self.gateway.refused(self.protocol, TooLargeError(sent.reason), connection.client_id)
        elif sent.code not in (1000, GOING_AWAY):
            log.info(
                "ws client=%s closed with %d: %s", connection.client_id, sent.code, sent.reason
            )

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
