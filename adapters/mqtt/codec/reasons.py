"""MQTT reason codes, in one table: every MQTT 5 reason code (:class:`ReasonCode`), the 3.1.1
CONNACK return codes (:class:`ReturnCode`) and the mapping from the one to the other, which codes
each packet type may carry, and the one error that carries a code (:class:`MQTTProtocolError`).

The codec checks received codes against the sets; the channel picks the code it answers with
through :func:`for_connack`, :func:`for_disconnect`, :func:`for_suback` and
:func:`v3_connack`, so a refusal the error table words with a code one packet type cannot carry
still gets a code that packet can.
"""

from __future__ import annotations

import enum
from typing import Final


class ReasonCode(enum.IntEnum):
    """The MQTT 5 reason codes (MQTT 5 section 2.4). Below 0x80 success, from 0x80 failure."""

    SUCCESS = 0x00  # also Normal disconnection and Granted QoS 0
    GRANTED_QOS_1 = 0x01
    GRANTED_QOS_2 = 0x02
    DISCONNECT_WITH_WILL = 0x04
    NO_MATCHING_SUBSCRIBERS = 0x10
    NO_SUBSCRIPTION_EXISTED = 0x11
    CONTINUE_AUTHENTICATION = 0x18
    RE_AUTHENTICATE = 0x19
    UNSPECIFIED_ERROR = 0x80
    MALFORMED_PACKET = 0x81
    PROTOCOL_ERROR = 0x82
    IMPLEMENTATION_SPECIFIC_ERROR = 0x83
    UNSUPPORTED_PROTOCOL_VERSION = 0x84
    CLIENT_IDENTIFIER_NOT_VALID = 0x85
    BAD_USER_NAME_OR_PASSWORD = 0x86
    NOT_AUTHORIZED = 0x87
    SERVER_UNAVAILABLE = 0x88
    SERVER_BUSY = 0x89
    BANNED = 0x8A
    SERVER_SHUTTING_DOWN = 0x8B
    BAD_AUTHENTICATION_METHOD = 0x8C
    KEEP_ALIVE_TIMEOUT = 0x8D
    SESSION_TAKEN_OVER = 0x8E
    TOPIC_FILTER_INVALID = 0x8F
    TOPIC_NAME_INVALID = 0x90
    PACKET_IDENTIFIER_IN_USE = 0x91
    PACKET_IDENTIFIER_NOT_FOUND = 0x92
    RECEIVE_MAXIMUM_EXCEEDED = 0x93
    TOPIC_ALIAS_INVALID = 0x94
    PACKET_TOO_LARGE = 0x95
    MESSAGE_RATE_TOO_HIGH = 0x96
    QUOTA_EXCEEDED = 0x97
    ADMINISTRATIVE_ACTION = 0x98
    PAYLOAD_FORMAT_INVALID = 0x99
    RETAIN_NOT_SUPPORTED = 0x9A
    QOS_NOT_SUPPORTED = 0x9B
    USE_ANOTHER_SERVER = 0x9C
    SERVER_MOVED = 0x9D
    SHARED_SUBSCRIPTIONS_NOT_SUPPORTED = 0x9E
    CONNECTION_RATE_EXCEEDED = 0x9F
    MAXIMUM_CONNECT_TIME = 0xA0
    SUBSCRIPTION_IDENTIFIERS_NOT_SUPPORTED = 0xA1
    WILDCARD_SUBSCRIPTIONS_NOT_SUPPORTED = 0xA2


class ReturnCode(enum.IntEnum):
    """The MQTT 3.1.1 CONNACK return codes (MQTT 3.1.1 section 3.2.2.3)."""

    ACCEPTED = 0
    UNACCEPTABLE_PROTOCOL_VERSION = 1
    IDENTIFIER_REJECTED = 2
    SERVER_UNAVAILABLE = 3
    BAD_USER_NAME_OR_PASSWORD = 4
    NOT_AUTHORIZED = 5


R = ReasonCode

