"""Routing messages to subscribers: subscriptions, the local router and the ``Bus`` interface.

A :class:`Subscription` is one subscriber's interest in a topic filter with its bounded queue.
The bus never blocks the publisher: a full subscriber loses the message (counted), and past
``max_dropped`` losses in a row it is closed with a reason, which the adapter turns into a
disconnect in its protocol's idiom.

Adapters that write straight to a transport pass a ``sink`` instead of reading the queue; the sink
returns False when the subscriber cannot take the message (its write buffer is full).

:class:`Router` is the in-memory index of subscriptions of this process, which the in-process
bus routes through. The NATS bus (``core/bus/nats.py``) lets NATS match instead: it holds one
NATS subscription per distinct filter and hands what each brings to that filter's subscribers.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Final, Protocol

import msgspec

from core.message import Message
from core.topics import TopicFilter

if TYPE_CHECKING:
    from core.bus.nats import NatsOptions

Sink = Callable[[Message], bool]


# The queue of every subscription with a sink: always empty (nothing is put in it; maxlen 0
# would drop anything that were).
_NO_QUEUE: Final[collections.deque[Message]] = collections.deque(maxlen=0)


class SubscriptionClosed(Exception):
    """Raised by :meth:`Subscription.get` once the subscription is closed; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Subscription:
    """One subscriber's interest in a topic filter, with its bounded queue."""

    __slots__ = (
        "_queue",
        "_waiter",
        "closed",
        "dropped",
        "filter",
        "group",
        "identity",
        "max_dropped",
        "maxsize",
        "on_close",
        "on_drop",
        "protocol",
        "sink",
        "streak",
    )

    def __init__(
        self,
        flt: TopicFilter,
        *,
        protocol: str = "",
        identity: object = None,
        maxsize: int = 1024,
        max_dropped: int = 1000,
        sink: Sink | None = None,
        group: str | None = None,
        on_close: Callable[[Subscription, str], None] | None = None,
        on_drop: Callable[[], None] | None = None,
    ) -> None:
        self.filter = flt
        self.protocol = protocol
        self.identity = identity
        self.maxsize = maxsize
        self.max_dropped = max_dropped
        self.sink = sink
        self.group = group
        self.on_close = on_close
        self.on_drop = on_drop
        self.dropped = 0
        self.streak = 0  # losses since the last message taken
        self.closed: str | None = None
        # A sink takes every message itself: no queue of its own (an empty deque is 760 bytes,
        # per subscription of every MQTT, WebSocket and SSE subscriber).
        self._queue: collections.deque[Message] = (
            _NO_QUEUE if sink is not None else collections.deque()
        )
        self._waiter: asyncio.Future[None] | None = None

    def offer(self, message: Message) -> None:
        """Hand a message to the subscriber; never blocks, never raises."""
        if self.closed is not None:
            return
        if self.sink is not None:
            taken = self.sink(message)
        elif len(self._queue) < self.maxsize:
            self._queue.append(message)
            waiter = self._waiter
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
            taken = True
        else:
            taken = False
        if taken:
            self.streak = 0
            return
        self.dropped += 1
        self.streak += 1
        if self.on_drop is not None:
            self.on_drop()
        if self.streak >= self.max_dropped:
            self.close(f"subscriber too slow: {self.streak} messages dropped")

    async def get(self) -> Message:
        """The next message; raises :class:`SubscriptionClosed` once closed and drained."""
        while not self._queue:
            if self.closed is not None:
                raise SubscriptionClosed(self.closed)
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._queue.popleft()

    async def next(self, timeout: float) -> Message | None:
        """The next message, or None when ``timeout`` seconds pass with none (for keep-alives).

        Cheaper than ``asyncio.wait_for(get())``, which makes a task per call: this waits on
        the subscription's one future with a timer. Raises :class:`SubscriptionClosed` once
        closed and drained.
        """
        if not self._queue:
            if self.closed is not None:
                raise SubscriptionClosed(self.closed)
            loop = asyncio.get_running_loop()
            waiter = self._waiter = loop.create_future()
            timer = loop.call_later(timeout, _wake, waiter)
            try:
                await waiter
            finally:
                timer.cancel()
                self._waiter = None
            if not self._queue:
                if self.closed is not None:
                    raise SubscriptionClosed(self.closed)
                return None
        return self._queue.popleft()

    def get_nowait(self) -> Message | None:
        return self._queue.popleft() if self._queue else None

    def close(self, reason: str = "closed") -> None:
        if self.closed is not None:
            return
        self.closed = reason
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        if self.on_close is not None:
            self.on_close(self, reason)


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class _Level:
    """One level of a channel's subscription index: the subscriptions whose filter ends here,
    those ending in ``#`` here, and the next levels by literal and ``+``.

    Lists are replaced, never changed in place: a route in progress keeps iterating the list it
    started with while a subscriber comes or goes (a sink may unsubscribe from inside it)."""

    __slots__ = ("exact", "levels", "plus", "rest")

    def __init__(self) -> None:
        self.exact: list[Subscription] = []  # filter ends at this level
        self.rest: list[Subscription] = []  # filter ends with "#" after this level
        self.levels: dict[str, _Level] = {}
        self.plus: _Level | None = None

    def empty(self) -> bool:
        return not (self.exact or self.rest or self.levels or self.plus)


