"""What every Bus must do (core.bus.Bus), whatever carries the messages."""

from __future__ import annotations

import asyncio

import pytest

from core.bus import Bus, Change
from core.errors import UnavailableError
from tests.buses import message, subscribed, taken


async def _settle() -> None:
    """Let a bus that delivers on another task or connection do so (the local one is done)."""
    for _ in range(20):
        await asyncio.sleep(0.01)


async def test_delivery_follows_the_filters(bus: Bus) -> None:
    everything = await subscribed(bus, "m/acme/c/temps/#")
    one_level = await subscribed(bus, "m/acme/c/temps/+")
    exact = await subscribed(bus, "m/acme/c/temps/a/b")
    bare = await subscribed(bus, "m/acme/c/temps")
    other = await subscribed(bus, "m/acme/c/other/#")
    for subtopic, payload in (("", b"0"), ("a", b"1"), ("a/b", b"2"), ("c/d/e", b"3")):
        await bus.publish(message(subtopic, payload))
    await _settle()
    assert taken(everything) == [b"0", b"1", b"2", b"3"]
    assert taken(one_level) == [b"1"]
    assert taken(exact) == [b"2"]
    assert taken(bare) == [b"0"]
    assert taken(other) == []


async def test_unsubscribed_gets_nothing_more(bus: Bus) -> None:
    sub = await subscribed(bus, "m/acme/c/temps/#")
    await bus.publish(message("a", b"1"))
    await _settle()
    await bus.unsubscribe(sub)
    await bus.publish(message("a", b"2"))
    await _settle()
    assert taken(sub) == [b"1"]


async def test_a_shared_subscription_delivers_each_message_once(bus: Bus) -> None:
    members = [await subscribed(bus, "m/acme/c/temps/#", group="g") for _ in range(3)]
    alone = await subscribed(bus, "m/acme/c/temps/#")
    for i in range(30):
        await bus.publish(message("a", b"%d" % i))
    await _settle()
    got = [taken(m) for m in members]
    assert sorted(p for payloads in got for p in payloads) == sorted(b"%d" % i for i in range(30))
    assert all(payloads for payloads in got)  # spread over the members
    assert len(taken(alone)) == 30


async def test_publish_nowait_publishes_all_or_nothing(bus: Bus) -> None:
    sub = await subscribed(bus, "m/acme/c/temps/#")
    done = bus.publish_nowait(message("a", b"1"))
    await _settle()
    assert taken(sub) == ([b"1"] if done else [])


async def test_last_is_the_latest_of_exactly_the_topic(bus: Bus) -> None:
    await bus.publish(message("a", b"1"))
    await bus.publish(message("a", b"2"))
    await bus.publish(message("a/b", b"3"))
    await _settle()
    last = await bus.last("acme", "temps", "a")
    assert last is not None and last.payload == b"2"
    assert await bus.last("acme", "temps", "zzz") is None


async def test_changes_reach_this_node_before_announce_returns(bus: Bus) -> None:
    heard: list[Change] = []

    async def handler(change: Change) -> None:
        heard.append(change)

    bus.on_change(handler)
    change = Change("client", "acme", "id-1")
    await bus.announce(change)
    assert heard == [change]


async def test_a_closed_bus_is_unavailable(bus: Bus) -> None:
    await bus.ping()
    await bus.close()
    with pytest.raises(UnavailableError):
        await bus.ping()
    with pytest.raises(UnavailableError):
        await bus.publish(message("a"))
