"""Routing messages to subscribers: subscriptions, the local router and the ``Bus`` interface.

A :class:`Subscription` is one subscriber's interest in a topic filter with its bounded queue.
The bus never blocks the publisher: a full subscriber loses the message (counted), and past
``max_dropped`` losses in a row it is closed with a reason, which the adapter turns into a
disconnect in its protocol's idiom.

Adapters that write straight to a transport pass a ``sink`` instead of reading the queue; the sink
returns False when the subscriber cannot take the message (its write buffer is full).

:class:`Router` is the in-memory index of subscriptions of this process; every bus
implementation routes through it: the in-process bus directly, the NATS bus for what it receives.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
from collections.abc import Awaitable, Callable
from typing import Protocol

import msgspec

from core.message import Message
from core.topics import TopicFilter

Sink = Callable[[Message], bool]


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
        self._queue: collections.deque[Message] = collections.deque()
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


class Router:
    """The subscriptions of this process, indexed by (domain, channel)."""

    def __init__(self) -> None:
        self._by_channel: dict[tuple[str, str], list[Subscription]] = {}
        self._turn = itertools.count()

    def add(self, sub: Subscription) -> bool:
        """Index a subscription; True when it is the first on its channel."""
        key = (sub.filter.domain, sub.filter.channel)
        subs = self._by_channel.get(key)
        if subs is None:
            self._by_channel[key] = [sub]
            return True
        # Copy on write: route() may be iterating the old list.
        self._by_channel[key] = [*subs, sub]
        return False

    def remove(self, sub: Subscription) -> bool:
        """Drop a subscription; True when it was the last on its channel."""
        key = (sub.filter.domain, sub.filter.channel)
        subs = self._by_channel.get(key)
        if not subs or sub not in subs:
            return False
        rest = [s for s in subs if s is not sub]
        if rest:
            self._by_channel[key] = rest
            return False
        del self._by_channel[key]
        return True

    def route(self, message: Message) -> int:
        """Offer a message to every matching subscription; returns how many were offered."""
        subs = self._by_channel.get((message.domain, message.channel))
        if not subs:
            return 0
        subtopic = message.subtopic
        groups: dict[tuple[str, str], list[Subscription]] | None = None
        n = 0
        for sub in subs:
            if not sub.filter.matches(subtopic):
                continue
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


class Change(msgspec.Struct, frozen=True, gc=False):
    """A change to what clients may do, for every node to hear: its caches of credentials and
    rights must go, and open connections and subscriptions be checked again. ``kind`` is what
    changed (``domain``, ``client``, ``channel``, ``connection``), ``domain`` where, ``ref``
    which one (a client or channel reference; empty for a whole domain)."""

    kind: str
    domain: str
    ref: str = ""


ChangeHandler = Callable[[Change], Awaitable[None]]


class Bus(Protocol):
    """Carries published messages to every matching subscription, on any node, and changes to
    what clients may do (:class:`Change`) to every node."""

    name: str

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


def make_bus(kind: str) -> Bus:
    """The bus a deployment's ``bus`` setting names."""
    if kind == "local":
        from core.bus.local import LocalBus

        return LocalBus()
    raise ValueError(f"unknown bus {kind!r}: the bus is 'local'")
