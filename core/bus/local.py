"""The in-process bus, the embedded default: routes each message to this process's subscribers."""

from __future__ import annotations

from core.bus import Change, ChangeHandler, Router, Subscription
from core.errors import UnavailableError
from core.message import Message


class LocalBus:
    name = "local"
    spans_nodes = False

    def __init__(self, keep_last: int = 10_000, keep_last_bytes: int = 64 * 1024 * 1024) -> None:
        self.router = Router()
        self._open = False
        # The latest message of each topic, oldest topic forgotten first past keep_last topics
        # or keep_last_bytes of payload.
        self._last: dict[tuple[str, str, str], Message] = {}
        self._keep_last = keep_last
        self._keep_last_bytes = keep_last_bytes
        self.last_bytes = 0
        self._handlers: list[ChangeHandler] = []

    async def start(self) -> None:
        self._open = True

    async def close(self) -> None:
        self._open = False

    async def ping(self) -> None:
        if not self._open:
            raise UnavailableError("bus is closed")

    async def publish(self, message: Message) -> None:
        self.publish_nowait(message)

    def publish_nowait(self, message: Message) -> bool:
        if not self._open:
            raise UnavailableError("bus is closed")
        key = (message.domain, message.channel, message.subtopic)
        last = self._last
        old = last.pop(key, None)
        size = self.last_bytes + len(message.payload)
        if old is not None:
            size -= len(old.payload)
        elif len(last) >= self._keep_last:
            size -= len(last.pop(next(iter(last))).payload)
        while size > self._keep_last_bytes and last:
            size -= len(last.pop(next(iter(last))).payload)
        self.last_bytes = size
        last[key] = message
        self.router.route(message)
        return True

    async def subscribe(self, sub: Subscription) -> None:
        if not self._open:
            raise UnavailableError("bus is closed")
        self.router.add(sub)

    async def unsubscribe(self, sub: Subscription) -> None:
        self.router.remove(sub)

    async def last(self, domain: str, channel: str, subtopic: str) -> Message | None:
        return self._last.get((domain, channel, subtopic))

    async def announce(self, change: Change) -> None:
        for handler in self._handlers:
            await handler(change)

    def on_change(self, handler: ChangeHandler) -> None:
        self._handlers.append(handler)
