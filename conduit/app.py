"""The composition root: reads the settings, builds the store, bus and gateway, starts the
management API and the enabled adapters, and drains them on SIGTERM or SIGINT."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import json
import logging
import os
import secrets
import signal
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from adapters.coap import CoAPAdapter
from adapters.coap.dtls import DTLSError
from adapters.http import HTTPAdapter
from adapters.http.server import Listener
from adapters.mqtt import MQTTAdapter
from adapters.ws import WSAdapter
from conduit.api import ManagementAPI, WeakAdminKey, admin_key
from conduit.settings import Settings
from conduit.tls import TLSFileError, server_context
from conduit.tls import reload as reload_tls
from core.auth import store_auth
from core.bus import Change, make_bus
from core.errors import UnavailableError
from core.gateway import BusUnavailableError, Gateway
from core.limits import Limits
from core.listeners import Endpoint, ListenError
from core.mail import Mailer
from core.noise import printable, redact
from core.sealing import SealError, master_key
from core.sessions import make_sessions
from core.signing import Keyring
from core.tokens import Tokens
from core.users import Users

if TYPE_CHECKING:
    from core.bus.nats import NatsOptions

log = logging.getLogger("conduit")


class Adapter(Protocol):
    protocol: str

    @property
    def ports(self) -> dict[str, int]: ...

    async def start(self) -> None: ...

    async def stop(self, timeout: float = 10.0) -> None: ...


# Seconds between two looks at the TLS files besides the change events (see watch_tls).
TLS_CHECK = 5

# Seconds between two writings of the CRL of Conduit's CA (it is valid 7 days).
CRL_EVERY = 24 * 3600
# Seconds before a periodic job that failed (a CRL, a key rotation) is tried again.
RETRY = 60

# Allocations between two young collections (CPython's default: 700).
GC_THRESHOLD = 20_000


def node_id(s: Settings) -> str:
    """This node's name among the nodes sharing a store: ``node_id``, else
    ``<hostname>-<mqtt_port>``. Derived so that it needs no writable disk (a PostgreSQL node may
    have none) and stays the same when the node restarts on its host (it gets its MQTT sessions
    back), while two live nodes cannot share it (one host has one listener per port). With
    ``mqtt_port`` 0 (a port the system picks, as tests do) nothing stable can be derived: a
    random suffix keeps nodes apart. Containers whose hostname changes when they are made again
    should set ``node_id``."""
    if s.node_id:
        return s.node_id
    if not s.mqtt_port:  # a port the system picks: no stable name to be had, a unique one
        return f"{socket.gethostname()}-{secrets.token_hex(4)}"
    return f"{socket.gethostname()}-{s.mqtt_port}"


def _signatures(paths: list[Path]) -> list[tuple[int, int, int] | None]:
    """Each file's inode, size and modification time (None when it is missing)."""
    found: list[tuple[int, int, int] | None] = []
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:
            found.append(None)
        else:
            found.append((st.st_ino, st.st_size, st.st_mtime_ns))
    return found


class StartupError(Exception):
    """Conduit cannot start as configured; the message says what to change."""


def nats_options(s: Settings) -> NatsOptions | None:
    """How the NATS bus reaches NATS (None for another bus: nats-py is not even imported)."""
    if s.bus != "nats":
        return None
    from core.bus.nats import NatsOptions

    return NatsOptions(
        url=s.nats_url,
        user=s.nats_user,
        password=s.nats_password,
        token=s.nats_token,
        creds=s.nats_creds,
        nkey_seed=s.nats_nkey_seed,
        tls_ca=s.nats_tls_ca,
        tls_cert=s.nats_tls_cert,
        tls_key=s.nats_tls_key,
        prefix=s.nats_prefix,
        stream=s.nats_stream,
        stream_storage=s.nats_stream_storage,
        stream_replicas=s.nats_stream_replicas,
        stream_max_age=s.nats_stream_max_age,
        stream_max_bytes=s.nats_stream_max_bytes,
        stream_max_msgs_per_subject=s.nats_stream_max_msgs_per_subject,
        connect_timeout=s.nats_connect_timeout,
        reconnect_wait=s.nats_reconnect_wait,
    )


