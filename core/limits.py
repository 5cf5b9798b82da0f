"""Limits that protect the gateway: sizes, queues, per-client publish rates, and what one
listener allows its connections."""

from __future__ import annotations

import time
from dataclasses import dataclass

from core.errors import RateLimitError


@dataclass(frozen=True, slots=True)
class Limits:
    max_payload: int = 256 * 1024  # bytes of one message
    queue_size: int = 1024  # messages a subscriber may have waiting
    max_dropped: int = 1000  # consecutive drops before a slow subscriber is cut off
    rate: float = 0.0  # messages per second per client; 0 means unlimited
    burst: int = 100  # messages a client may send at once above the rate
    max_subscriptions: int = 10_000  # open subscriptions of one client, all protocols; 0: any


@dataclass(frozen=True, slots=True)
class ListenerLimits:
    """What one HTTP or WebSocket listener (and the management API) allows a connection.

    Every connection is unauthenticated until its request head has arrived, so each of these
    bounds what a stranger can hold: a slot in ``max_connections`` and a file descriptor.
    """

    header_timeout: float = 10.0  # seconds from connecting (or the first byte of a request
    # on a kept-alive connection) to a complete request head
    body_timeout: float = 30.0  # seconds a request body may take to arrive
    idle_timeout: float = 60.0  # seconds a kept-alive connection may wait for its next request
    max_connections: int = 10_000  # open connections; more are refused at once (503)


class RateLimiter:
    """A token bucket per client id, for a positive ``rate`` (the gateway builds none when
    no rate is set)."""

    def __init__(self, rate: float, burst: int, refusal: str | None = None) -> None:
        self.rate = rate
        self.burst = max(burst, 1)
        self.refusal = refusal or f"more than {rate:g} messages per second"
        self._buckets: dict[str, tuple[float, float]] = {}

    def check(self, client_id: str) -> None:
        now = time.monotonic()
        tokens, last = self._buckets.get(client_id, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - last) * self.rate)
        if tokens < 1.0:
            self._buckets[client_id] = (tokens, now)
            error = RateLimitError(self.refusal)
            error.retry_after = (1.0 - tokens) / self.rate
            raise error
        self._buckets[client_id] = (tokens - 1.0, now)
        if len(self._buckets) > 100_000:
            self._forget(now)

    def _forget(self, now: float) -> None:
        # Buckets full again carry no state worth keeping.
        full = [
            k
            for k, (t, last) in self._buckets.items()
            if t + (now - last) * self.rate >= self.burst
        ]
        for k in full:
            del self._buckets[k]
