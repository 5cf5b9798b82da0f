"""The embedded state backend: one SQLite file in WAL mode, schema migrations by user_version."""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any

import aiosqlite

from core.errors import UnavailableError
from core.sessions import Batch, Buffered, MemorySessions, SessionStore, StoredSession
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

# Each entry migrates the schema from version i to i + 1. Append only; never edit a shipped one.
MIGRATIONS: list[str] = [
    """
    CREATE TABLE domains (
        name TEXT PRIMARY KEY,
        created REAL NOT NULL,
        metadata TEXT NOT NULL DEFAULT '{}'
    );
    CREATE TABLE clients (
        id TEXT PRIMARY KEY,
        domain TEXT NOT NULL REFERENCES domains(name) ON DELETE CASCADE,
        name TEXT NOT NULL,
        secret_hash TEXT NOT NULL UNIQUE,
        enabled INTEGER NOT NULL DEFAULT 1,
        created REAL NOT NULL,
        metadata TEXT NOT NULL DEFAULT '{}'
    );
    CREATE INDEX clients_domain ON clients(domain, name);
    CREATE TABLE channels (
        id TEXT PRIMARY KEY,
        domain TEXT NOT NULL REFERENCES domains(name) ON DELETE CASCADE,
        name TEXT NOT NULL,
        created REAL NOT NULL,
        metadata TEXT NOT NULL DEFAULT '{}',
        UNIQUE (domain, name)
    );
    CREATE TABLE connections (
        client_id TEXT NOT NULL REFERENCES clients(id) ON DELETE CASCADE,
        channel_id TEXT NOT NULL REFERENCES channels(id) ON DELETE CASCADE,
        publish INTEGER NOT NULL,
        subscribe INTEGER NOT NULL,
        PRIMARY KEY (client_id, channel_id)
    );
    CREATE INDEX connections_channel ON connections(channel_id);
    """,
    """
    CREATE TABLE retained (
        domain TEXT NOT NULL,
        channel TEXT NOT NULL,
        subtopic TEXT NOT NULL,
        message BLOB NOT NULL,
        PRIMARY KEY (domain, channel, subtopic)
    );
    """,
    # Client names become unique in their domain: an older duplicate keeps its name with the
    # start of its id appended (for every duplicate but the first one made).
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
    # Retained messages go with their channel (and so with their domain): a channel or domain
    # made again with the same name starts empty. Those left by deletions before are removed.
    """
    DELETE FROM retained WHERE NOT EXISTS (
        SELECT 1 FROM channels WHERE channels.domain = retained.domain
        AND channels.name = retained.channel
    );
    CREATE TRIGGER channel_deleted AFTER DELETE ON channels BEGIN
        DELETE FROM retained WHERE domain = OLD.domain AND channel = OLD.name;
    END;
    """,
    # Sessions that outlive their connection (core.sessions): opaque state and messages.
    """
    CREATE TABLE sessions (
        key TEXT PRIMARY KEY,
        state BLOB NOT NULL
    );
    CREATE TABLE session_messages (
        session TEXT NOT NULL,
        seq INTEGER NOT NULL,
        data BLOB NOT NULL,
        PRIMARY KEY (session, seq)
    ) WITHOUT ROWID;
    """,
    # Certificates issued by Conduit's CA (certs): the CRL, OCSP and revocation read them.
    """
    CREATE TABLE certificates (
        serial TEXT PRIMARY KEY,
        kind TEXT NOT NULL,
        common_name TEXT NOT NULL,
        domain TEXT,
        client_id TEXT,
        not_before REAL NOT NULL,
        not_after REAL NOT NULL,
        issued REAL NOT NULL,
        revoked REAL,
        pem TEXT NOT NULL
    );
    CREATE INDEX certificates_client ON certificates(domain, client_id);
    """,
    # The keys Conduit's tokens are signed with (core.signing), sealed (core.sealing).
    """
    CREATE TABLE signing_keys (
        kid TEXT PRIMARY KEY,
        algorithm TEXT NOT NULL,
        created REAL NOT NULL,
        retires REAL,
        sealed BLOB NOT NULL
    );
    """,
    # CoAP over DTLS: each client's pre-shared key, sealed (core.sealing), gone with its client.
    """
    CREATE TABLE dtls_keys (
        client_id TEXT PRIMARY KEY REFERENCES clients(id) ON DELETE CASCADE,
        sealed BLOB NOT NULL,
        created REAL NOT NULL
    );
    """,
    # Users (core.users), their roles in domains, and their refresh token families.
    """
    CREATE TABLE users (
        id TEXT PRIMARY KEY,
        email TEXT NOT NULL UNIQUE COLLATE NOCASE,
        name TEXT NOT NULL,
        password_hash TEXT,
        enabled INTEGER NOT NULL DEFAULT 1,
        platform_admin INTEGER NOT NULL DEFAULT 0,
        created REAL NOT NULL,
        last_login REAL
    );
    CREATE TABLE members (
        user_id TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
        domain TEXT NOT NULL REFERENCES domains(name) ON DELETE CASCADE,
        role TEXT NOT NULL,
        PRIMARY KEY (user_id, domain)
    );
    CREATE TABLE token_families (
        id TEXT PRIMARY KEY,
        user_id TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
        created REAL NOT NULL,
        revoked REAL
    );
    CREATE TABLE refresh_tokens (
        jti TEXT PRIMARY KEY,
        family TEXT NOT NULL REFERENCES token_families(id) ON DELETE CASCADE,
        expires REAL NOT NULL,
        used REAL
    );
    """,
    # External identity providers of a domain (core.idps), as registered.
    """
    CREATE TABLE idps (
        domain TEXT NOT NULL REFERENCES domains(name) ON DELETE CASCADE,
        name TEXT NOT NULL,
        type TEXT NOT NULL,
        config TEXT NOT NULL,
        PRIMARY KEY (domain, name)
    );
    CREATE TABLE revoked_subjects (
        domain TEXT NOT NULL REFERENCES domains(name) ON DELETE CASCADE,
        client_id TEXT NOT NULL,
        revoked REAL NOT NULL,
        PRIMARY KEY (domain, client_id)
    );
    """,
    # The node holding each session (core.sessions); "": none (written before this).
    """
    ALTER TABLE sessions ADD COLUMN owner TEXT NOT NULL DEFAULT '';
    CREATE INDEX sessions_owner ON sessions(owner);
    """,
]


