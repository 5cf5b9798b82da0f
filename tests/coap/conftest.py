"""Fixtures of the CoAP tests: the adapter on an ephemeral UDP port, aiocoap client contexts,
a raw UDP client for what aiocoap's client will not send, and a watcher that shows what was
published."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, cast

import aiocoap
import pytest
from aiocoap.numbers.codes import Code

from adapters.coap import CoAPAdapter
from tests.conftest import World, running
from tests.conftest import drain as drain  # re-exported for this package's tests

TIMEOUT = 10.0  # seconds any single exchange may take before a test fails


@pytest.fixture
async def coap_adapter(world: World) -> AsyncIterator[CoAPAdapter]:
    async with running(CoAPAdapter(world.gateway, "127.0.0.1", 0)) as adapter:
        yield adapter


@pytest.fixture
def coap(coap_adapter: CoAPAdapter) -> str:
    """Base URI of the CoAP adapter."""
    return f"coap://127.0.0.1:{coap_adapter.port}"


async def client_context() -> aiocoap.Context:
    return await aiocoap.Context.create_client_context(transports=["udp6"])


@pytest.fixture
async def client() -> AsyncIterator[aiocoap.Context]:
    """One aiocoap client context: one simulated device."""
    ctx = await client_context()
    try:
        yield ctx
    finally:
        await ctx.shutdown()


async def request(
    ctx: aiocoap.Context, code: Code, uri: str, payload: bytes = b"", **options: Any
) -> aiocoap.Message:
    """One request through aiocoap's client (block-wise handled); its final response."""
    message = aiocoap.Message(code=code, uri=uri, payload=payload, **options)
    return await asyncio.wait_for(ctx.request(message).response, TIMEOUT)


def metric(world: World, name: str, **labels: str) -> float:
    value = world.gateway.metrics.registry.get_sample_value(name, labels)
    return value or 0.0


def refusals(world: World, reason: str) -> float:
    return metric(world, "conduit_refusals_total", protocol="coap", reason=reason)


def observers(world: World) -> float:
    """Open CoAP subscriptions (observations) in the gateway."""
    return metric(world, "conduit_connections", protocol="coap")


async def eventually(check: Callable[[], bool | Awaitable[bool]], what: str) -> None:
    """Wait until ``check`` holds (a condition, not a timing: the deadline only stops a hang)."""
    deadline = asyncio.get_running_loop().time() + TIMEOUT
    while True:
        result = check()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"never happened: {what}")
        await asyncio.sleep(0.01)


class RawClient(asyncio.DatagramProtocol):
    """A bare UDP socket speaking CoAP through aiocoap's codec only: for datagrams aiocoap's
    client would not send (garbage, Observe deregistration, a client that never ACKs)."""

    def __init__(self) -> None:
        self.transport: asyncio.DatagramTransport | None = None
        self.received: asyncio.Queue[bytes] = asyncio.Queue()
        self.mid = random.randrange(0x10000)

    @classmethod
    async def connect(cls, port: int) -> RawClient:
        loop = asyncio.get_running_loop()
        _, protocol = await loop.create_datagram_endpoint(cls, remote_addr=("127.0.0.1", port))
        return protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # The selector transport is not registered as a DatagramTransport on 3.11.
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.received.put_nowait(data)

    def send_raw(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.sendto(data)

    def send(
        self,
        message: aiocoap.Message,
        *,
        mtype: aiocoap.numbers.types.Type = aiocoap.CON,
        token: bytes = b"\x01\x02",
    ) -> int:
        """Send a message with a fresh message id; returns the id."""
        self.mid = (self.mid + 1) & 0xFFFF
        message.mtype = mtype
        message.mid = self.mid
        message.token = token
        self.send_raw(message.encode())
        return self.mid

    def ack(self, message: aiocoap.Message) -> None:
        """Acknowledge a confirmable message (a notification) with an empty ACK."""
        self.send_raw(bytes([0x60, 0x00]) + message.mid.to_bytes(2, "big"))

    def reset(self, message: aiocoap.Message) -> None:
        """Reject a message with a RST (RFC 7641 section 3.6: deregisters an observation)."""
        self.send_raw(bytes([0x70, 0x00]) + message.mid.to_bytes(2, "big"))

    async def recv(self, timeout: float = TIMEOUT) -> aiocoap.Message:
        data = await asyncio.wait_for(self.received.get(), timeout)
        return aiocoap.Message.decode(data)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


@pytest.fixture
async def raw(coap_adapter: CoAPAdapter) -> AsyncIterator[RawClient]:
    client = await RawClient.connect(coap_adapter.port)
    try:
        yield client
    finally:
        client.close()


class Observer:
    """An aiocoap client observation: the registration's answer, then each notification.

    A task iterates the observation from the start, as an application would: aiocoap's
    iterator keeps only the newest notification for a consumer that is not waiting.
    """

    def __init__(self, ctx: aiocoap.Context, uri: str, **options: Any) -> None:
        self.request = ctx.request(aiocoap.Message(code=Code.GET, uri=uri, observe=0, **options))
        assert self.request.observation is not None
        self._queue: asyncio.Queue[aiocoap.Message | None] = asyncio.Queue()
        self._task = asyncio.create_task(self._collect(self.request.observation))

    async def _collect(self, observation: Any) -> None:
        try:
            async for notification in observation:
                self._queue.put_nowait(notification)
        except aiocoap.error.Error:
            pass  # the client context was shut down: the observation ends with it
        finally:
            self._queue.put_nowait(None)

    async def first(self) -> aiocoap.Message:
        return await asyncio.wait_for(self.request.response, TIMEOUT)

    async def next(self) -> aiocoap.Message:
        """The next notification; StopAsyncIteration once the observation ended."""
        notification = await asyncio.wait_for(self._queue.get(), TIMEOUT)
        if notification is None:
            self._queue.put_nowait(None)
            raise StopAsyncIteration
        return notification

    def cancel(self) -> None:
        assert self.request.observation is not None
        self.request.observation.cancel()
