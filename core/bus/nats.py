"""The NATS bus: N Conduit nodes as one gateway, on NATS (core subjects and one JetStream stream).

What travels how:

- **Messages** go on core NATS subjects, ``<prefix>.<domain>.<channel>[.<level>...]``
  (:func:`core.topics.subject`), published without waiting for any acknowledgement: a QoS 0
  fan-out costs one write to NATS, whatever the number of nodes and subscribers.
- **The latest message of each topic** (CoAP GET, :meth:`NatsBus.last`) is kept by a JetStream
  stream that listens on the same subjects (``max_msgs_per_subject`` 1 by default): the server
  stores what is published, the publisher waits for nothing more, and any node reads it back by
  subject (a direct get).
- **Changes** (:class:`core.bus.Change`: cache invalidation, revocation) go on the core subject
  ``<prefix>.changes``, which every node subscribes to. Two tokens: no message subject (three
  or more) is ever one, and the stream does not keep it.

Retained MQTT messages and persistent sessions are not the bus's: they live in the store.

Interest: a node subscribes on NATS to exactly the filters its subscribers hold, one NATS
subscription per distinct filter (two for a filter ending in ``#``, whose parent level
matches too), opened with the first subscriber and closed with the last. A message matching
several of the node's filters reaches it once per filter, so what arrives on one NATS
subscription goes to the subscribers of that filter only (:class:`_Interest`), never through a
router of every filter, which would deliver those copies twice.

A shared subscription (``$share/<group>/<filter>``) is a NATS queue subscription, its queue
named after the group and the filter: NATS gives each message to one node of those holding
the group, and that node to one of its members (in turn). Once per cluster.

A message published on this node reaches this node's plain subscribers at once, through a
local :class:`~core.bus.Router` as on the in-process bus, and NATS does not send it back: the
connection that publishes and holds plain subscriptions asks for no echo. That round trip was
measured to cost a third of a one-node MQTT fan-out (bench/cluster_bench.py,
docs/performance.md). Shared subscriptions are the exception: their queue subscriptions are on
a second connection, with echo, so that NATS chooses among every node's members, this one's
included, for what is published here too: once per cluster. MQTT's No Local needs nothing from
the bus: the publishing session's token travels in the message's metadata.

Unavailability: while NATS is away (nats-py reconnects by itself, again and again, and then
subscribes the node's filters again) publishing, subscribing, ``last`` and ``ping`` raise
:class:`~core.errors.UnavailableError`, which each protocol answers with its code for "bus or
store unavailable". When NATS is back the handlers hear ``Change("keys")`` and
``Change("bus")``: changes announced meanwhile may have been missed, so caches go.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import secrets
import ssl
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import msgspec
import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription as NatsSubscription
from nats.js.api import DiscardPolicy, StorageType, StreamConfig

from core.bus import Change, ChangeHandler, Router, Subscription
from core.errors import TooLargeError, UnavailableError
from core.message import Message, decode, encode
from core.topics import TOPIC_CACHE, Topic, TopicFilter, filter_subject, subject

log = logging.getLogger("conduit.bus.nats")

# Bytes of messages published without waiting that may sit in the outbox of a loop turn;
# past it publish_nowait says no and publish waits for the outbox to be handed to NATS.
OUTBOX_BYTES: Final = 1024 * 1024
# Seconds a round trip to NATS (ping, JetStream request, subscribing) may take.
REQUEST_TIMEOUT: Final = 2.0
# Seconds between two pings nats-py sends on an idle connection, and pings without answer
# before it calls the connection dead: a silent network failure is seen within ~30 s.
PING_INTERVAL: Final = 10
MAX_OUTSTANDING_PINGS: Final = 3


@dataclass(frozen=True, slots=True)
class NatsOptions:
    """How to reach NATS and what to keep there; ``conduit/app.py`` fills it from settings."""

    url: str = "nats://127.0.0.1:4222"  # comma-separated URLs
    user: str | None = None
    password: str | None = None
    token: str | None = None
    creds: Path | None = None  # .creds file: user JWT and NKey seed
    nkey_seed: Path | None = None
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    prefix: str = "m"
    stream: str = "conduit"
    stream_storage: str = "file"  # or "memory"
    stream_replicas: int = 1
    stream_max_age: float = 0.0  # seconds; 0: no limit
    stream_max_bytes: int = 1024 * 1024 * 1024
    stream_max_msgs_per_subject: int = 1
    connect_timeout: float = 10.0
    reconnect_wait: float = 1.0

    @property
    def servers(self) -> list[str]:
        return [u.strip() for u in self.url.split(",") if u.strip()]

    @property
    def shown_url(self) -> str:
        """The URLs as they may be logged: without a user name and password in them."""
        shown = []
        for url in self.servers:
            parts = urllib.parse.urlsplit(url if "://" in url else f"nats://{url}")
            host = parts.netloc.rpartition("@")[2]
            shown.append(parts._replace(netloc=host).geturl())
        return ",".join(shown)

    def tls(self) -> ssl.SSLContext | None:
        """The client TLS context, when a CA or a client certificate is configured (a
        ``tls://`` URL without them uses the system's CAs)."""
        if self.tls_ca is None and self.tls_cert is None:
            return None
        context = ssl.create_default_context(
            cafile=str(self.tls_ca) if self.tls_ca is not None else None
        )
        if self.tls_cert is not None:
            context.load_cert_chain(
                str(self.tls_cert), str(self.tls_key) if self.tls_key is not None else None
            )
        return context


class _Announcement(msgspec.Struct, array_like=True, frozen=True):
    """A change as it crosses NATS: which node announced it, so that node skips it."""

    origin: str
    change: Change


_announcement = msgspec.msgpack.Decoder(_Announcement)


@functools.lru_cache(maxsize=TOPIC_CACHE)
def _subject(prefix: str, domain: str, channel: str, subtopic: str) -> str:
    return subject(Topic(domain, channel, subtopic), prefix)


def filter_subjects(flt: TopicFilter, prefix: str) -> list[str]:
    """The NATS subjects that together match what ``flt`` matches: a filter ending in ``#``
    also matches its parent level, which ``>`` does not."""
    subjects = [filter_subject(flt, prefix)]
    levels = flt.levels
    if levels is None:
        subjects.append(filter_subject(TopicFilter(flt.domain, flt.channel, ()), prefix))
    elif levels and levels[-1] == "#":
        subjects.append(filter_subject(TopicFilter(flt.domain, flt.channel, levels[:-1]), prefix))
    return subjects


def queue_name(group: str, flt: TopicFilter) -> str:
    """The NATS queue group of a shared subscription: its group (escaped, cut to 64
    characters, for people reading the server's monitoring) and a digest of the group and the
    filter (so two groups or filters never share a queue)."""
    digest = hashlib.sha256(f"{group}\0{flt}".encode()).hexdigest()[:24]
    readable = urllib.parse.quote(group, safe="").replace(".", "%2E")[:64]
    return f"share.{readable}.{digest}"


def _value(field: object) -> object:
    """A stream setting as the server's answer and the config we send can both be compared:
    enumerations as their values, an unset age as 0."""
    if field is None:
        return 0.0
    return getattr(field, "value", field)


async def _nothing() -> None:
    """A connection callback with nothing to do."""


class _Interest:
    """This node's subscribers of one filter (or of one shared group of one filter), and the
    NATS subscriptions that bring their messages."""

    __slots__ = ("bus", "group", "nats", "ready", "subs", "turn")

    def __init__(self, bus: NatsBus, group: str | None) -> None:
        self.bus = bus
        self.group = group
        self.subs: list[Subscription] = []  # replaced, never changed in place (see Router)
        self.nats: list[NatsSubscription] = []
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.turn = 0

    async def receive(self, msg: Msg) -> None:
        try:
            message = decode(msg.data)
        except msgspec.DecodeError:
            self.bus.foreign += 1
            if self.bus.foreign == 1 or self.bus.foreign % 1000 == 0:
                log.warning(
                    "bus: %d undecodable messages on %s (another program on this prefix?)",
                    self.bus.foreign,
                    msg.subject,
                )
            return
        subs = self.subs
        if not subs:
            return
        if self.group is None:
            for sub in subs:
                sub.offer(message)
        else:
            self.turn += 1
            subs[self.turn % len(subs)].offer(message)


class NatsBus:
    """The bus of a deployment of several nodes, on NATS (see the module's docstring)."""

    name = "nats"
    spans_nodes = True  # several nodes share it: MQTT sessions move between them

    def __init__(self, options: NatsOptions | None = None) -> None:
        self.options = options or NatsOptions()
        self.prefix = self.options.prefix
        self.origin = secrets.token_hex(8)  # this node, in the changes it announces
        self.changes_subject = f"{self.prefix}.changes"
        self.nc: Client | None = None  # messages and changes; NATS does not echo what it sends
        self.qc: Client | None = None  # shared subscriptions (NATS queue groups), with echo
        # This node's subscribers outside shared groups: a message published here reaches them
        # at once, as on the in-process bus, not back from NATS.
        self.router = Router()
        self._closed = False
        self._interests: dict[tuple[str | None, TopicFilter], _Interest] = {}
        self._handlers: list[ChangeHandler] = []
        self._outbox: list[tuple[str, bytes]] = []
        self._outbox_bytes = 0
        self._drain: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._stream_ok = False
        self._away_since: float | None = None
        self._errors = 0  # connection errors since the connection was last up (for the log)
        self.foreign = 0  # undecodable messages received
        self.lost = 0  # messages published without waiting that NATS never took

    # lifecycle
    async def start(self) -> None:
        nc = await self._connect(no_echo=True)
        try:
            qc = await self._connect(no_echo=False, role="groups")
        except BaseException:
            with contextlib.suppress(Exception):
                await nc.close()
            raise
        self.nc, self.qc = nc, qc
        self._errors = 0
        try:
            await self._ensure_stream()
            await nc.subscribe(self.changes_subject, cb=self._heard)
            await self.sync()
        except BaseException:
            self.nc = self.qc = None  # quiets the connections' callbacks
            for client in (nc, qc):
                with contextlib.suppress(Exception):
                    await client.close()
            raise

    async def _connect(self, no_echo: bool, role: str = "") -> Client:
        """A connection to NATS; ``no_echo``: NATS never sends it back what it published."""
        o = self.options
        nc = Client()
        kwargs: dict[str, Any] = {}
        if o.user is not None:
            kwargs["user"] = o.user
            kwargs["password"] = o.password or ""
        if o.token is not None:
            kwargs["token"] = o.token
        if o.creds is not None:
            kwargs["user_credentials"] = str(o.creds)
        if o.nkey_seed is not None:
            kwargs["nkeys_seed"] = str(o.nkey_seed)
        try:
            tls = o.tls()
        except (OSError, ssl.SSLError) as exc:
            raise UnavailableError(f"NATS TLS files: {exc}") from None
        if tls is not None:
            kwargs["tls"] = tls
        try:
            await asyncio.wait_for(
                nc.connect(
                    servers=o.servers,
                    name=f"conduit-{self.origin}" + (f"-{role}" if role else ""),
                    no_echo=no_echo,
                    error_cb=self._error,
                    disconnected_cb=self._disconnected,
                    reconnected_cb=self._reconnected if not role else _nothing,
                    closed_cb=self._connection_closed,
                    allow_reconnect=True,
                    max_reconnect_attempts=-1,  # for ever: service resumes when NATS is back
                    reconnect_time_wait=o.reconnect_wait,  # type: ignore[arg-type]
                    connect_timeout=min(REQUEST_TIMEOUT, o.connect_timeout),  # type: ignore[arg-type]
                    ping_interval=PING_INTERVAL,
                    max_outstanding_pings=MAX_OUTSTANDING_PINGS,
                    **kwargs,
                ),
                o.connect_timeout,
            )
        except (TimeoutError, OSError, nats.errors.Error) as exc:
            with contextlib.suppress(Exception):
                await nc.close()
            detail = str(exc) or type(exc).__name__
            if isinstance(exc, TimeoutError) and nc.last_error is not None:
                detail = str(nc.last_error) or type(nc.last_error).__name__
            raise UnavailableError(
                f"cannot reach NATS at {o.shown_url} within {o.connect_timeout:g} s: {detail}"
            ) from None
        return nc

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        drain = self._drain
        if drain is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(drain), REQUEST_TIMEOUT)
        self._interests.clear()
        for task in list(self._tasks):
            task.cancel()
        self.router = Router()
        nc = self.nc
        if nc is not None:
            if nc.is_connected:  # what was published reaches NATS (see sync)
                with contextlib.suppress(Exception):
                    for _ in range(2):
                        await nc.flush(REQUEST_TIMEOUT)  # type: ignore[arg-type]
            with contextlib.suppress(Exception):
                await nc.close()
        if self.qc is not None:
            with contextlib.suppress(Exception):
                await self.qc.close()

    def _connected(self) -> Client:
        """The connection, if it can carry messages now; UnavailableError otherwise."""
        return self._usable(self.nc)

    def _groups(self) -> Client:
        """The connection of shared subscriptions, if it can carry messages now."""
        return self._usable(self.qc)

    def _usable(self, client: Client | None) -> Client:
        if client is None or self._closed:
            raise UnavailableError("bus is closed")
        if not client.is_connected:
            raise UnavailableError(f"NATS unreachable ({self._away()}): reconnecting")
        return client

    def _away(self) -> str:
        since = self._away_since
        return f"for {time.monotonic() - since:.1f} s" if since is not None else "connecting"

    async def sync(self, nc: Client | None = None) -> None:
        """Return once the NATS server has processed what this node sent so far (a SUB, an
        UNSUB). nats-py's ``flush()`` writes its PING straight to the socket, ahead of commands
        its flusher task has not written yet: the first round trip lets that task write them
        (it runs before the answer can be read), the second comes back behind them."""
        nc = nc or self._connected()
        for _ in range(2):
            await nc.flush(REQUEST_TIMEOUT)  # type: ignore[arg-type]

    async def ping(self) -> None:
        nc = self._connected()
        try:
            await nc.flush(REQUEST_TIMEOUT)  # type: ignore[arg-type]
        except Exception as exc:
            raise UnavailableError(f"NATS does not answer: {exc or type(exc).__name__}") from None
        if not self._stream_ok:
            await self._ensure_stream()

    # messages
    async def publish(self, message: Message) -> None:
        while not self.publish_nowait(message):
            drain = self._drain
            if drain is not None:
                await asyncio.shield(drain)

    def publish_nowait(self, message: Message) -> bool:
        """Put the message in the outbox this loop turn's publishes share, handed to NATS by
        one task once the turn ends (nats-py's publish is a coroutine: a task per message
        would cost more than the publish). False when the outbox is full."""
        nc = self._connected()
        data = encode(message)
        if len(data) > nc.max_payload:
            raise TooLargeError(
                f"message of {len(data)} bytes exceeds the bus's limit of {nc.max_payload}"
            )
        if self._outbox_bytes >= OUTBOX_BYTES:
            return False
        self._outbox.append(
            (_subject(self.prefix, message.domain, message.channel, message.subtopic), data)
        )
        self._outbox_bytes += len(data)
        if self._drain is None:
            self._drain = asyncio.get_running_loop().create_task(self._send())
        self.router.route(message)
        return True

    async def _send(self) -> None:
        """Hand the outbox to nats-py (which writes what it holds once per loop turn)."""
        try:
            while self._outbox and self.nc is not None:
                batch, self._outbox, self._outbox_bytes = self._outbox, [], 0
                publish = self.nc.publish
                for i, (subj, data) in enumerate(batch):
                    try:
                        await publish(subj, data)
                    except Exception as exc:
                        self.lost += len(batch) - i
                        log.warning(
                            "bus: %d messages not handed to NATS: %s",
                            len(batch) - i,
                            exc or type(exc).__name__,
                        )
                        break
        finally:
            self._drain = None

    async def subscribe(self, sub: Subscription) -> None:
        nc = self._connected()
        key = (sub.group, sub.filter)
        interest = self._interests.get(key)
        if interest is None:
            interest = self._interests[key] = _Interest(self, sub.group)
            try:
                await self._open(nc, interest, sub.filter)
            except BaseException as exc:
                if self._interests.get(key) is interest:
                    del self._interests[key]
                await self._close_nats(interest)
                interest.ready.set_exception(
                    UnavailableError(f"cannot subscribe on NATS: {exc or type(exc).__name__}")
                )
                interest.ready.exception()  # retrieved here; waiters raise it again
                if isinstance(exc, Exception):
                    raise UnavailableError(
                        f"cannot subscribe on NATS: {exc or type(exc).__name__}"
                    ) from None
                raise
            interest.ready.set_result(None)
        elif not interest.ready.done():
            await asyncio.shield(interest.ready)
        if self._interests.get(key) is not interest:  # its last subscriber left meanwhile
            return await self.subscribe(sub)
        interest.subs = [*interest.subs, sub]
        if sub.group is None:
            self.router.add(sub)

    async def _open(self, nc: Client, interest: _Interest, flt: TopicFilter) -> None:
        """Subscribe on NATS for one filter, and wait until the server has it: from then on
        a message published on any node reaches the subscriber."""
        queue = ""
        if interest.group is not None:
            # On the connection with echo: the group's members here get their share of what is
            # published here too.
            queue, nc = queue_name(interest.group, flt), self._groups()
        for subj in filter_subjects(flt, self.prefix):
            interest.nats.append(await nc.subscribe(subj, queue=queue, cb=interest.receive))
        await self.sync(nc)

    async def _close_nats(self, interest: _Interest) -> None:
        for ns in interest.nats:
            with contextlib.suppress(Exception):  # closed or away: nothing to tell NATS
                await ns.unsubscribe()
        interest.nats = []

    async def unsubscribe(self, sub: Subscription) -> None:
        key = (sub.group, sub.filter)
        interest = self._interests.get(key)
        if interest is None or sub not in interest.subs:
            return
        interest.subs = [s for s in interest.subs if s is not sub]
        if sub.group is None:
            self.router.remove(sub)
        if not interest.subs:
            del self._interests[key]
            await self._close_nats(interest)

    def subjects(self) -> list[tuple[str, str]]:
        """The NATS subscriptions of messages this node holds: (subject, queue), for tests and
        for people."""
        return [(ns.subject, ns.queue) for i in self._interests.values() for ns in i.nats]

    async def last(self, domain: str, channel: str, subtopic: str) -> Message | None:
        self._connected()
        subj = _subject(self.prefix, domain, channel, subtopic)
        try:
            raw = await self._jsm().get_last_msg(self.options.stream, subj, direct=True)
        except nats.js.errors.NotFoundError:
            return None
        except Exception as exc:
            raise UnavailableError(
                f"JetStream stream {self.options.stream}: {exc or type(exc).__name__}"
            ) from None
        if not raw.data:
            return None
        try:
            return decode(raw.data)
        except msgspec.DecodeError:
            return None

    # changes
    async def announce(self, change: Change) -> None:
        """Send the change to the other nodes, then run this node's handlers (it skips its own
        announcement when NATS brings it back). While NATS is away nats-py keeps it and sends
        it on reconnecting; if it cannot, the other nodes catch up within their cache TTL."""
        nc = self.nc
        if nc is not None and not self._closed:
            try:
                await nc.publish(
                    self.changes_subject, msgspec.msgpack.encode(_Announcement(self.origin, change))
                )
            except Exception as exc:
                log.warning(
                    "bus: change %s not sent to the other nodes: %s (they catch up within"
                    " their cache TTL)",
                    change,
                    exc or type(exc).__name__,
                )
        await self._run_handlers(change)

    def on_change(self, handler: ChangeHandler) -> None:
        self._handlers.append(handler)

    async def _heard(self, msg: Msg) -> None:
        try:
            announced = _announcement.decode(msg.data)
        except msgspec.DecodeError:
            log.warning("bus: undecodable change on %s", msg.subject)
            return
        if announced.origin != self.origin:
            await self._run_handlers(announced.change)

    async def _run_handlers(self, change: Change) -> None:
        for handler in list(self._handlers):
            try:
                await handler(change)
            except Exception:
                log.exception("bus: a change handler failed on %s", change)

    # the stream
    def _jsm(self) -> Any:
        assert self.nc is not None
        return self.nc.jsm(timeout=REQUEST_TIMEOUT)

    def _stream_config(self) -> StreamConfig:
        o = self.options
        return StreamConfig(
            name=o.stream,
            description="Conduit: the latest message of each topic",
            # message subjects have three tokens or more; <prefix>.changes has two
            subjects=[f"{self.prefix}.*.*", f"{self.prefix}.*.*.>"],
            storage=StorageType.MEMORY if o.stream_storage == "memory" else StorageType.FILE,
            num_replicas=o.stream_replicas,
            max_age=o.stream_max_age or None,
            max_bytes=o.stream_max_bytes,
            max_msgs_per_subject=o.stream_max_msgs_per_subject,
            discard=DiscardPolicy.OLD,
            allow_direct=True,
        )

    async def _ensure_stream(self) -> None:
        """Make the stream, or bring its limits to the settings (the last node started with
        other limits wins). Several nodes starting at once may all try: one makes it."""
        jsm = self._jsm()
        config = self._stream_config()
        name = config.name
        try:
            try:
                info = await jsm.stream_info(name)
            except nats.js.errors.NotFoundError:
                try:
                    await jsm.add_stream(config)
                except nats.js.errors.BadRequestError as exc:
                    try:
                        info = await jsm.stream_info(name)  # another node made it meanwhile
                    except nats.js.errors.NotFoundError:
                        raise UnavailableError(  # its subjects overlap another stream's
                            f"JetStream stream {name} cannot be made: {exc.description}"
                        ) from None
                else:
                    self._stream_ok = True
                    return
            have = info.config
            if _value(have.storage) != _value(config.storage):
                raise UnavailableError(
                    f"JetStream stream {name} is kept in {_value(have.storage)} storage, not"
                    f" {_value(config.storage)} as nats_stream_storage says: delete the stream"
                    " or change the setting"
                )
            fields = (
                "subjects",
                "num_replicas",
                "max_age",
                "max_bytes",
                "max_msgs_per_subject",
                "discard",
                "allow_direct",
            )
            if any(_value(getattr(have, f)) != _value(getattr(config, f)) for f in fields):
                log.info("bus: JetStream stream %s: limits changed to the settings'", name)
                await jsm.update_stream(config)
        except UnavailableError:
            self._stream_ok = False
            raise
        except Exception as exc:
            self._stream_ok = False
            raise UnavailableError(
                f"JetStream stream {name}: {exc or type(exc).__name__}"
            ) from None
        self._stream_ok = True

    # the connection's events (nats-py callbacks)
    async def _error(self, exc: Exception) -> None:
        # Every failed attempt to reconnect reports here: say the first, then one in 30.
        self._errors += 1
        if self._errors == 1 or self._errors % 30 == 0:
            log.warning("bus: NATS: %s (%d errors)", exc or type(exc).__name__, self._errors)

    async def _disconnected(self) -> None:
        if self._closed or self.nc is None:
            return
        if self._away_since is None:
            self._away_since = time.monotonic()
            log.warning("bus: lost the connection to NATS; reconnecting")

    async def _reconnected(self) -> None:
        nc = self.nc
        url = nc.connected_url.netloc if nc is not None and nc.connected_url else "?"
        log.warning("bus: connected to NATS again (%s), away %s", url, self._away())
        self._away_since = None
        self._errors = 0
        # nats-py has subscribed the node's filters again; the stream may be new (a server
        # that lost its store, memory storage), and changes announced meanwhile were missed.
        task = asyncio.get_running_loop().create_task(self._resync())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _resync(self) -> None:
        try:
            await self._ensure_stream()
        except UnavailableError as exc:
            log.warning("bus: %s", exc)
        await self._run_handlers(Change("keys", ""))
        await self._run_handlers(Change("bus", ""))

    async def _connection_closed(self) -> None:
        if not self._closed and self.nc is not None:
            log.error("bus: the NATS connection is closed for good")
