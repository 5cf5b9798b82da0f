"""The provider of Conduit's broker tokens (:mod:`core.tokens`): a bearer token on any
protocol, whose identity and rights are in the token itself. A token that does not claim this
gateway as its issuer is not its to judge: no opinion, the next provider is asked.

Verified identities are cached under a digest of the token (BLAKE2s; never the token itself)
for at most ``ttl`` seconds and never past the token's expiry, so that a device that sends its
token with every HTTP request pays one signature check per ``ttl``, not one per request. The
first use of a token also asks the store whether its subject was revoked after the token was
issued (a domain admin's revocation, :meth:`core.store.Store.revoke_subject`); a revocation is
announced, which clears the cache.
"""

from __future__ import annotations

import hashlib
import time

from core.auth import Expiring
from core.credentials import Credentials, Kind
from core.errors import AuthenticationError
from core.identity import Identity
from core.store import Store
from core.tokens import Tokens


def _cache_key(token: str) -> bytes:
    return hashlib.blake2s(token.encode()).digest()


class BrokerTokens:
    """Broker tokens signed by this gateway's keys."""

    kinds: frozenset[Kind] = frozenset({"token"})

    def __init__(
        self, tokens: Tokens, store: Store | None = None, ttl: float = 30.0, maxsize: int = 100_000
    ) -> None:
        self.tokens = tokens
        self.store = store
        self._identities: Expiring[bytes, Identity] = Expiring(maxsize, ttl)

    def invalidate(self) -> None:
        self._identities.clear()

    def identify_cached(self, credentials: Credentials, kind: Kind) -> Identity | None:
        token = credentials.token
        assert token is not None
        key = _cache_key(token)
        cached = self._identities.get(key)
        if cached is not None:
            return _unexpired(cached[0])
        return None  # the first use: identify() verifies it and asks the store

    async def identify(self, credentials: Credentials, kind: Kind) -> Identity | None:
        token = credentials.token
        assert token is not None
        if not self.tokens.issued_here(token):
            return None
        claims = await self.tokens.verify(token, "broker")
        identity = self.tokens.broker_identity(claims)
        if self.store is not None:
            await check_not_revoked(self.store, identity)
        return self._keep(_cache_key(token), identity)

    def _keep(self, key: bytes, identity: Identity) -> Identity:
        self._identities.put(key, identity)
        return identity


async def check_not_revoked(store: Store, identity: Identity) -> None:
    """AuthenticationError when the identity's subject was revoked after its token was issued."""
    found = await store.subject_revocations([(identity.domain, identity.client_id)])
    revoked = found.get((identity.domain, identity.client_id))
    if revoked is not None and (identity.issued or 0.0) <= revoked:
        raise AuthenticationError("the token's subject was revoked")


def _unexpired(identity: Identity) -> Identity:
    if identity.expires is not None and identity.expires <= time.time():
        raise AuthenticationError("the token has expired")
    return identity
