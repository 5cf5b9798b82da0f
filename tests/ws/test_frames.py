"""Outgoing frames are encoded once per message, byte for byte what websockets would send."""

from __future__ import annotations

import orjson
import pytest
from websockets.frames import Frame, Opcode

from adapters.ws.adapter import close_reason
from adapters.ws.frames import FrameCache, encode_frame
from core.message import Message, envelope


@pytest.mark.parametrize("size", [0, 1, 125, 126, 65535, 65536, 300_000])
@pytest.mark.parametrize("text", [True, False])
def test_frame_matches_websockets(size: int, text: bool) -> None:
    payload = b"a" * size
    expected = Frame(Opcode.TEXT if text else Opcode.BINARY, payload).serialize(mask=False)
    assert encode_frame(payload, text) == expected


def message(payload: bytes, ct: str) -> Message:
    return Message("acme", "temps", "r1", "c1", "http", ct, payload, 1)


def test_cache_encodes_each_message_once() -> None:
    cache = FrameCache()
    first = message(b'{"v": 1}', "application/json")
    raw = cache.raw(first)
    assert cache.raw(first) is raw  # the next subscriber gets the same bytes object
    assert raw == encode_frame(b'{"v": 1}', True)
    env = cache.envelope(first)
    assert cache.envelope(first) is env
    assert env == encode_frame(orjson.dumps(envelope(first)), True)
    second = message(b'{"v": 1}', "application/json")  # equal, but another message
    assert cache.raw(second) is not raw


@pytest.mark.parametrize(
    ("payload", "ct", "text"),
    [
        (b"[]", "application/senml+json", True),
        (b"21.5", "text/plain", True),
        (b"\xa1\x00", "application/senml+cbor", False),
        (b"abc", "application/octet-stream", False),
        (b"\xff", "application/json", False),
    ],
)
def test_raw_frame_kind(payload: bytes, ct: str, text: bool) -> None:
    assert FrameCache().raw(message(payload, ct)) == encode_frame(payload, text)


def test_close_reason_fits_a_close_frame() -> None:
    assert close_reason("short") == "short"
    cut = close_reason("\u00e9" * 100)
    assert len(cut.encode()) <= 123 and cut == "\u00e9" * 60 + "..."