class Router:
    """The subscriptions of this process, indexed by channel and then level by level, as the
    MQTT brokers do: routing a message costs in proportion to its topic's levels and to the
    subscriptions it matches, never to the number of subscriptions of its channel; adding and
    removing one cost the levels of its filter."""

    def __init__(self) -> None:
        self._channels: dict[tuple[str, str], _Level] = {}
        self._turn = itertools.count()

    def add(self, sub: Subscription) -> bool:
        """Index a subscription; True when it is the first on its channel."""
        key = (sub.filter.domain, sub.filter.channel)
        root = self._channels.get(key)
        first = root is None
        if root is None:
            root = self._channels[key] = _Level()
        node, slot = _place(root, sub.filter.levels, create=True)
        assert node is not None
        setattr(node, slot, [*getattr(node, slot), sub])
        return first

    def remove(self, sub: Subscription) -> bool:
        """Drop a subscription; True when it was the last on its channel."""
        key = (sub.filter.domain, sub.filter.channel)
        root = self._channels.get(key)
        if root is None:
            return False
        path: list[tuple[_Level, str]] = []
        node, slot = _place(root, sub.filter.levels, create=False, path=path)
        if node is None:
            return False
        subs: list[Subscription] = getattr(node, slot)
        if sub not in subs:
            return False
        setattr(node, slot, [s for s in subs if s is not sub])
        # Prune the levels nothing goes through any more, from the deepest up.
        while path and node.empty():
            parent, level = path.pop()
            if level == "+":
                parent.plus = None
            else:
                del parent.levels[level]
            node = parent
        if root.empty():
            del self._channels[key]
            return True
        return False

    def route(self, message: Message) -> int:
        """Offer a message to every matching subscription; returns how many were offered."""
        root = self._channels.get((message.domain, message.channel))
        if root is None:
            return 0
        subtopic = message.subtopic
        matched: list[Subscription] = []
        _collect(root, subtopic.split("/") if subtopic else [], 0, matched)
        groups: dict[tuple[str, str], list[Subscription]] | None = None
        n = 0
        for sub in matched:
            if sub.group is None:
                sub.offer(message)
                n += 1
            else:
                if groups is None:
                    groups = {}
                groups.setdefault((sub.group, sub.filter.subtopic), []).append(sub)
        if groups:
            turn = next(self._turn)
            for members in groups.values():
                members[turn % len(members)].offer(message)
                n += 1
        return n


