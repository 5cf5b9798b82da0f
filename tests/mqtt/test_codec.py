"""The MQTT codec against hand-written bytes: spec examples, every refusal with its exact reason
code, round trips of every packet type at both levels, streaming and the packet size limit."""

from __future__ import annotations

import pytest

from adapters.mqtt.codec import (
    EMPTY_PROPERTIES,
    MAX_PACKET_SIZE,
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
    check_payload_format,
    encode,
    encode_publish,
    prepare_publish,
)

MALFORMED = 0x81
PROTOCOL = 0x82
UNSUPPORTED = 0x84
TOPIC_INVALID = 0x90
TOO_LARGE = 0x95


def varint(n: int) -> bytes:
    """Independent of the codec: the spec's encoding algorithm (MQTT 5 section 1.5.5)."""
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def pkt(first: int, body: bytes) -> bytes:
    return bytes([first]) + varint(len(body)) + body


def s(text: str) -> bytes:
    data = text.encode()
    return len(data).to_bytes(2, "big") + data


def decode_all(data: bytes, level: int | None) -> list[Packet]:
    decoder = Decoder(protocol_level=level)
    decoder.feed(data)
    return list(decoder)


def decode_one(data: bytes, level: int | None) -> Packet:
    packets = decode_all(data, level)
    assert len(packets) == 1, packets
    return packets[0]


def refusal(data: bytes, level: int | None) -> MQTTProtocolError:
    decoder = Decoder(protocol_level=level)
    decoder.feed(data)
    with pytest.raises(MQTTProtocolError) as info:
        list(decoder)
    return info.value


# --------------------------------------------------------------------------------------------
# Spec examples, byte for byte

# MQTT 3.1.1 section 3.1.2.10 example variable header (flags 0xCE: user name, password, will
# QoS 1, will flag, clean session; keep alive 10), with a payload written out by hand.
CONNECT_311 = bytes.fromhex(
    "10 1c"
    "0004 4d515454 04 ce 000a"
    "0002 6331"  # client id "c1"
    "0001 77"  # will topic "w"
    "0003 627965"  # will message "bye"
    "0001 75"  # user name "u"
    "0001 70"  # password "p"
)
# MQTT 5.0 section 3.1.2.12 example: the same flags, properties length 5 with Session Expiry
# Interval (0x11) = 10.
CONNECT_50 = bytes.fromhex(
    "10 23"
    "0004 4d515454 05 ce 000a 05 11 0000000a"
    "0002 6331"
    "00"  # will properties: none
    "0001 77"
    "0003 627965"
    "0001 75"
    "0001 70"
)


def test_connect_311_spec_example() -> None:
    packet = decode_one(CONNECT_311, None)
    assert packet == Connect(
        protocol_level=4,
        clean_start=True,
        keep_alive=10,
        client_id="c1",
        username="u",
        password=b"p",
        will=Will("w", b"bye", qos=1, retain=False),
    )
    assert encode(packet, 4) == CONNECT_311


def test_connect_50_spec_example() -> None:
    packet = decode_one(CONNECT_50, None)
    assert isinstance(packet, Connect)
    assert packet.protocol_level == 5
    assert packet.properties == Properties(session_expiry_interval=10)
    assert packet.will == Will("w", b"bye", 1, False, EMPTY_PROPERTIES)
    assert (packet.username, packet.password, packet.keep_alive) == ("u", b"p", 10)
    assert encode(packet, 5) == CONNECT_50


def test_decoder_takes_level_from_connect() -> None:
    decoder = Decoder()
    decoder.feed(CONNECT_50 + bytes.fromhex("30 06 0003 612f62 00"))
    packets = list(decoder)
    assert decoder.protocol_level == 5
    assert packets[1] == Publish("a/b", b"")


@pytest.mark.parametrize(
    ("data", "level", "packet"),
    [
        (b"\xc0\x00", 4, PingReq()),
        (b"\xd0\x00", 4, PingResp()),
        (b"\xe0\x00", 4, Disconnect()),
        (b"\xe0\x00", 5, Disconnect()),
        (b"\xf0\x00", 5, Auth()),
        (bytes.fromhex("20 02 00 00"), 4, ConnAck(False, 0)),
        (bytes.fromhex("20 02 01 00"), 4, ConnAck(True, 0)),
        (bytes.fromhex("20 02 00 05"), 4, ConnAck(False, 5)),
        (bytes.fromhex("20 03 00 00 00"), 5, ConnAck(False, 0)),
        # 3.1.1 section 3.3.2.3: topic "a/b", packet identifier 10.
        (bytes.fromhex("32 09 0003 612f62 000a 6869"), 4, Publish("a/b", b"hi", 1, packet_id=10)),
        (bytes.fromhex("30 05 0003 612f62"), 4, Publish("a/b", b"")),
        (bytes.fromhex("3d 07 0003 612f62 0001"), 4, Publish("a/b", b"", 2, True, True, 1)),
        # 3.1.1 section 1.5.3: "A" followed by U+2A6D4 is 00 05 41 F0 AA 9B 94.
        (bytes.fromhex("30 07 0005 41f0aa9b94"), 4, Publish("A\U0002a6d4", b"")),
        (bytes.fromhex("40 02 000a"), 4, PubAck(10)),
        (bytes.fromhex("50 02 000a"), 4, PubRec(10)),
        (bytes.fromhex("62 02 000a"), 4, PubRel(10)),
        (bytes.fromhex("70 02 000a"), 4, PubComp(10)),
        (bytes.fromhex("40 03 000a 10"), 5, PubAck(10, 0x10)),
        (bytes.fromhex("62 03 000a 92"), 5, PubRel(10, 0x92)),
        # 3.1.1 section 3.8.3: "a/b" QoS 1, "c/d" QoS 2.
        (
            bytes.fromhex("82 0e 000a 0003 612f62 01 0003 632f64 02"),
            4,
            Subscribe(10, [Subscription("a/b", 1), Subscription("c/d", 2)]),
        ),
        # 3.1.1 section 3.9.3: granted QoS 0, granted QoS 2, failure.
        (bytes.fromhex("90 05 000a 00 02 80"), 4, SubAck(10, [0, 2, 0x80])),
        # 3.1.1 section 3.10.3: "a/b", "c/d".
        (
            bytes.fromhex("a2 0c 000a 0003 612f62 0003 632f64"),
            4,
            Unsubscribe(10, ["a/b", "c/d"]),
        ),
        (bytes.fromhex("b0 02 000a"), 4, UnsubAck(10)),
        (bytes.fromhex("b0 05 000a 00 00 11"), 5, UnsubAck(10, [0, 0x11])),
        (bytes.fromhex("e0 01 8b"), 5, Disconnect(0x8B)),
        (
            bytes.fromhex("82 09 000a 00 0003 612f62 2e"),
            5,
            Subscribe(10, [Subscription("a/b", 2, True, True, 2)]),
        ),
    ],
)
def test_hand_written_packets(data: bytes, level: int, packet: Packet) -> None:
    assert decode_one(data, level) == packet
    assert encode(packet, level) == data


