"""MQTT session state, sans I/O: what outlives a connection and what decides each delivery.

A :class:`Session` is the server side of one MQTT client identifier (scoped to the
authenticated Conduit client): its subscriptions (:class:`Sub`), the QoS 1/2 messages in flight
to the client with their packet identifiers, the messages queued while the client is offline or
its receive window is full, the QoS 2 packet identifiers received and awaiting PUBREL, the will,
and the expiry. Sessions live in memory (a single node's state; they do not survive a restart).

The session writes nothing itself: it hands packet bytes to its :class:`Outlet` (the channel
currently attached, or None while the client is offline). Tests drive it with a fake outlet.
Which sessions exist, and their timers, is :mod:`adapters.mqtt.sessions`' business.

Delivery rules (MQTT 3.1.1 section 4.3, MQTT 5 sections 3.3 and 4.9):

- the QoS of a delivery is the minimum of the publisher's QoS and the subscription's;
- QoS 0 goes only to an attached client whose connection is not congested (else it is dropped
  and the drop counted); QoS 1 and 2 wait in the queue while the client is offline, its receive
  window (``window``: the smaller of its Receive Maximum and the server's maximum in-flight) is
  full, or its connection is congested;
- the queue holds at most ``max_queued`` messages and ``max_queued_bytes`` bytes of payload;
  past either a message is dropped and counted (and the limit reported: ``limit_reached``);
- on resume, messages in flight are sent again with DUP set (PUBREL again for those already
  acknowledged by PUBREC), then the queue drains as the window allows.
"""

from __future__ import annotations

import collections
import logging
import secrets
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

import msgspec

from adapters.mqtt import persist
from adapters.mqtt.codec import encode_pubrel
from adapters.mqtt.publish import MessageInfo, PublishCache
from core import message as messages
from core.identity import Identity
from core.message import Message

if TYPE_CHECKING:
    import asyncio

    from adapters.mqtt.codec import Will
    from core.bus import Subscription
    from core.sessions import SessionStore

log = logging.getLogger("conduit.mqtt")

MAX_PACKET_ID = 0xFFFF
SHARE_PREFIX = "$share/"


class Outlet(Protocol):
    """What a session needs of the channel it is attached to."""

    level: int  # 4 or 5
    congested: bool  # the connection's write buffer is over its limit
    max_packet_size: int  # the largest packet the client accepts

    def send(self, data: bytes) -> None:
        """Queue bytes for the client (a control packet)."""

    def deliver(self, data: bytes) -> None:
        """Queue a PUBLISH for the client (counted as a delivery)."""

    def take_over(self) -> None:
        """Another connection takes the session: end this one (DISCONNECT 0x8E in MQTT 5)."""


class Sub:
    """One MQTT subscription of a session. It is the bus subscription's sink."""

    __slots__ = (
        "active",
        "bus",
        "filter",
        "group",
        "no_local",
        "qos",
        "retain_as_published",
        "retain_handling",
        "session",
        "subscription_id",
        "topic_filter",
    )

    def __init__(
        self,
        session: Session,
        filter: str,
        topic_filter: str,
        group: str | None,
        qos: int,
        no_local: bool = False,
        retain_as_published: bool = False,
        retain_handling: int = 0,
        subscription_id: int = 0,
    ) -> None:
        self.session = session
        self.filter = filter  # as the client wrote it, "$share/<group>/" included
        self.topic_filter = topic_filter  # the gateway's filter
        self.group = group
        self.qos = qos
        self.no_local = no_local
        self.retain_as_published = retain_as_published
        self.retain_handling = retain_handling
        self.subscription_id = subscription_id
        self.bus: Subscription | None = None
        self.active = True

    def end(self) -> Subscription | None:
        """Stop delivering. Returns the bus subscription for the caller to end, and lets go of
        it (the bus subscription holds this one as its sink: no cycle is left behind)."""
        self.active = False
        bus, self.bus = self.bus, None
        return bus

    def __call__(self, message: Message) -> bool:
        if not self.active:  # ended here, not yet removed from the bus
            return True
        try:
            return self.session.offer(self, message, False)
        except Exception:  # never let one subscriber break the publisher's path
            log.exception("mqtt: delivery failed client=%s", self.session.identity.client_id)
            return True


