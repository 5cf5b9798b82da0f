"""Encoding: packet objects to bytes (:func:`encode`), the PUBLISH fast paths
(:func:`encode_publish`, :func:`prepare_publish` and :class:`PublishTemplate`: encode once for a
fan-out), and the few fixed packets the server sends most, as bytes made once
(:func:`encode_puback` ... :data:`PINGRESP_BYTES`).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any, Final

from adapters.mqtt.codec.packets import (
    Auth,
    ConnAck,
    Connect,
    Disconnect,
    Packet,
    PingReq,
    PingResp,
    PubAck,
    PubComp,
    Publish,
    PubRec,
    PubRel,
    SubAck,
    Subscribe,
    UnsubAck,
    Unsubscribe,
)
from adapters.mqtt.codec.primitives import (
    encode_bin,
    encode_packet_id,
    encode_str,
    frame,
    pack_u16,
    varint,
)
from adapters.mqtt.codec.properties import (
    ACK_PROPS,
    AUTH_PROPS,
    CONNACK_PROPS,
    CONNECT_PROPS,
    DISCONNECT_PROPS,
    EMPTY_PROPERTIES,
    PUBLISH_PROPS,
    SUBSCRIBE_PROPS,
    UNSUBSCRIBE_PROPS,
    WILL_PROPS,
    Properties,
    encode_properties,
)
from adapters.mqtt.codec.reasons import CONNACK_CODES_V4

_pack_hdr1 = struct.Struct(">BBH").pack  # type byte, 1-byte remaining length, topic length
_pack_hdr2 = struct.Struct(">BBBH").pack  # type byte, 2-byte remaining length, topic length


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
    parts = [b"\x00\x04MQTT", bytes((level, flags)), pack_u16(p.keep_alive)]
    if level == 5:
        parts.append(encode_properties(p.properties, CONNECT_PROPS, "CONNECT"))
    parts.append(encode_str(p.client_id))
    if will is not None:
        if level == 5:
            parts.append(encode_properties(will.properties, WILL_PROPS, "will"))
        parts.append(encode_str(will.topic))
        parts.append(encode_bin(will.payload))
    if p.username is not None:
        parts.append(encode_str(p.username))
    if p.password is not None:
        parts.append(encode_bin(p.password))
    return frame(0x10, b"".join(parts))


def _encode_connack(p: ConnAck, level: int) -> bytes:
    if level == 4:
        if p.reason_code not in CONNACK_CODES_V4:
            raise ValueError(f"3.1.1 CONNACK return code {p.reason_code} is not in 0..5")
        return bytes((0x20, 2, 1 if p.session_present else 0, p.reason_code))
    body = bytes((1 if p.session_present else 0, p.reason_code))
    return frame(0x20, body + encode_properties(p.properties, CONNACK_PROPS, "CONNACK"))


def _encode_publish_packet(p: Publish, level: int) -> bytes:
    return encode_publish(
        p.topic, p.payload, p.qos, p.retain, p.dup, p.packet_id, p.properties, level
    )


def _ack_encoder(
    first: int, name: str
) -> Callable[[PubAck | PubRec | PubRel | PubComp, int], bytes]:
    def encode_ack(p: PubAck | PubRec | PubRel | PubComp, level: int) -> bytes:
        packet_id = encode_packet_id(p.packet_id, name)
        if level == 4 or (p.reason_code == 0 and p.properties is EMPTY_PROPERTIES):
            return bytes((first, 2)) + packet_id
        if p.properties is EMPTY_PROPERTIES:
            return bytes((first, 3)) + packet_id + bytes((p.reason_code,))
        props = encode_properties(p.properties, ACK_PROPS, name)
        return frame(first, packet_id + bytes((p.reason_code,)) + props)

    return encode_ack


def _encode_subscribe(p: Subscribe, level: int) -> bytes:
    if not p.subscriptions:
        raise ValueError("SUBSCRIBE needs at least one subscription")
    parts = [encode_packet_id(p.packet_id, "SUBSCRIBE")]
    if level == 5:
        parts.append(encode_properties(p.properties, SUBSCRIBE_PROPS, "SUBSCRIBE"))
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
        parts.append(encode_str(sub.topic_filter))
        parts.append(bytes((options,)))
    return frame(0x82, b"".join(parts))


def _encode_suback(p: SubAck, level: int) -> bytes:
    if not p.reason_codes:
        raise ValueError("SUBACK needs at least one reason code")
    packet_id = encode_packet_id(p.packet_id, "SUBACK")
    if level == 4:
        codes = bytes(code if code < 0x80 else 0x80 for code in p.reason_codes)
        return frame(0x90, packet_id + codes)
    props = encode_properties(p.properties, ACK_PROPS, "SUBACK")
    return frame(0x90, packet_id + props + bytes(p.reason_codes))


def _encode_unsubscribe(p: Unsubscribe, level: int) -> bytes:
    if not p.topic_filters:
        raise ValueError("UNSUBSCRIBE needs at least one topic filter")
    parts = [encode_packet_id(p.packet_id, "UNSUBSCRIBE")]
    if level == 5:
        parts.append(encode_properties(p.properties, UNSUBSCRIBE_PROPS, "UNSUBSCRIBE"))
    parts.extend(encode_str(topic_filter) for topic_filter in p.topic_filters)
    return frame(0xA2, b"".join(parts))


def _encode_unsuback(p: UnsubAck, level: int) -> bytes:
    packet_id = encode_packet_id(p.packet_id, "UNSUBACK")
    if level == 4:
        return b"\xb0\x02" + packet_id
    if not p.reason_codes:
        raise ValueError("MQTT 5 UNSUBACK needs at least one reason code")
    props = encode_properties(p.properties, ACK_PROPS, "UNSUBACK")
    return frame(0xB0, packet_id + props + bytes(p.reason_codes))


def _encode_pingreq(p: PingReq, level: int) -> bytes:
    return b"\xc0\x00"


def _encode_pingresp(p: PingResp, level: int) -> bytes:
    return b"\xd0\x00"


def _encode_disconnect(p: Disconnect, level: int) -> bytes:
    if level == 4 or (p.reason_code == 0 and p.properties is EMPTY_PROPERTIES):
        return b"\xe0\x00"
    if p.properties is EMPTY_PROPERTIES:
        return bytes((0xE0, 1, p.reason_code))
    props = encode_properties(p.properties, DISCONNECT_PROPS, "DISCONNECT")
    return frame(0xE0, bytes((p.reason_code,)) + props)


def _encode_auth(p: Auth, level: int) -> bytes:
    if level == 4:
        raise ValueError("AUTH exists only in MQTT 5")
    if p.reason_code == 0 and p.properties is EMPTY_PROPERTIES:
        return b"\xf0\x00"
    props = encode_properties(p.properties, AUTH_PROPS, "AUTH")
    return frame(0xF0, bytes((p.reason_code,)) + props)


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
            return b"".join((bytes((first,)), varint(length), pack_u16(tlen), tb, payload))
        tail = b"\x00"
    elif qos == 1 or qos == 2:
        if not 0 < packet_id <= 0xFFFF:
            raise ValueError(f"PUBLISH packet identifier {packet_id} is not in 1..65535")
        first = 0x30 | qos << 1 | (0x08 if dup else 0) | (0x01 if retain else 0)
        tail = pack_u16(packet_id)
        if protocol_level == 5:
            tail += b"\x00"
    else:
        raise ValueError(f"QoS {qos} is not 0, 1 or 2")
    if protocol_level == 5:
        if properties is not EMPTY_PROPERTIES:
            tail = tail[:-1] + encode_properties(properties, PUBLISH_PROPS, "PUBLISH")
    elif protocol_level != 4:
        raise ValueError(f"protocol level {protocol_level} is not 4 or 5")
    length = 2 + tlen + len(tail) + len(payload)
    if length < 0x80:
        return _pack_hdr1(first, length, tlen) + tb + tail + payload
    return b"".join((bytes((first,)), varint(length), pack_u16(tlen), tb, tail, payload))


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


# The fixed packets the server sends most: acknowledgements with reason code 0 and no
# properties (the same four bytes at both levels) and PINGRESP.
_pack_ack = struct.Struct(">BBH").pack

#: PINGRESP, the same two bytes at both levels.
PINGRESP_BYTES: Final = b"\xd0\x00"


def encode_puback(packet_id: int) -> bytes:
    """PUBACK, success, no properties (both levels). ``packet_id`` must be valid (1..65535)."""
    return _pack_ack(0x40, 2, packet_id)


def encode_pubrec(packet_id: int) -> bytes:
    """PUBREC, success, no properties (both levels)."""
    return _pack_ack(0x50, 2, packet_id)


def encode_pubrel(packet_id: int) -> bytes:
    """PUBREL, success, no properties (both levels)."""
    return _pack_ack(0x62, 2, packet_id)


def encode_pubcomp(packet_id: int) -> bytes:
    """PUBCOMP, success, no properties (both levels)."""
    return _pack_ack(0x70, 2, packet_id)
