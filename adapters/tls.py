"""TLS endpoints on OpenSSL's socket BIO: an asyncio transport over a non-blocking
:class:`ssl.SSLSocket`.

The event loop's own TLS transport (uvloop's, like asyncio's) runs OpenSSL on two memory BIOs:
OpenSSL encrypts into one buffer and decrypts from another, and the transport copies between
them and the socket. Each connection keeps both buffers at the size of the largest flight it
saw, a read buffer, and the Python objects around them: 35 kB of server RSS per idle
mutual-TLS connection on this kind of machine, against Mosquitto's 24 kB, whose OpenSSL reads
and writes the socket itself. :class:`TLSTransport` does what Mosquitto does: the
``SSLSocket`` reads and writes its file descriptor, and the event loop only says when it is
readable or writable (``add_reader``/``add_writer``): 24.6 kB for a bare server in the same
measure, 26.9 kB for Conduit's MQTTS (docs/performance.md). The handshake, the certificate
checks and the cryptography stay OpenSSL's, through Python's ``ssl`` module and the listener's
:class:`ssl.SSLContext` (reloaded in place, as before); only the plumbing between the socket and
the protocol is here.

:func:`create_server` binds like ``loop.create_server`` and returns a :class:`TLSServer`, whose
connections each get a protocol from the factory once their handshake has completed
(``connection_made``), as with the event loop's TLS. A handshake that fails or does not finish
within ``handshake_timeout`` closes the socket; nothing was made for it.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import logging
import socket
import ssl
from collections.abc import Callable
from typing import Any

log = logging.getLogger("conduit.tls")

HANDSHAKE_TIMEOUT = 60.0  # seconds; the event loop's default for TLS servers
READ_SIZE = 64 * 1024  # bytes asked of one read
READS_PER_EVENT = 4  # reads per readable event at most: one busy connection cannot hog the loop
JOIN_LIMIT = 64 * 1024  # bytes of queued writes joined into one TLS write
WRITE_HIGH = 64 * 1024  # the default high-water mark of the write buffer (asyncio's)
# Errors of accept() that say the process or the system is out of something: accepting pauses
# for a second instead of spinning on a listening socket that stays readable.
_EXHAUSTED = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


async def create_server(
    protocol_factory: Callable[[], asyncio.BaseProtocol],
    host: str | None,
    port: int,
    context: ssl.SSLContext,
    *,
    backlog: int = 100,
    reuse_address: bool = True,
    handshake_timeout: float = HANDSHAKE_TIMEOUT,
) -> TLSServer:
    """Listen on every address of ``host`` (all interfaces when empty or None) and serve TLS
    with ``context``. OSError when an address cannot be bound (then none is)."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )
    listeners: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            listeners.append(sock)
            if reuse_address:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(backlog)
            sock.setblocking(False)
    except OSError:
        for sock in listeners:
            sock.close()
        raise
    server = TLSServer(loop, listeners, protocol_factory, context, backlog, handshake_timeout)
    server.start()
    return server


