"""Who is speaking, and what may they do: the authenticator and the authorizer.

The :class:`Authenticator` is a chain of :class:`Provider` s, each for the kinds of credential
it understands (:mod:`core.credentials`): stored client secrets (:mod:`core.auth.secrets`),
client certificates (:mod:`core.auth.certificates`), DTLS pre-shared keys
(:mod:`core.auth.psk`) and Conduit's broker tokens (:mod:`core.auth.tokens`); external identity
providers join the chain in their own module. For each credential presented, the providers that
understand its kind are asked in order; the first with an opinion answers (an identity, or a
refusal); none with an opinion is bad credentials. Where a request carries two credentials (a
certificate and a secret), they
must name the same client, or it is refused as bad credentials.

The :class:`Authorizer` checks rights: an identity's own topic rules without a store call, or
the store's connections through a cache with a TTL that every provisioning change clears at
once, so a revoked client is cut off immediately on this node and within the TTL on any other.

The composition root builds both (:func:`store_auth` for the embedded chain) and hands them to
the gateway.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Generic, Literal, Protocol, TypeVar

from core.credentials import Credentials, Kind
from core.errors import AuthenticationError, AuthorizationError, Condition
from core.identity import Action, Identity, Rules
from core.store import Store
from core.topics import Topic, TopicFilter

if TYPE_CHECKING:
    from core.tokens import Tokens

K = TypeVar("K")
V = TypeVar("V")


class Expiring(Generic[K, V]):
    """A dict whose entries expire ``ttl`` seconds after they were put.

    On the per-request path a lookup here costs about 0.1 us against 1.2 us for
    ``cachetools.TTLCache.get`` (measured with timeit on this machine); it runs twice per
    HTTP publish. Past ``maxsize`` entries the whole cache is dropped: a refill costs one store
    query per active client, and no eviction bookkeeping is paid per lookup.
    """

    __slots__ = ("_data", "maxsize", "ttl")

    def __init__(self, maxsize: int, ttl: float) -> None:
        self.maxsize = maxsize
        self.ttl = ttl
        self._data: dict[K, tuple[V, float]] = {}

    def get(self, key: K) -> tuple[V] | None:
        """``(value,)`` while fresh, else None (a cached None stays distinguishable)."""
        entry = self._data.get(key)
        if entry is None or entry[1] < time.monotonic():
            return None
        return (entry[0],)

    def put(self, key: K, value: V) -> None:
        if len(self._data) >= self.maxsize:
            self._data.clear()
        self._data[key] = (value, time.monotonic() + self.ttl)

    def clear(self) -> None:
        self._data.clear()


class Provider(Protocol):
    """One source of identities, for the credential kinds it understands.

    Both methods answer for one credential of one of the provider's ``kinds``: an identity, a
    refusal (raise :class:`~core.errors.AuthenticationError`), or None for no opinion (not a
    credential this provider issued: the next provider is asked)."""

    kinds: frozenset[Kind]

    def identify_cached(self, credentials: Credentials, kind: Kind) -> Identity | None:
        """The answer when it is known without waiting; None when only :meth:`identify` can
        tell (or there is no opinion)."""

    async def identify(self, credentials: Credentials, kind: Kind) -> Identity | None: ...

    def invalidate(self) -> None:
        """Forget what is cached (any provisioning change)."""


class Authenticator:
    """Resolves credentials to one identity through its chain of providers."""

    def __init__(self, providers: Sequence[Provider]) -> None:
        self.providers: tuple[Provider, ...] = ()
        self._by_kind: dict[Kind, tuple[Provider, ...]] = {}
        for provider in providers:
            self.add(provider)

    def add(self, provider: Provider) -> None:
        """Append a provider to the chain."""
        self.providers = (*self.providers, provider)
        self._by_kind = {
            kind: tuple(p for p in self.providers if kind in p.kinds)
            for kind in ("secret", "token", "certificate", "psk")
        }

    def invalidate(self) -> None:
        for provider in self.providers:
            provider.invalidate()

    def authenticate_cached(self, credentials: Credentials) -> Identity | None:
        """The fast path of :meth:`authenticate`, for the common case of one secret or one
        token: the identity when the answer is known at once (raising when it is a refusal);
        None when only :meth:`authenticate` can tell."""
        if credentials.certificate is not None or credentials.psk_client is not None:
            return None
        kind: Kind
        if credentials.secret is not None and credentials.token is None:
            kind = "secret"
        elif credentials.token is not None and credentials.secret is None:
            kind = "token"
        else:
            return None
        for provider in self._by_kind[kind]:
            found = provider.identify_cached(credentials, kind)
            if found is not None:
                return _claimed(credentials, found)
        return None

    async def authenticate(self, credentials: Credentials) -> Identity:
        kinds = credentials.kinds
        if not kinds:
            raise AuthenticationError("no credentials", Condition.NO_CREDENTIALS)
        found: list[Identity] = []
        for kind in kinds:
            found.append(await self._identify(credentials, kind))
        first = found[0]
        for other in found[1:]:
            if (other.domain, other.client_id) != (first.domain, first.client_id):
                raise AuthenticationError(
                    f"the {kinds[0]} and the {kinds[found.index(other)]} name different clients"
                )
        # Of credentials that agree, the narrowest rights: a token's rules and expiry.
        chosen = next((i for i in found if i.rules is not None or i.expires), first)
        return _claimed(credentials, chosen)

    async def _identify(self, credentials: Credentials, kind: Kind) -> Identity:
        for provider in self._by_kind[kind]:
            identity = provider.identify_cached(credentials, kind)
            if identity is None:
                identity = await provider.identify(credentials, kind)
            if identity is not None:
                return identity
        if not self._by_kind[kind]:
            raise AuthenticationError(f"{_PLURAL[kind]} are not accepted by this gateway")
        raise AuthenticationError(f"no identity provider of this gateway knows this {kind}")


_PLURAL: dict[Kind, str] = {
    "secret": "client secrets",
    "token": "bearer tokens",
    "certificate": "client certificates",
    "psk": "DTLS pre-shared keys",
}


def _claimed(credentials: Credentials, identity: Identity) -> Identity:
    """The identity, if the client id the client claims (MQTT user name, Basic user) is its."""
    if credentials.client_id is not None and credentials.client_id != identity.client_id:
        what = "secret" if credentials.secret is not None else "token"
        raise AuthenticationError(f"client id does not match the {what}")
    return identity


class Authorizer:
    """Checks an identity's right to publish to a topic or subscribe to a filter."""

    def __init__(self, store: Store, ttl: float = 30.0, maxsize: int = 100_000) -> None:
        self.store = store
        self._rights: Expiring[tuple[str, str, str], tuple[bool, bool]] = Expiring(maxsize, ttl)

    def invalidate(self) -> None:
        """Forget every cached answer (any provisioning change)."""
        self._rights.clear()

    def authorize_cached(
        self, identity: Identity, target: Topic | TopicFilter, action: Action
    ) -> bool:
        """True when the right is known and granted; raises when it is known and refused;
        False when only :meth:`authorize` can tell (a store lookup not cached)."""
        if identity.domain != target.domain:
            raise AuthorizationError(f"client is not in domain {target.domain!r}")
        if identity.expires is not None and identity.expires <= time.time():
            raise AuthorizationError("credentials expired")
        if identity.rules is not None:
            _check_rules(identity.rules, target, action)
            return True
        cached = self._rights.get((identity.client_id, target.domain, target.channel))
        if cached is None:
            return False
        if not cached[0][0 if action == "publish" else 1]:
            raise AuthorizationError(f"client may not {action} on channel {target.channel!r}")
        return True

    async def authorize(
        self, identity: Identity, target: Topic | TopicFilter, action: Action
    ) -> None:
        if self.authorize_cached(identity, target, action):
            return
        key = (identity.client_id, target.domain, target.channel)
        conn = await self.store.permissions(*key)
        rights = (conn.publish, conn.subscribe) if conn else (False, False)
        self._rights.put(key, rights)
        if not rights[0 if action == "publish" else 1]:
            raise AuthorizationError(f"client may not {action} on channel {target.channel!r}")