# Which reason codes each packet type may carry (MQTT 5 section 2.4); 3.1.1 return codes and
# SUBACK codes separately.
CONNACK_CODES_V4: Final = frozenset(ReturnCode)
CONNACK_CODES: Final = frozenset(
    {R.SUCCESS, R.UNSPECIFIED_ERROR, R.MALFORMED_PACKET, R.PROTOCOL_ERROR}
    | {R.IMPLEMENTATION_SPECIFIC_ERROR, R.UNSUPPORTED_PROTOCOL_VERSION}
    | {R.CLIENT_IDENTIFIER_NOT_VALID, R.BAD_USER_NAME_OR_PASSWORD, R.NOT_AUTHORIZED}
    | {R.SERVER_UNAVAILABLE, R.SERVER_BUSY, R.BANNED, R.BAD_AUTHENTICATION_METHOD}
    | {R.TOPIC_NAME_INVALID, R.PACKET_TOO_LARGE, R.QUOTA_EXCEEDED, R.PAYLOAD_FORMAT_INVALID}
    | {R.RETAIN_NOT_SUPPORTED, R.QOS_NOT_SUPPORTED, R.USE_ANOTHER_SERVER, R.SERVER_MOVED}
    | {R.CONNECTION_RATE_EXCEEDED}
)
PUBACK_CODES: Final = frozenset(  # PUBACK and PUBREC
    {R.SUCCESS, R.NO_MATCHING_SUBSCRIBERS, R.UNSPECIFIED_ERROR}
    | {R.IMPLEMENTATION_SPECIFIC_ERROR, R.NOT_AUTHORIZED, R.TOPIC_NAME_INVALID}
    | {R.PACKET_IDENTIFIER_IN_USE, R.QUOTA_EXCEEDED, R.PAYLOAD_FORMAT_INVALID}
)
PUBREL_CODES: Final = frozenset({R.SUCCESS, R.PACKET_IDENTIFIER_NOT_FOUND})  # and PUBCOMP
SUBACK_CODES_V4: Final = frozenset({0x00, 0x01, 0x02, 0x80})
SUBACK_CODES: Final = frozenset(
    {R.SUCCESS, R.GRANTED_QOS_1, R.GRANTED_QOS_2, R.UNSPECIFIED_ERROR}
    | {R.IMPLEMENTATION_SPECIFIC_ERROR, R.NOT_AUTHORIZED, R.TOPIC_FILTER_INVALID}
    | {R.PACKET_IDENTIFIER_IN_USE, R.QUOTA_EXCEEDED, R.SHARED_SUBSCRIPTIONS_NOT_SUPPORTED}
    | {R.SUBSCRIPTION_IDENTIFIERS_NOT_SUPPORTED, R.WILDCARD_SUBSCRIPTIONS_NOT_SUPPORTED}
)
UNSUBACK_CODES: Final = frozenset(
    {R.SUCCESS, R.NO_SUBSCRIPTION_EXISTED, R.UNSPECIFIED_ERROR}
    | {R.IMPLEMENTATION_SPECIFIC_ERROR, R.NOT_AUTHORIZED, R.TOPIC_FILTER_INVALID}
    | {R.PACKET_IDENTIFIER_IN_USE}
)
DISCONNECT_CODES: Final = frozenset(
    {R.SUCCESS, R.DISCONNECT_WITH_WILL, R.UNSPECIFIED_ERROR, R.MALFORMED_PACKET}
    | {R.PROTOCOL_ERROR, R.IMPLEMENTATION_SPECIFIC_ERROR, R.NOT_AUTHORIZED, R.SERVER_BUSY}
    | {R.SERVER_SHUTTING_DOWN, R.KEEP_ALIVE_TIMEOUT, R.SESSION_TAKEN_OVER}
    | {R.TOPIC_FILTER_INVALID, R.TOPIC_NAME_INVALID, R.RECEIVE_MAXIMUM_EXCEEDED}
    | {R.TOPIC_ALIAS_INVALID, R.PACKET_TOO_LARGE, R.MESSAGE_RATE_TOO_HIGH, R.QUOTA_EXCEEDED}
    | {R.ADMINISTRATIVE_ACTION, R.PAYLOAD_FORMAT_INVALID, R.RETAIN_NOT_SUPPORTED}
    | {R.QOS_NOT_SUPPORTED, R.USE_ANOTHER_SERVER, R.SERVER_MOVED}
    | {R.SHARED_SUBSCRIPTIONS_NOT_SUPPORTED, R.CONNECTION_RATE_EXCEEDED}
    | {R.MAXIMUM_CONNECT_TIME, R.SUBSCRIPTION_IDENTIFIERS_NOT_SUPPORTED}
    | {R.WILDCARD_SUBSCRIPTIONS_NOT_SUPPORTED}
)
AUTH_CODES: Final = frozenset({R.SUCCESS, R.CONTINUE_AUTHENTICATION, R.RE_AUTHENTICATE})

