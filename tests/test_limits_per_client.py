"""Limits on what one client or session may hold, each reached once and answered with the error
table's quota code (MQTT 5 0x97, MQTT 3.1.1 its nearest code), counted in
``conduit_limit_reached_total{limit=...}`` under the setting's name: subscriptions per client
(all protocols), MQTT subscriptions per session, MQTT sessions per client, the payload bytes
an offline session queues, and the payload bytes of the bus's latest-message cache."""

from __future__ import annotations

import time

import pytest

from adapters.mqtt.codec import ConnAck, Properties, Subscribe, Subscription
from adapters.mqtt.codec.reasons import ReasonCode
from adapters.mqtt.publish import PublishCache
from adapters.mqtt.session import Session, Sub
from core.bus.local import LocalBus
from core.credentials import Credentials
from core.errors import QuotaError
from core.limits import Limits
from core.message import Message
from tests.conftest import World
from tests.mqtt.test_channel import Side, connected

TOPIC = "m/acme/c/temps"


def reached(world: World, limit: str) -> float:
    value = world.gateway.metrics.registry.get_sample_value(
        "conduit_limit_reached_total", {"limit": limit}
    )
    return value or 0.0


def message(subtopic: str, payload: bytes) -> Message:
    return Message("acme", "temps", subtopic, "x", "http", "text/plain", payload, time.time_ns())


class TestSubscriptionsPerClient:
    @pytest.fixture
    def limits(self) -> Limits:
        return Limits(max_subscriptions=2)

    async def test_the_third_is_refused_until_one_ends(self, world: World) -> None:
        gw = world.gateway
        who = await gw.authenticate(Credentials(world.subscriber.secret))
        first = await gw.subscribe(who, f"{TOPIC}/a", "http")
        await gw.subscribe(who, f"{TOPIC}/b", "ws")
        with pytest.raises(QuotaError) as info:
            await gw.subscribe(who, f"{TOPIC}/c", "coap")
        assert info.value.limit == "max_subscriptions"
        assert info.value.condition.answer.http == 429
        assert reached(world, "max_subscriptions") == 1
        other = await gw.authenticate(Credentials(world.both.secret))
        await gw.subscribe(other, f"{TOPIC}/c", "http")  # another client's own count
        await gw.unsubscribe(first)
        await gw.subscribe(who, f"{TOPIC}/c", "coap")

    @pytest.mark.parametrize("level", [4, 5])
    async def test_over_mqtt_the_filter_gets_the_quota_code(
        self, world: World, level: int
    ) -> None:
        side = Side(world)
        client = await connected(side, world.subscriber, "dev", level)
        filters = [Subscription(f"{TOPIC}/{x}", 1) for x in "abc"]
        (ack,) = await client.handle(Subscribe(1, filters, Properties()))
        assert ack.reason_codes == [1, 1, 0x97 if level == 5 else 0x80]  # type: ignore[attr-defined]
        assert reached(world, "max_subscriptions") == 1


@pytest.mark.parametrize("level", [4, 5])
async def test_mqtt_subscriptions_per_session(world: World, level: int) -> None:
    side = Side(world, max_subscriptions=2)
    client = await connected(side, world.subscriber, "dev", level)
    filters = [Subscription(f"{TOPIC}/{x}", 0) for x in "abc"]
    (ack,) = await client.handle(Subscribe(1, filters, Properties()))
    assert ack.reason_codes == [0, 0, 0x97 if level == 5 else 0x80]  # type: ignore[attr-defined]
    assert reached(world, "mqtt_max_subscriptions") == 1
    # Re-subscribing to a filter the session has is no new subscription.
    (ack,) = await client.handle(Subscribe(2, filters[:1], Properties()))
    assert ack.reason_codes == [0]  # type: ignore[attr-defined]


@pytest.mark.parametrize("level", [4, 5])
async def test_mqtt_sessions_per_client(world: World, level: int) -> None:
    side = Side(world, max_sessions=1)
    first = await connected(side, world.both, "one", level)
    refused = side.client()
    ack: ConnAck = await refused.connect(world.both, "two", level)
    assert ack.reason_code == (0x97 if level == 5 else 5)  # 3.1.1: not authorized
    assert refused.closed_with == ReasonCode.QUOTA_EXCEEDED
    assert reached(world, "mqtt_max_sessions") == 1
    # Taking over the session it holds is fine.
    again = side.client()
    assert (await again.connect(world.both, "one", level)).reason_code == 0
    assert first.closed_with is not None


async def test_queued_bytes_per_offline_session(world: World) -> None:
    gw = world.gateway
    who = await gw.authenticate(Credentials(world.subscriber.secret))
    session = Session(
        who, "dev", PublishCache(), max_queued_bytes=10, limit_reached=gw.metrics.limit
    )
    sub = Sub(session, f"{TOPIC}/#", f"{TOPIC}/#", None, 1)
    assert session.offer(sub, message("a", b"123456"), False)
    assert session.offer(sub, message("b", b"123456"), False)  # dropped: 12 bytes > 10
    assert session.queued == 1 and session.queued_bytes == 6 and session.dropped == 1
    assert reached(world, "mqtt_max_queued_bytes") == 1


async def test_latest_message_cache_bytes() -> None:
    bus = LocalBus(keep_last_bytes=10)
    await bus.start()
    for subtopic in ("a", "b", "c"):
        bus.publish_nowait(message(subtopic, b"123456"))
    assert await bus.last("acme", "temps", "a") is None
    assert await bus.last("acme", "temps", "b") is None
    assert (await bus.last("acme", "temps", "c")) is not None
    assert bus.last_bytes == 6
    bus.publish_nowait(message("c", b"1234"))  # replaces: counted once
    assert bus.last_bytes == 4
