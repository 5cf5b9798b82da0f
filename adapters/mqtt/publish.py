"""How a Conduit :class:`~core.message.Message` maps to and from an MQTT PUBLISH.

This module owns the translation and nothing else (no I/O, no session state):

- inbound: the properties of a received PUBLISH (or a will) become the message's content type
  and ``metadata`` (:func:`inbound`);
- outbound: a message becomes PUBLISH bytes for a subscriber (:class:`PublishCache`), encoded
  once per variant (protocol level, QoS, retain flag, subscription identifier) and reused for
  every subscriber of a fan-out: the bus offers the same message object to every matching
  subscription in turn, so remembering the last message is enough.

Metadata keys Conduit reserves: every key starting with ``mqtt:`` (:data:`RESERVED_PREFIX`).
Only the adapter sets them, from the packet itself; a client's MQTT 5 user properties whose name
starts with the prefix are dropped, so that no publisher can set or influence them (downgrade a
delivery's QoS, pass a Response Topic the codec would refuse, silence another session's No Local
subscription). Other user properties travel under their own names.

=========================  =================================================================
``mqtt:response_topic``    MQTT 5 Response Topic
``mqtt:correlation_data``  MQTT 5 Correlation Data, base64 (metadata values are strings)
``mqtt:payload_format``    ``"1"`` when the publisher declared a UTF-8 payload
``mqtt:expiry``            Message Expiry Interval in seconds, counted from ``created``
``mqtt:qos``               the publisher's QoS when below 2 (delivery QoS is the minimum of it
                           and the subscription's; messages from other protocols have none and
                           go at the subscription's QoS)
``mqtt:retain``            ``"1"`` on a message published with the retain flag
``mqtt:client``            the publishing session's No Local token (random, unguessable), set
                           only while that session holds a No Local subscription
=========================  =================================================================
"""

from __future__ import annotations

import base64
import binascii
import time
from typing import Final

from adapters.mqtt.codec import EMPTY_PROPERTIES, Properties, PublishTemplate, prepare_publish
from core.content import OCTETS, SENML
from core.message import Message

#: The ``protocol`` of the messages MQTT publishes, and the label of its metrics.
PROTOCOL: Final = "mqtt"

RESPONSE_TOPIC: Final = "mqtt:response_topic"
CORRELATION_DATA: Final = "mqtt:correlation_data"
PAYLOAD_FORMAT: Final = "mqtt:payload_format"
EXPIRY: Final = "mqtt:expiry"
QOS: Final = "mqtt:qos"
RETAIN: Final = "mqtt:retain"
CLIENT: Final = "mqtt:client"
RESERVED_PREFIX: Final = "mqtt:"

# Shared, never mutated: the metadata of a plain QoS 0 / QoS 1 publish costs no allocation.
QOS_ONLY: Final[tuple[dict[str, str], dict[str, str], None]] = (
    {QOS: "0"},
    {QOS: "1"},
    None,
)


def content_type_of(value: str | None, default: str) -> str:
    """The message content type of an MQTT 5 Content Type property (or the adapter default).

    MQTT carries any content type; the SenML types are recognised whatever their case or
    parameters, so a SenML payload cannot slip past validation by spelling.
    """
    if not value:
        return default
    media = value.split(";", 1)[0].strip().lower()
    return media if media in SENML else value


def inbound(
    properties: Properties,
    qos: int,
    retain: bool,
    default_content_type: str,
    client: str | None = None,
) -> tuple[str, dict[str, str] | None]:
    """Content type and metadata of a received PUBLISH (or will).

    ``client`` is the publishing session's No Local token, set when it must travel with the
    message (the session holds a No Local subscription). User properties named with the
    reserved prefix are dropped: reserved keys come only from the packet and from ``client``.
    """
    if properties is EMPTY_PROPERTIES:
        if not retain and client is None:
            return default_content_type, QOS_ONLY[qos]
        content_type = default_content_type
        metadata: dict[str, str] = {}
    else:
        content_type = content_type_of(properties.content_type, default_content_type)
        users = properties.user_properties
        metadata = {k: v for k, v in users if not k.startswith(RESERVED_PREFIX)} if users else {}
        if properties.response_topic is not None:
            metadata[RESPONSE_TOPIC] = properties.response_topic
        if properties.correlation_data is not None:
            metadata[CORRELATION_DATA] = base64.b64encode(properties.correlation_data).decode()
        if properties.payload_format_indicator == 1:
            metadata[PAYLOAD_FORMAT] = "1"
        if properties.message_expiry_interval is not None:
            metadata[EXPIRY] = str(properties.message_expiry_interval)
    if qos < 2:
        metadata[QOS] = str(qos)
    if retain:
        metadata[RETAIN] = "1"
    if client is not None:
        metadata[CLIENT] = client
    return content_type, metadata or None


