"""The MQTT adapter: listeners (TCP and WebSocket), the session registry and what all connections
share: the corked-write flush, the keep-alive and CONNECT-timeout sweep, wills and session expiry.

MQTT 3.1.1 and 5.0 are served on the same listeners. Sessions are kept in memory on this node:
a persistent session (3.1.1 clean session 0, MQTT 5 session expiry) survives its connection
until it expires, not a restart of the server. Sessions are keyed by the authenticated Conduit
client and the MQTT client identifier, so one client can never take over another's session.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import ssl
import time
from collections.abc import Callable, Coroutine
from typing import Any

from adapters.mqtt import codec
from adapters.mqtt.codec import Will
from adapters.mqtt.connection import CONNECTED, PROTOCOL, QUOTA_EXCEEDED, MQTTConnection
from adapters.mqtt.publish import PublishCache, content_type_of, inbound
from adapters.mqtt.session import Session, Sub
from adapters.mqtt.ws import MQTTWebSocketConnection
from core import senml
from core.auth import Identity
from core.bus import Subscription
from core.content import OCTETS, SENML
from core.errors import ConduitError, TooLargeError
from core.gateway import Gateway
from core.noise import printable
from core.topics import parse_topic

log = logging.getLogger("conduit.mqtt")

SWEEP_INTERVAL = 0.5  # seconds between keep-alive / CONNECT timeout checks


class MQTTAdapter:
    """MQTT 3.1.1 and 5.0 over TCP (``port``) and over WebSocket (``ws_port``, path ``ws_path``,
    subprotocol ``mqtt``); see ``docs/mqtt.md``.

    Limits: ``max_packet_size`` (bytes, fixed header included; default: the gateway's maximum
    payload plus 64 KiB for topic and properties), ``max_inflight`` (QoS 1/2 messages
    unacknowledged per direction: the server's Receive Maximum and its send window),
    ``max_queued`` (QoS 1/2 messages kept per session while the client is offline or slow),
    ``max_session_expiry`` (seconds a persistent session outlives its connection),
    ``connect_timeout`` (seconds a connection may take to send CONNECT), ``max_keep_alive``
    (seconds; 0: any), ``topic_alias_maximum`` (aliases a client may set up, MQTT 5),
    ``max_write_buffer`` (bytes waiting for a slow subscriber before QoS 0 messages are dropped).
    """

    protocol = PROTOCOL

    def __init__(
        self,
        gateway: Gateway,
        host: str = "0.0.0.0",
        port: int = 1883,
        ws_port: int | None = 8083,
        ssl_context: ssl.SSLContext | None = None,
        content_type: str = OCTETS,
        *,
        ws_path: str = "/mqtt",
        max_packet_size: int | None = None,
        max_inflight: int = 100,
        max_queued: int = 1000,
        max_session_expiry: int = 7 * 86_400,
        connect_timeout: float = 10.0,
        max_keep_alive: int = 0,
        topic_alias_maximum: int = 64,
        max_write_buffer: int = 1024 * 1024,
    ) -> None:
        if not 0 < max_inflight < 0xFFFF:
            raise ValueError("max_inflight must be in 1..65534")
        self.gateway = gateway
        self.host = host
        self.port = port
        self.ws_port = ws_port
        self.ws_path = ws_path
        self.ssl_context = ssl_context
        self.content_type = content_type_of(content_type, OCTETS)
        self.max_packet_size = max_packet_size or gateway.limits.max_payload + 65_536
        self.max_inflight = max_inflight
        self.max_queued = max_queued
        self.max_session_expiry = max_session_expiry
        self.connect_timeout = connect_timeout
        self.max_keep_alive = max_keep_alive
        self.topic_alias_maximum = min(topic_alias_maximum, 0xFFFF)
        self.max_write_buffer = max_write_buffer
        self.conns: set[MQTTConnection] = set()
        self.sessions: dict[tuple[str, str], Session] = {}
        self.tasks: set[asyncio.Task[None]] = set()
        self.cache = PublishCache()
        self.delivered = 0  # deliveries not yet counted in the gateway's metrics
        self.closing = False
        self._dirty: list[MQTTConnection] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._servers: list[asyncio.Server] = []
        self._sweeper: asyncio.TimerHandle | None = None
        self._all_closed: asyncio.Event | None = None

    # ---------------------------------------------------------------------------------------
    # lifecycle

    async def start(self) -> None:
        """Listen on the TCP port and, if set, the WebSocket port (OSError if one is taken)."""
        loop = self._loop = asyncio.get_running_loop()
        tcp = await loop.create_server(
            functools.partial(MQTTConnection, self),
            self.host,
            self.port,
            ssl=self.ssl_context,
            reuse_address=True,
            backlog=4096,
        )
        self._servers.append(tcp)
        if self.port == 0:
            self.port = tcp.sockets[0].getsockname()[1]
        if self.ws_port is not None:
            try:
                ws = await loop.create_server(
                    functools.partial(MQTTWebSocketConnection, self),
                    self.host,
                    self.ws_port,
                    ssl=self.ssl_context,
                    reuse_address=True,
                    backlog=1024,
                )
            except OSError:
                tcp.close()
                self._servers.clear()
                raise
            self._servers.append(ws)
            if self.ws_port == 0:
                self.ws_port = ws.sockets[0].getsockname()[1]
        self._sweeper = loop.call_later(SWEEP_INTERVAL, self._sweep)

    async def stop(self, timeout: float = 10.0) -> None:
        """Stop accepting, let in-flight publishes finish, tell MQTT 5 clients the server is
        shutting down (DISCONNECT 0x8B), close every connection and drop the sessions."""
        if not self._servers:
            return
        self.closing = True
        if self._sweeper is not None:
            self._sweeper.cancel()
        for server in self._servers:
            server.close()
        for conn in list(self.conns):
            conn.shutdown()
        self._flush()
        if self.tasks:
            await asyncio.wait(list(self.tasks), timeout=timeout)
            for task in list(self.tasks):
                task.cancel()
        for session in list(self.sessions.values()):
            self._cancel_timers(session)
            for sub in list(session.subs.values()):
                sub.active = False
                if sub.bus is not None:
                    await self.gateway.unsubscribe(sub.bus, "server shutting down")
        self.sessions.clear()
        # Closing connections linger until their clients close; clients that do not are not
        # waited for long. Those whose last bytes (and FIN) are out are closed, not reset.
        if self.conns:
            self._all_closed = asyncio.Event()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._all_closed.wait(), min(timeout, 2.0))
        for conn in list(self.conns):
            transport = conn.transport
            if transport is None:
                continue
            if conn.half_close and not transport.get_write_buffer_size():
                transport.close()
            else:
                transport.abort()
        for server in self._servers:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(server.wait_closed(), timeout)
        self._servers.clear()

    # ---------------------------------------------------------------------------------------
    # what connections share

    def closed(self, conn: MQTTConnection) -> None:
        self.conns.discard(conn)
        if self._all_closed is not None and not self.conns:
            self._all_closed.set()

    def dirty(self, conn: MQTTConnection) -> None:
        """A connection has bytes to write: flush them all once this loop iteration is done."""
        if not self._dirty:
            assert self._loop is not None
            self._loop.call_soon(self._flush)
        self._dirty.append(conn)

    def _flush(self) -> None:
        dirty = self._dirty
        self._dirty = []
        for conn in dirty:
            try:
                conn.flush()
            except Exception:  # one broken connection must not keep others from writing
                log.exception("mqtt: write failed client=%s", conn.client)
                if conn.transport is not None:
                    conn.transport.abort()
        if self.delivered:
            self.gateway.delivered(PROTOCOL, self.delivered)
            self.delivered = 0

    def spawn(
        self,
        coro: Coroutine[Any, Any, None],
        done: Callable[[asyncio.Task[None]], None] | None = None,
    ) -> None:
        """Run a coroutine the adapter waits for on stop; ``done`` (if given) must discard the
        task from ``tasks``."""
        assert self._loop is not None
        task = self._loop.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(done or self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("mqtt: background task failed", exc_info=task.exception())

    def protocol_refused(self, reason: str, detail: str, client: str | None) -> None:
        """Log and count a refusal that is not a core condition (protocol errors, timeouts).
        ``client`` is an authenticated or client-id-shaped id (never a raw user name); the
        gateway escapes what the detail quotes, and samples refusals of nobody in particular."""
        self.gateway.refused_input(PROTOCOL, reason, detail, client)

    def _sweep(self) -> None:
        now = time.monotonic()
        for conn in list(self.conns):
            if conn.state != CONNECTED or conn.keep_alive:
                conn.timed_out(now)
        assert self._loop is not None
        self._sweeper = self._loop.call_later(SWEEP_INTERVAL, self._sweep)

    # ---------------------------------------------------------------------------------------
    # wills

    async def check_will(self, identity: Identity, will: Will) -> None:
        """Refuse at CONNECT a will that could never be published (raises ConduitError, or
        MQTTProtocolError 0x99 for a payload that is not the UTF-8 it claims to be)."""
        await self.gateway.authorize(identity, parse_topic(will.topic), "publish")
        if len(will.payload) > self.gateway.limits.max_payload:
            raise TooLargeError(
                f"will payload of {len(will.payload)} bytes exceeds"
                f" {self.gateway.limits.max_payload}"
            )
        codec.check_payload_format(will.payload, will.properties)
        content_type = content_type_of(will.properties.content_type, self.content_type)
        if content_type in SENML:
            senml.validate(will.payload, content_type, time.time())

    async def _publish_will(self, identity: Identity, will: Will) -> None:
        content_type, metadata = inbound(will.properties, will.qos, will.retain, self.content_type)
        try:
            await self.gateway.publish(
                identity,
                will.topic,
                will.payload,
                content_type,
                PROTOCOL,
                metadata,
                retain=will.retain,
            )
        except ConduitError as exc:
            self.gateway.refused(PROTOCOL, exc, identity.client_id)

    def _will_due(self, session: Session) -> None:
        session.will_handle = None
        will, session.will = session.will, None
        if will is not None:
            self.spawn(self._publish_will(session.identity, will))

    # ---------------------------------------------------------------------------------------
    # sessions

    def open_session(
        self, conn: MQTTConnection, identity: Identity, client_id: str, clean_start: bool
    ) -> tuple[Session, bool]:
        """The session ``conn`` takes (and whether it existed). A connection holding it is
        disconnected (session taken over)."""
        key = (identity.client_id, client_id)
        old = self.sessions.get(key)
        if old is not None and old.outlet is not None:
            old_conn = old.outlet
            assert isinstance(old_conn, MQTTConnection)
            old_conn.take_over()  # detaches: may end a session that had no expiry
            old = self.sessions.get(key)
        if old is not None:
            if old.expiry_handle is not None:
                old.expiry_handle.cancel()
                old.expiry_handle = None
            if clean_start:
                del self.sessions[key]
                self._end_session(old)
                old = None
            elif old.will_handle is not None:
                # Back before the will delay passed: no will (MQTT 5 section 3.1.3.2.2).
                old.will_handle.cancel()
                old.will_handle = None
                old.will = None
        if old is not None:
            old.identity = identity
            return old, True
        session = Session(
            identity,
            client_id,
            self.cache,
            max_inflight=self.max_inflight,
            max_queued=self.max_queued,
        )
        self.sessions[key] = session
        return session, False

    def session_detached(self, session: Session, will: bool) -> None:
        """The session's connection ended (``will``: abnormally). Publish or schedule the
        will; end the session now or when it expires."""
        pending = session.will if will else None
        session.will = None
        if self.closing:
            return
        if session.expiry == 0:
            if self.sessions.get(session.key) is session:
                del self.sessions[session.key]
            if pending is not None:
                self.spawn(self._publish_will(session.identity, pending))
            self._end_session(session)
            return
        assert self._loop is not None
        if pending is not None:
            delay = pending.properties.will_delay_interval or 0
            if delay == 0:
                self.spawn(self._publish_will(session.identity, pending))
            else:
                session.will = pending
                session.will_handle = self._loop.call_later(
                    min(delay, session.expiry), self._will_due, session
                )
        session.expiry_handle = self._loop.call_later(session.expiry, self._expire, session)

    def _expire(self, session: Session) -> None:
        session.expiry_handle = None
        if self.sessions.get(session.key) is session and session.outlet is None:
            del self.sessions[session.key]
            self._end_session(session)

    def _end_session(self, session: Session) -> None:
        """The session ends: a will still waiting for its delay goes now; subscriptions end."""
        if session.will_handle is not None:
            session.will_handle.cancel()
            session.will_handle = None
            will, session.will = session.will, None
            if will is not None:
                self.spawn(self._publish_will(session.identity, will))
        self._cancel_timers(session)
        subs = list(session.subs.values())
        session.subs.clear()
        for sub in subs:
            sub.active = False
        if subs:
            self.spawn(self._unsubscribe(subs, "session ended"))

    def _cancel_timers(self, session: Session) -> None:
        for handle in (session.will_handle, session.expiry_handle):
            if handle is not None:
                handle.cancel()
        session.will_handle = session.expiry_handle = None

    async def _unsubscribe(self, subs: list[Sub], reason: str) -> None:
        for sub in subs:
            if sub.bus is not None:
                await self.gateway.unsubscribe(sub.bus, reason)

    def subscription_closed(self, bus: Subscription, reason: str) -> None:
        """The gateway closed a subscription (authorization revoked, subscriber too slow)."""
        sub = bus.sink
        if not isinstance(sub, Sub) or not sub.active:
            return
        sub.active = False
        session = sub.session
        if session.subs.get(sub.filter) is sub:
            del session.subs[sub.filter]
            if sub.no_local:
                session.no_local -= 1
        log.info(
            "mqtt: subscription closed client=%s filter=%s: %s",
            session.identity.client_id,
            printable(sub.filter),
            printable(reason),
        )
        outlet = session.outlet
        if bus.streak >= bus.max_dropped and isinstance(outlet, MQTTConnection):
            self.protocol_refused("slow_subscriber", reason, session.identity.client_id)
            outlet.disconnect(QUOTA_EXCEEDED, reason)
