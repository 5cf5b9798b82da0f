"""Provisioning: domains, clients, channels, connections and DTLS keys, as the REST API and CLI
see them.

It checks names, makes ids, secrets and DTLS keys, writes through the store and announces every
change on the bus (:class:`~core.bus.Change`), so that every node drops cached credentials and
cuts off connections, subscriptions and DTLS sessions that lost their right: this node before
the call returns.

DTLS keys (CoAP over DTLS, pre-shared keys). tinydtls, the DTLS stack under aiocoap, takes a PSK
identity of at most 32 bytes and a key of at most 16 bytes (AES-128; DTLSSocket copies a longer
key over a 16-byte buffer and the process crashes). So the identity is the client id without its
dashes (a UUID's 32 hex digits, :func:`psk_identity`) and the key is 16 URL-safe characters
(96 random bits, :func:`new_dtls_key`), printable so that any client takes it as a string
(``coap-client -k``). The store keeps it sealed (:mod:`core.sealing`), bound to its client.
"""

from __future__ import annotations

import secrets
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from core.auth.secrets import hash_secret, new_secret
from core.bus import Change
from core.sealing import SealError, SealingKey
from core.store import Channel, Client, Connection, Domain, Store, StoreError
from core.topics import NAME_RE

PSK_IDENTITY_MAX = 32  # bytes of a PSK identity tinydtls accepts
PSK_KEY_MAX = 16  # bytes of a PSK tinydtls accepts (DTLS_PSK_MAX_KEY_LEN)


class InvalidRequest(StoreError):
    """A provisioning request with a bad name or argument."""


def _check_name(kind: str, name: str) -> None:
    if not NAME_RE.fullmatch(name):
        raise InvalidRequest(
            f"{kind} name {name!r} must be 1-64 characters of letters, digits, '-' and '_',"
            " starting with a letter or digit"
        )


def _check_client_name(name: str) -> None:
    """Client names are free text for people, unique in their domain (the store checks that):
    printable, without white space around them, so that no two look alike in a listing or a
    log and a name is typed as it is shown."""
    if not 0 < len(name) <= 256:
        raise InvalidRequest("client name must be 1-256 characters")
    if not name.isprintable() or name != name.strip():
        raise InvalidRequest(
            "client name must be printable characters (no control characters, line breaks or"
            " white space at either end)"
        )


def psk_identity(client_id: str) -> str:
    """The PSK identity of a client over DTLS: its id without dashes."""
    return client_id.replace("-", "")


def new_dtls_key() -> str:
    """A fresh DTLS pre-shared key: 96 random bits as 16 URL-safe characters."""
    return secrets.token_urlsafe(12)


def _dtls_context(client_id: str) -> str:
    """What a sealed DTLS key is bound to: its purpose and its client."""
    return f"dtls-psk:{client_id}"


@dataclass(frozen=True, slots=True)
class DTLSKeyGrant:
    """A DTLS key as its client gets it, once: the PSK identity and the key."""

    client: Client
    identity: str
    key: str


@dataclass(frozen=True, slots=True)
class PreSharedKey:
    """An opened DTLS key, for the DTLS listener: whose it is, the key, and whether its client
    is enabled."""

    client_id: str
    key: bytes
    enabled: bool