# MQTT 5 to 3.1.1 at CONNECT: the return code a 3.1.1 client gets for a refusal an MQTT 5
# client would get this reason code for. Any other failure is "not authorized": 3.1.1 has no
# word for a malformed will or a payload that is too large.
_V3_CONNACK: Final[dict[int, ReturnCode]] = {
    R.SUCCESS: ReturnCode.ACCEPTED,
    R.UNSUPPORTED_PROTOCOL_VERSION: ReturnCode.UNACCEPTABLE_PROTOCOL_VERSION,
    R.CLIENT_IDENTIFIER_NOT_VALID: ReturnCode.IDENTIFIER_REJECTED,
    R.BAD_USER_NAME_OR_PASSWORD: ReturnCode.BAD_USER_NAME_OR_PASSWORD,
    R.SERVER_UNAVAILABLE: ReturnCode.SERVER_UNAVAILABLE,
    R.SERVER_BUSY: ReturnCode.SERVER_UNAVAILABLE,
}

# Names of the refusals the adapter words itself (not rows of the error table), for the log and
# the refusals metric. Codes that are also a condition of core's error table share its name.
_REFUSAL_NAMES: Final[dict[int, str]] = {
    R.MALFORMED_PACKET: "malformed_packet",
    R.PROTOCOL_ERROR: "protocol_error",
    R.UNSUPPORTED_PROTOCOL_VERSION: "unsupported_protocol_version",
    R.BAD_AUTHENTICATION_METHOD: "bad_authentication_method",
    R.KEEP_ALIVE_TIMEOUT: "keep_alive_timeout",
    R.TOPIC_NAME_INVALID: "bad_topic",
    R.RECEIVE_MAXIMUM_EXCEEDED: "receive_maximum_exceeded",
    R.TOPIC_ALIAS_INVALID: "topic_alias_invalid",
    R.PACKET_TOO_LARGE: "too_large",
    R.PAYLOAD_FORMAT_INVALID: "payload_format_invalid",
}


def v3_connack(code: int) -> ReturnCode:
    """The 3.1.1 CONNACK return code for an MQTT 5 CONNACK reason code."""
    return _V3_CONNACK.get(code, ReturnCode.NOT_AUTHORIZED)


def for_connack(code: int) -> int:
    """A failure code a CONNACK can carry: ``code``, or Unspecified error."""
    return code if code >= 0x80 and code in CONNACK_CODES else R.UNSPECIFIED_ERROR


def for_suback(code: int) -> int:
    """A failure code a SUBACK can carry: ``code``, or Unspecified error."""
    return code if code >= 0x80 and code in SUBACK_CODES else R.UNSPECIFIED_ERROR


def for_disconnect(code: int) -> int:
    """A failure code a server's DISCONNECT can carry: ``code``; Server busy for Server
    unavailable (a CONNACK code); else Unspecified error."""
    if code >= 0x80 and code in DISCONNECT_CODES:
        return code
    return R.SERVER_BUSY if code == R.SERVER_UNAVAILABLE else R.UNSPECIFIED_ERROR


def refusal_name(code: int, default: str | None = None) -> str:
    """The metrics label of a refusal the adapter answers with ``code``."""
    name = _REFUSAL_NAMES.get(code)
    if name is not None:
        return name
    return default if default is not None else f"reason_0x{code:02x}"


class MQTTProtocolError(Exception):
    """Input that breaks the MQTT specification.

    ``reason_code`` is the MQTT 5 reason code to answer with: in a CONNACK while the CONNECT is
    being handled, in a DISCONNECT afterwards; then close the connection. ``protocol_level`` is the
    level in force when the error arose (from the CONNECT being decoded or the connection), or
    None when it is unknown; a level 4 connection has no reason codes and is simply closed.
    ``v3_connack_code``, when set, tells the server to answer with a 3.1.1-format CONNACK
    carrying this return code (1, "unacceptable protocol version") whatever the reason code;
    ``requested_level`` is then the protocol level byte the client sent, when it sent one (a
    client asking for a level above 5 understands an MQTT 5 CONNACK).
    """

    def __init__(
        self,
        reason_code: int,
        message: str,
        *,
        protocol_level: int | None = None,
        v3_connack_code: int | None = None,
        requested_level: int | None = None,
    ) -> None:
        super().__init__(reason_code, message)
        self.reason_code = reason_code
        self.message = message
        self.protocol_level = protocol_level
        self.v3_connack_code = v3_connack_code
        self.requested_level = requested_level

    def __str__(self) -> str:
        return f"{self.message} (reason code 0x{self.reason_code:02X})"


def malformed(message: str) -> MQTTProtocolError:
    return MQTTProtocolError(R.MALFORMED_PACKET, message)


def protocol_error(message: str) -> MQTTProtocolError:
    return MQTTProtocolError(R.PROTOCOL_ERROR, message)