class Conduit:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        s = settings
        store = s.make_store()
        try:
            sealing = master_key(s.data_dir, s.encryption_key)
        except SealError as exc:
            raise StartupError(str(exc)) from None
        except OSError as exc:
            raise StartupError(f"cannot read or make the encryption key: {exc}") from None
        tokens = Tokens(
            Keyring(store, sealing, algorithm=s.signing_algorithm, grace=s.signing_key_grace),
            s.token_issuer,
            broker_ttl=s.broker_token_ttl,
            broker_max_ttl=s.broker_token_max_ttl,
        )
        mtls = s.mtls_identity if s.tls_client_auth != "none" else None
        authenticator, authorizer = store_auth(store, s.cache_ttl, certificates=mtls, tokens=tokens)
        self.gateway = Gateway(
            store,
            make_bus(s.bus, keep_last_bytes=s.last_cache_bytes, nats=nats_options(s)),
            authenticator,
            authorizer,
            limits=Limits(
                max_payload=s.max_payload,
                queue_size=s.queue_size,
                max_dropped=s.max_dropped,
                rate=s.rate,
                burst=s.burst,
                max_subscriptions=s.max_subscriptions,
            ),
            cache_ttl=s.cache_ttl,
            sessions=make_sessions(s.sessions, store, node_id(s)),
            tokens=tokens,
            sealing=sealing,
            users=Users(
                store,
                tokens,
                access_ttl=s.access_token_ttl,
                refresh_ttl=s.refresh_token_ttl,
                recovery_ttl=s.recovery_token_ttl,
                recovery_url=s.recovery_url,
                attempts_per_minute=s.signin_attempts,
                mailer=Mailer(
                    s.smtp_host,
                    s.smtp_port,
                    sender=s.smtp_from,
                    username=s.smtp_username,
                    password=s.smtp_password,
                    starttls=s.smtp_starttls,
                )
                if s.smtp_host
                else None,
            ),
        )
        from core.idps import Exchange

        self.exchange = Exchange(
            store,
            tokens,
            s.idp_allow_http,
            per_address=s.exchange_rate_per_address,
            per_domain=s.exchange_rate_per_domain,
            sealing=sealing,
        )
        self.gateway.on_change(self.exchange.changed)  # it keeps providers a while
        self.signin = None
        if s.signin_providers and self.gateway.users is not None:
            from core.signin import Provider, SignIn

            providers = [Provider(**p.model_dump()) for p in s.signin_providers]
            self.signin = SignIn(providers, self.gateway.users, sealing)
        try:
            key = admin_key(s.data_dir, s.admin_key)
        except WeakAdminKey as exc:
            raise StartupError(str(exc)) from None
        try:
            tls = server_context(
                s.tls_cert, s.tls_key, s.tls_client_ca, s.tls_client_auth, s.tls_crl,
                session_tickets=s.tls_session_tickets,
            )  # fmt: skip
        except TLSFileError as exc:
            raise StartupError(str(exc)) from None
        self.tls = tls  # every TLS listener's context: reload_tls() loads the files into it
        self._tls_loaded = _signatures(self.tls_files())  # what the files were when loaded

        def plain(on: bool, name: str, port: int, websocket: bool = False) -> list[Endpoint]:
            return [Endpoint(name, s.host, port, None, websocket)] if on else []

        def secure(name: str, port: int, websocket: bool = False) -> list[Endpoint]:
            return [Endpoint(name, s.host, port, tls, websocket)] if tls is not None else []

        self.management = ManagementAPI(
            self.gateway,
            key,
            body_timeout=s.body_timeout,
            pki=s.pki,
            mtls_identity=s.mtls_identity,
            idp_allow_http=s.idp_allow_http,
            exchange=self.exchange,
        )
        self.api = Listener(
            self.gateway,
            "api",
            self.management.app,
            Endpoint("api", s.api_host, s.api_port),
            limits=s.listener_limits(s.api_max_connections),
        )
        http = plain(s.http_enabled, "http", s.http_port) + secure("https", s.https_port)
        ws = plain(s.ws_enabled, "ws", s.ws_port) + secure("wss", s.wss_port)
        coap = plain(s.coap_enabled, "coap", s.coap_port)
        coaps = Endpoint("coaps", s.coaps_host or s.host, s.coaps_port) if s.coaps_enabled else None
        mqtt = [
            *plain(s.mqtt_enabled, "mqtt", s.mqtt_port),
            *secure("mqtts", s.mqtts_port),
            *plain(s.mqtt_ws_enabled, "mqtt-ws", s.mqtt_ws_port, websocket=True),
            *secure("mqtt-wss", s.mqtt_wss_port, websocket=True),
        ]
        factories: list[tuple[bool, Callable[[], Adapter]]] = [
            (
                bool(http),
                lambda: HTTPAdapter(
                    self.gateway,
                    endpoints=http,
                    limits=s.listener_limits(s.http_max_connections),
                    signin=self.signin,
                    exchange=self.exchange,
                ),
            ),
            (
                bool(ws),
                lambda: WSAdapter(
                    self.gateway,
                    endpoints=ws,
                    dashboard=s.ws_dashboard,
                    limits=s.listener_limits(s.ws_max_connections),
                ),
            ),
            (
                bool(coap) or coaps is not None,
                lambda: CoAPAdapter(
                    self.gateway, endpoints=coap, dtls=coaps, max_uploads=s.coap_max_uploads
                ),
            ),
            (
                bool(mqtt),
                lambda: MQTTAdapter(
                    self.gateway,
                    endpoints=mqtt,
                    content_type=s.mqtt_content_type,
                    max_inflight=s.mqtt_max_inflight,
                    max_queued=s.mqtt_max_queued,
                    max_queued_bytes=s.mqtt_max_queued_bytes,
                    max_sessions=s.mqtt_max_sessions,
                    max_subscriptions=s.mqtt_max_subscriptions,
                    max_session_expiry=s.mqtt_max_session_expiry,
                    connect_timeout=s.mqtt_connect_timeout,
                    max_keep_alive=s.mqtt_max_keep_alive,
                ),
            ),
        ]
        try:
            self.adapters: list[Adapter] = [make() for enabled, make in factories if enabled]
        except DTLSError as exc:
            raise StartupError(str(exc)) from None
        self.exchange.listeners = lambda: self.endpoints  # the bound ports, once started
        self._started: list[Adapter] = []

    @property
    def endpoints(self) -> dict[str, int]:
        """Every listener's name and port (the bound one once started)."""
        ports: dict[str, int] = {}
        for a in [self.api, *self.adapters]:
            ports.update(a.ports)
        return ports

    def tls_files(self) -> list[Path]:
        """The TLS files in use (a change of one reloads them), as absolute resolved paths."""
        s = self.settings
        if self.tls is None:
            return []
        files = (s.tls_cert, s.tls_key, s.tls_client_ca, s.tls_crl)
        return [path.resolve() for path in files if path is not None]

    async def watch_tls(self) -> None:
        """Reload the TLS files when one of them changes (written, replaced or renamed over),
        as SIGHUP does. watchfiles reports changes once writes settle (debounce); every
        ``TLS_CHECK`` seconds the files' size and time are compared too, so a change made
        before the watch was set up, or one the platform did not report, is not missed."""
        paths = self.tls_files()
        if not paths:
            return
        from watchfiles import awatch

        directories = {path.parent for path in paths}
        log.info("tls: reloading when these change: %s", ", ".join(map(str, sorted(paths))))
        seen = self._tls_loaded  # a change made since the start counts
        async for _ in awatch(
            *directories, recursive=False, rust_timeout=TLS_CHECK * 1000, yield_on_timeout=True
        ):
            now = _signatures(paths)
            if now != seen:
                seen = now
                self.reload_tls()

    async def keep_crl(self) -> None:
        """With a CA in ``pki_dir``: its CRL made again now and every day, from the store's
        record, well before its nextUpdate (7 days) passes and TLS stacks refuse it."""
        if not (self.settings.pki / "ca.key").exists():
            return
        authority = self.management.authority
        imported = await authority.import_revoked_txt()
        if imported:
            log.info("pki: %d revocations imported from revoked.txt into the store", imported)
        while True:
            try:
                path = await authority.write_crl()
                log.info("pki: CRL written: %s", path)
            except Exception as exc:  # the store is down, the disk full: try again soon
                log.error("pki: CRL not written: %s", exc)
                await asyncio.sleep(RETRY)
                continue
            await asyncio.sleep(CRL_EVERY)

    async def rotate_keys(self) -> None:
        """A new signing key once the one that signs is ``signing_key_rotation`` seconds old
        (announced: every node reads the keys again)."""
        every = self.settings.signing_key_rotation
        tokens = self.gateway.tokens
        if not every or tokens is None:
            return
        while True:
            age = time.time() - tokens.keyring.signing.created
            await asyncio.sleep(max(1.0, every - age))
            try:
                await tokens.keyring.reload()
                if time.time() - tokens.keyring.signing.created >= every:
                    await tokens.keyring.rotate()
                    await self.gateway.bus.announce(Change("keys", ""))
            except Exception as exc:  # the store is down: try again soon
                log.error("signing keys: not rotated: %s", exc)
                await asyncio.sleep(RETRY)

    def reload_tls(self) -> bool:
        """Load the TLS files again (SIGHUP): new handshakes use them, open connections keep
        what they have. A file that cannot serve is logged and the files in use stay."""
        s = self.settings
        if self.tls is None or s.tls_cert is None or s.tls_key is None:
            log.info("tls: nothing to reload (no tls_cert)")
            return False
        try:
            reload_tls(
                self.tls, s.tls_cert, s.tls_key, s.tls_client_ca, s.tls_client_auth, s.tls_crl
            )
        except TLSFileError as exc:
            log.error("tls: not reloaded, the files in use stay: %s", exc)
            return False
        log.info("tls: certificate, key, client CA and CRL reloaded")
        return True

    async def start(self) -> None:
        try:
            await self.gateway.start()
        except SealError as exc:
            raise StartupError(
                f"the signing keys of Conduit's tokens cannot be opened: {exc}"
            ) from None
        except BusUnavailableError as exc:
            raise StartupError(f"{self.settings.bus} bus: {exc.detail}") from None
        except UnavailableError as exc:  # PostgreSQL unreachable, or refusing us
            raise StartupError(f"the store cannot be opened: {exc}") from None
        try:
            for adapter in [self.api, *self.adapters]:
                try:
                    await adapter.start()
                except DTLSError as exc:
                    raise StartupError(f"coaps: {exc}") from None
                except ListenError as exc:
                    endpoint = exc.endpoint
                    if exc.errno == errno.EADDRINUSE:
                        raise StartupError(
                            f"{endpoint.name} port {endpoint.port} is already in use; stop what"
                            f" holds it or choose another port ({endpoint.setting})"
                        ) from None
                    raise StartupError(
                        f"cannot listen for {endpoint.name} on port {endpoint.port}: {exc.cause}"
                    ) from None
                self._started.append(adapter)
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        """Stop accepting, finish in-flight work, close sessions, close the backends."""
        timeout = self.settings.shutdown_timeout
        # Together: each gives its requests in flight the same timeout, at the same time.
        await asyncio.gather(*(a.stop(timeout) for a in self._started), return_exceptions=True)
        self._started.clear()
        await self.gateway.close()


