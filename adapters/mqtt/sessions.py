"""The session registry: which MQTT sessions exist on this node, and when they end.

Sessions are keyed by the authenticated Conduit client and the MQTT client identifier, so one
client can never take over another's session. The registry opens a session for a CONNECT
(resumed, or new with clean start), and once its connection ends publishes or schedules the
will (MQTT 5 Will Delay Interval) and ends the session then (no expiry) or when it expires. A
server shutdown publishes no wills.

A persistent session (3.1.1 clean session 0, MQTT 5 session expiry) survives its connection
until it expires, and is kept in the gateway's session store (:mod:`core.sessions`; records in
:mod:`adapters.mqtt.persist`): with the SQLite store it survives a crash and a restart too, and
:meth:`SessionRegistry.restore` brings it back when the adapter starts. Sessions without expiry
write nothing. The state of one session is :class:`~adapters.mqtt.session.Session`'s; this
module holds none of it but the map. Who holds a session is the session's ``outlet`` (the
attached channel): taking a session over is the channel's rule (:mod:`adapters.mqtt.channel`),
not the registry's.

Several nodes (a bus that spans nodes, one shared store): a client identifier is unique in the
cluster, and a session is held by one node at a time (the session store records which). A
CONNECT for a session this node does not hold is announced on the bus (:meth:`claim`): the node
holding it ends its connection with 0x8E, writes the session's last state and hands it over
(:meth:`changed`); the connecting node waits until the store says the session is its own, or
past :attr:`SessionRegistry.handover_wait` presumes its holder dead, and brings it back here
as a restart would. One node (the in-process bus) does none of this.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any

import msgspec

from adapters.mqtt import persist
from adapters.mqtt.codec import Will
from adapters.mqtt.options import Options
from adapters.mqtt.publish import PROTOCOL, PublishCache, inbound
from adapters.mqtt.session import Outgoing, Session, Sub, shared, store_key
from core import message as messages
from core.bus import Change, Subscription
from core.errors import ConduitError, QuotaError, UnavailableError
from core.gateway import Gateway
from core.identity import Identity
from core.noise import printable
from core.sessions import StoredSession

log = logging.getLogger("conduit.mqtt")

Spawn = Callable[[Coroutine[Any, Any, None]], None]
#: What the gateway calls when it ends a subscription (the channel's ``subscription_closed``).
OnClose = Callable[[Subscription, str], None]

#: The kind of the :class:`~core.bus.Change` by which a node takes an MQTT session; its ref is
#: the JSON array [session store key, the node taking it].
TAKEOVER = "mqtt_session"
HANDOVER_WAIT = 2.0  # seconds a node waits for a session's holder to hand it over
HANDOVER_POLL = 0.05  # seconds between two looks at the session store meanwhile


class SessionRegistry:
    """The sessions of one MQTT adapter; see the module docstring.

    ``spawn`` runs a coroutine the adapter waits for when it stops (will publishes, the
    unsubscriptions of an ended session).
    """

    __slots__ = (
        "_claims",
        "_held",
        "cache",
        "closing",
        "clustered",
        "gateway",
        "handover_wait",
        "node",
        "options",
        "sessions",
        "spawn",
        "store",
    )

    def __init__(self, gateway: Gateway, options: Options, spawn: Spawn) -> None:
        self.gateway = gateway
        self.options = options
        self.spawn = spawn
        self.store = gateway.sessions
        self.node = self.store.node
        self.clustered = gateway.clustered  # other nodes may hold sessions
        self.handover_wait = HANDOVER_WAIT
        self._claims: dict[tuple[str, str], asyncio.Future[None]] = {}
        self.sessions: dict[tuple[str, str], Session] = {}
        self._held: dict[str, int] = {}  # sessions by Conduit client id
        # One for all sessions: the bus offers a message to every subscription in turn.
        self.cache = PublishCache()
        self.closing = False  # the server is stopping: no wills, no expiry timers

    def get(self, identity: Identity, client_id: str) -> Session | None:
        return self.sessions.get((identity.client_id, client_id))

    def check_room(self, identity: Identity, client_id: str) -> None:
        """Raise QuotaError if a new session for this client id would be one more than the
        client may hold (``max_sessions``); resuming or taking over one it has is always fine."""
        held = self._held.get(identity.client_id, 0)
        maximum = self.options.max_sessions
        if maximum and held >= maximum and (identity.client_id, client_id) not in self.sessions:
            self.gateway.metrics.limit("mqtt_max_sessions")
            raise QuotaError(f"client holds {held} sessions, the most allowed", "mqtt_max_sessions")

    def _add(self, session: Session) -> None:
        self.sessions[session.key] = session
        client = session.key[0]
        self._held[client] = self._held.get(client, 0) + 1

    def _remove(self, session: Session) -> None:
        if self.sessions.pop(session.key, None) is session:
            client = session.key[0]
            held = self._held.get(client, 1) - 1
            if held > 0:
                self._held[client] = held
            else:
                self._held.pop(client, None)

    def open(
        self,
        identity: Identity,
        client_id: str,
        clean_start: bool,
        expiry: int = 0,
        will: Will | None = None,
    ) -> tuple[Session, bool]:
        """The session a CONNECT takes (with its session expiry and will), and whether it
        existed (session present). The caller has ended the connection that held it
        (takeover). A persistent session is kept in the session store from now on."""
        session, present = self._open(identity, client_id, clean_start)
        session.expiry = expiry
        session.will = will
        if expiry and session.store is None:
            session.store = self.store
        session.save()
        return session, present

    def _open(self, identity: Identity, client_id: str, clean_start: bool) -> tuple[Session, bool]:
        key = (identity.client_id, client_id)
        old = self.sessions.get(key)
        if old is not None:
            if old.expiry_handle is not None:
                old.expiry_handle.cancel()
                old.expiry_handle = None
            if clean_start:
                self._remove(old)
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
            max_queued_bytes=self.options.max_queued_bytes,
            limit_reached=self.gateway.metrics.limit,
        )
        self._add(session)
        return session, False

    def detached(self, session: Session, will: bool) -> None:
        """The session's connection ended (``will``: abnormally). Publish or schedule the
        will; end the session now or when it expires."""
        pending = session.will if will else None
        session.will = None
        if self.closing:  # no will; a persistent session is kept for after the restart
            if session.expiry:
                session.save_messages()
                session.save(expires_at=time.time() + session.expiry)
            return
        if session.expiry == 0:
            if self.sessions.get(session.key) is session:
                self._remove(session)
            if pending is not None:
                self.spawn(self.publish_will(session.identity, pending))
            self._end(session)
            return
        loop = asyncio.get_running_loop()
        now = time.time()
        will_at = None
        if pending is not None:
            delay = pending.properties.will_delay_interval or 0
            if delay == 0:
                self.spawn(self.publish_will(session.identity, pending))
            else:
                session.will = pending
                will_at = now + min(delay, session.expiry)
                session.will_handle = loop.call_later(will_at - now, self._will_due, session)
        session.expiry_handle = loop.call_later(session.expiry, self._expire, session)
        session.save_messages()
        session.save(expires_at=now + session.expiry, will_at=will_at)

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
                bus = sub.end()
                if bus is not None:
                    await self.gateway.unsubscribe(bus, "server shutting down")
            session.clear()
        self.sessions.clear()
        self._held.clear()

    def _will_due(self, session: Session) -> None:
        session.will_handle = None
        will, session.will = session.will, None
        if will is not None:
            self.spawn(self.publish_will(session.identity, will))
        handle = session.expiry_handle
        if handle is not None:  # published: not again after a restart
            session.save(expires_at=time.time() + handle.when() - asyncio.get_running_loop().time())

    def _expire(self, session: Session) -> None:
        session.expiry_handle = None
        if self.sessions.get(session.key) is session and session.outlet is None:
            self._remove(session)
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
        if session.store is not None:
            session.store.delete_session(store_key(session.identity, session.client_id))
            session.store = None
        buses = [bus for sub in session.subs.values() if (bus := sub.end()) is not None]
        session.clear()
        if buses:
            self.spawn(self._unsubscribe(buses, "session ended"))

    async def _unsubscribe(self, buses: list[Subscription], reason: str) -> None:
        for bus in buses:
            await self.gateway.unsubscribe(bus, reason)

    # ---------------------------------------------------------------------------------------
    # several nodes

    async def claim(
        self, identity: Identity, client_id: str, clean_start: bool, on_close: OnClose
    ) -> None:
        """Before a CONNECT takes a session this node does not hold (several nodes only): tell
        every node, wait until the session store says the session is this node's (its holder
        hands it over; past :attr:`handover_wait` the holder is presumed dead and the session
        taken), then bring it back here, or end it for a clean start. Raises UnavailableError
        when the bus or the session store cannot answer."""
        key = (identity.client_id, client_id)
        earlier = self._claims.get(key)
        if earlier is not None:  # another CONNECT of this node is taking it: after that one
            await asyncio.shield(earlier)
            return
        done = asyncio.get_running_loop().create_future()
        self._claims[key] = done
        try:
            await self._claim(identity, client_id, clean_start, on_close)
        finally:
            del self._claims[key]
            done.set_result(None)

    async def _claim(
        self, identity: Identity, client_id: str, clean_start: bool, on_close: OnClose
    ) -> None:
        skey = store_key(identity, client_id)
        ref = msgspec.json.encode([skey, self.node]).decode()
        try:
            await self.gateway.announce(Change(TAKEOVER, identity.domain, ref))
            if self.store.pending:  # what this node wrote of it before (an end) comes first
                await self.store.flush()
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self.handover_wait
            holder = await self.store.holder(skey)
            while holder and holder != self.node:
                if loop.time() >= deadline:
                    log.warning(
                        "mqtt: node %s did not hand session %s over within %g s: taken",
                        printable(holder), printable(skey), self.handover_wait,
                    )  # fmt: skip
                    break
                await asyncio.sleep(HANDOVER_POLL)
                holder = await self.store.holder(skey)
            stored = None if holder is None else await self.store.take(skey)
        except ConduitError:
            raise
        except Exception as exc:
            raise UnavailableError(f"cannot take the session over: {exc}") from exc
        if stored is None or (identity.client_id, client_id) in self.sessions:
            return
        if clean_start:
            self._discard(stored)
        else:
            await self._revive(stored, on_close, time.time())

    def _discard(self, stored: StoredSession) -> None:
        """A clean start ends the session taken from another node: a will it still owes goes."""
        self.store.delete_session(stored.key)
        try:
            saved = persist.decode_session(stored.state)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return
        if saved.will is not None and (saved.will_at is not None or saved.expires_at is None):
            self.spawn(self.publish_will(saved.identity.identity(), saved.will))

    async def changed(self, change: Change) -> None:
        """A change heard on the bus. Another node takes a session this node holds: its
        connection ends (0x8E, as on one node), and the session, its last state written, is
        handed over and forgotten here (the store keeps it)."""
        if change.kind != TAKEOVER:
            return
        try:
            skey, node = msgspec.json.decode(change.ref, type=tuple[str, str])
            _, client, client_id = msgspec.json.decode(skey, type=tuple[str, str, str])
        except (msgspec.DecodeError, msgspec.ValidationError):
            log.warning("mqtt: takeover announce unreadable: %s", printable(change.ref))
            return
        if node == self.node:
            return
        session = self.sessions.get((client, client_id))
        if session is None:
            return
        if session.outlet is not None:
            session.outlet.take_over()  # detached: ended (no expiry), or written as it is
        if self.sessions.get(session.key) is not session:
            return
        _cancel_timers(session)
        self._remove(session)
        session.store = None  # nothing more is written of it here
        buses = [bus for sub in session.subs.values() if (bus := sub.end()) is not None]
        session.clear()
        if buses:
            self.spawn(self._unsubscribe(buses, "session taken over by another node"))
        self.store.hand_over(skey, node)
        await self.store.flush()

    # ---------------------------------------------------------------------------------------
    # restart

    async def restore(self, on_close: OnClose) -> int:
        """Bring back the persistent sessions of the session store (at start, before the
        listeners open): their subscriptions (each authorized again: a right revoked meanwhile
        drops it), their messages, their timers. A session that was connected when the server
        stopped without closing it ended then: its will is due after its delay. A session
        that expired meanwhile ends (its will, if still due, is published). Returns how many
        came back."""
        now = time.time()
        restored = 0
        for stored in await self.store.load(every=not self.clustered):
            if await self._revive(stored, on_close, now) is not None:
                restored += 1
        return restored

    async def _revive(self, stored: StoredSession, on_close: OnClose, now: float) -> Session | None:
        """Bring back one session of the session store (see :meth:`restore`): it, or None
        when it ended (unreadable, expired)."""
        try:
            saved = persist.decode_session(stored.state)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            log.error("mqtt: session %s unreadable, dropped: %s", printable(stored.key), exc)
            self.store.delete_session(stored.key)
            return None
        identity = saved.identity.identity()
        expires_at = saved.expires_at
        will_at = saved.will_at
        if expires_at is None:  # connected when the server went: it ended at the restart
            expires_at = now + saved.expiry
            if saved.will is not None:
                delay = saved.will.properties.will_delay_interval or 0
                will_at = now + min(delay, saved.expiry)
        if expires_at <= now or (identity.expires is not None and identity.expires <= now):
            self.store.delete_session(stored.key)
            if saved.will is not None and will_at is not None:
                self.spawn(self.publish_will(identity, saved.will))
            return None
        session = Session(
            identity,
            saved.client_id,
            self.cache,
            expiry=saved.expiry,
            max_inflight=self.options.max_inflight,
            max_queued=self.options.max_queued,
            max_queued_bytes=self.options.max_queued_bytes,
            limit_reached=self.gateway.metrics.limit,
        )
        session.store = self.store
        session.awaiting_rel = set(saved.awaiting_rel) or None
        for s in saved.subs:
            await self._resubscribe(session, s, on_close)
        self._restore_messages(session, stored.messages)
        loop = asyncio.get_running_loop()
        if saved.will is not None and will_at is not None:
            session.will = saved.will
            session.will_handle = loop.call_later(max(0.0, will_at - now), self._will_due, session)
        session.expiry_handle = loop.call_later(expires_at - now, self._expire, session)
        self._add(session)
        session.save(expires_at=expires_at, will_at=will_at if session.will else None)
        return session

    async def _resubscribe(
        self, session: Session, saved: persist.SavedSub, on_close: OnClose
    ) -> None:
        share = shared(saved.filter)
        if share is None:
            return
        group, topic_filter = share
        sub = Sub(
            session,
            saved.filter,
            topic_filter,
            group,
            saved.qos,
            saved.no_local,
            saved.retain_as_published,
            saved.retain_handling,
            saved.subscription_id,
        )
        try:
            sub.bus = await self.gateway.subscribe(
                session.identity, topic_filter, PROTOCOL, sink=sub, group=group, on_close=on_close
            )
        except ConduitError as exc:
            log.warning(
                "mqtt: subscription not restored client=%s filter=%s: %s",
                session.identity.client_id,
                printable(saved.filter),
                printable(exc.detail),
            )
            return
        session.add_sub(sub)

    def _restore_messages(self, session: Session, stored: list[tuple[int, bytes]]) -> None:
        for seq, data in stored:
            try:
                saved = persist.decode_message(data)
                message = messages.decode(saved.message)
            except (msgspec.DecodeError, msgspec.ValidationError):
                log.error("mqtt: a message of session %s unreadable, dropped", session.client_id)
                continue
            sub = session.subs.get(saved.filter)
            if sub is None:  # its subscription is gone: delivered as it was matched
                sub = Sub(session, saved.filter, saved.filter, None, saved.qos)
                sub.subscription_id = saved.subscription_id
                sub.active = False
            out = Outgoing(message, saved.qos, saved.retain, sub)
            out.released = saved.released
            session.restore(out, seq, saved.packet_id)


def _cancel_timers(session: Session) -> None:
    for handle in (session.will_handle, session.expiry_handle):
        if handle is not None:
            handle.cancel()
    session.will_handle = session.expiry_handle = None
