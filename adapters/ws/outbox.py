"""The bounded send queue of one WebSocket connection.

The bus hands each message to :meth:`Outbox.offer` synchronously (the subscription's sink): the
frame, encoded once for all subscribers, joins the connection's queue, and the queue is written
to the transport at the end of the event-loop turn in one write. A publisher's burst (websockets
hands over every frame that arrived in one read without yielding) thus costs each subscriber one
system call, not one per message.

While the peer reads too slowly, the transport's buffer passes its high-water mark
(``write_limit``) and the queue holds the frames until the transport drains
(:meth:`Outbox.flush`, called again from the connection's ``resume_writing``). The queue holds at
most ``limit`` messages: a full queue refuses the message, the subscription counts the loss and,
past ``max_dropped`` losses in a row, closes itself, which the adapter turns into a close 1008
with the reason. One slow browser therefore costs the others nothing: the publisher never waits.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable
from typing import TYPE_CHECKING

from websockets.protocol import OPEN

from core.message import Message

if TYPE_CHECKING:
    from adapters.ws.adapter import WSConnection

CHUNK = 64 * 1024  # bytes joined into one write; bounds the copy when a long queue drains


class Outbox:
    __slots__ = ("_connection", "_count", "_encode", "_loop", "_queue", "_scheduled", "limit")

    def __init__(
        self,
        connection: WSConnection,
        encode: Callable[[Message], bytes],
        limit: int,
        count: Callable[[int], None],
    ) -> None:
        self._connection = connection
        self._encode = encode
        self._count = count
        self._loop = asyncio.get_running_loop()
        # Made when a message comes and dropped once written: an idle subscriber holds none.
        self._queue: collections.deque[bytes] | None = None
        self._scheduled = False
        self.limit = limit

    def __len__(self) -> int:
        return len(self._queue) if self._queue is not None else 0

    def offer(self, message: Message) -> bool:
        """Queue one message for this turn's write; False when the queue is full (a loss)."""
        conn = self._connection
        if conn.ws.state is not OPEN:
            return True  # closing: the subscription goes with the connection, nothing to count
        queue = self._queue
        if queue is None:
            queue = self._queue = collections.deque()
        elif len(queue) >= self.limit:
            return False
        queue.append(self._encode(message))
        if not self._scheduled and not conn.paused:
            self._scheduled = True
            self._loop.call_soon(self.flush)
        return True

    def flush(self) -> None:
        """Write the queue while the transport accepts more."""
        self._scheduled = False
        conn = self._connection
        queue = self._queue
        if queue is None:
            return
        if conn.ws.state is not OPEN:
            self._queue = None
            return
        written = 0
        while queue and not conn.paused:
            if len(queue) == 1:
                conn.transport.write(queue.popleft())
                written += 1
                break
            chunk = [queue.popleft()]
            size = len(chunk[0])
            while queue and size < CHUNK:
                frame = queue.popleft()
                chunk.append(frame)
                size += len(frame)
            conn.transport.write(b"".join(chunk))
            written += len(chunk)
        if not queue:
            self._queue = None
        if written:
            self._count(written)

    def clear(self) -> None:
        self._queue = None
