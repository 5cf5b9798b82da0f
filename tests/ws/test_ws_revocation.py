"""A client disabled or deleted through the API is cut off: its open WebSocket closes (1008)."""

from __future__ import annotations

import asyncio

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from tests.conftest import World


async def test_publish_only_connection_closes_when_client_is_disabled(
    world: World, ws: str
) -> None:
    url = f"{ws}/m/acme/c/temps?authorization=Client%20{world.publisher.secret}"
    async with connect(url) as conn:
        await conn.send('{"ok": 1}')  # open and publishing
        await world.gateway.provisioning.set_client_enabled("acme", world.publisher.id, False)
        with pytest.raises(ConnectionClosed) as closed:
            await asyncio.wait_for(conn.recv(), 5)
    assert closed.value.rcvd is not None
    assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (
        1008, "client disabled or deleted"
    )
