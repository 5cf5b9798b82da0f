"""What the bus tests share: a message, a subscription made on a bus, what it holds."""

from __future__ import annotations

from core.bus import Bus, Subscription
from core.message import Message
from core.topics import parse_filter


def message(subtopic: str, payload: bytes = b"x", channel: str = "temps") -> Message:
    return Message("acme", channel, subtopic, "pub", "http", "text/plain", payload, 0, None)


async def subscribed(bus: Bus, flt: str, group: str | None = None) -> Subscription:
    sub = Subscription(parse_filter(flt), group=group)
    await bus.subscribe(sub)
    return sub


def taken(sub: Subscription) -> list[bytes]:
    """The payloads the subscription holds, taken out."""
    out = []
    while (held := sub.get_nowait()) is not None:
        out.append(held.payload)
    return out
