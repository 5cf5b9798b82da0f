"""The session registry: which MQTT sessions exist on this node, and when they end.

Sessions are keyed by the authenticated Conduit client and the MQTT client identifier, so one
client can never take over another's session. The registry opens a session for a CONNECT
(resumed, or new with clean start), and once its connection ends publishes or schedules the
will (MQTT 5 Will Delay Interval) and ends the session then (no expiry) or when it expires. A
server shutdown publishes no wills.

Sessions live in memory: a persistent session (3.1.1 clean session 0, MQTT 5 session expiry)
survives its connection until it expires, not a restart of the server. The state of one session
is :class:`~adapters.mqtt.session.Session`'s; this module holds none of it but the map. Who holds
a session is the session's ``outlet`` (the attached channel): taking a session over is the
channel's rule (:mod:`adapters.mqtt.channel`), not the registry's.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

from adapters.mqtt.codec import Will
from adapters.mqtt.options import Options
from adapters.mqtt.publish import PROTOCOL, PublishCache, inbound
from adapters.mqtt.session import Session, Sub
from core.errors import ConduitError
from core.gateway import Gateway
from core.identity import Identity

Spawn = Callable[[Coroutine[Any, Any, None]], None]


class SessionRegistry:
    """The sessions of one MQTT adapter; see the module docstring.

    ``spawn`` runs a coroutine the adapter waits for when it stops (will publishes, the
    unsubscriptions of an ended session).
    """

    __slots__ = ("cache", "closing", "gateway", "options", "sessions", "spawn")

    def __init__(self, gateway: Gateway, options: Options, spawn: Spawn) -> None:
        self.gateway = gateway
        self.options = options
        self.spawn = spawn
        self.sessions: dict[tuple[str, str], Session] = {}
        # One for all sessions: the bus offers a message to every subscription in turn.
        self.cache = PublishCache()
        self.closing = False  # the server is stopping: no wills, no expiry timers

    def get(self, identity: Identity, client_id: str) -> Session | None:
        return self.sessions.get((identity.client_id, client_id))

    def open(self, identity: Identity, client_id: str, clean_start: bool) -> tuple[Session, bool]:
        """The session a CONNECT takes, and whether it existed (session present). The caller
        has ended the connection that held it (takeover)."""
        key = (identity.client_id, client_id)
        old = self.sessions.get(key)
        if old is not None:
            if old.expiry_handle is not None:
                old.expiry_handle.cancel()
                old.expiry_handle = None
            if clean_start:
                del self.sessions[key]
                self._end(old)
                old = None
            elif old.will_handle is not None:
                # Back before the will delay passed: no will (MQTT 5 section 3.1.3.2.2).
                old.will_handle.cancel()
                old.will_handle = None
                old.will = None
        if old is not None:
            old.identity = identity
            return old, True
        session = Session(
            identity,
            client_id,
            self.cache,
            max_inflight=self.options.max_inflight,
            max_queued=self.options.max_queued,
        )
        self.sessions[key] = session
        return session, False

    def detached(self, session: Session, will: bool) -> None:
        """The session's connection ended (``will``: abnormally). Publish or schedule the
        will; end the session now or when it expires."""
        pending = session.will if will else None
        session.will = None
        if self.closing:
            return
        if session.expiry == 0:
            if self.sessions.get(session.key) is session:
                del self.sessions[session.key]
            if pending is not None:
                self.spawn(self.publish_will(session.identity, pending))
            self._end(session)
            return
        loop = asyncio.get_running_loop()
        if pending is not None:
            delay = pending.properties.will_delay_interval or 0
            if delay == 0:
                self.spawn(self.publish_will(session.identity, pending))
            else:
                session.will = pending
                session.will_handle = loop.call_later(
                    min(delay, session.expiry), self._will_due, session
                )
        session.expiry_handle = loop.call_later(session.expiry, self._expire, session)

    async def publish_will(self, identity: Identity, will: Will) -> None:
        content_type, metadata = inbound(
            will.properties, will.qos, will.retain, self.options.content_type
        )
        try:
            await self.gateway.publish(
                identity,
                will.topic,
                will.payload,
                content_type,
                PROTOCOL,
                metadata,
                retain=will.retain,
            )
        except ConduitError as exc:
            self.gateway.refused(PROTOCOL, exc, identity.client_id)

    async def close(self) -> None:
        """The server is stopping: every session ends, without wills."""
        self.closing = True
        for session in list(self.sessions.values()):
            _cancel_timers(session)
            for sub in list(session.subs.values()):
                sub.active = False
                if sub.bus is not None:
                    await self.gateway.unsubscribe(sub.bus, "server shutting down")
        self.sessions.clear()

    def _will_due(self, session: Session) -> None:
        session.will_handle = None
        will, session.will = session.will, None
        if will is not None:
            self.spawn(self.publish_will(session.identity, will))

    def _expire(self, session: Session) -> None:
        session.expiry_handle = None
        if self.sessions.get(session.key) is session and session.outlet is None:
            del self.sessions[session.key]
            self._end(session)

    def _end(self, session: Session) -> None:
        """The session ends: a will still waiting for its delay goes now; subscriptions end."""
        if session.will_handle is not None:
            session.will_handle.cancel()
            session.will_handle = None
            will, session.will = session.will, None
            if will is not None:
                self.spawn(self.publish_will(session.identity, will))
        _cancel_timers(session)
        subs = list(session.subs.values())
        session.subs.clear()
        for sub in subs:
            sub.active = False
        if subs:
            self.spawn(self._unsubscribe(subs, "session ended"))

    async def _unsubscribe(self, subs: list[Sub], reason: str) -> None:
        for sub in subs:
            if sub.bus is not None:
                await self.gateway.unsubscribe(sub.bus, reason)


def _cancel_timers(session: Session) -> None:
    for handle in (session.will_handle, session.expiry_handle):
        if handle is not None:
            handle.cancel()
    session.will_handle = session.expiry_handle = None