def _check_rules(rules: Rules, target: Topic | TopicFilter, action: Action) -> None:
    """Rights an identity carries (no store call)."""
    if action == "publish":
        if isinstance(target, Topic) and rules.allows_publish(target):
            return
    else:
        wanted = (
            target
            if isinstance(target, TopicFilter)
            else TopicFilter(target.domain, target.channel, _levels(target.subtopic))
        )
        if rules.allows_subscribe(wanted):
            return
    raise AuthorizationError(f"the credentials' rules do not allow to {action} on {target}")


def _levels(subtopic: str) -> tuple[str, ...]:
    return tuple(subtopic.split("/")) if subtopic else ()


def store_auth(
    store: Store,
    ttl: float = 30.0,
    certificates: Literal["client_id", "secret"] | None = None,
    tokens: Tokens | None = None,
) -> tuple[Authenticator, Authorizer]:
    """The embedded chain: client secrets in the store, the clients whose DTLS keys a
    handshake proved; with ``certificates`` (the ``mtls_identity`` mode), client certificates
    naming stored clients; with ``tokens``, Conduit's broker tokens. Rights from the store's
    connections, or a token's rules."""
    from core.auth.psk import PreSharedKeys
    from core.auth.secrets import StoredSecrets

    providers: list[Provider] = [StoredSecrets(store, ttl), PreSharedKeys(store, ttl)]
    if certificates is not None:
        from core.auth.certificates import Certificates

        providers.append(Certificates(store, certificates, ttl))
    if tokens is not None:
        from core.auth.tokens import BrokerTokens

        providers.append(BrokerTokens(tokens, store, ttl))
    return Authenticator(providers), Authorizer(store, ttl)