@pytest.mark.parametrize(
    ("length", "encoded"),
    [
        (0, "00"),
        (127, "7f"),
        (128, "8001"),
        (16_383, "ff7f"),
        (16_384, "808001"),
        (2_097_151, "ffff7f"),
        (2_097_152, "80808001"),
    ],
)
def test_remaining_length_encoding(length: int, encoded: str) -> None:
    # MQTT 3.1.1 table 2.4: a PUBLISH of exactly `length` remaining bytes.
    if length < 2:
        data = bytes.fromhex("e0" + encoded)
        assert encode(Disconnect(), 4) == data
        return
    payload = b"x" * (length - 3)
    data = encode_publish("t", payload)
    assert data[1 : 1 + len(encoded) // 2] == bytes.fromhex(encoded)
    assert len(data) == 1 + len(encoded) // 2 + length
    assert decode_one(data, 4) == Publish("t", payload)


def test_largest_remaining_length_is_accepted_and_waited_for() -> None:
    decoder = Decoder(protocol_level=4)
    decoder.feed(bytes.fromhex("30 ffffff7f 0001 74"))
    assert decoder.next_packet() is None
    assert decoder.buffered == 8


# --------------------------------------------------------------------------------------------
# Round trips

PROPS_PUBLISH = Properties(
    payload_format_indicator=1,
    message_expiry_interval=3600,
    content_type="application/senml+json",
    response_topic="m/d/c/ch/reply",
    correlation_data=b"\x00\x01",
    subscription_identifiers=(1, 268_435_455),
    topic_alias=3,
    user_properties=(("k", "v1"), ("k", "v2"), ("", "")),
)
PROPS_CONNECT = Properties(
    session_expiry_interval=0xFFFFFFFF,
    authentication_method="SCRAM-SHA-1",
    authentication_data=b"client-first",
    request_problem_information=0,
    request_response_information=1,
    receive_maximum=20,
    topic_alias_maximum=10,
    user_properties=(("a", "b"),),
    maximum_packet_size=1 << 20,
)
PROPS_CONNACK = Properties(
    session_expiry_interval=60,
    assigned_client_identifier="auto-1",
    server_keep_alive=30,
    authentication_method="SCRAM-SHA-1",
    authentication_data=b"server-final",
    response_information="resp/",
    server_reference="other:1883",
    reason_string="ok",
    receive_maximum=65535,
    topic_alias_maximum=0,
    maximum_qos=1,
    retain_available=0,
    user_properties=(("x", "y"),),
    maximum_packet_size=268_435_460,
    wildcard_subscription_available=1,
    subscription_identifier_available=1,
    shared_subscription_available=0,
)
PROPS_WILL = Properties(
    payload_format_indicator=0,
    message_expiry_interval=1,
    content_type="text/plain",
    response_topic="r",
    correlation_data=b"",
    will_delay_interval=5,
    user_properties=(("w", "1"),),
)
PROPS_ACK = Properties(reason_string="why", user_properties=(("a", "1"), ("a", "2")))

ROUND_TRIP_BOTH = [
    ConnAck(True, 0),
    Publish("m/dom/c/chan/temp", b"{}", 0, True),
    Publish("m/dom/c/chan/temp", b"\xff" * 300, 1, False, True, 65535),
    Publish("m/d/c/c/\u00e9\u4e2d", b"x" * 20_000, 2, False, False, 1),
    PubAck(1),
    PubRec(2),
    PubRel(3),
    PubComp(65535),
    Subscribe(7, [Subscription("m/d/c/ch/+", 1), Subscription("#", 2), Subscription("a", 0)]),
    SubAck(7, [1, 2, 0x80]),
    Unsubscribe(8, ["m/d/c/ch/+", "#"]),
    PingReq(),
    PingResp(),
    Disconnect(),
]
ROUND_TRIP_V4_ONLY = [
    Connect(4, True, 60, "client-1"),
    Connect(4, False, 0, "", "user", b"secret", Will("last/will", b"\x00gone", 2, True)),
    ConnAck(False, 4),
    UnsubAck(8),
]
ROUND_TRIP_V5_ONLY = [
    Connect(5, True, 60, "client-1"),
    Connect(5, False, 0, "", "user", b"secret", Will("last/will", b"\x00gone", 2, True)),
    Connect(5, True, 10, "c", None, b"token-only", None, PROPS_CONNECT),
    Connect(5, False, 65535, "c", "u", None, Will("w", b"p", 1, False, PROPS_WILL), PROPS_CONNECT),
    ConnAck(False, 0x86, Properties(reason_string="bad credentials")),
    ConnAck(True, 0, PROPS_CONNACK),
    Publish("m/d/c/ch", b"{}", 1, False, False, 9, PROPS_PUBLISH),
    Publish("", b"aliased", 0, False, False, 0, Properties(topic_alias=1)),
    PubAck(1, 0x87, PROPS_ACK),
    PubAck(1, 0x10),
    PubRec(2, 0x80, PROPS_ACK),
    PubRel(3, 0x92, PROPS_ACK),
    PubComp(4, 0, PROPS_ACK),
    Subscribe(
        9,
        [Subscription("$share/g/a/+", 1, False, True, 1), Subscription("b", 0, True, False, 2)],
        Properties(subscription_identifiers=(77,), user_properties=(("s", "t"),)),
    ),
    SubAck(9, [0, 1, 2, 0x80, 0x83, 0x87, 0x8F, 0x91, 0x97, 0x9E, 0xA1, 0xA2], PROPS_ACK),
    Unsubscribe(10, ["a"], Properties(user_properties=(("u", "v"),))),
    UnsubAck(10, [0, 0x11, 0x80], PROPS_ACK),
    Disconnect(0x8B, Properties(reason_string="shutting down", server_reference="b:1883")),
    Disconnect(0x04, Properties(session_expiry_interval=0)),
    Auth(0x18, Properties(authentication_method="SCRAM-SHA-1", authentication_data=b"x")),
    Auth(0x19, Properties(authentication_method="m", reason_string="again")),
    SubAck(11, [0x97] * 300),
    Unsubscribe(12, [f"m/d/c/ch/{i}" for i in range(50)]),
]


@pytest.mark.parametrize(
    ("packet", "level"),
    [(p, 4) for p in ROUND_TRIP_BOTH + ROUND_TRIP_V4_ONLY]
    + [(p, 5) for p in ROUND_TRIP_BOTH + ROUND_TRIP_V5_ONLY],
    ids=lambda v: type(v).__name__ if not isinstance(v, int) else f"v{v}",
)
def test_round_trip(packet: Packet, level: int) -> None:
    data = encode(packet, level)
    assert decode_one(data, level) == packet
    assert encode(decode_one(data, level), level) == data


def test_level_4_drops_what_311_cannot_express() -> None:
    publish = Publish("a", b"p", 1, packet_id=5, properties=PROPS_PUBLISH)
    assert encode(publish, 4) == encode(Publish("a", b"p", 1, packet_id=5), 4)
    assert encode(PubAck(5, 0x87, PROPS_ACK), 4) == bytes.fromhex("40 02 0005")
    assert encode(SubAck(5, [0, 0x87, 0x97]), 4) == bytes.fromhex("90 05 0005 00 80 80")
    assert encode(UnsubAck(5, [0x11]), 4) == bytes.fromhex("b0 02 0005")
    assert encode(Disconnect(0x8B), 4) == b"\xe0\x00"


def test_properties_field_order_matches_the_property_table() -> None:
    from adapters.mqtt.codec.properties import PROPERTY_TABLE as _PROPERTY_TABLE

    assert Properties.__struct_fields__ == tuple(name for _, name, _ in _PROPERTY_TABLE)
    ids = [pid for pid, _, _ in _PROPERTY_TABLE]
    assert ids == sorted(ids)
    assert len(ids) == 27


def test_publish_without_properties_shares_the_empty_properties() -> None:
    packet = decode_one(bytes.fromhex("30 06 0003 612f62 00"), 5)
    assert isinstance(packet, Publish)
    assert packet.properties is EMPTY_PROPERTIES


def test_user_properties_keep_order_and_repeats() -> None:
    props = bytes.fromhex("26 0001 6b 0001 32 26 0001 6b 0001 31 26 0001 61 0000")
    data = pkt(0x30, s("a/b") + varint(len(props)) + props + b"pay")
    packet = decode_one(data, 5)
    assert isinstance(packet, Publish)
    assert packet.properties.user_properties == (("k", "2"), ("k", "1"), ("a", ""))
    assert packet.payload == b"pay"


def test_publish_repeats_subscription_identifiers() -> None:
    props = bytes.fromhex("0b 01 0b ffffff7f")
    packet = decode_one(pkt(0x30, s("a") + varint(len(props)) + props), 5)
    assert isinstance(packet, Publish)
    assert packet.properties.subscription_identifiers == (1, 268_435_455)


# --------------------------------------------------------------------------------------------
# Refusals, each with its exact reason code

WILD = s("a/+")
CONNECT_HEAD_4 = s("MQTT") + b"\x04"
CONNECT_HEAD_5 = s("MQTT") + b"\x05"


def connect5(props: bytes = b"\x00", payload: bytes = s("c"), flags: int = 0x02) -> bytes:
    return pkt(0x10, CONNECT_HEAD_5 + bytes([flags]) + b"\x00\x3c" + props + payload)


def connect4(payload: bytes = s("c"), flags: int = 0x02) -> bytes:
    return pkt(0x10, CONNECT_HEAD_4 + bytes([flags]) + b"\x00\x3c" + payload)


def publish5(props: bytes, topic: bytes = s("a/b"), first: int = 0x30) -> bytes:
    return pkt(first, topic + varint(len(props)) + props)


REFUSALS: list[tuple[str, int | None, bytes, int]] = [
    # fixed header
    ("reserved type 0", 4, b"\x00\x00", MALFORMED),
    ("type 15 at level 4", 4, b"\xf0\x00", MALFORMED),
    ("PUBREL flags 0", 4, bytes.fromhex("60 02 0001"), MALFORMED),
    ("PUBACK flags 2", 4, bytes.fromhex("42 02 0001"), MALFORMED),
    ("PUBREC flags 1", 5, bytes.fromhex("51 02 0001"), MALFORMED),
    ("PUBCOMP flags 2", 5, bytes.fromhex("72 02 0001"), MALFORMED),
    ("SUBSCRIBE flags 0", 4, pkt(0x80, b"\x00\x01" + s("a") + b"\x00"), MALFORMED),
    ("UNSUBSCRIBE flags 3", 4, pkt(0xA3, b"\x00\x01" + s("a")), MALFORMED),
    ("CONNECT flags 1", None, pkt(0x11, CONNECT_HEAD_4 + b"\x02\x00\x3c" + s("c")), MALFORMED),
    ("CONNACK flags 8", 4, bytes.fromhex("28 02 0000"), MALFORMED),
    ("SUBACK flags 2", 4, bytes.fromhex("92 03 0001 00"), MALFORMED),
    ("UNSUBACK flags 1", 4, bytes.fromhex("b1 02 0001"), MALFORMED),
    ("PINGREQ flags 1", 4, b"\xc1\x00", MALFORMED),
    ("PINGREQ with a body", 4, b"\xc0\x01\x00", MALFORMED),
    ("PINGRESP with a body", 4, b"\xd0\x01\x00", MALFORMED),
    ("DISCONNECT flags 2", 5, b"\xe2\x00", MALFORMED),
    ("AUTH flags 1", 5, b"\xf1\x00", MALFORMED),
    ("remaining length of 5 bytes", 4, bytes.fromhex("30 ffffffff01"), MALFORMED),
    ("remaining length with 4 continuation bytes", 4, bytes.fromhex("30 ffffffff"), MALFORMED),
    ("remaining length not minimal", 4, bytes.fromhex("c0 8000"), MALFORMED),
    # PUBLISH
    ("PUBLISH QoS 3", 4, bytes.fromhex("36 07 0003 612f62 0001"), MALFORMED),
    ("PUBLISH DUP with QoS 0", 4, bytes.fromhex("38 05 0003 612f62"), MALFORMED),
    ("PUBLISH DUP with QoS 0 v5", 5, bytes.fromhex("38 06 0003 612f62 00"), MALFORMED),
    ("PUBLISH remaining length 1", 4, bytes.fromhex("30 01 00"), MALFORMED),
    ("PUBLISH topic past the end", 4, bytes.fromhex("30 04 0005 6162"), MALFORMED),
    ("PUBLISH topic bad UTF-8", 4, bytes.fromhex("30 04 0002 c328"), MALFORMED),
    ("PUBLISH topic overlong NUL", 4, bytes.fromhex("30 04 0002 c080"), MALFORMED),
    ("PUBLISH topic surrogate", 4, bytes.fromhex("30 05 0003 eda080"), MALFORMED),
    ("PUBLISH topic U+0000", 4, bytes.fromhex("30 05 0003 610062"), MALFORMED),
    ("PUBLISH topic +", 4, pkt(0x30, WILD), TOPIC_INVALID),
    ("PUBLISH topic #", 5, publish5(b"", s("a/#")), TOPIC_INVALID),
    ("PUBLISH packet id 0", 4, bytes.fromhex("32 07 0003 612f62 0000"), PROTOCOL),
    ("PUBLISH packet id 0 QoS 2", 5, bytes.fromhex("34 08 0003 612f62 0000 00"), PROTOCOL),
    ("PUBLISH packet id missing", 4, bytes.fromhex("32 05 0003 612f62"), MALFORMED),
    ("PUBLISH empty topic v4", 4, bytes.fromhex("30 02 0000"), PROTOCOL),
    ("PUBLISH empty topic no alias", 5, bytes.fromhex("30 03 0000 00"), PROTOCOL),
    ("PUBLISH property length missing", 5, bytes.fromhex("30 05 0003 612f62"), MALFORMED),
    ("PUBLISH property length past end", 5, bytes.fromhex("30 06 0003 612f62 05"), MALFORMED),
    ("PUBLISH property length not minimal", 5, bytes.fromhex("30 07 0003 612f62 8000"), MALFORMED),
    # properties
    ("unknown property", 5, publish5(bytes.fromhex("05 00")), MALFORMED),
    ("property id 0x80", 5, publish5(bytes.fromhex("80 01")), MALFORMED),
    ("session expiry in PUBLISH", 5, publish5(bytes.fromhex("11 0000000a")), MALFORMED),
    ("will delay in PUBLISH", 5, publish5(bytes.fromhex("18 0000000a")), MALFORMED),
    ("reason string in PUBLISH", 5, publish5(b"\x1f" + s("x")), MALFORMED),
    ("duplicate content type", 5, publish5(b"\x03" + s("a") + b"\x03" + s("b")), PROTOCOL),
    ("duplicate topic alias", 5, publish5(bytes.fromhex("23 0001 23 0002")), PROTOCOL),
    ("duplicate expiry", 5, publish5(bytes.fromhex("02 00000001 02 00000001")), PROTOCOL),
    ("payload format indicator 2", 5, publish5(bytes.fromhex("01 02")), PROTOCOL),
    ("subscription identifier 0", 5, publish5(bytes.fromhex("0b 00")), PROTOCOL),
    ("subscription identifier not minimal", 5, publish5(bytes.fromhex("0b 8100")), MALFORMED),
    ("subscription identifier 5 bytes", 5, publish5(bytes.fromhex("0b ffffffff01")), MALFORMED),
    ("subscription identifier missing", 5, publish5(bytes.fromhex("0b")), MALFORMED),
    ("subscription identifier cut", 5, publish5(bytes.fromhex("0b 81")), MALFORMED),
    ("truncated two-byte property", 5, publish5(bytes.fromhex("23 00")), MALFORMED),
    ("truncated four-byte property", 5, publish5(bytes.fromhex("02 000000")), MALFORMED),
    ("truncated byte property", 5, publish5(bytes.fromhex("01")), MALFORMED),
    ("truncated string property", 5, publish5(bytes.fromhex("03 0005 6162")), MALFORMED),
    ("truncated binary property", 5, publish5(bytes.fromhex("09 0003 61")), MALFORMED),
    ("truncated user property", 5, publish5(b"\x26" + s("k")), MALFORMED),
    ("bad UTF-8 in user property", 5, publish5(b"\x26" + s("k") + b"\x00\x01\xff"), MALFORMED),
    ("U+0000 in content type", 5, publish5(b"\x03" + s("a\x00")), MALFORMED),
    ("response topic wildcard", 5, publish5(b"\x08" + s("r/#")), TOPIC_INVALID),
    ("response topic empty", 5, publish5(b"\x08" + s("")), TOPIC_INVALID),
    # CONNECT
    ("first packet not CONNECT", None, bytes.fromhex("30 05 0003 612f62"), PROTOCOL),
    ("first packet PINGREQ", None, b"\xc0\x00", PROTOCOL),
    ("protocol name MQTX", None, pkt(0x10, s("MQTX") + b"\x04\x02\x00\x3c" + s("c")), PROTOCOL),
    ("protocol name missing", None, pkt(0x10, b"\x00"), MALFORMED),
    ("protocol level missing", None, pkt(0x10, s("MQTT")), MALFORMED),
    ("reserved connect flag", None, connect4(flags=0x03), MALFORMED),
    ("will QoS 3", None, connect4(s("c") + s("w") + s("p"), flags=0x1E), MALFORMED),
    ("will QoS without will flag", None, connect4(flags=0x0A), MALFORMED),
    ("will retain without will flag", None, connect4(flags=0x22), MALFORMED),
    ("password without user name v4", None, connect4(s("c") + s("p"), flags=0x42), MALFORMED),
    ("client id bad UTF-8", None, connect4(b"\x00\x01\xfe"), MALFORMED),
    ("client id U+0000", None, connect4(s("\x00")), MALFORMED),
    ("client id missing", None, connect4(b""), MALFORMED),
    ("user name missing", None, connect4(s("c"), flags=0x82), MALFORMED),
    ("password missing", None, connect4(s("c") + s("u"), flags=0xC2), MALFORMED),
    ("will payload missing", None, connect4(s("c") + s("w"), flags=0x06), MALFORMED),
    ("CONNECT trailing bytes", None, connect4(s("c") + b"\x00"), MALFORMED),
    ("keep alive truncated", None, pkt(0x10, CONNECT_HEAD_4 + b"\x02\x00"), MALFORMED),
    ("will topic wildcard", None, connect4(s("c") + WILD + s("p"), flags=0x06), TOPIC_INVALID),
    ("will topic empty", None, connect4(s("c") + s("") + s("p"), flags=0x06), PROTOCOL),
    (
        "v5 will topic wildcard",
        None,
        connect5(payload=s("c") + b"\0" + WILD + s(""), flags=6),
        0x90,
    ),
    ("v5 auth data without method", None, connect5(b"\x04\x16" + s("x")), PROTOCOL),
    ("v5 topic alias in CONNECT", None, connect5(bytes.fromhex("03 23 0001")), MALFORMED),
    ("v5 receive maximum 0", None, connect5(bytes.fromhex("03 21 0000")), PROTOCOL),
    ("v5 maximum packet size 0", None, connect5(bytes.fromhex("05 27 00000000")), PROTOCOL),
    ("v5 request problem info 2", None, connect5(bytes.fromhex("02 17 02")), PROTOCOL),
    ("v5 request response info 5", None, connect5(bytes.fromhex("02 19 05")), PROTOCOL),
    (
        "v5 duplicate session expiry",
        None,
        connect5(bytes.fromhex("0a 11 00000001 11 00000002")),
        0x82,
    ),
    (
        "v5 session expiry in will properties",
        None,
        connect5(payload=s("c") + bytes.fromhex("05 11 00000001") + s("w") + s(""), flags=0x06),
        MALFORMED,
    ),
    ("v5 properties missing", None, pkt(0x10, CONNECT_HEAD_5 + b"\x02\x00\x3c"), MALFORMED),
    # acknowledgements
    ("PUBACK packet id 0", 4, bytes.fromhex("40 02 0000"), PROTOCOL),
    ("PUBREL packet id 0", 5, bytes.fromhex("62 02 0000"), PROTOCOL),
    ("PUBACK remaining length 1", 4, bytes.fromhex("40 01 00"), MALFORMED),
    ("PUBACK remaining length 3 v4", 4, bytes.fromhex("40 03 0001 00"), MALFORMED),
    ("PUBCOMP remaining length 4 v4", 4, bytes.fromhex("70 04 0001 0000"), MALFORMED),
    ("PUBACK undefined reason code", 5, bytes.fromhex("40 03 0001 05"), PROTOCOL),
    ("PUBREL reason 0x10", 5, bytes.fromhex("62 03 0001 10"), PROTOCOL),
    ("PUBCOMP reason 0x80", 5, bytes.fromhex("70 03 0001 80"), PROTOCOL),
    ("PUBACK trailing bytes", 5, bytes.fromhex("40 06 0001 00 00 ffff"), MALFORMED),
    ("PUBACK topic alias property", 5, bytes.fromhex("40 07 0001 00 03 230001"), MALFORMED),
    ("CONNACK return code 6 v4", 4, bytes.fromhex("20 02 00 06"), PROTOCOL),
    ("CONNACK reason 0x01 v5", 5, bytes.fromhex("20 03 00 01 00"), PROTOCOL),
    ("CONNACK session present refused", 4, bytes.fromhex("20 02 01 05"), PROTOCOL),
    ("CONNACK remaining length 1", 4, bytes.fromhex("20 01 00"), MALFORMED),
    ("CONNACK reserved ack flags", 4, bytes.fromhex("20 02 02 00"), MALFORMED),
    ("CONNACK remaining length 3 v4", 4, bytes.fromhex("20 03 00 00 00"), MALFORMED),
    ("CONNACK properties missing v5", 5, bytes.fromhex("20 02 00 00"), MALFORMED),
    ("CONNACK will delay property", 5, bytes.fromhex("20 08 00 00 05 18 00000001"), MALFORMED),
    ("CONNACK maximum QoS 2", 5, bytes.fromhex("20 05 00 00 02 24 02"), PROTOCOL),
    ("CONNACK retain available 2", 5, bytes.fromhex("20 05 00 00 02 25 02"), PROTOCOL),
    # SUBSCRIBE / SUBACK / UNSUBSCRIBE / UNSUBACK
    ("SUBSCRIBE without filters v4", 4, bytes.fromhex("82 02 0001"), PROTOCOL),
    ("SUBSCRIBE without filters v5", 5, bytes.fromhex("82 03 0001 00"), PROTOCOL),
    ("SUBSCRIBE packet id 0", 4, pkt(0x82, b"\x00\x00" + s("a") + b"\x00"), PROTOCOL),
    ("SUBSCRIBE packet id missing", 4, bytes.fromhex("82 01 00"), MALFORMED),
    ("SUBSCRIBE options missing", 4, pkt(0x82, b"\x00\x01" + s("a")), MALFORMED),
    ("SUBSCRIBE reserved bits v4", 4, pkt(0x82, b"\x00\x01" + s("a") + b"\x04"), MALFORMED),
    ("SUBSCRIBE QoS 3 v4", 4, pkt(0x82, b"\x00\x01" + s("a") + b"\x03"), MALFORMED),
    ("SUBSCRIBE reserved bits v5", 5, pkt(0x82, b"\x00\x01\x00" + s("a") + b"\x40"), MALFORMED),
    ("SUBSCRIBE bit 7 v5", 5, pkt(0x82, b"\x00\x01\x00" + s("a") + b"\x81"), MALFORMED),
    ("SUBSCRIBE QoS 3 v5", 5, pkt(0x82, b"\x00\x01\x00" + s("a") + b"\x03"), PROTOCOL),
    ("SUBSCRIBE retain handling 3", 5, pkt(0x82, b"\x00\x01\x00" + s("a") + b"\x30"), PROTOCOL),
    (
        "SUBSCRIBE No Local on shared",
        5,
        pkt(0x82, b"\x00\x01\x00" + s("$share/g/a") + b"\x04"),
        PROTOCOL,
    ),
    ("SUBSCRIBE filter bad UTF-8", 4, pkt(0x82, b"\x00\x01\x00\x01\xff\x00"), MALFORMED),
    (
        "SUBSCRIBE two subscription identifiers",
        5,
        pkt(0x82, b"\x00\x01\x04\x0b\x01\x0b\x02" + s("a") + b"\x00"),
        PROTOCOL,
    ),
    (
        "SUBSCRIBE reason string property",
        5,
        pkt(0x82, b"\x00\x01\x04\x1f" + s("r") + s("a") + b"\x00"),
        MALFORMED,
    ),
    ("SUBACK without codes", 4, bytes.fromhex("90 02 0001"), PROTOCOL),
    ("SUBACK code 3 v4", 4, bytes.fromhex("90 03 0001 03"), PROTOCOL),
    ("SUBACK code 0x87 v4", 4, bytes.fromhex("90 03 0001 87"), PROTOCOL),
    ("SUBACK code 0x90 v5", 5, bytes.fromhex("90 04 0001 00 90"), PROTOCOL),
    ("SUBACK packet id 0", 4, bytes.fromhex("90 03 0000 00"), PROTOCOL),
    ("UNSUBSCRIBE without filters", 4, bytes.fromhex("a2 02 0001"), PROTOCOL),
    ("UNSUBSCRIBE without filters v5", 5, bytes.fromhex("a2 03 0001 00"), PROTOCOL),
    ("UNSUBSCRIBE packet id 0", 4, pkt(0xA2, b"\x00\x00" + s("a")), PROTOCOL),
    ("UNSUBSCRIBE filter truncated", 4, pkt(0xA2, b"\x00\x01\x00\x05ab"), MALFORMED),
    (
        "UNSUBSCRIBE subscription identifier",
        5,
        pkt(0xA2, b"\x00\x01\x02\x0b\x01" + s("a")),
        MALFORMED,
    ),
    ("UNSUBACK remaining length 3 v4", 4, bytes.fromhex("b0 03 0001 00"), MALFORMED),
    ("UNSUBACK without codes v5", 5, bytes.fromhex("b0 03 0001 00"), PROTOCOL),
    ("UNSUBACK code 0x01 v5", 5, bytes.fromhex("b0 04 0001 00 01"), PROTOCOL),
    ("UNSUBACK packet id 0", 5, bytes.fromhex("b0 04 0000 00 00"), PROTOCOL),
    # DISCONNECT / AUTH
    ("DISCONNECT body v4", 4, bytes.fromhex("e0 01 00"), MALFORMED),
    ("DISCONNECT reason 0x01", 5, bytes.fromhex("e0 01 01"), PROTOCOL),
    ("DISCONNECT topic alias property", 5, bytes.fromhex("e0 05 00 03 230001"), MALFORMED),
    ("DISCONNECT trailing bytes", 5, bytes.fromhex("e0 03 00 00 00"), MALFORMED),
    ("DISCONNECT properties truncated", 5, bytes.fromhex("e0 03 00 05 11"), MALFORMED),
    ("AUTH reason 0x01", 5, bytes.fromhex("f0 02 01 00"), PROTOCOL),
    ("AUTH trailing bytes", 5, bytes.fromhex("f0 03 18 00 00"), MALFORMED),
    ("AUTH properties missing", 5, bytes.fromhex("f0 01 18"), MALFORMED),
    ("AUTH user property truncated", 5, bytes.fromhex("f0 04 18 02 26 00"), MALFORMED),
]


@pytest.mark.parametrize(
    ("level", "data", "code"),
    [(level, data, code) for _, level, data, code in REFUSALS],
    ids=[name for name, _, _, _ in REFUSALS],
)
def test_refusal(level: int | None, data: bytes, code: int) -> None:
    error = refusal(data, level)
    assert error.reason_code == code, str(error)
    assert error.message
    assert f"0x{code:02X}" in str(error)


@pytest.mark.parametrize(
    "data",
    [
        pkt(0x10, s("MQIsdp") + b"\x03\x02\x00\x3c" + s("c")),
        pkt(0x10, s("MQTT") + b"\x03\x02\x00\x3c" + s("c")),
        pkt(0x10, s("MQTT") + b"\x06\x02\x00\x3c" + s("c")),
        pkt(0x10, s("MQTT") + b"\x84\x02\x00\x3c" + s("c")),  # bridge bit: not supported
    ],
    ids=["MQIsdp-3", "MQTT-3", "MQTT-6", "MQTT-0x84"],
)
def test_unsupported_protocol_version(data: bytes) -> None:
    error = refusal(data, None)
    assert error.reason_code == UNSUPPORTED
    assert error.v3_connack_code == 1
    assert error.protocol_level is None


def test_connect_errors_carry_the_level_of_the_connect() -> None:
    assert refusal(connect5(bytes.fromhex("03 21 0000")), None).protocol_level == 5
    assert refusal(connect4(flags=0x03), None).protocol_level == 4
    error = refusal(bytes.fromhex("40 02 0000"), 5)
    assert error.protocol_level == 5
    assert error.v3_connack_code is None


def test_password_without_user_name_is_fine_at_level_5() -> None:
    packet = decode_one(connect5(payload=s("c") + s("jwt"), flags=0x42), None)
    assert isinstance(packet, Connect)
    assert (packet.username, packet.password) == (None, b"jwt")


def test_empty_topic_with_alias_is_accepted() -> None:
    packet = decode_one(publish5(bytes.fromhex("23 0005"), s("")), 5)
    assert packet == Publish("", b"", properties=Properties(topic_alias=5))


def test_no_local_is_fine_on_a_normal_subscription() -> None:
    packet = decode_one(pkt(0x82, b"\x00\x01\x00" + s("a") + b"\x04"), 5)
    assert packet == Subscribe(1, [Subscription("a", 0, no_local=True)])


def test_error_is_sticky() -> None:
    decoder = Decoder(protocol_level=4)
    decoder.feed(b"\x00\x00\xc0\x00")
    with pytest.raises(MQTTProtocolError) as first:
        decoder.next_packet()
    with pytest.raises(MQTTProtocolError) as again:
        decoder.next_packet()
    assert again.value is first.value
    with pytest.raises(MQTTProtocolError):
        decoder.feed(b"\xc0\x00")


def test_packets_before_the_bad_one_are_delivered() -> None:
    decoder = Decoder(protocol_level=4)
    decoder.feed(b"\xc0\x00\xd0\x00\x36\x00")
    assert decoder.next_packet() == PingReq()
    assert decoder.next_packet() == PingResp()
    with pytest.raises(MQTTProtocolError):
        decoder.next_packet()


def test_check_payload_format() -> None:
    utf8 = Properties(payload_format_indicator=1)
    check_payload_format("h\u00e9".encode(), utf8)
    check_payload_format(b"\xff", Properties(payload_format_indicator=0))
    check_payload_format(b"\xff", EMPTY_PROPERTIES)
    with pytest.raises(MQTTProtocolError) as info:
        check_payload_format(b"\xff", utf8)
    assert info.value.reason_code == 0x99


# --------------------------------------------------------------------------------------------
# Streaming and size limits

STREAM_PACKETS_5: list[Packet] = [
    Connect(5, True, 30, "dev", "dev", b"pw", None, PROPS_CONNECT),
    Publish("m/d/c/ch/t", b"v" * 200, 1, packet_id=1, properties=PROPS_PUBLISH),
    Publish("m/d/c/ch/t", b"", 0),
    PubAck(1),
    Subscribe(2, [Subscription("m/d/c/ch/#", 2)]),
    PingReq(),
    Publish("x", b"y" * 130, 2, True, True, 3),
    PubRel(3, 0x92, PROPS_ACK),
    Disconnect(0x04),
]


def test_split_at_every_byte_boundary() -> None:
    stream = b"".join(encode(p, 5) for p in STREAM_PACKETS_5)
    for cut in range(len(stream) + 1):
        decoder = Decoder()
        decoder.feed(stream[:cut])
        got = list(decoder)
        decoder.feed(stream[cut:])
        got += list(decoder)
        assert got == STREAM_PACKETS_5, cut
        assert decoder.buffered == 0


def test_split_at_every_pair_of_boundaries_v4() -> None:
    packets: list[Packet] = [
        Publish("a/b", b"12", 1, packet_id=9),
        PingReq(),
        Publish("c", b"x" * 140),
    ]
    stream = b"".join(encode(p, 4) for p in packets)
    for i in range(len(stream) + 1):
        for j in range(i, len(stream) + 1):
            decoder = Decoder(protocol_level=4)
            got = []
            for chunk in (stream[:i], stream[i:j], stream[j:]):
                decoder.feed(chunk)
                got += list(decoder)
            assert got == packets, (i, j)


def test_one_byte_at_a_time_and_buffer_kinds() -> None:
    stream = b"".join(encode(p, 5) for p in STREAM_PACKETS_5)
    decoder = Decoder()
    got: list[Packet] = []
    for i in range(len(stream)):
        chunk = stream[i : i + 1]
        decoder.feed(bytearray(chunk) if i % 2 else memoryview(chunk))
        while (packet := decoder.next_packet()) is not None:
            got.append(packet)
    assert got == STREAM_PACKETS_5


def test_many_packets_in_one_chunk() -> None:
    one = encode_publish("m/domain/c/chan/temp", b"x" * 100)
    decoder = Decoder(protocol_level=4)
    decoder.feed(one * 5000)
    packets = list(decoder)
    assert len(packets) == 5000
    assert packets[-1] == Publish("m/domain/c/chan/temp", b"x" * 100)


def test_large_packet_in_small_chunks() -> None:
    payload = bytes(range(256)) * 2000
    data = encode_publish("big", payload, 1, packet_id=1, protocol_level=5)
    decoder = Decoder(protocol_level=5)
    fed = 0
    while fed + 1000 < len(data):
        decoder.feed(data[fed : fed + 1000])
        fed += 1000
        assert decoder.next_packet() is None
        assert decoder.buffered == fed
    decoder.feed(data[fed:])
    assert decoder.next_packet() == Publish("big", payload, 1, packet_id=1)
    assert decoder.buffered == 0


def test_max_packet_size_checked_from_the_fixed_header() -> None:
    decoder = Decoder(protocol_level=4, max_packet_size=100)
    decoder.feed(bytes.fromhex("30 e807"))  # remaining length 1000; nothing of the body yet
    with pytest.raises(MQTTProtocolError) as info:
        decoder.next_packet()
    assert info.value.reason_code == TOO_LARGE
    assert info.value.protocol_level == 4


def test_max_packet_size_counts_the_whole_packet() -> None:
    data = encode_publish("t", b"x" * 95)  # 2 + 3 + 95 = 100 bytes
    assert len(data) == 100
    decoder = Decoder(protocol_level=4, max_packet_size=100)
    decoder.feed(data)
    assert decoder.next_packet() == Publish("t", b"x" * 95)
    assert refusal_with_limit(encode_publish("t", b"x" * 96), 100).reason_code == TOO_LARGE


def refusal_with_limit(data: bytes, limit: int) -> MQTTProtocolError:
    decoder = Decoder(protocol_level=4, max_packet_size=limit)
    decoder.feed(data)
    with pytest.raises(MQTTProtocolError) as info:
        decoder.next_packet()
    return info.value


def test_max_packet_size_applies_to_connect_and_can_change() -> None:
    decoder = Decoder(max_packet_size=10)
    decoder.feed(CONNECT_311)
    with pytest.raises(MQTTProtocolError) as info:
        decoder.next_packet()
    assert info.value.reason_code == TOO_LARGE
    decoder = Decoder(max_packet_size=MAX_PACKET_SIZE)
    decoder.feed(CONNECT_311 + encode_publish("t", b"x" * 50))
    assert isinstance(decoder.next_packet(), Connect)
    decoder.max_packet_size = 20
    with pytest.raises(MQTTProtocolError):
        decoder.next_packet()


def test_incomplete_input_waits() -> None:
    decoder = Decoder(protocol_level=5)
    for partial in [b"", b"\x30", b"\x30\x80", b"\x30\x80\x80", b"\x30\x0a\x00\x03a/b"]:
        decoder = Decoder(protocol_level=5)
        decoder.feed(partial)
        assert decoder.next_packet() is None
        assert list(decoder) == []


# --------------------------------------------------------------------------------------------
# Encoders


@pytest.mark.parametrize("level", [4, 5])
@pytest.mark.parametrize("qos", [0, 1, 2])
@pytest.mark.parametrize("size", [0, 1, 100, 120, 121, 122, 200, 16_370, 16_380, 70_000])
def test_encode_publish_matches_decode(level: int, qos: int, size: int) -> None:
    payload = b"p" * size
    packet_id = 513 if qos else 0
    data = encode_publish(b"m/d/c/ch", payload, qos, True, qos > 0, packet_id, protocol_level=level)
    assert data == encode(Publish("m/d/c/ch", payload, qos, True, qos > 0, packet_id), level)
    assert decode_one(data, level) == Publish("m/d/c/ch", payload, qos, True, qos > 0, packet_id)


def test_encode_publish_with_properties() -> None:
    data = encode_publish("a", b"b", 1, packet_id=2, properties=PROPS_PUBLISH, protocol_level=5)
    assert decode_one(data, 5) == Publish("a", b"b", 1, packet_id=2, properties=PROPS_PUBLISH)
    assert encode_publish("a", b"b", properties=Properties(topic_alias=1), protocol_level=5) == (
        bytes.fromhex("30 08 0001 61 03 230001 62")
    )


@pytest.mark.parametrize("level", [4, 5])
@pytest.mark.parametrize("size", [10, 200, 20_000])
def test_prepare_publish_patches_the_packet_id(level: int, size: int) -> None:
    payload = b"z" * size
    template = prepare_publish("m/d/c/ch/\u00e9", payload, 1, True, EMPTY_PROPERTIES, level)
    for packet_id in (1, 258, 65535):
        expected = encode_publish(
            "m/d/c/ch/\u00e9", payload, 1, True, False, packet_id, protocol_level=level
        )
        assert template.packet(packet_id) == expected
        assert template.prefix + packet_id.to_bytes(2, "big") + template.suffix == expected
        dup = encode_publish(
            "m/d/c/ch/\u00e9", payload, 1, True, True, packet_id, protocol_level=level
        )
        assert template.packet(packet_id, dup=True) == dup
    with pytest.raises(ValueError):
        template.packet(0)
    qos0 = prepare_publish(b"t", payload, protocol_level=level)
    assert qos0.packet() is qos0.data
    assert qos0.data == encode_publish(b"t", payload, protocol_level=level)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"qos": 3, "packet_id": 1},
        {"qos": -1},
        {"qos": 1, "packet_id": 0},
        {"qos": 2, "packet_id": 65536},
        {"qos": 0, "dup": True},
        {"protocol_level": 3},
        {"protocol_level": 6, "qos": 1, "packet_id": 1},
        {"protocol_level": 5, "properties": Properties(session_expiry_interval=1)},
        {"protocol_level": 5, "properties": Properties(topic_alias=70_000)},
    ],
)
def test_encode_publish_rejects_bad_arguments(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        encode_publish("t", b"", **kwargs)  # type: ignore[arg-type]


def test_encode_rejects_what_cannot_be_represented() -> None:
    with pytest.raises(ValueError):
        encode(PingReq(), 3)
    with pytest.raises(TypeError):
        encode("not a packet", 4)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        encode(Connect(4, True, 0, "c", None, b"p"), 4)
    with pytest.raises(ValueError):
        encode(Connect(5, True, 0, "c"), 4)
    with pytest.raises(ValueError):
        encode(Connect(4, True, 70_000, "c"), 4)
    with pytest.raises(ValueError):
        encode(Connect(4, True, 0, "c\x00"), 4)
    with pytest.raises(ValueError):
        encode(Connect(5, True, 0, "c", properties=Properties(topic_alias=1)), 5)
    with pytest.raises(ValueError):
        encode(Auth(), 4)
    with pytest.raises(ValueError):
        encode(ConnAck(False, 0x86), 4)
    with pytest.raises(ValueError):
        encode(PubAck(0), 4)
    with pytest.raises(ValueError):
        encode(Subscribe(1, []), 4)
    with pytest.raises(ValueError):
        encode(Subscribe(1, [Subscription("a", 3)]), 4)
    with pytest.raises(ValueError):
        encode(Subscribe(1, [Subscription("a")], Properties(subscription_identifiers=(1, 2))), 5)
    with pytest.raises(ValueError):
        encode(Unsubscribe(1, []), 4)
    with pytest.raises(ValueError):
        encode(SubAck(1, []), 4)
    with pytest.raises(ValueError):
        encode(UnsubAck(1), 5)
    with pytest.raises(ValueError):
        encode(Publish("t" * 70_000, b""), 4)


def test_encoders_refuse_oversized_fields() -> None:
    from adapters.mqtt.codec.primitives import varint as _varint

    with pytest.raises(ValueError):
        _varint(268_435_456)
    with pytest.raises(ValueError):
        encode(Connect(4, True, 0, "c", "u", b"p" * 65536), 4)
    with pytest.raises(ValueError):
        encode(Connect(4, True, 0, "c", "u" * 65536), 4)
    with pytest.raises(ValueError):
        encode(Connect(4, True, 0, "c", will=Will("w", b"", qos=3)), 4)
    subid = Properties(subscription_identifiers=(268_435_456,))
    with pytest.raises(ValueError):
        encode(Subscribe(1, [Subscription("a")], subid), 5)


def test_decoder_refuses_unknown_levels() -> None:
    with pytest.raises(ValueError):
        Decoder(protocol_level=3)
