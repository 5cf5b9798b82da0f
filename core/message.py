"""The message envelope: one type, built once by the adapter that received the message.

It crosses the bus in one compact binary encoding (MessagePack, fields as an array) and is never
re-encoded on the way: ``payload`` stays the bytes the publisher sent.
"""

from __future__ import annotations

import base64
import time

import msgspec

from core.content import SENML_JSON

PROTOCOLS = ("http", "ws", "mqtt", "coap")


class Message(msgspec.Struct, array_like=True, gc=False, frozen=True):
    """One published message.

    ``metadata`` is a small string map carried end to end where the receiving protocol can express
    it (MQTT 5 user properties, response topic, correlation data). ``created`` is the receive time
    in nanoseconds since the epoch.
    """

    domain: str
    channel: str
    subtopic: str
    publisher: str
    protocol: str
    content_type: str
    payload: bytes
    created: int
    metadata: dict[str, str] | None = None

    @property
    def topic(self) -> str:
        base = f"m/{self.domain}/c/{self.channel}"
        return f"{base}/{self.subtopic}" if self.subtopic else base


def now_ns() -> int:
    return time.time_ns()


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Message)


def encode(message: Message) -> bytes:
    """The bus encoding of a message."""
    return _encoder.encode(message)


def decode(data: bytes) -> Message:
    """Inverse of :func:`encode`; raises ``msgspec.DecodeError`` on foreign bytes."""
    return _decoder.decode(data)


def envelope(message: Message) -> dict[str, object]:
    """The message as a JSON-ready object (for msgspec's encoder), for subscribers that need to
    tell messages apart (SSE events, WebSocket ``?format=envelope``).

    ``encoding`` says what ``payload`` holds:

    - ``json``: a SenML JSON pack, embedded as the JSON it is. The gateway validated it when it
      was published (no message of that content type reaches a subscriber otherwise), so it is
      JSON; it travels as the publisher's bytes (``msgspec.Raw``), put on one line when they
      span several (an SSE ``data:`` line cannot hold a line break).
    - ``utf-8``: any other payload that is UTF-8, as text.
    - ``base64``: anything else.
    """
    payload: object
    if message.content_type == SENML_JSON:
        payload = msgspec.Raw(_one_line(message.payload))
        encoding = "json"
    else:
        try:
            payload = message.payload.decode()
            encoding = "utf-8"
        except UnicodeDecodeError:
            payload = base64.b64encode(message.payload).decode()
            encoding = "base64"
    out: dict[str, object] = {
        "topic": message.topic,
        "domain": message.domain,
        "channel": message.channel,
        "subtopic": message.subtopic,
        "publisher": message.publisher,
        "protocol": message.protocol,
        "content_type": message.content_type,
        "encoding": encoding,
        "created": message.created,
        "payload": payload,
    }
    if message.metadata:
        out["metadata"] = message.metadata
    return out


_json = msgspec.json.Encoder()
# JSON of the envelope fields that repeat from message to message of one topic and publisher,
# up to the "created" value. Bounded: cleared when full.
_heads: dict[tuple[str, str, str, str, str, str], bytes] = {}
_HEADS_MAX = 4096


def envelope_json(message: Message, before: bytes = b"", after: bytes = b"") -> bytes:
    """:func:`envelope` as JSON, the same bytes as encoding it, between ``before`` and
    ``after`` (a framing such as an SSE event's, added in the same step). On the fan-out path
    (SSE events, WebSocket envelopes), so the fields before ``created`` are encoded once per
    topic and publisher, and only ``created`` and the payload per message."""
    if not message.metadata:
        if message.content_type == SENML_JSON:
            payload = _one_line(message.payload)
        else:
            try:
                payload = _json.encode(message.payload.decode())
            except UnicodeDecodeError:
                return before + _json.encode(envelope(message)) + after
        key = (
            message.domain,
            message.channel,
            message.subtopic,
            message.publisher,
            message.protocol,
            message.content_type,
        )
        head = _heads.get(key)
        if head is None:
            if len(_heads) >= _HEADS_MAX:
                _heads.clear()
            whole = _json.encode(envelope(message))
            head = _heads[key] = whole[: whole.index(b',"created":') + 11]
        return b'%b%b%d,"payload":%b}%b' % (before, head, message.created, payload, after)
    return before + _json.encode(envelope(message)) + after


def _one_line(json: bytes) -> bytes:
    """JSON text without line breaks: as it is when it has none (the usual case: no copy), else
    with the whitespace between tokens removed (a line break inside a JSON string is escaped)."""
    if 10 in json or 13 in json:  # b"\n", b"\r"
        return msgspec.json.format(json, indent=0)
    return json
