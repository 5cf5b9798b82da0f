"""The gateway: the one way in for every adapter.

Adapters turn their protocol into three calls, :meth:`Gateway.authenticate`,
:meth:`Gateway.publish` and :meth:`Gateway.subscribe`, and map the :class:`ConduitError` they
may raise to their protocol's idiom (``error.condition.answer``). Refusals are logged and counted
once, through :meth:`Gateway.refused`.

Nothing is published unless every check passed: topic grammar, authorization, size, rate, SenML.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from core import senml
from core.auth import Authenticator, Authorizer
from core.bus import SESSION_MOVED, Bus, Change, ChangeHandler, Sink, Subscription
from core.content import SENML
from core.credentials import Credentials
from core.errors import (
    AuthenticationError,
    ConduitError,
    QuotaError,
    TooLargeError,
    UnavailableError,
)
from core.identity import Action, Identity, Rules
from core.limits import Limits, RateLimiter
from core.message import Message
from core.message import decode as decode_message
from core.message import encode as encode_message
from core.metrics import Metrics
from core.noise import NoiseLog, printable
from core.provisioning import Provisioning
from core.sealing import SealingKey
from core.sessions import MemorySessions, SessionStore
from core.store import NotFound, Store
from core.topics import TOPIC_CACHE, Topic, TopicFilter, parse_filter, parse_topic


def _revoked(identity: Identity, subjects: dict[tuple[str, str], float]) -> bool:
    """Whether a token identity's subject was revoked after its token was issued."""
    revoked = subjects.get((identity.domain, identity.client_id))
    return revoked is not None and (identity.issued or 0.0) <= revoked


if TYPE_CHECKING:
    from core.tokens import Tokens
    from core.users import Users

log = logging.getLogger("conduit.gateway")

# The reason a subscription is closed with when its client loses the right to it.
REVOKED = "authorization revoked"
# The reason an open connection is ended with when its client is disabled or deleted.
CLIENT_REVOKED = "client disabled or deleted"
# The reason a connection or subscription is ended with when its identity expires.
EXPIRED = "credentials expired"
# The reason given to connections whose client certificate was revoked.
CERTIFICATE_REVOKED = "certificate revoked"
# The reason given to connections of a token whose subject was revoked.
SUBJECT_REVOKED = "credentials revoked"

# Topics repeat: parse each once.
_topic = functools.lru_cache(maxsize=TOPIC_CACHE)(parse_topic)
_filter = functools.lru_cache(maxsize=TOPIC_CACHE)(parse_filter)


class BusUnavailableError(UnavailableError):
    """The bus could not start (its server out of reach): not the store."""