def outbound_properties(
    message: Message, remaining_expiry: int | None, subscription_id: int = 0
) -> Properties:
    """The MQTT 5 properties of a delivery: what the publisher set, and the content type of
    messages that have one (anything but application/octet-stream)."""
    metadata = message.metadata
    content_type = message.content_type if message.content_type != OCTETS else None
    if not metadata:
        if content_type is None and not subscription_id:
            return EMPTY_PROPERTIES
        return Properties(
            content_type=content_type,
            subscription_identifiers=(subscription_id,) if subscription_id else (),
        )
    users = tuple((k, v) for k, v in metadata.items() if not k.startswith(RESERVED_PREFIX))
    correlation: bytes | None = None
    if CORRELATION_DATA in metadata:
        try:
            correlation = base64.b64decode(metadata[CORRELATION_DATA], validate=True)
        except (binascii.Error, ValueError):
            correlation = metadata[CORRELATION_DATA].encode()
    props = Properties(
        payload_format_indicator=1 if metadata.get(PAYLOAD_FORMAT) == "1" else None,
        message_expiry_interval=remaining_expiry,
        content_type=content_type,
        response_topic=metadata.get(RESPONSE_TOPIC),
        correlation_data=correlation,
        subscription_identifiers=(subscription_id,) if subscription_id else (),
        user_properties=users,
    )
    return EMPTY_PROPERTIES if props == EMPTY_PROPERTIES else props


class MessageInfo:
    """What every delivery of one message shares: its topic, the publisher's QoS and retain
    flag, its origin client and expiry, and the PUBLISH templates built so far."""

    __slots__ = ("client", "expires", "message", "qos", "retain", "templates", "topic")

    def __init__(self, message: Message) -> None:
        self.message = message
        self.topic = message.topic.encode()
        metadata = message.metadata
        self.templates: dict[tuple[int, int, bool, int], PublishTemplate] = {}
        if metadata is None:
            self.qos = 2
            self.retain = False
            self.client: str | None = None
            self.expires: int | None = None
            return
        qos = metadata.get(QOS)
        self.qos = 1 if qos == "1" else 0 if qos == "0" else 2
        self.retain = RETAIN in metadata
        self.client = metadata.get(CLIENT)
        expiry = metadata.get(EXPIRY)
        self.expires = None
        if expiry is not None and expiry.isdigit():
            self.expires = message.created + int(expiry) * 1_000_000_000

    def remaining_expiry(self) -> int | None:
        """Seconds left before the message expires (at least 1 while it lives), None when it
        never expires; -1 once it has expired."""
        if self.expires is None:
            return None
        left = self.expires - time.time_ns()
        if left <= 0:
            return -1
        return max(1, left // 1_000_000_000)


class PublishCache:
    """PUBLISH bytes of the latest message, per variant: encode once, write many."""

    __slots__ = ("_info",)

    def __init__(self) -> None:
        self._info: MessageInfo | None = None

    def info(self, message: Message) -> MessageInfo:
        info = self._info
        if info is None or info.message is not message:
            info = self._info = MessageInfo(message)
        return info

    def template(
        self, info: MessageInfo, level: int, qos: int, retain: bool, subscription_id: int = 0
    ) -> PublishTemplate | None:
        """The PUBLISH for this variant; None when the message has expired."""
        if level == 4:
            subscription_id = 0
        key = (level, qos, retain, subscription_id)
        if info.expires is None:
            template = info.templates.get(key)
            if template is not None:
                return template
            remaining = None
        else:
            # An expiring message carries the time it has left: never reuse its bytes.
            remaining = info.remaining_expiry()
            if remaining == -1:
                return None
        props = (
            EMPTY_PROPERTIES
            if level == 4
            else outbound_properties(info.message, remaining, subscription_id)
        )
        template = prepare_publish(info.topic, info.message.payload, qos, retain, props, level)
        if info.expires is None:
            info.templates[key] = template
        return template

    def clear(self) -> None:
        self._info = None
