"""The MQTT channel: the rules of one MQTT connection, without the connection.

As EMQX splits ``emqx_channel`` from ``emqx_connection``, a :class:`Channel` holds everything
MQTT decides for one client and touches no socket: CONNECT (protocol version, client
identifier, keep-alive policy, credentials, the will, the session and its CONNACK), PUBLISH
(topic aliases, payload format, QoS 2 duplicates, the gateway), acknowledgements,
SUBSCRIBE (``$share``) and UNSUBSCRIBE, PINGREQ, DISCONNECT, malformed input, flow control (the
client's Receive Maximum and Maximum Packet Size, a congested connection) and the timeouts.
The TCP and WebSocket connections (:mod:`adapters.mqtt.connection`, :mod:`adapters.mqtt.ws`)
build one each and only move bytes.

What the channel does with a packet (:meth:`Channel.handle`), in the order packets arrive:

- it answers through its :class:`Link`: packets to send, each encoded by the codec and queued
  (``send``; PUBLISHes to the client ``deliver``, which the session uses too), and the end of
  the connection (``close``, with the MQTT 5 reason code it ends with: MQTT over WebSocket maps
  it to a close code). The link's writes are corked: what one loop turn queues is written once;
- it returns None when the packet is done, or a coroutine when the packet needs the gateway
  asynchronously (CONNECT, SUBSCRIBE, UNSUBSCRIBE, a retained publish, a publish whose rights are
  not cached): the connection runs it and hands over no packet before it is done (reading
  paused), so packets keep their order. The common case, a PUBLISH whose rights are cached
  (``gateway.publish_nowait``), returns None and allocates nothing of the channel's own;
- timers: until CONNACK the connection must report its age (:attr:`Options.connect_timeout
  <adapters.mqtt.options.Options.connect_timeout>`); once connected, when :attr:`keep_alive` is
  set, how long it has been silent. :meth:`Channel.timed_out` decides what that means.

States (:class:`State`): waiting for CONNECT, connecting (authentication in progress),
connected, closed. A closed channel handles nothing more: its connection reads and discards.

Refusals (DESIGN.md error table): CONNACK return codes (3.1.1) and reason codes (5.0) at
CONNECT; per-filter SUBACK codes; a refused PUBLISH is answered with a PUBACK/PUBREC reason code
(MQTT 5, QoS 1/2, where that packet type has the code) and otherwise with a DISCONNECT carrying
the code (MQTT 5) or a plain close (MQTT 3.1.1, which has no codes for it). Each refusal is
logged and counted once; the log names the authenticated client, or before authentication the
user name only when it has the shape of a client id (a device may put its secret there), and
escapes control characters in what the client sent (:mod:`core.noise`). Malformed input gets
the codec's reason code in a CONNACK or DISCONNECT (MQTT 5) or a close, and never affects
another connection.
"""

from __future__ import annotations

import enum
import logging
import secrets
import time
from collections.abc import Callable, Coroutine
from typing import Any, Final, Protocol, TypeAlias

from adapters.mqtt.codec import (
    EMPTY_PROPERTIES,
    MAX_PACKET_SIZE,
    PINGRESP_BYTES,
    Auth,
    ConnAck,
    Connect,
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
    ReasonCode,
    ReturnCode,
    SubAck,
    Subscribe,
    UnsubAck,
    Unsubscribe,
    Will,
    check_payload_format,
    encode,
    encode_puback,
    encode_pubcomp,
    encode_pubrec,
    encode_pubrel,
)
from adapters.mqtt.codec.reasons import (
    CONNACK_CODES,
    PUBACK_CODES,
    for_connack,
    for_disconnect,
    for_suback,
    refusal_name,
    v3_connack,
)
from adapters.mqtt.options import Options
from adapters.mqtt.publish import PROTOCOL, content_type_of, inbound
from adapters.mqtt.session import Session, Sub, shared
from adapters.mqtt.sessions import SessionRegistry
from core import senml
from core.bus import Subscription
from core.content import SENML
from core.credentials import Credentials, from_mqtt
from core.errors import AuthenticationError, Condition, ConduitError, QuotaError, TooLargeError
from core.gateway import Gateway
from core.identity import Identity
from core.noise import claimed_client, printable
from core.topics import parse_topic

