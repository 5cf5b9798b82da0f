"""Sans-I/O codec for MQTT 3.1.1 (protocol level 4) and MQTT 5.0 (protocol level 5).

This module owns the MQTT wire format and nothing else: bytes in, packet objects out
(:class:`Decoder`), packet objects to bytes (:func:`encode`, :func:`encode_publish`,
:func:`prepare_publish`). It does no I/O, knows no sockets, no asyncio, no sessions and no gateway;
the MQTT connection class moves bytes and owns the protocol state.

Packets are ``msgspec.Struct`` types (:class:`Connect` ... :class:`Auth`): construction is
implemented in C, about 2x cheaper than a slotted dataclass on this machine (150 ns vs 330 ns for
a seven-field PUBLISH), which matters on the decode hot path. MQTT 5 properties are one frozen,
typed :class:`Properties` struct; a packet without properties holds the shared
:data:`EMPTY_PROPERTIES`, so the common PUBLISH (no properties) costs one byte compare and no
allocation. Level 4 packets always carry :data:`EMPTY_PROPERTIES`; encoding at level 4 drops
properties and reason codes the version cannot express (a SUBACK failure code becomes 0x80).

Errors
------
Every refusal of input is one exception, :class:`MQTTProtocolError`, carrying the MQTT 5 reason
code the server answers with (CONNACK before the session exists, DISCONNECT after). Decode errors
are fatal to the connection (MQTT 5 section 4.13): the :class:`Decoder` keeps raising the same
error. Encoding a packet that cannot be represented (QoS 3, packet id 0 on QoS > 0, a property the
packet type does not allow, ...) is a programming error and raises ``ValueError``/``TypeError``.

What the codec checks (stateless; everything visible in one packet):

- 0x81 Malformed Packet: reserved packet types (0; 15 at level 4); reserved fixed-header flag bits
  (PUBREL, SUBSCRIBE, UNSUBSCRIBE must be 0b0010, every other non-PUBLISH type 0b0000); PUBLISH
  QoS 3; PUBLISH DUP=1 with QoS 0; a remaining length longer than 4 bytes or not minimally encoded
  (same for every variable byte integer); any field running past the packet's end, or trailing
  bytes after a fully specified packet; ill-formed UTF-8 or U+0000 in any UTF-8 string; CONNECT
  reserved flag bit, will QoS 3, will QoS or will retain set without the will flag, password flag
  without user name flag (level 4); CONNACK reserved acknowledge flags; SUBSCRIBE reserved
  option bits (bits 2-7 at level 4, bits 6-7 at level 5) and QoS 3 at level 4; a property
  identifier that is unknown or not allowed in the packet type (MQTT 5 section 2.2.2.2).
- 0x82 Protocol Error: a non-CONNECT packet before the protocol level is known; a protocol name
  other than "MQTT"; packet identifier 0 where one is required (PUBLISH QoS > 0, PUBACK, PUBREC,
  PUBREL, PUBCOMP, SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK); SUBSCRIBE or UNSUBSCRIBE without a
  topic filter, SUBACK or UNSUBACK (level 5) without a reason code; a property that may appear once
  appearing twice (user properties repeat anywhere, subscription identifiers only in PUBLISH); a
  property value out of its range (0/1 flags, receive maximum 0, maximum packet size 0,
  subscription identifier 0); authentication data without authentication method in CONNECT;
  SUBSCRIBE QoS 3 or retain handling 3 (level 5); No Local on a shared subscription (``$share/``);
  an empty PUBLISH topic at level 4, or at level 5 without a topic alias; an empty will topic; a
  reason code not defined for the packet type; CONNACK with session present and a non-zero code.
- 0x84 Unsupported Protocol Version: protocol name "MQIsdp" (MQTT 3.1) or a level other than 4/5.
  The error's ``v3_connack_code`` is 1: answer with a 3.1.1-format CONNACK, return code 1.
- 0x90 Topic Name Invalid: a wildcard (``+`` or ``#``) in a topic name: PUBLISH topic, will topic,
  response topic (empty response topic too). This is the DESIGN.md code for a malformed topic.
- 0x95 Packet Too Large: fixed header + remaining length above ``Decoder.max_packet_size``,
  checked from the fixed header before the body is buffered.
- 0x99 Payload Format Invalid: not checked by the decoder, because the answer is a PUBACK/PUBREC
  (or CONNACK for a will), not a disconnect; :func:`check_payload_format` is the helper.

Left to the session layer (needs connection state or the direction of the packet): topic aliases
(0, above the negotiated maximum, unknown alias: 0x94 / 0x93); a second CONNECT; which packet types
a server may receive; subscription identifiers in a client-to-server PUBLISH; packet sizes above
the *client's* maximum when sending; receive maximum and in-flight ids; session expiry in
DISCONNECT when CONNECT had 0; topic filter syntax (wildcard placement, empty filter) and the
Conduit topic grammar, answered per subscription in SUBACK (0x8F); client identifier rules (empty
id with clean session 0 at level 4 is CONNACK 2); AUTH method consistency; payload format (above).

Speed
-----
Measured on this machine (AMD EPYC, 2 vCPUs shared with other work, load average 2.7-4.5 during
the runs, CPython 3.11.7) with the commands below: ``timeit -p`` (process CPU time, one core),
best of 7, repeated 3 to 6 times; ranges are the spread between repetitions.

- decode, PUBLISH with a 20-byte topic and a 100-byte payload (124-127 bytes on the wire), fed in
  64 KiB chunks, 100,000 packets per loop: level 4 QoS 0 91-134 ms (750k-1.10M packets/s);
  level 5 QoS 0 (empty properties) 95-146 ms (690k-1.06M/s); level 4 QoS 1 85-151 ms
  (660k-1.18M/s). Target 500k/s. Inlining the PUBLISH path into the iterator measured only
  about 10% faster, so the decoder keeps a single PUBLISH decoder.
- encode, same packet (6 runs): ``encode_publish`` QoS 0 level 4 260-430 ns (2.3M-3.8M/s; a
  bytes topic 257-415 ns); level 5 346-578 ns (1.7M-2.9M/s); QoS 1 416-755 ns (1.3M-2.4M/s);
  ``encode(Publish(...), 4)`` 396-671 ns (1.5M-2.5M/s); ``PublishTemplate.packet(packet_id)``
  161-287 ns (3.5M-6.2M/s). Target 1M/s.

Commands (from the repository root; for the other rows change ``qos``/``packet_id`` to 1 and
``protocol_level`` to 5)::

    .venv/bin/python -m timeit -p -r 7 \\
      -s "from adapters.mqtt.codec import Decoder, encode_publish" \\
      -s "s = encode_publish('m/domain/c/chan/temp', b'x' * 100, qos=0, packet_id=0, \\
                             protocol_level=4) * 100_000" \\
      -s "cs = [s[i:i + 65536] for i in range(0, len(s), 65536)]" \\
      "d = Decoder(protocol_level=4)" "for c in cs: d.feed(c); list(d)"

    .venv/bin/python -m timeit -p -r 7 \\
      -s "from adapters.mqtt.codec import encode_publish, prepare_publish, encode, Publish" \\
      -s "p = b'x' * 100" -s "t = prepare_publish('m/domain/c/chan/temp', p, qos=1)" \\
      -s "pk = Publish('m/domain/c/chan/temp', p)" \\
      "encode_publish('m/domain/c/chan/temp', p)"   # or: "t.packet(4711)", "encode(pk, 4)", ...
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
from typing import Any, Final, TypeAlias

import msgspec

__all__ = [
    "EMPTY_PROPERTIES",
    "MALFORMED_PACKET",
    "MAX_PACKET_SIZE",
    "PACKET_TOO_LARGE",
    "PAYLOAD_FORMAT_INVALID",
    "PROTOCOL_ERROR",
    "TOPIC_NAME_INVALID",
    "UNSUPPORTED_PROTOCOL_VERSION",
    "Auth",
    "ConnAck",
    "Connect",
    "Decoder",
    "Disconnect",
    "MQTTProtocolError",
    "Packet",
    "PingReq",
    "PingResp",
    "Properties",
    "PubAck",
    "PubComp",
    "PubRec",
    "PubRel",
    "Publish",
    "PublishTemplate",
    "SubAck",
    "Subscribe",
    "Subscription",
    "UnsubAck",
    "Unsubscribe",
    "Will",
    "check_payload_format",
    "encode",
    "encode_publish",
    "prepare_publish",
]

# Reason codes the codec raises (MQTT 5 section 2.4).
MALFORMED_PACKET: Final = 0x81
PROTOCOL_ERROR: Final = 0x82
UNSUPPORTED_PROTOCOL_VERSION: Final = 0x84
TOPIC_NAME_INVALID: Final = 0x90
PACKET_TOO_LARGE: Final = 0x95
PAYLOAD_FORMAT_INVALID: Final = 0x99

#: Largest packet the wire format can carry: 1 type byte, 4 length bytes, 268,435,455 body bytes.
MAX_PACKET_SIZE: Final = 1 + 4 + 268_435_455
_MAX_REMAINING_LENGTH: Final = 268_435_455

_CONNECT: Final = 1  # packet type of CONNECT (fixed header, high nibble)


class MQTTProtocolError(Exception):
    """Input that breaks the MQTT specification.

    ``reason_code`` is the MQTT 5 reason code to answer with: in a CONNACK while the CONNECT is
    being handled, in a DISCONNECT afterwards; then close the connection. ``protocol_level`` is the
    level in force when the error arose (from the CONNECT being decoded or the connection), or
    None when it is unknown; a level 4 connection has no reason codes and is simply closed.
    ``v3_connack_code``, when set, tells the server to answer with a 3.1.1-format CONNACK
    carrying this return code (1, "unacceptable protocol version") whatever the reason code.
    """

    def __init__(
        self,
        reason_code: int,
        message: str,
        *,
        protocol_level: int | None = None,
        v3_connack_code: int | None = None,
    ) -> None:
        super().__init__(reason_code, message)
        self.reason_code = reason_code
        self.message = message
        self.protocol_level = protocol_level
        self.v3_connack_code = v3_connack_code

    def __str__(self) -> str:
        return f"{self.message} (reason code 0x{self.reason_code:02X})"


def _malformed(message: str) -> MQTTProtocolError:
    return MQTTProtocolError(MALFORMED_PACKET, message)


def _protocol_error(message: str) -> MQTTProtocolError:
    return MQTTProtocolError(PROTOCOL_ERROR, message)


# --------------------------------------------------------------------------------------------
# Properties


class Properties(msgspec.Struct, frozen=True, kw_only=True, repr_omit_defaults=True):
    """MQTT 5 properties of one packet (or of a will). None means absent.

    Field order follows the property identifiers; ``user_properties`` keeps the pairs in wire
    order (keys may repeat), ``subscription_identifiers`` may hold several values in a PUBLISH.
    Frozen so that the shared :data:`EMPTY_PROPERTIES` cannot be changed by accident; build a
    changed copy with ``msgspec.structs.replace``.
    """

    payload_format_indicator: int | None = None  # 0x01
    message_expiry_interval: int | None = None  # 0x02
    content_type: str | None = None  # 0x03
    response_topic: str | None = None  # 0x08
    correlation_data: bytes | None = None  # 0x09
    subscription_identifiers: tuple[int, ...] = ()  # 0x0B
    session_expiry_interval: int | None = None  # 0x11
    assigned_client_identifier: str | None = None  # 0x12
    server_keep_alive: int | None = None  # 0x13
    authentication_method: str | None = None  # 0x15
    authentication_data: bytes | None = None  # 0x16
    request_problem_information: int | None = None  # 0x17
    will_delay_interval: int | None = None  # 0x18
    request_response_information: int | None = None  # 0x19
    response_information: str | None = None  # 0x1A
    server_reference: str | None = None  # 0x1C
    reason_string: str | None = None  # 0x1F
    receive_maximum: int | None = None  # 0x21
    topic_alias_maximum: int | None = None  # 0x22
    topic_alias: int | None = None  # 0x23
    maximum_qos: int | None = None  # 0x24
    retain_available: int | None = None  # 0x25
    user_properties: tuple[tuple[str, str], ...] = ()  # 0x26
    maximum_packet_size: int | None = None  # 0x27
    wildcard_subscription_available: int | None = None  # 0x28
    subscription_identifier_available: int | None = None  # 0x29
    shared_subscription_available: int | None = None  # 0x2A


#: The properties of a packet that has none. Shared: compare with ``is``.
EMPTY_PROPERTIES: Final = Properties()

# Property value types.
_BYTE, _U16, _U32, _VARINT, _STR, _BIN, _PAIR = range(7)

# (identifier, field name, type), in the field order of Properties.
_PROPERTY_TABLE: Final[tuple[tuple[int, str, int], ...]] = (
    (0x01, "payload_format_indicator", _BYTE),
    (0x02, "message_expiry_interval", _U32),
    (0x03, "content_type", _STR),
    (0x08, "response_topic", _STR),
    (0x09, "correlation_data", _BIN),
    (0x0B, "subscription_identifiers", _VARINT),
    (0x11, "session_expiry_interval", _U32),
    (0x12, "assigned_client_identifier", _STR),
    (0x13, "server_keep_alive", _U16),
    (0x15, "authentication_method", _STR),
    (0x16, "authentication_data", _BIN),
    (0x17, "request_problem_information", _BYTE),
    (0x18, "will_delay_interval", _U32),
    (0x19, "request_response_information", _BYTE),
    (0x1A, "response_information", _STR),
    (0x1C, "server_reference", _STR),
    (0x1F, "reason_string", _STR),
    (0x21, "receive_maximum", _U16),
    (0x22, "topic_alias_maximum", _U16),
    (0x23, "topic_alias", _U16),
    (0x24, "maximum_qos", _BYTE),
    (0x25, "retain_available", _BYTE),
    (0x26, "user_properties", _PAIR),
    (0x27, "maximum_packet_size", _U32),
    (0x28, "wildcard_subscription_available", _BYTE),
    (0x29, "subscription_identifier_available", _BYTE),
    (0x2A, "shared_subscription_available", _BYTE),
)
_PROPERTY_BY_ID: Final = {pid: (name, kind) for pid, name, kind in _PROPERTY_TABLE}
_FLAG_PROPERTIES: Final = frozenset(
    {
        "payload_format_indicator",
        "request_problem_information",
        "request_response_information",
        "maximum_qos",
        "retain_available",
        "wildcard_subscription_available",
        "subscription_identifier_available",
        "shared_subscription_available",
    }
)
_NONZERO_PROPERTIES: Final = ("receive_maximum", "maximum_packet_size")

# Which properties each packet type (and the will) may carry (MQTT 5 section 2.2.2.2).
_CONNECT_PROPS: Final = frozenset({0x11, 0x15, 0x16, 0x17, 0x19, 0x21, 0x22, 0x26, 0x27})
_CONNACK_PROPS: Final = frozenset(
    {0x11, 0x12, 0x13, 0x15, 0x16, 0x1A, 0x1C, 0x1F, 0x21, 0x22, 0x24, 0x25, 0x26, 0x27, 0x28}
    | {0x29, 0x2A}
)
_PUBLISH_PROPS: Final = frozenset({0x01, 0x02, 0x03, 0x08, 0x09, 0x0B, 0x23, 0x26})
_WILL_PROPS: Final = frozenset({0x01, 0x02, 0x03, 0x08, 0x09, 0x18, 0x26})
_ACK_PROPS: Final = frozenset({0x1F, 0x26})
_SUBSCRIBE_PROPS: Final = frozenset({0x0B, 0x26})
_UNSUBSCRIBE_PROPS: Final = frozenset({0x26})
_DISCONNECT_PROPS: Final = frozenset({0x11, 0x1C, 0x1F, 0x26})
_AUTH_PROPS: Final = frozenset({0x15, 0x16, 0x1F, 0x26})

# Reason codes defined per packet type (MQTT 5 section 2.4); 3.1.1 return codes separately.
_CONNACK_CODES_V4: Final = frozenset(range(6))
_CONNACK_CODES: Final = frozenset(
    {0x00, 0x80, 0x81, 0x82, 0x83, 0x84, 0x85, 0x86, 0x87, 0x88, 0x89, 0x8A, 0x8C, 0x90}
    | {0x95, 0x97, 0x99, 0x9A, 0x9B, 0x9C, 0x9D, 0x9F}
)
_PUBACK_CODES: Final = frozenset({0x00, 0x10, 0x80, 0x83, 0x87, 0x90, 0x91, 0x97, 0x99})
_PUBREL_CODES: Final = frozenset({0x00, 0x92})
_SUBACK_CODES_V4: Final = frozenset({0x00, 0x01, 0x02, 0x80})
_SUBACK_CODES: Final = frozenset(
    {0x00, 0x01, 0x02, 0x80, 0x83, 0x87, 0x8F, 0x91, 0x97, 0x9E, 0xA1, 0xA2}
)
_UNSUBACK_CODES: Final = frozenset({0x00, 0x11, 0x80, 0x83, 0x87, 0x8F, 0x91})
_DISCONNECT_CODES: Final = frozenset(
    {0x00, 0x04, 0x80, 0x81, 0x82, 0x83, 0x87, 0x89, 0x8B, 0x8D, 0x8E, 0x8F, 0x90, 0x93, 0x94}
    | {0x95, 0x96, 0x97, 0x98, 0x99, 0x9A, 0x9B, 0x9C, 0x9D, 0x9E, 0x9F, 0xA0, 0xA1, 0xA2}
)
_AUTH_CODES: Final = frozenset({0x00, 0x18, 0x19})


# --------------------------------------------------------------------------------------------
# Packets


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

_PINGREQ: Final = PingReq()
_PINGRESP: Final = PingResp()


# --------------------------------------------------------------------------------------------
# Decoding primitives. Every reader takes the buffer, a position and the end of the field's
# enclosing structure, and returns the value and the position after it.


def _read_varint(buf: bytes, pos: int, end: int) -> tuple[int, int]:
    if pos >= end:
        raise _malformed("variable byte integer runs past the end of the packet")
    byte = buf[pos]
    if byte < 0x80:
        return byte, pos + 1
    value = byte & 0x7F
    shift = 7
    pos += 1
    while True:
        if pos >= end:
            raise _malformed("variable byte integer runs past the end of the packet")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            break
        shift += 7
        if shift > 21:
            raise _malformed("variable byte integer longer than 4 bytes")
    if byte == 0:
        raise _malformed("variable byte integer not minimally encoded")
    return value, pos


def _read_u16(buf: bytes, pos: int, end: int, what: str) -> tuple[int, int]:
    if pos + 2 > end:
        raise _malformed(f"{what} runs past the end of the packet")
    return buf[pos] << 8 | buf[pos + 1], pos + 2


def _read_bin(buf: bytes, pos: int, end: int, what: str) -> tuple[bytes, int]:
    if pos + 2 > end:
        raise _malformed(f"{what} runs past the end of the packet")
    stop = pos + 2 + (buf[pos] << 8 | buf[pos + 1])
    if stop > end:
        raise _malformed(f"{what} runs past the end of the packet")
    return buf[pos + 2 : stop], stop


def _read_str(buf: bytes, pos: int, end: int, what: str) -> tuple[str, int]:
    if pos + 2 > end:
        raise _malformed(f"{what} runs past the end of the packet")
    stop = pos + 2 + (buf[pos] << 8 | buf[pos + 1])
    if stop > end:
        raise _malformed(f"{what} runs past the end of the packet")
    try:
        value = buf[pos + 2 : stop].decode()
    except UnicodeDecodeError:
        raise _malformed(f"{what} is not well-formed UTF-8") from None
    if "\x00" in value:
        raise _malformed(f"{what} contains U+0000")
    return value, stop


def _read_packet_id(buf: bytes, pos: int, end: int, what: str) -> tuple[int, int]:
    if pos + 2 > end:
        raise _malformed(f"{what} packet identifier runs past the end of the packet")
    packet_id = buf[pos] << 8 | buf[pos + 1]
    if not packet_id:
        raise _protocol_error(f"{what} packet identifier is 0")
    return packet_id, pos + 2


def _check_topic_name(topic: str, what: str) -> None:
    if "+" in topic or "#" in topic:
        raise MQTTProtocolError(TOPIC_NAME_INVALID, f"{what} contains a wildcard")


def _decode_properties(
    buf: bytes,
    pos: int,
    end: int,
    allowed: frozenset[int],
    what: str,
    *,
    repeat_subid: bool = False,
) -> tuple[Properties, int]:
    """Decode a property length and the properties; return them and the position after."""
    if pos >= end:
        raise _malformed(f"{what} property length missing")
    length = buf[pos]
    if length == 0:
        return EMPTY_PROPERTIES, pos + 1
    if length < 0x80:
        pos += 1
    else:
        length, pos = _read_varint(buf, pos, end)
    stop = pos + length
    if stop > end:
        raise _malformed(f"{what} properties run past the end of the packet")
    values: dict[str, Any] = {}
    users: list[tuple[str, str]] = []
    subids: list[int] = []
    while pos < stop:
        pid = buf[pos]
        pos += 1
        spec = _PROPERTY_BY_ID.get(pid)
        if spec is None:
            raise _malformed(f"{what} carries unknown property 0x{pid:02X}")
        name, kind = spec
        if pid not in allowed:
            raise _malformed(f"property {name} (0x{pid:02X}) is not allowed in {what}")
        value: Any
        if kind == _STR:
            value, pos = _read_str(buf, pos, stop, name)
        elif kind == _PAIR:
            key, pos = _read_str(buf, pos, stop, "user property name")
            val, pos = _read_str(buf, pos, stop, "user property value")
            users.append((key, val))
            continue
        elif kind == _BYTE:
            if pos >= stop:
                raise _malformed(f"{name} runs past the end of the properties")
            value = buf[pos]
            pos += 1
        elif kind == _U16:
            value, pos = _read_u16(buf, pos, stop, name)
        elif kind == _U32:
            if pos + 4 > stop:
                raise _malformed(f"{name} runs past the end of the properties")
            value = int.from_bytes(buf[pos : pos + 4], "big")
            pos += 4
        elif kind == _BIN:
            value, pos = _read_bin(buf, pos, stop, name)
        else:  # _VARINT: the subscription identifier
            value, pos = _read_varint(buf, pos, stop)
            if value == 0:
                raise _protocol_error("subscription identifier is 0")
            if subids and not repeat_subid:
                raise _protocol_error(f"{what} carries subscription identifier more than once")
            subids.append(value)
            continue
        if name in values:
            raise _protocol_error(f"{what} carries {name} more than once")
        values[name] = value
    for name in _FLAG_PROPERTIES.intersection(values):
        if values[name] > 1:
            raise _protocol_error(f"{name} must be 0 or 1, got {values[name]}")
    for name in _NONZERO_PROPERTIES:
        if values.get(name) == 0:
            raise _protocol_error(f"{name} must not be 0")
    response_topic = values.get("response_topic")
    if response_topic is not None:
        if not response_topic:
            raise MQTTProtocolError(TOPIC_NAME_INVALID, "response topic is empty")
        _check_topic_name(response_topic, "response topic")
    if users:
        values["user_properties"] = tuple(users)
    if subids:
        values["subscription_identifiers"] = tuple(subids)
    return Properties(**values), pos


# --------------------------------------------------------------------------------------------
# Decoding packets. Each decoder gets the buffer, the start and end of the variable header and
# payload, the fixed header flags and the protocol level.

_Decode: TypeAlias = Callable[[bytes, int, int, int, int], Packet]


def _decode_reserved(buf: bytes, pos: int, end: int, flags: int, level: int) -> Packet:
    raise _malformed("reserved packet type 0")


def _decode_connect(buf: bytes, pos: int, end: int, flags: int, level: int) -> Connect:
    if flags:
        raise _malformed("CONNECT fixed header flags must be 0")
    name, pos = _read_bin(buf, pos, end, "protocol name")
    if name == b"MQIsdp":
        raise MQTTProtocolError(
            UNSUPPORTED_PROTOCOL_VERSION, "MQTT 3.1 (MQIsdp) is not supported", v3_connack_code=1
        )
    if name != b"MQTT":
        raise _protocol_error(f"protocol name {name[:16]!r} is not 'MQTT'")
    if pos >= end:
        raise _malformed("CONNECT protocol level missing")
    level = buf[pos]
    if level != 4 and level != 5:
        raise MQTTProtocolError(
            UNSUPPORTED_PROTOCOL_VERSION,
            f"protocol level {level} is not supported (4 and 5 are)",
            v3_connack_code=1,
        )
    try:
        return _decode_connect_body(buf, pos + 1, end, level)
    except MQTTProtocolError as exc:
        exc.protocol_level = level
        raise


def _decode_connect_body(buf: bytes, pos: int, end: int, level: int) -> Connect:
    if pos + 3 > end:
        raise _malformed("CONNECT variable header runs past the end of the packet")
    flags = buf[pos]
    keep_alive = buf[pos + 1] << 8 | buf[pos + 2]
    pos += 3
    if flags & 0x01:
        raise _malformed("CONNECT reserved flag is set")
    will_flag = flags & 0x04
    will_qos = (flags >> 3) & 3
    will_retain = flags & 0x20 == 0x20
    if will_qos == 3:
        raise _malformed("CONNECT will QoS is 3")
    if not will_flag and (will_qos or will_retain):
        raise _malformed("CONNECT will QoS or will retain set without the will flag")
    has_password = flags & 0x40
    has_username = flags & 0x80
    if level == 4 and has_password and not has_username:
        raise _malformed("CONNECT password flag set without the user name flag")
    properties = EMPTY_PROPERTIES
    if level == 5:
        properties, pos = _decode_properties(buf, pos, end, _CONNECT_PROPS, "CONNECT")
        if properties.authentication_data is not None and properties.authentication_method is None:
            raise _protocol_error("authentication data without authentication method")
    client_id, pos = _read_str(buf, pos, end, "client identifier")
    will = None
    if will_flag:
        will_properties = EMPTY_PROPERTIES
        if level == 5:
            will_properties, pos = _decode_properties(buf, pos, end, _WILL_PROPS, "will")
        topic, pos = _read_str(buf, pos, end, "will topic")
        if not topic:
            raise _protocol_error("will topic is empty")
        _check_topic_name(topic, "will topic")
        payload, pos = _read_bin(buf, pos, end, "will payload")
        will = Will(topic, payload, will_qos, will_retain, will_properties)
    username = None
    if has_username:
        username, pos = _read_str(buf, pos, end, "user name")
    password = None
    if has_password:
        password, pos = _read_bin(buf, pos, end, "password")
    if pos != end:
        raise _malformed("CONNECT has bytes after its payload")
    return Connect(
        level, flags & 0x02 == 0x02, keep_alive, client_id, username, password, will, properties
    )


def _decode_connack(buf: bytes, pos: int, end: int, flags: int, level: int) -> ConnAck:
    if flags:
        raise _malformed("CONNACK fixed header flags must be 0")
    if pos + 2 > end:
        raise _malformed("CONNACK runs past the end of the packet")
    ack_flags = buf[pos]
    reason_code = buf[pos + 1]
    if ack_flags & 0xFE:
        raise _malformed("CONNACK reserved acknowledge flags are set")
    if reason_code not in (_CONNACK_CODES if level == 5 else _CONNACK_CODES_V4):
        raise _protocol_error(f"CONNACK reason code 0x{reason_code:02X} is not defined")
    if ack_flags and reason_code:
        raise _protocol_error("CONNACK with session present and a non-zero reason code")
    pos += 2
    properties = EMPTY_PROPERTIES
    if level == 5:
        properties, pos = _decode_properties(buf, pos, end, _CONNACK_PROPS, "CONNACK")
    if pos != end:
        raise _malformed("CONNACK has bytes after its properties")
    return ConnAck(ack_flags == 1, reason_code, properties)


def _decode_publish(buf: bytes, pos: int, end: int, flags: int, level: int) -> Publish:
    qos = (flags >> 1) & 3
    if qos == 3:
        raise _malformed("PUBLISH QoS is 3")
    if pos + 2 > end:
        raise _malformed("PUBLISH topic runs past the end of the packet")
    p = pos + 2 + (buf[pos] << 8 | buf[pos + 1])
    if p > end:
        raise _malformed("PUBLISH topic runs past the end of the packet")
    try:
        topic = buf[pos + 2 : p].decode()
    except UnicodeDecodeError:
        raise _malformed("PUBLISH topic is not well-formed UTF-8") from None
    if qos:
        if p + 2 > end:
            raise _malformed("PUBLISH packet identifier runs past the end of the packet")
        packet_id = buf[p] << 8 | buf[p + 1]
        if not packet_id:
            raise _protocol_error("PUBLISH packet identifier is 0")
        p += 2
    elif flags & 0x08:
        raise _malformed("PUBLISH QoS 0 with DUP set")
    else:
        packet_id = 0
    if level == 5:
        if p < end and buf[p] == 0:
            properties = EMPTY_PROPERTIES
            p += 1
        else:
            properties, p = _decode_properties(
                buf, p, end, _PUBLISH_PROPS, "PUBLISH", repeat_subid=True
            )
    else:
        properties = EMPTY_PROPERTIES
    if "+" in topic or "#" in topic or "\x00" in topic:
        if "\x00" in topic:
            raise _malformed("PUBLISH topic contains U+0000")
        raise MQTTProtocolError(TOPIC_NAME_INVALID, "PUBLISH topic contains a wildcard")
    if not topic and properties.topic_alias is None:
        raise _protocol_error(
            "PUBLISH topic is empty and has no topic alias"
            if level == 5
            else "PUBLISH topic is empty"
        )
    return Publish(
        topic, buf[p:end], qos, flags & 0x01 == 0x01, flags & 0x08 == 0x08, packet_id, properties
    )


def _ack_decoder(
    cls: type[PubAck | PubRec | PubRel | PubComp],
    name: str,
    expected_flags: int,
    codes: frozenset[int],
) -> _Decode:
    def decode(buf: bytes, pos: int, end: int, flags: int, level: int) -> Packet:
        if flags != expected_flags:
            raise _malformed(f"{name} fixed header flags must be {expected_flags:#06b}")
        packet_id, p = _read_packet_id(buf, pos, end, name)
        if p == end:
            return cls(packet_id)
        if level == 4:
            raise _malformed(f"{name} remaining length must be 2")
        reason_code = buf[p]
        if reason_code not in codes:
            raise _protocol_error(f"{name} reason code 0x{reason_code:02X} is not defined")
        p += 1
        if p == end:
            return cls(packet_id, reason_code)
        properties, p = _decode_properties(buf, p, end, _ACK_PROPS, name)
        if p != end:
            raise _malformed(f"{name} has bytes after its properties")
        return cls(packet_id, reason_code, properties)

    return decode


def _decode_subscribe(buf: bytes, pos: int, end: int, flags: int, level: int) -> Subscribe:
    if flags != 0x02:
        raise _malformed("SUBSCRIBE fixed header flags must be 0b0010")
    packet_id, pos = _read_packet_id(buf, pos, end, "SUBSCRIBE")
    properties = EMPTY_PROPERTIES
    if level == 5:
        properties, pos = _decode_properties(buf, pos, end, _SUBSCRIBE_PROPS, "SUBSCRIBE")
    subscriptions = []
    while pos < end:
        topic_filter, pos = _read_str(buf, pos, end, "SUBSCRIBE topic filter")
        if pos >= end:
            raise _malformed("SUBSCRIBE subscription options missing")
        options = buf[pos]
        pos += 1
        qos = options & 0x03
        if level == 4:
            if options & 0xFC:
                raise _malformed("SUBSCRIBE reserved bits in the requested QoS byte are set")
            if qos == 3:
                raise _malformed("SUBSCRIBE requested QoS is 3")
            subscriptions.append(Subscription(topic_filter, qos))
            continue
        if options & 0xC0:
            raise _malformed("SUBSCRIBE reserved subscription option bits are set")
        if qos == 3:
            raise _protocol_error("SUBSCRIBE maximum QoS is 3")
        retain_handling = (options >> 4) & 0x03
        if retain_handling == 3:
            raise _protocol_error("SUBSCRIBE retain handling is 3")
        no_local = options & 0x04 == 0x04
        if no_local and topic_filter.startswith("$share/"):
            raise _protocol_error("SUBSCRIBE No Local on a shared subscription")
        subscriptions.append(
            Subscription(topic_filter, qos, no_local, options & 0x08 == 0x08, retain_handling)
        )
    if not subscriptions:
        raise _protocol_error("SUBSCRIBE without a topic filter")
    return Subscribe(packet_id, subscriptions, properties)


def _decode_suback(buf: bytes, pos: int, end: int, flags: int, level: int) -> SubAck:
    if flags:
        raise _malformed("SUBACK fixed header flags must be 0")
    packet_id, pos = _read_packet_id(buf, pos, end, "SUBACK")
    properties = EMPTY_PROPERTIES
    codes = _SUBACK_CODES_V4
    if level == 5:
        properties, pos = _decode_properties(buf, pos, end, _ACK_PROPS, "SUBACK")
        codes = _SUBACK_CODES
    reason_codes = list(buf[pos:end])
    if not reason_codes:
        raise _protocol_error("SUBACK without a reason code")
    for code in reason_codes:
        if code not in codes:
            raise _protocol_error(f"SUBACK reason code 0x{code:02X} is not defined")
    return SubAck(packet_id, reason_codes, properties)


def _decode_unsubscribe(buf: bytes, pos: int, end: int, flags: int, level: int) -> Unsubscribe:
    if flags != 0x02:
        raise _malformed("UNSUBSCRIBE fixed header flags must be 0b0010")
    packet_id, pos = _read_packet_id(buf, pos, end, "UNSUBSCRIBE")
    properties = EMPTY_PROPERTIES
    if level == 5:
        properties, pos = _decode_properties(buf, pos, end, _UNSUBSCRIBE_PROPS, "UNSUBSCRIBE")
    topic_filters = []
    while pos < end:
        topic_filter, pos = _read_str(buf, pos, end, "UNSUBSCRIBE topic filter")
        topic_filters.append(topic_filter)
    if not topic_filters:
        raise _protocol_error("UNSUBSCRIBE without a topic filter")
    return Unsubscribe(packet_id, topic_filters, properties)


def _decode_unsuback(buf: bytes, pos: int, end: int, flags: int, level: int) -> UnsubAck:
    if flags:
        raise _malformed("UNSUBACK fixed header flags must be 0")
    packet_id, pos = _read_packet_id(buf, pos, end, "UNSUBACK")
    if level == 4:
        if pos != end:
            raise _malformed("UNSUBACK remaining length must be 2")
        return UnsubAck(packet_id)
    properties, pos = _decode_properties(buf, pos, end, _ACK_PROPS, "UNSUBACK")
    reason_codes = list(buf[pos:end])
    if not reason_codes:
        raise _protocol_error("UNSUBACK without a reason code")
    for code in reason_codes:
        if code not in _UNSUBACK_CODES:
            raise _protocol_error(f"UNSUBACK reason code 0x{code:02X} is not defined")
    return UnsubAck(packet_id, reason_codes, properties)


def _decode_pingreq(buf: bytes, pos: int, end: int, flags: int, level: int) -> PingReq:
    if flags or pos != end:
        raise _malformed("PINGREQ must be exactly 0xC0 0x00")
    return _PINGREQ


def _decode_pingresp(buf: bytes, pos: int, end: int, flags: int, level: int) -> PingResp:
    if flags or pos != end:
        raise _malformed("PINGRESP must be exactly 0xD0 0x00")
    return _PINGRESP


def _decode_disconnect(buf: bytes, pos: int, end: int, flags: int, level: int) -> Disconnect:
    if flags:
        raise _malformed("DISCONNECT fixed header flags must be 0")
    if pos == end:
        return Disconnect()
    if level == 4:
        raise _malformed("DISCONNECT remaining length must be 0")
    reason_code = buf[pos]
    if reason_code not in _DISCONNECT_CODES:
        raise _protocol_error(f"DISCONNECT reason code 0x{reason_code:02X} is not defined")
    pos += 1
    if pos == end:
        return Disconnect(reason_code)
    properties, pos = _decode_properties(buf, pos, end, _DISCONNECT_PROPS, "DISCONNECT")
    if pos != end:
        raise _malformed("DISCONNECT has bytes after its properties")
    return Disconnect(reason_code, properties)


def _decode_auth(buf: bytes, pos: int, end: int, flags: int, level: int) -> Auth:
    if level == 4:
        raise _malformed("reserved packet type 15 (AUTH exists only in MQTT 5)")
    if flags:
        raise _malformed("AUTH fixed header flags must be 0")
    if pos == end:
        return Auth()
    reason_code = buf[pos]
    if reason_code not in _AUTH_CODES:
        raise _protocol_error(f"AUTH reason code 0x{reason_code:02X} is not defined")
    properties, pos = _decode_properties(buf, pos + 1, end, _AUTH_PROPS, "AUTH")
    if pos != end:
        raise _malformed("AUTH has bytes after its properties")
    return Auth(reason_code, properties)


_DECODERS: Final[tuple[_Decode, ...]] = (
    _decode_reserved,
    _decode_connect,
    _decode_connack,
    _decode_publish,
    _ack_decoder(PubAck, "PUBACK", 0, _PUBACK_CODES),
    _ack_decoder(PubRec, "PUBREC", 0, _PUBACK_CODES),
    _ack_decoder(PubRel, "PUBREL", 2, _PUBREL_CODES),
    _ack_decoder(PubComp, "PUBCOMP", 0, _PUBREL_CODES),
    _decode_subscribe,
    _decode_suback,
    _decode_unsubscribe,
    _decode_unsuback,
    _decode_pingreq,
    _decode_pingresp,
    _decode_disconnect,
    _decode_auth,
)


def _remaining_length(buf: bytes, pos: int) -> tuple[int, int]:
    """Decode the remaining length of the packet at ``pos`` (of 128 or more).

    Returns the length and the start of the variable header, or (0, 0) if the buffer ends
    inside the length.
    """
    value = 0
    shift = 0
    i = pos + 1
    n = len(buf)
    while True:
        if i >= n:
            return 0, 0
        byte = buf[i]
        i += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            break
        shift += 7
        if shift > 21:
            raise _malformed("remaining length longer than 4 bytes")
    if byte == 0:
        raise _malformed("remaining length not minimally encoded")
    return value, i


class Decoder:
    """Streaming decoder: :meth:`feed` bytes as they arrive, then iterate for complete packets.

    ``protocol_level`` is the connection's level (4 or 5); while it is None (a server before
    CONNECT) only a CONNECT is accepted, and the CONNECT sets it. ``max_packet_size`` bounds the
    total packet size (fixed header included) and may be changed at any time.

    The buffer is an immutable ``bytes`` and an offset: packets are parsed in place, the payload
    is the only copy. :meth:`feed` joins the unconsumed tail with the new chunk (the tail is short
    unless a packet is incomplete); while a large packet is incomplete, chunks are collected in a
    list and joined once it is complete, so a big packet fed in small chunks costs linear time.
    """

    __slots__ = (
        "_buf",
        "_error",
        "_need",
        "_parts",
        "_parts_len",
        "_pos",
        "max_packet_size",
        "protocol_level",
    )

    def __init__(
        self, protocol_level: int | None = None, max_packet_size: int = MAX_PACKET_SIZE
    ) -> None:
        if protocol_level not in (None, 4, 5):
            raise ValueError(f"protocol level {protocol_level} is not 4 or 5")
        self.protocol_level = protocol_level
        self.max_packet_size = max_packet_size
        self._buf = b""
        self._pos = 0
        self._need = 0  # total size of the incomplete packet at _pos, once its header is known
        self._parts: list[bytes] = []
        self._parts_len = 0
        self._error: MQTTProtocolError | None = None

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as packets."""
        return len(self._buf) - self._pos + self._parts_len

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Add received bytes. Raises the decoder's earlier error, if any."""
        if self._error is not None:
            raise self._error
        if not data:
            return
        buf = self._buf
        pos = self._pos
        if pos >= len(buf):
            self._buf = bytes(data)  # no copy for bytes
        elif self._need:
            self._parts.append(bytes(data))
            self._parts_len += len(data)
            if len(buf) - pos + self._parts_len < self._need:
                return
            self._buf = b"".join((buf[pos:], *self._parts))
            self._parts.clear()
            self._parts_len = 0
        else:
            self._buf = buf[pos:] + data
        self._pos = 0

    def next_packet(self) -> Packet | None:
        """Return the next complete packet, or None until more bytes are fed.

        Raises :class:`MQTTProtocolError` for a malformed or oversized packet; the decoder then
        stays failed (the connection must be closed).
        """
        if self._error is not None:
            raise self._error
        buf = self._buf
        pos = self._pos
        if len(buf) - pos < 2:
            return None
        try:
            length = buf[pos + 1]
            if length < 0x80:
                end = pos + 2 + length
            else:
                length, start = _remaining_length(buf, pos)
                if not start:
                    return None
                end = start + length
            if end - pos > self.max_packet_size:
                raise MQTTProtocolError(
                    PACKET_TOO_LARGE,
                    f"packet of {end - pos} bytes exceeds the maximum of {self.max_packet_size}",
                )
            if end > len(buf):
                self._need = end - pos
                return None
            self._need = 0
            self._pos = end
            first = buf[pos]
            level = self.protocol_level
            if level is None:
                if first >> 4 != _CONNECT:
                    raise _protocol_error("the first packet must be CONNECT")
                connect = _decode_connect(buf, end - length, end, first & 0x0F, 4)
                self.protocol_level = connect.protocol_level
                return connect
            return _DECODERS[first >> 4](buf, end - length, end, first & 0x0F, level)
        except MQTTProtocolError as exc:
            if exc.protocol_level is None:
                exc.protocol_level = self.protocol_level
            self._error = exc
            raise

    def __iter__(self) -> Iterator[Packet]:
        """Yield the complete packets buffered so far."""
        next_packet = self.next_packet
        while (packet := next_packet()) is not None:
            yield packet


