"""A client disabled or deleted through the API is cut off: its open connection ends at once."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from adapters.mqtt.codec import Disconnect
from tests.conftest import World
from tests.mqtt.conftest import Closed, connected


async def test_disabled_client_gets_disconnect_0x87(world: World, raw: Callable[..., Any]) -> None:
    client = await connected(raw, world.publisher, "dev-1", level=5)
    await world.gateway.provisioning.set_client_enabled("acme", world.publisher.id, False)
    packet = await client.expect(Disconnect)
    assert packet.reason_code == 0x87
    assert packet.properties.reason_string == "client disabled or deleted"
    with pytest.raises(Closed):
        await client.recv(timeout=5)


async def test_deleted_client_is_closed_v311(world: World, raw: Callable[..., Any]) -> None:
    other = await connected(raw, world.both, "other")
    client = await connected(raw, world.publisher, "dev-1")
    await world.gateway.provisioning.delete_client("acme", world.publisher.id)
    with pytest.raises(Closed):
        await client.recv(timeout=5)  # 3.1.1 has no DISCONNECT from the server: a close
    await other.send(b"\xc0\x00")  # PINGREQ: the other client's connection is untouched
    assert (await other.recv()).__class__.__name__ == "PingResp"
