"""State: domains, clients, channels, connections and DTLS keys, behind one small interface.

``Store`` is what the rest of the core sees; ``core.store.sqlite`` (the embedded default) and
``core.store.postgres`` implement it. Secrets never reach the store: only their hash does; DTLS
keys, which must be read back, reach it sealed (:mod:`core.sealing`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from core.sessions import SessionStore


class StoreError(Exception):
    """A provisioning request that the state refuses."""


class NotFound(StoreError):
    pass


class Conflict(StoreError):
    pass


@dataclass(frozen=True, slots=True)
class Domain:
    name: str  # also its route in topics: m/<name>/c/...
    created: float
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Client:
    id: str
    domain: str
    name: str
    enabled: bool
    created: float
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Channel:
    id: str
    domain: str
    name: str  # its route in topics: m/<domain>/c/<name>
    created: float
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class IssuedCertificate:
    """A certificate Conduit's CA issued (see :mod:`certs`): the record behind the CRL, the
    OCSP answers and the ending of connections made with a revoked certificate."""

    serial: str  # lowercase hex, without leading zeros: as `conduit certs show` prints it
    kind: str  # "client" or "server"
    common_name: str
    domain: str | None  # a client certificate's client; None for a server certificate
    client_id: str | None
    not_before: float
    not_after: float
    issued: float
    revoked: float | None  # when it was revoked; None while it is good
    pem: str


@dataclass(frozen=True, slots=True)
class User:
    """A person who signs in (see :mod:`core.users`)."""

    id: str
    email: str
    name: str
    enabled: bool
    platform_admin: bool
    created: float
    last_login: float | None


@dataclass(frozen=True, slots=True)
class Member:
    """A user's role in a domain: ``admin`` or ``member``."""

    user_id: str
    domain: str
    role: str


@dataclass(frozen=True, slots=True)
class SigningKeyRecord:
    """A key Conduit signs its tokens with (see :mod:`core.signing`), its private part sealed
    under the master key (:mod:`core.sealing`)."""

    kid: str
    algorithm: str  # "EdDSA" or "ES256"
    created: float
    retires: float | None  # None while it signs; else when it stops verifying too
    sealed: bytes


@dataclass(frozen=True, slots=True)
class Connection:
    """A client's right on a channel: publish, subscribe, or both."""

    domain: str
    client_id: str
    channel: str  # channel name
    publish: bool
    subscribe: bool


@dataclass(frozen=True, slots=True)
class DTLSKey:
    """A client's pre-shared key for CoAP over DTLS, as the store keeps it: sealed
    (:mod:`core.sealing`), beside what the DTLS listener needs of its client."""

    client_id: str
    domain: str
    enabled: bool  # the client's
    sealed: bytes
    created: float


