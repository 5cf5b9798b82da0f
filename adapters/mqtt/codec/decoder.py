"""Decoding: bytes in, packet objects out (:class:`Decoder`), with every check one packet allows
(see the package docstring), and :func:`check_payload_format`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Final, TypeAlias

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
    Subscription,
    UnsubAck,
    Unsubscribe,
    Will,
)
from adapters.mqtt.codec.primitives import (
    MAX_PACKET_SIZE,
    check_topic_name,
    read_bin,
    read_packet_id,
    read_str,
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
    decode_properties,
)
from adapters.mqtt.codec.reasons import (
    AUTH_CODES,
    CONNACK_CODES,
    CONNACK_CODES_V4,
    DISCONNECT_CODES,
    PUBACK_CODES,
    PUBREL_CODES,
    SUBACK_CODES,
    SUBACK_CODES_V4,
    UNSUBACK_CODES,
    MQTTProtocolError,
    ReasonCode,
    malformed,
    protocol_error,
)

_CONNECT: Final = 1  # packet type of CONNECT (fixed header, high nibble)
_PINGREQ: Final = PingReq()
_PINGRESP: Final = PingResp()

_Decode: TypeAlias = Callable[[bytes, int, int, int, int], Packet]


def _decode_reserved(buf: bytes, pos: int, end: int, flags: int, level: int) -> Packet:
    raise malformed("reserved packet type 0")


def _decode_connect(buf: bytes, pos: int, end: int, flags: int, level: int) -> Connect:
    if flags:
        raise malformed("CONNECT fixed header flags must be 0")
    name, pos = read_bin(buf, pos, end, "protocol name")
    if name == b"MQIsdp":
        raise MQTTProtocolError(
            ReasonCode.UNSUPPORTED_PROTOCOL_VERSION,
            "MQTT 3.1 (MQIsdp) is not supported",
            v3_connack_code=1,
            # the level byte, if it arrived: a CONNECT cut short keeps what follows in the buffer
            requested_level=buf[pos] if pos < len(buf) else None,
        )
    if name != b"MQTT":
        raise protocol_error(f"protocol name {name[:16]!r} is not 'MQTT'")
    if pos >= end:
        raise malformed("CONNECT protocol level missing")
    level = buf[pos]
    if level != 4 and level != 5:
        raise MQTTProtocolError(
            ReasonCode.UNSUPPORTED_PROTOCOL_VERSION,
            f"protocol level {level} is not supported (4 and 5 are)",
            v3_connack_code=1,
            requested_level=level,
        )
    try:
        return _decode_connect_body(buf, pos + 1, end, level)
    except MQTTProtocolError as exc:
        exc.protocol_level = level
        raise


def _decode_connect_body(buf: bytes, pos: int, end: int, level: int) -> Connect:
    if pos + 3 > end:
        raise malformed("CONNECT variable header runs past the end of the packet")
    flags = buf[pos]
    keep_alive = buf[pos + 1] << 8 | buf[pos + 2]
    pos += 3
    if flags & 0x01:
        raise malformed("CONNECT reserved flag is set")
    will_flag = flags & 0x04
    will_qos = (flags >> 3) & 3
    will_retain = flags & 0x20 == 0x20
    if will_qos == 3:
        raise malformed("CONNECT will QoS is 3")
    if not will_flag and (will_qos or will_retain):
        raise malformed("CONNECT will QoS or will retain set without the will flag")
    has_password = flags & 0x40
    has_username = flags & 0x80
    if level == 4 and has_password and not has_username:
        raise malformed("CONNECT password flag set without the user name flag")
    properties = EMPTY_PROPERTIES
    if level == 5:
        properties, pos = decode_properties(buf, pos, end, CONNECT_PROPS, "CONNECT")
        if properties.authentication_data is not None and properties.authentication_method is None:
            raise protocol_error("authentication data without authentication method")
    client_id, pos = read_str(buf, pos, end, "client identifier")
    will = None
    if will_flag:
        will_properties = EMPTY_PROPERTIES
        if level == 5:
            will_properties, pos = decode_properties(buf, pos, end, WILL_PROPS, "will")
        topic, pos = read_str(buf, pos, end, "will topic")
        if not topic:
            raise protocol_error("will topic is empty")
        check_topic_name(topic, "will topic")
        payload, pos = read_bin(buf, pos, end, "will payload")
        will = Will(topic, payload, will_qos, will_retain, will_properties)
    username = None
    if has_username:
        username, pos = read_str(buf, pos, end, "user name")
    password = None
    if has_password:
        password, pos = read_bin(buf, pos, end, "password")
    if pos != end:
        raise malformed("CONNECT has bytes after its payload")
    return Connect(
        level, flags & 0x02 == 0x02, keep_alive, client_id, username, password, will, properties
    )


def _decode_connack(buf: bytes, pos: int, end: int, flags: int, level: int) -> ConnAck:
    if flags:
        raise malformed("CONNACK fixed header flags must be 0")
    if pos + 2 > end:
        raise malformed("CONNACK runs past the end of the packet")
    ack_flags = buf[pos]
    reason_code = buf[pos + 1]
    if ack_flags & 0xFE:
        raise malformed("CONNACK reserved acknowledge flags are set")
    if reason_code not in (CONNACK_CODES if level == 5 else CONNACK_CODES_V4):
        raise protocol_error(f"CONNACK reason code 0x{reason_code:02X} is not defined")
    if ack_flags and reason_code:
        raise protocol_error("CONNACK with session present and a non-zero reason code")
    pos += 2
    properties = EMPTY_PROPERTIES
    if level == 5:
        properties, pos = decode_properties(buf, pos, end, CONNACK_PROPS, "CONNACK")
    if pos != end:
        raise malformed("CONNACK has bytes after its properties")
    return ConnAck(ack_flags == 1, reason_code, properties)


def _decode_publish(buf: bytes, pos: int, end: int, flags: int, level: int) -> Publish:
    qos = (flags >> 1) & 3
    if qos == 3:
        raise malformed("PUBLISH QoS is 3")
    if pos + 2 > end:
        raise malformed("PUBLISH topic runs past the end of the packet")
    p = pos + 2 + (buf[pos] << 8 | buf[pos + 1])
    if p > end:
        raise malformed("PUBLISH topic runs past the end of the packet")
    try:
        topic = buf[pos + 2 : p].decode()
    except UnicodeDecodeError:
        raise malformed("PUBLISH topic is not well-formed UTF-8") from None
    if qos:
        if p + 2 > end:
            raise malformed("PUBLISH packet identifier runs past the end of the packet")
        packet_id = buf[p] << 8 | buf[p + 1]
        if not packet_id:
            raise protocol_error("PUBLISH packet identifier is 0")
        p += 2
    elif flags & 0x08:
        raise malformed("PUBLISH QoS 0 with DUP set")
    else:
        packet_id = 0
    if level == 5:
        if p < end and buf[p] == 0:
            properties = EMPTY_PROPERTIES
            p += 1
        else:
            properties, p = decode_properties(
                buf, p, end, PUBLISH_PROPS, "PUBLISH", repeat_subid=True
            )
    else:
        properties = EMPTY_PROPERTIES
    if "+" in topic or "#" in topic or "\x00" in topic:
        if "\x00" in topic:
            raise malformed("PUBLISH topic contains U+0000")
        raise MQTTProtocolError(ReasonCode.TOPIC_NAME_INVALID, "PUBLISH topic contains a wildcard")
    if not topic and properties.topic_alias is None:
        raise protocol_error(
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
            raise malformed(f"{name} fixed header flags must be {expected_flags:#06b}")
        packet_id, p = read_packet_id(buf, pos, end, name)
        if p == end:
            return cls(packet_id)
        if level == 4:
            raise malformed(f"{name} remaining length must be 2")
        reason_code = buf[p]
        if reason_code not in codes:
            raise protocol_error(f"{name} reason code 0x{reason_code:02X} is not defined")
        p += 1
        if p == end:
            return cls(packet_id, reason_code)
        properties, p = decode_properties(buf, p, end, ACK_PROPS, name)
        if p != end:
            raise malformed(f"{name} has bytes after its properties")
        return cls(packet_id, reason_code, properties)

    return decode


def _decode_subscribe(buf: bytes, pos: int, end: int, flags: int, level: int) -> Subscribe:
    if flags != 0x02:
        raise malformed("SUBSCRIBE fixed header flags must be 0b0010")
    packet_id, pos = read_packet_id(buf, pos, end, "SUBSCRIBE")
    properties = EMPTY_PROPERTIES
    if level == 5:
        properties, pos = decode_properties(buf, pos, end, SUBSCRIBE_PROPS, "SUBSCRIBE")
    subscriptions = []
    while pos < end:
        topic_filter, pos = read_str(buf, pos, end, "SUBSCRIBE topic filter")
        if pos >= end:
            raise malformed("SUBSCRIBE subscription options missing")
        options = buf[pos]
        pos += 1
        qos = options & 0x03
        if level == 4:
            if options & 0xFC:
                raise malformed("SUBSCRIBE reserved bits in the requested QoS byte are set")
            if qos == 3:
                raise malformed("SUBSCRIBE requested QoS is 3")
            subscriptions.append(Subscription(topic_filter, qos))
            continue
        if options & 0xC0:
            raise malformed("SUBSCRIBE reserved subscription option bits are set")
        if qos == 3:
            raise protocol_error("SUBSCRIBE maximum QoS is 3")
        retain_handling = (options >> 4) & 0x03
        if retain_handling == 3:
            raise protocol_error("SUBSCRIBE retain handling is 3")
        no_local = options & 0x04 == 0x04
        if no_local and topic_filter.startswith("$share/"):
            raise protocol_error("SUBSCRIBE No Local on a shared subscription")
        subscriptions.append(
            Subscription(topic_filter, qos, no_local, options & 0x08 == 0x08, retain_handling)
        )
    if not subscriptions:
        raise protocol_error("SUBSCRIBE without a topic filter")
    return Subscribe(packet_id, subscriptions, properties)


def _decode_suback(buf: bytes, pos: int, end: int, flags: int, level: int) -> SubAck:
    if flags:
        raise malformed("SUBACK fixed header flags must be 0")
    packet_id, pos = read_packet_id(buf, pos, end, "SUBACK")
    properties = EMPTY_PROPERTIES
    codes = SUBACK_CODES_V4
    if level == 5:
        properties, pos = decode_properties(buf, pos, end, ACK_PROPS, "SUBACK")
        codes = SUBACK_CODES
    reason_codes = list(buf[pos:end])
    if not reason_codes:
        raise protocol_error("SUBACK without a reason code")
    for code in reason_codes:
        if code not in codes:
            raise protocol_error(f"SUBACK reason code 0x{code:02X} is not defined")
    return SubAck(packet_id, reason_codes, properties)


def _decode_unsubscribe(buf: bytes, pos: int, end: int, flags: int, level: int) -> Unsubscribe:
    if flags != 0x02:
        raise malformed("UNSUBSCRIBE fixed header flags must be 0b0010")
    packet_id, pos = read_packet_id(buf, pos, end, "UNSUBSCRIBE")
    properties = EMPTY_PROPERTIES
    if level == 5:
        properties, pos = decode_properties(buf, pos, end, UNSUBSCRIBE_PROPS, "UNSUBSCRIBE")
    topic_filters = []
    while pos < end:
        topic_filter, pos = read_str(buf, pos, end, "UNSUBSCRIBE topic filter")
        topic_filters.append(topic_filter)
    if not topic_filters:
        raise protocol_error("UNSUBSCRIBE without a topic filter")
    return Unsubscribe(packet_id, topic_filters, properties)


def _decode_unsuback(buf: bytes, pos: int, end: int, flags: int, level: int) -> UnsubAck:
    if flags:
        raise malformed("UNSUBACK fixed header flags must be 0")
    packet_id, pos = read_packet_id(buf, pos, end, "UNSUBACK")
    if level == 4:
        if pos != end:
            raise malformed("UNSUBACK remaining length must be 2")
        return UnsubAck(packet_id)
    properties, pos = decode_properties(buf, pos, end, ACK_PROPS, "UNSUBACK")
    reason_codes = list(buf[pos:end])
    if not reason_codes:
        raise protocol_error("UNSUBACK without a reason code")
    for code in reason_codes:
        if code not in UNSUBACK_CODES:
            raise protocol_error(f"UNSUBACK reason code 0x{code:02X} is not defined")
    return UnsubAck(packet_id, reason_codes, properties)


def _decode_pingreq(buf: bytes, pos: int, end: int, flags: int, level: int) -> PingReq:
    if flags or pos != end:
        raise malformed("PINGREQ must be exactly 0xC0 0x00")
    return _PINGREQ


def _decode_pingresp(buf: bytes, pos: int, end: int, flags: int, level: int) -> PingResp:
    if flags or pos != end:
        raise malformed("PINGRESP must be exactly 0xD0 0x00")
    return _PINGRESP


def _decode_disconnect(buf: bytes, pos: int, end: int, flags: int, level: int) -> Disconnect:
    if flags:
        raise malformed("DISCONNECT fixed header flags must be 0")
    if pos == end:
        return Disconnect()
    if level == 4:
        raise malformed("DISCONNECT remaining length must be 0")
    reason_code = buf[pos]
    if reason_code not in DISCONNECT_CODES:
        raise protocol_error(f"DISCONNECT reason code 0x{reason_code:02X} is not defined")
    pos += 1
    if pos == end:
        return Disconnect(reason_code)
    properties, pos = decode_properties(buf, pos, end, DISCONNECT_PROPS, "DISCONNECT")
    if pos != end:
        raise malformed("DISCONNECT has bytes after its properties")
    return Disconnect(reason_code, properties)


def _decode_auth(buf: bytes, pos: int, end: int, flags: int, level: int) -> Auth:
    if level == 4:
        raise malformed("reserved packet type 15 (AUTH exists only in MQTT 5)")
    if flags:
        raise malformed("AUTH fixed header flags must be 0")
    if pos == end:
        return Auth()
    reason_code = buf[pos]
    if reason_code not in AUTH_CODES:
        raise protocol_error(f"AUTH reason code 0x{reason_code:02X} is not defined")
    properties, pos = decode_properties(buf, pos + 1, end, AUTH_PROPS, "AUTH")
    if pos != end:
        raise malformed("AUTH has bytes after its properties")
    return Auth(reason_code, properties)


_DECODERS: Final[tuple[_Decode, ...]] = (
    _decode_reserved,
    _decode_connect,
    _decode_connack,
    _decode_publish,
    _ack_decoder(PubAck, "PUBACK", 0, PUBACK_CODES),
    _ack_decoder(PubRec, "PUBREC", 0, PUBACK_CODES),
    _ack_decoder(PubRel, "PUBREL", 2, PUBREL_CODES),
    _ack_decoder(PubComp, "PUBCOMP", 0, PUBREL_CODES),
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
            raise malformed("remaining length longer than 4 bytes")
    if byte == 0:
        raise malformed("remaining length not minimally encoded")
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
                    ReasonCode.PACKET_TOO_LARGE,
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
                    raise protocol_error("the first packet must be CONNECT")
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
                ReasonCode.PAYLOAD_FORMAT_INVALID,
                "payload format indicator is UTF-8, payload is not",
            ) from None
