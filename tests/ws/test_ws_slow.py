"""A slow subscriber: its bounded queue overflows, losses are counted, and past max_dropped it is
closed with 1008 and the reason, while a fast subscriber on the same channel gets every
message and the publisher never waits."""

from __future__ import annotations

import asyncio

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from core.credentials import Credentials
from core.limits import Limits
from tests.conftest import World


@pytest.fixture
def limits() -> Limits:
    return Limits(queue_size=4, max_dropped=8)


async def test_slow_subscriber_is_cut_off_alone(world: World, ws: str) -> None:
    gateway = world.gateway
    drops = gateway.metrics.drops["ws"]
    headers = {"Authorization": f"Client {world.subscriber.secret}"}
    url = f"{ws}/m/acme/c/temps"
    # max_queue=1: the slow client stops reading its socket after one message.
    async with (
        connect(url, additional_headers=headers, max_queue=1, max_size=None) as slow,
        connect(url, additional_headers=headers, max_size=None) as fast,
    ):
        publisher = await gateway.authenticate(Credentials(world.publisher.secret))
        payload = b"p" * 100_000
        sent = 0
        while drops.value < 8:
            assert sent < 2000, "the slow subscriber's buffers never filled"
            await gateway.publish(publisher, "m/acme/c/temps", payload, "text/plain", "http")
            sent += 1
            # The fast subscriber keeps up: each message arrives before the next is sent.
            assert await asyncio.wait_for(fast.recv(decode=False), 5) == payload
        assert drops.value == 8  # the subscription closed itself at max_dropped

        received = 0
        with pytest.raises(ConnectionClosed):
            while True:
                await asyncio.wait_for(slow.recv(decode=False), 10)
                received += 1
        assert (slow.close_code, slow.close_reason) == (
            1008,
            "subscriber too slow: 8 messages dropped",
        )
        assert 0 < received < sent

        # The fast one is still served.
        await gateway.publish(publisher, "m/acme/c/temps", b"after", "text/plain", "http")
        assert await asyncio.wait_for(fast.recv(), 5) == "after"