def check_payload_format(payload: bytes, properties: Properties) -> None:
    """Raise 0x99 Payload Format Invalid if the payload is announced as UTF-8 and is not.

    For a PUBLISH (answer PUBACK/PUBREC 0x99) or a will (answer CONNACK 0x99).
    """
    if properties.payload_format_indicator == 1:
        try:
            payload.decode()
        except UnicodeDecodeError:
            raise MQTTProtocolError(
                PAYLOAD_FORMAT_INVALID, "payload format indicator is UTF-8, payload is not"
            ) from None


# --------------------------------------------------------------------------------------------
# Encoding

_pack_u16 = struct.Struct(">H").pack
_pack_u32 = struct.Struct(">I").pack
_pack_hdr1 = struct.Struct(">BBH").pack  # type byte, 1-byte remaining length, topic length
_pack_hdr2 = struct.Struct(">BBBH").pack  # type byte, 2-byte remaining length, topic length
_VARINT_1: Final = tuple(bytes((i,)) for i in range(128))


def _varint(value: int) -> bytes:
    if value < 0x80:
        return _VARINT_1[value]
    if value > _MAX_REMAINING_LENGTH:
        raise ValueError(f"{value} does not fit a variable byte integer")
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _packet(first: int, body: bytes) -> bytes:
    length = len(body)
    if length < 0x80:
        return bytes((first, length)) + body
    return bytes((first,)) + _varint(length) + body