class Gateway:
    def __init__(
        self,
        store: Store,
        bus: Bus,
        authenticator: Authenticator,
        authorizer: Authorizer,
        *,
        limits: Limits | None = None,
        cache_ttl: float = 30.0,
        sessions: SessionStore | None = None,
        tokens: Tokens | None = None,
        sealing: SealingKey | None = None,
        users: Users | None = None,
    ) -> None:
        self.store = store
        # Conduit's own tokens, when it issues them (its keys are loaded at start).
        self.tokens = tokens
        # People who sign in (the public token routes, the management API).
        self.users = users
        self.bus = bus
        # Where protocol sessions that outlive their connection are kept (MQTT).
        self.sessions: SessionStore = sessions if sessions is not None else MemorySessions()
        self.authenticator = authenticator
        self.authorizer = authorizer
        self.limits = limits or Limits()
        self.cache_ttl = cache_ttl
        self.metrics = Metrics()
        self.noise = NoiseLog(log)
        # The master key sealing what is kept encrypted (DTLS keys, providers' shared secrets).
        self.sealing = sealing
        self.provisioning = Provisioning(store, bus.announce, sealing)
        # What adapters want to hear of every change, once caches are dropped (the DTLS keys).
        self._change_handlers: list[ChangeHandler] = []
        self._rate = (
            RateLimiter(self.limits.rate, self.limits.burst) if self.limits.rate > 0 else None
        )
        self._subs: dict[Subscription, str] = {}  # open subscriptions, and their client's id
        self._subs_of: dict[str, int] = {}  # how many each client holds
        # Open connections (MQTT, WebSocket) by their identity, told when their client goes.
        self._connections: set[_Connected] = set()
        # What ends when an identity expires: a connection's unregister, a subscription's end.
        self._expiries: dict[object, asyncio.TimerHandle] = {}
        self._recheck: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.closing = False

    # lifecycle
    async def start(self) -> None:
        await self.store.open()
        if self.tokens is not None:
            try:
                await self.tokens.keyring.load()
            except BaseException:
                await self.store.close()  # its thread would keep the process alive
                raise
        try:
            await self.bus.start()
        except BaseException as exc:
            await self.store.close()
            if isinstance(exc, UnavailableError):  # a bus server out of reach
                raise BusUnavailableError(exc.detail) from None
            raise
        self.bus.on_change(self._changed)
        self._recheck = asyncio.create_task(self._recheck_loop(), name="conduit-recheck")

    async def close(self) -> None:
        self.closing = True
        if self._recheck is not None:
            self._recheck.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._recheck
        for handle in self._expiries.values():
            handle.cancel()
        self._expiries.clear()
        for sub in list(self._subs):
            await self.unsubscribe(sub, "server shutting down")
        await self.sessions.close()
        await self.bus.close()
        await self.store.close()
        self.noise.flush()

    async def health(self) -> dict[str, Any]:
        status: dict[str, Any] = {}
        for name, part in (("store", self.store), ("bus", self.bus)):
            try:
                await part.ping()
                status[name] = "ok"
            except Exception as exc:
                status[name] = f"unavailable: {exc}"
        status["status"] = (
            "ok" if all(v == "ok" for v in status.values()) and not self.closing else "unavailable"
        )
        return status

    # the three calls
    async def authorize(
        self, identity: Identity, target: str | Topic | TopicFilter, action: Action
    ) -> None:
        """Check a right without publishing or subscribing (an MQTT will at CONNECT, what a
        WebSocket upgrade may do). A string is a topic to publish to, or a filter to subscribe
        to."""
        if isinstance(target, str):
            target = _topic(target) if action == "publish" else _filter(target)
        await self._authorize(identity, target, action)

    def authenticate_nowait(self, credentials: Credentials) -> Identity | None:
        """The synchronous fast path of :meth:`authenticate`: the identity when the answer is
        cached, None when the caller must ``await authenticate()``."""
        return self.authenticator.authenticate_cached(credentials)

    async def authenticate(self, credentials: Credentials) -> Identity:
        try:
            return await self.authenticator.authenticate(credentials)
        except ConduitError:
            raise
        except Exception as exc:
            raise UnavailableError(f"cannot check credentials: {exc}") from exc

    async def publish(
        self,
        identity: Identity,
        topic: str | Topic,
        payload: bytes,
        content_type: str,
        protocol: str,
        metadata: dict[str, str] | None = None,
        *,
        retain: bool = False,
    ) -> Message:
        """Check and publish a message. With ``retain`` it also becomes (or, with an empty
        payload, stops being) the topic's retained message, kept in the store."""
        start = time.perf_counter()
        if isinstance(topic, str):
            topic = _topic(topic)
        await self._authorize(identity, topic, "publish")
        message = self._message(identity, topic, payload, content_type, protocol, metadata)
        if retain:
            try:
                await self.store.put_retained(
                    topic.domain,
                    topic.channel,
                    topic.subtopic,
                    encode_message(message) if payload else b"",
                )
            except Exception as exc:
                raise UnavailableError(f"cannot keep the retained message: {exc}") from exc
        await self.bus.publish(message)
        self.metrics.in_[protocol].inc()
        self.metrics.latency[protocol].observe(time.perf_counter() - start)
        return message

    def publish_nowait(
        self,
        identity: Identity,
        topic: str | Topic,
        payload: bytes,
        content_type: str,
        protocol: str,
        metadata: dict[str, str] | None = None,
    ) -> Message | None:
        """The synchronous fast path of :meth:`publish`, for adapters built on asyncio
        Protocols: it publishes and returns the message when the client's rights are cached and
        the bus takes the message without waiting. It returns None, having published nothing,
        when the caller must ``await publish()`` instead (a cold cache, a bus that needs to
        wait). It raises the same errors as :meth:`publish`. Not for retained messages."""
        start = time.perf_counter()
        if isinstance(topic, str):
            topic = _topic(topic)
        if not self.authorizer.authorize_cached(identity, topic, "publish"):
            return None
        message = self._message(identity, topic, payload, content_type, protocol, metadata)
        if not self.bus.publish_nowait(message):
            return None
        metrics = self.metrics
        metrics.in_[protocol].value += 1
        metrics.latency[protocol].observe(time.perf_counter() - start)
        return message

    def _message(
        self,
        identity: Identity,
        topic: Topic,
        payload: bytes,
        content_type: str,
        protocol: str,
        metadata: dict[str, str] | None,
    ) -> Message:
        """The checks after authorization (size, rate, SenML), then the one message."""
        if len(payload) > self.limits.max_payload:
            raise TooLargeError(
                f"payload of {len(payload)} bytes exceeds {self.limits.max_payload}"
            )
        if self._rate is not None:
            self._rate.check(identity.client_id)
        created = time.time_ns()
        if content_type in SENML:
            senml.validate(payload, content_type, created / 1e9)
        return Message(
            topic.domain,
            topic.channel,
            topic.subtopic,
            identity.client_id,
            protocol,
            content_type,
            payload,
            created,
            metadata,
        )

    async def subscribe(
        self,
        identity: Identity,
        topic: str | TopicFilter,
        protocol: str,
        *,
        sink: Sink | None = None,
        group: str | None = None,
        on_close: Callable[[Subscription, str], None] | None = None,
        maxsize: int | None = None,
    ) -> Subscription:
        flt = _filter(topic) if isinstance(topic, str) else topic
        await self._authorize(identity, flt, "subscribe")
        if self.closing:
            raise UnavailableError("server is shutting down")
        client = identity.client_id
        held = self._subs_of.get(client, 0)
        maximum = self.limits.max_subscriptions
        if maximum and held >= maximum:
            self.metrics.limit("max_subscriptions")
            raise QuotaError(
                f"client holds {held} subscriptions, the most allowed", "max_subscriptions"
            )
        sub = Subscription(
            flt,
            protocol=protocol,
            identity=identity,
            maxsize=maxsize or self.limits.queue_size,
            max_dropped=self.limits.max_dropped,
            sink=sink,
            group=group,
            on_close=on_close,
            on_drop=self.metrics.drops[protocol].inc,
        )
        await self.bus.subscribe(sub)
        self._subs[sub] = client
        self._subs_of[client] = self._subs_of.get(client, 0) + 1
        self.metrics.conns[protocol].inc()
        self._expire_subscription(sub, identity)
        return sub

    async def last(self, identity: Identity, topic: str | Topic) -> Message | None:
        """The latest message on exactly this topic (a subscriber's right), or None."""
        if isinstance(topic, str):
            topic = _topic(topic)
        await self._authorize(identity, topic, "subscribe")
        try:
            return await self.bus.last(topic.domain, topic.channel, topic.subtopic)
        except ConduitError:
            raise
        except Exception as exc:
            raise UnavailableError(f"bus: {exc}") from exc

    async def retained(self, identity: Identity, topic: str | TopicFilter) -> list[Message]:
        """The retained messages matching a filter (a subscriber's right), oldest topic first."""
        flt = _filter(topic) if isinstance(topic, str) else topic
        await self._authorize(identity, flt, "subscribe")
        try:
            stored = await self.store.retained(flt.domain, flt.channel)
        except Exception as exc:
            raise UnavailableError(f"cannot read retained messages: {exc}") from exc
        messages = (decode_message(data) for data in stored)
        return [m for m in messages if flt.matches(m.subtopic)]

    async def unsubscribe(self, sub: Subscription, reason: str = "unsubscribed") -> None:
        client = self._subs.pop(sub, None)
        if client is None:
            return
        held = self._subs_of.get(client, 1) - 1
        if held > 0:
            self._subs_of[client] = held
        else:
            self._subs_of.pop(client, None)
        self._cancel_expiry(sub)
        self.metrics.conns[sub.protocol].dec()
        with contextlib.suppress(Exception):
            await self.bus.unsubscribe(sub)
        sub.close(reason)

    async def reauthenticate(self, subs: list[Subscription], identity: Identity) -> None:
        """Subscriptions now held under ``identity`` (a fresh token of their client, presented
        on the open connection): they take its rights and expiry; those it does not allow end
        with :data:`REVOKED`."""
        for sub in subs:
            if sub not in self._subs:
                continue
            try:
                await self._authorize(identity, sub.filter, "subscribe")
            except UnavailableError:
                raise
            except ConduitError:
                await self.unsubscribe(sub, REVOKED)
                continue
            sub.identity = identity
            self._cancel_expiry(sub)
            self._expire_subscription(sub, identity)

    async def broker_token(self, identity: Identity, ttl: float | None) -> tuple[str, int]:
        """A broker token for a provisioned client: its rights of now (the store's connections)
        as topic rules, good for ``ttl`` seconds (the default when None; ValueError past the
        maximum). A token holder cannot trade its token for another: that would make a
        short-lived token last for ever."""
        if self.tokens is None:
            raise UnavailableError("this gateway issues no tokens")
        ttl = self.tokens.broker_ttl(ttl)
        if identity.rules is not None:
            raise AuthenticationError(
                "a token cannot be exchanged for another: present the client's secret or"
                " certificate"
            )
        try:
            held = await self.store.list_connections(identity.domain, identity.client_id)
        except Exception as exc:
            raise UnavailableError(f"store: {exc}") from exc
        rules = Rules(
            publish=tuple(TopicFilter(identity.domain, c.channel, None) for c in held if c.publish),
            subscribe=tuple(
                TopicFilter(identity.domain, c.channel, None) for c in held if c.subscribe
            ),
        )
        return self.tokens.broker(identity, rules, ttl)

    @property
    def clustered(self) -> bool:
        """Other nodes share this gateway's bus (and store): a protocol session may be held by
        another node."""
        return self.bus.spans_nodes

    async def announce(self, change: Change) -> None:
        """Tell every node (this one too) of a change: a protocol session that moves (kind
        ending in ``_session``); changes to rights are announced by provisioning."""
        await self.bus.announce(change)

    def connected(
        self, identity: Identity, on_revoked: Callable[[str], None]
    ) -> Callable[[], None]:
        """Register an open connection authenticated as ``identity``. ``on_revoked(reason)`` is
        called once its client is disabled or deleted (at once for a change through this node's
        API, within ``cache_ttl`` for one made elsewhere), or when the identity expires
        (:data:`EXPIRED`). Returns the function that unregisters the connection when it ends."""
        connection = _Connected(self, identity, on_revoked)
        self._connections.add(connection)
        if identity.expires is not None:
            self._expire_at(connection, identity.expires, connection.expired)
        return connection

    def _expire_at(self, key: object, when: float, end: Callable[[], None]) -> None:
        loop = asyncio.get_running_loop()
        delay = max(0.0, when - time.time())

        def fire() -> None:
            self._expiries.pop(key, None)
            end()

        self._expiries[key] = loop.call_at(loop.time() + delay, fire)

    def _cancel_expiry(self, key: object) -> None:
        handle = self._expiries.pop(key, None)
        if handle is not None:
            handle.cancel()

    def _expire_subscription(self, sub: Subscription, identity: Identity) -> None:
        """End ``sub`` when ``identity`` expires (nothing to do for one that does not)."""
        if identity.expires is not None:
            expire = functools.partial(self._unsubscribe_expired, sub)
            self._expire_at(sub, identity.expires, expire)

    def _unsubscribe_expired(self, sub: Subscription) -> None:
        task = asyncio.get_running_loop().create_task(self.unsubscribe(sub, EXPIRED))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def delivered(self, protocol: str, n: int = 1) -> None:
        """Count messages an adapter wrote to its subscribers."""
        self.metrics.out[protocol].inc(n)

    def refused(self, protocol: str, error: ConduitError, client_id: str | None = None) -> None:
        """Log and count one refusal. Adapters call this once per refusal they answer.

        A refusal of an authenticated client is always logged; one of nobody in particular
        (``client_id`` None: no or bad credentials, a bad path before authentication) is
        sampled (:mod:`core.noise`), since anyone can send those by the thousand."""
        self.refused_input(protocol, error.reason, error.detail, client_id)

    def refused_input(
        self, protocol: str, reason: str, detail: str, client_id: str | None = None
    ) -> None:
        """Log and count one refusal that is not a row of the error table (malformed input,
        a timeout, a connection limit), with ``reason`` as the metrics label."""
        self.metrics.refusals.labels(protocol, reason).inc()
        if client_id is None and not self.noise.allow(protocol, reason):
            return
        log.info(
            "refused %s client=%s reason=%s: %s",
            protocol,
            printable(client_id or "-"),
            reason,
            printable(detail),
        )

    # internals
    async def _authorize(
        self, identity: Identity, target: Topic | TopicFilter, action: Action
    ) -> None:
        try:
            await self.authorizer.authorize(identity, target, action)
        except ConduitError:
            raise
        except Exception as exc:
            raise UnavailableError(f"cannot check authorization: {exc}") from exc

    async def _changed(self, change: Change) -> None:
        """A change on any node: forget what was cached, check what is open again (a session
        that moves changes no rights: only the handlers hear it)."""
        if change.kind.endswith(SESSION_MOVED):
            await self._tell(change)
            return
        if change.kind == "keys" and self.tokens is not None:
            await self.tokens.keyring.reload()
            self.authenticator.invalidate()  # tokens of a key gone stop at once
            return
        self.authenticator.invalidate()
        self.authorizer.invalidate()
        await self._tell(change)
        await self.revalidate()

    async def _tell(self, change: Change) -> None:
        for handler in list(self._change_handlers):
            try:
                await handler(change)
            except Exception:
                log.exception("a change handler failed on %s", change)

    def on_change(self, handler: ChangeHandler) -> Callable[[], None]:
        """Call ``handler`` on every change heard from the bus, after the caches are dropped
        and before open subscriptions are rechecked. Returns the function that stops it."""
        self._change_handlers.append(handler)

        def stop() -> None:
            with contextlib.suppress(ValueError):
                self._change_handlers.remove(handler)

        return stop

    async def revalidate(self) -> None:
        """Close subscriptions whose client lost the right to them, and tell open connections
        whose client was disabled or deleted, or whose client certificate was revoked."""
        try:
            revoked = await self._revoked_certificates()
            subjects = await self._revoked_subjects()
            for sub in list(self._subs):
                identity = sub.identity
                assert isinstance(identity, Identity)
                if identity.certificate in revoked:
                    await self.unsubscribe(sub, CERTIFICATE_REVOKED)
                    continue
                if _revoked(identity, subjects):
                    await self.unsubscribe(sub, SUBJECT_REVOKED)
                    continue
                try:
                    await self._authorize(identity, sub.filter, "subscribe")
                except UnavailableError:
                    raise
                except ConduitError:
                    await self.unsubscribe(sub, REVOKED)
            gone: dict[str, bool] = {}
            for connection in list(self._connections):
                identity = connection.identity
                if identity.certificate in revoked:
                    connection.end(CERTIFICATE_REVOKED)
                    continue
                if identity.rules is not None:
                    # its rights are its own, until it expires or its subject is revoked
                    if _revoked(identity, subjects):
                        connection.end(SUBJECT_REVOKED)
                    continue
                if identity.client_id not in gone:
                    gone[identity.client_id] = not await self._client_enabled(identity)
                if gone[identity.client_id]:
                    connection.end(CLIENT_REVOKED)
        except UnavailableError:  # the store is down: keep serving what was allowed
            log.warning("cannot recheck subscriptions and connections: store unavailable")

    def _identities_in_use(self) -> list[Identity]:
        """The identities of the open connections and subscriptions."""
        identities = [connection.identity for connection in self._connections]
        identities += [sub.identity for sub in self._subs if isinstance(sub.identity, Identity)]
        return identities

    async def _revoked_subjects(self) -> dict[tuple[str, str], float]:
        """(domain, client id) -> revocation time, of the token identities in use."""
        identities = self._identities_in_use()
        pairs = {(i.domain, i.client_id) for i in identities if i.rules is not None}
        if not pairs:
            return {}
        try:
            return await self.store.subject_revocations(pairs)
        except Exception as exc:
            raise UnavailableError(f"store: {exc}") from exc

    async def _revoked_certificates(self) -> set[str | None]:
        """The serials of the client certificates in use (by connections and subscriptions)
        that the store records as revoked."""
        identities = self._identities_in_use()
        serials = {i.certificate for i in identities if i.certificate is not None}
        if not serials:
            return set()
        try:
            found = await self.store.revoked_certificates(serials)
        except Exception as exc:
            raise UnavailableError(f"store: {exc}") from exc
        return set(found)

    async def _client_enabled(self, identity: Identity) -> bool:
        try:
            client = await self.store.get_client(identity.domain, identity.client_id)
        except NotFound:
            return False
        except Exception as exc:
            raise UnavailableError(f"store: {exc}") from exc
        return client.enabled and client.id == identity.client_id

    async def _recheck_loop(self) -> None:
        # Another node's change reaches this one through the cache TTL: recheck as often.
        while True:
            await asyncio.sleep(self.cache_ttl)
            await self.revalidate()


class _Connected:
    """An open connection registered by :meth:`Gateway.connected`; called, it unregisters.
    A class with slots rather than closures: one small object per connection."""

    __slots__ = ("_gateway", "identity", "on_revoked")

    def __init__(
        self, gateway: Gateway, identity: Identity, on_revoked: Callable[[str], None]
    ) -> None:
        self._gateway = gateway
        self.identity = identity
        self.on_revoked = on_revoked

    def __call__(self) -> None:
        self._gateway._connections.discard(self)
        self._gateway._cancel_expiry(self)

    def end(self, reason: str) -> None:
        """Unregister it and tell it ``reason``, once."""
        connections = self._gateway._connections
        if self in connections:
            connections.remove(self)
            self.on_revoked(reason)

    def expired(self) -> None:
        self.end(EXPIRED)
