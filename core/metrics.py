"""Prometheus metrics of one gateway: connections, messages, refusals, drops, latency.

The per-message path only adds to plain Python numbers; the Prometheus families are built when
``/metrics`` is scraped, by this module's collector (prometheus_client's documented extension
point). prometheus_client's own Counter and Histogram take a lock on every update: on an HTTP
publish that was 32k of 376k instructions (callgrind, docs/performance.md). Every update happens
on the event loop's thread, so no lock is needed. Each gateway has its own registry (tests run
several in one process).
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from core.message import PROTOCOLS

CONTENT_TYPE = CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.25, 1.0)


class Count:
    """A counter or gauge value."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value: float = 0

    def inc(self, amount: float = 1) -> None:
        self.value += amount

    def dec(self, amount: float = 1) -> None:
        self.value -= amount


class Latency:
    """A histogram of seconds with fixed buckets."""

    __slots__ = ("counts", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(LATENCY_BUCKETS) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.sum += seconds


class Refusals:
    """Refusal counts by (protocol, reason), created on first use."""

    def __init__(self) -> None:
        self.counts: dict[tuple[str, str], Count] = {}

    def labels(self, protocol: str, reason: str) -> Count:
        key = (protocol, reason)
        count = self.counts.get(key)
        if count is None:
            count = self.counts[key] = Count()
        return count


class Metrics:
    def __init__(self) -> None:
        self.reqs = {p: Count() for p in PROTOCOLS}
        self.in_ = {p: Count() for p in PROTOCOLS}
        self.out = {p: Count() for p in PROTOCOLS}
        self.drops = {p: Count() for p in PROTOCOLS}
        self.conns = {p: Count() for p in PROTOCOLS}
        self.latency = {p: Latency() for p in PROTOCOLS}
        self.refusals = Refusals()
        self.limits: dict[str, Count] = {}
        self.registry = CollectorRegistry()
        self.registry.register(self)

    def limit(self, name: str) -> None:
        """Count one time the limit ``name`` (its setting) was reached."""
        count = self.limits.get(name)
        if count is None:
            count = self.limits[name] = Count()
        count.inc()

    def collect(self) -> Iterator[Metric]:
        """The Prometheus families, built at scrape time."""
        counters = (
            ("conduit_requests", "Requests and connection attempts", self.reqs),
            ("conduit_messages_in", "Messages accepted and published", self.in_),
            ("conduit_messages_out", "Messages delivered to subscribers", self.out),
            (
                "conduit_dropped",
                "Messages a slow subscriber could not take (bounded queue full)",
                self.drops,
            ),
        )
        for name, text, values in counters:
            family = CounterMetricFamily(name, text, labels=["protocol"])
            for protocol, count in values.items():
                family.add_metric([protocol], count.value)
            yield family
        refusals = CounterMetricFamily(
            "conduit_refusals", "Requests refused, by reason", labels=["protocol", "reason"]
        )
        for (protocol, reason), count in sorted(self.refusals.counts.items()):
            refusals.add_metric([protocol, reason], count.value)
        yield refusals
        limits = CounterMetricFamily(
            "conduit_limit_reached",
            "Times a limit on what one client or session may hold was reached, by setting",
            labels=["limit"],
        )
        for limit, count in sorted(self.limits.items()):
            limits.add_metric([limit], count.value)
        yield limits
        gauge = GaugeMetricFamily(
            "conduit_connections", "Open client connections and subscriptions",
            labels=["protocol"],
        )
        for protocol, count in self.conns.items():
            gauge.add_metric([protocol], count.value)
        yield gauge
        histogram = HistogramMetricFamily(
            "conduit_publish_seconds",
            "Time from receiving a message to handing it to the bus",
            labels=["protocol"],
        )
        for protocol, latency in self.latency.items():
            cumulative, buckets = 0, []
            for bound, n in zip((*LATENCY_BUCKETS, float("inf")), latency.counts, strict=True):
                cumulative += n
                buckets.append((repr(bound) if bound != float("inf") else "+Inf", cumulative))
            histogram.add_metric([protocol], buckets, latency.sum)
        yield histogram

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