def _str(value: str) -> bytes:
    data = value.encode()
    if len(data) > 0xFFFF:
        raise ValueError(f"string of {len(data)} bytes is longer than 65535")
    if "\x00" in value:
        raise ValueError("MQTT strings must not contain U+0000")
    return _pack_u16(len(data)) + data


def _bin(value: bytes) -> bytes:
    if len(value) > 0xFFFF:
        raise ValueError(f"binary data of {len(value)} bytes is longer than 65535")
    return _pack_u16(len(value)) + value


def _packet_id(packet_id: int, what: str) -> bytes:
    if not 0 < packet_id <= 0xFFFF:
        raise ValueError(f"{what} packet identifier {packet_id} is not in 1..65535")
    return _pack_u16(packet_id)


def _encode_properties(properties: Properties, allowed: frozenset[int], what: str) -> bytes:
    """The property length and properties (level 5)."""
    if properties is EMPTY_PROPERTIES:
        return b"\x00"
    out = bytearray()
    for (pid, name, kind), value in zip(
        _PROPERTY_TABLE, msgspec.structs.astuple(properties), strict=True
    ):
        if value is None or value == ():
            continue
        if pid not in allowed:
            raise ValueError(f"property {name} is not allowed in {what}")
        try:
            if kind == _PAIR:
                for key, val in value:
                    out.append(pid)
                    out += _str(key)
                    out += _str(val)
            elif kind == _VARINT:
                if len(value) > 1 and what != "PUBLISH":
                    raise ValueError(f"{what} carries at most one subscription identifier")
                for subid in value:
                    if not 0 < subid <= _MAX_REMAINING_LENGTH:
                        raise ValueError(f"subscription identifier {subid} out of range")
                    out.append(pid)
                    out += _varint(subid)
            else:
                out.append(pid)
                if kind == _BYTE:
                    out.append(value)
                elif kind == _U16:
                    out += _pack_u16(value)
                elif kind == _U32:
                    out += _pack_u32(value)
                elif kind == _STR:
                    out += _str(value)
                else:
                    out += _bin(value)
        except (struct.error, OverflowError) as exc:
            raise ValueError(f"property {name} value {value!r} out of range") from exc
    return _varint(len(out)) + out