def _meta(text: str) -> dict[str, str]:
    value = json.loads(text)
    return value if isinstance(value, dict) else {}


def _private_file(path: Path) -> None:
    """Make the database file readable by its owner only (0600) before SQLite opens it; SQLite
    gives its -wal and -shm files the same mode. A file made by an older version is tightened;
    a new data directory is made 0700."""
    if not path.parent.exists():
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
    for file in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        with contextlib.suppress(FileNotFoundError):
            if file.stat().st_mode & 0o077:
                file.chmod(0o600)


class SQLiteStore:
    """``Store`` on one SQLite file. One connection; SQLite serializes writers anyway."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self._db: aiosqlite.Connection | None = None

    @property
    def db(self) -> aiosqlite.Connection:
        if self._db is None:
            raise UnavailableError("store is not open")
        return self._db

    async def open(self) -> None:
        if self.path != ":memory:":
            _private_file(Path(self.path))
        db = await aiosqlite.connect(self.path, isolation_level=None)
        db.row_factory = sqlite3.Row
        await db.execute("PRAGMA journal_mode=WAL")
        await db.execute("PRAGMA synchronous=NORMAL")
        await db.execute("PRAGMA foreign_keys=ON")
        await db.execute("PRAGMA busy_timeout=5000")
        self._db = db
        await self._migrate()

    async def _migrate(self) -> None:
        async with self.db.execute("PRAGMA user_version") as cur:
            row = await cur.fetchone()
        version = int(row[0]) if row else 0
        for i, script in enumerate(MIGRATIONS[version:], start=version):
            await self.db.executescript(f"BEGIN; {script}; PRAGMA user_version = {i + 1}; COMMIT;")

    async def close(self) -> None:
        if self._db is not None:
            await self._db.close()
            self._db = None

    def sessions(self, node: str = "") -> SessionStore:
        """A session store on this database (see :mod:`core.sessions`); an in-memory database
        keeps nothing across a restart, and nor do its sessions."""
        if self.path == ":memory:":
            return MemorySessions(node)
        return SQLiteSessions(self.path, node)

    async def ping(self) -> None:
        try:
            await self._one("SELECT 1", ())
        except sqlite3.Error as exc:
            raise UnavailableError(f"store: {exc}") from exc

    # One round trip to aiosqlite's thread per read (execute_fetchall), not three (execute,
    # fetch, close): about 45 µs of CPU instead of 110 per query (bench/idp_bench.py's profile).
    async def _one(self, sql: str, args: Iterable[Any]) -> sqlite3.Row | None:
        rows = await self.db.execute_fetchall(sql, tuple(args))
        return next(iter(rows), None)

    async def _all(self, sql: str, args: Iterable[Any]) -> list[sqlite3.Row]:
        return list(await self.db.execute_fetchall(sql, tuple(args)))

    async def _write(self, sql: str, args: Iterable[Any]) -> int:
        try:
            async with self.db.execute(sql, tuple(args)) as cur:
                return cur.rowcount
        except sqlite3.IntegrityError as exc:
            raise Conflict(str(exc)) from exc

    # domains
    async def create_domain(self, name: str, metadata: dict[str, str]) -> Domain:
        domain = Domain(name, time.time(), metadata)
        try:
            await self._write(
                "INSERT INTO domains (name, created, metadata) VALUES (?, ?, ?)",
                (name, domain.created, json.dumps(metadata)),
            )
        except Conflict:
            raise Conflict(f"domain {name!r} exists") from None
        return domain

    async def get_domain(self, name: str) -> Domain:
        row = await self._one("SELECT * FROM domains WHERE name = ?", (name,))
        if row is None:
            raise NotFound(f"no domain {name!r}")
        return Domain(row["name"], row["created"], _meta(row["metadata"]))

    async def list_domains(self) -> list[Domain]:
        rows = await self._all("SELECT * FROM domains ORDER BY name", ())
        return [Domain(r["name"], r["created"], _meta(r["metadata"])) for r in rows]

    async def delete_domain(self, name: str) -> None:
        if not await self._write("DELETE FROM domains WHERE name = ?", (name,)):
            raise NotFound(f"no domain {name!r}")

    # clients
    @staticmethod
    def _client(row: sqlite3.Row) -> Client:
        return Client(
            row["id"],
            row["domain"],
            row["name"],
            bool(row["enabled"]),
            row["created"],
            _meta(row["metadata"]),
        )

    async def create_client(
        self, domain: str, client_id: str, name: str, secret_hash: str, metadata: dict[str, str]
    ) -> Client:
        await self.get_domain(domain)
        client = Client(client_id, domain, name, True, time.time(), metadata)
        try:
            await self._write(
                "INSERT INTO clients (id, domain, name, secret_hash, enabled, created, metadata)"
                " VALUES (?, ?, ?, ?, 1, ?, ?)",
                (client_id, domain, name, secret_hash, client.created, json.dumps(metadata)),
            )
        except Conflict:
            raise Conflict(f"a client named {name!r} exists in domain {domain!r}") from None
        return client

    async def get_client(self, domain: str, ref: str) -> Client:
        row = await self._one(
            "SELECT * FROM clients WHERE domain = ? AND (id = ? OR name = ?)"
            " ORDER BY id = ? DESC LIMIT 1",
            (domain, ref, ref, ref),
        )
        if row is None:
            raise NotFound(f"no client {ref!r} in domain {domain!r}")
        return self._client(row)

    async def list_clients(self, domain: str) -> list[Client]:
        await self.get_domain(domain)
        rows = await self._all("SELECT * FROM clients WHERE domain = ? ORDER BY name", (domain,))
        return [self._client(r) for r in rows]

    async def set_client_enabled(self, domain: str, client_id: str, enabled: bool) -> Client:
        client = await self.get_client(domain, client_id)
        await self._write("UPDATE clients SET enabled = ? WHERE id = ?", (int(enabled), client.id))
        return await self.get_client(domain, client.id)

    async def set_client_secret(self, domain: str, client_id: str, secret_hash: str) -> Client:
        client = await self.get_client(domain, client_id)
        await self._write(
            "UPDATE clients SET secret_hash = ? WHERE id = ?", (secret_hash, client.id)
        )
        return client

    async def delete_client(self, domain: str, client_id: str) -> None:
        client = await self.get_client(domain, client_id)
        await self._write("DELETE FROM clients WHERE id = ?", (client.id,))

    async def client_by_secret(self, secret_hash: str) -> Client | None:
        row = await self._one("SELECT * FROM clients WHERE secret_hash = ?", (secret_hash,))
        return self._client(row) if row else None

    async def client_by_id(self, client_id: str) -> Client | None:
        row = await self._one("SELECT * FROM clients WHERE id = ?", (client_id,))
        return self._client(row) if row else None

    # channels
    @staticmethod
    def _channel(row: sqlite3.Row) -> Channel:
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
                "INSERT INTO channels (id, domain, name, created, metadata) VALUES (?, ?, ?, ?, ?)",
                (channel_id, domain, name, channel.created, json.dumps(metadata)),
            )
        except Conflict:
            raise Conflict(f"channel {name!r} exists in domain {domain!r}") from None
        return channel

    async def get_channel(self, domain: str, ref: str) -> Channel:
        row = await self._one(
            "SELECT * FROM channels WHERE domain = ? AND (name = ? OR id = ?)"
            " ORDER BY name = ? DESC LIMIT 1",
            (domain, ref, ref, ref),
        )
        if row is None:
            raise NotFound(f"no channel {ref!r} in domain {domain!r}")
        return self._channel(row)

    async def list_channels(self, domain: str) -> list[Channel]:
        await self.get_domain(domain)
        rows = await self._all("SELECT * FROM channels WHERE domain = ? ORDER BY name", (domain,))
        return [self._channel(r) for r in rows]

    async def delete_channel(self, domain: str, name: str) -> None:
        channel = await self.get_channel(domain, name)
        await self._write("DELETE FROM channels WHERE id = ?", (channel.id,))

    # connections
    async def connect(
        self, domain: str, client_id: str, channel: str, publish: bool, subscribe: bool
    ) -> Connection:
        client = await self.get_client(domain, client_id)
        ch = await self.get_channel(domain, channel)
        await self._write(
            "INSERT INTO connections (client_id, channel_id, publish, subscribe)"
            " VALUES (?, ?, ?, ?)"
            " ON CONFLICT (client_id, channel_id) DO UPDATE"
            " SET publish = excluded.publish, subscribe = excluded.subscribe",
            (client.id, ch.id, int(publish), int(subscribe)),
        )
        return Connection(domain, client.id, ch.name, publish, subscribe)

    async def disconnect(self, domain: str, client_id: str, channel: str) -> None:
        client = await self.get_client(domain, client_id)
        ch = await self.get_channel(domain, channel)
        n = await self._write(
            "DELETE FROM connections WHERE client_id = ? AND channel_id = ?", (client.id, ch.id)
        )
        if not n:
            raise NotFound(f"client {client.id!r} is not connected to channel {ch.name!r}")

    async def list_connections(
        self, domain: str, client_id: str | None = None, channel: str | None = None
    ) -> list[Connection]:
        sql = (
            "SELECT k.client_id, ch.name AS channel, k.publish, k.subscribe FROM connections k"
            " JOIN channels ch ON ch.id = k.channel_id WHERE ch.domain = ?"
        )
        args: list[Any] = [domain]
        if client_id is not None:
            sql += " AND k.client_id = ?"
            args.append((await self.get_client(domain, client_id)).id)
        if channel is not None:
            sql += " AND ch.id = ?"
            args.append((await self.get_channel(domain, channel)).id)
        rows = await self._all(sql + " ORDER BY ch.name, k.client_id", args)
        return [
            Connection(
                domain, r["client_id"], r["channel"], bool(r["publish"]), bool(r["subscribe"])
            )
            for r in rows
        ]

    async def permissions(self, client_id: str, domain: str, channel: str) -> Connection | None:
        row = await self._one(
            "SELECT k.publish, k.subscribe FROM connections k"
            " JOIN channels ch ON ch.id = k.channel_id"
            " JOIN clients cl ON cl.id = k.client_id"
            " WHERE k.client_id = ? AND ch.domain = ? AND ch.name = ? AND cl.enabled = 1",
            (client_id, domain, channel),
        )
        if row is None:
            return None
        return Connection(domain, client_id, channel, bool(row["publish"]), bool(row["subscribe"]))

    # DTLS keys
    async def put_dtls_key(self, domain: str, ref: str, sealed: bytes) -> Client:
        client = await self.get_client(domain, ref)
        await self._write(
            "INSERT INTO dtls_keys (client_id, sealed, created) VALUES (?, ?, ?)"
            " ON CONFLICT (client_id) DO UPDATE"
            " SET sealed = excluded.sealed, created = excluded.created",
            (client.id, sealed, time.time()),
        )
        return client

    async def delete_dtls_key(self, domain: str, ref: str) -> Client:
        client = await self.get_client(domain, ref)
        if not await self._write("DELETE FROM dtls_keys WHERE client_id = ?", (client.id,)):
            raise NotFound(f"client {client.id!r} has no DTLS key")
        return client

    async def dtls_keys(self) -> list[DTLSKey]:
        rows = await self._all(
            "SELECT k.client_id, k.sealed, k.created, c.domain, c.enabled FROM dtls_keys k"
            " JOIN clients c ON c.id = k.client_id ORDER BY k.client_id",
            (),
        )
        return [
            DTLSKey(
                r["client_id"], r["domain"], bool(r["enabled"]), bytes(r["sealed"]), r["created"]
            )
            for r in rows
        ]

    # retained messages
    # certificates
    async def add_certificate(self, cert: IssuedCertificate) -> None:
        try:
            await self._write(
                "INSERT INTO certificates (serial, kind, common_name, domain, client_id,"
                " not_before, not_after, issued, revoked, pem)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    cert.serial, cert.kind, cert.common_name, cert.domain, cert.client_id,
                    cert.not_before, cert.not_after, cert.issued, cert.revoked, cert.pem,
                ),
            )  # fmt: skip
        except Conflict:
            raise Conflict(f"a certificate with serial {cert.serial} is recorded") from None

    async def get_certificate(self, serial: str) -> IssuedCertificate:
        row = await self._one("SELECT * FROM certificates WHERE serial = ?", (serial,))
        if row is None:
            raise NotFound(f"no certificate with serial {serial}")
        return IssuedCertificate(**dict(row))

    async def list_certificates(
        self, domain: str | None = None, client_id: str | None = None
    ) -> list[IssuedCertificate]:
        rows = await self._all(
            "SELECT * FROM certificates WHERE (?1 IS NULL OR domain = ?1)"
            " AND (?2 IS NULL OR client_id = ?2) ORDER BY issued, serial",
            (domain, client_id),
        )
        return [IssuedCertificate(**dict(r)) for r in rows]

    async def revoke_certificates(self, serials: list[str], when: float) -> list[str]:
        revoked = []
        for serial in serials:
            if await self._write(
                "UPDATE certificates SET revoked = ? WHERE serial = ? AND revoked IS NULL",
                (when, serial),
            ):
                revoked.append(serial)
        return revoked

    async def revoked_certificates(self, serials: Iterable[str] | None = None) -> dict[str, float]:
        if serials is None:
            rows = await self._all(
                "SELECT serial, revoked FROM certificates WHERE revoked IS NOT NULL", ()
            )
        else:
            wanted = list(serials)
            rows = await self._all(
                "SELECT serial, revoked FROM certificates WHERE revoked IS NOT NULL"
                " AND serial IN (SELECT value FROM json_each(?))",
                (json.dumps(wanted),),
            )
        return {r["serial"]: r["revoked"] for r in rows}

    # users
    @staticmethod
    def _user(row: sqlite3.Row) -> User:
        return User(
            row["id"], row["email"], row["name"], bool(row["enabled"]),
            bool(row["platform_admin"]), row["created"], row["last_login"],
        )  # fmt: skip

    async def create_user(self, user: User, password_hash: str | None) -> User:
        try:
            await self._write(
                "INSERT INTO users (id, email, name, password_hash, enabled, platform_admin,"
                " created) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (user.id, user.email, user.name, password_hash, int(user.enabled),
                 int(user.platform_admin), user.created),
            )  # fmt: skip
        except Conflict:
            raise Conflict(f"a user with email {user.email!r} exists") from None
        return user

    async def get_user(self, ref: str) -> User:
        row = await self._one(
            "SELECT * FROM users WHERE id = ? OR email = ? COLLATE NOCASE"
            " ORDER BY id = ? DESC LIMIT 1",
            (ref, ref, ref),
        )
        if row is None:
            raise NotFound(f"no user {ref!r}")
        return self._user(row)

    async def list_users(self) -> list[User]:
        return [self._user(r) for r in await self._all("SELECT * FROM users ORDER BY email", ())]

    async def user_password(self, email: str) -> tuple[User, str | None] | None:
        row = await self._one("SELECT * FROM users WHERE email = ? COLLATE NOCASE", (email,))
        return None if row is None else (self._user(row), row["password_hash"])

    async def set_user_enabled(self, ref: str, enabled: bool) -> User:
        user = await self.get_user(ref)
        await self._write("UPDATE users SET enabled = ? WHERE id = ?", (int(enabled), user.id))
        return await self.get_user(user.id)

    async def set_user_password(self, ref: str, password_hash: str | None) -> User:
        user = await self.get_user(ref)
        await self._write(
            "UPDATE users SET password_hash = ? WHERE id = ?", (password_hash, user.id)
        )
        return user

    async def set_last_login(self, user_id: str, when: float) -> None:
        await self._write("UPDATE users SET last_login = ? WHERE id = ?", (when, user_id))

    async def delete_user(self, ref: str) -> None:
        user = await self.get_user(ref)
        await self._write("DELETE FROM users WHERE id = ?", (user.id,))

    async def set_member(self, domain: str, user_ref: str, role: str) -> Member:
        await self.get_domain(domain)
        user = await self.get_user(user_ref)
        await self._write(
            "INSERT INTO members (user_id, domain, role) VALUES (?, ?, ?)"
            " ON CONFLICT (user_id, domain) DO UPDATE SET role = excluded.role",
            (user.id, domain, role),
        )
        return Member(user.id, domain, role)

    async def remove_member(self, domain: str, user_ref: str) -> None:
        user = await self.get_user(user_ref)
        if not await self._write(
            "DELETE FROM members WHERE user_id = ? AND domain = ?", (user.id, domain)
        ):
            raise NotFound(f"user {user.email!r} has no role in domain {domain!r}")

    async def list_members(self, domain: str) -> list[Member]:
        await self.get_domain(domain)
        rows = await self._all(
            "SELECT m.* FROM members m JOIN users u ON u.id = m.user_id WHERE m.domain = ?"
            " ORDER BY u.email",
            (domain,),
        )
        return [Member(r["user_id"], r["domain"], r["role"]) for r in rows]

    async def roles(self, user_id: str) -> dict[str, str]:
        rows = await self._all("SELECT domain, role FROM members WHERE user_id = ?", (user_id,))
        return {r["domain"]: r["role"] for r in rows}

    async def add_token_family(self, family: str, user_id: str, when: float) -> None:
        await self._write(
            "INSERT INTO token_families (id, user_id, created) VALUES (?, ?, ?)",
            (family, user_id, when),
        )
        await self._write("DELETE FROM refresh_tokens WHERE expires < ?", (when,))

    async def revoke_token_family(self, family: str, when: float) -> bool:
        return bool(
            await self._write(
                "UPDATE token_families SET revoked = ? WHERE id = ? AND revoked IS NULL",
                (when, family),
            )
        )

    async def revoke_user_token_families(self, user_id: str, when: float) -> None:
        await self._write(
            "UPDATE token_families SET revoked = ? WHERE user_id = ? AND revoked IS NULL",
            (when, user_id),
        )

    async def token_family_live(self, family: str) -> bool:
        row = await self._one(
            "SELECT 1 FROM token_families f JOIN users u ON u.id = f.user_id"
            " WHERE f.id = ? AND f.revoked IS NULL AND u.enabled",
            (family,),
        )
        return row is not None

    async def add_refresh_token(self, jti: str, family: str, expires: float) -> None:
        await self._write(
            "INSERT INTO refresh_tokens (jti, family, expires) VALUES (?, ?, ?)",
            (jti, family, expires),
        )

    async def use_refresh_token(self, jti: str, when: float) -> str:
        if await self._write(
            "UPDATE refresh_tokens SET used = ? WHERE jti = ? AND used IS NULL", (when, jti)
        ):
            return "fresh"
        row = await self._one("SELECT 1 FROM refresh_tokens WHERE jti = ?", (jti,))
        return "used" if row is not None else "unknown"

    # identity providers
    async def put_idp(
        self, domain: str, name: str, type_: str, config: dict[str, Any], create: bool
    ) -> None:
        await self.get_domain(domain)
        if create:
            try:
                await self._write(
                    "INSERT INTO idps (domain, name, type, config) VALUES (?, ?, ?, ?)",
                    (domain, name, type_, json.dumps(config)),
                )
            except Conflict:
                raise Conflict(f"domain {domain!r} has a provider {name!r}") from None
        elif not await self._write(
            "UPDATE idps SET type = ?, config = ? WHERE domain = ? AND name = ?",
            (type_, json.dumps(config), domain, name),
        ):
            raise NotFound(f"no provider {name!r} in domain {domain!r}")

    async def get_idp(self, domain: str, name: str) -> tuple[str, dict[str, Any]]:
        row = await self._one(
            "SELECT type, config FROM idps WHERE domain = ? AND name = ?", (domain, name)
        )
        if row is None:
            raise NotFound(f"no provider {name!r} in domain {domain!r}")
        return row["type"], json.loads(row["config"])

    async def list_idps(self, domain: str) -> list[tuple[str, str, dict[str, Any]]]:
        await self.get_domain(domain)
        rows = await self._all(
            "SELECT name, type, config FROM idps WHERE domain = ? ORDER BY name", (domain,)
        )
        return [(r["name"], r["type"], json.loads(r["config"])) for r in rows]

    async def delete_idp(self, domain: str, name: str) -> None:
        if not await self._write("DELETE FROM idps WHERE domain = ? AND name = ?", (domain, name)):
            raise NotFound(f"no provider {name!r} in domain {domain!r}")

    # revoked subjects
    async def revoke_subject(self, domain: str, client_id: str, when: float) -> None:
        await self.get_domain(domain)
        await self._write(
            "INSERT INTO revoked_subjects (domain, client_id, revoked) VALUES (?, ?, ?)"
            " ON CONFLICT (domain, client_id) DO UPDATE SET revoked = excluded.revoked",
            (domain, client_id, when),
        )

    async def subject_revocations(
        self, subjects: Iterable[tuple[str, str]]
    ) -> dict[tuple[str, str], float]:
        wanted = [list(s) for s in subjects]
        if not wanted:
            return {}
        rows = await self._all(
            "SELECT domain, client_id, revoked FROM revoked_subjects"
            " WHERE (domain, client_id) IN (SELECT value ->> 0, value ->> 1 FROM json_each(?))",
            (json.dumps(wanted),),
        )
        return {(r["domain"], r["client_id"]): r["revoked"] for r in rows}

    # signing keys
    async def add_signing_key(self, key: SigningKeyRecord) -> None:
        await self._write(
            "INSERT INTO signing_keys (kid, algorithm, created, retires, sealed)"
            " VALUES (?, ?, ?, ?, ?)",
            (key.kid, key.algorithm, key.created, key.retires, key.sealed),
        )

    async def signing_keys(self) -> list[SigningKeyRecord]:
        rows = await self._all("SELECT * FROM signing_keys ORDER BY created, kid", ())
        return [SigningKeyRecord(**dict(r)) for r in rows]

    async def retire_signing_keys(self, before: float, retires: float) -> None:
        await self._write(
            "UPDATE signing_keys SET retires = ? WHERE retires IS NULL AND created < ?",
            (retires, before),
        )

    async def delete_signing_keys(self, retired_before: float) -> None:
        await self._write("DELETE FROM signing_keys WHERE retires < ?", (retired_before,))

    async def put_retained(self, domain: str, channel: str, subtopic: str, data: bytes) -> None:
        if data:
            await self._write(
                "INSERT INTO retained (domain, channel, subtopic, message) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (domain, channel, subtopic) DO UPDATE SET message = excluded.message",
                (domain, channel, subtopic, data),
            )
        else:
            await self._write(
                "DELETE FROM retained WHERE domain = ? AND channel = ? AND subtopic = ?",
                (domain, channel, subtopic),
            )

    async def retained(self, domain: str, channel: str) -> list[bytes]:
        rows = await self._all(
            "SELECT message FROM retained WHERE domain = ? AND channel = ? ORDER BY subtopic",
            (domain, channel),
        )
        return [bytes(r["message"]) for r in rows]


class SQLiteSessions(Buffered):
    """:class:`~core.sessions.SessionStore` in the store's SQLite file (tables ``sessions`` and
    ``session_messages``), on a connection of its own so that a batch is one transaction of
    its own. Opened by :meth:`load`."""

    def __init__(self, path: str, node: str = "") -> None:
        super().__init__(node)
        self.path = path
        self._db: aiosqlite.Connection | None = None

    async def _connection(self) -> aiosqlite.Connection:
        if self._db is None:
            db = await aiosqlite.connect(self.path, isolation_level=None)
            await db.execute("PRAGMA busy_timeout=5000")
            await db.execute("PRAGMA synchronous=NORMAL")
            self._db = db
        return self._db

    async def load(self, every: bool = False) -> list[StoredSession]:
        db = await self._connection()
        claim = "UPDATE sessions SET owner = ?" + ("" if every else " WHERE owner = ''")
        async with _transaction(db, "BEGIN IMMEDIATE"):
            await db.execute(claim, (self.node,))
            async with db.execute(
                "SELECT key, state FROM sessions WHERE owner = ?", (self.node,)
            ) as cur:
                sessions = list(await cur.fetchall())
            async with db.execute(
                "SELECT m.session, m.seq, m.data FROM session_messages m"
                " JOIN sessions s ON s.key = m.session WHERE s.owner = ?"
                " ORDER BY m.session, m.seq",
                (self.node,),
            ) as cur:
                rows = list(await cur.fetchall())
        messages: dict[str, list[tuple[int, bytes]]] = {}
        for key, seq, data in rows:
            messages.setdefault(key, []).append((seq, data))
        return [StoredSession(key, state, messages.get(key, [])) for key, state in sessions]

    async def holder(self, key: str) -> str | None:
        db = await self._connection()
        async with db.execute("SELECT owner FROM sessions WHERE key = ?", (key,)) as cur:
            row = await cur.fetchone()
        return None if row is None else str(row[0])

    async def take(self, key: str) -> StoredSession | None:
        db = await self._connection()
        async with _transaction(db, "BEGIN IMMEDIATE"):
            await db.execute("UPDATE sessions SET owner = ? WHERE key = ?", (self.node, key))
            async with db.execute("SELECT state FROM sessions WHERE key = ?", (key,)) as cur:
                row = await cur.fetchone()
            async with db.execute(
                "SELECT seq, data FROM session_messages WHERE session = ? ORDER BY seq", (key,)
            ) as cur:
                rows = list(await cur.fetchall())
        if row is None:
            return None
        return StoredSession(key, row[0], [(seq, data) for seq, data in rows])

    async def _write(self, batch: Batch) -> None:
        db = self._db
        if db is None:
            raise UnavailableError("sessions: not loaded")
        node = self.node
        puts = [(k, s, d) for (k, s), d in batch.messages.items() if d is not None]
        deletes = [(k, s) for (k, s), d in batch.messages.items() if d is None]
        async with _transaction(db, "BEGIN"):
            if batch.deleted:
                # Only what this node holds (or nobody): a session another node took is its.
                await db.executemany(
                    "DELETE FROM sessions WHERE key = ? AND owner IN (?, '')",
                    [(key, node) for key in batch.deleted],
                )
                await db.executemany(
                    "DELETE FROM session_messages WHERE session = ?"
                    " AND NOT EXISTS (SELECT 1 FROM sessions WHERE key = ?)",
                    [(key, key) for key in batch.deleted],
                )
            if batch.sessions:
                await db.executemany(
                    "INSERT INTO sessions (key, state, owner) VALUES (?, ?, ?)"
                    " ON CONFLICT (key) DO UPDATE"
                    " SET state = excluded.state, owner = excluded.owner"
                    " WHERE sessions.owner IN (excluded.owner, '')",
                    [(key, state, node) for key, state in batch.sessions.items()],
                )
            if puts:
                await db.executemany(
                    "INSERT INTO session_messages (session, seq, data) VALUES (?, ?, ?)"
                    " ON CONFLICT (session, seq) DO UPDATE SET data = excluded.data",
                    puts,
                )
            if deletes:
                await db.executemany(
                    "DELETE FROM session_messages WHERE session = ? AND seq = ?", deletes
                )
            if batch.handed:
                await db.executemany(
                    "UPDATE sessions SET owner = ? WHERE key = ? AND owner = ?",
                    [(to, key, node) for key, to in batch.handed.items()],
                )

    async def close(self) -> None:
        await super().close()
        if self._db is not None:
            await self._db.close()
            self._db = None


@contextlib.asynccontextmanager
async def _transaction(db: aiosqlite.Connection, begin: str) -> AsyncIterator[None]:
    """``begin`` (``BEGIN`` or ``BEGIN IMMEDIATE``, which takes the write lock at once), then
    COMMIT, or ROLLBACK when anything fails, COMMIT included."""
    await db.execute(begin)
    try:
        yield
        await db.execute("COMMIT")
    except BaseException:
        await db.execute("ROLLBACK")
        raise
