"""The provider of DTLS pre-shared keys (CoAP over DTLS): the client whose key the handshake
proved.

The DTLS layer has checked the key before any of this runs (the adapter's key table holds every
client's key, opened from the store); this provider only checks that the client still exists
and is enabled, as for any credential. Answers are cached with a TTL under the client id; every
provisioning change clears them.
"""

from __future__ import annotations

from core.auth import Expiring
from core.auth.secrets import client_identity
from core.credentials import Credentials, Kind
from core.errors import AuthenticationError
from core.identity import Identity
from core.store import Store


class PreSharedKeys:
    """Clients authenticated by their DTLS pre-shared key."""

    kinds: frozenset[Kind] = frozenset({"psk"})

    def __init__(self, store: Store, ttl: float = 30.0, maxsize: int = 100_000) -> None:
        self.store = store
        self._identities: Expiring[str, Identity | None] = Expiring(maxsize, ttl)

    def invalidate(self) -> None:
        self._identities.clear()

    def identify_cached(self, credentials: Credentials, kind: Kind) -> Identity | None:
        assert credentials.psk_client is not None
        cached = self._identities.get(credentials.psk_client)
        if cached is None:
            return None
        return _found(cached[0])

    async def identify(self, credentials: Credentials, kind: Kind) -> Identity | None:
        client_id = credentials.psk_client
        assert client_id is not None
        found = client_identity(await self.store.client_by_id(client_id))
        self._identities.put(client_id, found)
        return _found(found)


def _found(identity: Identity | None) -> Identity:
    if identity is None:
        raise AuthenticationError("the DTLS key's client is unknown or disabled")
    return identity