def _check_level(level: int) -> None:
    if level != 4 and level != 5:
        raise ValueError(f"protocol level {level} is not 4 or 5")


def _encode_connect(p: Connect, level: int) -> bytes:
    if p.protocol_level != level:
        raise ValueError(f"CONNECT has level {p.protocol_level}, encoding asked for {level}")
    flags = 0x02 if p.clean_start else 0
    will = p.will
    if will is not None:
        if will.qos not in (0, 1, 2):
            raise ValueError(f"will QoS {will.qos} is not 0, 1 or 2")
        flags |= 0x04 | will.qos << 3 | (0x20 if will.retain else 0)
    if p.username is not None:
        flags |= 0x80
    if p.password is not None:
        if level == 4 and p.username is None:
            raise ValueError("MQTT 3.1.1 CONNECT cannot carry a password without a user name")
        flags |= 0x40
    if not 0 <= p.keep_alive <= 0xFFFF:
        raise ValueError(f"keep alive {p.keep_alive} is not in 0..65535")
    parts = [b"\x00\x04MQTT", bytes((level, flags)), _pack_u16(p.keep_alive)]
    if level == 5:
        parts.append(_encode_properties(p.properties, _CONNECT_PROPS, "CONNECT"))
    parts.append(_str(p.client_id))
    if will is not None:
        if level == 5:
            parts.append(_encode_properties(will.properties, _WILL_PROPS, "will"))
        parts.append(_str(will.topic))
        parts.append(_bin(will.payload))
    if p.username is not None:
        parts.append(_str(p.username))
    if p.password is not None:
        parts.append(_bin(p.password))
    return _packet(0x10, b"".join(parts))