def _place(
    root: _Level,
    levels: tuple[str, ...] | None,
    *,
    create: bool,
    path: list[tuple[_Level, str]] | None = None,
) -> tuple[_Level | None, str]:
    """The level a filter ends at, and which of its lists holds the filter's subscriptions."""
    if levels is None:  # the whole channel: m/<domain>/c/<channel>/#
        return root, "rest"
    node = root
    for level in levels:
        if level == "#":
            return node, "rest"
        nxt = node.plus if level == "+" else node.levels.get(level)
        if nxt is None:
            if not create:
                return None, ""
            nxt = _Level()
            if level == "+":
                node.plus = nxt
            else:
                node.levels[level] = nxt
        if path is not None:
            path.append((node, level))
        node = nxt
    return node, "exact"


def _collect(node: _Level, levels: list[str], i: int, out: list[Subscription]) -> None:
    """The subscriptions below ``node`` that match ``levels[i:]`` (MQTT 4.7: ``#`` also
    matches its parent level; ``+`` matches exactly one level)."""
    if node.rest:
        out.extend(node.rest)
    if i == len(levels):
        if node.exact:
            out.extend(node.exact)
        return
    nxt = node.levels.get(levels[i])
    if nxt is not None:
        _collect(nxt, levels, i + 1, out)
    if node.plus is not None:
        _collect(node.plus, levels, i + 1, out)


class Change(msgspec.Struct, frozen=True, gc=False):
    """A change to what clients may do, for every node to hear: its caches of credentials and
    rights must go, and open connections and subscriptions be checked again. ``kind`` is what
    changed (``domain``, ``client``, ``channel``, ``connection``, ``dtls_key``, ...), ``domain``
    where, ``ref`` which one (a client or channel reference; empty for a whole domain). A
    distributed bus that was cut off from the others hands its node ``Change("bus", "")`` on
    coming back: changes may have been missed, everything cached goes.

    A kind ending in ``_session`` (``mqtt_session``) changes no rights: a protocol session
    moves to another node, and ``ref`` says which and where (:data:`SESSION_MOVED`)."""

    kind: str
    domain: str
    ref: str = ""


ChangeHandler = Callable[[Change], Awaitable[None]]

#: The end of the kind of every :class:`Change` that moves a protocol session between nodes.
SESSION_MOVED = "_session"


class Bus(Protocol):
    """Carries published messages to every matching subscription, on any node, and changes to
    what clients may do (:class:`Change`) to every node."""

    name: str
    #: Several nodes share it (what one announces, every node hears): a protocol session must
    #: be taken from the node that holds it. False for the in-process bus.
    spans_nodes: bool

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def ping(self) -> None:
        """Raise ``core.errors.UnavailableError`` if the bus cannot carry messages."""

    async def publish(self, message: Message) -> None: ...

    def publish_nowait(self, message: Message) -> bool:
        """Publish without waiting if the bus can; False (nothing published) if it cannot."""

    async def subscribe(self, sub: Subscription) -> None: ...

    async def unsubscribe(self, sub: Subscription) -> None: ...

    async def last(self, domain: str, channel: str, subtopic: str) -> Message | None:
        """The latest message published on exactly this topic, if the bus still knows it."""

    async def announce(self, change: Change) -> None:
        """Tell every node, this one included, of a change; returns once this node's handlers
        have run (other nodes hear it as soon as the bus carries it)."""

    def on_change(self, handler: ChangeHandler) -> None:
        """Have ``handler`` run for every change announced on any node."""


def make_bus(
    kind: str, *, keep_last_bytes: int = 64 * 1024 * 1024, nats: NatsOptions | None = None
) -> Bus:
    """The bus a deployment's ``bus`` setting names; ``keep_last_bytes`` bounds the payload
    bytes of the in-process bus's latest-message cache (CoAP GET); ``nats`` says how the NATS
    bus reaches NATS and what it keeps there (the NATS stream keeps the latest messages)."""
    if kind == "local":
        from core.bus.local import LocalBus

        return LocalBus(keep_last_bytes=keep_last_bytes)
    if kind == "nats":
        from core.bus.nats import NatsBus

        return NatsBus(nats)
    raise ValueError(f"unknown bus {kind!r}: the bus is 'local' or 'nats'")