log = logging.getLogger("conduit.mqtt")

#: Asynchronous work a packet needs; the connection runs it before the next packet.
Pending: TypeAlias = Coroutine[Any, Any, None]

AUTH_METHOD = "CONDUIT-TOKEN"
"""The MQTT 5 enhanced authentication method: a broker token as the Authentication Data at
CONNECT, and a fresh one in AUTH (0x19) to renew the connection's credentials in place."""


class State(enum.Enum):
    """Where a channel is in its life."""

    WAITING = "waiting"  # for CONNECT
    CONNECTING = "connecting"  # CONNECT being handled (authentication, will, session)
    CONNECTED = "connected"  # CONNACK sent
    CLOSED = "closed"  # ended: nothing more is handled


WAITING, CONNECTING, CONNECTED, CLOSED = State


class Link(Protocol):
    """What a channel needs of its connection."""

    def send(self, data: bytes) -> None:
        """Queue bytes for the client (written at the end of the loop turn)."""

    def deliver(self, data: bytes) -> None:
        """Queue a PUBLISH for the client, counted as a delivery."""

    def close(self, reason_code: int) -> None:
        """Write what is queued, then end the connection (the client gets it even while it is
        still sending). ``reason_code``: the MQTT 5 reason code the connection ends with."""


class _Gone:
    """The link of a channel whose connection is gone: what it is told goes nowhere."""

    def send(self, data: bytes) -> None:
        pass

    def deliver(self, data: bytes) -> None:
        pass

    def close(self, reason_code: int) -> None:
        pass


_GONE: Final = _Gone()