def _encode_connack(p: ConnAck, level: int) -> bytes:
    if level == 4:
        if p.reason_code not in _CONNACK_CODES_V4:
            raise ValueError(f"3.1.1 CONNACK return code {p.reason_code} is not in 0..5")
        return bytes((0x20, 2, 1 if p.session_present else 0, p.reason_code))
    body = bytes((1 if p.session_present else 0, p.reason_code))
    return _packet(0x20, body + _encode_properties(p.properties, _CONNACK_PROPS, "CONNACK"))


def _encode_publish_packet(p: Publish, level: int) -> bytes:
    return encode_publish(
        p.topic, p.payload, p.qos, p.retain, p.dup, p.packet_id, p.properties, level
    )


def _ack_encoder(
    first: int, name: str
) -> Callable[[PubAck | PubRec | PubRel | PubComp, int], bytes]:
    def encode_ack(p: PubAck | PubRec | PubRel | PubComp, level: int) -> bytes:
        packet_id = _packet_id(p.packet_id, name)
        if level == 4 or (p.reason_code == 0 and p.properties is EMPTY_PROPERTIES):
            return bytes((first, 2)) + packet_id
        if p.properties is EMPTY_PROPERTIES:
            return bytes((first, 3)) + packet_id + bytes((p.reason_code,))
        props = _encode_properties(p.properties, _ACK_PROPS, name)
        return _packet(first, packet_id + bytes((p.reason_code,)) + props)

    return encode_ack


