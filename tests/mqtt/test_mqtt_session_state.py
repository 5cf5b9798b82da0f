"""The sans-I/O layers without sockets: session state and delivery rules with a fake outlet,
and the message <-> PUBLISH mapping (encode once, write many)."""

from __future__ import annotations

from adapters.mqtt.codec import (
    EMPTY_PROPERTIES,
    Decoder,
    Properties,
    Publish,
    PubRel,
)
from adapters.mqtt.publish import PublishCache, inbound, outbound_properties
from adapters.mqtt.session import Session, Sub
from core.identity import Identity
from core.message import Message, now_ns


class FakeOutlet:
    def __init__(self, level: int = 4, max_packet_size: int = 1 << 20) -> None:
        self.level = level
        self.congested = False
        self.max_packet_size = max_packet_size
        self.decoder = Decoder(protocol_level=level)
        self.delivered = 0

    def send(self, data: bytes) -> None:
        self.decoder.feed(data)

    def deliver(self, data: bytes) -> None:
        self.delivered += 1
        self.decoder.feed(data)

    def packets(self) -> list[object]:
        return list(self.decoder)


def message(payload: bytes = b"x", metadata: dict[str, str] | None = None) -> Message:
    return Message(
        "acme", "temps", "a", "pub", "mqtt", "application/octet-stream", payload, now_ns(), metadata
    )


def session(**kw: int) -> Session:
    return Session(Identity("c1", "acme", "dev"), "dev", PublishCache(), **kw)


def sub(s: Session, qos: int = 1, **kw: object) -> Sub:
    return Sub(s, "m/acme/c/temps/#", "m/acme/c/temps/#", None, qos, **kw)  # type: ignore[arg-type]


def test_qos0_offline_is_not_kept() -> None:
    s = session()
    assert s.offer(sub(s, 0), message(), False)
    assert s.queued == 0


def test_qos1_window_queue_and_drops() -> None:
    s = session(max_inflight=2, max_queued=2)
    out = FakeOutlet()
    s.attach(out)
    sb = sub(s)
    results = [s.offer(sb, message(b"%d" % i), False) for i in range(5)]
    assert results == [True, True, True, True, False]  # the fifth finds the queue full
    sent = out.packets()
    assert [p.payload for p in sent] == [b"0", b"1"]  # type: ignore[attr-defined]
    assert s.queued == 2 and s.dropped == 1
    assert s.puback(sent[0].packet_id)  # type: ignore[attr-defined]
    s.pump()
    assert [p.payload for p in out.packets()] == [b"2"]  # type: ignore[attr-defined]
    assert not s.puback(sent[0].packet_id)  # twice: unknown


def test_congested_outlet_drops_qos0_and_queues_qos1() -> None:
    s = session()
    out = FakeOutlet()
    s.attach(out)
    out.congested = True
    assert not s.offer(sub(s, 0), message(), False)
    assert s.offer(sub(s, 1), message(), False)
    assert s.queued == 1


def test_offline_overflow_is_counted_not_refused() -> None:
    s = session(max_queued=1)
    sb = sub(s)
    assert s.offer(sb, message(), False)
    assert s.offer(sb, message(), False)  # no slow-subscriber cut-off for an absent client
    assert s.dropped == 1


def test_resume_resends_with_dup_and_pubrel() -> None:
    s = session()
    out = FakeOutlet()
    s.attach(out)
    s.offer(sub(s, 1), message(b"one"), False)
    s.offer(sub(s, 2), message(b"two"), False)
    one, two = out.packets()
    assert s.pubrec(two.packet_id)  # type: ignore[attr-defined]
    s.detach()
    again = FakeOutlet(level=5)  # the session may resume at another protocol level
    s.attach(again)
    redo = again.packets()
    assert redo[0] == Publish("m/acme/c/temps/a", b"one", 1, False, True, one.packet_id)  # type: ignore[attr-defined]
    assert redo[1] == PubRel(two.packet_id)  # type: ignore[attr-defined]
    assert s.pubcomp(two.packet_id)  # type: ignore[attr-defined]


