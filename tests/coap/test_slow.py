"""A slow observer never slows the publisher: what it cannot take waits in the subscription's
bounded queue, overflow is counted, and past the limit it is cut off with 5.03."""

from __future__ import annotations

import asyncio

import aiocoap
import pytest
from aiocoap.numbers.codes import Code

from adapters.coap.observe import BACKLOG_LIMIT
from core.credentials import Credentials
from core.limits import Limits
from tests.coap.conftest import RawClient, eventually, metric, observers
from tests.conftest import World

QUEUE, MAX_DROPPED = 4, 8


@pytest.fixture
def limits() -> Limits:
    return Limits(queue_size=QUEUE, max_dropped=MAX_DROPPED)


async def test_observer_that_does_not_ack(world: World, raw: RawClient) -> None:
    query = (f"auth={world.subscriber.secret}",)
    raw.send(aiocoap.Message(code=Code.GET, uri_path=("m", "acme", "c", "temps"),
                             uri_query=query, observe=0))  # fmt: skip
    await raw.recv()
    ident = await world.gateway.authenticate(Credentials(world.publisher.secret))
    total = 60
    for i in range(total):  # every publish returns at once, whatever the observer does
        await world.gateway.publish(ident, "m/acme/c/temps", b"%d" % i, "text/plain", "http")
        await asyncio.sleep(0)  # as between two requests: the observation gets its turn
    await eventually(lambda: observers(world) == 0, "the slow observer was cut off")
    dropped = metric(world, "conduit_dropped_total", protocol="coap")
    assert dropped >= MAX_DROPPED
    # Now the observer catches up: what was handed to aiocoap arrives in order, then the end.
    payloads = []
    while True:
        note = await raw.recv()
        if note.mtype == aiocoap.CON:
            raw.ack(note)
        if note.code != Code.CONTENT:
            break
        if not payloads or payloads[-1] != note.payload:  # a retransmission repeats one
            payloads.append(note.payload)
    assert note.code == Code.SERVICE_UNAVAILABLE
    assert note.payload == b"subscriber too slow: %d messages dropped" % MAX_DROPPED
    # One in flight and BACKLOG_LIMIT waiting in aiocoap; the queued rest went with the cut.
    assert payloads == [b"%d" % i for i in range(1 + BACKLOG_LIMIT)]
