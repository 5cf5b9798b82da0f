"""The Conduit client: credentials from an app's login token, one MQTT connection kept up,
publish and subscribe.

A :class:`Client` trades the app's external token (Supabase, Firebase, Auth0, OIDC) for
broker credentials at the gateway's ``POST /auth/exchange``, connects over MQTT with them
(MQTT 5 enhanced authentication, ``CONDUIT-TOKEN``), and renews them at ``refresh_at``
(``POST /auth/refresh``) in place: an AUTH packet on the open connection, so nothing is
interrupted. It reconnects with back-off when the network drops, restores its subscriptions,
and holds publishes while offline (a bounded queue). Callbacks (plain functions or coroutine
functions) tell the app what happens; every error has a stable ``kind``
(:mod:`conduit_sdk.errors`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import inspect
import json
import logging
import random
import secrets
import ssl as _ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import urlsplit

import aiohttp
import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes

from conduit_sdk._mqtt import Connection, Ended, Refused, properties_of
from conduit_sdk.errors import AuthError, ConduitError, RefusedError, TokenError
from conduit_sdk.presets import PRESETS, Preset

log = logging.getLogger("conduit_sdk")

Status = Literal["connecting", "connected", "reconnecting", "disconnected"]
Callback = Callable[..., Awaitable[None] | None]

# MQTT reason codes that refuse credentials (CONNACK, DISCONNECT, AUTH); 3.1.1's CONNACK codes
# 4 and 5 arrive from paho as 0x86 and 0x87.
_AUTH_CODES = {0x86: "bad-credentials", 0x87: "not-authorized", 0x8A: "not-authorized",
               0x8C: "bad-credentials"}  # fmt: skip
# Endpoints of the exchange's answer an MQTT client can use, best first.
_MQTT_ENDPOINTS = ("mqtts", "mqtt", "mqtt-wss", "mqtt-ws")
_PORTS = {"mqtt": 1883, "mqtts": 8883, "ws": 80, "wss": 443}
AUTH_TIMEOUT = 10.0  # seconds the broker has to answer a re-authentication
HTTP_TIMEOUT = 10.0


@dataclass(frozen=True, slots=True)
class Credentials:
    """Broker credentials of an exchange (the gateway's answer)."""

    token_id: str
    username: str
    password: str  # a broker token
    expires_at: float
    refresh_at: float
    rules: dict[str, list[str]]
    endpoints: dict[str, str]


@dataclass(frozen=True, slots=True)
class Message:
    """A message received on a subscription."""

    topic: str
    payload: bytes
    qos: int
    retain: bool
    content_type: str | None = None
    user_properties: dict[str, str] = field(default_factory=dict)

    def json(self) -> Any:
        return json.loads(self.payload)


class Subscription:
    """Messages of one topic filter, as an async iterator; made by :meth:`Client.subscribe`
    and used as ``async with client.subscribe(...) as messages: async for m in messages``.
    Holds at most ``queue`` messages the app has not read; past that the oldest are dropped
    (counted in :attr:`dropped`). Iteration ends when the client disconnects for good."""

    def __init__(self, client: Client, topic_filter: str, qos: int, queue: int) -> None:
        self._client = client
        self.filter = topic_filter
        self.qos = qos
        self.dropped = 0
        self._queue: collections.deque[Message | BaseException] = collections.deque()
        self._limit = queue
        self._ready = asyncio.Event()

    async def __aenter__(self) -> Subscription:
        await self._client._add(self)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._client._remove(self)

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Message:
        while not self._queue:
            self._ready.clear()
            await self._ready.wait()
        item = self._queue.popleft()
        if isinstance(item, BaseException):
            self._queue.appendleft(item)  # ended: every later read ends too
            raise item
        return item

    def _put(self, item: Message | BaseException) -> None:
        if isinstance(item, Message) and len(self._queue) >= self._limit:
            self._queue.popleft()
            self.dropped += 1
        self._queue.append(item)
        self._ready.set()


def matches(topic_filter: str, topic: str) -> bool:
    """Whether ``topic`` matches the MQTT filter (``+``, ``#``; ``$share/<group>/`` ignored)."""
    if topic_filter.startswith("$share/"):
        topic_filter = topic_filter.split("/", 2)[2]
    levels = topic.split("/")
    for i, part in enumerate(topic_filter.split("/")):
        if part == "#":
            return True
        if i >= len(levels) or (part != "+" and part != levels[i]):
            return False
    return len(levels) == len(topic_filter.split("/"))


class Client:
    """A connection to a Conduit gateway (see the module docstring and docs/sdk-python.md).

    ``url``: the gateway's HTTP(S) base URL, for the token endpoints (``https://host:8443``).
    ``mqtt_url``: where to connect (``mqtts://host:8883``, ``mqtt://``, ``wss://host:8084/mqtt``,
    ``ws://``); by default the first of the exchange's ``endpoints`` among mqtts, mqtt, mqtt-wss,
    mqtt-ws. ``ssl``: the TLS context for both (a private CA, a client certificate); the
    system's defaults otherwise. ``preset``: a name of :data:`~conduit_sdk.presets.PRESETS`;
    keyword ``overrides`` replace its fields. ``auto_refresh``: renew the credentials at their
    ``refresh_at`` (else the app calls :meth:`refresh`, told by ``on_token_expiring``).
    ``reconnect_on_auth_error``: keep reconnecting after the broker refused the credentials
    (by default the client stops: retrying the same credentials cannot help).

    Callbacks, plain or ``async``: ``on_token_refreshed(credentials)``,
    ``on_token_expiring(expires_at)`` (``expiring_within`` seconds before the end, when the
    credentials have not been renewed by then), ``on_token_error(error, kind)`` (an exchange or
    refresh failed), ``on_auth_error(error)`` (the broker refused the credentials),
    ``on_connection_status(status)`` (connecting, connected, reconnecting, disconnected).
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        preset: str = "desktop",
        mqtt_url: str | None = None,
        ssl: _ssl.SSLContext | None = None,
        client_id: str | None = None,
        auto_refresh: bool = True,
        reconnect_on_auth_error: bool = False,
        expiring_within: float = 60.0,
        connect_timeout: float = 10.0,
        on_token_refreshed: Callback | None = None,
        on_token_expiring: Callback | None = None,
        on_token_error: Callback | None = None,
        on_auth_error: Callback | None = None,
        on_connection_status: Callback | None = None,
        **overrides: Any,
    ) -> None:
        if preset not in PRESETS:
            raise ValueError(f"preset {preset!r} is one of {', '.join(PRESETS)}")
        self.preset: Preset = dataclasses.replace(PRESETS[preset], **overrides)
        self._url = url.rstrip("/") if url else None
        self._mqtt_url = mqtt_url
        self._ssl = ssl
        self.client_id = client_id or "sdk-" + secrets.token_hex(8)
        self.auto_refresh = auto_refresh
        self.reconnect_on_auth_error = reconnect_on_auth_error
        self.expiring_within = expiring_within
        self.connect_timeout = connect_timeout
        self.on_token_refreshed = on_token_refreshed
        self.on_token_expiring = on_token_expiring
        self.on_token_error = on_token_error
        self.on_auth_error = on_auth_error
        self.on_connection_status = on_connection_status
        self.status: Status = "disconnected"
        self._credentials: Credentials | None = None
        self._secret: tuple[str, str] | None = None
        self._external: dict[str, Any] | None = None  # domain, provider, token, ttl
        self._conn: Connection | None = None
        self._runner: asyncio.Task[None] | None = None
        self._refresher: asyncio.Task[None] | None = None
        self._subs: list[Subscription] = []
        self._filters: dict[str, int] = {}  # subscribed on the broker: filter -> QoS
        self._waiting: collections.deque[asyncio.Future[None]] = collections.deque()
        self._http: aiohttp.ClientSession | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closing = False
        self._reconnect_now = False
        self._renewed = asyncio.Event()  # set when credentials are replaced

    @property
    def credentials(self) -> Credentials | None:
        """The broker credentials in use (token mode)."""
        return self._credentials

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.disconnect()

    # --- connecting -----------------------------------------------------------------------

    async def connect_with_token(
        self, *, domain: str, provider: str, external_token: str, ttl: int | None = None
    ) -> Credentials:
        """Exchange the app's login token for broker credentials and connect with them.
        Raises :class:`TokenError` (the exchange failed), :class:`AuthError` (the broker
        refused), :class:`ConduitError` ``network`` (the broker could not be reached)."""
        self._external = {"domain": domain, "provider": provider, "token": external_token,
                          "ttl": ttl}  # fmt: skip
        credentials = await self._exchange()
        self._credentials = credentials
        await self._start()
        return credentials

    async def connect_with_secret(self, *, client_id: str, secret: str) -> None:
        """Connect as a provisioned client with its secret (no renewal needed)."""
        if self._mqtt_url is None:
            raise ValueError("connect_with_secret needs mqtt_url")
        self._secret = (client_id, secret)
        await self._start()

    async def update_external_token(self, token: str | None) -> None:
        """The app's sign-in changed: its token was renewed (exchange it, and renew the
        connection's credentials in place), or the user signed out (``None``: disconnect)."""
        if token is None:
            await self.disconnect()
            return
        if self._external is None:
            raise ValueError("this client was not connected with a token")
        self._external["token"] = token
        await self._apply(await self._exchange())

    async def refresh(self) -> Credentials:
        """Renew the credentials now (as auto refresh does at ``refresh_at``)."""
        credentials = await self._renew()
        await self._apply(credentials)
        return credentials

    async def disconnect(self) -> None:
        """Close the connection (DISCONNECT) and stop renewing; subscriptions' iterations end."""
        self._closing = True
        for task in (self._refresher, self._runner):
            if task is not None and task is not asyncio.current_task():
                task.cancel()
        conn = self._conn
        if conn is not None:
            await conn.close()
        for task in (self._refresher, self._runner):
            if task is not None and task is not asyncio.current_task():
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        self._stopped(ConduitError("not-connected", "the client disconnected"))
        if self._http is not None:
            await self._http.close()
            self._http = None

    # --- messages ---------------------------------------------------------------------------

    async def publish(
        self,
        topic: str,
        payload: bytes | str,
        *,
        qos: int = 1,
        retain: bool = False,
        content_type: str | None = None,
        user_properties: dict[str, str] | None = None,
    ) -> None:
        """Publish; with QoS 1, return once the broker has it. Offline, wait for the connection
        (at most ``offline_queue`` publishes wait; more raise ``offline-queue-full``). A
        publish the broker refuses raises :class:`RefusedError` with its reason code."""
        data = payload.encode() if isinstance(payload, str) else bytes(payload)
        properties = None
        if self.preset.mqtt_version == 5 and (content_type or user_properties):
            properties = properties_of(PacketTypes.PUBLISH)
            if content_type:
                properties.ContentType = content_type
            if user_properties:
                properties.UserProperty = list(user_properties.items())
        while True:
            conn = self._conn
            if conn is None or self.status != "connected":
                await self._connection()
                continue
            try:
                await conn.publish(topic, data, qos, retain, properties)
                return
            except Refused as exc:
                if exc.what == "PUBLISH":
                    raise RefusedError(f"publish on {topic!r} refused", exc.code) from None
            except ConnectionError:
                pass
            # The connection ended before the broker had it: send again once reconnected
            # (QoS 1 is at least once).

    def subscribe(self, topic_filter: str, *, qos: int = 1, queue: int = 1000) -> Subscription:
        """The messages of ``topic_filter``, from ``async with`` on (restored after a
        reconnect). Entering raises :class:`RefusedError` if the broker refuses the filter."""
        return Subscription(self, topic_filter, qos, queue)

    async def _add(self, sub: Subscription) -> None:
        self._subs.append(sub)
        if self._filters.get(sub.filter, -1) >= sub.qos:
            return
        self._filters[sub.filter] = sub.qos
        conn = self._conn
        if conn is not None and self.status == "connected":
            try:
                code = await conn.subscribe(sub.filter, sub.qos)
            except (Refused, ConnectionError):
                return  # restored on reconnect
            if code >= 0x80:
                self._subs.remove(sub)
                self._drop_filter(sub.filter)
                raise RefusedError(f"subscription to {sub.filter!r} refused", code)

    async def _remove(self, sub: Subscription) -> None:
        if sub in self._subs:
            self._subs.remove(sub)
        if not any(s.filter == sub.filter for s in self._subs):
            self._drop_filter(sub.filter)

    def _drop_filter(self, topic_filter: str) -> None:
        if self._filters.pop(topic_filter, None) is not None and self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.unsubscribe(topic_filter)

    def _on_message(self, message: paho.MQTTMessage) -> None:
        properties = getattr(message, "properties", None)
        received = Message(
            message.topic,
            bytes(message.payload),
            message.qos,
            bool(message.retain),
            getattr(properties, "ContentType", None),
            dict(getattr(properties, "UserProperty", None) or []),
        )
        for sub in self._subs:
            if matches(sub.filter, received.topic):
                sub._put(received)

    # --- the connection ---------------------------------------------------------------------

    async def _start(self) -> None:
        self._closing = False
        first: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._runner = asyncio.create_task(self._run(first))
        try:
            await first
        except BaseException:
            self._runner.cancel()
            raise
        if self._credentials is not None:
            self._refresher = asyncio.create_task(self._renewals())

    def _target(self) -> tuple[str, str, int, str, _ssl.SSLContext | None]:
        """transport ("tcp" or "websockets"), host, port, path and TLS context."""
        url = self._mqtt_url
        if url is None:
            endpoints = self._credentials.endpoints if self._credentials else {}
            url = next((endpoints[n] for n in _MQTT_ENDPOINTS if n in endpoints), None)
            if url is None:
                raise ConduitError("network", "the gateway named no MQTT endpoint")
        parts = urlsplit(url)
        if parts.scheme not in _PORTS or not parts.hostname:
            raise ValueError(f"{url!r}: an MQTT URL is mqtt://, mqtts://, ws:// or wss://")
        tls = None
        if parts.scheme in ("mqtts", "wss"):
            tls = self._ssl or _ssl.create_default_context()
        transport = "websockets" if parts.scheme in ("ws", "wss") else "tcp"
        port = parts.port or _PORTS[parts.scheme]
        return transport, parts.hostname, port, parts.path or "/mqtt", tls

    async def _open(self) -> Connection:
        transport, host, port, path, tls = self._target()
        preset = self.preset
        conn = Connection(
            self.client_id,
            version=preset.mqtt_version,
            transport=transport,
            path=path,
            tls=tls,
            clean_start=preset.session_expiry == 0,
            on_message=self._on_message,
        )
        if self._credentials is not None:
            username, password = self._credentials.username, None
            token: str | None = self._credentials.password
        else:
            assert self._secret is not None
            (username, password), token = self._secret, None
        await conn.open(
            host,
            port,
            keepalive=preset.keepalive,
            username=username,
            password=password,
            token=token,
            session_expiry=preset.session_expiry,
            timeout=self.connect_timeout,
        )
        return conn

    async def _run(self, first: asyncio.Future[None]) -> None:
        """Connect, and connect again whenever the connection ends, until told to stop."""
        delay = self.preset.backoff_initial
        self._status("connecting")
        while not self._closing:
            error: ConduitError | None = None
            try:
                if self._credentials is not None and time.time() >= (
                    self._credentials.expires_at - 5
                ):
                    await self._apply(await self._renew())
                conn = await self._open()
            except TokenError as exc:
                self._fire(self.on_token_error, exc, exc.kind)
                error = exc
            except Refused as exc:
                error = self._auth_error(exc.code, exc.reason or "connection refused")
            except (OSError, ConnectionError, TimeoutError) as exc:
                error = ConduitError("network", f"{type(exc).__name__}: {exc}")
            else:
                delay = self.preset.backoff_initial
                ended = await self._connected(conn, first)
                if self._closing:
                    break
                error = self._after(ended)
            if error is not None and not first.done():
                first.set_exception(error)  # the first connect fails: the caller decides
                self._stopped(error)
                return
            if isinstance(error, AuthError) or (isinstance(error, TokenError) and error.terminal):
                if isinstance(error, AuthError):
                    self._fire(self.on_auth_error, error)
                if not self.reconnect_on_auth_error:
                    self._stopped(error)
                    return
            if self._closing:
                break
            self._status("reconnecting")
            if self._reconnect_now:
                self._reconnect_now = False
                continue
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))
            delay = min(self.preset.backoff_max, delay * 2)
        self._status("disconnected")

    async def _connected(self, conn: Connection, first: asyncio.Future[None]) -> Ended:
        """Use the connection until it ends: restore subscriptions, release the publishes
        that waited."""
        self._conn = conn
        try:
            for topic_filter, qos in list(self._filters.items()):
                code = await conn.subscribe(topic_filter, qos)
                if code >= 0x80:
                    self._filters.pop(topic_filter, None)
                    refused = RefusedError(f"subscription to {topic_filter!r} refused", code)
                    for sub in [s for s in self._subs if s.filter == topic_filter]:
                        self._subs.remove(sub)
                        sub._put(refused)
            self._status("connected")
            if not first.done():
                first.set_result(None)
            while self._waiting:
                waiter = self._waiting.popleft()
                if not waiter.done():
                    waiter.set_result(None)
            return await conn.ended
        except (Refused, ConnectionError):
            return await conn.ended
        finally:
            self._conn = None

    def _after(self, ended: Ended) -> ConduitError | None:
        """What an ended connection means: None to reconnect, an error otherwise."""
        code = ended.code
        if code in _AUTH_CODES:
            creds = self._credentials
            if creds is not None and time.time() >= creds.expires_at - 1:
                return None  # the credentials ran out: renewed before reconnecting
            return self._auth_error(code, ended.reason or "credentials refused")
        return None

    def _auth_error(self, code: int, reason: str) -> ConduitError:
        kind = _AUTH_CODES.get(code)
        if kind is None:
            return ConduitError("network", f"refused with 0x{code:02x}: {reason}")
        return AuthError(kind, reason, code)

    async def _connection(self) -> None:
        """Wait for a connection (a publish made offline)."""
        if self._closing or self._runner is None or self._runner.done():
            raise ConduitError("not-connected", "the client is not connected")
        if len(self._waiting) >= self.preset.offline_queue:
            raise ConduitError(
                "offline-queue-full",
                f"{self.preset.offline_queue} publishes already wait for a connection",
            )
        waiter = asyncio.get_running_loop().create_future()
        self._waiting.append(waiter)
        try:
            await waiter
        finally:
            with contextlib.suppress(ValueError):
                self._waiting.remove(waiter)

    def _stopped(self, error: BaseException) -> None:
        """No more connections: what waits for one fails, iterations end."""
        while self._waiting:
            waiter = self._waiting.popleft()
            if not waiter.done():
                waiter.set_exception(error)
        end = StopAsyncIteration() if error.__class__ is ConduitError else error
        for sub in self._subs:
            sub._put(end)
        if self.status != "disconnected":
            self._status("disconnected")

    # --- credentials ------------------------------------------------------------------------

    async def _exchange(self) -> Credentials:
        assert self._external is not None
        body = {k: v for k, v in self._external.items() if v is not None}
        return await self._post("/auth/exchange", body)

    async def _renew(self) -> Credentials:
        """Fresh credentials: a refresh of the current ones while they are valid, else (or
        when the refresh is refused for good) an exchange of the app's token."""
        creds = self._credentials
        if creds is None:
            raise ValueError("this client was not connected with a token")
        if time.time() < creds.expires_at - 1:
            try:
                return await self._post(
                    "/auth/refresh", {"token_id": creds.token_id, "password": creds.password}
                )
            except TokenError as exc:
                if exc.kind not in ("session-ended", "token-invalid", "token-expired"):
                    raise
        if self._external is None:
            raise TokenError("token-expired", "the credentials expired")
        return await self._exchange()

    async def _apply(self, credentials: Credentials) -> None:
        """Use new credentials: in place on an MQTT 5 connection (AUTH), by reconnecting on
        MQTT 3.1.1 or when the subject changed."""
        old = self._credentials
        self._credentials = credentials
        self._renewed.set()
        self._fire(self.on_token_refreshed, credentials)
        conn = self._conn
        if conn is None:
            return  # the next connection uses them
        if conn.version == 5 and old is not None and old.username == credentials.username:
            try:
                await conn.reauthenticate(credentials.password, AUTH_TIMEOUT)
                return
            except Refused:
                return  # the broker ends the connection: the run loop reports why
            except (ConnectionError, TimeoutError, RuntimeError):
                pass
        self._reconnect_now = True
        await conn.close()

    async def _renewals(self) -> None:
        """Renew at ``refresh_at`` (auto refresh), retrying with back-off; tell the app when
        the credentials are about to end unrenewed."""
        while not self._closing:
            creds = self._credentials
            assert creds is not None
            warn_at = creds.expires_at - self.expiring_within
            if not self.auto_refresh:
                await asyncio.sleep(max(0.0, warn_at - time.time()))
                if self._credentials is creds:
                    self._renewed.clear()
                    self._fire(self.on_token_expiring, creds.expires_at)
                    await self._renewed.wait()
                continue
            # The gateway's refresh_at, but never in the last second of the credentials.
            renew_at = min(creds.refresh_at, creds.expires_at - 1.0)
            await asyncio.sleep(max(0.0, renew_at - time.time()))
            if self._credentials is not creds:
                continue  # renewed meanwhile (update_external_token)
            delay, warned = self.preset.backoff_initial, False
            while self._credentials is creds:
                try:
                    await self._apply(await self._renew())
                    break
                except TokenError as exc:
                    self._fire(self.on_token_error, exc, exc.kind)
                    left = creds.expires_at - time.time()
                    if not warned and left <= self.expiring_within:
                        warned = True
                        self._fire(self.on_token_expiring, creds.expires_at)
                    if exc.terminal:
                        return  # only a new external token helps: update_external_token
                    wait = exc.retry_after or delay * random.uniform(0.5, 1.0)
                    await asyncio.sleep(max(0.5, min(wait, left / 2)))
                    delay = min(self.preset.backoff_max, delay * 2)

    async def _post(self, path: str, body: dict[str, Any]) -> Credentials:
        if self._url is None:
            raise ValueError("exchanging tokens needs the gateway's url")
        if self._http is None:
            self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=HTTP_TIMEOUT))
        try:
            async with self._http.post(self._url + path, json=body, ssl=self._ssl or True) as r:
                status, headers = r.status, r.headers
                answer = await r.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise TokenError("network", f"{path}: {type(exc).__name__}: {exc}") from None
        if status != 200 or not isinstance(answer, dict):
            problem = answer if isinstance(answer, dict) else {}
            kind = str(problem.get("type", ""))
            kind = kind.rpartition(":")[2] if kind.startswith("urn:conduit:") else "network"
            retry = headers.get("Retry-After")
            raise TokenError(
                kind,
                str(problem.get("detail", f"HTTP {status}")),
                status,
                float(retry) if retry and retry.isdigit() else None,
            )
        try:
            return Credentials(
                answer["token_id"], answer["username"], answer["password"],
                float(answer["expires_at"]), float(answer["refresh_at"]),
                answer.get("rules", {}), answer.get("endpoints", {}),
            )  # fmt: skip
        except (KeyError, TypeError, ValueError):
            raise TokenError("network", f"{path}: not an answer of a Conduit gateway") from None

    # --- callbacks --------------------------------------------------------------------------

    def _status(self, status: Status) -> None:
        if status != self.status:
            self.status = status
            self._fire(self.on_connection_status, status)

    def _fire(self, callback: Callback | None, *args: Any) -> None:
        if callback is None:
            return
        try:
            result = callback(*args)
        except Exception:
            log.exception("callback %s failed", getattr(callback, "__name__", callback))
            return
        if inspect.isawaitable(result):
            task = asyncio.ensure_future(result)
            self._tasks.add(task)
            task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("callback failed", exc_info=task.exception())
