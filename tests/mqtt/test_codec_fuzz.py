"""Fuzzing the MQTT codec with hypothesis: random bytes, mutated valid streams and random chunk
boundaries must only ever produce packets or MQTTProtocolError, and every packet the decoder
accepts must encode back to something that decodes to the same packet."""

from __future__ import annotations

import itertools
import os
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from adapters.mqtt.codec import (
    EMPTY_PROPERTIES,
    Auth,
    ConnAck,
    Connect,
    Decoder,
    Disconnect,
    MQTTProtocolError,
    Packet,
    PingReq,
    PingResp,
    Properties,
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
    encode,
)

# Bounded so the whole file runs in well under 20 s; no example database is written.
# MQTT_FUZZ_SCALE=50 multiplies the examples for a long run outside CI.
_SCALE = int(os.environ.get("MQTT_FUZZ_SCALE", "1"))
_BASE = settings(
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
CHEAP = settings(_BASE, max_examples=800 * _SCALE)  # raw bytes
STRUCTURED = settings(_BASE, max_examples=500 * _SCALE)  # generated packets
SLOW = settings(_BASE, max_examples=250 * _SCALE)

# ---------------------------------------------------------------------------------------------
# Strategies for valid packets

# MQTT strings: any Unicode scalar value (no surrogates: codec="utf-8") except U+0000.
text = st.text(st.characters(codec="utf-8", min_codepoint=1), max_size=12)
topic_name = st.text(
    st.characters(codec="utf-8", min_codepoint=1, exclude_characters="+#"), min_size=1, max_size=16
)
topic_filter = st.text(st.characters(codec="utf-8", min_codepoint=1), min_size=1, max_size=16)
data = st.binary(max_size=24)
u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)
flag = st.integers(0, 1)
packet_id = st.integers(1, 0xFFFF)

PROPERTY_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "payload_format_indicator": flag,
    "message_expiry_interval": u32,
    "content_type": text,
    "response_topic": topic_name,
    "correlation_data": data,
    "subscription_identifiers": st.lists(st.integers(1, 268_435_455), min_size=1, max_size=3).map(
        tuple
    ),
    "session_expiry_interval": u32,
    "assigned_client_identifier": text,
    "server_keep_alive": u16,
    "authentication_method": text,
    "authentication_data": data,
    "request_problem_information": flag,
    "will_delay_interval": u32,
    "request_response_information": flag,
    "response_information": text,
    "server_reference": text,
    "reason_string": text,
    "receive_maximum": st.integers(1, 0xFFFF),
    "topic_alias_maximum": u16,
    "topic_alias": st.integers(1, 0xFFFF),
    "maximum_qos": flag,
    "retain_available": flag,
    "user_properties": st.lists(st.tuples(text, text), min_size=1, max_size=3).map(tuple),
    "maximum_packet_size": st.integers(1, 0xFFFFFFFF),
    "wildcard_subscription_available": flag,
    "subscription_identifier_available": flag,
    "shared_subscription_available": flag,
}
# Written out from the MQTT 5 property table, independently of the codec's own sets.
ALLOWED = {
    "CONNECT": "session_expiry_interval authentication_method authentication_data "
    "request_problem_information request_response_information receive_maximum "
    "topic_alias_maximum user_properties maximum_packet_size",
    "CONNACK": "session_expiry_interval assigned_client_identifier server_keep_alive "
    "authentication_method authentication_data response_information server_reference "
    "reason_string receive_maximum topic_alias_maximum maximum_qos retain_available "
    "user_properties maximum_packet_size wildcard_subscription_available "
    "subscription_identifier_available shared_subscription_available",
    "PUBLISH": "payload_format_indicator message_expiry_interval content_type response_topic "
    "correlation_data subscription_identifiers topic_alias user_properties",
    "WILL": "payload_format_indicator message_expiry_interval content_type response_topic "
    "correlation_data will_delay_interval user_properties",
    "ACK": "reason_string user_properties",
    "SUBSCRIBE": "user_properties",
    "UNSUBSCRIBE": "user_properties",
    "DISCONNECT": "session_expiry_interval server_reference reason_string user_properties",
    "AUTH": "authentication_method authentication_data reason_string user_properties",
}