class Outgoing:
    """A QoS 1 or 2 message on its way to the client (queued or in flight)."""

    __slots__ = ("message", "qos", "released", "retain", "seq", "sub")

    def __init__(self, message: Message, qos: int, retain: bool, sub: Sub) -> None:
        self.message = message
        self.qos = qos
        self.retain = retain
        self.sub = sub
        self.released = False  # QoS 2: PUBREC received, PUBREL sent
        self.seq = 0  # its number in the session store; 0: not stored


def shared(topic_filter: str) -> tuple[str | None, str] | None:
    """The share group and the filter of a SUBSCRIBE's topic filter: ``(None, topic_filter)``
    unless it starts with ``$share/``, ``(group, filter)`` for ``$share/<group>/<filter>``, and
    None when what follows ``$share/`` is not a group (non-empty, no wildcard) and a filter."""
    if not topic_filter.startswith(SHARE_PREFIX):
        return None, topic_filter
    _, group, rest = [*topic_filter.split("/", 2), "", ""][:3]
    if not group or "+" in group or "#" in group or not rest:
        return None
    return group, rest


def store_key(identity: Identity, client_id: str) -> str:
    """A session's key in the session store."""
    return msgspec.json.encode(["mqtt", identity.client_id, client_id]).decode()


class Session:
    """The state of one client identifier, attached to at most one connection at a time."""

    __slots__ = (
        "_next_id",
        "_seq",
        "awaiting_rel",
        "cache",
        "client_id",
        "dropped",
        "expiry",
        "expiry_handle",
        "identity",
        "inflight",
        "key",
        "limit_reached",
        "max_inflight",
        "max_queued",
        "max_queued_bytes",
        "no_local",
        "outlet",
        "queue",
        "queued_bytes",
        "store",
        "subs",
        "token",
        "will",
        "will_handle",
        "window",
    )

    def __init__(
        self,
        identity: Identity,
        client_id: str,
        cache: PublishCache,
        *,
        expiry: int = 0,
        max_inflight: int = 100,
        max_queued: int = 1000,
        max_queued_bytes: int = 16 * 1024 * 1024,
        limit_reached: Callable[[str], None] | None = None,
    ) -> None:
        self.identity = identity
        self.client_id = client_id
        self.key = (identity.client_id, client_id)
        # Tells this session's own messages apart (No Local). Random: it travels in the
        # message metadata, which other protocols' subscribers see.
        self.token = secrets.token_urlsafe(16)
        self.cache = cache
        self.expiry = expiry  # seconds the session outlives its connection
        self.max_inflight = max_inflight
        self.max_queued = max_queued
        self.max_queued_bytes = max_queued_bytes
        self.queued_bytes = 0  # payload bytes in the queue
        self.limit_reached = limit_reached
        self.window = max_inflight
        self.subs: dict[str, Sub] = {}
        self.inflight: dict[int, Outgoing] = {}
        self.queue: collections.deque[Outgoing] | None = None
        self.awaiting_rel: set[int] | None = None
        self.outlet: Outlet | None = None
        self.no_local = 0  # subscriptions with No Local set
        self.dropped = 0
        self.will: Will | None = None
        self.will_handle: asyncio.TimerHandle | None = None
        self.expiry_handle: asyncio.TimerHandle | None = None
        self._next_id = 1
        # Persistent sessions only: where they are kept, and the next message number there.
        self.store: SessionStore | None = None
        self._seq = 1

    # attaching
    def attach(self, outlet: Outlet, receive_maximum: int = MAX_PACKET_ID) -> None:
        """A connection takes the session: resend what is in flight (DUP), then drain the queue."""
        self.outlet = outlet
        self.window = max(1, min(receive_maximum, self.max_inflight))
        cache = self.cache
        for packet_id, out in list(self.inflight.items()):
            if out.released:
                outlet.send(encode_pubrel(packet_id))
                continue
            template = cache.template(
                cache.info(out.message),
                outlet.level,
                out.qos,
                out.retain,
                out.sub.subscription_id,
            )
            if template is None:  # expired while the client was away
                del self.inflight[packet_id]
                self._forget(out)
                continue
            outlet.deliver(template.packet(packet_id, dup=True))
        self.pump()

    def detach(self) -> None:
        self.outlet = None

    def clear(self) -> None:
        """The session ended: let go of what it still holds (each holds the session back)."""
        self.inflight.clear()
        self.queue = None
        self.queued_bytes = 0
        self.subs.clear()

    # subscriptions (the No Local count follows them)
    def add_sub(self, sub: Sub) -> None:
        """Keep a new subscription under its filter (the caller ended the one it replaces)."""
        self.subs[sub.filter] = sub
        if sub.no_local:
            self.no_local += 1

    def set_no_local(self, sub: Sub, no_local: bool) -> None:
        if sub.no_local != no_local:
            self.no_local += 1 if no_local else -1
            sub.no_local = no_local

    def pop_sub(self, filter: str) -> Sub | None:
        """Remove and end the subscription of this filter, if there is one."""
        sub = self.subs.pop(filter, None)
        if sub is not None:
            sub.active = False
            if sub.no_local:
                self.no_local -= 1
        return sub

    def drop_sub(self, sub: Sub) -> bool:
        """Remove ``sub`` if it is still the subscription of its filter (not replaced)."""
        if self.subs.get(sub.filter) is not sub:
            return False
        del self.subs[sub.filter]
        if sub.no_local:
            self.no_local -= 1
        return True

    # delivering
    def offer(self, sub: Sub, message: Message, retained: bool) -> bool:
        """Deliver a message matching ``sub`` (``retained``: sent because of a new subscription).

        Returns False when the message is dropped because the attached client cannot keep up
        (the bus counts it and, past its limit, closes the subscription).
        """
        cache = self.cache
        info = cache.info(message)
        if sub.no_local and info.client == self.token:
            return True
        qos = sub.qos if sub.qos < info.qos else info.qos
        retain = retained or (sub.retain_as_published and info.retain)
        outlet = self.outlet
        if qos == 0:
            if outlet is None:
                return True  # QoS 0 is not kept for an offline client
            if outlet.congested:
                return False
            template = cache.template(info, outlet.level, 0, retain, sub.subscription_id)
            if template is not None and len(template.data) <= outlet.max_packet_size:
                outlet.deliver(template.data)
            return True
        if (
            outlet is not None
            and not self.queue
            and len(self.inflight) < self.window
            and not outlet.congested
        ):
            self._send(Outgoing(message, qos, retain, sub), info, outlet)
            return True
        queue = self.queue
        if queue is None:
            queue = self.queue = collections.deque()
        size = len(message.payload)
        if len(queue) < self.max_queued and self.queued_bytes + size <= self.max_queued_bytes:
            out = Outgoing(message, qos, retain, sub)
            queue.append(out)
            self.queued_bytes += size
            if self.store is not None:
                self._save(out)
            return True
        self.dropped += 1
        if self.limit_reached is not None:
            full = len(queue) >= self.max_queued
            self.limit_reached("mqtt_max_queued" if full else "mqtt_max_queued_bytes")
        if outlet is not None:
            return False
        # Offline: count the loss, but an absent client is not a slow one to cut off.
        bus = sub.bus
        if bus is not None:
            bus.dropped += 1
            if bus.on_drop is not None:
                bus.on_drop()
        return True

    def _send(self, out: Outgoing, info: MessageInfo, outlet: Outlet) -> None:
        template = self.cache.template(
            info, outlet.level, out.qos, out.retain, out.sub.subscription_id
        )
        if template is None or len(template.data) > outlet.max_packet_size:
            self._forget(out)  # expired, or more than the client accepts: discarded (3.1.2.25)
            return
        packet_id = self._packet_id()
        self.inflight[packet_id] = out
        if out.seq:
            self._save(out, packet_id)  # stored while queued: now in flight
        outlet.deliver(template.packet(packet_id))

    def pump(self) -> None:
        """Send queued messages while the window allows."""
        queue = self.queue
        outlet = self.outlet
        if not queue or outlet is None:
            return
        inflight = self.inflight
        window = self.window
        cache = self.cache
        while queue and len(inflight) < window and not outlet.congested:
            out = queue.popleft()
            self.queued_bytes -= len(out.message.payload)
            self._send(out, cache.info(out.message), outlet)

    def _packet_id(self) -> int:
        packet_id = self._next_id
        inflight = self.inflight
        while packet_id in inflight:
            packet_id = packet_id % MAX_PACKET_ID + 1
        self._next_id = packet_id % MAX_PACKET_ID + 1
        return packet_id

    # acknowledgements from the client
    def puback(self, packet_id: int) -> bool:
        """QoS 1 delivery acknowledged; True if it was in flight."""
        out = self.inflight.get(packet_id)
        if out is None or out.qos != 1:
            return False
        del self.inflight[packet_id]
        if out.seq:
            self._forget(out)
        return True

    def pubrec(self, packet_id: int) -> bool:
        """QoS 2 delivery received by the client; True if in flight (answer PUBREL)."""
        out = self.inflight.get(packet_id)
        if out is None or out.qos != 2:
            return False
        out.released = True
        if out.seq:
            self._save(out, packet_id)
        return True

    def pubcomp(self, packet_id: int) -> bool:
        out = self.inflight.get(packet_id)
        if out is None or out.qos != 2:
            return False
        del self.inflight[packet_id]
        if out.seq:
            self._forget(out)
        return True

    def discard(self, packet_id: int) -> None:
        """The client refused a delivery (PUBACK/PUBREC reason code 0x80 or above)."""
        out = self.inflight.pop(packet_id, None)
        if out is not None:
            self._forget(out)

    # QoS 2 from the client
    def received(self, packet_id: int) -> bool:
        """Remember an incoming QoS 2 packet id until PUBREL; False if it is a duplicate."""
        rel = self.awaiting_rel
        if rel is None:
            rel = self.awaiting_rel = set()
        elif packet_id in rel:
            return False
        rel.add(packet_id)
        return True

    def is_duplicate(self, packet_id: int) -> bool:
        rel = self.awaiting_rel
        return rel is not None and packet_id in rel

    def released(self, packet_id: int) -> bool:
        """PUBREL from the client; True if the packet id was awaiting it."""
        rel = self.awaiting_rel
        if rel is None or packet_id not in rel:
            return False
        rel.discard(packet_id)
        return True

    @property
    def awaiting(self) -> int:
        return len(self.awaiting_rel) if self.awaiting_rel else 0

    @property
    def queued(self) -> int:
        return len(self.queue) if self.queue else 0

    # ---------------------------------------------------------------------------------------
    # the session store (persistent sessions only): what an offline or slow session must keep

    def save(self, expires_at: float | None = None, will_at: float | None = None) -> None:
        """Keep the session's state (``expires_at``, ``will_at``: wall-clock times once it is
        offline)."""
        store = self.store
        if store is None:
            return
        subs = [
            persist.SavedSub(
                s.filter,
                s.qos,
                s.no_local,
                s.retain_as_published,
                s.retain_handling,
                s.subscription_id,
            )
            for s in self.subs.values()
        ]
        state = persist.SavedSession(
            persist.SavedIdentity.of(self.identity),
            self.client_id,
            self.expiry,
            subs,
            sorted(self.awaiting_rel or ()),
            self.will,
            expires_at,
            will_at,
        )
        store.put_session(store_key(self.identity, self.client_id), persist.encode(state))

    def save_messages(self) -> None:
        """Keep what is in flight and was not stored yet (sent while the client was keeping
        up): the connection ended, the session must still deliver it."""
        if self.store is None:
            return
        for packet_id, out in self.inflight.items():
            if not out.seq:
                self._save(out, packet_id)

    def _save(self, out: Outgoing, packet_id: int = 0) -> None:
        store = self.store
        assert store is not None
        if not out.seq:
            out.seq = self._seq
            self._seq += 1
        record = persist.SavedMessage(
            messages.encode(out.message),
            out.qos,
            out.retain,
            out.sub.filter,
            out.sub.subscription_id,
            packet_id,
            out.released,
        )
        store.put_message(store_key(self.identity, self.client_id), out.seq, persist.encode(record))

    def _forget(self, out: Outgoing) -> None:
        if out.seq and self.store is not None:
            self.store.delete_message(store_key(self.identity, self.client_id), out.seq)

    def restore(self, out: Outgoing, seq: int, packet_id: int) -> None:
        """Put back a stored message: in flight under ``packet_id``, or queued (0)."""
        out.seq = seq
        self._seq = max(self._seq, seq + 1)
        if packet_id:
            self.inflight[packet_id] = out
            self._next_id = packet_id % MAX_PACKET_ID + 1
        else:
            if self.queue is None:
                self.queue = collections.deque()
            self.queue.append(out)
            self.queued_bytes += len(out.message.payload)
