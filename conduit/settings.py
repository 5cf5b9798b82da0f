"""The typed settings of Conduit: one flat object, one name per setting everywhere.

A setting ``http_port`` is ``http_port`` in the TOML file, ``CONDUIT_HTTP_PORT`` in the
environment and ``--http-port`` on the command line; later sources win:
defaults < TOML file < environment < command line. ``docs/configuration.md`` lists them all.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from core.limits import ListenerLimits
from core.store import Store, make_store

ADMIN_KEY_FILE = "admin.key"  # in the data directory, mode 0600


class SignInProvider(BaseModel):
    """A provider users sign in with (OpenID Connect): ``[[signin_providers]]`` in the TOML
    file, or a JSON list in ``CONDUIT_SIGNIN_PROVIDERS``."""

    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)

    name: str = Field(
        pattern=r"^[a-z0-9][a-z0-9-]{0,31}$", description="In the URLs: /oauth/<name>/"
    )
    issuer: str | None = Field(
        None, description="Issuer URL (discovery); default for name google: accounts.google.com"
    )
    client_id: str
    client_secret: str
    redirect_url: str = Field(description="https://<gateway>/oauth/<name>/callback, registered")
    success_url: str = Field(description="Where the browser goes once signed in")
    failure_url: str = Field(description="Where the browser goes on failure, with ?error=")
    scopes: str = "openid email profile"

    @model_validator(mode="after")
    def _issuer(self) -> SignInProvider:
        if self.issuer is None:
            if self.name != "google":
                raise ValueError(f"sign-in provider {self.name!r} needs an issuer")
            self.issuer = "https://accounts.google.com"
        return self


class Settings(BaseSettings):
    # A refusal names the setting but never echoes what was given: it may be a password.
    model_config = SettingsConfigDict(
        env_prefix="CONDUIT_", extra="forbid", hide_input_in_errors=True
    )

    # state and messages
    data_dir: Path = Field(Path("data"), description="Directory for the SQLite file and admin key")
    store: Literal["sqlite", "postgres"] = Field(
        "sqlite", description="State backend: sqlite (one file) or postgres (shared by nodes)"
    )
    sqlite_path: Path | None = Field(None, description="SQLite file; default <data_dir>/conduit.db")
    postgres_dsn: SecretStr | None = Field(
        None,
        description="PostgreSQL connection URL for store = postgres"
        " (postgresql://user:password@host:5432/database?sslmode=require); never logged with"
        " its password",
    )
    postgres_schema: str = Field(
        "public",
        pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,62}$",
        description="PostgreSQL schema Conduit's tables live in, made if missing",
    )
    postgres_pool_min: int = Field(
        1, ge=0, description="PostgreSQL connections a node keeps open, at least"
    )
    postgres_pool_max: int = Field(
        10, ge=1, description="PostgreSQL connections a node opens, at most"
    )
    postgres_timeout: float = Field(
        5.0,
        gt=0,
        description="Seconds to connect to PostgreSQL, wait for a pooled connection or for an"
        " answer; past it the store is unavailable",
    )
    bus: Literal["local", "nats"] = Field(
        "local",
        description="Message bus: local (in-process) or nats (NATS JetStream, several nodes)",
    )
    sessions: Literal["store", "memory"] = Field(
        "store",
        description="Where MQTT persistent sessions are kept: store (they survive a restart)"
        " or memory",
    )
    node_id: str = Field(
        "",
        pattern=r"^[A-Za-z0-9._:-]{0,64}$",
        description="This node's name among the nodes sharing a store, stable across its"
        " restarts; empty = <hostname>-<mqtt_port> (with mqtt_port 0, a random suffix instead,"
        " new at each start)",
    )

    # the NATS bus (bus = "nats")
    nats_url: str = Field(
        "nats://127.0.0.1:4222",
        description="NATS server URLs, comma-separated (nats:// or tls://; user:password@ allowed)",
    )
    nats_user: str | None = Field(None, description="NATS user name (with nats_password)")
    nats_password: str | None = Field(None, description="NATS password (better in the environment)")
    nats_token: str | None = Field(None, description="NATS authentication token")
    nats_creds: Path | None = Field(
        None, description="NATS credentials file (.creds: a user JWT and its NKey seed)"
    )
    nats_nkey_seed: Path | None = Field(None, description="File holding a NATS user NKey seed")
    nats_tls_ca: Path | None = Field(
        None, description="PEM file of the CAs the NATS server's certificate is checked against"
    )
    nats_tls_cert: Path | None = Field(
        None, description="PEM file: Conduit's client certificate for NATS (with nats_tls_key)"
    )
    nats_tls_key: Path | None = Field(None, description="PEM file: the key of nats_tls_cert")
    nats_prefix: str = Field(
        "m",
        pattern=r"^[A-Za-z0-9_-]{1,32}$",
        description="First token of every NATS subject of this deployment",
    )
    nats_stream: str = Field(
        "conduit",
        pattern=r"^[A-Za-z0-9_-]{1,64}$",
        description="JetStream stream keeping the latest message of each topic (made at start)",
    )
    nats_stream_storage: Literal["file", "memory"] = Field(
        "file", description="Where the stream is kept: file (survives a NATS restart) or memory"
    )
    nats_stream_replicas: int = Field(
        1, ge=1, le=5, description="Copies of the stream in a NATS cluster"
    )
    nats_stream_max_age: float = Field(
        0.0, ge=0, description="Seconds a message is kept in the stream; 0 = no limit"
    )
    nats_stream_max_bytes: int = Field(
        1073741824, gt=0, description="Bytes the stream keeps; the oldest go first"
    )
    nats_stream_max_msgs_per_subject: int = Field(
        1, gt=0, description="Messages the stream keeps per topic (1: the latest)"
    )
    nats_connect_timeout: float = Field(
        10.0, gt=0, description="Seconds the start waits for NATS before it gives up"
    )
    nats_reconnect_wait: float = Field(
        1.0, gt=0, description="Seconds between two attempts to reach a NATS server again"
    )

    # listeners: plain
    host: str = Field("0.0.0.0", description="Address the protocol listeners bind to")
    http_enabled: bool = Field(True, description="Serve plain HTTP")
    http_port: int = Field(8008, ge=0, le=65535, description="HTTP port")
    ws_enabled: bool = Field(True, description="Serve plain WebSocket")
    ws_port: int = Field(8186, ge=0, le=65535, description="WebSocket port")
    ws_dashboard: bool = Field(True, description="Serve the live dashboard page on GET / (WS port)")
    coap_enabled: bool = Field(True, description="Serve CoAP (UDP)")
    coap_port: int = Field(5683, ge=0, le=65535, description="CoAP UDP port")
    coaps_enabled: bool = Field(
        False,
        description="Serve CoAP over DTLS (UDP; pre-shared keys only; experimental in aiocoap):"
        " needs the DTLSSocket package and one address (coaps_host, or host when it is one)",
    )
    coaps_host: str | None = Field(
        None,
        description="Address CoAP over DTLS binds to; default: host. Not a wildcard: aiocoap's"
        " DTLS server binds one address",
    )
    coaps_port: int = Field(5684, ge=0, le=65535, description="CoAP over DTLS UDP port")
    coap_max_uploads: int = Field(
        16, ge=0, description="CoAP block-wise uploads assembled at once; 0 = any"
    )
    mqtt_enabled: bool = Field(True, description="Serve plain MQTT (TCP)")
    mqtt_port: int = Field(1883, ge=0, le=65535, description="MQTT port")
    mqtt_ws_enabled: bool = Field(True, description="Serve plain MQTT over WebSocket (path /mqtt)")
    mqtt_ws_port: int = Field(8083, ge=0, le=65535, description="MQTT over WebSocket port")

    # listeners: TLS, beside the plain ones, when a certificate and its key are set
    tls_cert: Path | None = Field(
        None,
        description="PEM file: the server certificate, then its chain; with tls_key it turns on"
        " HTTPS, WSS, MQTTS and MQTT over WSS",
    )
    tls_key: Path | None = Field(None, description="PEM file: the private key of tls_cert")
    tls_client_ca: Path | None = Field(
        None, description="PEM file: the CA(s) whose client certificates are accepted (mutual TLS)"
    )
    tls_client_auth: Literal["none", "optional", "required"] = Field(
        "none",
        description="Client certificates on the TLS listeners: none, optional (a certificate"
        " authenticates when given) or required",
    )
    tls_crl: Path | None = Field(
        None,
        description="PEM file: the CRL of tls_client_ca; revoked client certificates are refused"
        " in the handshake",
    )
    tls_session_tickets: int = Field(
        1,
        ge=0,
        le=10,
        description="TLS 1.3 session tickets sent after each full handshake, for the client to"
        " resume with (0: no resumption; none when tls_crl is set, since a resumed session is not"
        " checked against the CRL)",
    )
    mtls_identity: Literal["client_id", "secret"] = Field(
        "client_id",
        description="What a client certificate's CN is: the client's id, or its secret"
        " (Magistrala's convention); matched exactly",
    )
    pki_dir: Path | None = Field(
        None,
        description="Directory of Conduit's CA (ca.pem, ca.key, crl.pem) for `conduit certs` and"
        " the certificate routes of the management API; default <data_dir>/pki",
    )
    https_port: int = Field(8443, ge=0, le=65535, description="HTTPS port")
    wss_port: int = Field(8187, ge=0, le=65535, description="WebSocket over TLS port")
    mqtts_port: int = Field(8883, ge=0, le=65535, description="MQTT over TLS port")
    mqtt_wss_port: int = Field(
        8084, ge=0, le=65535, description="MQTT over WebSocket over TLS port"
    )

    # MQTT
    mqtt_content_type: str = Field(
        "application/octet-stream",
        description="Content type of MQTT publishes without an MQTT 5 Content Type property"
        " (application/senml+json makes them validated as SenML)",
    )
    mqtt_max_inflight: int = Field(
        100, gt=0, lt=65535, description="Unacknowledged QoS 1/2 messages per direction"
    )
    mqtt_max_queued: int = Field(
        1000, ge=0, description="QoS 1/2 messages kept per session while offline or slow"
    )
    mqtt_max_queued_bytes: int = Field(
        16777216,
        ge=0,
        description="Payload bytes of the QoS 1/2 messages kept per session while offline or slow",
    )
    mqtt_max_sessions: int = Field(
        1000, ge=0, description="MQTT sessions one client may hold, connected or not; 0 = any"
    )
    mqtt_max_subscriptions: int = Field(
        1000, ge=0, description="Subscriptions of one MQTT session; 0 = any"
    )
    mqtt_max_session_expiry: int = Field(
        604800, ge=0, description="Seconds a persistent session outlives its connection, at most"
    )
    mqtt_connect_timeout: float = Field(
        10.0, gt=0, description="Seconds a new connection has to send CONNECT"
    )
    mqtt_max_keep_alive: int = Field(
        0, ge=0, le=65535, description="Largest keep-alive granted, seconds; 0 = any"
    )
    # management API
    api_host: str = Field("127.0.0.1", description="Address of the management API")
    api_port: int = Field(9009, ge=0, le=65535, description="Management API port")
    admin_key: str | None = Field(
        None, description="Management API key; default: generated into <data_dir>/admin.key"
    )
    encryption_key: str | None = Field(
        None,
        description="Master key (64 hex digits) sealing what Conduit keeps encrypted at rest"
        " (token signing keys, DTLS keys, identity providers' JWT secrets); default: generated"
        " into <data_dir>/encryption.key",
    )

    # tokens
    token_issuer: str = Field(
        "conduit",
        description="The iss of Conduit's tokens (for example the public URL of the gateway)",
    )
    signing_algorithm: Literal["EdDSA", "ES256"] = Field(
        "EdDSA", description="Algorithm of new signing keys: EdDSA (Ed25519) or ES256 (P-256)"
    )
    signing_key_rotation: float = Field(
        30 * 86400,
        ge=0,
        description="Seconds a signing key signs before a new one replaces it; 0 = by hand only"
        " (conduit keys rotate)",
    )
    signing_key_grace: float = Field(
        2 * 86400,
        gt=0,
        description="Seconds a replaced signing key still verifies; at least the longest token"
        " lifetime",
    )
    broker_token_ttl: int = Field(
        900, gt=0, description="Seconds a broker token is good for when no ttl is asked"
    )
    broker_token_max_ttl: int = Field(
        86400, gt=0, description="Seconds a broker token may be asked to be good for, at most"
    )
    access_token_ttl: int = Field(
        900, gt=0, description="Seconds a user's access token is good for"
    )
    refresh_token_ttl: int = Field(
        86400, gt=0, description="Seconds a user's refresh token is good for (one use)"
    )
    signin_attempts: int = Field(
        10,
        ge=0,
        description="Sign-in attempts a minute per email and per address (then 429); 0 = any",
    )
    recovery_token_ttl: int = Field(
        900, gt=0, description="Seconds a mailed password recovery key is good for (one use)"
    )
    recovery_url: str | None = Field(
        None,
        description="Link mailed for password recovery, {key} replaced by the recovery key"
        " (https://app.example.com/reset?key={key}); default: the key alone",
    )

    idp_allow_http: bool = Field(
        False,
        description="Let identity providers' key and discovery URLs be plain http beyond"
        " loopback addresses (never in production)",
    )
    exchange_rate_per_address: int = Field(
        60, ge=0, description="Token exchanges and refreshes a minute per client address; 0 = any"
    )
    exchange_rate_per_domain: int = Field(
        6000, ge=0, description="Token exchanges a minute per domain; 0 = any"
    )
    signin_providers: list[SignInProvider] = Field(
        [], description="Providers users sign in with (OpenID Connect; see docs/users.md)"
    )

    # mail (password recovery)
    smtp_host: str | None = Field(
        None, description="SMTP server for password recovery mail; none: recovery is off"
    )
    smtp_port: int = Field(587, ge=1, le=65535, description="SMTP server port")
    smtp_username: str | None = Field(None, description="SMTP user name, if it asks for one")
    smtp_password: str | None = Field(None, description="SMTP password (better in the environment)")
    smtp_starttls: bool = Field(True, description="Upgrade the SMTP connection with STARTTLS")
    smtp_from: str = Field("Conduit <conduit@localhost>", description="Sender of Conduit's mail")

    # limits
    max_payload: int = Field(262144, gt=0, description="Largest message payload, bytes")
    queue_size: int = Field(1024, gt=0, description="Messages a subscriber may have waiting")
    max_dropped: int = Field(
        1000, gt=0, description="Consecutive drops before a slow subscriber is disconnected"
    )
    rate: float = Field(0.0, ge=0, description="Publishes per second per client; 0 = unlimited")
    burst: int = Field(100, gt=0, description="Publishes a client may send at once above rate")
    max_subscriptions: int = Field(
        10000, ge=0, description="Open subscriptions of one client, all protocols; 0 = any"
    )
    last_cache_bytes: int = Field(
        67108864,
        gt=0,
        description="Payload bytes of the latest messages kept for CoAP GET (10,000 topics at"
        " most)",
    )
    cache_ttl: float = Field(
        30.0, gt=0, description="Seconds credentials and rights are cached; revocation bound"
    )
    header_timeout: float = Field(
        10.0,
        gt=0,
        description="Seconds an HTTP, WebSocket or API connection has to send a complete"
        " request head (from connecting, or from the first byte of its next request)",
    )
    body_timeout: float = Field(
        30.0, gt=0, description="Seconds an HTTP or API request body has to arrive"
    )
    idle_timeout: float = Field(
        60.0,
        gt=0,
        description="Seconds a kept-alive HTTP or API connection may wait for its next request",
    )
    http_max_connections: int = Field(
        10000, gt=0, description="Open connections the HTTP listener accepts; more get 503"
    )
    ws_max_connections: int = Field(
        10000, gt=0, description="Open connections the WebSocket listener accepts; more get 503"
    )
    api_max_connections: int = Field(
        256, gt=0, description="Open connections the management API accepts; more get 503"
    )

    # process
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="Log level")
    log_format: Literal["text", "json"] = Field("text", description="Log line format")
    loop: Literal["auto", "asyncio", "uvloop"] = Field(
        "auto",
        description="Event loop: auto uses uvloop when installed, unless CoAP is enabled",
    )
    shutdown_timeout: float = Field(
        10.0, ge=0, description="Seconds in-flight requests get to finish on SIGTERM/SIGINT"
    )

    @model_validator(mode="after")
    def _postgres(self) -> Settings:
        if self.store == "postgres" and not self.postgres_dsn:
            raise ValueError("store = postgres needs postgres_dsn (CONDUIT_POSTGRES_DSN)")
        if self.postgres_pool_min > self.postgres_pool_max:
            raise ValueError("postgres_pool_min is larger than postgres_pool_max")
        return self

    @model_validator(mode="after")
    def _nats_pairs(self) -> Settings:
        if (self.nats_tls_cert is None) != (self.nats_tls_key is None):
            raise ValueError("nats_tls_cert and nats_tls_key go together")
        if self.nats_password is not None and self.nats_user is None:
            raise ValueError("nats_password needs nats_user")
        if self.nats_creds is not None and self.nats_nkey_seed is not None:
            raise ValueError("nats_creds and nats_nkey_seed: set one (a .creds file holds a seed)")
        return self

    @model_validator(mode="after")
    def _lifetimes(self) -> Settings:
        if self.broker_token_ttl > self.broker_token_max_ttl:
            raise ValueError("broker_token_ttl is longer than broker_token_max_ttl")
        longest = max(self.broker_token_max_ttl, self.access_token_ttl, self.refresh_token_ttl)
        if longest > self.signing_key_grace:
            raise ValueError(
                "signing_key_grace is shorter than the longest token lifetime"
                " (broker_token_max_ttl, access_token_ttl, refresh_token_ttl): tokens signed"
                " before a rotation would stop verifying before they expire"
            )
        return self

    def listener_limits(self, max_connections: int) -> ListenerLimits:
        """The timeouts of every HTTP-like listener, with its own connection cap."""
        return ListenerLimits(
            header_timeout=self.header_timeout,
            body_timeout=self.body_timeout,
            idle_timeout=self.idle_timeout,
            max_connections=max_connections,
        )

    @property
    def database(self) -> Path:
        return self.sqlite_path or self.data_dir / "conduit.db"

    def make_store(self) -> Store:
        """The store these settings name (not opened yet)."""
        return make_store(
            self.store,
            sqlite_path=self.database,
            postgres_dsn=self.postgres_dsn.get_secret_value() if self.postgres_dsn else None,
            postgres_schema=self.postgres_schema,
            postgres_pool_min=self.postgres_pool_min,
            postgres_pool_max=self.postgres_pool_max,
            postgres_timeout=self.postgres_timeout,
        )

    @property
    def pki(self) -> Path:
        return self.pki_dir or self.data_dir / "pki"

    @classmethod
    def load(cls, config: Path | None = None, **overrides: Any) -> Settings:
        """Settings from defaults, the TOML file, the environment and explicit overrides."""
        overrides = {k: v for k, v in overrides.items() if v is not None}
        if config is None:
            return cls(**overrides)
        if not config.is_file():
            raise FileNotFoundError(f"configuration file {config} not found")

        class FromFile(cls):  # type: ignore[valid-type, misc]
            @classmethod
            def settings_customise_sources(
                cls,
                settings_cls: type[BaseSettings],
                init_settings: PydanticBaseSettingsSource,
                env_settings: PydanticBaseSettingsSource,
                dotenv_settings: PydanticBaseSettingsSource,
                file_secret_settings: PydanticBaseSettingsSource,
            ) -> tuple[PydanticBaseSettingsSource, ...]:
                return (
                    init_settings,
                    env_settings,
                    TomlConfigSettingsSource(settings_cls, toml_file=config),
                )

        return cls.model_validate(FromFile(**overrides).model_dump())
