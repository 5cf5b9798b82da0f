"""Fixtures of the WebSocket tests: the adapter on an ephemeral port, a watcher that shows what
was published, and small client helpers."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from adapters.ws import WSAdapter
from tests.conftest import World, running
from tests.conftest import drain as drain  # re-exported for this package's tests


@pytest.fixture
async def ws_adapter(world: World) -> AsyncIterator[WSAdapter]:
    """The WebSocket adapter on an ephemeral port, with a fast keep-alive."""
    adapter = WSAdapter(
        world.gateway, "127.0.0.1", 0, ping_interval=5, ping_timeout=5, close_timeout=2
    )
    async with running(adapter):
        yield adapter


@pytest.fixture
def ws(ws_adapter: WSAdapter) -> str:
    """Base URL of the WebSocket adapter."""
    return f"ws://127.0.0.1:{ws_adapter.port}"
