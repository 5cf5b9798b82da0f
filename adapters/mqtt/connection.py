"""One MQTT network connection: an asyncio Protocol that moves bytes and calls the gateway.

The connection feeds received bytes to the codec's :class:`~adapters.mqtt.codec.Decoder`, acts
on each packet (CONNECT and authentication, PUBLISH through the gateway, acknowledgements,
SUBSCRIBE and UNSUBSCRIBE, PINGREQ, DISCONNECT) and writes the answers. The session state it
drives lives in :mod:`adapters.mqtt.session`; the message mapping in :mod:`adapters.mqtt.publish`.

States: waiting for CONNECT, connecting (authentication in progress), connected, closed.

Order: packets are handled in the order they arrive. A packet that needs the gateway
asynchronously (CONNECT, SUBSCRIBE, UNSUBSCRIBE, a retained publish, a publish whose rights are
not cached) pauses reading; the next packets wait in the decoder until it is done.

Writes are corked: outgoing packets are collected during a loop iteration and written once
per connection by the adapter's flush (one ``write`` per connection per iteration, whatever the
number of packets).

Refusals (DESIGN.md error table): CONNACK return codes (3.1.1) and reason codes (5.0) at
CONNECT; per-filter SUBACK codes; a refused PUBLISH is answered with a PUBACK/PUBREC reason code
(MQTT 5, QoS 1/2, where that packet type has the code) and otherwise with a DISCONNECT carrying
the code (MQTT 5) or a plain close (MQTT 3.1.1, which has no codes for it). Each refusal is logged
and counted once; the log names the authenticated client, or before authentication the user name
only when it has the shape of a client id (a device may put its secret there), and escapes
control characters in what the client sent (:mod:`core.noise`). Malformed input gets
the codec's reason code in a CONNACK or DISCONNECT (MQTT 5) or a close, and never affects another
connection.

Closing (:meth:`MQTTConnection.close`): the last packets (a DISCONNECT or CONNACK with its reason
code) are written, then input is no longer processed but still read and discarded: closing a
socket with unread input makes the kernel answer with RST, and a client that is still sending
(a burst of PUBLISHes) would lose the reason before reading it. Over TCP the write side is shut
(FIN after the last bytes) and the socket closed when the client closes its side or after
:data:`LINGER_TIMEOUT`; TLS cannot half-close, so the connection lingers the same way and then
closes (close_notify). A client that does not read what is left to write is cut off (abort) after
:data:`CLOSE_TIMEOUT`.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, Final, cast

from adapters.mqtt import codec
from adapters.mqtt.codec import (
    EMPTY_PROPERTIES,
    Auth,
    ConnAck,
    Connect,
    Decoder,
    Disconnect,
    MQTTProtocolError,
    Packet,
    PingReq,
    Properties,
    PubAck,
    PubComp,
    Publish,
    PubRec,
    PubRel,
    SubAck,
    Subscribe,
    UnsubAck,
    Unsubscribe,
)
from adapters.mqtt.publish import inbound
from adapters.mqtt.session import Session, Sub
from core.auth import Credentials, Identity
from core.errors import AuthenticationError, Condition, ConduitError
from core.noise import claimed_client, printable

if TYPE_CHECKING:
    from adapters.mqtt.adapter import MQTTAdapter

log = logging.getLogger("conduit.mqtt")

PROTOCOL: Final = "mqtt"

# Connection states.
WAITING, CONNECTING, CONNECTED, CLOSED = range(4)

# MQTT 5 reason codes used here beyond the codec's and the error table's.
UNSPECIFIED_ERROR: Final = 0x80
NO_SUBSCRIPTION_EXISTED: Final = 0x11
NOT_AUTHORIZED: Final = 0x87
SERVER_BUSY: Final = 0x89
BAD_AUTHENTICATION_METHOD: Final = 0x8C
SERVER_SHUTTING_DOWN: Final = 0x8B
KEEP_ALIVE_TIMEOUT: Final = 0x8D
SESSION_TAKEN_OVER: Final = 0x8E
TOPIC_FILTER_INVALID: Final = 0x8F
PACKET_ID_NOT_FOUND: Final = 0x92
RECEIVE_MAXIMUM_EXCEEDED: Final = 0x93
TOPIC_ALIAS_INVALID: Final = 0x94
QUOTA_EXCEEDED: Final = 0x97
DISCONNECT_WITH_WILL: Final = 0x04
# 3.1.1 CONNACK return codes.
V3_UNACCEPTABLE_PROTOCOL: Final = 1
V3_IDENTIFIER_REJECTED: Final = 2
V3_NOT_AUTHORIZED: Final = 5

# Which reason codes each MQTT 5 packet may carry (MQTT 5 section 2.4).
PUBACK_CODES: Final = frozenset({0x00, 0x10, 0x80, 0x83, 0x87, 0x90, 0x91, 0x97, 0x99})
SUBACK_CODES: Final = frozenset({0x80, 0x83, 0x87, 0x8F, 0x91, 0x97, 0x9E, 0xA1, 0xA2})
DISCONNECT_CODES: Final = frozenset(
    {0x80, 0x81, 0x82, 0x83, 0x87, 0x89, 0x8B, 0x8D, 0x8E, 0x8F, 0x90, 0x93, 0x94, 0x95, 0x96}
    | {0x97, 0x98, 0x99, 0x9A, 0x9B, 0x9C, 0x9D, 0x9E, 0x9F, 0xA0, 0xA1, 0xA2}
)
CONNACK_CODES: Final = frozenset(
    {0x80, 0x81, 0x82, 0x83, 0x84, 0x85, 0x86, 0x87, 0x88, 0x89, 0x8A, 0x8C, 0x90, 0x95, 0x97}
    | {0x99, 0x9A, 0x9B, 0x9C, 0x9D, 0x9F}
)
# Names for the log and the refusals metric, by reason code.
REASON_NAMES: Final = {
    0x81: "malformed_packet",
    0x82: "protocol_error",
    0x84: "unsupported_protocol_version",
    0x8C: "bad_authentication_method",
    0x8D: "keep_alive_timeout",
    0x90: "bad_topic",
    0x93: "receive_maximum_exceeded",
    0x94: "topic_alias_invalid",
    0x95: "too_large",
    0x99: "payload_format_invalid",
}

_PINGRESP: Final = b"\xd0\x00"
CLOSE_TIMEOUT: Final = 10.0  # seconds a closed connection may take to flush before an abort
LINGER_TIMEOUT: Final = 2.0  # seconds a closing connection reads and discards (see close)
_monotonic = time.monotonic


def _ack(first: int, packet_id: int) -> bytes:
    return bytes((first, 2, packet_id >> 8, packet_id & 0xFF))


def _peek_level(data: bytes) -> int | None:
    """The protocol level byte of a CONNECT at the start of ``data``, if it is there."""
    i = 1
    while i < len(data) and i < 5 and data[i] & 0x80:
        i += 1
    i += 1
    if i + 2 > len(data):
        return None
    i += 2 + (data[i] << 8 | data[i + 1])
    return data[i] if i < len(data) else None


class MQTTConnection(asyncio.Protocol):
    """One client connection over TCP (or TLS); see the module docstring."""

    __slots__ = (
        "_first",
        "_unregister",
        "adapter",
        "aliases",
        "born",
        "busy",
        "clean_exit",
        "congested",
        "decoder",
        "gateway",
        "half_close",
        "identity",
        "keep_alive",
        "last_rx",
        "level",
        "lingering",
        "max_packet_size",
        "out",
        "out_bytes",
        "paused",
        "problem_info",
        "session",
        "state",
        "transport",
    )

    def __init__(self, adapter: MQTTAdapter) -> None:
        self.adapter = adapter
        self.gateway = adapter.gateway
        self.transport: asyncio.Transport | None = None
        self.decoder = Decoder(max_packet_size=adapter.max_packet_size)
        self.state = WAITING
        self.level = 0
        self.identity: Identity | None = None
        self._unregister: Callable[[], None] | None = None
        self.session: Session | None = None
        self.busy = False
        self.out: list[bytes] = []
        self.out_bytes = 0
        self.paused = False
        self.congested = False
        self.clean_exit = False
        self.lingering = False  # closing: MQTT output is dropped, input read and discarded
        self.half_close = False  # the write side is to be shut once all is written (TCP)
        self.problem_info = True
        self.max_packet_size = codec.MAX_PACKET_SIZE
        self.aliases: dict[int, str] | None = None
        self.keep_alive = 0.0  # seconds of silence tolerated (1.5 x keep alive); 0: none
        self.born = self.last_rx = _monotonic()
        self._first = b""

    # ---------------------------------------------------------------------------------------
    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have its methods
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        transport.set_write_buffer_limits(high=self.adapter.max_write_buffer)
        self.adapter.conns.add(self)

    def data_received(self, data: bytes) -> None:
        self.mqtt_received(data)

    def mqtt_received(self, data: bytes | bytearray | memoryview) -> None:
        """MQTT bytes from the client (over WebSocket: the payload of binary frames)."""
        if self.state == CLOSED:
            return  # closing: input is read and discarded, never processed
        self.last_rx = _monotonic()
        if self.state == WAITING and len(self._first) < 64:
            self._first += data[:64]
        try:
            self.decoder.feed(data)
        except MQTTProtocolError as exc:
            self._malformed(exc)
            return
        if not self.busy and self.state != CLOSED:
            self._process()

    def eof_received(self) -> bool | None:
        return None

    def pause_writing(self) -> None:
        self.paused = self.congested = True

    def resume_writing(self) -> None:
        self.paused = False
        self.congested = self.out_bytes > self.adapter.max_write_buffer
        session = self.session
        if session is not None and session.outlet is self:
            session.pump()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.state != CLOSED:
            self.state = CLOSED
            self._detach(will=not self.clean_exit)
        if self.identity is not None and self.session is not None:
            self.gateway.metrics.conns[PROTOCOL].dec()
        self.adapter.closed(self)
        self.out.clear()
        self.out_bytes = 0

    # ---------------------------------------------------------------------------------------
    # writing (the session's Outlet)

    def send(self, data: bytes) -> None:
        out = self.out
        if not out:
            self.adapter.dirty(self)
        out.append(data)
        self.out_bytes += len(data)
        if self.out_bytes > self.adapter.max_write_buffer:
            self.congested = True

    def deliver(self, data: bytes) -> None:
        self.adapter.delivered += 1
        self.send(data)

    def flush(self) -> None:
        out = self.out
        if not out or self.transport is None:
            return
        data = out[0] if len(out) == 1 else b"".join(out)
        out.clear()
        self.out_bytes = 0
        self.congested = self.paused
        if not self.lingering and not self.transport.is_closing():
            self.write(data)

    def write(self, data: bytes) -> None:
        """Write bytes to the network (MQTT over WebSocket frames them first)."""
        assert self.transport is not None
        self.transport.write(data)

    def send_packet(self, packet: Packet) -> None:
        """Encode and queue a control packet; drop its properties if the client's maximum
        packet size cannot take them (MQTT 5 section 3.1.2.25)."""
        data = codec.encode(packet, self.level or 4)
        if len(data) > self.max_packet_size and getattr(packet, "properties", None):
            packet.properties = EMPTY_PROPERTIES  # type: ignore[union-attr]
            data = codec.encode(packet, self.level or 4)
        self.send(data)

    def close(self, will: bool = True, reason_code: int = 0) -> None:
        """Flush what is queued and close (see the module docstring: the client gets what was
        written even if it is still sending); ``will``: publish the will (an abnormal end).
        ``reason_code``: the MQTT 5 reason code the connection ends with (MQTT over WebSocket
        maps it to a close code)."""
        if self.state == CLOSED:
            return
        self.state = CLOSED
        self.born = _monotonic()  # from now on: when the close began (see timed_out)
        if self._unregister is not None:
            self._unregister()
            self._unregister = None
        self._detach(will)
        self.flush()
        self.close_transport(reason_code)

    def close_transport(self, reason_code: int = 0) -> None:
        """Stop writing, shut the write side after the bytes already written (TCP), and keep
        reading (to discard) until the client closes or the sweep ends the linger."""
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

    def disconnect(self, reason_code: int, reason: str | None = None, will: bool = True) -> None:
        """Server-initiated end: DISCONNECT with a reason code (MQTT 5), then close."""
        if self.state == CLOSED:
            return
        if self.level == 5 and self.state == CONNECTED:
            if reason_code not in DISCONNECT_CODES:
                reason_code = SERVER_BUSY if reason_code == 0x88 else UNSPECIFIED_ERROR
            props = Properties(reason_string=reason) if reason else EMPTY_PROPERTIES
            self.send_packet(Disconnect(reason_code, props))
        self.close(will, reason_code)

    # ---------------------------------------------------------------------------------------
    # refusals

    @property
    def client(self) -> str | None:
        """Who to name in the log: the authenticated client id, else nobody (None)."""
        return self.identity.client_id if self.identity is not None else None

    def refused(self, error: ConduitError) -> None:
        self.gateway.refused(PROTOCOL, error, self.client)

    def _malformed(self, exc: MQTTProtocolError) -> None:
        """Input that breaks the protocol: answer with the code where the version has one,
        then close. Logged and counted once."""
        if self.state == CLOSED:
            return
        self.adapter.protocol_refused(
            REASON_NAMES.get(exc.reason_code, f"reason_0x{exc.reason_code:02x}"),
            exc.message,
            self.client,
        )
        if self.state in (WAITING, CONNECTING):
            # No CONNACK yet: answer in the version the client asked for, if any.
            if exc.v3_connack_code is not None:
                level = _peek_level(self._first)
                if level is not None and level > 5:
                    self.level = 5
                    self.send_packet(ConnAck(False, exc.reason_code))
                else:
                    self.level = 4
                    self.send_packet(ConnAck(False, exc.v3_connack_code))
            elif exc.protocol_level == 5 and exc.reason_code in CONNACK_CODES:
                self.level = 5
                self.send_packet(
                    ConnAck(False, exc.reason_code, Properties(reason_string=exc.message))
                )
            self.close(reason_code=exc.reason_code)
            return
        self.disconnect(exc.reason_code, exc.message)

    # ---------------------------------------------------------------------------------------
    # reading

    def _process(self) -> None:
        next_packet = self.decoder.next_packet
        try:
            while True:
                packet = next_packet()
                if packet is None:
                    return
                if type(packet) is Publish:
                    if self.state != CONNECTED:
                        raise MQTTProtocolError(codec.PROTOCOL_ERROR, "PUBLISH before CONNACK")
                    self._publish(packet)
                else:
                    self._dispatch(packet)
                if self.busy or self.state == CLOSED:
                    return
        except MQTTProtocolError as exc:
            if exc.protocol_level is None:
                exc.protocol_level = self.level or None
            self._malformed(exc)
        except Exception:
            log.exception("mqtt: unexpected error, closing client=%s", self.client)
            self.close()

    def _dispatch(self, packet: Packet) -> None:
        if self.state == WAITING:
            assert isinstance(packet, Connect)  # the decoder lets nothing else through first
            self.state = CONNECTING
            self._first = b""
            self.gateway.metrics.reqs[PROTOCOL].inc()
            self.spawn(self._connect(packet))
            return
        session = self.session
        assert session is not None
        if isinstance(packet, PubAck):
            if session.puback(packet.packet_id):
                session.pump()
        elif isinstance(packet, PubRec):
            self._pubrec(packet, session)
        elif isinstance(packet, PubRel):
            if session.released(packet.packet_id) or self.level == 4:
                self.send(_ack(0x70, packet.packet_id))
            else:
                self.send_packet(PubComp(packet.packet_id, PACKET_ID_NOT_FOUND))
        elif isinstance(packet, PubComp):
            if session.pubcomp(packet.packet_id):
                session.pump()
        elif isinstance(packet, PingReq):
            self.send(_PINGRESP)
        elif isinstance(packet, Subscribe):
            self.spawn(self._subscribe(packet))
        elif isinstance(packet, Unsubscribe):
            self.spawn(self._unsubscribe(packet))
        elif isinstance(packet, Disconnect):
            self._disconnected(packet)
        elif isinstance(packet, Connect):
            raise MQTTProtocolError(codec.PROTOCOL_ERROR, "a second CONNECT")
        elif isinstance(packet, Auth):
            raise MQTTProtocolError(codec.PROTOCOL_ERROR, "AUTH without enhanced authentication")
        else:
            raise MQTTProtocolError(
                codec.PROTOCOL_ERROR, f"a client does not send {type(packet).__name__.upper()}"
            )

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run a packet's asynchronous part; reading waits until it is done (order kept)."""
        self.busy = True
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.pause_reading()
        self.adapter.spawn(coro, self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self.adapter.tasks.discard(task)
        self.busy = False
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            log.error("mqtt: unexpected error, closing client=%s", self.client, exc_info=exc)
            self.close()
            return
        if self.state == CLOSED:
            return
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.resume_reading()
        self._process()

    # ---------------------------------------------------------------------------------------
    # CONNECT

    async def _connect(self, p: Connect) -> None:
        adapter = self.adapter
        self.level = level = p.protocol_level
        props = p.properties
        receive_maximum = 0xFFFF
        if level == 5:
            self.problem_info = props.request_problem_information != 0
            if props.maximum_packet_size:
                self.max_packet_size = props.maximum_packet_size
            receive_maximum = props.receive_maximum or 0xFFFF
            if props.authentication_method is not None:
                self._refuse_connect_code(
                    BAD_AUTHENTICATION_METHOD,
                    "bad_authentication_method",
                    f"authentication method {props.authentication_method!r} is not supported:"
                    " send the client secret as the password",
                    claimed_client(p.username),
                )
                return
        client_id = p.client_id
        assigned: str | None = None
        if not client_id:
            if level == 4 and not p.clean_start:
                self._refuse_connect_code(
                    V3_IDENTIFIER_REJECTED,
                    "identifier_rejected",
                    "an empty client identifier needs clean session",
                    claimed_client(p.username),
                )
                return
            client_id = assigned = "conduit-" + secrets.token_hex(10)
        keep_alive = p.keep_alive
        server_keep_alive: int | None = None
        if adapter.max_keep_alive and (not keep_alive or keep_alive > adapter.max_keep_alive):
            if level == 4:
                self._refuse_connect_code(
                    V3_IDENTIFIER_REJECTED,
                    "keep_alive_too_long",
                    f"keep alive {keep_alive} s exceeds the server's {adapter.max_keep_alive} s",
                    claimed_client(p.username),
                )
                return
            keep_alive = server_keep_alive = adapter.max_keep_alive
        # credentials: user name = client id, password = client secret
        if not p.password:
            self._refuse_connect(
                AuthenticationError(
                    "no password: send the client secret as the password",
                    Condition.NO_CREDENTIALS,
                ),
                claimed_client(p.username),
            )
            return
        try:
            secret = p.password.decode()
        except UnicodeDecodeError:
            self._refuse_connect(
                AuthenticationError("the password is not UTF-8"), claimed_client(p.username)
            )
            return
        try:
            identity = await self.gateway.authenticate(Credentials(secret, p.username or None))
        except ConduitError as exc:
            self._refuse_connect(exc, claimed_client(p.username))
            return
        if self.state == CLOSED:
            return
        self.identity = identity
        self._unregister = self.gateway.connected(identity, self.revoked)
        will = p.will
        if will is not None:
            try:
                await adapter.check_will(identity, will)
            except ConduitError as exc:
                self._refuse_connect(exc, identity.client_id)
                return
            except MQTTProtocolError as exc:  # payload format invalid
                self._refuse_connect_code(
                    exc.reason_code if level == 5 else V3_NOT_AUTHORIZED,
                    REASON_NAMES.get(exc.reason_code, "will_refused"),
                    f"will: {exc.message}",
                    identity.client_id,
                )
                return
            if self.state == CLOSED:
                return
        if level == 5:
            expiry = props.session_expiry_interval or 0
        else:
            expiry = 0 if p.clean_start else adapter.max_session_expiry
        granted_expiry = min(expiry, adapter.max_session_expiry)
        session, present = adapter.open_session(self, identity, client_id, p.clean_start)
        self.gateway.metrics.conns[PROTOCOL].inc()
        session.expiry = granted_expiry
        session.will = will
        self.session = session
        self.state = CONNECTED
        if keep_alive:
            self.keep_alive = keep_alive * 1.5
        # CONNACK
        if level == 5:
            self.send_packet(
                ConnAck(
                    present,
                    0,
                    Properties(
                        session_expiry_interval=(
                            granted_expiry if granted_expiry != expiry else None
                        ),
                        assigned_client_identifier=assigned,
                        server_keep_alive=server_keep_alive,
                        receive_maximum=adapter.max_inflight,
                        topic_alias_maximum=adapter.topic_alias_maximum or None,
                        maximum_packet_size=adapter.max_packet_size,
                    ),
                )
            )
        else:
            self.send(b"\x20\x02\x01\x00" if present else b"\x20\x02\x00\x00")
        session.attach(self, receive_maximum)

    def _refuse_connect(self, error: ConduitError, client: str | None) -> None:
        """CONNACK with the error table's code, then close. ``client``: who to name in the log,
        never a raw user name (see :func:`~core.noise.claimed_client`)."""
        if self.state == CLOSED:  # closed while authenticating (CONNECT timeout, shutdown)
            return
        self.gateway.refused(PROTOCOL, error, client)
        answer = error.condition.answer
        if self.level == 5:
            code = answer.mqtt5 if answer.mqtt5 in CONNACK_CODES else UNSPECIFIED_ERROR
            self.send_packet(ConnAck(False, code, Properties(reason_string=error.detail)))
        else:
            code = answer.mqtt3 if answer.mqtt3 in (1, 2, 3, 4, 5) else V3_NOT_AUTHORIZED
            self.send(bytes((0x20, 2, 0, code)))
        self.close(will=False, reason_code=answer.mqtt5)

    def _refuse_connect_code(self, code: int, reason: str, detail: str, client: str | None) -> None:
        """CONNACK with a protocol code (not from the error table), then close."""
        if self.state == CLOSED:
            return
        self.adapter.protocol_refused(reason, detail, client)
        if self.level == 5:
            self.send_packet(ConnAck(False, code, Properties(reason_string=detail)))
        else:
            self.send(bytes((0x20, 2, 0, code)))
        self.close(will=False, reason_code=code)

    def _detach(self, will: bool) -> None:
        session = self.session
        if session is not None and session.outlet is self:
            session.detach()
            self.adapter.session_detached(session, will)

    def revoked(self, reason: str) -> None:
        """The client was disabled or deleted: DISCONNECT 0x87 (MQTT 5), close."""
        self.disconnect(NOT_AUTHORIZED, reason)

    def take_over(self) -> None:
        """Another connection takes this one's session: DISCONNECT 0x8E (MQTT 5), close."""
        self.disconnect(SESSION_TAKEN_OVER, "another connection took the session over")

    def timed_out(self, now: float) -> None:
        """Called by the adapter's sweep: CONNECT or keep-alive timeout; a closing connection
        whose linger is over, or whose peer does not read what is left to write."""
        if self.state == CLOSED:
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
        elif self.state in (WAITING, CONNECTING):
            if now - self.born > self.adapter.connect_timeout:
                self.adapter.protocol_refused(
                    "connect_timeout",
                    f"no CONNECT within {self.adapter.connect_timeout:g} s",
                    self.client,
                )
                self.close(will=False)
        elif self.keep_alive and now - self.last_rx > self.keep_alive:
            self.adapter.protocol_refused(
                "keep_alive_timeout",
                f"nothing received for {self.keep_alive:g} s (1.5 x keep alive)",
                self.client,
            )
            self.disconnect(KEEP_ALIVE_TIMEOUT, "keep alive timeout")

    # ---------------------------------------------------------------------------------------
    # PUBLISH from the client

    def _publish(self, p: Publish) -> None:
        session = self.session
        assert session is not None
        props = p.properties
        topic = p.topic
        qos = p.qos
        if props is not EMPTY_PROPERTIES:
            alias = props.topic_alias
            if alias is not None:
                if not 0 < alias <= self.adapter.topic_alias_maximum:
                    raise MQTTProtocolError(
                        TOPIC_ALIAS_INVALID,
                        f"topic alias {alias} is not in 1..{self.adapter.topic_alias_maximum}",
                    )
                aliases = self.aliases
                if aliases is None:
                    aliases = self.aliases = {}
                if topic:
                    aliases[alias] = topic
                else:
                    found = aliases.get(alias)
                    if found is None:
                        raise MQTTProtocolError(
                            codec.PROTOCOL_ERROR, f"topic alias {alias} has no topic yet"
                        )
                    topic = found
            if props.subscription_identifiers:
                raise MQTTProtocolError(
                    codec.PROTOCOL_ERROR, "a client's PUBLISH carries a subscription identifier"
                )
            if props.payload_format_indicator == 1:
                try:
                    codec.check_payload_format(p.payload, props)
                except MQTTProtocolError as exc:
                    self.adapter.protocol_refused(
                        "payload_format_invalid", exc.message, self.client
                    )
                    self._answer_refused(p, exc.reason_code, exc.message)
                    return
        if qos == 2:
            if session.is_duplicate(p.packet_id):
                self.send(_ack(0x50, p.packet_id))  # already published: acknowledge again
                return
            if session.awaiting >= self.adapter.max_inflight:
                raise MQTTProtocolError(
                    RECEIVE_MAXIMUM_EXCEEDED,
                    f"more than {self.adapter.max_inflight} QoS 2 messages awaiting PUBREL",
                )
        content_type, metadata = inbound(
            props,
            qos,
            p.retain,
            self.adapter.content_type,
            session.token if session.no_local else None,
        )
        if p.retain:
            self.spawn(self._publish_async(p, topic, content_type, metadata))
            return
        assert self.identity is not None
        try:
            message = self.gateway.publish_nowait(
                self.identity, topic, p.payload, content_type, PROTOCOL, metadata
            )
        except ConduitError as exc:
            self._refuse_publish(p, exc)
            return
        if message is None:
            self.spawn(self._publish_async(p, topic, content_type, metadata))
            return
        if qos:
            self._published(p)

    async def _publish_async(
        self, p: Publish, topic: str, content_type: str, metadata: dict[str, str] | None
    ) -> None:
        assert self.identity is not None
        try:
            await self.gateway.publish(
                self.identity,
                topic,
                p.payload,
                content_type,
                PROTOCOL,
                metadata,
                retain=p.retain,
            )
        except ConduitError as exc:
            if self.state != CLOSED:
                self._refuse_publish(p, exc)
            return
        if self.state != CLOSED and p.qos:
            self._published(p)

    def _published(self, p: Publish) -> None:
        if p.qos == 1:
            self.send(_ack(0x40, p.packet_id))
        else:
            assert self.session is not None
            self.session.received(p.packet_id)
            self.send(_ack(0x50, p.packet_id))

    def _refuse_publish(self, p: Publish, error: ConduitError) -> None:
        self.refused(error)
        self._answer_refused(p, error.condition.answer.mqtt5, error.detail)

    def _answer_refused(self, p: Publish, code: int, detail: str) -> None:
        """MQTT 5 QoS 1/2: PUBACK/PUBREC with the code where it has one; otherwise DISCONNECT
        with the code (MQTT 5) or close (3.1.1)."""
        if self.level == 5 and p.qos and code in PUBACK_CODES:
            props = Properties(reason_string=detail) if self.problem_info else EMPTY_PROPERTIES
            ack = PubAck if p.qos == 1 else PubRec
            self.send_packet(ack(p.packet_id, code, props))
            return
        self.disconnect(code, detail)

    # ---------------------------------------------------------------------------------------
    # acknowledgements of deliveries

    def _pubrec(self, p: PubRec, session: Session) -> None:
        if p.reason_code >= 0x80:  # the client refused the message: it is done
            session.discard(p.packet_id)
            session.pump()
        elif session.pubrec(p.packet_id) or self.level == 4:
            self.send(_ack(0x62, p.packet_id))
        else:
            self.send_packet(PubRel(p.packet_id, PACKET_ID_NOT_FOUND))

    # ---------------------------------------------------------------------------------------
    # SUBSCRIBE, UNSUBSCRIBE

    async def _subscribe(self, p: Subscribe) -> None:
        session = self.session
        identity = self.identity
        assert session is not None and identity is not None
        ids = p.properties.subscription_identifiers
        subscription_id = ids[0] if ids else 0
        codes: list[int] = []
        details: list[str] = []
        retained: list[Sub] = []
        for s in p.subscriptions:
            sub_filter = s.topic_filter
            group: str | None = None
            topic_filter = sub_filter
            if sub_filter.startswith("$share/"):
                _, group, topic_filter = [*sub_filter.split("/", 2), "", ""][:3]
                if not group or "+" in group or "#" in group or not topic_filter:
                    detail = f"{sub_filter!r} is not $share/<group>/<filter>"
                    self.adapter.protocol_refused("bad_topic", detail, self.client)
                    codes.append(TOPIC_FILTER_INVALID)
                    details.append(detail)
                    continue
            existing = session.subs.get(sub_filter)
            if existing is not None:
                existing.qos = s.qos
                existing.retain_as_published = s.retain_as_published
                existing.retain_handling = s.retain_handling
                existing.subscription_id = subscription_id
                if existing.no_local != s.no_local:
                    session.no_local += 1 if s.no_local else -1
                    existing.no_local = s.no_local
                codes.append(s.qos)
                if group is None and s.retain_handling == 0:
                    retained.append(existing)
                continue
            sub = Sub(
                session,
                sub_filter,
                topic_filter,
                group,
                s.qos,
                s.no_local,
                s.retain_as_published,
                s.retain_handling,
                subscription_id,
            )
            try:
                bus = await self.gateway.subscribe(
                    identity,
                    topic_filter,
                    PROTOCOL,
                    sink=sub,
                    group=group,
                    on_close=self.adapter.subscription_closed,
                )
            except ConduitError as exc:
                self.refused(exc)
                code = exc.condition.answer.mqtt5
                if exc.condition in (Condition.BAD_TOPIC, Condition.NOT_FOUND):
                    code = TOPIC_FILTER_INVALID
                codes.append(code if code in SUBACK_CODES else UNSPECIFIED_ERROR)
                details.append(f"{sub_filter}: {exc.detail}")
                continue
            sub.bus = bus
            if self.state == CLOSED or session.outlet is not self:
                sub.active = False
                await self.gateway.unsubscribe(bus, "connection closed")
                return
            old = session.subs.get(sub_filter)  # another SUBSCRIBE cannot interleave; be safe
            if old is not None:
                old.active = False
                if old.bus is not None:
                    await self.gateway.unsubscribe(old.bus, "replaced")
            session.subs[sub_filter] = sub
            if sub.no_local:
                session.no_local += 1
            codes.append(s.qos)
            if group is None and s.retain_handling in (0, 1):
                retained.append(sub)
        if self.state == CLOSED:
            return
        props = EMPTY_PROPERTIES
        if details and self.level == 5 and self.problem_info:
            props = Properties(reason_string="; ".join(details))
        self.send_packet(SubAck(p.packet_id, codes, props))
        for sub in retained:
            try:
                messages = await self.gateway.retained(identity, sub.topic_filter)
            except ConduitError as exc:
                log.warning(
                    "mqtt: cannot send retained messages client=%s filter=%s: %s",
                    identity.client_id,
                    printable(sub.filter),
                    printable(exc.detail),
                )
                continue
            if self.state == CLOSED or not sub.active:
                return
            for message in messages:
                session.offer(sub, message, True)

    async def _unsubscribe(self, p: Unsubscribe) -> None:
        session = self.session
        assert session is not None
        codes: list[int] = []
        for topic_filter in p.topic_filters:
            sub = session.subs.pop(topic_filter, None)
            if sub is None:
                codes.append(NO_SUBSCRIPTION_EXISTED)
                continue
            sub.active = False
            if sub.no_local:
                session.no_local -= 1
            if sub.bus is not None:
                await self.gateway.unsubscribe(sub.bus, "unsubscribed")
            codes.append(0)
        if self.state != CLOSED:
            self.send_packet(UnsubAck(p.packet_id, codes if self.level == 5 else []))

    # ---------------------------------------------------------------------------------------
    # DISCONNECT from the client

    def _disconnected(self, p: Disconnect) -> None:
        session = self.session
        assert session is not None
        expiry = p.properties.session_expiry_interval
        if expiry is not None:
            if session.expiry == 0 and expiry != 0:
                raise MQTTProtocolError(
                    codec.PROTOCOL_ERROR,
                    "DISCONNECT sets a session expiry after CONNECT asked for none",
                )
            session.expiry = min(expiry, self.adapter.max_session_expiry)
        self.clean_exit = p.reason_code != DISCONNECT_WITH_WILL
        self.close(will=not self.clean_exit)

    def shutdown(self) -> None:
        """The server is stopping: DISCONNECT 0x8B (MQTT 5), close, no will."""
        self.disconnect(SERVER_SHUTTING_DOWN, "server shutting down", will=False)
