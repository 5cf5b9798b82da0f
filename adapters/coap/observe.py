"""CoAP Observe (RFC 7641): one :class:`Observation` per registering GET, fed by a gateway
subscription, and the block-wise transfer (RFC 7959 section 2.6) of notifications that do not fit
one block (:class:`Transfers`).

Every message on the observed topic or filter becomes one notification, in order, each with the
message's Content-Format and a larger Observe number than the one before (one adapter-wide
24-bit counter, so numbers keep increasing across a re-registration too). Notifications are
confirmable whatever the registration was: the client's ACK paces them (NSTART = 1 per client
address) and its RST ends the observation (aiocoap cancels the render task; the ``finally``
unsubscribes). A client that vanishes stops ACKing; aiocoap gives up after its retransmissions
and ends the observation the same way.

Back-pressure. aiocoap queues confirmable messages to a busy client in an unbounded per-address
backlog. An observation hands a notification to aiocoap only while that backlog is short
(:data:`BACKLOG_LIMIT`), so what waits is in the gateway subscription's bounded queue, where an
overflow is counted and a subscriber too slow for too long is cut off (DESIGN.md, "Delivery").
aiocoap has no public API for the backlog length; :class:`Backlog` reads it defensively and
degrades to no back-pressure if aiocoap's internals change.

Large notifications. A notification larger than the client's block size goes out as its first
block, with an ETag and Size2; the client fetches the other blocks with plain GETs carrying
Block2, answered from :class:`Transfers`. The next notification waits until the last block was
fetched (or :data:`TRANSFER_TIMEOUT`), so a transfer never sees its representation change.

Encode once: a message's payload bytes and Content-Format are resolved once and shared by every
observer's notification; the datagram itself differs per observer (token, message id, Observe
number), so aiocoap encodes it per observer.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass, field
from typing import Any

import aiocoap
from aiocoap.numbers.codes import Code
from aiocoap.numbers.optionnumbers import OptionNumber
from aiocoap.pipe import Pipe

from adapters.coap.formats import content_format
from core.bus import Subscription, SubscriptionClosed
from core.gateway import CERTIFICATE_REVOKED, EXPIRED, REVOKED, SUBJECT_REVOKED, Gateway
from core.message import Message

# The reason an observation over DTLS ends with when its client's key is revoked or replaced,
# or the client disabled.
DTLS_KEY_REVOKED = "DTLS key revoked or replaced, or client disabled"

# The last notification of an observation the server ends, by the reason it ends.
_ENDINGS = {
    REVOKED: Code.FORBIDDEN,
    EXPIRED: Code.UNAUTHORIZED,
    CERTIFICATE_REVOKED: Code.UNAUTHORIZED,
    SUBJECT_REVOKED: Code.UNAUTHORIZED,
    DTLS_KEY_REVOKED: Code.UNAUTHORIZED,
}

log = logging.getLogger("conduit.coap")

BACKLOG_LIMIT = 8  # notifications aiocoap may hold for one client address before we wait
TRANSFER_TIMEOUT = 10.0  # seconds a client has to fetch the blocks of one notification
MAX_SZX = 6  # 1024-byte blocks: the largest regular block size (RFC 7959, BERT is TCP only)

# Ask aiocoap for confirmable notifications (shared: aiocoap only reads it).
_RELIABLE = aiocoap.Reliable()
# Options that differ between the blocks of one transfer, or between registration and fetch.
_BLOCK_OPTIONS = (OptionNumber.BLOCK1, OptionNumber.BLOCK2, OptionNumber.OBSERVE)


def block_key(request: aiocoap.Message) -> Hashable:
    """What the block requests of one transfer share: the client's address and the request's
    cache key without the block and observe options (so it includes path and query)."""
    return (request.remote.blockwise_key, request.get_cache_key(_BLOCK_OPTIONS))


def block_exponent(request: aiocoap.Message) -> int:
    """The block size exponent to answer ``request`` with: the client's wish, if smaller."""
    szx = min(MAX_SZX, int(request.remote.maximum_block_size_exp))
    if request.opt.block2 is not None:
        szx = min(szx, int(request.opt.block2.size_exponent))
    return szx


class Backlog:
    """How many messages aiocoap holds back for a client address (see the module docstring)."""

    def __init__(self, *contexts: aiocoap.Context) -> None:
        self._backlogs: list[dict[Any, list[Any]]] = []  # one per context (CoAP, CoAP over DTLS)
        for context in contexts:
            for interface in context.request_interfaces:
                token_interface = getattr(interface, "token_interface", None)
                backlogs = getattr(token_interface, "_backlogs", None)
                if isinstance(backlogs, dict):
                    self._backlogs.append(backlogs)
                    break
            else:
                log.warning("aiocoap internals changed: CoAP notifications get no back-pressure")

    def __call__(self, remote: Any) -> int:
        for backlogs in self._backlogs:
            held = backlogs.get(remote)
            if held:
                return len(held)
        return 0


