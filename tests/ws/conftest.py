"""Fixtures of the WebSocket tests: the adapter on an ephemeral port, a watcher that shows what
was published, and small client helpers."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from adapters.ws import WSAdapter
from core.auth import Credentials
from core.bus import Subscription
from tests.conftest import World


@pytest.fixture
async def ws_adapter(world: World) -> AsyncIterator[WSAdapter]:
    """The WebSocket adapter on an ephemeral port, with a fast keep-alive."""
    adapter = WSAdapter(
        world.gateway, "127.0.0.1", 0, ping_interval=5, ping_timeout=5, close_timeout=2
    )
    await adapter.start()
    try:
        yield adapter
    finally:
        await adapter.stop(timeout=2)


@pytest.fixture
def ws(ws_adapter: WSAdapter) -> str:
    """Base URL of the WebSocket adapter."""
    return f"ws://127.0.0.1:{ws_adapter.port}"


@pytest.fixture
async def watch(world: World) -> AsyncIterator[Subscription]:
    """A subscriber on the whole channel, outside any adapter: what it sees was published."""
    ident = await world.gateway.authenticate(Credentials(world.subscriber.secret))
    sub = await world.gateway.subscribe(ident, "m/acme/c/temps/#", "http")
    yield sub
    await world.gateway.unsubscribe(sub)


def drain(sub: Subscription) -> list[object]:
    """Everything a watcher holds now."""
    out = []
    while (msg := sub.get_nowait()) is not None:
        out.append(msg)
    return out
