"""Prometheus metrics of one gateway: connections, messages, refusals, drops, latency.

Each gateway has its own registry (tests run several in one process). Label children are bound
once per protocol so the per-message cost is one increment.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from core.message import PROTOCOLS

CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.connections = Gauge(
            "conduit_connections",
            "Open client connections and subscriptions",
            ["protocol"],
            registry=r,
        )
        self.requests = Counter(
            "conduit_requests", "Requests and connection attempts", ["protocol"], registry=r
        )
        self.messages_in = Counter(
            "conduit_messages_in", "Messages accepted and published", ["protocol"], registry=r
        )
        self.messages_out = Counter(
            "conduit_messages_out", "Messages delivered to subscribers", ["protocol"], registry=r
        )
        self.refusals = Counter(
            "conduit_refusals", "Requests refused, by reason", ["protocol", "reason"], registry=r
        )
        self.dropped = Counter(
            "conduit_dropped",
            "Messages a slow subscriber could not take (bounded queue full)",
            ["protocol"],
            registry=r,
        )
        self.publish_seconds = Histogram(
            "conduit_publish_seconds",
            "Time from receiving a message to handing it to the bus",
            ["protocol"],
            buckets=(0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.25, 1),
            registry=r,
        )
        # Bound children: one dict lookup per message instead of a labels() call.
        self.in_ = {p: self.messages_in.labels(p) for p in PROTOCOLS}
        self.out = {p: self.messages_out.labels(p) for p in PROTOCOLS}
        self.latency = {p: self.publish_seconds.labels(p) for p in PROTOCOLS}
        self.drops = {p: self.dropped.labels(p) for p in PROTOCOLS}
        self.conns = {p: self.connections.labels(p) for p in PROTOCOLS}
        self.reqs = {p: self.requests.labels(p) for p in PROTOCOLS}

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
