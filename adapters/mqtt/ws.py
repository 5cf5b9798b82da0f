"""MQTT over WebSocket (MQTT 5 section 6, MQTT 3.1.1 section 6): the MQTT byte stream in binary
frames.

The WebSocket handshake and framing are the sans-I/O ``websockets.server.ServerProtocol``;
:class:`WebSocketConnection` only plugs it between the socket and the MQTT side it shares with
the TCP connection (:class:`~adapters.mqtt.connection.Connection`): binary frames (and their
continuations) carry the MQTT byte stream in both directions, in any split. The upgrade is
accepted on the adapter's ``ws_path`` (``/mqtt``) with the ``mqtt`` subprotocol selected when
the client offers it (clients that offer none are accepted too). A text frame is a protocol
error (the connection is closed with 1003).

Closing: the server sends its close frame after the last MQTT bytes (a DISCONNECT, a refusing
CONNACK), with a close code that says why in WebSocket terms (:data:`CLOSE_CODES`: 1002 for
input that breaks MQTT, 1008 for a refusal, 1001 on shutdown, ...). From then on frames are
read but ignored (nothing more reaches the MQTT channel, however many frames one read holds),
until the client answers with its close frame; then the server shuts its write side (TCP) and
closes when the client does, or after the linger (see :mod:`adapters.mqtt.connection`).
"""

from __future__ import annotations

from typing import Final
from urllib.parse import urlsplit

from websockets.frames import CloseCode, Frame, Opcode
from websockets.http11 import Request
from websockets.protocol import State
from websockets.server import ServerProtocol
from websockets.typing import Subprotocol

from adapters.mqtt.codec import ReasonCode
from adapters.mqtt.connection import Connection, ConnectionSet
from adapters.mqtt.sessions import SessionRegistry

_MQTT = Subprotocol("mqtt")

#: The WebSocket close code for the MQTT 5 reason code a connection ends with (others: 1000).
CLOSE_CODES: Final[dict[int, CloseCode]] = {
    ReasonCode.MALFORMED_PACKET: CloseCode.PROTOCOL_ERROR,
    ReasonCode.PROTOCOL_ERROR: CloseCode.PROTOCOL_ERROR,
    ReasonCode.UNSUPPORTED_PROTOCOL_VERSION: CloseCode.PROTOCOL_ERROR,
    ReasonCode.TOPIC_NAME_INVALID: CloseCode.PROTOCOL_ERROR,
    ReasonCode.RECEIVE_MAXIMUM_EXCEEDED: CloseCode.PROTOCOL_ERROR,
    ReasonCode.TOPIC_ALIAS_INVALID: CloseCode.PROTOCOL_ERROR,
    ReasonCode.PACKET_TOO_LARGE: CloseCode.MESSAGE_TOO_BIG,
    ReasonCode.PAYLOAD_FORMAT_INVALID: CloseCode.INVALID_DATA,
    ReasonCode.BAD_USER_NAME_OR_PASSWORD: CloseCode.POLICY_VIOLATION,
    ReasonCode.NOT_AUTHORIZED: CloseCode.POLICY_VIOLATION,
    ReasonCode.BAD_AUTHENTICATION_METHOD: CloseCode.POLICY_VIOLATION,
    ReasonCode.QUOTA_EXCEEDED: CloseCode.POLICY_VIOLATION,
    ReasonCode.SERVER_UNAVAILABLE: CloseCode.INTERNAL_ERROR,
    ReasonCode.SERVER_BUSY: CloseCode.INTERNAL_ERROR,
    ReasonCode.SERVER_SHUTTING_DOWN: CloseCode.GOING_AWAY,
}


def _select(protocol: ServerProtocol, offered: object) -> Subprotocol | None:
    return _MQTT if isinstance(offered, list) and _MQTT in offered else None


class WebSocketConnection(Connection):
    """An MQTT connection carried in WebSocket binary frames."""

    __slots__ = ("ws",)

    def __init__(self, conns: ConnectionSet, registry: SessionRegistry) -> None:
        super().__init__(conns, registry)
        self.ws = ServerProtocol(
            select_subprotocol=_select,
            # One WebSocket message may hold several MQTT packets, or part of one.
            max_size=conns.options.max_packet_size + 65_536,
        )

    def data_received(self, data: bytes) -> None:
        ws = self.ws
        try:
            ws.receive_data(data)
        except EOFError:  # data after the end of the stream
            return
        for event in ws.events_received():
            if self.closing:
                break  # closing: the frames still in this read are ignored
            if isinstance(event, Request):
                self._handshake(event)
            elif isinstance(event, Frame):
                if event.opcode is Opcode.BINARY or event.opcode is Opcode.CONT:
                    if event.data:
                        self.received(event.data)
                elif event.opcode is Opcode.TEXT:
                    self.channel.protocol_refused(
                        "protocol_error", "MQTT over WebSocket uses binary frames"
                    )
                    if ws.state is State.OPEN:
                        ws.send_close(CloseCode.UNSUPPORTED_DATA, "MQTT needs binary frames")
                        self._write_ws()
                    self.channel.close()
                    break
        self._write_ws()

    def eof_received(self) -> bool | None:
        self.ws.receive_eof()
        self._write_ws()
        return None  # the transport closes

    def _handshake(self, request: Request) -> None:
        ws = self.ws
        path = urlsplit(request.path).path
        ws_path = self.conns.options.ws_path
        if path != ws_path:
            response = ws.reject(404, f"MQTT over WebSocket is served on {ws_path}")
        else:
            response = ws.accept(request)
        ws.send_response(response)
        if response.status_code != 101:
            self.channel.protocol_refused(
                "bad_upgrade", f"WebSocket upgrade refused: {response.status_code}"
            )

    def _write_ws(self) -> None:
        transport = self.transport
        if transport is None:
            return
        for chunk in self.ws.data_to_send():
            if chunk:
                if not self.half_close and not transport.is_closing():
                    transport.write(chunk)
            else:  # end of stream: the closing handshake is over (or the WebSocket failed)
                if not self.closing:
                    self.channel.close()  # the client closed first, or sent what WebSocket forbids
                if transport.can_write_eof():
                    self._shut()  # shut the write side, linger for the client
                elif not transport.is_closing():
                    transport.close()  # TLS cannot half-close; the client's close frame is in
                return

    def _write(self, data: bytes) -> None:
        if self.ws.state is State.OPEN:  # not once a close frame went either way
            self.ws.send_binary(data)
            self._write_ws()

    def _end(self, reason_code: int) -> None:
        """Send the close frame (after the bytes already written) and linger for the client's;
        the TCP side ends in :meth:`_write_ws` once the closing handshake is over."""
        ws = self.ws
        if ws.state is State.CONNECTING or ws.state is State.CLOSED:  # no WebSocket to close
            self._shut()
            return
        if ws.state is State.OPEN:
            ws.send_close(CLOSE_CODES.get(reason_code, CloseCode.NORMAL_CLOSURE))
            self._write_ws()
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.resume_reading()
