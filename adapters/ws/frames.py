"""Outgoing WebSocket frames, encoded once per message and written to every subscriber.

A server's frames are not masked and Conduit negotiates no extension (no permessage-deflate), so
the bytes of a data frame depend only on the message: a fan-out to N connections encodes the frame
once and writes the same bytes N times (DESIGN.md, "Encode once, write many").

Two delivery formats exist: ``raw`` (the payload as published: a text frame when the content type
is textual and the payload is UTF-8, else a binary frame) and ``envelope`` (a JSON text frame
with the message's topic, publisher, protocol, content type, creation time and payload).
"""

from __future__ import annotations

import struct

from core.content import JSON, SENML_JSON, TEXT
from core.message import Message, envelope_json

OP_TEXT = 0x1
OP_BINARY = 0x2
TEXTUAL = frozenset({JSON, SENML_JSON, TEXT})

FORMATS = ("raw", "envelope")


def encode_frame(payload: bytes, text: bool) -> bytes:
    """One unmasked, unfragmented data frame (RFC 6455, section 5.2)."""
    first = 0x80 | (OP_TEXT if text else OP_BINARY)
    n = len(payload)
    if n < 126:
        header = bytes((first, n))
    elif n < 0x10000:
        header = struct.pack("!BBH", first, 126, n)
    else:
        header = struct.pack("!BBQ", first, 127, n)
    return header + payload


def is_text(message: Message) -> bool:
    """Whether the raw payload goes in a text frame: a textual type that is valid UTF-8.

    HTTP and MQTT do not check that a JSON payload is UTF-8; a text frame that is not would make
    a browser fail the connection, so such a payload travels in a binary frame.
    """
    if message.content_type not in TEXTUAL:
        return False
    try:
        message.payload.decode()
    except UnicodeDecodeError:
        return False
    return True


class FrameCache:
    """The encoded frames of the latest message, one per delivery format.

    The bus offers the same :class:`Message` object to every matching subscription in turn, so
    remembering the last one is enough for a fan-out to encode each format once.
    """

    __slots__ = ("_envelope", "_envelope_of", "_raw", "_raw_of")

    def __init__(self) -> None:
        self._raw_of: Message | None = None
        self._raw = b""
        self._envelope_of: Message | None = None
        self._envelope = b""

    def raw(self, message: Message) -> bytes:
        if message is not self._raw_of:
            self._raw = encode_frame(message.payload, is_text(message))
            self._raw_of = message
        return self._raw

    def envelope(self, message: Message) -> bytes:
        if message is not self._envelope_of:
            self._envelope = encode_frame(envelope_json(message), True)
            self._envelope_of = message
        return self._envelope