def _build_properties(values: dict[str, Any]) -> Properties:
    if "authentication_data" in values and "authentication_method" not in values:
        values["authentication_method"] = "m"
    return Properties(**values) if values else EMPTY_PROPERTIES


def properties(level: int, kind: str) -> st.SearchStrategy[Properties]:
    if level == 4:
        return st.just(EMPTY_PROPERTIES)
    optional = {name: PROPERTY_VALUES[name] for name in ALLOWED[kind].split()}
    if kind == "SUBSCRIBE":
        optional["subscription_identifiers"] = st.integers(1, 268_435_455).map(lambda v: (v,))
    return st.fixed_dictionaries({}, optional=optional).map(_build_properties)


def wills(level: int) -> st.SearchStrategy[Will]:
    return st.builds(
        Will, topic_name, data, st.integers(0, 2), st.booleans(), properties(level, "WILL")
    )


def connects(level: int) -> st.SearchStrategy[Connect]:
    def build(args: tuple[Any, ...]) -> Connect:
        clean, keep_alive, client_id, username, password, will, props = args
        if level == 4 and username is None:
            password = None
        return Connect(level, clean, keep_alive, client_id, username, password, will, props)

    return st.tuples(
        st.booleans(),
        u16,
        text,
        st.none() | text,
        st.none() | data,
        st.none() | wills(level),
        properties(level, "CONNECT"),
    ).map(build)


def connacks(level: int) -> st.SearchStrategy[ConnAck]:
    codes = st.integers(0, 5) if level == 4 else st.sampled_from([0, 0x80, 0x86, 0x87, 0x9F])
    return st.builds(
        lambda present, code, props: ConnAck(present and code == 0, code, props),
        st.booleans(),
        codes,
        properties(level, "CONNACK"),
    )


def publishes(level: int) -> st.SearchStrategy[Publish]:
    def build(args: tuple[Any, ...]) -> Publish:
        topic, payload, qos, retain, dup, pid, props = args
        if not topic and props.topic_alias is None:
            topic = "t"
        return Publish(topic, payload, qos, retain, dup and qos > 0, pid if qos else 0, props)

    topics = topic_name | st.just("") if level == 5 else topic_name
    return st.tuples(
        topics,
        st.binary(max_size=300),
        st.integers(0, 2),
        st.booleans(),
        st.booleans(),
        packet_id,
        properties(level, "PUBLISH"),
    ).map(build)


def acks(level: int) -> st.SearchStrategy[Packet]:
    def one(cls: type[Any], codes: list[int]) -> st.SearchStrategy[Packet]:
        if level == 4:
            return st.builds(cls, packet_id)
        return st.builds(cls, packet_id, st.sampled_from(codes), properties(level, "ACK"))

    return st.one_of(
        one(PubAck, [0, 0x10, 0x80, 0x87, 0x99]),
        one(PubRec, [0, 0x10, 0x83, 0x91, 0x97]),
        one(PubRel, [0, 0x92]),
        one(PubComp, [0, 0x92]),
    )


def subscriptions(level: int) -> st.SearchStrategy[Subscription]:
    if level == 4:
        return st.builds(Subscription, topic_filter, st.integers(0, 2))
    return st.builds(
        lambda f, q, nl, rap, rh: Subscription(f, q, nl and not f.startswith("$share/"), rap, rh),
        topic_filter,
        st.integers(0, 2),
        st.booleans(),
        st.booleans(),
        st.integers(0, 2),
    )


