"""MQTT 5 properties: the one typed :class:`Properties` struct, the property table (identifier,
field, value type), which properties each packet type may carry, and their wire form
(:func:`decode_properties`, :func:`encode_properties`).
"""

from __future__ import annotations

import struct
from typing import Any, Final

import msgspec

from adapters.mqtt.codec.primitives import (
    MAX_REMAINING_LENGTH,
    check_topic_name,
    encode_bin,
    encode_str,
    pack_u16,
    pack_u32,
    read_bin,
    read_str,
    read_u16,
    read_varint,
    varint,
)
from adapters.mqtt.codec.reasons import MQTTProtocolError, ReasonCode, malformed, protocol_error


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
PROPERTY_TABLE: Final[tuple[tuple[int, str, int], ...]] = (
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
_PROPERTY_BY_ID: Final = {pid: (name, kind) for pid, name, kind in PROPERTY_TABLE}
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
CONNECT_PROPS: Final = frozenset({0x11, 0x15, 0x16, 0x17, 0x19, 0x21, 0x22, 0x26, 0x27})
CONNACK_PROPS: Final = frozenset(
    {0x11, 0x12, 0x13, 0x15, 0x16, 0x1A, 0x1C, 0x1F, 0x21, 0x22, 0x24, 0x25, 0x26, 0x27, 0x28}
    | {0x29, 0x2A}
)
PUBLISH_PROPS: Final = frozenset({0x01, 0x02, 0x03, 0x08, 0x09, 0x0B, 0x23, 0x26})
WILL_PROPS: Final = frozenset({0x01, 0x02, 0x03, 0x08, 0x09, 0x18, 0x26})
ACK_PROPS: Final = frozenset({0x1F, 0x26})
SUBSCRIBE_PROPS: Final = frozenset({0x0B, 0x26})
UNSUBSCRIBE_PROPS: Final = frozenset({0x26})
DISCONNECT_PROPS: Final = frozenset({0x11, 0x1C, 0x1F, 0x26})
AUTH_PROPS: Final = frozenset({0x15, 0x16, 0x1F, 0x26})


def decode_properties(
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
        raise malformed(f"{what} property length missing")
    length = buf[pos]
    if length == 0:
        return EMPTY_PROPERTIES, pos + 1
    if length < 0x80:
        pos += 1
    else:
        length, pos = read_varint(buf, pos, end)
    stop = pos + length
    if stop > end:
        raise malformed(f"{what} properties run past the end of the packet")
    values: dict[str, Any] = {}
    users: list[tuple[str, str]] = []
    subids: list[int] = []
    while pos < stop:
        pid = buf[pos]
        pos += 1
        spec = _PROPERTY_BY_ID.get(pid)
        if spec is None:
            raise malformed(f"{what} carries unknown property 0x{pid:02X}")
        name, kind = spec
        if pid not in allowed:
            raise malformed(f"property {name} (0x{pid:02X}) is not allowed in {what}")
        value: Any
        if kind == _STR:
            value, pos = read_str(buf, pos, stop, name)
        elif kind == _PAIR:
            key, pos = read_str(buf, pos, stop, "user property name")
            val, pos = read_str(buf, pos, stop, "user property value")
            users.append((key, val))
            continue
        elif kind == _BYTE:
            if pos >= stop:
                raise malformed(f"{name} runs past the end of the properties")
            value = buf[pos]
            pos += 1
        elif kind == _U16:
            value, pos = read_u16(buf, pos, stop, name)
        elif kind == _U32:
            if pos + 4 > stop:
                raise malformed(f"{name} runs past the end of the properties")
            value = int.from_bytes(buf[pos : pos + 4], "big")
            pos += 4
        elif kind == _BIN:
            value, pos = read_bin(buf, pos, stop, name)
        else:  # _VARINT: the subscription identifier
            value, pos = read_varint(buf, pos, stop)
            if value == 0:
                raise protocol_error("subscription identifier is 0")
            if subids and not repeat_subid:
                raise protocol_error(f"{what} carries subscription identifier more than once")
            subids.append(value)
            continue
        if name in values:
            raise protocol_error(f"{what} carries {name} more than once")
        values[name] = value
    for name in _FLAG_PROPERTIES.intersection(values):
        if values[name] > 1:
            raise protocol_error(f"{name} must be 0 or 1, got {values[name]}")
    for name in _NONZERO_PROPERTIES:
        if values.get(name) == 0:
            raise protocol_error(f"{name} must not be 0")
    response_topic = values.get("response_topic")
    if response_topic is not None:
        if not response_topic:
            raise MQTTProtocolError(ReasonCode.TOPIC_NAME_INVALID, "response topic is empty")
        check_topic_name(response_topic, "response topic")
    if users:
        values["user_properties"] = tuple(users)
    if subids:
        values["subscription_identifiers"] = tuple(subids)
    return Properties(**values), pos


def encode_properties(properties: Properties, allowed: frozenset[int], what: str) -> bytes:
    """The property length and properties (level 5)."""
    if properties is EMPTY_PROPERTIES:
        return b"\x00"
    out = bytearray()
    for (pid, name, kind), value in zip(
        PROPERTY_TABLE, msgspec.structs.astuple(properties), strict=True
    ):
        if value is None or value == ():
            continue
        if pid not in allowed:
            raise ValueError(f"property {name} is not allowed in {what}")
        try:
            if kind == _PAIR:
                for key, val in value:
                    out.append(pid)
                    out += encode_str(key)
                    out += encode_str(val)
            elif kind == _VARINT:
                if len(value) > 1 and what != "PUBLISH":
                    raise ValueError(f"{what} carries at most one subscription identifier")
                for subid in value:
                    if not 0 < subid <= MAX_REMAINING_LENGTH:
                        raise ValueError(f"subscription identifier {subid} out of range")
                    out.append(pid)
                    out += varint(subid)
            else:
                out.append(pid)
                if kind == _BYTE:
                    out.append(value)
                elif kind == _U16:
                    out += pack_u16(value)
                elif kind == _U32:
                    out += pack_u32(value)
                elif kind == _STR:
                    out += encode_str(value)
                else:
                    out += encode_bin(value)
        except (struct.error, OverflowError) as exc:
            raise ValueError(f"property {name} value {value!r} out of range") from exc
    return varint(len(out)) + out
