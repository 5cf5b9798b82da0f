"""The MQTT control packets as ``msgspec.Struct`` types, one per packet type (:class:`Connect` ...
:class:`Auth`), and the will of a CONNECT. Construction is implemented in C, which matters on
the decode hot path (docs/performance.md). Level 4 packets always carry
:data:`~adapters.mqtt.codec.properties.EMPTY_PROPERTIES`.
"""

from __future__ import annotations

from typing import TypeAlias

import msgspec

from adapters.mqtt.codec.properties import EMPTY_PROPERTIES, Properties


class Will(msgspec.Struct, repr_omit_defaults=True):
    """The will message of a CONNECT."""

    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False
    properties: Properties = EMPTY_PROPERTIES


class Connect(msgspec.Struct, repr_omit_defaults=True):
    """CONNECT. ``clean_start`` is 3.1.1's Clean Session. ``protocol_level`` is 4 or 5."""

    protocol_level: int
    clean_start: bool
    keep_alive: int
    client_id: str
    username: str | None = None
    password: bytes | None = None
    will: Will | None = None
    properties: Properties = EMPTY_PROPERTIES


class ConnAck(msgspec.Struct, repr_omit_defaults=True):
    """CONNACK. ``reason_code`` is the 3.1.1 return code (0-5) at level 4."""

    session_present: bool = False
    reason_code: int = 0
    properties: Properties = EMPTY_PROPERTIES


class Publish(msgspec.Struct, repr_omit_defaults=True):
    """PUBLISH. ``packet_id`` is 0 for QoS 0 (0 is never a valid packet identifier)."""

    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False
    dup: bool = False
    packet_id: int = 0
    properties: Properties = EMPTY_PROPERTIES


class _PublishResponse(msgspec.Struct, repr_omit_defaults=True):
    """The fields the four QoS 1 and 2 responses share; each is its own type."""

    packet_id: int
    reason_code: int = 0
    properties: Properties = EMPTY_PROPERTIES


class PubAck(_PublishResponse):
    pass


class PubRec(_PublishResponse):
    pass


class PubRel(_PublishResponse):
    pass


class PubComp(_PublishResponse):
    pass


class Subscription(msgspec.Struct, repr_omit_defaults=True):
    """One topic filter of a SUBSCRIBE with its options (all but ``qos`` are MQTT 5 only)."""

    topic_filter: str
    qos: int = 0
    no_local: bool = False
    retain_as_published: bool = False
    retain_handling: int = 0


class Subscribe(msgspec.Struct, repr_omit_defaults=True):
    packet_id: int
    subscriptions: list[Subscription]
    properties: Properties = EMPTY_PROPERTIES


class SubAck(msgspec.Struct, repr_omit_defaults=True):
    packet_id: int
    reason_codes: list[int]
    properties: Properties = EMPTY_PROPERTIES


class Unsubscribe(msgspec.Struct, repr_omit_defaults=True):
    packet_id: int
    topic_filters: list[str]
    properties: Properties = EMPTY_PROPERTIES


class UnsubAck(msgspec.Struct, repr_omit_defaults=True):
    """UNSUBACK. ``reason_codes`` is empty at level 4 (3.1.1 has none)."""

    packet_id: int
    reason_codes: list[int] = msgspec.field(default_factory=list)
    properties: Properties = EMPTY_PROPERTIES


class PingReq(msgspec.Struct):
    pass


class PingResp(msgspec.Struct):
    pass


class Disconnect(msgspec.Struct, repr_omit_defaults=True):
    reason_code: int = 0
    properties: Properties = EMPTY_PROPERTIES


class Auth(msgspec.Struct, repr_omit_defaults=True):
    """AUTH (MQTT 5 only)."""

    reason_code: int = 0
    properties: Properties = EMPTY_PROPERTIES


Packet: TypeAlias = (
    Connect
    | ConnAck
    | Publish
    | PubAck
    | PubRec
    | PubRel
    | PubComp
    | Subscribe
    | SubAck
    | Unsubscribe
    | UnsubAck
    | PingReq
    | PingResp
    | Disconnect
    | Auth
)