def test_packet_ids_skip_those_in_flight() -> None:
    s = session(max_inflight=3)
    out = FakeOutlet()
    s.attach(out)
    s._next_id = 65535
    sb = sub(s)
    for _ in range(3):
        s.offer(sb, message(), False)
    assert [p.packet_id for p in out.packets()] == [65535, 1, 2]  # type: ignore[attr-defined]
    s.puback(1)
    s._next_id = 65535
    s.offer(sb, message(), False)
    assert [p.packet_id for p in out.packets()] == [1]  # type: ignore[attr-defined]


def test_qos2_received_and_released() -> None:
    s = session()
    assert s.received(7)
    assert s.is_duplicate(7) and not s.received(7)
    assert s.released(7) and not s.released(7)


def test_no_local_and_minimum_qos() -> None:
    s = session()
    out = FakeOutlet()
    s.attach(out)
    mine = message(metadata={"mqtt:client": s.token, "mqtt:qos": "0"})
    assert s.offer(sub(s, 1, no_local=True), mine, False)
    assert out.packets() == []
    s.offer(sub(s, 1), mine, False)
    (got,) = out.packets()
    assert got.qos == 0  # type: ignore[attr-defined]


def test_no_local_tokens_are_random() -> None:
    """Not a counter that another client could walk through: 128 random bits per session."""
    tokens = [session().token for _ in range(100)]
    assert len(set(tokens)) == 100
    assert all(len(t) >= 22 and not t.isdigit() for t in tokens)


def test_encode_once_for_a_fan_out() -> None:
    cache = PublishCache()
    m = message()
    info = cache.info(m)
    first = cache.template(info, 4, 0, False)
    assert cache.template(cache.info(m), 4, 0, False) is first  # same bytes object reused
    assert cache.template(info, 5, 0, False) is not first
    assert cache.info(message()) is not info  # another message, another cache entry


def test_inbound_mapping() -> None:
    assert inbound(EMPTY_PROPERTIES, 0, False, "application/octet-stream") == (
        "application/octet-stream",
        {"mqtt:qos": "0"},
    )
    assert inbound(EMPTY_PROPERTIES, 2, False, "text/plain") == ("text/plain", None)
    props = Properties(
        content_type="Application/SenML+JSON",
        correlation_data=b"\x01",
        user_properties=(("k", "v"), ("mqtt:qos", "spoof")),
    )
    content_type, metadata = inbound(props, 1, True, "x")
    assert content_type == "application/senml+json"
    assert metadata == {
        "k": "v",
        "mqtt:qos": "1",
        "mqtt:correlation_data": "AQ==",
        "mqtt:retain": "1",
    }


def test_inbound_drops_reserved_user_properties() -> None:
    """User properties named with the reserved prefix never become metadata, whether or not
    the adapter sets that key itself; other names pass as they are."""
    props = Properties(
        user_properties=(
            ("mqtt:qos", "0"),
            ("mqtt:client", "7"),
            ("mqtt:response_topic", "m/a/c/+"),
            ("mqtt:whatever", "x"),
            ("k", "v"),
            ("k", "w"),  # repeated: the last wins, as before
        )
    )
    assert inbound(props, 2, False, "x") == ("x", {"k": "w"})
    assert inbound(props, 2, False, "x", client="tok") == ("x", {"k": "w", "mqtt:client": "tok"})
    only_reserved = Properties(user_properties=(("mqtt:qos", "0"),))
    assert inbound(only_reserved, 2, False, "x") == ("x", None)
    # the QoS 0 / QoS 1 fast path still hands out the shared dicts
    assert (
        inbound(EMPTY_PROPERTIES, 0, False, "x")[1] is inbound(EMPTY_PROPERTIES, 0, False, "y")[1]
    )


def test_outbound_properties_only_what_was_set() -> None:
    assert outbound_properties(message(), None) is EMPTY_PROPERTIES
    m = message(metadata={"mqtt:qos": "1", "site": "lab", "mqtt:response_topic": "m/a/c/b"})
    props = outbound_properties(m, None, 3)
    assert props == Properties(
        response_topic="m/a/c/b", subscription_identifiers=(3,), user_properties=(("site", "lab"),)
    )
