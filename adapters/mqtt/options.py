"""What one MQTT adapter allows its clients: the limits and defaults every channel, connection
and the session registry read, in one immutable value (see ``docs/mqtt.md``, "Limits")."""

from __future__ import annotations

from dataclasses import dataclass

from core.content import OCTETS


@dataclass(frozen=True, slots=True)
class Options:
    """The MQTT adapter's options.

    ``content_type``: of publishes without an MQTT 5 Content Type property (already normalised:
    see :func:`~adapters.mqtt.publish.content_type_of`). ``max_packet_size``: bytes, fixed header
    included (CONNACK Maximum Packet Size). ``max_inflight``: QoS 1/2 messages unacknowledged
    per direction (the server's Receive Maximum and its send window). ``max_queued``: QoS 1/2
    messages kept per session while the client is offline or slow, ``max_queued_bytes`` their
    payload bytes. ``max_sessions``: sessions one client may hold (connected or persistent).
    ``max_subscriptions``: subscriptions per session. ``max_session_expiry``:
    seconds a persistent session outlives its connection. ``connect_timeout``: seconds a
    connection may take to send CONNECT. ``max_keep_alive``: seconds, 0 for any.
    ``topic_alias_maximum``: aliases a client may set up (MQTT 5). ``max_write_buffer``: bytes
    waiting for a slow subscriber before its QoS 0 messages are dropped. ``ws_path``: the path
    of MQTT over WebSocket.
    """

    max_packet_size: int
    content_type: str = OCTETS
    max_inflight: int = 100
    max_queued: int = 1000
    max_queued_bytes: int = 16 * 1024 * 1024
    max_sessions: int = 1000
    max_subscriptions: int = 1000
    max_session_expiry: int = 7 * 86_400
    connect_timeout: float = 10.0
    max_keep_alive: int = 0
    topic_alias_maximum: int = 64
    max_write_buffer: int = 1024 * 1024
    ws_path: str = "/mqtt"

    def __post_init__(self) -> None:
        if not 0 < self.max_inflight < 0xFFFF:
            raise ValueError("max_inflight must be in 1..65534")
        if not 0 <= self.topic_alias_maximum <= 0xFFFF:
            raise ValueError("topic_alias_maximum must be in 0..65535")