def packets(level: int) -> st.SearchStrategy[Packet]:
    codes5 = [0, 1, 2, 0x80, 0x83, 0x87, 0x8F, 0x91, 0x97, 0x9E, 0xA1, 0xA2]
    suback_codes = st.sampled_from([0, 1, 2, 0x80] if level == 4 else codes5)
    strategies: list[st.SearchStrategy[Packet]] = [
        connects(level),
        connacks(level),
        publishes(level),
        acks(level),
        st.builds(
            Subscribe,
            packet_id,
            st.lists(subscriptions(level), min_size=1, max_size=3),
            properties(level, "SUBSCRIBE"),
        ),
        st.builds(
            SubAck,
            packet_id,
            st.lists(suback_codes, min_size=1, max_size=4),
            properties(level, "ACK"),
        ),
        st.builds(
            Unsubscribe,
            packet_id,
            st.lists(topic_filter, min_size=1, max_size=3),
            properties(level, "UNSUBSCRIBE"),
        ),
        st.just(PingReq()),
        st.just(PingResp()),
    ]
    if level == 4:
        strategies += [st.builds(UnsubAck, packet_id), st.just(Disconnect())]
    else:
        strategies += [
            st.builds(
                UnsubAck,
                packet_id,
                st.lists(st.sampled_from([0, 0x11, 0x80, 0x87]), min_size=1, max_size=3),
                properties(level, "ACK"),
            ),
            st.builds(
                Disconnect,
                st.sampled_from([0, 4, 0x80, 0x8B, 0x9C]),
                properties(level, "DISCONNECT"),
            ),
            st.builds(Auth, st.sampled_from([0, 0x18, 0x19]), properties(level, "AUTH")),
        ]
    return st.one_of(strategies)


# Built once: strategies built inside a flatmap would be rebuilt for every example.
PACKETS = {4: packets(4), 5: packets(5)}
levels = st.sampled_from([4, 5])
level_and_packet = st.one_of([st.tuples(st.just(lv), PACKETS[lv]) for lv in (4, 5)])
level_and_packets = st.one_of(
    [st.tuples(st.just(lv), st.lists(PACKETS[lv], min_size=1, max_size=6)) for lv in (4, 5)]
)

# ---------------------------------------------------------------------------------------------
# Helpers


def drain(decoder: Decoder, chunks: list[bytes]) -> list[Packet]:
    """Feed the chunks, collect packets; stop at the first MQTTProtocolError."""
    out: list[Packet] = []
    try:
        for chunk in chunks:
            decoder.feed(chunk)
            out.extend(decoder)
    except MQTTProtocolError as exc:
        assert 0x80 <= exc.reason_code <= 0xA2
        assert exc.message
        with pytest.raises(MQTTProtocolError):
            decoder.next_packet()  # stays failed
    return out


def split(stream: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(stream) + 1) for c in cuts} | {0, len(stream)})
    return [stream[a:b] for a, b in itertools.pairwise(points)]


def assert_reencodes(packet: Packet, level: int) -> None:
    """What the decoder accepts, the encoder can write back, and it decodes the same."""
    data = encode(packet, level)
    decoder = Decoder(protocol_level=level)
    decoder.feed(data)
    assert list(decoder) == [packet]


# ---------------------------------------------------------------------------------------------
# Properties


@STRUCTURED
@given(level_and_packet)
def test_round_trip(case: tuple[int, Packet]) -> None:
    level, packet = case
    assert_reencodes(packet, level)


@SLOW
@given(level_and_packets, st.lists(st.integers(0, 1 << 16), max_size=8))
def test_any_chunking_gives_the_same_packets(
    case: tuple[int, list[Packet]], cuts: list[int]
) -> None:
    level, sent = case
    stream = b"".join(encode(p, level) for p in sent)
    decoder = Decoder(protocol_level=level)
    got: list[Packet] = []
    for chunk in split(stream, cuts):
        decoder.feed(chunk)
        got.extend(decoder)
    assert got == sent
    assert decoder.buffered == 0


