"""One MQTT connection on asyncio: paho-mqtt's client driven by the event loop, with MQTT 5
enhanced authentication (AUTH packets) added.

paho-mqtt does the protocol (encoding, keep-alive, QoS 1 flows, TLS, WebSocket transport);
this module gives it the event loop instead of a thread (paho's external-loop callbacks:
``on_socket_open``, ``on_socket_register_write``, ...) and turns its callbacks into awaitables:
:meth:`Connection.publish` returns the PUBACK's reason code, :meth:`Connection.subscribe` the
SUBACK's.

paho speaks MQTT 5 but neither sends nor accepts AUTH packets (an AUTH from the server is a
protocol error to it). Conduit renews a connection's token in place with them (method
``CONDUIT-TOKEN``: the client sends AUTH 0x19 with a fresh token, the server answers AUTH 0x00),
so :class:`_Paho` adds exactly that. It relies on two paho internals, ``_packet_handle`` and
``_packet_queue``: the versions are pinned in ``pyproject.toml`` and the tests exercise both
against a real Conduit.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

METHOD = "CONDUIT-TOKEN"
REAUTHENTICATE = 0x19


@dataclass(frozen=True, slots=True)
class Ended:
    """Why a connection ended: the reason code (an MQTT 5 reason code, a 3.1.1 CONNACK code,
    or None for a network loss) and the server's reason string, if it sent one."""

    code: int | None
    reason: str | None


class Refused(Exception):
    """The server answered a CONNECT, PUBLISH, SUBSCRIBE or AUTH with a failure code."""

    def __init__(self, what: str, code: int, reason: str | None) -> None:
        super().__init__(f"{what} refused: 0x{code:02x}" + (f" {reason}" if reason else ""))
        self.what = what
        self.code = code
        self.reason = reason


class _Paho(paho.Client):
    """paho's client with AUTH packets (MQTT 5, section 3.15) and the reason string of the
    server's DISCONNECT, which paho does not pass on."""

    on_auth: Callable[[int, Properties], None] | None = None
    disconnect_reason: str | None = None

    def send_auth(self, reason_code: int, properties: Properties) -> MQTTErrorCode:
        body = bytearray([reason_code]) + properties.pack()  # type: ignore[no-untyped-call]
        packet = bytearray([paho.AUTH])
        self._pack_remaining_length(packet, len(body))
        packet.extend(body)
        return self._packet_queue(paho.AUTH, packet, 0, 0)

    def _packet_handle(self) -> MQTTErrorCode:
        command = self._in_packet["command"] & 0xF0
        body = self._in_packet["packet"]
        if command == paho.AUTH and self._protocol == paho.MQTTv5:
            properties = properties_of(PacketTypes.AUTH)
            if len(body) > 1:
                properties.unpack(body[1:])  # type: ignore[no-untyped-call]
            if self.on_auth is not None:
                self.on_auth(body[0] if body else 0, properties)
            return MQTTErrorCode.MQTT_ERR_SUCCESS
        if command == paho.DISCONNECT and len(body) > 1:
            properties = properties_of(PacketTypes.DISCONNECT)
            with contextlib.suppress(Exception):  # a malformed one: paho reports it
                properties.unpack(body[1:])  # type: ignore[no-untyped-call]
                self.disconnect_reason = getattr(properties, "ReasonString", None)
        return super()._packet_handle()


def _code(value: Any) -> int:
    return int(value.value) if isinstance(value, ReasonCode) else int(value)


def properties_of(packet_type: int) -> Properties:
    """Empty MQTT 5 properties of a packet type (paho's class is untyped)."""
    return Properties(packet_type)  # type: ignore[no-untyped-call]


