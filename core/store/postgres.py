"""The shared state backend: PostgreSQL through an asyncpg connection pool.

Several Conduit nodes use one database: the same tables as the SQLite store, in a schema of
their own (``postgres_schema``), made and migrated at start under an advisory lock so that
nodes starting together migrate once. Values are always query parameters; the schema name,
the one identifier put into SQL text, is checked against :data:`SCHEMA_NAME` and quoted.

The types are PostgreSQL's (BOOLEAN, DOUBLE PRECISION, BIGINT, BYTEA, JSONB) and the Python
values the :class:`~core.store.Store` methods return are the SQLite store's, to the byte.
Text that is ordered or compared (names, ids) is ``COLLATE "C"``: byte order, as in SQLite,
whatever the database's locale. A lost connection, a refused one, a pooled connection or an
answer waited for past ``timeout``, or a server shutting down is
:class:`~core.errors.UnavailableError`, the store unavailable of the error table; the pool
connects again by itself when the server is back.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import time
from collections.abc import AsyncIterator, Iterable
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import asyncpg

from core.errors import UnavailableError
from core.sessions import Batch, Buffered, SessionStore, StoredSession
from core.store import (
    Channel,
    Client,
    Conflict,
    Connection,
    Domain,
    DTLSKey,
    IssuedCertificate,
    Member,
    NotFound,
    SigningKeyRecord,
    User,
)

if TYPE_CHECKING:
    from asyncpg.pool import PoolConnectionProxy

    Conn = PoolConnectionProxy[asyncpg.Record]

log = logging.getLogger("conduit.store")

SCHEMA_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")
"""What a ``postgres_schema`` may be: a plain identifier (PostgreSQL keeps 63 bytes)."""

# Each entry migrates the schema from version i to i + 1, as the entry of the same index in
# core.store.sqlite.MIGRATIONS does: a version means the same tables in both. Append only.
MIGRATIONS: list[str] = [
    """
    CREATE TABLE domains (
        name TEXT COLLATE "C" PRIMARY KEY,
        created DOUBLE PRECISION NOT NULL,
        metadata JSONB NOT NULL DEFAULT '{}'
    );
    CREATE TABLE clients (
        id TEXT COLLATE "C" PRIMARY KEY,
        domain TEXT COLLATE "C" NOT NULL REFERENCES domains(name) ON DELETE CASCADE,
        name TEXT COLLATE "C" NOT NULL,
        secret_hash TEXT COLLATE "C" NOT NULL UNIQUE,
        enabled BOOLEAN NOT NULL DEFAULT TRUE,
        created DOUBLE PRECISION NOT NULL,
        metadata JSONB NOT NULL DEFAULT '{}'
    );
    CREATE INDEX clients_domain ON clients(domain, name);
    CREATE TABLE channels (
        id TEXT COLLATE "C" PRIMARY KEY,
        domain TEXT COLLATE "C" NOT NULL REFERENCES domains(name) ON DELETE CASCADE,
        name TEXT COLLATE "C" NOT NULL,
        created DOUBLE PRECISION NOT NULL,
        metadata JSONB NOT NULL DEFAULT '{}',
        UNIQUE (domain, name)
    );
    CREATE TABLE connections (
        client_id TEXT COLLATE "C" NOT NULL REFERENCES clients(id) ON DELETE CASCADE,
        channel_id TEXT COLLATE "C" NOT NULL REFERENCES channels(id) ON DELETE CASCADE,
        publish BOOLEAN NOT NULL,
        subscribe BOOLEAN NOT NULL,
        PRIMARY KEY (client_id, channel_id)
    );
    CREATE INDEX connections_channel ON connections(channel_id);
    """,
    """
    CREATE TABLE retained (
        domain TEXT COLLATE "C" NOT NULL,
        channel TEXT COLLATE "C" NOT NULL,
        subtopic TEXT COLLATE "C" NOT NULL,
        message BYTEA NOT NULL,
        PRIMARY KEY (domain, channel, subtopic)
    );
    """,
    # Client names become unique in their domain (see the SQLite migration of the same index).
    """
    UPDATE clients SET name = name || ' (' || substr(id, 1, 8) || ')'
    WHERE EXISTS (
        SELECT 1 FROM clients older
        WHERE older.domain = clients.domain AND older.name = clients.name
        AND (older.created < clients.created
             OR (older.created = clients.created AND older.id < clients.id))
    );
    DROP INDEX clients_domain;
    CREATE UNIQUE INDEX clients_domain_name ON clients(domain, name);
    """,
    # Retained messages go with their channel (and so with their domain). The trigger names
    # its table by the schema it fires in, not by search_path: a restore into another schema
    # keeps working.
    """
    DELETE FROM retained WHERE NOT EXISTS (
        SELECT 1 FROM channels WHERE channels.domain = retained.domain
        AND channels.name = retained.channel
    );
    CREATE FUNCTION channel_deleted() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        EXECUTE format('DELETE FROM %I.retained WHERE domain = $1 AND channel = $2',
                       TG_TABLE_SCHEMA)
        USING OLD.domain, OLD.name;
        RETURN OLD;
    END
    $$;
    CREATE TRIGGER channel_deleted AFTER DELETE ON channels
        FOR EACH ROW EXECUTE FUNCTION channel_deleted();
    """,
    """
    CREATE TABLE sessions (
        key TEXT COLLATE "C" PRIMARY KEY,
        state BYTEA NOT NULL
    );
    CREATE TABLE session_messages (
        session TEXT COLLATE "C" NOT NULL,
        seq BIGINT NOT NULL,
        data BYTEA NOT NULL,
        PRIMARY KEY (session, seq)
    );
    """,
    """
    CREATE TABLE certificates (
        serial TEXT COLLATE "C" PRIMARY KEY,
        kind TEXT NOT NULL,
        common_name TEXT NOT NULL,
        domain TEXT COLLATE "C",
        client_id TEXT COLLATE "C",
        not_before DOUBLE PRECISION NOT NULL,
        not_after DOUBLE PRECISION NOT NULL,
        issued DOUBLE PRECISION NOT NULL,
        revoked DOUBLE PRECISION,
        pem TEXT NOT NULL
    );
    CREATE INDEX certificates_client ON certificates(domain, client_id);
    """,
    """
    CREATE TABLE signing_keys (
        kid TEXT COLLATE "C" PRIMARY KEY,
        algorithm TEXT NOT NULL,
        created DOUBLE PRECISION NOT NULL,
        retires DOUBLE PRECISION,
        sealed BYTEA NOT NULL
    );
    """,
    """
    CREATE TABLE dtls_keys (
        client_id TEXT COLLATE "C" PRIMARY KEY REFERENCES clients(id) ON DELETE CASCADE,
        sealed BYTEA NOT NULL,
        created DOUBLE PRECISION NOT NULL
    );
    """,
    # Emails are unique in any case, as SQLite's COLLATE NOCASE made them.
    """
    CREATE TABLE users (
        id TEXT COLLATE "C" PRIMARY KEY,
        email TEXT COLLATE "C" NOT NULL,
        name TEXT NOT NULL,
        password_hash TEXT,
        enabled BOOLEAN NOT NULL DEFAULT TRUE,
        platform_admin BOOLEAN NOT NULL DEFAULT FALSE,
        created DOUBLE PRECISION NOT NULL,
        last_login DOUBLE PRECISION
    );
    CREATE UNIQUE INDEX users_email ON users (lower(email));
    CREATE TABLE members (
        user_id TEXT COLLATE "C" NOT NULL REFERENCES users(id) ON DELETE CASCADE,
        domain TEXT COLLATE "C" NOT NULL REFERENCES domains(name) ON DELETE CASCADE,
        role TEXT NOT NULL,
        PRIMARY KEY (user_id, domain)
    );
    CREATE TABLE token_families (
        id TEXT COLLATE "C" PRIMARY KEY,
        user_id TEXT COLLATE "C" NOT NULL REFERENCES users(id) ON DELETE CASCADE,
        created DOUBLE PRECISION NOT NULL,
        revoked DOUBLE PRECISION
    );
    CREATE INDEX token_families_user ON token_families(user_id);
    CREATE TABLE refresh_tokens (
        jti TEXT COLLATE "C" PRIMARY KEY,
        family TEXT COLLATE "C" NOT NULL REFERENCES token_families(id) ON DELETE CASCADE,
        expires DOUBLE PRECISION NOT NULL,
        used DOUBLE PRECISION
    );
    CREATE INDEX refresh_tokens_expires ON refresh_tokens(expires);
    """,
    """
    CREATE TABLE idps (
        domain TEXT COLLATE "C" NOT NULL REFERENCES domains(name) ON DELETE CASCADE,
        name TEXT COLLATE "C" NOT NULL,
        type TEXT NOT NULL,
        config JSONB NOT NULL,
        PRIMARY KEY (domain, name)
    );
    CREATE TABLE revoked_subjects (
        domain TEXT COLLATE "C" NOT NULL REFERENCES domains(name) ON DELETE CASCADE,
        client_id TEXT COLLATE "C" NOT NULL,
        revoked DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (domain, client_id)
    );
    """,
    """
    ALTER TABLE sessions ADD COLUMN owner TEXT COLLATE "C" NOT NULL DEFAULT '';
    CREATE INDEX sessions_owner ON sessions(owner);
    """,
]

# What says the server cannot be used now, as opposed to a request it refuses: the
# connection lost or refused, the server starting, shutting down, out of connections, or a
# standby that takes no writes. (asyncpg.InterfaceError: the connection or pool is closed.)
_UNAVAILABLE: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.InterfaceError,
    asyncpg.PostgresConnectionError,
    asyncpg.OperatorInterventionError,
    asyncpg.InsufficientResourcesError,
    asyncpg.ReadOnlySQLTransactionError,
)

# What keeps a store from opening: the above, or a refusal (password, database, right).
_NOT_OPENED: tuple[type[BaseException], ...] = (*_UNAVAILABLE, asyncpg.PostgresError)

_CLIENT = "id, domain, name, enabled, created, metadata"
_USER = "id, email, name, enabled, platform_admin, created, last_login"


REDACTED = "[redacted]"


def redact_dsn(dsn: str) -> str:
    """The DSN fit for a log line: its password (in the user part or the query) replaced by
    ``[redacted]``, as :func:`core.noise.redact` does in every log line. Text that is not a
    URL is shown as ``(not a URL)``: it may be anything."""
    try:
        parts = urlsplit(dsn)
    except ValueError:
        return "(not a URL)"
    if not parts.scheme or not parts.netloc:
        return "(not a URL)"
    userinfo, at, hosts = parts.netloc.rpartition("@")
    if at and ":" in userinfo:
        userinfo = userinfo.split(":", 1)[0] + ":" + REDACTED
    query = [(k, REDACTED if k.lower() == "password" else v) for k, v in parse_qsl(parts.query)]
    netloc = f"{userinfo}@{hosts}" if at else hosts
    return urlunsplit((parts.scheme, netloc, parts.path, urlencode(query, safe="[]"), ""))


def _why(exc: BaseException) -> str:
    """What went wrong, short, with nothing of the DSN in it."""
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, OSError) and exc.errno:
        return os.strerror(exc.errno)
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def _count(status: str) -> int:
    """The rows an INSERT, UPDATE or DELETE touched, from its status (``UPDATE 2``)."""
    tail = status.rsplit(" ", 1)[-1]
    return int(tail) if tail.isdigit() else 0


def _meta(text: str) -> dict[str, str]:
    value = json.loads(text)
    return value if isinstance(value, dict) else {}


def _lock_key(schema: str) -> int:
    """The advisory lock of one schema's migrations (a signed 64-bit key)."""
    digest = hashlib.blake2b(f"conduit migrate {schema}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


class PostgresStore:
    """``Store`` on PostgreSQL: a pool of ``pool_min`` to ``pool_max`` connections, each with
    ``search_path`` set to ``schema``. ``timeout`` bounds connecting, waiting for a pooled
    connection and each statement (seconds; Conduit's are small): past it the store is
    unavailable, even when the server has vanished without closing its connections."""

    def __init__(
        self,
        dsn: str,
        *,
        schema: str = "public",
        pool_min: int = 1,
        pool_max: int = 10,
        timeout: float = 5.0,
    ) -> None:
        if not SCHEMA_NAME.fullmatch(schema):
            raise ValueError(
                f"postgres_schema {schema!r}: letters, digits and _ only, not first a digit,"
                " 63 at most"
            )
        if not 0 <= pool_min <= pool_max or pool_max < 1:
            raise ValueError("postgres pool: 0 <= postgres_pool_min <= postgres_pool_max, max >= 1")
        self.dsn = dsn
        self.schema = schema
        self.pool_min = pool_min
        self.pool_max = pool_max
        self.timeout = timeout
        self._pool: asyncpg.Pool | None = None
        self._down = False  # the last call found the server unreachable (logged once)

    @property
    def where(self) -> str:
        """The database, for a log line: the DSN without its password, and the schema."""
        return f"{redact_dsn(self.dsn)} (schema {self.schema})"

    @property
    def _quoted(self) -> str:
        return '"' + self.schema + '"'

    async def open(self) -> None:
        """Make the schema if it is missing and migrate it, on a connection of its own (a
        migration, or the wait for another node's, may take longer than ``timeout``), then
        open the pool. Raises UnavailableError when the database cannot be had (unreachable,
        refused, no right)."""
        settings = {"search_path": self._quoted, "application_name": "conduit"}
        try:
            conn = await asyncpg.connect(self.dsn, timeout=self.timeout, server_settings=settings)
        except _NOT_OPENED as exc:
            raise UnavailableError(f"PostgreSQL at {self.where}: {_why(exc)}") from None
        except ValueError:  # a DSN asyncpg cannot read: its text may hold the password
            raise ValueError(f"postgres_dsn cannot be read: {redact_dsn(self.dsn)}") from None
        try:
            await self._migrate(conn)
            await conn.close()
        except _NOT_OPENED as exc:
            conn.terminate()
            raise UnavailableError(
                f"PostgreSQL at {self.where}: cannot migrate the schema: {_why(exc)}"
            ) from None
        except BaseException:
            conn.terminate()
            raise
        try:
            self._pool = await asyncpg.create_pool(
                self.dsn,
                min_size=self.pool_min,
                max_size=self.pool_max,
                timeout=self.timeout,
                command_timeout=self.timeout,
                server_settings=settings,
            )
        except _NOT_OPENED as exc:
            raise UnavailableError(f"PostgreSQL at {self.where}: {_why(exc)}") from None
        log.info("store: PostgreSQL at %s", self.where)

    async def _migrate(self, conn: asyncpg.Connection) -> None:
        """Every migration not yet applied, in one transaction under the schema's advisory
        lock: a node that starts while another migrates waits, then finds nothing to do."""
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _lock_key(self.schema))
            found = await conn.fetchval(
                "SELECT 1 FROM pg_namespace WHERE nspname = $1", self.schema
            )
            if not found:  # asked only then: CREATE SCHEMA IF NOT EXISTS needs the right anyway
                await conn.execute(f"CREATE SCHEMA {self._quoted}")
            await conn.execute(f"SET LOCAL search_path TO {self._quoted}")
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)"
            )
            version = await conn.fetchval("SELECT version FROM schema_version")
            if version is None:
                version = 0
                await conn.execute("INSERT INTO schema_version (version) VALUES (0)")
            for i, script in enumerate(MIGRATIONS[version:], start=version):
                await conn.execute(script)
                await conn.execute("UPDATE schema_version SET version = $1", i + 1)
            if version < len(MIGRATIONS):
                log.info(
                    "store: schema %s migrated from version %d to %d",
                    self.schema, version, len(MIGRATIONS),
                )  # fmt: skip

    async def close(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            try:
                await pool.close()
            except _UNAVAILABLE:  # the server is gone already: nothing left to close well
                pool.terminate()

    def sessions(self, node: str = "") -> SessionStore:
        """A session store in this database (see :mod:`core.sessions`)."""
        return PostgresSessions(self, node)

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[Conn]:
        """A pooled connection, with PostgreSQL's errors turned into the store's: a unique or
        foreign key refusal is Conflict, an unusable server UnavailableError."""
        pool = self._pool
        if pool is None:
            raise UnavailableError("store is not open")
        try:
            conn = await pool.acquire(timeout=self.timeout)
        except Exception as exc:  # cannot connect, for whatever reason: not this request's
            raise self._unavailable(exc) from exc
        try:
            yield conn
        except asyncpg.IntegrityConstraintViolationError as exc:
            raise Conflict(str(exc)) from exc
        except _UNAVAILABLE as exc:
            raise self._unavailable(exc) from exc
        finally:
            with contextlib.suppress(*_UNAVAILABLE):
                await pool.release(conn)
        if self._down:
            self._down = False
            log.info("store: PostgreSQL at %s answers again", self.where)

    def _unavailable(self, exc: BaseException) -> UnavailableError:
        """The error the rest of Conduit expects; the first of a series is logged, with
        where the database is (never its password)."""
        why = _why(exc)
        if not self._down:
            self._down = True
            log.warning("store: PostgreSQL at %s is unavailable: %s", self.where, why)
        return UnavailableError(f"store: PostgreSQL: {why}")

    async def ping(self) -> None:
        async with self.connection() as conn:
            await conn.fetchval("SELECT 1")

    async def _one(self, sql: str, *args: Any) -> asyncpg.Record | None:
        async with self.connection() as conn:
            row: asyncpg.Record | None = await conn.fetchrow(sql, *args)
            return row

    async def _all(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        async with self.connection() as conn:
            return list(await conn.fetch(sql, *args))

    async def _write(self, sql: str, *args: Any) -> int:
        async with self.connection() as conn:
            return _count(await conn.execute(sql, *args))

    # domains
    async def create_domain(self, name: str, metadata: dict[str, str]) -> Domain:
        domain = Domain(name, time.time(), metadata)
        try:
            await self._write(
                "INSERT INTO domains (name, created, metadata) VALUES ($1, $2, $3::jsonb)",
                name, domain.created, json.dumps(metadata),
            )  # fmt: skip
        except Conflict:
            raise Conflict(f"domain {name!r} exists") from None
        return domain

    async def get_domain(self, name: str) -> Domain:
        row = await self._one("SELECT name, created, metadata FROM domains WHERE name = $1", name)
        if row is None:
            raise NotFound(f"no domain {name!r}")
        return Domain(row["name"], row["created"], _meta(row["metadata"]))

    async def list_domains(self) -> list[Domain]:
        rows = await self._all("SELECT name, created, metadata FROM domains ORDER BY name")
        return [Domain(r["name"], r["created"], _meta(r["metadata"])) for r in rows]

    async def delete_domain(self, name: str) -> None:
        if not await self._write("DELETE FROM domains WHERE name = $1", name):
            raise NotFound(f"no domain {name!r}")

    # clients
    @staticmethod
    def _client(row: asyncpg.Record) -> Client:
        return Client(
            row["id"], row["domain"], row["name"], row["enabled"], row["created"],
            _meta(row["metadata"]),
        )  # fmt: skip

    async def create_client(
        self, domain: str, client_id: str, name: str, secret_hash: str, metadata: dict[str, str]
    ) -> Client:
        await self.get_domain(domain)
        client = Client(client_id, domain, name, True, time.time(), metadata)
        try:
            await self._write(
                "INSERT INTO clients (id, domain, name, secret_hash, enabled, created, metadata)"
                " VALUES ($1, $2, $3, $4, TRUE, $5, $6::jsonb)",
                client_id, domain, name, secret_hash, client.created, json.dumps(metadata),
            )  # fmt: skip
        except Conflict:
            raise Conflict(f"a client named {name!r} exists in domain {domain!r}") from None
        return client

    async def get_client(self, domain: str, ref: str) -> Client:
        row = await self._one(
            f"SELECT {_CLIENT} FROM clients WHERE domain = $1 AND (id = $2 OR name = $2)"
            " ORDER BY (id = $2) DESC LIMIT 1",
            domain, ref,
        )  # fmt: skip
        if row is None:
            raise NotFound(f"no client {ref!r} in domain {domain!r}")
        return self._client(row)

    async def list_clients(self, domain: str) -> list[Client]:
        await self.get_domain(domain)
        rows = await self._all(
            f"SELECT {_CLIENT} FROM clients WHERE domain = $1 ORDER BY name", domain
        )
        return [self._client(r) for r in rows]

    async def set_client_enabled(self, domain: str, client_id: str, enabled: bool) -> Client:
        client = await self.get_client(domain, client_id)
        await self._write("UPDATE clients SET enabled = $1 WHERE id = $2", enabled, client.id)
        return await self.get_client(domain, client.id)

    async def set_client_secret(self, domain: str, client_id: str, secret_hash: str) -> Client:
        client = await self.get_client(domain, client_id)
        await self._write(
            "UPDATE clients SET secret_hash = $1 WHERE id = $2", secret_hash, client.id
        )
        return client

    async def delete_client(self, domain: str, client_id: str) -> None:
        client = await self.get_client(domain, client_id)
        await self._write("DELETE FROM clients WHERE id = $1", client.id)

    async def client_by_secret(self, secret_hash: str) -> Client | None:
        row = await self._one(f"SELECT {_CLIENT} FROM clients WHERE secret_hash = $1", secret_hash)
        return self._client(row) if row else None

    async def client_by_id(self, client_id: str) -> Client | None:
        row = await self._one(f"SELECT {_CLIENT} FROM clients WHERE id = $1", client_id)
        return self._client(row) if row else None

    # channels
    @staticmethod
    def _channel(row: asyncpg.Record) -> Channel:
        return Channel(
            row["id"], row["domain"], row["name"], row["created"], _meta(row["metadata"])
        )

    async def create_channel(
        self, domain: str, channel_id: str, name: str, metadata: dict[str, str]
    ) -> Channel:
        await self.get_domain(domain)
        channel = Channel(channel_id, domain, name, time.time(), metadata)
        try:
            await self._write(
                "INSERT INTO channels (id, domain, name, created, metadata)"
                " VALUES ($1, $2, $3, $4, $5::jsonb)",
                channel_id, domain, name, channel.created, json.dumps(metadata),
            )  # fmt: skip
        except Conflict:
            raise Conflict(f"channel {name!r} exists in domain {domain!r}") from None
        return channel

    async def get_channel(self, domain: str, ref: str) -> Channel:
        row = await self._one(
            "SELECT id, domain, name, created, metadata FROM channels"
            " WHERE domain = $1 AND (name = $2 OR id = $2) ORDER BY (name = $2) DESC LIMIT 1",
            domain, ref,
        )  # fmt: skip
        if row is None:
            raise NotFound(f"no channel {ref!r} in domain {domain!r}")
        return self._channel(row)

    async def list_channels(self, domain: str) -> list[Channel]:
        await self.get_domain(domain)
        rows = await self._all(
            "SELECT id, domain, name, created, metadata FROM channels WHERE domain = $1"
            " ORDER BY name",
            domain,
        )
        return [self._channel(r) for r in rows]

    async def delete_channel(self, domain: str, name: str) -> None:
        channel = await self.get_channel(domain, name)
        await self._write("DELETE FROM channels WHERE id = $1", channel.id)

    # connections
    async def connect(
        self, domain: str, client_id: str, channel: str, publish: bool, subscribe: bool
    ) -> Connection:
        client = await self.get_client(domain, client_id)
        ch = await self.get_channel(domain, channel)
        await self._write(
            "INSERT INTO connections (client_id, channel_id, publish, subscribe)"
            " VALUES ($1, $2, $3, $4)"
            " ON CONFLICT (client_id, channel_id) DO UPDATE"
            " SET publish = excluded.publish, subscribe = excluded.subscribe",
            client.id, ch.id, publish, subscribe,
        )  # fmt: skip
        return Connection(domain, client.id, ch.name, publish, subscribe)

    async def disconnect(self, domain: str, client_id: str, channel: str) -> None:
        client = await self.get_client(domain, client_id)
        ch = await self.get_channel(domain, channel)
        n = await self._write(
            "DELETE FROM connections WHERE client_id = $1 AND channel_id = $2", client.id, ch.id
        )
        if not n:
            raise NotFound(f"client {client.id!r} is not connected to channel {ch.name!r}")

    async def list_connections(
        self, domain: str, client_id: str | None = None, channel: str | None = None
    ) -> list[Connection]:
        sql = (
            "SELECT k.client_id, ch.name AS channel, k.publish, k.subscribe FROM connections k"
            " JOIN channels ch ON ch.id = k.channel_id WHERE ch.domain = $1"
        )
        args: list[Any] = [domain]
        if client_id is not None:
            args.append((await self.get_client(domain, client_id)).id)
            sql += f" AND k.client_id = ${len(args)}"
        if channel is not None:
            args.append((await self.get_channel(domain, channel)).id)
            sql += f" AND ch.id = ${len(args)}"
        rows = await self._all(sql + " ORDER BY ch.name, k.client_id", *args)
        return [
            Connection(domain, r["client_id"], r["channel"], r["publish"], r["subscribe"])
            for r in rows
        ]

    async def permissions(self, client_id: str, domain: str, channel: str) -> Connection | None:
        row = await self._one(
            "SELECT k.publish, k.subscribe FROM connections k"
            " JOIN channels ch ON ch.id = k.channel_id"
            " JOIN clients cl ON cl.id = k.client_id"
            " WHERE k.client_id = $1 AND ch.domain = $2 AND ch.name = $3 AND cl.enabled",
            client_id, domain, channel,
        )  # fmt: skip
        if row is None:
            return None
        return Connection(domain, client_id, channel, row["publish"], row["subscribe"])

    # DTLS keys
    async def put_dtls_key(self, domain: str, ref: str, sealed: bytes) -> Client:
        client = await self.get_client(domain, ref)
        await self._write(
            "INSERT INTO dtls_keys (client_id, sealed, created) VALUES ($1, $2, $3)"
            " ON CONFLICT (client_id) DO UPDATE"
            " SET sealed = excluded.sealed, created = excluded.created",
            client.id, sealed, time.time(),
        )  # fmt: skip
        return client

    async def delete_dtls_key(self, domain: str, ref: str) -> Client:
        client = await self.get_client(domain, ref)
        if not await self._write("DELETE FROM dtls_keys WHERE client_id = $1", client.id):
            raise NotFound(f"client {client.id!r} has no DTLS key")
        return client

    async def dtls_keys(self) -> list[DTLSKey]:
        rows = await self._all(
            "SELECT k.client_id, k.sealed, k.created, c.domain, c.enabled FROM dtls_keys k"
            " JOIN clients c ON c.id = k.client_id ORDER BY k.client_id"
        )
        return [
            DTLSKey(r["client_id"], r["domain"], r["enabled"], bytes(r["sealed"]), r["created"])
            for r in rows
        ]

    # certificates
    async def add_certificate(self, cert: IssuedCertificate) -> None:
        try:
            await self._write(
                "INSERT INTO certificates (serial, kind, common_name, domain, client_id,"
                " not_before, not_after, issued, revoked, pem)"
                " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
                cert.serial, cert.kind, cert.common_name, cert.domain, cert.client_id,
                cert.not_before, cert.not_after, cert.issued, cert.revoked, cert.pem,
            )  # fmt: skip
        except Conflict:
            raise Conflict(f"a certificate with serial {cert.serial} is recorded") from None

    _CERTIFICATE = (
        "serial, kind, common_name, domain, client_id, not_before, not_after, issued, revoked, pem"
    )

    async def get_certificate(self, serial: str) -> IssuedCertificate:
        row = await self._one(
            f"SELECT {self._CERTIFICATE} FROM certificates WHERE serial = $1", serial
        )
        if row is None:
            raise NotFound(f"no certificate with serial {serial}")
        return IssuedCertificate(**dict(row))

    async def list_certificates(
        self, domain: str | None = None, client_id: str | None = None
    ) -> list[IssuedCertificate]:
        rows = await self._all(
            f"SELECT {self._CERTIFICATE} FROM certificates"
            " WHERE ($1::text IS NULL OR domain = $1) AND ($2::text IS NULL OR client_id = $2)"
            " ORDER BY issued, serial",
            domain, client_id,
        )  # fmt: skip
        return [IssuedCertificate(**dict(r)) for r in rows]

    async def revoke_certificates(self, serials: list[str], when: float) -> list[str]:
        rows = await self._all(
            "UPDATE certificates SET revoked = $1 WHERE serial = ANY($2::text[])"
            " AND revoked IS NULL RETURNING serial",
            when, serials,
        )  # fmt: skip
        changed = {r["serial"] for r in rows}
        return [s for s in dict.fromkeys(serials) if s in changed]  # in the order asked

    async def revoked_certificates(self, serials: Iterable[str] | None = None) -> dict[str, float]:
        if serials is None:
            rows = await self._all(
                "SELECT serial, revoked FROM certificates WHERE revoked IS NOT NULL"
            )
        else:
            rows = await self._all(
                "SELECT serial, revoked FROM certificates WHERE revoked IS NOT NULL"
                " AND serial = ANY($1::text[])",
                list(serials),
            )
        return {r["serial"]: r["revoked"] for r in rows}

    # users
    @staticmethod
    def _user(row: asyncpg.Record) -> User:
        return User(
            row["id"], row["email"], row["name"], row["enabled"], row["platform_admin"],
            row["created"], row["last_login"],
        )  # fmt: skip

    async def create_user(self, user: User, password_hash: str | None) -> User:
        try:
            await self._write(
                "INSERT INTO users (id, email, name, password_hash, enabled, platform_admin,"
                " created) VALUES ($1, $2, $3, $4, $5, $6, $7)",
                user.id, user.email, user.name, password_hash, user.enabled,
                user.platform_admin, user.created,
            )  # fmt: skip
        except Conflict:
            raise Conflict(f"a user with email {user.email!r} exists") from None
        return user

    async def get_user(self, ref: str) -> User:
        row = await self._one(
            f"SELECT {_USER} FROM users WHERE id = $1 OR lower(email) = lower($1)"
            " ORDER BY (id = $1) DESC LIMIT 1",
            ref,
        )
        if row is None:
            raise NotFound(f"no user {ref!r}")
        return self._user(row)

    async def list_users(self) -> list[User]:
        rows = await self._all(f"SELECT {_USER} FROM users ORDER BY lower(email)")
        return [self._user(r) for r in rows]

    async def user_password(self, email: str) -> tuple[User, str | None] | None:
        row = await self._one(
            f"SELECT {_USER}, password_hash FROM users WHERE lower(email) = lower($1)", email
        )
        return None if row is None else (self._user(row), row["password_hash"])

    async def set_user_enabled(self, ref: str, enabled: bool) -> User:
        user = await self.get_user(ref)
        await self._write("UPDATE users SET enabled = $1 WHERE id = $2", enabled, user.id)
        return await self.get_user(user.id)

    async def set_user_password(self, ref: str, password_hash: str | None) -> User:
        user = await self.get_user(ref)
        await self._write(
            "UPDATE users SET password_hash = $1 WHERE id = $2", password_hash, user.id
        )
        return user

    async def set_last_login(self, user_id: str, when: float) -> None:
        await self._write("UPDATE users SET last_login = $1 WHERE id = $2", when, user_id)

    async def delete_user(self, ref: str) -> None:
        user = await self.get_user(ref)
        await self._write("DELETE FROM users WHERE id = $1", user.id)

    async def set_member(self, domain: str, user_ref: str, role: str) -> Member:
        await self.get_domain(domain)
        user = await self.get_user(user_ref)
        await self._write(
            "INSERT INTO members (user_id, domain, role) VALUES ($1, $2, $3)"
            " ON CONFLICT (user_id, domain) DO UPDATE SET role = excluded.role",
            user.id, domain, role,
        )  # fmt: skip
        return Member(user.id, domain, role)

    async def remove_member(self, domain: str, user_ref: str) -> None:
        user = await self.get_user(user_ref)
        if not await self._write(
            "DELETE FROM members WHERE user_id = $1 AND domain = $2", user.id, domain
        ):
            raise NotFound(f"user {user.email!r} has no role in domain {domain!r}")

    async def list_members(self, domain: str) -> list[Member]:
        await self.get_domain(domain)
        rows = await self._all(
            "SELECT m.user_id, m.domain, m.role FROM members m JOIN users u ON u.id = m.user_id"
            " WHERE m.domain = $1 ORDER BY lower(u.email)",
            domain,
        )
        return [Member(r["user_id"], r["domain"], r["role"]) for r in rows]

    async def roles(self, user_id: str) -> dict[str, str]:
        rows = await self._all("SELECT domain, role FROM members WHERE user_id = $1", user_id)
        return {r["domain"]: r["role"] for r in rows}

    async def add_token_family(self, family: str, user_id: str, when: float) -> None:
        async with self.connection() as conn, conn.transaction():
            await conn.execute(
                "INSERT INTO token_families (id, user_id, created) VALUES ($1, $2, $3)",
                family, user_id, when,
            )  # fmt: skip
            await conn.execute("DELETE FROM refresh_tokens WHERE expires < $1", when)

    async def revoke_token_family(self, family: str, when: float) -> bool:
        return bool(
            await self._write(
                "UPDATE token_families SET revoked = $1 WHERE id = $2 AND revoked IS NULL",
                when,
                family,
            )
        )

    async def revoke_user_token_families(self, user_id: str, when: float) -> None:
        await self._write(
            "UPDATE token_families SET revoked = $1 WHERE user_id = $2 AND revoked IS NULL",
            when, user_id,
        )  # fmt: skip

    async def token_family_live(self, family: str) -> bool:
        row = await self._one(
            "SELECT 1 FROM token_families f JOIN users u ON u.id = f.user_id"
            " WHERE f.id = $1 AND f.revoked IS NULL AND u.enabled",
            family,
        )
        return row is not None

    async def add_refresh_token(self, jti: str, family: str, expires: float) -> None:
        await self._write(
            "INSERT INTO refresh_tokens (jti, family, expires) VALUES ($1, $2, $3)",
            jti, family, expires,
        )  # fmt: skip

    async def use_refresh_token(self, jti: str, when: float) -> str:
        # One statement: two nodes given the same token at once cannot both find it fresh.
        if await self._write(
            "UPDATE refresh_tokens SET used = $1 WHERE jti = $2 AND used IS NULL", when, jti
        ):
            return "fresh"
        row = await self._one("SELECT 1 FROM refresh_tokens WHERE jti = $1", jti)
        return "used" if row is not None else "unknown"

    # identity providers
    async def put_idp(
        self, domain: str, name: str, type_: str, config: dict[str, Any], create: bool
    ) -> None:
        await self.get_domain(domain)
        if create:
            try:
                await self._write(
                    "INSERT INTO idps (domain, name, type, config) VALUES ($1, $2, $3, $4::jsonb)",
                    domain, name, type_, json.dumps(config),
                )  # fmt: skip
            except Conflict:
                raise Conflict(f"domain {domain!r} has a provider {name!r}") from None
        elif not await self._write(
            "UPDATE idps SET type = $1, config = $2::jsonb WHERE domain = $3 AND name = $4",
            type_, json.dumps(config), domain, name,
        ):  # fmt: skip
            raise NotFound(f"no provider {name!r} in domain {domain!r}")

    async def get_idp(self, domain: str, name: str) -> tuple[str, dict[str, Any]]:
        row = await self._one(
            "SELECT type, config FROM idps WHERE domain = $1 AND name = $2", domain, name
        )
        if row is None:
            raise NotFound(f"no provider {name!r} in domain {domain!r}")
        return row["type"], json.loads(row["config"])

    async def list_idps(self, domain: str) -> list[tuple[str, str, dict[str, Any]]]:
        await self.get_domain(domain)
        rows = await self._all(
            "SELECT name, type, config FROM idps WHERE domain = $1 ORDER BY name", domain
        )
        return [(r["name"], r["type"], json.loads(r["config"])) for r in rows]

    async def delete_idp(self, domain: str, name: str) -> None:
        if not await self._write("DELETE FROM idps WHERE domain = $1 AND name = $2", domain, name):
            raise NotFound(f"no provider {name!r} in domain {domain!r}")

    # revoked subjects
    async def revoke_subject(self, domain: str, client_id: str, when: float) -> None:
        await self.get_domain(domain)
        await self._write(
            "INSERT INTO revoked_subjects (domain, client_id, revoked) VALUES ($1, $2, $3)"
            " ON CONFLICT (domain, client_id) DO UPDATE SET revoked = excluded.revoked",
            domain, client_id, when,
        )  # fmt: skip

    async def subject_revocations(
        self, subjects: Iterable[tuple[str, str]]
    ) -> dict[tuple[str, str], float]:
        wanted = list(subjects)
        if not wanted:
            return {}
        rows = await self._all(
            "SELECT r.domain, r.client_id, r.revoked FROM revoked_subjects r"
            " JOIN unnest($1::text[], $2::text[]) AS w(domain, client_id)"
            " ON r.domain = w.domain AND r.client_id = w.client_id",
            [d for d, _ in wanted], [c for _, c in wanted],
        )  # fmt: skip
        return {(r["domain"], r["client_id"]): r["revoked"] for r in rows}

    # signing keys
    async def add_signing_key(self, key: SigningKeyRecord) -> None:
        await self._write(
            "INSERT INTO signing_keys (kid, algorithm, created, retires, sealed)"
            " VALUES ($1, $2, $3, $4, $5)",
            key.kid, key.algorithm, key.created, key.retires, key.sealed,
        )  # fmt: skip

    async def signing_keys(self) -> list[SigningKeyRecord]:
        rows = await self._all(
            "SELECT kid, algorithm, created, retires, sealed FROM signing_keys"
            " ORDER BY created, kid"
        )
        return [SigningKeyRecord(**dict(r)) for r in rows]

    async def retire_signing_keys(self, before: float, retires: float) -> None:
        await self._write(
            "UPDATE signing_keys SET retires = $1 WHERE retires IS NULL AND created < $2",
            retires, before,
        )  # fmt: skip

    async def delete_signing_keys(self, retired_before: float) -> None:
        await self._write("DELETE FROM signing_keys WHERE retires < $1", retired_before)

    # retained messages
    async def put_retained(self, domain: str, channel: str, subtopic: str, data: bytes) -> None:
        if data:
            await self._write(
                "INSERT INTO retained (domain, channel, subtopic, message)"
                " VALUES ($1, $2, $3, $4) ON CONFLICT (domain, channel, subtopic)"
                " DO UPDATE SET message = excluded.message",
                domain, channel, subtopic, data,
            )  # fmt: skip
        else:
            await self._write(
                "DELETE FROM retained WHERE domain = $1 AND channel = $2 AND subtopic = $3",
                domain, channel, subtopic,
            )  # fmt: skip

    async def retained(self, domain: str, channel: str) -> list[bytes]:
        rows = await self._all(
            "SELECT message FROM retained WHERE domain = $1 AND channel = $2 ORDER BY subtopic",
            domain, channel,
        )  # fmt: skip
        return [bytes(r["message"]) for r in rows]


class PostgresSessions(Buffered):
    """:class:`~core.sessions.SessionStore` in the store's database (tables ``sessions`` and
    ``session_messages``), on the store's pool: a batch is one transaction."""

    def __init__(self, store: PostgresStore, node: str = "") -> None:
        super().__init__(node)
        self.store = store

    async def load(self, every: bool = False) -> list[StoredSession]:
        claim = "UPDATE sessions SET owner = $1" + ("" if every else " WHERE owner = ''")
        async with self.store.connection() as conn, conn.transaction():
            await conn.execute(claim, self.node)
            sessions = await conn.fetch(
                "SELECT key, state FROM sessions WHERE owner = $1", self.node
            )
            rows = await conn.fetch(
                "SELECT m.session, m.seq, m.data FROM session_messages m"
                " JOIN sessions s ON s.key = m.session WHERE s.owner = $1"
                " ORDER BY m.session, m.seq",
                self.node,
            )
        messages: dict[str, list[tuple[int, bytes]]] = {}
        for key, seq, data in rows:
            messages.setdefault(key, []).append((seq, bytes(data)))
        return [StoredSession(key, bytes(state), messages.get(key, [])) for key, state in sessions]

    async def holder(self, key: str) -> str | None:
        async with self.store.connection() as conn:
            owner = await conn.fetchval("SELECT owner FROM sessions WHERE key = $1", key)
        return None if owner is None else str(owner)

    async def take(self, key: str) -> StoredSession | None:
        async with self.store.connection() as conn, conn.transaction():
            state = await conn.fetchval(
                "UPDATE sessions SET owner = $1 WHERE key = $2 RETURNING state", self.node, key
            )
            if state is None:
                return None
            rows = await conn.fetch(
                "SELECT seq, data FROM session_messages WHERE session = $1 ORDER BY seq", key
            )
        return StoredSession(key, bytes(state), [(seq, bytes(data)) for seq, data in rows])

    async def _write(self, batch: Batch) -> None:
        node = self.node
        puts = [(k, s, d) for (k, s), d in batch.messages.items() if d is not None]
        deletes = [(k, s) for (k, s), d in batch.messages.items() if d is None]
        async with self.store.connection() as conn, conn.transaction():
            if batch.deleted:
                # Only what this node holds (or nobody): a session another node took is its.
                keys = list(batch.deleted)
                await conn.execute(
                    "DELETE FROM sessions WHERE key = ANY($1::text[]) AND owner IN ($2, '')",
                    keys, node,
                )  # fmt: skip
                await conn.execute(
                    "DELETE FROM session_messages WHERE session = ANY($1::text[])"
                    " AND session NOT IN (SELECT key FROM sessions WHERE key = ANY($1::text[]))",
                    keys,
                )
            if batch.sessions:
                await conn.executemany(
                    "INSERT INTO sessions (key, state, owner) VALUES ($1, $2, $3)"
                    " ON CONFLICT (key) DO UPDATE"
                    " SET state = excluded.state, owner = excluded.owner"
                    " WHERE sessions.owner IN (excluded.owner, '')",
                    [(key, state, node) for key, state in batch.sessions.items()],
                )
            if puts:
                await conn.executemany(
                    "INSERT INTO session_messages (session, seq, data) VALUES ($1, $2, $3)"
                    " ON CONFLICT (session, seq) DO UPDATE SET data = excluded.data",
                    puts,
                )
            if deletes:
                await conn.executemany(
                    "DELETE FROM session_messages WHERE session = $1 AND seq = $2", deletes
                )
            if batch.handed:
                await conn.executemany(
                    "UPDATE sessions SET owner = $1 WHERE key = $2 AND owner = $3",
                    [(to, key, node) for key, to in batch.handed.items()],
                )
