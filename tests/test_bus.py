"""The in-process bus: routing with MQTT wildcard semantics, bounded queues, overflow."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.bus import Router, Subscription, SubscriptionClosed
from core.bus.local import LocalBus
from core.errors import UnavailableError
from core.message import Message, decode, encode, envelope, envelope_json
from core.topics import parse_filter


def msg(subtopic: str = "", channel: str = "temps", payload: bytes = b"x") -> Message:
    return Message("acme", channel, subtopic, "pub", "http", "text/plain", payload, 1)


async def started() -> LocalBus:
    bus = LocalBus()
    await bus.start()
    return bus


async def test_routes_to_matching_subscriptions_only() -> None:
    bus = await started()
    subs = {
        f: Subscription(parse_filter(f))
        for f in (
            "m/acme/c/temps",
            "m/acme/c/temps/#",
            "m/acme/c/temps/+",
            "m/acme/c/temps/a/b",
            "m/acme/c/other/#",
        )
    }
    for sub in subs.values():
        await bus.subscribe(sub)
    await bus.publish(msg("a/b"))
    got = {f for f, s in subs.items() if s.get_nowait() is not None}
    assert got == {"m/acme/c/temps/#", "m/acme/c/temps/a/b"}
    await bus.publish(msg(""))
    got = {f for f, s in subs.items() if s.get_nowait() is not None}
    assert got == {"m/acme/c/temps", "m/acme/c/temps/#"}


async def test_unsubscribe_stops_delivery() -> None:
    bus = await started()
    sub = Subscription(parse_filter("m/acme/c/temps/#"))
    await bus.subscribe(sub)
    await bus.unsubscribe(sub)
    await bus.publish(msg("a"))
    assert sub.get_nowait() is None


async def test_full_queue_drops_counts_and_never_blocks_publisher() -> None:
    bus = await started()
    drops: list[int] = []
    slow = Subscription(
        parse_filter("m/acme/c/temps/#"),
        maxsize=2,
        max_dropped=100,
        on_drop=lambda: drops.append(1),
    )
    fast = Subscription(parse_filter("m/acme/c/temps/#"), maxsize=100)
    await bus.subscribe(slow)
    await bus.subscribe(fast)
    for i in range(5):
        await bus.publish(msg(payload=str(i).encode()))
    assert slow.dropped == 3 and len(drops) == 3
    assert [slow.get_nowait().payload for _ in range(2)] == [b"0", b"1"]  # type: ignore[union-attr]
    assert fast.dropped == 0
    assert sum(1 for _ in range(5) if fast.get_nowait() is not None) == 5


async def test_too_slow_subscriber_is_closed_with_reason() -> None:
    bus = await started()
    closed: list[str] = []
    sub = Subscription(
        parse_filter("m/acme/c/temps"),
        maxsize=1,
        max_dropped=3,
        on_close=lambda s, reason: closed.append(reason),
    )
    await bus.subscribe(sub)
    for _ in range(4):
        await bus.publish(msg())
    assert closed == ["subscriber too slow: 3 messages dropped"]
    assert (await sub.get()).payload == b"x"  # what was queued is still delivered
    with pytest.raises(SubscriptionClosed, match="too slow"):
        await sub.get()


async def test_sink_takes_messages_and_reports_full() -> None:
    bus = await started()
    taken: list[Message] = []
    sub = Subscription(
        parse_filter("m/acme/c/temps"),
        max_dropped=10,
        sink=lambda m: (taken.append(m), len(taken) < 2)[1],
    )
    await bus.subscribe(sub)
    for _ in range(3):
        await bus.publish(msg())
    assert len(taken) == 3 and sub.dropped == 2  # the sink said full twice


async def test_get_waits_for_a_message() -> None:
    bus = await started()
    sub = Subscription(parse_filter("m/acme/c/temps"))
    await bus.subscribe(sub)
    waiter = asyncio.create_task(sub.get())
    await asyncio.sleep(0)
    await bus.publish(msg(payload=b"later"))
    assert (await asyncio.wait_for(waiter, 2)).payload == b"later"


async def test_shared_group_delivers_to_one_member_round_robin() -> None:
    bus = await started()
    members = [Subscription(parse_filter("m/acme/c/temps/#"), group="g") for _ in range(3)]
    plain = Subscription(parse_filter("m/acme/c/temps/#"))
    for s in [*members, plain]:
        await bus.subscribe(s)
    for _ in range(6):
        await bus.publish(msg("a"))
    counts = [sum(1 for _ in range(6) if s.get_nowait() is not None) for s in members]
    assert counts == [2, 2, 2]
    assert sum(1 for _ in range(6) if plain.get_nowait() is not None) == 6


async def test_last_message_per_topic_is_bounded() -> None:
    bus = LocalBus(keep_last=2)
    await bus.start()
    for sub in ("a", "b", "a", "c"):
        await bus.publish(msg(sub, payload=sub.encode()))
    assert await bus.last("acme", "temps", "b") is None  # oldest forgotten
    assert (await bus.last("acme", "temps", "a")).payload == b"a"  # type: ignore[union-attr]
    assert (await bus.last("acme", "temps", "c")).payload == b"c"  # type: ignore[union-attr]


async def test_closed_bus_is_unavailable() -> None:
    bus = await started()
    await bus.close()
    with pytest.raises(UnavailableError):
        await bus.publish(msg())
    with pytest.raises(UnavailableError):
        await bus.ping()


def test_envelope_round_trip_is_compact() -> None:
    m = Message(
        "acme", "temps", "a/b", "c1", "mqtt", "application/senml+json", b"[1]", 123, {"k": "v"}
    )
    data = encode(m)
    assert decode(data) == m
    assert len(data) < 80


@pytest.mark.parametrize(
    "message",
    [
        Message(
            "acme", "temps", "", "c1", "http", "application/senml+json", b'[{"n":"a","v":1}]', 1
        ),
        Message("acme", "temps", "a/b", "c2", "mqtt", "text/plain", 'ünï "q" \\ \n'.encode(), 2),
        Message("acme", "temps", "a", "c1", "ws", "application/octet-stream", b"\xff\x00", 3),
        Message("acme", "temps", "a", "c1", "mqtt", "application/json", b"{}", 4, {"k": "v"}),
        Message("acme", "temps", "a", "c1", "coap", "text/plain", b"", 5),
        Message(
            "acme",
            "temps",
            "",
            "c1",
            "http",
            "application/senml+json",
            b'[\r\n  {"n": "a\\nb",\n   "v": 1}\n]\n',
            6,
        ),
    ],
)
def test_envelope_json_is_the_envelope(message: Message) -> None:
    # Twice: the second call encodes with the head kept from the first.
    for _ in range(2):
        assert envelope_json(message) == msgspec.json.encode(envelope(message))
    later = msgspec.structs.replace(message, created=99, payload=b"later")
    if later.content_type == "application/senml+json":
        later = msgspec.structs.replace(later, payload=b'[{"n":"b","vs":"later"}]')
    assert envelope_json(later) == msgspec.json.encode(envelope(later))
    framed = envelope_json(message, b"data: ", b"\n\n")
    assert framed == b"data: " + envelope_json(message) + b"\n\n"
    assert b"\n" not in envelope_json(message)  # it fits on an SSE data: line


def test_envelope_embeds_a_senml_json_pack_as_json() -> None:
    pack = b'[{"bn":"dev:","n":"t","v":21.5},\n {"n":"h","vs":"a\\nb"}]'
    message = Message("acme", "temps", "", "c1", "http", "application/senml+json", pack, 1)
    decoded = json.loads(envelope_json(message))
    assert decoded["encoding"] == "json"
    assert decoded["payload"] == json.loads(pack)
    # The publisher's bytes as they are when they are on one line.
    one_line = b'[{"bn":"dev:","n":"t","v":21.50}]'
    message = msgspec.structs.replace(message, payload=one_line)
    assert envelope_json(message).endswith(b',"payload":' + one_line + b"}")


async def test_next_times_out_then_delivers_then_reports_close() -> None:
    bus = await started()
    sub = Subscription(parse_filter("m/acme/c/temps"))
    await bus.subscribe(sub)
    assert await sub.next(0.01) is None
    asyncio.get_running_loop().call_soon(lambda: sub.offer(msg(payload=b"soon")))
    got = await sub.next(5)
    assert got is not None and got.payload == b"soon"
    asyncio.get_running_loop().call_soon(sub.close, "bye")
    with pytest.raises(SubscriptionClosed, match="bye"):
        await sub.next(5)


# The router's index against the plain rule: random filters on one channel (and another),
# random topics, subscriptions added and removed in any order.
_LEVEL = st.sampled_from(["a", "b", "c"])
_FILTER_LEVEL = st.sampled_from(["a", "b", "+", "#"])


def _filter_text(levels: list[str], channel: str) -> str:
    if "#" in levels:
        levels = levels[: levels.index("#") + 1]
    return "/".join([f"m/acme/c/{channel}", *levels])


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(st.lists(_FILTER_LEVEL, max_size=4), st.sampled_from(["temps", "other"])),
        min_size=1,
        max_size=12,
    ),
    st.lists(st.integers(min_value=0, max_value=11), max_size=6),
    st.lists(st.lists(_LEVEL, max_size=4), min_size=1, max_size=8),
)
def test_router_index_is_the_plain_rule(
    filters: list[tuple[list[str], str]], removed: list[int], topics: list[list[str]]
) -> None:
    router = Router()
    subs = [Subscription(parse_filter(_filter_text(levels, ch))) for levels, ch in filters]
    for sub in subs:
        router.add(sub)
    gone = {i for i in removed if i < len(subs)}
    for i in gone:
        router.remove(subs[i])
    live = [s for i, s in enumerate(subs) if i not in gone]
    for levels in topics:
        message = Message("acme", "temps", "/".join(levels), "p", "http", "x", b"", 0, None)
        assert router.route(message) == sum(
            1 for s in live if s.filter.channel == "temps" and s.filter.matches(message.subtopic)
        )
        for sub in subs:
            got = sub.get_nowait() is not None
            wanted = sub in live and sub.filter.channel == "temps" and sub.filter.matches(
                message.subtopic
            )
            assert got == wanted, (str(sub.filter), message.subtopic)
    for sub in live:  # empty again: the channel's index is gone
        router.remove(sub)
    assert router._channels == {}


def test_a_sink_may_unsubscribe_while_the_message_is_routed() -> None:
    """A route in progress delivers to the subscriptions it started with."""
    router = Router()
    got: list[str] = []
    subs: list[Subscription] = []

    def sink(name: str) -> Callable[[Message], bool]:
        def take(message: Message) -> bool:
            got.append(name)
            for sub in subs:  # the first one to take it removes everyone
                router.remove(sub)
            return True

        return take

    for name in ("one", "two", "three"):
        subs.append(Subscription(parse_filter("m/acme/c/temps/#"), sink=sink(name)))
        router.add(subs[-1])
    message = Message("acme", "temps", "a", "p", "http", "x", b"", 0, None)
    assert router.route(message) == 3
    assert got == ["one", "two", "three"]
    assert router.route(message) == 0