class Connection:
    """One connection to the broker; made by :func:`open`, ended by :meth:`close` or by the
    network or the server (then :attr:`ended` holds why)."""

    def __init__(
        self,
        client_id: str,
        *,
        version: int,
        transport: str,
        path: str,
        tls: ssl.SSLContext | None,
        clean_start: bool,
        on_message: Callable[[paho.MQTTMessage], None],
    ) -> None:
        self._loop = asyncio.get_running_loop()
        protocol = paho.MQTTv5 if version == 5 else paho.MQTTv311
        client = _Paho(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            clean_session=None if version == 5 else clean_start,
            protocol=protocol,
            transport="websockets" if transport == "websockets" else "tcp",
            reconnect_on_failure=False,
        )
        if transport == "websockets":
            client.ws_set_options(path=path)
        if tls is not None:
            client.tls_set_context(tls)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_subscribe = self._on_subscribe
        client.on_message = lambda _c, _u, message: on_message(message)
        client.on_socket_open = self._on_socket_open
        client.on_socket_close = self._on_socket_close
        client.on_socket_register_write = self._on_register_write
        client.on_socket_unregister_write = self._on_unregister_write
        client.on_auth = self._on_auth
        self._client = client
        self.version = version
        self._clean_start = clean_start
        self._connack: asyncio.Future[Properties | None] = self._loop.create_future()
        self.ended: asyncio.Future[Ended] = self._loop.create_future()
        self._acks: dict[int, asyncio.Future[int]] = {}
        self._subacks: dict[int, asyncio.Future[list[int]]] = {}
        self._auth: asyncio.Future[tuple[int, str | None]] | None = None
        self._misc: asyncio.Task[None] | None = None
        self._fd = -1

    # --- lifecycle --------------------------------------------------------------------------

    async def open(
        self,
        host: str,
        port: int,
        *,
        keepalive: int,
        username: str | None,
        password: str | None,
        token: str | None,
        session_expiry: int,
        timeout: float,
    ) -> Properties | None:
        """CONNECT and wait for the CONNACK: its properties, or :class:`Refused`, OSError,
        TimeoutError. With ``token`` (MQTT 5) the broker token travels as the Authentication
        Data of ``CONDUIT-TOKEN``, else as the password."""
        client = self._client
        properties: Properties | None = None
        if self.version == 5:
            properties = properties_of(PacketTypes.CONNECT)
            properties.SessionExpiryInterval = session_expiry
            if token is not None:
                properties.AuthenticationMethod = METHOD
                properties.AuthenticationData = token.encode()
        elif token is not None:
            password = token
        if username is not None:
            client.username_pw_set(username, password)

        def connect() -> None:
            client.connect(
                host,
                port,
                keepalive,
                clean_start=self._clean_start
                if self.version == 5
                else paho.MQTT_CLEAN_START_FIRST_ONLY,
                properties=properties,
            )

        try:
            async with asyncio.timeout(timeout):
                # paho connects (and does the TLS handshake) with blocking calls.
                await self._loop.run_in_executor(None, connect)
                return await self._connack
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        """Drop the connection at once (no DISCONNECT)."""
        self._forget_socket()
        sock = self._client.socket()
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.close()
        self._end(None, None)

    async def close(self, timeout: float = 5.0) -> None:
        """DISCONNECT (normal), then wait for the socket to close."""
        if self.ended.done():
            return
        self._client.disconnect()
        try:
            async with asyncio.timeout(timeout):
                await asyncio.shield(self.ended)
        except TimeoutError:
            self.abort()

    # --- operations -------------------------------------------------------------------------

    async def publish(
        self, topic: str, payload: bytes, qos: int, retain: bool, properties: Properties | None
    ) -> None:
        """Send a PUBLISH; for QoS 1, wait for the PUBACK (:class:`Refused` with its code)."""
        info = self._client.publish(topic, payload, qos, retain, properties)
        if info.rc != paho.MQTT_ERR_SUCCESS:
            raise ConnectionError(paho.error_string(info.rc))
        if qos == 0:
            return
        future = self._acks[info.mid] = self._loop.create_future()
        code = await self._until_ended(future)
        if code >= 0x80:
            raise Refused("PUBLISH", code, None)

    async def subscribe(self, topic_filter: str, qos: int) -> int:
        """SUBSCRIBE one filter: the SUBACK's code (the granted QoS, or a failure >= 0x80)."""
        rc, mid = self._client.subscribe(topic_filter, qos)
        if rc != paho.MQTT_ERR_SUCCESS or mid is None:
            raise ConnectionError(paho.error_string(rc))
        future = self._subacks[mid] = self._loop.create_future()
        codes: list[int] = await self._until_ended(future)
        return codes[0]

    def unsubscribe(self, topic_filter: str) -> None:
        self._client.unsubscribe(topic_filter)

    async def reauthenticate(self, token: str, timeout: float) -> None:
        """AUTH 0x19 with a fresh token, and wait for the server's AUTH success. A refusal
        ends the connection (the server sends DISCONNECT): :class:`Refused` with its code."""
        if self._auth is not None:
            raise RuntimeError("a re-authentication is in progress")
        properties = properties_of(PacketTypes.AUTH)
        properties.AuthenticationMethod = METHOD
        properties.AuthenticationData = token.encode()
        self._auth = self._loop.create_future()
        try:
            rc = self._client.send_auth(REAUTHENTICATE, properties)
            if rc != paho.MQTT_ERR_SUCCESS:
                raise ConnectionError(paho.error_string(rc))
            async with asyncio.timeout(timeout):
                code, reason = await self._until_ended(self._auth)
        finally:
            self._auth = None
        if code != 0:
            raise Refused("AUTH", code, reason)

    async def _until_ended(self, future: asyncio.Future[Any]) -> Any:
        """The future's result, or ConnectionError (or :class:`Refused` for a DISCONNECT with a
        code) when the connection ends first."""
        done, _ = await asyncio.wait((future, self.ended), return_when=asyncio.FIRST_COMPLETED)
        if future in done:
            return future.result()
        ended = self.ended.result()
        if ended.code:
            raise Refused("connection", ended.code, ended.reason)
        raise ConnectionError("connection lost")

    # --- paho's callbacks -------------------------------------------------------------------

    def _on_connect(self, _c: Any, _u: Any, _f: Any, code: Any, properties: Any) -> None:
        if self._connack.done():
            return
        value = _code(code)
        if value == 0:
            self._connack.set_result(properties)
        else:
            reason = getattr(properties, "ReasonString", None) if properties else None
            self._connack.set_exception(Refused("CONNECT", value, reason))

    def _on_disconnect(self, _c: Any, _u: Any, flags: Any, code: Any, _p: Any) -> None:
        if flags.is_disconnect_packet_from_server:
            self._end(_code(code), self._client.disconnect_reason)
        else:
            self._end(None, None)

    # PUBACK and SUBACK come after publish() and subscribe() registered their futures: paho
    # reads only from the event loop. (For QoS 0, on_publish comes at once, and is ignored.)
    def _on_publish(self, _c: Any, _u: Any, mid: int, code: Any, _p: Any) -> None:
        future = self._acks.pop(mid, None)
        if future is not None and not future.done():
            future.set_result(_code(code))

    def _on_subscribe(self, _c: Any, _u: Any, mid: int, codes: Any, _p: Any) -> None:
        future = self._subacks.pop(mid, None)
        if future is not None and not future.done():
            future.set_result([_code(c) for c in codes])

    def _on_auth(self, code: int, properties: Properties) -> None:
        if self._auth is not None and not self._auth.done():
            self._auth.set_result((code, getattr(properties, "ReasonString", None)))

    def _end(self, code: int | None, reason: str | None) -> None:
        if not self.ended.done():
            self.ended.set_result(Ended(code, reason))
        if not self._connack.done():
            self._connack.set_exception(
                Refused("CONNECT", code, reason) if code else ConnectionError("connection lost")
            )
        if self._misc is not None:
            self._misc.cancel()

    # paho's socket callbacks: the first ones come from the executor thread that connects.
    def _on_socket_open(self, _c: Any, _u: Any, sock: Any) -> None:
        self._loop.call_soon_threadsafe(self._opened, sock.fileno())

    def _opened(self, fd: int) -> None:
        if self.ended.done():  # aborted while connecting
            sock = self._client.socket()
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.close()
            return
        self._fd = fd
        self._loop.add_reader(fd, self._read)
        self._misc = self._loop.create_task(self._keepalive())

    def _on_socket_close(self, _c: Any, _u: Any, sock: Any) -> None:
        self._forget_socket()

    def _forget_socket(self) -> None:
        fd = self._fd
        self._fd = -1
        if fd >= 0:
            self._loop.remove_reader(fd)
            self._loop.remove_writer(fd)

    def _on_register_write(self, _c: Any, _u: Any, sock: Any) -> None:
        self._loop.call_soon_threadsafe(self._want_write, sock.fileno())

    def _want_write(self, fd: int) -> None:
        if fd == self._fd:
            self._loop.add_writer(fd, self._client.loop_write)

    def _on_unregister_write(self, _c: Any, _u: Any, sock: Any) -> None:
        if self._fd >= 0:
            self._loop.remove_writer(self._fd)

    def _read(self) -> None:
        client = self._client
        while True:
            rc = client.loop_read()
            # An SSL socket may hold decrypted bytes that select() does not see.
            sock = client.socket()
            if rc == paho.MQTT_ERR_SUCCESS and isinstance(sock, ssl.SSLSocket) and sock.pending():
                continue
            break
        if rc not in (paho.MQTT_ERR_SUCCESS, paho.MQTT_ERR_AGAIN) and not self.ended.done():
            self._end(None, None)

    async def _keepalive(self) -> None:
        # paho's periodic work: keep-alive pings, and the end of a silent connection.
        while self._client.loop_misc() == paho.MQTT_ERR_SUCCESS:  # noqa: ASYNC110
            await asyncio.sleep(1.0)