def _encode_subscribe(p: Subscribe, level: int) -> bytes:
    if not p.subscriptions:
        raise ValueError("SUBSCRIBE needs at least one subscription")
    parts = [_packet_id(p.packet_id, "SUBSCRIBE")]
    if level == 5:
        parts.append(_encode_properties(p.properties, _SUBSCRIBE_PROPS, "SUBSCRIBE"))
    for sub in p.subscriptions:
        if sub.qos not in (0, 1, 2) or sub.retain_handling not in (0, 1, 2):
            raise ValueError(f"invalid subscription options {sub!r}")
        options = sub.qos
        if level == 5:
            options |= (
                (0x04 if sub.no_local else 0)
                | (0x08 if sub.retain_as_published else 0)
                | sub.retain_handling << 4
            )
        parts.append(_str(sub.topic_filter))
        parts.append(bytes((options,)))
    return _packet(0x82, b"".join(parts))


def _encode_suback(p: SubAck, level: int) -> bytes:
    if not p.reason_codes:
        raise ValueError("SUBACK needs at least one reason code")
    packet_id = _packet_id(p.packet_id, "SUBACK")
    if level == 4:
        codes = bytes(code if code < 0x80 else 0x80 for code in p.reason_codes)
        return _packet(0x90, packet_id + codes)
    props = _encode_properties(p.properties, _ACK_PROPS, "SUBACK")
    return _packet(0x90, packet_id + props + bytes(p.reason_codes))


