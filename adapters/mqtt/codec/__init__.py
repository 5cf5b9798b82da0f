"""Sans-I/O codec for MQTT 3.1.1 (protocol level 4) and MQTT 5.0 (protocol level 5).

This package owns the MQTT wire format and nothing else: bytes in, packet objects out
(:class:`Decoder`), packet objects to bytes (:func:`encode`, :func:`encode_publish`,
:func:`prepare_publish`, the fixed acknowledgements), and the reason codes. It does no I/O, knows
no sockets, no asyncio, no sessions and no gateway; the MQTT channel owns the protocol state.

Modules: ``reasons`` (reason codes, the MQTT 5 to 3.1.1 mapping, which codes each packet carries,
:class:`MQTTProtocolError`), ``primitives`` (integers, strings, binary data, the fixed header),
``properties`` (MQTT 5 properties and their wire form), ``packets`` (the packet types),
``decoder`` and ``encoder``. Import from the package: what is below is its API.

Packets are ``msgspec.Struct`` types (:class:`Connect` ... :class:`Auth`): construction is
implemented in C, cheaper than a slotted dataclass, which matters on the decode hot path
(docs/performance.md). MQTT 5 properties are one frozen, typed :class:`Properties` struct; a
packet without properties holds the shared :data:`EMPTY_PROPERTIES`, so the common PUBLISH (no
properties) costs one byte compare and no allocation. Level 4 packets always carry
:data:`EMPTY_PROPERTIES`; encoding at level 4 drops properties and reason codes the version
cannot express (a SUBACK failure code becomes 0x80).

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
  The error's ``v3_connack_code`` is 1: answer with a 3.1.1-format CONNACK, return code 1, unless
  its ``requested_level`` (the level byte the client sent) is above 5.
- 0x90 Topic Name Invalid: a wildcard (``+`` or ``#``) in a topic name: PUBLISH topic, will topic,
  response topic (empty response topic too). This is the DESIGN.md code for a malformed topic.
- 0x95 Packet Too Large: fixed header + remaining length above ``Decoder.max_packet_size``,
  checked from the fixed header before the body is buffered.
- 0x99 Payload Format Invalid: not checked by the decoder, because the answer is a PUBACK/PUBREC
  (or CONNACK for a will), not a disconnect; :func:`check_payload_format` is the helper.

Left to the channel (needs connection state or the direction of the packet): topic aliases (0 or
above the negotiated maximum: 0x94; an alias with no topic yet: 0x82); a second CONNECT; which
packet types a server may receive; subscription identifiers in a client-to-server PUBLISH; packet
sizes above the *client's* maximum when sending; receive maximum and in-flight ids; session expiry
in DISCONNECT when CONNECT had 0; topic filter syntax (wildcard placement, empty filter) and the
Conduit topic grammar, answered per subscription in SUBACK (0x8F); client identifier rules (empty
id with clean session 0 at level 4 is CONNACK 2); AUTH method consistency; payload format (above).
"""

from adapters.mqtt.codec.decoder import Decoder, check_payload_format
from adapters.mqtt.codec.encoder import (
    PINGRESP_BYTES,
    PublishTemplate,
    encode,
    encode_puback,
    encode_pubcomp,
    encode_publish,
    encode_pubrec,
    encode_pubrel,
    prepare_publish,
)
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
from adapters.mqtt.codec.primitives import MAX_PACKET_SIZE
from adapters.mqtt.codec.properties import EMPTY_PROPERTIES, Properties
from adapters.mqtt.codec.reasons import MQTTProtocolError, ReasonCode, ReturnCode

__all__ = [
    "EMPTY_PROPERTIES",
    "MAX_PACKET_SIZE",
    "PINGRESP_BYTES",
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
    "ReasonCode",
    "ReturnCode",
    "SubAck",
    "Subscribe",
    "Subscription",
    "UnsubAck",
    "Unsubscribe",
    "Will",
    "check_payload_format",
    "encode",
    "encode_puback",
    "encode_pubcomp",
    "encode_publish",
    "encode_pubrec",
    "encode_pubrel",
    "prepare_publish",
]