class Provisioning:
    def __init__(
        self,
        store: Store,
        announce: Callable[[Change], Awaitable[None]],
        sealing: SealingKey | None = None,
    ) -> None:
        self.store = store
        self._announce = announce
        self._sealing = sealing

    # domains
    async def create_domain(self, name: str, metadata: dict[str, str] | None = None) -> Domain:
        _check_name("domain", name)
        return await self.store.create_domain(name, metadata or {})

    async def get_domain(self, name: str) -> Domain:
        return await self.store.get_domain(name)

    async def list_domains(self) -> list[Domain]:
        return await self.store.list_domains()

    async def delete_domain(self, name: str) -> None:
        await self.store.delete_domain(name)
        await self._announce(Change("domain", name))

    # clients
    async def create_client(
        self, domain: str, name: str, metadata: dict[str, str] | None = None
    ) -> tuple[Client, str]:
        """Create a client; returns it with its secret, which is not kept and never shown again."""
        _check_client_name(name)
        secret = new_secret()
        client = await self.store.create_client(
            domain, str(uuid.uuid4()), name, hash_secret(secret), metadata or {}
        )
        return client, secret

    async def get_client(self, domain: str, ref: str) -> Client:
        return await self.store.get_client(domain, ref)

    async def list_clients(self, domain: str) -> list[Client]:
        return await self.store.list_clients(domain)

    async def set_client_enabled(self, domain: str, ref: str, enabled: bool) -> Client:
        client = await self.store.set_client_enabled(domain, ref, enabled)
        await self._announce(Change("client", domain, client.id))
        return client

    async def rotate_secret(self, domain: str, ref: str) -> tuple[Client, str]:
        secret = new_secret()
        client = await self.store.set_client_secret(domain, ref, hash_secret(secret))
        await self._announce(Change("client", domain, client.id))
        return client, secret

    async def delete_client(self, domain: str, ref: str) -> None:
        await self.store.delete_client(domain, ref)
        await self._announce(Change("client", domain, ref))

    # DTLS keys
    async def create_dtls_key(self, domain: str, ref: str) -> DTLSKeyGrant:
        """Give a client a new DTLS key, replacing any it had (its DTLS sessions end); the key
        is shown this once."""
        sealing = self._sealing_key()
        client = await self.store.get_client(domain, ref)
        identity = psk_identity(client.id)
        if len(identity.encode()) > PSK_IDENTITY_MAX:
            raise InvalidRequest(
                f"client id {client.id!r} is too long for a DTLS PSK identity"
                f" (at most {PSK_IDENTITY_MAX} bytes without dashes)"
            )
        key = new_dtls_key()
        sealed = sealing.seal(key.encode(), _dtls_context(client.id))
        client = await self.store.put_dtls_key(domain, client.id, sealed)
        await self._announce(Change("dtls_key", domain, client.id))
        return DTLSKeyGrant(client, identity, key)

    async def revoke_dtls_key(self, domain: str, ref: str) -> Client:
        """Remove a client's DTLS key: handshakes with it fail, its DTLS sessions end."""
        client = await self.store.delete_dtls_key(domain, ref)
        await self._announce(Change("dtls_key", domain, client.id))
        return client

    async def dtls_keys(self) -> tuple[dict[str, PreSharedKey], list[str]]:
        """Every client's DTLS key opened, by PSK identity; and a line for each key that
        could not be opened (left out: its client cannot do a handshake)."""
        sealing = self._sealing_key()
        keys: dict[str, PreSharedKey] = {}
        failed: list[str] = []
        for stored in await self.store.dtls_keys():
            try:
                key = sealing.open(stored.sealed, _dtls_context(stored.client_id))
            except SealError as exc:
                failed.append(f"the DTLS key of client {stored.client_id} cannot be opened: {exc}")
                continue
            if len(key) > PSK_KEY_MAX:  # never handed to tinydtls: see the module docstring
                failed.append(f"the DTLS key of client {stored.client_id} is too long")
                continue
            keys[psk_identity(stored.client_id)] = PreSharedKey(
                stored.client_id, key, stored.enabled
            )
        return keys, failed

    def _sealing_key(self) -> SealingKey:
        if self._sealing is None:
            raise InvalidRequest("DTLS keys need an encryption key (encryption_key)")
        return self._sealing

    # channels
    async def create_channel(
        self, domain: str, name: str, metadata: dict[str, str] | None = None
    ) -> Channel:
        _check_name("channel", name)
        return await self.store.create_channel(domain, str(uuid.uuid4()), name, metadata or {})

    async def get_channel(self, domain: str, ref: str) -> Channel:
        return await self.store.get_channel(domain, ref)

    async def list_channels(self, domain: str) -> list[Channel]:
        return await self.store.list_channels(domain)

    async def delete_channel(self, domain: str, ref: str) -> None:
        await self.store.delete_channel(domain, ref)
        await self._announce(Change("channel", domain, ref))

    # connections
    async def connect(
        self, domain: str, client: str, channel: str, publish: bool, subscribe: bool
    ) -> Connection:
        if not (publish or subscribe):
            raise InvalidRequest("a connection needs publish, subscribe or both")
        conn = await self.store.connect(domain, client, channel, publish, subscribe)
        await self._announce(Change("connection", domain, f"{conn.client_id}/{conn.channel}"))
        return conn

    async def disconnect(self, domain: str, client: str, channel: str) -> None:
        await self.store.disconnect(domain, client, channel)
        await self._announce(Change("connection", domain, f"{client}/{channel}"))

    async def list_connections(
        self, domain: str, client: str | None = None, channel: str | None = None
    ) -> list[Connection]:
        return await self.store.list_connections(domain, client, channel)
