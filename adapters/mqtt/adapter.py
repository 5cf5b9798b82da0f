"""The MQTT adapter: its listeners (TCP and WebSocket), and the start and stop of what its
connections share (:class:`~adapters.mqtt.connection.ConnectionSet`: writes, tasks, the timer
sweep) and of its sessions (:class:`~adapters.mqtt.sessions.SessionRegistry`).

MQTT 3.1.1 and 5.0 are served on the same listeners. The MQTT rules are the channel's
(:mod:`adapters.mqtt.channel`); this module builds nothing else and knows no packet.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import ssl
from collections.abc import Callable, Sequence

from adapters import tls
from adapters.mqtt.channel import subscription_closed
from adapters.mqtt.connection import ConnectionSet, TCPConnection
from adapters.mqtt.options import Options
from adapters.mqtt.publish import PROTOCOL, content_type_of
from adapters.mqtt.session import Session
from adapters.mqtt.sessions import HANDOVER_WAIT, SessionRegistry
from adapters.mqtt.ws import WebSocketConnection
from adapters.tls import TLSServer
from core.content import OCTETS
from core.gateway import Gateway
from core.listeners import Endpoint, ListenError, Listening

log = logging.getLogger("conduit.mqtt")

SWEEP_INTERVAL = 0.5  # seconds between keep-alive / CONNECT timeout checks


class MQTTAdapter(Listening):
    """MQTT 3.1.1 and 5.0 over TCP and over WebSocket (path ``ws_path``, subprotocol ``mqtt``),
    plain or TLS, on every endpoint of ``endpoints`` (those marked ``websocket`` carry MQTT in
    WebSocket frames); without ``endpoints``, on ``port`` and ``ws_port`` (None: no WebSocket)
    of ``host``, with ``ssl_context`` on both. See ``docs/mqtt.md``.

    Limits: ``max_packet_size`` (bytes, fixed header included; default: the gateway's maximum
    payload plus 64 KiB for topic and properties), ``max_inflight`` (QoS 1/2 messages
    unacknowledged per direction: the server's Receive Maximum and its send window),
    ``max_queued`` (QoS 1/2 messages kept per session while the client is offline or slow),
    ``max_queued_bytes`` (their payload bytes), ``max_sessions`` (sessions one client may
    hold), ``max_subscriptions`` (per session),
    ``max_session_expiry`` (seconds a persistent session outlives its connection),
    ``connect_timeout`` (seconds a connection may take to send CONNECT), ``max_keep_alive``
    (seconds; 0: any), ``topic_alias_maximum`` (aliases a client may set up, MQTT 5),
    ``max_write_buffer`` (bytes waiting for a slow subscriber before QoS 0 messages are dropped),
    ``handover_wait`` (several nodes: seconds a CONNECT waits for the node holding its session
    to hand it over before that node is presumed dead).
    They become the adapter's :class:`~adapters.mqtt.options.Options`.
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
        max_queued_bytes: int = 16 * 1024 * 1024,
        max_sessions: int = 1000,
        max_subscriptions: int = 1000,
        max_session_expiry: int = 7 * 86_400,
        connect_timeout: float = 10.0,
        max_keep_alive: int = 0,
        topic_alias_maximum: int = 64,
        max_write_buffer: int = 1024 * 1024,
        endpoints: Sequence[Endpoint] | None = None,
        handover_wait: float = HANDOVER_WAIT,
    ) -> None:
        self.gateway = gateway
        if endpoints is None:
            tls = "s" if ssl_context is not None else ""
            endpoints = [Endpoint(f"mqtt{tls}", host, port, ssl_context)]
            if ws_port is not None:
                endpoints.append(Endpoint(f"mqtt-ws{tls}", host, ws_port, ssl_context, True))
        self.endpoints = list(endpoints)
        self._bound: dict[str, int] = {}
        self.options = Options(
            max_packet_size=max_packet_size or gateway.limits.max_payload + 65_536,
            content_type=content_type_of(content_type, OCTETS),
            max_inflight=max_inflight,
            max_queued=max_queued,
            max_queued_bytes=max_queued_bytes,
            max_sessions=max_sessions,
            max_subscriptions=max_subscriptions,
            max_session_expiry=max_session_expiry,
            connect_timeout=connect_timeout,
            max_keep_alive=max_keep_alive,
            topic_alias_maximum=min(topic_alias_maximum, 0xFFFF),
            max_write_buffer=max_write_buffer,
            ws_path=ws_path,
        )
        self.connections = ConnectionSet(gateway, self.options)
        self.registry = SessionRegistry(gateway, self.options, self.connections.spawn)
        self.registry.handover_wait = handover_wait
        self._unlisten: Callable[[], None] | None = None
        self._servers: list[asyncio.Server | TLSServer] = []
        self._sweeper: asyncio.TimerHandle | None = None

    # What tests and operators read of a running adapter.
    @property
    def port(self) -> int:
        """The port of the first MQTT-over-TCP endpoint."""
        return self._port(websocket=False) or 0

    @property
    def ws_port(self) -> int | None:
        """The port of the first MQTT-over-WebSocket endpoint, if any."""
        return self._port(websocket=True)

    def _port(self, websocket: bool) -> int | None:
        for e in self.endpoints:
            if e.websocket is websocket:
                return self._bound.get(e.name, e.port)
        return None

    @property
    def conns(self) -> set[TCPConnection | WebSocketConnection]:
        return self.connections.open  # type: ignore[return-value]

    @property
    def sessions(self) -> dict[tuple[str, str], Session]:
        return self.registry.sessions

    @property
    def max_inflight(self) -> int:
        return self.options.max_inflight

    @property
    def max_packet_size(self) -> int:
        return self.options.max_packet_size

    @property
    def topic_alias_maximum(self) -> int:
        return self.options.topic_alias_maximum

    # ---------------------------------------------------------------------------------------
    # lifecycle

    async def start(self) -> None:
        """Restore the persistent sessions of the session store, then listen on every endpoint
        (:class:`~core.listeners.ListenError` if one cannot be bound: then none is)."""
        loop = self.connections.loop = asyncio.get_running_loop()
        restored = await self.registry.restore(subscription_closed)
        if restored:
            log.info("mqtt: %d persistent sessions restored", restored)
        if self.registry.clustered:  # other nodes take sessions this one holds
            self._unlisten = self.gateway.on_change(self.registry.changed)
        for endpoint in self.endpoints:
            kind = WebSocketConnection if endpoint.websocket else TCPConnection
            factory = functools.partial(kind, self.connections, self.registry)
            try:
                if endpoint.tls is not None:
                    server: asyncio.Server | TLSServer = await tls.create_server(
                        factory, endpoint.host, endpoint.port, endpoint.tls, backlog=4096
                    )
                else:
                    server = await loop.create_server(
                        factory, endpoint.host, endpoint.port, reuse_address=True, backlog=4096
                    )
            except OSError as exc:
                for server in self._servers:
                    server.close()
                self._servers.clear()
                raise ListenError(endpoint, exc) from exc
            self._servers.append(server)
            self._bound[endpoint.name] = server.sockets[0].getsockname()[1]
        self._sweeper = loop.call_later(SWEEP_INTERVAL, self._sweep)

    async def stop(self, timeout: float = 10.0) -> None:
        """Stop accepting, let in-flight publishes finish, tell MQTT 5 clients the server is
        shutting down (DISCONNECT 0x8B), close every connection and drop the sessions."""
        if not self._servers:
            return
        connections = self.connections
        if self._unlisten is not None:
            self._unlisten()
            self._unlisten = None
        self.registry.closing = True  # no wills from here on
        if self._sweeper is not None:
            self._sweeper.cancel()
        for server in self._servers:
            server.close()
        for conn in list(connections.open):
            conn.channel.shutdown()
        connections.flush()
        if connections.tasks:
            await asyncio.wait(list(connections.tasks), timeout=timeout)
            for task in list(connections.tasks):
                task.cancel()
        await self.registry.close()
        # Closing connections linger until their clients close; clients that do not are not
        # waited for long. Those whose last bytes (and FIN) are out are closed, not reset.
        await connections.wait_closed(min(timeout, 2.0))
        for conn in list(connections.open):
            conn.end_now()
        for server in self._servers:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(server.wait_closed(), timeout)
        self._servers.clear()

    def _sweep(self) -> None:
        self.connections.sweep()
        assert self.connections.loop is not None
        self._sweeper = self.connections.loop.call_later(SWEEP_INTERVAL, self._sweep)
