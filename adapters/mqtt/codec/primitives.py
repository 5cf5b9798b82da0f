"""The data representations of MQTT (MQTT 5 section 1.5, MQTT 3.1.1 section 1.5): two- and
four-byte integers, variable byte integers, UTF-8 strings and binary data, read from a buffer
and written to bytes; and the fixed header around a packet body (:func:`frame`).

Every reader takes the buffer, a position and the end of the field's enclosing structure, and
returns the value and the position after it; a field running past that end is Malformed.
"""

from __future__ import annotations

import struct
from typing import Final

from adapters.mqtt.codec.reasons import MQTTProtocolError, ReasonCode, malformed, protocol_error

#: Largest packet the wire format can carry: 1 type byte, 4 length bytes, 268,435,455 body bytes.
MAX_PACKET_SIZE: Final = 1 + 4 + 268_435_455
MAX_REMAINING_LENGTH: Final = 268_435_455

# Reading


def read_varint(buf: bytes, pos: int, end: int) -> tuple[int, int]:
    if pos >= end:
        raise malformed("variable byte integer runs past the end of the packet")
    byte = buf[pos]
    if byte < 0x80:
        return byte, pos + 1
    value = byte & 0x7F
    shift = 7
    pos += 1
    while True:
        if pos >= end:
            raise malformed("variable byte integer runs past the end of the packet")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            break
        shift += 7
        if shift > 21:
            raise malformed("variable byte integer longer than 4 bytes")
    if byte == 0:
        raise malformed("variable byte integer not minimally encoded")
    return value, pos


def read_u16(buf: bytes, pos: int, end: int, what: str) -> tuple[int, int]:
    if pos + 2 > end:
        raise malformed(f"{what} runs past the end of the packet")
    return buf[pos] << 8 | buf[pos + 1], pos + 2


def read_bin(buf: bytes, pos: int, end: int, what: str) -> tuple[bytes, int]:
    if pos + 2 > end:
        raise malformed(f"{what} runs past the end of the packet")
    stop = pos + 2 + (buf[pos] << 8 | buf[pos + 1])
    if stop > end:
        raise malformed(f"{what} runs past the end of the packet")
    return buf[pos + 2 : stop], stop


def read_str(buf: bytes, pos: int, end: int, what: str) -> tuple[str, int]:
    if pos + 2 > end:
        raise malformed(f"{what} runs past the end of the packet")
    stop = pos + 2 + (buf[pos] << 8 | buf[pos + 1])
    if stop > end:
        raise malformed(f"{what} runs past the end of the packet")
    try:
        value = buf[pos + 2 : stop].decode()
    except UnicodeDecodeError:
        raise malformed(f"{what} is not well-formed UTF-8") from None
    if "\x00" in value:
        raise malformed(f"{what} contains U+0000")
    return value, stop


def read_packet_id(buf: bytes, pos: int, end: int, what: str) -> tuple[int, int]:
    if pos + 2 > end:
        raise malformed(f"{what} packet identifier runs past the end of the packet")
    packet_id = buf[pos] << 8 | buf[pos + 1]
    if not packet_id:
        raise protocol_error(f"{what} packet identifier is 0")
    return packet_id, pos + 2


def check_topic_name(topic: str, what: str) -> None:
    if "+" in topic or "#" in topic:
        raise MQTTProtocolError(ReasonCode.TOPIC_NAME_INVALID, f"{what} contains a wildcard")


# Writing
pack_u16 = struct.Struct(">H").pack
pack_u32 = struct.Struct(">I").pack
_VARINT_1: Final = tuple(bytes((i,)) for i in range(128))


def varint(value: int) -> bytes:
    if value < 0x80:
        return _VARINT_1[value]
    if value > MAX_REMAINING_LENGTH:
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


def frame(first: int, body: bytes) -> bytes:
    length = len(body)
    if length < 0x80:
        return bytes((first, length)) + body
    return bytes((first,)) + varint(length) + body


def encode_str(value: str) -> bytes:
    data = value.encode()
    if len(data) > 0xFFFF:
        raise ValueError(f"string of {len(data)} bytes is longer than 65535")
    if "\x00" in value:
        raise ValueError("MQTT strings must not contain U+0000")
    return pack_u16(len(data)) + data


def encode_bin(value: bytes) -> bytes:
    if len(value) > 0xFFFF:
        raise ValueError(f"binary data of {len(value)} bytes is longer than 65535")
    return pack_u16(len(value)) + value


def encode_packet_id(packet_id: int, what: str) -> bytes:
    if not 0 < packet_id <= 0xFFFF:
        raise ValueError(f"{what} packet identifier {packet_id} is not in 1..65535")
    return pack_u16(packet_id)
