"""Provisioning: domains, clients, channels and connections, as the REST API and CLI see them.

It checks names, makes ids and secrets, writes through the store and announces every change on
the bus (:class:`~core.bus.Change`), so that every node drops cached credentials and cuts off
connections and subscriptions that lost their right: this node before the call returns.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable

from core.auth.secrets import hash_secret, new_secret
from core.bus import Change
from core.store import Channel, Client, Connection, Domain, Store, StoreError
from core.topics import NAME_RE


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


class Provisioning:
    def __init__(self, store: Store, announce: Callable[[Change], Awaitable[None]]) -> None:
        self.store = store
        self._announce = announce

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