class Channel:
    """The MQTT side of one client connection; see the module docstring.

    ``send`` and ``deliver`` are the link's own methods: the session calls them directly (the
    channel is the session's :class:`~adapters.mqtt.session.Outlet`), with nothing in between
    on the delivery path. ``congested`` is flow control the connection keeps up to date (its
    write buffer is over the limit): QoS 0 deliveries are dropped, QoS 1/2 queued meanwhile.
    """

    __slots__ = (
        "_unregister",
        "aliases",
        "auth_method",
        "certificate",
        "clean_exit",
        "congested",
        "deliver",
        "gateway",
        "identity",
        "keep_alive",
        "level",
        "link",
        "max_packet_size",
        "options",
        "problem_info",
        "registry",
        "send",
        "session",
        "state",
    )

    def __init__(
        self, gateway: Gateway, options: Options, registry: SessionRegistry, link: Link
    ) -> None:
        self.gateway = gateway
        self.options = options
        self.registry = registry
        self.link = link
        self.send: Callable[[bytes], None] = link.send
        self.deliver: Callable[[bytes], None] = link.deliver
        self.state = WAITING
        self.level = 0  # the protocol level, once CONNECT says it (4 or 5)
        self.identity: Identity | None = None
        self.auth_method: str | None = None  # CONDUIT-TOKEN: enhanced authentication
        self._unregister: Callable[[], None] | None = None
        self.session: Session | None = None
        self.congested = False
        self.clean_exit = False  # DISCONNECT without will: no will when the connection ends
        self.problem_info = True  # MQTT 5 Request Problem Information
        self.max_packet_size = MAX_PACKET_SIZE  # the client's (MQTT 5 Maximum Packet Size)
        self.aliases: dict[int, str] | None = None  # the client's topic aliases
        self.keep_alive = 0.0  # seconds of silence tolerated (1.5 x keep alive); 0: none
        self.certificate: bytes | None = None  # the TLS client certificate (mutual TLS), DER

    @property
    def client(self) -> str | None:
        """Who to name in the log: the authenticated client id, else nobody (None)."""
        return self.identity.client_id if self.identity is not None else None

    # ---------------------------------------------------------------------------------------
    # packets from the client

    def handle(self, packet: Packet) -> Pending | None:
        """Act on one packet; None when done, else the work the next packet must wait for."""
        try:
            if type(packet) is Publish:
                if self.state is not CONNECTED:
                    raise MQTTProtocolError(ReasonCode.PROTOCOL_ERROR, "PUBLISH before CONNACK")
                return self._publish(packet)
            return self._dispatch(packet)
        except MQTTProtocolError as exc:
            self.malformed(exc)
            return None

    def _dispatch(self, packet: Packet) -> Pending | None:
        if self.state is WAITING:
            assert isinstance(packet, Connect)  # the decoder lets nothing else through first
            self.state = CONNECTING
            self.gateway.metrics.reqs[PROTOCOL].inc()
            return self._connect(packet)
        session = self.session
        assert session is not None
        if isinstance(packet, PubAck):
            if session.puback(packet.packet_id):
                session.pump()
        elif isinstance(packet, PubRec):
            self._pubrec(packet, session)
        elif isinstance(packet, PubRel):
            if session.released(packet.packet_id) or self.level == 4:
                self.send(encode_pubcomp(packet.packet_id))
            else:
                self.send_packet(PubComp(packet.packet_id, ReasonCode.PACKET_IDENTIFIER_NOT_FOUND))
        elif isinstance(packet, PubComp):
            if session.pubcomp(packet.packet_id):
                session.pump()
        elif isinstance(packet, PingReq):
            self.send(PINGRESP_BYTES)
        elif isinstance(packet, Subscribe):
            return self._subscribe(packet)
        elif isinstance(packet, Unsubscribe):
            return self._unsubscribe(packet)
        elif isinstance(packet, Disconnect):
            self._disconnected(packet)
        elif isinstance(packet, Connect):
            raise MQTTProtocolError(ReasonCode.PROTOCOL_ERROR, "a second CONNECT")
        elif isinstance(packet, Auth):
            self._check_auth(packet)
            return self._reauthenticate(packet)
        else:
            raise MQTTProtocolError(
                ReasonCode.PROTOCOL_ERROR,
                f"a client does not send {type(packet).__name__.upper()}",
            )
        return None

    def malformed(self, exc: MQTTProtocolError) -> None:
        """Input that breaks the protocol (from the codec or from the channel's own checks):
        answer with the code where the version has one, then close. Logged and counted once."""
        if self.state is CLOSED:
            return
        if exc.protocol_level is None:
            exc.protocol_level = self.level or None
        self.protocol_refused(refusal_name(exc.reason_code), exc.message)
        if self.state is WAITING or self.state is CONNECTING:
            # No CONNACK yet: answer in the version the client asked for, if any.
            if exc.v3_connack_code is not None:
                requested = exc.requested_level
                if requested is not None and requested > 5:
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
    # answers

    def send_packet(self, packet: Packet) -> None:
        """Encode and queue a control packet; drop its properties if the client's maximum
        packet size cannot take them (MQTT 5 section 3.1.2.25)."""
        data = encode(packet, self.level or 4)
        if len(data) > self.max_packet_size and getattr(packet, "properties", None):
            packet.properties = EMPTY_PROPERTIES  # type: ignore[union-attr]
            data = encode(packet, self.level or 4)
        self.send(data)

    def close(self, will: bool = True, reason_code: int = 0) -> None:
        """End the channel and its connection; ``will``: publish the will (an abnormal end).
        ``reason_code``: the MQTT 5 reason code the connection ends with."""
        if self.state is CLOSED:
            return
        self.state = CLOSED
        if self._unregister is not None:
            self._unregister()
            self._unregister = None
        self._detach(will)
        self.link.close(reason_code)

    def disconnect(self, reason_code: int, reason: str | None = None, will: bool = True) -> None:
        """Server-initiated end: DISCONNECT with a reason code (MQTT 5), then close."""
        if self.state is CLOSED:
            return
        if self.level == 5 and self.state is CONNECTED:
            reason_code = for_disconnect(reason_code)
            props = Properties(reason_string=reason) if reason else EMPTY_PROPERTIES
            self.send_packet(Disconnect(reason_code, props))
        self.close(will, reason_code)

    def protocol_refused(self, reason: str, detail: str) -> None:
        """Log and count a refusal that is not a core condition (protocol errors, timeouts);
        the gateway escapes what the detail quotes, and samples refusals of nobody."""
        self.gateway.refused_input(PROTOCOL, reason, detail, self.client)

    def refused(self, error: ConduitError) -> None:
        self.gateway.refused(PROTOCOL, error, self.client)

    # ---------------------------------------------------------------------------------------
    # events from outside: the gateway, the registry, the connection

    def revoked(self, reason: str) -> None:
        """The client was disabled or deleted, or its credentials expired: DISCONNECT 0x87
        (MQTT 5), close."""
        self.disconnect(ReasonCode.NOT_AUTHORIZED, reason)

    def take_over(self) -> None:
        """Another connection takes this one's session: DISCONNECT 0x8E (MQTT 5), close."""
        self.disconnect(ReasonCode.SESSION_TAKEN_OVER, "another connection took the session over")

    def shutdown(self) -> None:
        """The server is stopping: DISCONNECT 0x8B (MQTT 5), close, no will."""
        self.disconnect(ReasonCode.SERVER_SHUTTING_DOWN, "server shutting down", will=False)

    def timed_out(self, age: float, silence: float) -> None:
        """A timer check from the connection: ``age`` seconds since it was accepted,
        ``silence`` seconds since the client last sent anything. No CONNECT within the connect
        timeout: close; silent for longer than :attr:`keep_alive`: DISCONNECT 0x8D (MQTT 5)."""
        if self.state is WAITING or self.state is CONNECTING:
            timeout = self.options.connect_timeout
            if age > timeout:
                self.protocol_refused("connect_timeout", f"no CONNECT within {timeout:g} s")
                self.close(will=False)
        elif self.state is CONNECTED and self.keep_alive and silence > self.keep_alive:
            self.protocol_refused(
                "keep_alive_timeout",
                f"nothing received for {self.keep_alive:g} s (1.5 x keep alive)",
            )
            self.disconnect(ReasonCode.KEEP_ALIVE_TIMEOUT, "keep alive timeout")

    def writable(self) -> None:
        """The connection takes writes again: send what waited for it."""
        session = self.session
        if session is not None and session.outlet is self:
            session.pump()

    def lost(self) -> None:
        """The connection is gone (the client closed it, or it broke)."""
        if self.state is not CLOSED:
            self.state = CLOSED
            if self._unregister is not None:
                self._unregister()
                self._unregister = None
            self._detach(will=not self.clean_exit)
        if self.identity is not None and self.session is not None:
            self.gateway.metrics.conns[PROTOCOL].dec()
        # Let go of the connection (it holds this channel): freed without the cycle collector.
        self.link = _GONE
        self.send = _GONE.send
        self.deliver = _GONE.deliver

    def _detach(self, will: bool) -> None:
        session = self.session
        if session is not None and session.outlet is self:
            session.detach()
            self.registry.detached(session, will)

    # ---------------------------------------------------------------------------------------
    # CONNECT

    async def _connect(self, p: Connect) -> None:
        options = self.options
        self.level = level = p.protocol_level
        props = p.properties
        receive_maximum = 0xFFFF
        if level == 5:
            self.problem_info = props.request_problem_information != 0
            if props.maximum_packet_size:
                self.max_packet_size = props.maximum_packet_size
            receive_maximum = props.receive_maximum or 0xFFFF
            if props.authentication_method is not None:
                if props.authentication_method != AUTH_METHOD or p.password:
                    self._refuse_connect_code(
                        ReasonCode.BAD_AUTHENTICATION_METHOD,
                        "bad_authentication_method",
                        f"authentication method {props.authentication_method!r} is not"
                        f" supported: {AUTH_METHOD} with a broker token as the Authentication"
                        " Data (and no password), or the secret or token as the password",
                        claimed_client(p.username),
                    )
                    return
                self.auth_method = AUTH_METHOD
        client_id = p.client_id
        assigned: str | None = None
        if not client_id:
            if level == 4 and not p.clean_start:
                self._refuse_connect_code(
                    ReasonCode.CLIENT_IDENTIFIER_NOT_VALID,
                    "identifier_rejected",
                    "an empty client identifier needs clean session",
                    claimed_client(p.username),
                )
                return
            client_id = assigned = "conduit-" + secrets.token_hex(10)
        keep_alive = p.keep_alive
        server_keep_alive: int | None = None
        maximum = options.max_keep_alive
        if maximum and (not keep_alive or keep_alive > maximum):
            if level == 4:  # 3.1.1 cannot be told the server's value: refused, as Mosquitto does
                self._refuse_connect_code(
                    ReasonCode.UNSPECIFIED_ERROR,
                    "keep_alive_too_long",
                    f"keep alive {keep_alive} s exceeds the server's {maximum} s",
                    claimed_client(p.username),
                    v3=ReturnCode.IDENTIFIER_REJECTED,
                )
                return
            keep_alive = server_keep_alive = maximum
        try:
            if self.auth_method is not None:
                credentials = self._token_credentials(p.username, props.authentication_data)
            else:
                credentials = from_mqtt(p.username, p.password, self.certificate)
            identity = await self.gateway.authenticate(credentials)
        except ConduitError as exc:
            self._refuse_connect(exc, claimed_client(p.username))
            return
        if self.state is CLOSED:
            return
        self.identity = identity
        self._unregister = self.gateway.connected(identity, self.revoked)
        will = p.will
        if will is not None:
            try:
                await self._check_will(identity, will)
            except ConduitError as exc:
                self._refuse_connect(exc, identity.client_id)
                return
            except MQTTProtocolError as exc:  # payload format invalid
                self._refuse_connect_code(
                    exc.reason_code,
                    refusal_name(exc.reason_code, "will_refused"),
                    f"will: {exc.message}",
                    identity.client_id,
                )
                return
            if self.state is CLOSED:
                return
        if level == 5:
            expiry = props.session_expiry_interval or 0
        else:
            expiry = 0 if p.clean_start else options.max_session_expiry
        granted_expiry = min(expiry, options.max_session_expiry)
        try:
            self.registry.check_room(identity, client_id)
        except ConduitError as exc:
            self._refuse_connect(exc, identity.client_id)
            return
        registry = self.registry
        if registry.clustered and registry.get(identity, client_id) is None:
            # Another node may hold the session: it ends its connection and hands it over.
            try:
                await registry.claim(identity, client_id, p.clean_start, subscription_closed)
            except ConduitError as exc:
                self._refuse_connect(exc, identity.client_id)
                return
            if self.state is CLOSED:
                return
        # A connection holding the session is ended first (MQTT-3.1.4-3: session taken over).
        old = registry.get(identity, client_id)
        if old is not None and old.outlet is not None:
            old.outlet.take_over()  # detaches: may end a session that had no expiry
        session, present = self.registry.open(
            identity, client_id, p.clean_start, granted_expiry, will
        )
        self.gateway.metrics.conns[PROTOCOL].inc()
        self.session = session
        self.state = CONNECTED
        if keep_alive:
            self.keep_alive = keep_alive * 1.5
        if level == 5:
            self.send_packet(
                ConnAck(
                    present,
                    ReasonCode.SUCCESS,
                    Properties(
                        session_expiry_interval=(
                            granted_expiry if granted_expiry != expiry else None
                        ),
                        assigned_client_identifier=assigned,
                        server_keep_alive=server_keep_alive,
                        receive_maximum=options.max_inflight,
                        topic_alias_maximum=options.topic_alias_maximum or None,
                        maximum_packet_size=options.max_packet_size,
                        authentication_method=self.auth_method,
                    ),
                )
            )
        else:
            self.send_packet(ConnAck(present, ReturnCode.ACCEPTED))
        session.attach(self, receive_maximum)

    def _token_credentials(self, username: str | None, data: bytes | None) -> Credentials:
        """The credentials of ``CONDUIT-TOKEN``: a broker token as the Authentication Data."""
        credentials = from_mqtt(username, data, self.certificate)
        if credentials.token is None:
            raise AuthenticationError(
                f"{AUTH_METHOD} carries a broker token (a JWT) as the Authentication Data"
            )
        return credentials

    def _check_auth(self, p: Auth) -> None:
        """An AUTH packet this connection may send (MQTTProtocolError 0x82 otherwise)."""
        if self.auth_method is None:
            raise MQTTProtocolError(
                ReasonCode.PROTOCOL_ERROR, "AUTH without enhanced authentication"
            )
        if (
            p.reason_code != ReasonCode.RE_AUTHENTICATE
            or p.properties.authentication_method != self.auth_method
        ):
            raise MQTTProtocolError(
                ReasonCode.PROTOCOL_ERROR,
                f"AUTH re-authenticates (0x19) with the CONNECT's method {self.auth_method}",
            )

    async def _reauthenticate(self, p: Auth) -> None:
        """AUTH 0x19 with a fresh token of the same client (``CONDUIT-TOKEN``): the connection's
        rights and expiry become the new token's, in place; subscriptions it no longer allows
        end. A failed re-authentication ends the connection (DISCONNECT with the reason)."""
        old, session = self.identity, self.session
        assert old is not None and session is not None
        try:
            credentials = self._token_credentials(None, p.properties.authentication_data)
            identity = await self.gateway.authenticate(credentials)
            if (identity.domain, identity.client_id) != (old.domain, old.client_id):
                raise AuthenticationError("re-authentication with another client's token")
        except ConduitError as exc:
            self.refused(exc)
            code = exc.condition.answer.mqtt5
            self.disconnect(ReasonCode.NOT_AUTHORIZED if code == 0x86 else code, exc.detail)
            return
        if self.state is not CONNECTED:
            return
        self.identity = session.identity = identity
        if self._unregister is not None:
            self._unregister()
        self._unregister = self.gateway.connected(identity, self.revoked)
        held = [sub.bus for sub in session.subs.values() if sub.bus is not None]
        await self.gateway.reauthenticate(held, identity)
        session.save()
        self.send_packet(Auth(ReasonCode.SUCCESS, Properties(authentication_method=AUTH_METHOD)))

    async def _check_will(self, identity: Identity, will: Will) -> None:
        """Refuse at CONNECT a will that could never be published (raises ConduitError, or
        MQTTProtocolError 0x99 for a payload that is not the UTF-8 it claims to be)."""
        gateway = self.gateway
        await gateway.authorize(identity, parse_topic(will.topic), "publish")
        if len(will.payload) > gateway.limits.max_payload:
            raise TooLargeError(
                f"will payload of {len(will.payload)} bytes exceeds {gateway.limits.max_payload}"
            )
        check_payload_format(will.payload, will.properties)
        content_type = content_type_of(will.properties.content_type, self.options.content_type)
        if content_type in SENML:
            senml.validate(will.payload, content_type, time.time())

    def _refuse_connect(self, error: ConduitError, client: str | None) -> None:
        """CONNACK with the error table's code, then close. ``client``: who to name in the log,
        never a raw user name (see :func:`~core.noise.claimed_client`)."""
        if self.state is CLOSED:  # closed while authenticating (CONNECT timeout, shutdown)
            return
        self.gateway.refused(PROTOCOL, error, client)
        answer = error.condition.answer
        if self.level == 5:
            code = for_connack(answer.mqtt5)
            self.send_packet(ConnAck(False, code, Properties(reason_string=error.detail)))
        else:
            v3 = answer.mqtt3
            if v3 is None or v3 not in _V3_REFUSALS:  # e.g. a SUBACK code: no CONNACK code
                v3 = v3_connack(answer.mqtt5)
            self.send_packet(ConnAck(False, v3))
        self.close(will=False, reason_code=answer.mqtt5)

    def _refuse_connect_code(
        self,
        code: int,
        reason: str,
        detail: str,
        client: str | None,
        *,
        v3: ReturnCode | None = None,
    ) -> None:
        """CONNACK with a protocol code (not from the error table), then close: ``code`` for
        MQTT 5, ``v3`` (or the code's 3.1.1 counterpart) for 3.1.1."""
        if self.state is CLOSED:
            return
        self.gateway.refused_input(PROTOCOL, reason, detail, client)
        if self.level == 5:
            self.send_packet(ConnAck(False, code, Properties(reason_string=detail)))
        else:
            self.send_packet(ConnAck(False, v3 if v3 is not None else v3_connack(code)))
        self.close(will=False, reason_code=code)

    # ---------------------------------------------------------------------------------------
    # PUBLISH from the client

    def _publish(self, p: Publish) -> Pending | None:
        session = self.session
        assert session is not None
        props = p.properties
        topic = p.topic
        qos = p.qos
        if props is not EMPTY_PROPERTIES:
            alias = props.topic_alias
            if alias is not None:
                topic = self._alias(alias, topic)
            if props.subscription_identifiers:
                raise MQTTProtocolError(
                    ReasonCode.PROTOCOL_ERROR,
                    "a client's PUBLISH carries a subscription identifier",
                )
            if props.payload_format_indicator == 1:
                try:
                    check_payload_format(p.payload, props)
                except MQTTProtocolError as exc:
                    self.protocol_refused("payload_format_invalid", exc.message)
                    self._answer_refused(p, exc.reason_code, exc.message)
                    return None
        if qos == 2:
            if session.is_duplicate(p.packet_id):
                self.send(encode_pubrec(p.packet_id))  # already published: acknowledge again
                return None
            if session.awaiting >= self.options.max_inflight:
                raise MQTTProtocolError(
                    ReasonCode.RECEIVE_MAXIMUM_EXCEEDED,
                    f"more than {self.options.max_inflight} QoS 2 messages awaiting PUBREL",
                )
        content_type, metadata = inbound(
            props,
            qos,
            p.retain,
            self.options.content_type,
            session.token if session.no_local else None,
        )
        if p.retain:
            return self._publish_async(p, topic, content_type, metadata)
        identity = self.identity
        assert identity is not None
        try:
            message = self.gateway.publish_nowait(
                identity, topic, p.payload, content_type, PROTOCOL, metadata
            )
        except ConduitError as exc:
            self._refuse_publish(p, exc)
            return None
        if message is None:
            return self._publish_async(p, topic, content_type, metadata)
        if qos:
            if self.registry.store.pending:  # a session keeps it: acknowledge once it is stored
                return self._acknowledge_when_kept(p)
            self._published(p)
        return None

    def _alias(self, alias: int, topic: str) -> str:
        """The topic of a PUBLISH with a Topic Alias: a topic sets the alias, none uses it."""
        maximum = self.options.topic_alias_maximum
        if not 0 < alias <= maximum:
            raise MQTTProtocolError(
                ReasonCode.TOPIC_ALIAS_INVALID, f"topic alias {alias} is not in 1..{maximum}"
            )
        aliases = self.aliases
        if aliases is None:
            aliases = self.aliases = {}
        if topic:
            aliases[alias] = topic
            return topic
        found = aliases.get(alias)
        if found is None:
            raise MQTTProtocolError(
                ReasonCode.PROTOCOL_ERROR, f"topic alias {alias} has no topic yet"
            )
        return found

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
            if self.state is not CLOSED:
                self._refuse_publish(p, exc)
            return
        if p.qos:
            if self.registry.store.pending:
                await self.registry.store.flush()
            if self.state is not CLOSED:
                self._published(p)

    async def _acknowledge_when_kept(self, p: Publish) -> None:
        """A persistent session queued the message (its client is offline or slow): the
        publisher hears it is safe once the session store has it."""
        await self.registry.store.flush()
        if self.state is not CLOSED:
            self._published(p)

    def _published(self, p: Publish) -> None:
        if p.qos == 1:
            self.send(encode_puback(p.packet_id))
        else:
            assert self.session is not None
            self.session.received(p.packet_id)
            self.send(encode_pubrec(p.packet_id))

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
            self.send(encode_pubrel(p.packet_id))
        else:
            self.send_packet(PubRel(p.packet_id, ReasonCode.PACKET_IDENTIFIER_NOT_FOUND))

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
            share = shared(sub_filter)
            if share is None:
                detail = f"{sub_filter!r} is not $share/<group>/<filter>"
                self.protocol_refused("bad_topic", detail)
                codes.append(ReasonCode.TOPIC_FILTER_INVALID)
                details.append(detail)
                continue
            group, topic_filter = share
            existing = session.subs.get(sub_filter)
            if existing is not None:
                existing.qos = s.qos
                existing.retain_as_published = s.retain_as_published
                existing.retain_handling = s.retain_handling
                existing.subscription_id = subscription_id
                session.set_no_local(existing, s.no_local)
                session.save()
                codes.append(s.qos)
                if group is None and s.retain_handling == 0:
                    retained.append(existing)
                continue
            maximum = self.options.max_subscriptions
            if maximum and len(session.subs) >= maximum:
                error = QuotaError(
                    f"{sub_filter}: the session holds {len(session.subs)} subscriptions,"
                    " the most allowed",
                    "mqtt_max_subscriptions",
                )
                self.gateway.metrics.limit(error.limit)
                self.refused(error)
                codes.append(for_suback(error.condition.answer.mqtt5))
                details.append(error.detail)
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
                    on_close=subscription_closed,
                )
            except ConduitError as exc:
                self.refused(exc)
                code = exc.condition.answer.mqtt5
                if exc.condition in (Condition.BAD_TOPIC, Condition.NOT_FOUND):
                    code = ReasonCode.TOPIC_FILTER_INVALID
                codes.append(for_suback(code))
                details.append(f"{sub_filter}: {exc.detail}")
                continue
            sub.bus = bus
            if self.state is CLOSED or session.outlet is not self:
                sub.end()
                await self.gateway.unsubscribe(bus, "connection closed")
                return
            old = session.subs.get(sub_filter)  # another SUBSCRIBE cannot interleave; be safe
            if old is not None:
                old_bus = old.end()
                if old_bus is not None:
                    await self.gateway.unsubscribe(old_bus, "replaced")
            session.add_sub(sub)
            session.save()
            codes.append(s.qos)
            if group is None and s.retain_handling in (0, 1):
                retained.append(sub)
        if self.state is CLOSED:
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
            if self.state is CLOSED or not sub.active:
                return
            for message in messages:
                session.offer(sub, message, True)

    async def _unsubscribe(self, p: Unsubscribe) -> None:
        session = self.session
        assert session is not None
        codes: list[int] = []
        for topic_filter in p.topic_filters:
            sub = session.pop_sub(topic_filter)
            if sub is None:
                codes.append(ReasonCode.NO_SUBSCRIPTION_EXISTED)
                continue
            bus = sub.end()
            if bus is not None:
                await self.gateway.unsubscribe(bus, "unsubscribed")
            codes.append(ReasonCode.SUCCESS)
        session.save()
        if self.state is not CLOSED:
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
                    ReasonCode.PROTOCOL_ERROR,
                    "DISCONNECT sets a session expiry after CONNECT asked for none",
                )
            session.expiry = min(expiry, self.options.max_session_expiry)
        self.clean_exit = p.reason_code != ReasonCode.DISCONNECT_WITH_WILL
        self.close(will=not self.clean_exit)


# The 3.1.1 return codes a refusal at CONNECT can have (not 0, accepted).
_V3_REFUSALS: Final = frozenset(ReturnCode) - {ReturnCode.ACCEPTED}


def subscription_closed(bus: Subscription, reason: str) -> None:
    """The gateway closed a subscription (authorization revoked, credentials expired, the
    subscriber too slow): it leaves its session; a subscriber too slow is disconnected (0x97)."""
    sub = bus.sink
    if not isinstance(sub, Sub) or not sub.active:
        return
    sub.end()
    session = sub.session
    if session.drop_sub(sub):
        session.save()
    log.info(
        "mqtt: subscription closed client=%s filter=%s: %s",
        session.identity.client_id,
        printable(sub.filter),
        printable(reason),
    )
    channel = session.outlet
    if bus.streak >= bus.max_dropped and isinstance(channel, Channel):
        channel.protocol_refused("slow_subscriber", reason)
        channel.disconnect(ReasonCode.QUOTA_EXCEEDED, reason)