def tune_gc() -> None:
    """Once started: what exists now (modules, settings, the gateway) leaves the cycle
    collector's view, and young collections run less often. What a connection or request holds
    is freed by reference counting when it ends (tests/mqtt/test_mqtt_churn.py), so the
    collector only finds rare cycles; with the defaults it ran every 700 allocations and cost
    about 15 µs of an MQTT connect (cProfile; docs/performance.md)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_THRESHOLD, 20, 20)


async def serve(settings: Settings) -> None:
    app = Conduit(settings)
    await app.start()
    tune_gc()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, app.reload_tls)
    watcher = asyncio.create_task(app.watch_tls(), name="conduit-tls-watch")
    crl = asyncio.create_task(app.keep_crl(), name="conduit-crl")
    rotation = asyncio.create_task(app.rotate_keys(), name="conduit-key-rotation")
    ready = " ".join(f"{name}={port}" for name, port in app.endpoints.items())
    log.info("conduit ready: %s", ready)
    print(f"conduit ready: {ready}", flush=True)
    await stop.wait()
    log.info("shutting down")
    watcher.cancel()
    crl.cancel()
    rotation.cancel()
    await app.stop()
    log.info("stopped")


class _Hygiene(logging.Filter):
    """Every record written: credentials redacted wherever a library put them, control
    characters escaped so that one record is one line (the traceback aside), whatever a client
    sent. Adapters already write client values this way; this is the net under every library."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = printable(redact(message), limit=_MESSAGE_LIMIT)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
        return True


