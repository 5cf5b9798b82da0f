"""The in-process bus, the embedded default: routes each message to this process's subscribers."""

from __future__ import annotations

from core.bus import Change, ChangeHandler, Router, Subscription
from core.errors import UnavailableError
from core.message import Message


class LocalBus:
    name = "local"

    def __init__(self, keep_last: int = 10_000) -> None:
        self.router = Router()
        self._open = False
        # The latest message of each topic, oldest topic forgotten first past keep_last.
        self._last: dict[tuple[str, str, str], Message] = {}
        self._keep_last = keep_last
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
        if last.pop(key, None) is None and len(last) >= self._keep_last:
            del last[next(iter(last))]
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