@CHEAP
@given(
    st.binary(max_size=400),
    st.sampled_from([None, 4, 5]),
    st.lists(st.integers(0, 400), max_size=6),
    st.sampled_from([16, 64, 268_435_460]),
)
# Edge cases pinned as explicit examples: a 4-byte remaining length with a continuation bit,
# an empty CONNECT, a CONNACK without body, an empty topic whose property length is missing.
@example(b"\x30\xff\xff\xff\xff", 4, [], 268_435_460)
@example(b"\x10\x00", None, [], 268_435_460)
@example(b"\x20\x00", 5, [], 268_435_460)
@example(b"\x30\x03\x00\x00\x01", 5, [], 268_435_460)
def test_random_bytes(raw: bytes, level: int | None, cuts: list[int], limit: int) -> None:
    decoder = Decoder(protocol_level=level, max_packet_size=limit)
    for packet in drain(decoder, split(raw, cuts)):
        assert_reencodes(packet, decoder.protocol_level or 4)


first_bytes = st.sampled_from(
    [
        0x10, 0x20, 0x30, 0x31, 0x32, 0x33, 0x34, 0x35, 0x3A, 0x3B, 0x3C, 0x3D, 0x40, 0x50,
        0x62, 0x70, 0x82, 0x90, 0xA2, 0xB0, 0xC0, 0xD0, 0xE0, 0xF0,
    ]
)  # fmt: skip


@CHEAP
@given(levels, st.lists(st.tuples(first_bytes, st.binary(max_size=60)), min_size=1, max_size=5))
def test_well_framed_random_bodies(level: int, frames: list[tuple[int, bytes]]) -> None:
    """Valid fixed headers around random bodies, to reach every packet type's body decoder."""
    stream = b"".join(bytes([first, len(body)]) + body for first, body in frames)
    decoder = Decoder(protocol_level=level)
    for packet in drain(decoder, [stream]):
        assert_reencodes(packet, level)


mutation = st.tuples(
    st.sampled_from(["flip", "set", "insert", "delete", "truncate", "duplicate"]),
    st.integers(0, 1 << 16),
    st.integers(0, 255),
)


def mutate(stream: bytes, mutations: list[tuple[str, int, int]]) -> bytes:
    buf = bytearray(stream)
    for kind, where, value in mutations:
        i = where % (len(buf) + 1)
        if kind == "insert":
            buf[i:i] = bytes([value])
        elif kind == "duplicate":
            buf[i:i] = buf[i : i + value % 8]
        elif kind == "truncate":
            del buf[i:]
        elif i < len(buf):
            if kind == "flip":
                buf[i] ^= 1 << (value % 8)
            elif kind == "set":
                buf[i] = value
            else:
                del buf[i]
    return bytes(buf)


@STRUCTURED
@given(
    level_and_packets,
    st.lists(mutation, min_size=1, max_size=4),
    st.lists(st.integers(0, 1 << 16), max_size=4),
)
def test_mutated_valid_streams(
    case: tuple[int, list[Packet]], mutations: list[tuple[str, int, int]], cuts: list[int]
) -> None:
    level, sent = case
    stream = mutate(b"".join(encode(p, level) for p in sent), mutations)
    decoder = Decoder(protocol_level=level, max_packet_size=4096)
    for packet in drain(decoder, split(stream, cuts)):
        assert_reencodes(packet, level)


@SLOW
@given(level_and_packets, st.lists(mutation, min_size=1, max_size=3))
def test_mutated_stream_with_connect_first(
    case: tuple[int, list[Packet]], mutations: list[tuple[str, int, int]]
) -> None:
    """A server-side decoder (level unknown) fed a mutated CONNECT followed by traffic."""
    level, sent = case
    connect = Connect(level, True, 60, "dev", "user", b"pw", Will("w", b"x", 1, True))
    stream = mutate(b"".join(encode(p, level) for p in [connect, *sent]), mutations)
    decoder = Decoder()
    for packet in drain(decoder, [stream]):
        assert decoder.protocol_level in (4, 5)
        assert_reencodes(packet, decoder.protocol_level)