class TLSServer:
    """The listening sockets of one TLS endpoint (what adapters use of ``asyncio.Server``)."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sockets: list[socket.socket],
        protocol_factory: Callable[[], asyncio.BaseProtocol],
        context: ssl.SSLContext,
        backlog: int,
        handshake_timeout: float,
    ) -> None:
        self.sockets = sockets
        self.factory = protocol_factory
        self.context = context
        self.handshake_timeout = handshake_timeout
        self.handshaking: set[TLSTransport] = set()
        self._loop = loop
        self._backlog = backlog
        self._serving = False
        self._resume: asyncio.TimerHandle | None = None

    def start(self) -> None:
        self._serving = True
        for sock in self.sockets:
            self._loop.add_reader(sock.fileno(), self._accept, sock)

    def is_serving(self) -> bool:
        return self._serving

    def close(self) -> None:
        """Stop listening; connections still in their handshake are cut off (the others are
        their adapter's to close)."""
        if not self._serving:
            return
        self._serving = False
        if self._resume is not None:
            self._resume.cancel()
        for sock in self.sockets:
            self._loop.remove_reader(sock.fileno())
            sock.close()
        for transport in list(self.handshaking):
            transport.abort()

    async def wait_closed(self) -> None:
        return None

    def _accept(self, listener: socket.socket) -> None:
        for _ in range(self._backlog):
            try:
                sock, peer = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno not in _EXHAUSTED:
                    continue  # that connection is gone (ECONNABORTED, ...); there may be others
                log.error("tls: accepting paused for 1 s: %s", exc)
                for sock in self.sockets:
                    self._loop.remove_reader(sock.fileno())
                self._resume = self._loop.call_later(1.0, self.start)
                return
            try:
                sock.setblocking(False)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                wrapped = self.context.wrap_socket(
                    sock, server_side=True, do_handshake_on_connect=False
                )
            except (OSError, ValueError) as exc:
                log.debug("tls: connection from %s dropped: %s", peer, exc)
                sock.close()
                continue
            TLSTransport(self._loop, wrapped, peer, self).handshake()


class TLSTransport(asyncio.Transport):
    """One TLS connection: an ``SSLSocket`` driven by the event loop's readiness callbacks."""

    __slots__ = (
        "_buffer", "_buffered", "_closing", "_fd", "_high", "_in_progress", "_loop", "_lost",
        "_low", "_paused", "_peer", "_protocol", "_read_waits_write", "_server", "_sock",
        "_throttled", "_timer", "_write_waits_read", "_writing",
    )  # fmt: skip

    def __init__(
        self, loop: asyncio.AbstractEventLoop, sock: ssl.SSLSocket, peer: Any, server: TLSServer
    ) -> None:
        self._loop = loop
        self._sock = sock
        self._fd = sock.fileno()
        self._peer = peer
        self._server = server
        self._protocol: Any = None  # made once the handshake has completed
        self._timer: asyncio.TimerHandle | None = None
        self._buffer: collections.deque[bytes] | None = None  # what waits to be written
        self._buffered = 0
        self._in_progress = False  # the first buffered chunk was half written: resend it as is
        self._writing = False  # add_writer is on
        self._paused = False  # pause_reading
        self._throttled = False  # the protocol was told pause_writing
        self._closing = False
        self._lost = False
        self._read_waits_write = False  # a read wanted the socket writable (renegotiation)
        self._write_waits_read = False  # a write wanted it readable
        self._high = WRITE_HIGH
        self._low = WRITE_HIGH // 4

    # handshake
    def handshake(self) -> None:
        server = self._server
        server.handshaking.add(self)
        self._timer = self._loop.call_later(server.handshake_timeout, self._handshake_timeout)
        self._loop.add_reader(self._fd, self._handshake_step)
        self._handshake_step()  # the ClientHello is often in already

    def _handshake_timeout(self) -> None:
        self._timer = None
        timeout = self._server.handshake_timeout
        log.debug("tls: handshake from %s not done in %g s", self._peer, timeout)
        self.abort()

    def _handshake_step(self) -> None:
        try:
            self._sock.do_handshake()
        except ssl.SSLWantReadError:
            self._want_writable(False)
            return
        except ssl.SSLWantWriteError:
            self._want_writable(True)
            return
        except (ssl.SSLError, OSError) as exc:
            # OpenSSL has written its alert already; the client sees why.
            log.debug("tls: handshake from %s failed: %s", self._peer, exc)
            self.abort()
            return
        server = self._server
        server.handshaking.discard(self)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._want_writable(False)
        loop = self._loop
        loop.remove_reader(self._fd)
        loop.add_reader(self._fd, self._read_ready)
        self._protocol = server.factory()
        self._protocol.connection_made(self)
        if not self._closing:
            self._read_ready()  # what came with the client's Finished may be read already

    def _want_writable(self, on: bool) -> None:
        if on and not self._writing:
            self._loop.add_writer(self._fd, self._write_ready)
        elif not on and self._writing:
            self._loop.remove_writer(self._fd)
        self._writing = on

    # reading
    def _read_ready(self) -> None:
        if self._write_waits_read:
            self._write_waits_read = False
            self._write_ready()
        sock = self._sock
        for _ in range(READS_PER_EVENT):
            if self._paused or self._closing:
                return
            try:
                data = sock.recv(READ_SIZE)
            except ssl.SSLWantReadError:
                return
            except ssl.SSLWantWriteError:
                self._read_waits_write = True
                self._want_writable(True)
                return
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                data = b""
            except (ssl.SSLError, OSError) as exc:
                self._fatal(exc)
                return
            if not data:
                self._eof()
                return
            try:
                self._protocol.data_received(data)
            except Exception as exc:  # as the event loop's transports do: the connection ends
                log.exception("tls: the protocol failed on data from %s", self._peer)
                self._fatal(exc)
                return
        if not self._closing and not self._paused and sock.pending():
            self._loop.call_soon(self._read_ready)  # decrypted bytes the socket will not signal

    def _eof(self) -> None:
        self._loop.remove_reader(self._fd)
        self._paused = True
        try:
            self._protocol.eof_received()  # TLS cannot stay half open: closed either way
        finally:
            self.close()

    def pause_reading(self) -> None:
        if not self._paused and not self._closing:
            self._paused = True
            if self._protocol is not None:
                self._loop.remove_reader(self._fd)

    def resume_reading(self) -> None:
        if self._paused and not self._closing:
            self._paused = False
            self._loop.add_reader(self._fd, self._read_ready)
            if self._sock.pending():
                self._loop.call_soon(self._read_ready)

    def is_reading(self) -> bool:
        return not self._paused and not self._closing

    # writing
    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not data or self._closing:
            return
        if self._buffer is not None:  # behind what waits (also while it drains, then empty)
            self._buffer.append(bytes(data))
            self._buffered += len(data)
            self._check_high()
            return
        try:
            sent = self._sock.send(data)
        except ssl.SSLWantWriteError:
            self._in_progress, sent = True, 0
        except ssl.SSLWantReadError:
            self._in_progress, sent, self._write_waits_read = True, 0, True
        except (ssl.SSLError, OSError) as exc:
            self._fatal(exc)
            return
        if sent == len(data):
            return
        self._buffer = collections.deque((bytes(data[sent:]),))
        self._buffered = len(data) - sent
        if not self._write_waits_read:
            self._want_writable(True)
        self._check_high()

    def writelines(self, list_of_data: Any) -> None:
        self.write(b"".join(list_of_data))

    def _write_ready(self) -> None:
        if self._protocol is None:  # the handshake wanted to write
            self._handshake_step()
            return
        if self._read_waits_write:
            self._read_waits_write = False
            self._loop.call_soon(self._read_ready)
        buffer = self._buffer
        sock = self._sock
        while buffer:
            if not self._in_progress and len(buffer) > 1 and len(buffer[0]) < JOIN_LIMIT:
                parts = [buffer.popleft()]
                size = len(parts[0])
                while buffer and size < JOIN_LIMIT:
                    parts.append(buffer.popleft())
                    size += len(parts[-1])
                buffer.appendleft(b"".join(parts))
            chunk = buffer[0]
            try:
                sent = sock.send(chunk)
            except ssl.SSLWantWriteError:
                self._in_progress = True
                self._want_writable(True)
                return
            except ssl.SSLWantReadError:
                self._in_progress = self._write_waits_read = True
                self._want_writable(False)
                return
            except (ssl.SSLError, OSError) as exc:
                self._fatal(exc)
                return
            self._in_progress = False
            self._buffered -= sent
            if sent < len(chunk):
                buffer[0] = chunk[sent:]
            else:
                buffer.popleft()
            if self._throttled and self._buffered <= self._low:
                self._throttled = False
                self._protocol.resume_writing()  # it may write: the loop goes on with it
        self._buffer = None
        self._buffered = 0
        self._want_writable(False)
        if self._closing and not self._lost:
            self._shutdown()

    def _check_high(self) -> None:
        if not self._throttled and self._buffered > self._high and self._protocol is not None:
            self._throttled = True
            self._protocol.pause_writing()

    def get_write_buffer_size(self) -> int:
        return self._buffered

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._low, self._high

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        if high is None:
            high = WRITE_HIGH if low is None else 4 * low
        if low is None:
            low = high // 4
        if not high >= low >= 0:
            raise ValueError(f"high ({high!r}) must be >= low ({low!r}) must be >= 0")
        self._high, self._low = high, low

    def can_write_eof(self) -> bool:
        return False  # TLS 1.3 and 1.2 have no half-close

    def write_eof(self) -> None:
        raise NotImplementedError("TLS cannot half-close")

    # closing
    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        """Write what is buffered, send close_notify, close the socket."""
        if self._closing:
            return
        self._closing = True
        if not self._paused and self._protocol is not None:
            self._loop.remove_reader(self._fd)
        if not self._buffer:
            self._shutdown()

    def _shutdown(self) -> None:
        # SSL_shutdown sends close_notify; a non-blocking socket cannot wait for the client's,
        # which TLS does not require (RFC 8446 6.1).
        try:
            self._sock.unwrap()
        except (ssl.SSLError, OSError, ValueError):
            pass
        self._finish(None)

    def abort(self) -> None:
        """Close the socket now, without writing what is buffered or close_notify."""
        self._closing = True
        self._finish(None)

    def _fatal(self, exc: BaseException) -> None:
        if not isinstance(exc, ConnectionError | ssl.SSLError):
            log.debug("tls: connection from %s failed: %s", self._peer, exc)
        self._closing = True
        self._finish(exc)

    def _finish(self, exc: BaseException | None) -> None:
        if self._lost:
            return
        self._lost = True
        self._buffer = None
        self._buffered = 0
        loop = self._loop
        loop.remove_reader(self._fd)
        if self._writing:
            loop.remove_writer(self._fd)
            self._writing = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._server.handshaking.discard(self)
        self._sock.close()
        if self._protocol is not None:
            loop.call_soon(self._protocol.connection_lost, exc)

    # the rest of the Transport interface
    def get_extra_info(self, name: str, default: Any = None) -> Any:
        sock = self._sock
        try:
            if name == "ssl_object" or name == "socket":
                return sock
            if name == "peername":
                return self._peer
            if name == "sslcontext":
                return sock.context
            if name == "peercert":
                return sock.getpeercert()
            if name == "cipher":
                return sock.cipher()
            if name == "sockname":
                return sock.getsockname()
            if name == "compression":
                return sock.compression()
        except (OSError, ValueError):
            pass
        return default

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._protocol = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        protocol: asyncio.BaseProtocol = self._protocol
        return protocol