def _encode_unsubscribe(p: Unsubscribe, level: int) -> bytes:
    if not p.topic_filters:
        raise ValueError("UNSUBSCRIBE needs at least one topic filter")
    parts = [_packet_id(p.packet_id, "UNSUBSCRIBE")]
    if level == 5:
        parts.append(_encode_properties(p.properties, _UNSUBSCRIBE_PROPS, "UNSUBSCRIBE"))
    parts.extend(_str(topic_filter) for topic_filter in p.topic_filters)
    return _packet(0xA2, b"".join(parts))


def _encode_unsuback(p: UnsubAck, level: int) -> bytes:
    packet_id = _packet_id(p.packet_id, "UNSUBACK")
    if level == 4:
        return b"\xb0\x02" + packet_id
    if not p.reason_codes:
        raise ValueError("MQTT 5 UNSUBACK needs at least one reason code")
    props = _encode_properties(p.properties, _ACK_PROPS, "UNSUBACK")
    return _packet(0xB0, packet_id + props + bytes(p.reason_codes))


def _encode_pingreq(p: PingReq, level: int) -> bytes:
    return b"\xc0\x00"


def _encode_pingresp(p: PingResp, level: int) -> bytes:
    return b"\xd0\x00"


def _encode_disconnect(p: Disconnect, level: int) -> bytes:
    if level == 4 or (p.reason_code == 0 and p.properties is EMPTY_PROPERTIES):
        return b"\xe0\x00"
    if p.properties is EMPTY_PROPERTIES:
        return bytes((0xE0, 1, p.reason_code))
    props = _encode_properties(p.properties, _DISCONNECT_PROPS, "DISCONNECT")
    return _packet(0xE0, bytes((p.reason_code,)) + props)


