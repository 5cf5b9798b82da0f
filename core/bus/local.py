"""The in-process bus, the embedded default: routes each message to this process's subscribers."""

from __future__ import annotations

from core.bus import Router, Subscription
from core.errors import UnavailableError
from core.message import Message


class LocalBus:
    name = "local"

    def __init__(self) -> None:
        self.router = Router()
        self._open = False

    async def start(self) -> None:
        self._open = True

    async def close(self) -> None:
        self._open = False

    async def ping(self) -> None:
        if not self._open:
            raise UnavailableError("bus is closed")

    async def publish(self, message: Message) -> None:
        if not self._open:
            raise UnavailableError("bus is closed")
        self.router.route(message)

    async def subscribe(self, sub: Subscription) -> None:
        if not self._open:
            raise UnavailableError("bus is closed")
        self.router.add(sub)

    async def unsubscribe(self, sub: Subscription) -> None:
        self.router.remove(sub)