_MESSAGE_LIMIT = 8192  # characters of one log message


class _JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            out["exception"] = record.exc_text or self.formatException(record.exc_info)
        return json.dumps(out)


# Libraries whose debug output is of no use to an operator of Conduit and much of it: aiosqlite
# logs every statement twice, with its parameters.
_QUIET = ("aiosqlite",)


def setup_logging(settings: Settings) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_Hygiene())
    if settings.log_format == "json":
        handler.setFormatter(_JSONFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level.upper())
    for name in _QUIET:
        logging.getLogger(name).setLevel(max(logging.INFO, root.level))


def run(settings: Settings) -> None:
    """Run until SIGTERM or SIGINT, on the configured event loop."""
    setup_logging(settings)
    use_uvloop = settings.loop == "uvloop"
    # aiocoap's server stopped answering under uvloop after load generators quit with requests
    # in flight (shared/bench/README.md): with CoAP on, "auto" stays on asyncio.
    if settings.loop == "auto" and not (settings.coap_enabled or settings.coaps_enabled):
        with contextlib.suppress(ImportError):
            import uvloop

            use_uvloop = True
    runner: Callable[..., None]
    if use_uvloop:
        import uvloop

        runner = uvloop.run
    else:
        runner = asyncio.run
    runner(serve(settings))