@dataclass(eq=False)
class Transfer:
    """One large representation being fetched block by block."""

    payload: bytes
    content_format: int | None
    etag: bytes
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def block(self, number: int, szx: int, observe: int | None = None) -> aiocoap.Message:
        size = 1 << (szx + 4)
        start = number * size
        if start >= len(self.payload):
            return aiocoap.Message(
                code=Code.BAD_REQUEST,
                payload=f"block {number} is past the end of the representation".encode(),
            )
        end = start + size
        more = end < len(self.payload)
        response = aiocoap.Message(
            code=Code.CONTENT,
            payload=self.payload[start:end],
            block2=(number, more, szx),
            etag=self.etag,
        )
        if self.content_format is not None:
            response.opt.content_format = self.content_format
        if number == 0:
            response.opt.size2 = len(self.payload)
        if observe is not None:
            response.opt.observe = observe
        if not more:
            self.done.set()
        return response


class Transfers:
    """The block-wise notifications in progress, by :func:`block_key` of their observation."""

    def __init__(self) -> None:
        self._by_key: dict[Hashable, Transfer] = {}

    def serve(self, request: aiocoap.Message) -> aiocoap.Message | None:
        """Answer a GET for block N > 0 of a notification, or None if it is not about one."""
        key = block_key(request)
        transfer = self._by_key.get(key)
        if transfer is None:
            return None
        block2 = request.opt.block2
        response = transfer.block(block2.block_number, min(block2.size_exponent, MAX_SZX))
        if transfer.done.is_set():
            self._by_key.pop(key, None)
        return response

    async def run(self, key: Hashable, transfer: Transfer, send: Callable[[], None]) -> None:
        """Offer ``transfer`` under ``key`` (after any earlier one there), call ``send`` to put
        its first block on the wire, and wait until the client has fetched the last block."""
        while (other := self._by_key.get(key)) is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(other.done.wait(), TRANSFER_TIMEOUT)
            if self._by_key.get(key) is other:
                del self._by_key[key]
        self._by_key[key] = transfer
        try:
            send()
            await asyncio.wait_for(transfer.done.wait(), TRANSFER_TIMEOUT)
        except TimeoutError:
            log.info("client did not fetch all blocks of a notification in time")
        finally:
            if self._by_key.get(key) is transfer:
                del self._by_key[key]


class Observation:
    """One observer: sends the registration's answer, then a notification per message."""

    def __init__(
        self,
        gateway: Gateway,
        pipe: Pipe,
        sub: Subscription,
        *,
        sequence: Iterator[int],
        transfers: Transfers,
        backlog: Backlog,
    ) -> None:
        self.gateway = gateway
        self.pipe = pipe
        self.sub = sub
        self._sequence = sequence
        self._transfers = transfers
        self._backlog = backlog
        request = pipe.request
        self._remote = request.remote
        self._key = block_key(request)
        self._szx = block_exponent(request)

    async def run(self, current: Message | None) -> None:
        """Answer the registration with ``current`` (the topic's latest message, or an empty
        2.05), then notify until the subscription or the observation ends."""
        sub = self.sub
        try:
            await self._send(current, first=True)
            while True:
                message = sub.get_nowait()
                if message is None:
                    message = await sub.get()
                if sub.closed is not None:  # revoked or cut off: drop what is still queued
                    raise SubscriptionClosed(sub.closed)
                if current is not None:
                    # Published between subscribing and reading the latest: sent already.
                    if message == current:
                        current = None
                        continue
                    current = None
                await self._send(message)
                self.gateway.delivered("coap")
                if self._backlog(self._remote) >= BACKLOG_LIMIT:
                    await self._drained()
        except SubscriptionClosed as closed:
            code = _ENDINGS.get(closed.reason, Code.SERVICE_UNAVAILABLE)
            log.info("coap observation of %s ended: %s", sub.filter, closed.reason)
            self.pipe.add_response(
                aiocoap.Message(code=code, payload=closed.reason.encode()), is_last=True
            )
        finally:
            # The task may be cancelled here already (the pipe ended): unsubscribe regardless.
            await asyncio.shield(self.gateway.unsubscribe(sub, "observation ended"))

    async def _drained(self) -> None:
        delay = 0.001
        while self._backlog(self._remote) >= BACKLOG_LIMIT and self.sub.closed is None:
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.05)

    async def _send(self, message: Message | None, *, first: bool = False) -> None:
        observe = next(self._sequence) & 0xFFFFFF
        if message is None:
            self.pipe.add_response(
                aiocoap.Message(code=Code.CONTENT, observe=observe), is_last=False
            )
            return
        payload = message.payload
        cf = content_format(message.content_type)
        if len(payload) <= 1 << (self._szx + 4):
            notification = aiocoap.Message(
                code=Code.CONTENT,
                payload=payload,
                observe=observe,
                transport_tuning=None if first else _RELIABLE,
            )
            if cf is not None:
                notification.opt.content_format = cf
            self.pipe.add_response(notification, is_last=False)
            return
        transfer = Transfer(payload, cf, message.created.to_bytes(8, "big"))
        szx = self._szx

        def send() -> None:
            block = transfer.block(0, szx, observe)
            if not first:
                block.transport_tuning = _RELIABLE
            self.pipe.add_response(block, is_last=False)

        await self._transfers.run(self._key, transfer, send)


def sequence() -> Iterator[int]:
    """Observe numbers for one adapter: increasing, taken modulo 2**24 by the observations."""
    return itertools.count(1)
