"""MQTT over WebSocket (MQTT 5 section 6, MQTT 3.1.1 section 6): the same connection, framed.

The WebSocket handshake and framing are the sans-I/O ``websockets.server.ServerProtocol``; this
module only plugs it between the socket and :class:`~adapters.mqtt.connection.MQTTConnection`:
binary frames (and their continuations) carry the MQTT byte stream in both directions, in any
split. The upgrade is accepted on the adapter's ``ws_path`` (``/mqtt``) with the ``mqtt``
subprotocol selected when the client offers it (clients that offer none are accepted too).
A text frame is a protocol error (the connection is closed with 1003).
"""

from __future__ import annotations

from typing import TYPE_CHECKING
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
            if isinstance(event, Request):
                self._handshake(event)
            elif isinstance(event, Frame):
                if event.opcode is Opcode.BINARY or event.opcode is Opcode.CONT:
                    if event.data and self.state != CLOSED:
                        self.mqtt_received(event.data)
                elif event.opcode is Opcode.TEXT:
                    self.adapter.protocol_refused(
                        "protocol_error", "MQTT over WebSocket uses binary frames", self.client
                    )
                    ws.send_close(CloseCode.UNSUPPORTED_DATA, "MQTT needs binary frames")
                    self._write_ws()
                    self.close()
                    return
        self._write_ws()

    def eof_received(self) -> bool | None:
        self.ws.receive_eof()
        self._write_ws()
        return None

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
                if not transport.is_closing():
                    transport.write(chunk)
            else:  # end of stream: the WebSocket is closed
                if self.state != CLOSED:
                    self.close()
                elif not transport.is_closing():
                    transport.close()
                return

    def write(self, data: bytes) -> None:
        if self.ws.state is State.OPEN:  # not once a close frame went either way
            self.ws.send_binary(data)
            self._write_ws()

    def close_transport(self) -> None:
        ws = self.ws
        if ws.state is State.OPEN:
            ws.send_close(CloseCode.NORMAL_CLOSURE)
            transport = self.transport
            if transport is not None and not transport.is_closing():
                for chunk in ws.data_to_send():
                    if chunk:
                        transport.write(chunk)
        super().close_transport()