class Store(Protocol):
    """The state backend. All methods may raise ``core.errors.UnavailableError``."""

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def ping(self) -> None:
        """Raise if the backend cannot answer."""

    # domains
    async def create_domain(self, name: str, metadata: dict[str, str]) -> Domain: ...

    async def get_domain(self, name: str) -> Domain: ...

    async def list_domains(self) -> list[Domain]: ...

    async def delete_domain(self, name: str) -> None: ...

    # clients
    async def create_client(
        self, domain: str, client_id: str, name: str, secret_hash: str, metadata: dict[str, str]
    ) -> Client: ...

    async def get_client(self, domain: str, ref: str) -> Client:
        """A client by id, or by name when no id matches."""

    async def list_clients(self, domain: str) -> list[Client]: ...

    async def set_client_enabled(self, domain: str, client_id: str, enabled: bool) -> Client: ...

    async def set_client_secret(self, domain: str, client_id: str, secret_hash: str) -> Client: ...

    async def delete_client(self, domain: str, client_id: str) -> None: ...

    async def client_by_secret(self, secret_hash: str) -> Client | None: ...

    async def client_by_id(self, client_id: str) -> Client | None:
        """A client by its id, whatever its domain (ids are unique across domains)."""

    # channels
    async def create_channel(
        self, domain: str, channel_id: str, name: str, metadata: dict[str, str]
    ) -> Channel: ...

    async def get_channel(self, domain: str, ref: str) -> Channel:
        """A channel by name, or by id when no name matches."""

    async def list_channels(self, domain: str) -> list[Channel]: ...

    async def delete_channel(self, domain: str, name: str) -> None: ...

    # connections
    async def connect(
        self, domain: str, client_id: str, channel: str, publish: bool, subscribe: bool
    ) -> Connection: ...

    async def disconnect(self, domain: str, client_id: str, channel: str) -> None: ...

    async def list_connections(
        self, domain: str, client_id: str | None = None, channel: str | None = None
    ) -> list[Connection]: ...

    async def permissions(self, client_id: str, domain: str, channel: str) -> Connection | None:
        """The connection of an enabled client to a channel, or None."""

    # DTLS pre-shared keys (CoAP over DTLS), sealed; one per client, gone with it
    async def put_dtls_key(self, domain: str, ref: str, sealed: bytes) -> Client:
        """Give a client (by id or name) its sealed DTLS key, replacing any it had."""

    async def delete_dtls_key(self, domain: str, ref: str) -> Client:
        """Remove a client's DTLS key (NotFound when it has none)."""

    async def dtls_keys(self) -> list[DTLSKey]:
        """Every client's DTLS key, enabled or not."""

    # retained messages (MQTT): the bus encoding of the last retained message of each topic
    async def put_retained(self, domain: str, channel: str, subtopic: str, data: bytes) -> None:
        """Keep ``data`` as the topic's retained message; empty ``data`` removes it."""

    async def retained(self, domain: str, channel: str) -> list[bytes]:
        """Every retained message of a channel."""

    # certificates issued by Conduit's CA
    async def add_certificate(self, cert: IssuedCertificate) -> None: ...

    async def get_certificate(self, serial: str) -> IssuedCertificate: ...

    async def list_certificates(
        self, domain: str | None = None, client_id: str | None = None
    ) -> list[IssuedCertificate]:
        """Every issued certificate, or those of a domain or client, oldest first."""

    async def revoke_certificates(self, serials: list[str], when: float) -> list[str]:
        """Mark certificates revoked at ``when``; returns the serials that were good until now
        (revoking twice keeps the first time)."""

    async def revoked_certificates(self, serials: Iterable[str] | None = None) -> dict[str, float]:
        """Serial -> revocation time of the revoked certificates (of ``serials``, or all)."""

    # users, their roles, and the families of their refresh tokens
    async def create_user(self, user: User, password_hash: str | None) -> User: ...

    async def get_user(self, ref: str) -> User:
        """A user by id, or by email (any case)."""

    async def list_users(self) -> list[User]: ...

    async def user_password(self, email: str) -> tuple[User, str | None] | None:
        """A user by email with its password hash, or None."""

    async def set_user_enabled(self, ref: str, enabled: bool) -> User: ...

    async def set_user_password(self, ref: str, password_hash: str | None) -> User: ...

    async def set_last_login(self, user_id: str, when: float) -> None: ...

    async def delete_user(self, ref: str) -> None: ...

    async def set_member(self, domain: str, user_ref: str, role: str) -> Member: ...

    async def remove_member(self, domain: str, user_ref: str) -> None: ...

    async def list_members(self, domain: str) -> list[Member]: ...

    async def roles(self, user_id: str) -> dict[str, str]:
        """Domain -> role of a user."""

    async def add_token_family(self, family: str, user_id: str, when: float) -> None: ...

    async def revoke_token_family(self, family: str, when: float) -> bool:
        """True when the family was live until now."""

    async def revoke_user_token_families(self, user_id: str, when: float) -> None:
        """End every sign-in of a user."""

    async def token_family_live(self, family: str) -> bool:
        """Whether the family exists, is not revoked and its user is enabled."""

    async def add_refresh_token(self, jti: str, family: str, expires: float) -> None: ...

    async def use_refresh_token(self, jti: str, when: float) -> str:
        """Mark a refresh token used: ``fresh`` (it was not), ``used`` (it was: a replay), or
        ``unknown``."""

    # external identity providers of a domain (core.idps): their registration as given
    async def put_idp(
        self, domain: str, name: str, type_: str, config: dict[str, Any], create: bool
    ) -> None:
        """Add a provider (``create``; Conflict if it exists) or replace its registration."""

    async def get_idp(self, domain: str, name: str) -> tuple[str, dict[str, Any]]:
        """A provider's type and registration (NotFound)."""

    async def list_idps(self, domain: str) -> list[tuple[str, str, dict[str, Any]]]:
        """Every provider of a domain: name, type, registration."""

    async def delete_idp(self, domain: str, name: str) -> None: ...

    # revoked token subjects: their tokens issued before the revocation stop working
    async def revoke_subject(self, domain: str, client_id: str, when: float) -> None: ...

    async def subject_revocations(
        self, subjects: Iterable[tuple[str, str]]
    ) -> dict[tuple[str, str], float]:
        """(domain, client id) -> when it was revoked, of the given subjects that were."""

    # the keys Conduit's tokens are signed with
    async def add_signing_key(self, key: SigningKeyRecord) -> None: ...

    async def signing_keys(self) -> list[SigningKeyRecord]:
        """Every key, oldest first."""

    async def retire_signing_keys(self, before: float, retires: float) -> None:
        """Keys made before ``before`` that still sign stop signing, and verify until
        ``retires``."""

    async def delete_signing_keys(self, retired_before: float) -> None:
        """Remove the keys retired before that time."""

    # sessions that outlive their connection
    def sessions(self, node: str = "") -> SessionStore:
        """A session store kept by this backend, writing as node ``node`` (see
        :mod:`core.sessions`)."""


def make_store(
    kind: str,
    *,
    sqlite_path: str | Path | None = None,
    postgres_dsn: str | None = None,
    postgres_schema: str = "public",
    postgres_pool_min: int = 1,
    postgres_pool_max: int = 10,
    postgres_timeout: float = 5.0,
) -> Store:
    """The store a deployment's ``store`` setting names: ``sqlite`` (a file at
    ``sqlite_path``) or ``postgres`` (the database at ``postgres_dsn``, its tables in
    ``postgres_schema``, a pool of ``postgres_pool_min`` to ``postgres_pool_max``
    connections)."""
    if kind == "sqlite":
        from core.store.sqlite import SQLiteStore

        if sqlite_path is None:
            raise ValueError("the sqlite store needs a file (sqlite_path)")
        return SQLiteStore(sqlite_path)
    if kind == "postgres":
        from core.store.postgres import PostgresStore

        if not postgres_dsn:
            raise ValueError("the postgres store needs a database (postgres_dsn)")
        return PostgresStore(
            postgres_dsn,
            schema=postgres_schema,
            pool_min=postgres_pool_min,
            pool_max=postgres_pool_max,
            timeout=postgres_timeout,
        )
    raise ValueError(f"unknown store {kind!r}: the store is 'sqlite' or 'postgres'")
