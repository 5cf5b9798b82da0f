"""What a persistent MQTT session keeps in the session store (:mod:`core.sessions`), as bytes.

A session's state (:class:`SavedSession`: who it belongs to, its subscriptions, its will, when
it expires, the QoS 2 packet identifiers awaiting PUBREL) is one record under the session's key;
each QoS 1/2 message it must still deliver (:class:`SavedMessage`: queued, or in flight with its
packet identifier) is one record under the key and the session's sequence number of the
message, so that a restart restores them in order.

Encoded with msgpack (msgspec), fields by position: a field may be appended with a default,
never removed or reordered (records outlive the version that wrote them).
"""

from __future__ import annotations

import msgspec

from adapters.mqtt.codec import Will
from core.identity import Identity, Rules
from core.topics import parse_filter


class SavedIdentity(msgspec.Struct, array_like=True):
    client_id: str
    domain: str
    name: str
    publish: list[str] | None = None  # rules: None when rights come from the store
    subscribe: list[str] | None = None
    expires: float | None = None

    @classmethod
    def of(cls, identity: Identity) -> SavedIdentity:
        rules = identity.rules
        return cls(
            identity.client_id,
            identity.domain,
            identity.name,
            None if rules is None else [str(f) for f in rules.publish],
            None if rules is None else [str(f) for f in rules.subscribe],
            identity.expires,
        )

    def identity(self) -> Identity:
        rules = None
        if self.publish is not None and self.subscribe is not None:
            rules = Rules(
                tuple(parse_filter(f) for f in self.publish),
                tuple(parse_filter(f) for f in self.subscribe),
            )
        return Identity(self.client_id, self.domain, self.name, rules, self.expires)


class SavedSub(msgspec.Struct, array_like=True):
    filter: str  # as the client wrote it, "$share/<group>/" included
    qos: int
    no_local: bool = False
    retain_as_published: bool = False
    retain_handling: int = 0
    subscription_id: int = 0


class SavedSession(msgspec.Struct, array_like=True):
    identity: SavedIdentity
    client_id: str  # the MQTT client identifier
    expiry: int  # seconds the session outlives its connection
    subs: list[SavedSub]
    awaiting_rel: list[int]
    will: Will | None = None
    # Wall-clock times (seconds since the epoch) while offline; None while connected (after a
    # crash: the connection ended when the server restarted).
    expires_at: float | None = None
    will_at: float | None = None


class SavedMessage(msgspec.Struct, array_like=True):
    message: bytes  # the bus encoding (core.message.encode)
    qos: int
    retain: bool
    filter: str  # the subscription it was matched by
    subscription_id: int = 0
    packet_id: int = 0  # in flight: its packet identifier; 0: queued
    released: bool = False  # QoS 2: PUBREC received, PUBREL sent


_encoder = msgspec.msgpack.Encoder()
_session = msgspec.msgpack.Decoder(SavedSession)
_message = msgspec.msgpack.Decoder(SavedMessage)


def encode(record: SavedSession | SavedMessage) -> bytes:
    return _encoder.encode(record)


def decode_session(data: bytes) -> SavedSession:
    """Raises ``msgspec.DecodeError`` or ``msgspec.ValidationError`` on foreign bytes."""
    return _session.decode(data)


def decode_message(data: bytes) -> SavedMessage:
    return _message.decode(data)