def _encode_auth(p: Auth, level: int) -> bytes:
    if level == 4:
        raise ValueError("AUTH exists only in MQTT 5")
    if p.reason_code == 0 and p.properties is EMPTY_PROPERTIES:
        return b"\xf0\x00"
    props = _encode_properties(p.properties, _AUTH_PROPS, "AUTH")
    return _packet(0xF0, bytes((p.reason_code,)) + props)


_ENCODERS: Final[dict[type, Callable[[Any, int], bytes]]] = {
    Connect: _encode_connect,
    ConnAck: _encode_connack,
    Publish: _encode_publish_packet,
    PubAck: _ack_encoder(0x40, "PUBACK"),
    PubRec: _ack_encoder(0x50, "PUBREC"),
    PubRel: _ack_encoder(0x62, "PUBREL"),
    PubComp: _ack_encoder(0x70, "PUBCOMP"),
    Subscribe: _encode_subscribe,
    SubAck: _encode_suback,
    Unsubscribe: _encode_unsubscribe,
    UnsubAck: _encode_unsuback,
    PingReq: _encode_pingreq,
    PingResp: _encode_pingresp,
    Disconnect: _encode_disconnect,
    Auth: _encode_auth,
}


def encode(packet: Packet, protocol_level: int) -> bytes:
    """Encode any packet for a connection at ``protocol_level`` (4 or 5).

    At level 4, properties and reason codes 3.1.1 cannot carry are dropped.
    """
    _check_level(protocol_level)
    try:
        encoder = _ENCODERS[type(packet)]
    except KeyError:
        raise TypeError(f"not an MQTT packet: {packet!r}") from None
    return encoder(packet, protocol_level)


def encode_publish(
    topic: str | bytes,
    payload: bytes,
    qos: int = 0,
    retain: bool = False,
    dup: bool = False,
    packet_id: int = 0,
    properties: Properties = EMPTY_PROPERTIES,
    protocol_level: int = 4,
) -> bytes:
    """Encode one PUBLISH: the fan-out hot path. ``topic`` may be pre-encoded UTF-8 bytes.

    The topic is trusted (the server routes only valid topic names); QoS, DUP, the packet id
    and sizes are checked.
    """
    tb = topic.encode() if isinstance(topic, str) else topic
    tlen = len(tb)
    if tlen > 0xFFFF:
        raise ValueError(f"topic of {tlen} bytes is longer than 65535")
    if qos == 0:
        if dup:
            raise ValueError("DUP must be 0 for QoS 0")
        first = 0x31 if retain else 0x30
        if protocol_level == 4:
            length = 2 + tlen + len(payload)
            if length < 0x80:
                return _pack_hdr1(first, length, tlen) + tb + payload
            if length < 0x4000:
                return _pack_hdr2(first, length & 0x7F | 0x80, length >> 7, tlen) + tb + payload
            return b"".join((bytes((first,)), _varint(length), _pack_u16(tlen), tb, payload))
        tail = b"\x00"
    elif qos == 1 or qos == 2:
        if not 0 < packet_id <= 0xFFFF:
            raise ValueError(f"PUBLISH packet identifier {packet_id} is not in 1..65535")
        first = 0x30 | qos << 1 | (0x08 if dup else 0) | (0x01 if retain else 0)
        tail = _pack_u16(packet_id)
        if protocol_level == 5:
            tail += b"\x00"
    else:
        raise ValueError(f"QoS {qos} is not 0, 1 or 2")
    if protocol_level == 5:
        if properties is not EMPTY_PROPERTIES:
            tail = tail[:-1] + _encode_properties(properties, _PUBLISH_PROPS, "PUBLISH")
    elif protocol_level != 4:
        raise ValueError(f"protocol level {protocol_level} is not 4 or 5")
    length = 2 + tlen + len(tail) + len(payload)
    if length < 0x80:
        return _pack_hdr1(first, length, tlen) + tb + tail + payload
    return b"".join((bytes((first,)), _varint(length), _pack_u16(tlen), tb, tail, payload))


class PublishTemplate:
    """A PUBLISH encoded once for a fan-out; only the packet identifier (and DUP) vary.

    ``prefix`` is everything before the packet identifier, ``suffix`` everything after it. For
    QoS 0 there is no identifier and ``data`` is the whole packet; for QoS 1/2 ``data`` is the
    packet with identifier 1, useful for its length (checking a client's maximum packet size).
    ``packet(packet_id)`` joins the three (a writer may also hand ``(prefix, id, suffix)`` to
    ``writelines``).
    """

    __slots__ = ("_dup_prefix", "data", "prefix", "qos", "suffix")

    def __init__(self, data: bytes, qos: int, packet_id_offset: int) -> None:
        self.data = data
        self.qos = qos
        if qos:
            self.prefix = data[:packet_id_offset]
            self.suffix = data[packet_id_offset + 2 :]
            self._dup_prefix = bytes((data[0] | 0x08,)) + self.prefix[1:]
        else:
            self.prefix = data
            self.suffix = b""
            self._dup_prefix = data

    def packet(self, packet_id: int = 0, dup: bool = False) -> bytes:
        """The packet with this identifier (ignored for QoS 0), DUP set for a redelivery."""
        if not self.qos:
            return self.data
        if not 0 < packet_id <= 0xFFFF:
            raise ValueError(f"PUBLISH packet identifier {packet_id} is not in 1..65535")
        return b"".join(
            (self._dup_prefix if dup else self.prefix, packet_id.to_bytes(2, "big"), self.suffix)
        )


def prepare_publish(
    topic: str | bytes,
    payload: bytes,
    qos: int = 0,
    retain: bool = False,
    properties: Properties = EMPTY_PROPERTIES,
    protocol_level: int = 4,
) -> PublishTemplate:
    """Encode a PUBLISH once for many subscribers; see :class:`PublishTemplate`.

    Per-subscriber properties (subscription identifiers, topic alias) cannot be shared; encode
    such packets with :func:`encode_publish`.
    """
    data = encode_publish(
        topic, payload, qos, retain, False, 1 if qos else 0, properties, protocol_level
    )
    tlen = len(topic.encode() if isinstance(topic, str) else topic)
    header = 2
    while data[header - 1] & 0x80:
        header += 1
    return PublishTemplate(data, qos, header + 2 + tlen)
