"""MQTT over WebSocket (MQTT 5 section 6, MQTT 3.1.1 section 6): the same connection, framed.

The WebSocket handshake and framing are the sans-I/O ``websockets.server.ServerProtocol``; this
module only plugs it between the socket and :class:`~adapters.mqtt.connection.MQTTConnection`:
binary frames (and their continuations) carry the MQTT byte stream in both directions, in any
split. The upgrade is accepted on the adapter's ``ws_path`` (``/mqtt``) with the ``mqtt``
subprotocol selected when the client offers it (clients that offer none are accepted too).
A text frame is a protocol error (the connection is closed with 1003).

Closing: the server sends its close frame after the last MQTT bytes (a DISCONNECT, a refusing
CONNACK), with a close code that says why in WebSocket terms (:data:`CLOSE_CODES`: 1002 for
input that breaks MQTT, 1008 for a refusal, 1001 on shutdown, ...). From then on frames are
read but ignored (nothing more reaches the MQTT connection, however many frames one read holds),
until the client answers with its close frame; then the server shuts its write side (TCP) and
closes when the client does, or after the linger (see :mod:`adapters.mqtt.connection`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final
from urllib.parse import urlsplit

from websockets.frames import CloseCode, Frame, Opcode
from websockets.http11 import Request
from websockets.protocol import State
from websockets.server import ServerProtocol
from websockets.typing import Subprotocol

from adapters.mqtt.connection import CLOSED, MQTTConnection

if TYPE_CHECKING:
    from adapters.mqtt.adapter import MQTTAdapter

_MQTT = Subprotocol("mqtt")

#: The WebSocket close code for the MQTT 5 reason code a connection ends with (others: 1000).
CLOSE_CODES: Final = {
    0x81: CloseCode.PROTOCOL_ERROR,  # malformed packet
    0x82: CloseCode.PROTOCOL_ERROR,  # protocol error
    0x84: CloseCode.PROTOCOL_ERROR,  # unsupported protocol version
    0x90: CloseCode.PROTOCOL_ERROR,  # topic name invalid
    0x93: CloseCode.PROTOCOL_ERROR,  # receive maximum exceeded
    0x94: CloseCode.PROTOCOL_ERROR,  # topic alias invalid
    0x95: CloseCode.MESSAGE_TOO_BIG,  # packet too large
    0x99: CloseCode.INVALID_DATA,  # payload format invalid
    0x86: CloseCode.POLICY_VIOLATION,  # bad user name or password
    0x87: CloseCode.POLICY_VIOLATION,  # not authorized
    0x8C: CloseCode.POLICY_VIOLATION,  # bad authentication method
    0x97: CloseCode.POLICY_VIOLATION,  # quota exceeded
    0x88: CloseCode.INTERNAL_ERROR,  # server unavailable
    0x89: CloseCode.INTERNAL_ERROR,  # server busy
    0x8B: CloseCode.GOING_AWAY,  # server shutting down
}


def _select(protocol: ServerProtocol, offered: object) -> Subprotocol | None:
    return _MQTT if isinstance(offered, list) and _MQTT in offered else None


class MQTTWebSocketConnection(MQTTConnection):
    """An MQTT connection carried in WebSocket binary frames."""

    __slots__ = ("ws",)

    def __init__(self, adapter: MQTTAdapter) -> None:
        super().__init__(adapter)
        self.ws = ServerProtocol(
            select_subprotocol=_select,
            # One WebSocket message may hold several MQTT packets, or part of one.
            max_size=adapter.max_packet_size + 65_536,
        )

    def data_received(self, data: bytes) -> None:
        ws = self.ws
        try:
            ws.receive_data(data)
        except EOFError:  # data after the end of the stream
            return
        for event in ws.events_received():
            if self.state == CLOSED:
                break  # closing: the frames still in this read are ignored
            if isinstance(event, Request):
                self._handshake(event)
            elif isinstance(event, Frame):
                if event.opcode is Opcode.BINARY or event.opcode is Opcode.CONT:
                    if event.data:
                        self.mqtt_received(event.data)
                elif event.opcode is Opcode.TEXT:
                    self.adapter.protocol_refused(
                        "protocol_error", "MQTT over WebSocket uses binary frames", self.client
                    )
                    if ws.state is State.OPEN:
                        ws.send_close(CloseCode.UNSUPPORTED_DATA, "MQTT needs binary frames")
                        self._write_ws()
                    self.close()
                    break
        self._write_ws()

    def eof_received(self) -> bool | None:
        self.ws.receive_eof()
        self._write_ws()
        return None  # the transport closes

    def _handshake(self, request: Request) -> None:
        ws = self.ws
        path = urlsplit(request.path).path
        if path != self.adapter.ws_path:
            response = ws.reject(404, f"MQTT over WebSocket is served on {self.adapter.ws_path}")
        else:
            response = ws.accept(request)
        ws.send_response(response)
        if response.status_code != 101:
            self.adapter.protocol_refused(
                "bad_upgrade", f"WebSocket upgrade refused: {response.status_code}", None
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
                if self.state != CLOSED:
                    self.close()  # the client closed first, or sent what WebSocket forbids
                if transport.can_write_eof():
                    super().close_transport()  # shut the write side, linger for the client
                elif not transport.is_closing():
                    transport.close()  # TLS cannot half-close; the client's close frame is in
                return

    def write(self, data: bytes) -> None:
        if self.ws.state is State.OPEN:  # not once a close frame went either way
            self.ws.send_binary(data)
            self._write_ws()

    def close_transport(self, reason_code: int = 0) -> None:
        """Send the close frame (after the bytes already written) and linger for the client's;
        the TCP side ends in :meth:`_write_ws` once the closing handshake is over."""
        ws = self.ws
        if ws.state is State.CONNECTING or ws.state is State.CLOSED:  # no WebSocket to close
            super().close_transport(reason_code)
            return
        self.lingering = True
        if ws.state is State.OPEN:
            ws.send_close(CLOSE_CODES.get(reason_code, CloseCode.NORMAL_CLOSURE))
            self._write_ws()
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.resume_reading()
