"""MQTT connections: bytes in, the channel's answers out, timers. No MQTT rule lives here.

:class:`Connection` is what a connection over TCP (:class:`TCPConnection`, this module) and one
over WebSocket (:class:`~adapters.mqtt.ws.WebSocketConnection`) share: an asyncio Protocol that
feeds the MQTT bytes it receives to the codec's :class:`~adapters.mqtt.codec.Decoder`, hands
each packet to its :class:`~adapters.mqtt.channel.Channel`, runs the work a packet needs before
the next one (reading paused meanwhile, so packets are handled in arrival order), and is the
channel's :class:`~adapters.mqtt.channel.Link`. The two differ only in how MQTT bytes arrive and
leave (raw, or in binary frames) and how the end is said (FIN, or a close frame first).

Writes are corked: outgoing packets are collected during a loop iteration and written once per
connection by :meth:`ConnectionSet.flush` (one ``write`` per connection per iteration, whatever
the number of packets: what a fan-out encodes once is written many times, cheaply).

Closing (:meth:`Connection.close`): the last packets (a DISCONNECT or CONNACK with its reason
code) are written, then input is no longer processed but still read and discarded: closing a
socket with unread input makes the kernel answer with RST, and a client that is still sending
(a burst of PUBLISHes) would lose the reason before reading it. Over TCP the write side is shut
(FIN after the last bytes) and the socket closed when the client closes its side or after
:data:`LINGER_TIMEOUT`; TLS cannot half-close, so the connection lingers the same way and then
closes (close_notify). A client that does not read what is left to write is cut off (abort) after
:data:`CLOSE_TIMEOUT`.

Timers: :meth:`ConnectionSet.sweep` visits every connection twice a second; a connection reports
its age and silence to its channel (CONNECT and keep-alive timeouts are the channel's rules) and
ends its own linger.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any, Final, cast

from adapters.mqtt.channel import CONNECTED, Channel, Pending
from adapters.mqtt.codec import Decoder, MQTTProtocolError
from adapters.mqtt.options import Options
from adapters.mqtt.publish import PROTOCOL
from adapters.mqtt.sessions import SessionRegistry
from core.gateway import Gateway
from core.listeners import peer_certificate

log = logging.getLogger("conduit.mqtt")

CLOSE_TIMEOUT: Final = 10.0  # seconds a closed connection may take to flush before an abort
LINGER_TIMEOUT: Final = 2.0  # seconds a closing connection reads and discards (see close)
_monotonic = time.monotonic


class ConnectionSet:
    """The open connections of one adapter and what they share: the corked-write flush once per
    loop turn, the count of deliveries not yet in the gateway's metrics, the background tasks
    the adapter waits for when it stops, and the timer sweep."""

    __slots__ = (
        "_all_closed",
        "_dirty",
        "delivered",
        "gateway",
        "loop",
        "open",
        "options",
        "tasks",
    )

    def __init__(self, gateway: Gateway, options: Options) -> None:
        self.gateway = gateway
        self.options = options
        self.open: set[Connection] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self.delivered = 0  # deliveries not yet counted in the gateway's metrics
        self.loop: asyncio.AbstractEventLoop | None = None  # set when the adapter starts
        self._dirty: list[Connection] = []
        self._all_closed: asyncio.Event | None = None

    def add(self, conn: Connection) -> None:
        self.open.add(conn)

    def discard(self, conn: Connection) -> None:
        self.open.discard(conn)
        if self._all_closed is not None and not self.open:
            self._all_closed.set()

    def dirty(self, conn: Connection) -> None:
        """A connection has bytes to write: flush them all once this loop iteration is done."""
        if not self._dirty:
            assert self.loop is not None
            self.loop.call_soon(self.flush)
        self._dirty.append(conn)

    def flush(self) -> None:
        dirty = self._dirty
        self._dirty = []
        for conn in dirty:
            try:
                conn.flush()
            except Exception:  # one broken connection must not keep others from writing
                log.exception("mqtt: write failed client=%s", conn.channel.client)
                if conn.transport is not None:
                    conn.transport.abort()
        if self.delivered:
            self.gateway.delivered(PROTOCOL, self.delivered)
            self.delivered = 0

    def spawn(
        self,
        coro: Coroutine[Any, Any, None],
        done: Callable[[asyncio.Task[None]], None] | None = None,
    ) -> None:
        """Run a coroutine the adapter waits for on stop; ``done`` (if given) must discard the
        task from ``tasks``."""
        assert self.loop is not None
        task = self.loop.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(done or self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("mqtt: background task failed", exc_info=task.exception())

    def sweep(self) -> None:
        now = _monotonic()
        for conn in list(self.open):
            conn.tick(now)

    async def wait_closed(self, timeout: float) -> None:
        """Wait until every connection is gone, at most ``timeout`` seconds."""
        if self.open:
            self._all_closed = asyncio.Event()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._all_closed.wait(), timeout)


class Connection(asyncio.Protocol):
    """One client connection; see the module docstring. Subclasses say how MQTT bytes are
    written (:meth:`_write`) and how the end begins (:meth:`_end`)."""

    __slots__ = (
        "born",
        "busy",
        "channel",
        "closing",
        "conns",
        "decoder",
        "half_close",
        "last_rx",
        "lingering",
        "max_write_buffer",
        "out",
        "out_bytes",
        "paused",
        "transport",
    )

    def __init__(self, conns: ConnectionSet, registry: SessionRegistry) -> None:
        self.conns = conns
        self.transport: asyncio.Transport | None = None
        self.decoder = Decoder(max_packet_size=conns.options.max_packet_size)
        self.channel = Channel(conns.gateway, conns.options, registry, self)
        self.max_write_buffer = conns.options.max_write_buffer
        self.busy = False  # the work of a packet is running: the next packets wait
        self.out: list[bytes] = []
        self.out_bytes = 0
        self.paused = False  # the transport's buffer is full (pause_writing)
        self.closing = False  # the channel ended: input is read and discarded, never processed
        self.lingering = False  # closing, last bytes written: MQTT output is dropped
        self.half_close = False  # the write side is to be shut once all is written (TCP)
        self.born = self.last_rx = _monotonic()

    # ---------------------------------------------------------------------------------------
    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have its methods
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        transport.set_write_buffer_limits(high=self.max_write_buffer)
        self.channel.certificate = peer_certificate(transport)
        self.conns.add(self)

    def eof_received(self) -> bool | None:
        return None

    def pause_writing(self) -> None:
        self.paused = self.channel.congested = True

    def resume_writing(self) -> None:
        self.paused = False
        channel = self.channel
        channel.congested = self.out_bytes > self.max_write_buffer
        channel.writable()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self.channel.lost()
        self.conns.discard(self)
        self.out.clear()
        self.out_bytes = 0

    # ---------------------------------------------------------------------------------------
    # reading

    def received(self, data: bytes | bytearray | memoryview) -> None:
        """MQTT bytes from the client (over WebSocket: the payload of binary frames)."""
        if self.closing:
            return  # closing: input is read and discarded, never processed
        self.last_rx = _monotonic()
        try:
            self.decoder.feed(data)
        except MQTTProtocolError as exc:
            self.channel.malformed(exc)
            return
        if not self.busy:
            self._process()

    def _process(self) -> None:
        next_packet = self.decoder.next_packet
        handle = self.channel.handle
        try:
            while True:
                packet = next_packet()
                if packet is None:
                    return
                pending = handle(packet)
                if pending is not None:
                    self._wait(pending)
                    return
                if self.closing:
                    return
        except MQTTProtocolError as exc:  # from the decoder
            self.channel.malformed(exc)
        except Exception:
            log.exception("mqtt: unexpected error, closing client=%s", self.channel.client)
            self.channel.close()

    def _wait(self, pending: Pending) -> None:
        """Run a packet's asynchronous part; reading waits until it is done (order kept)."""
        self.busy = True
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.pause_reading()
        self.conns.spawn(pending, self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self.conns.tasks.discard(task)
        self.busy = False
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            log.error(
                "mqtt: unexpected error, closing client=%s", self.channel.client, exc_info=exc
            )
            self.channel.close()
            return
        if self.closing:
            return
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.resume_reading()
        self._process()

    # ---------------------------------------------------------------------------------------
    # writing: the channel's Link

    def send(self, data: bytes) -> None:
        out = self.out
        if not out:
            self.conns.dirty(self)
        out.append(data)
        self.out_bytes += len(data)
        if self.out_bytes > self.max_write_buffer:
            self.channel.congested = True

    def deliver(self, data: bytes) -> None:
        self.conns.delivered += 1
        self.send(data)

    def flush(self) -> None:
        out = self.out
        if not out or self.transport is None:
            return
        data = out[0] if len(out) == 1 else b"".join(out)
        out.clear()
        self.out_bytes = 0
        self.channel.congested = self.paused
        if not self.lingering and not self.transport.is_closing():
            self._write(data)

    def close(self, reason_code: int) -> None:
        """Write what is queued and end the connection (see the module docstring: the client
        gets what was written even if it is still sending)."""
        self.closing = True
        self.born = _monotonic()  # from now on: when the close began (see tick)
        self.flush()
        self.lingering = True
        self._end(reason_code)

    def _write(self, data: bytes) -> None:
        """Write MQTT bytes to the client."""
        raise NotImplementedError

    def _end(self, reason_code: int) -> None:
        """Begin the end of the connection once its last MQTT bytes are written."""
        raise NotImplementedError

    def _shut(self) -> None:
        """Shut the write side after the bytes already written (TCP), and keep reading (to
        discard) until the client closes or the sweep ends the linger."""
        self.lingering = True
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        transport.resume_reading()  # reading may be paused by a packet being handled
        if transport.can_write_eof():  # not TLS
            self.half_close = True
            self.shut_write()

    def shut_write(self) -> None:
        """Send FIN once everything written is out (until then the sweep calls again). Not
        asyncio's write_eof with bytes still queued: its deferred shutdown raises into the
        event loop when the client has reset the connection meanwhile."""
        transport = self.transport
        if transport is None or transport.is_closing() or transport.get_write_buffer_size():
            return
        try:
            transport.write_eof()  # once done, later calls do nothing
        except OSError:  # the client reset the connection: nothing more can reach it
            transport.abort()

    # ---------------------------------------------------------------------------------------
    # timers

    def tick(self, now: float) -> None:
        """Called by the sweep: the channel's timeouts; a closing connection whose linger is
        over, or whose peer does not read what is left to write."""
        if not self.closing:
            channel = self.channel
            if channel.state is not CONNECTED or channel.keep_alive:
                channel.timed_out(now - self.born, now - self.last_rx)
            return
        transport = self.transport
        if transport is None:
            return
        elapsed = now - self.born
        if elapsed > CLOSE_TIMEOUT:
            transport.abort()  # the client does not read what is left
        elif not transport.is_closing() and not transport.get_write_buffer_size():
            if self.half_close:
                self.shut_write()  # the last bytes are out now: FIN
            if elapsed > LINGER_TIMEOUT and not transport.is_closing():
                transport.close()

    def end_now(self) -> None:
        """The server stops and waits no longer: close what has its last bytes (and FIN) out,
        reset the rest."""
        transport = self.transport
        if transport is None:
            return
        if self.half_close and not transport.get_write_buffer_size():
            transport.close()
        else:
            transport.abort()


class TCPConnection(Connection):
    """An MQTT connection over TCP (or TLS): the MQTT byte stream is the connection's."""

    __slots__ = ()

    def data_received(self, data: bytes) -> None:
        self.received(data)

    def _write(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def _end(self, reason_code: int) -> None:
        self._shut()
