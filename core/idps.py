"""External identity providers of a domain: the apps' own sign-in (Supabase, Firebase, Auth0,
any OpenID Connect issuer), whose tokens are exchanged for Conduit's broker tokens.

A provider is registered per domain with its type and what the type needs; Conduit derives the
rest (:func:`derive`): the issuer, the audience, where the keys are, the algorithms. Any derived
value can be overridden. The algorithms are pinned per provider, never taken from a token.

Keys are fetched with aiohttp (:class:`Keys`): kept as long as the answer's cache headers say
(within bounds), fetched again for an unknown ``kid`` at most once per :data:`REFETCH_EVERY`
seconds per provider (an attacker's stream of unknown key ids must not become a request storm),
kept and used while the endpoint is down, with a timeout and a size limit. Key and discovery
URLs must be https, except loopback addresses (development, tests) unless a setting allows
plain http. A provider that cannot be reached and has no key yet is unavailable (503), not a
bad token (401).

Supabase's legacy shared secret (``jwt_secret``, HS256) is the one symmetric option: given
explicitly, only for type supabase, never beside asymmetric algorithms (an HS256 token keyed by
a public key is the algorithm confusion attack). It is kept sealed (:mod:`core.sealing`, bound
to the domain and the provider's name, :func:`stored`) and never shown; a provider with it
fetches no keys.

Claims become rights through the provider's ordered rules (:func:`rights`): the first rule whose
conditions hold grants its topic filters, with placeholders filled from the claims (``{sub}``,
``{email}``, ``{claim:org_id}``). A claim value that would change a filter's meaning (``/``,
``+``, ``#``, empty, control characters) makes the rule not apply: it never widens a filter.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import jwt
import orjson
from cryptography import x509

from core.bus import Change
from core.errors import AuthenticationError, AuthorizationError, UnavailableError
from core.identity import Identity, Rules
from core.limits import RateLimiter
from core.sealing import SealError, SealingKey
from core.store import NotFound, Store
from core.tokens import Tokens, unverified
from core.topics import parse_filter

TYPES = ("supabase", "firebase", "auth0", "oidc")
ASYMMETRIC = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512",
              "EdDSA")  # fmt: skip
SYMMETRIC = ("HS256",)  # with a supabase provider's jwt_secret only
SECRET, SEALED = "jwt_secret", "jwt_secret_sealed"  # as given; as stored
MIN_SECRET = 32  # characters of a jwt_secret (Supabase's have 40 or more)
FIREBASE_KEYS = (
    "https://www.googleapis.com/robot/v1/metadata/x509/securetoken@system.gserviceaccount.com"
)
LEEWAY = 30  # seconds of clock difference forgiven on exp, nbf and iat
REFETCH_EVERY = 30.0  # seconds between two fetches for unknown key ids, per provider
MIN_CACHE, MAX_CACHE, DEFAULT_CACHE = 60.0, 86400.0, 3600.0  # seconds keys are kept
FETCH_TIMEOUT = 5.0
ORIGINS_TTL = 30.0  # seconds the allowed CORS origins are kept before being read again
PROVIDERS_TTL = 30.0  # seconds a provider is kept; a change of it is heard at once
MAX_PROVIDERS = 10_000  # providers kept; past it the cache starts again
MAX_DOCUMENT = 1 << 20  # bytes of a key set or discovery document
_PLACEHOLDER = re.compile(r"\{(sub|email|claim:[A-Za-z0-9_.-]+)\}")
_MAX_AGE = re.compile(r"max-age=(\d+)")


class ProviderError(ValueError):
    """A provider definition Conduit cannot use; the message says why."""


class SessionEnded(AuthenticationError):
    """Credentials refreshed past the provider's ``max_session``: exchange a new token."""


class NotRegistered(LookupError):
    """No such domain (``what`` = ``domain``), or no such provider in it (``provider``)."""

    def __init__(self, what: str, message: str) -> None:
        super().__init__(message)
        self.what = what


@dataclass(frozen=True, slots=True)
class Rule:
    when: dict[str, Any]
    publish: tuple[str, ...] = ()
    subscribe: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class IdentityProvider:
    """A registered provider, its derived values resolved."""

    domain: str
    name: str
    type: str
    enabled: bool
    issuer: str
    audience: str
    keys_url: str | None  # a JWKS, or Google's X.509 document (firebase); None: discovery
    algorithms: tuple[str, ...]
    rules: tuple[Rule, ...]
    ttl: int = 3600
    max_ttl: int = 86400
    max_session: int = 7 * 86400  # seconds credentials may be refreshed after the exchange
    config: dict[str, Any] = field(default_factory=dict)  # as registered
    sealed_secret: bytes | None = field(default=None, repr=False)  # supabase's jwt_secret

    def shown(self) -> dict[str, Any]:
        """What the management API shows: what was given and what was derived (of a
        ``jwt_secret``, only that it is set)."""
        secret = {} if self.sealed_secret is None else {SECRET: "set"}
        return {
            "domain": self.domain, "name": self.name, "type": self.type,
            "enabled": self.enabled, "issuer": self.issuer, "audience": self.audience,
            "keys_url": self.keys_url, "algorithms": list(self.algorithms), **secret,
            "ttl": self.ttl, "max_ttl": self.max_ttl, "max_session": self.max_session,
            "cors_origins": list(self.config.get("cors_origins", [])),
            "rules": [{"when": r.when, "publish": list(r.publish),
                       "subscribe": list(r.subscribe)} for r in self.rules],
        }  # fmt: skip


def _text(config: dict[str, Any], name: str, what: str) -> str:
    value = config.get(name)
    if not isinstance(value, str) or not value:
        raise ProviderError(f"type {what} needs {name!r} (a string)")
    return value


def check_url(url: str, allow_http: bool = False) -> str:
    """A key or discovery URL: https, or http on a loopback address (or with ``allow_http``)."""
    parts = urlsplit(url)
    if parts.scheme == "https" and parts.hostname:
        return url
    if parts.scheme == "http" and parts.hostname:
        if allow_http or parts.hostname == "localhost":
            return url
        try:
            if ipaddress.ip_address(parts.hostname).is_loopback:
                return url
        except ValueError:
            pass
    raise ProviderError(f"{url!r} is not an https URL (plain http only on a loopback address)")


def derive(
    domain: str, name: str, type_: str, config: dict[str, Any], allow_http: bool = False
) -> IdentityProvider:
    """A provider from its registration: what its type needs, overrides, rules and lifetimes."""
    if type_ not in TYPES:
        raise ProviderError(f"type {type_!r} is one of {', '.join(TYPES)}")
    keys_url: str | None
    algorithms: tuple[str, ...]
    if type_ == "supabase":
        url = _text(config, "url", "supabase").rstrip("/")
        issuer, audience = f"{url}/auth/v1", "authenticated"
        keys_url, algorithms = f"{url}/auth/v1/.well-known/jwks.json", ("ES256", "RS256")
    elif type_ == "firebase":
        project = _text(config, "project_id", "firebase")
        issuer, audience = f"https://securetoken.google.com/{project}", project
        keys_url, algorithms = FIREBASE_KEYS, ("RS256",)
    elif type_ == "auth0":
        tenant = _text(config, "tenant", "auth0").removeprefix("https://").strip("/")
        issuer, audience = f"https://{tenant}/", _text(config, "audience", "auth0")
        keys_url, algorithms = f"https://{tenant}/.well-known/jwks.json", ("RS256",)
    else:
        issuer, audience = _text(config, "issuer", "oidc"), _text(config, "audience", "oidc")
        keys_url, algorithms = None, ("RS256", "ES256")
    issuer = str(config.get("issuer", issuer))
    audience = str(config.get("audience", audience))
    keys_url = config.get("keys_url", keys_url)
    sealed_secret = _sealed_secret(type_, config)
    given = config.get("algorithms")
    if sealed_secret is not None:
        if "keys_url" in config:
            raise ProviderError(f"a provider with {SECRET!r} fetches no keys: drop 'keys_url'")
        keys_url, algorithms = None, SYMMETRIC
        if given is not None and given != list(SYMMETRIC):
            raise ProviderError(
                f"with {SECRET!r}, 'algorithms' is [\"HS256\"]: a shared secret never goes"
                " with asymmetric algorithms"
            )
    elif given is not None:
        if not isinstance(given, list) or not given or not all(a in ASYMMETRIC for a in given):
            raise ProviderError(f"'algorithms' is a list of {', '.join(ASYMMETRIC)}")
        algorithms = tuple(given)
    check_url(issuer if keys_url is None else keys_url, allow_http)
    origins = config.get("cors_origins", [])
    if not isinstance(origins, list) or not all(
        isinstance(o, str) and re.fullmatch(r"https?://[^/\s]+", o) for o in origins
    ):
        raise ProviderError("'cors_origins' is a list of origins: scheme://host[:port]")
    ttl, max_ttl = config.get("ttl", 3600), config.get("max_ttl", 86400)
    max_session = config.get("max_session", 7 * 86400)
    if not all(isinstance(v, int) for v in (ttl, max_ttl, max_session)) or not (
        0 < ttl <= max_ttl <= max_session
    ):
        raise ProviderError(
            "'ttl', 'max_ttl' and 'max_session' are seconds, 0 < ttl <= max_ttl <= max_session"
        )
    return IdentityProvider(
        domain, name, type_, bool(config.get("enabled", True)), issuer, audience, keys_url,
        algorithms, _rules(domain, config.get("rules")), ttl, max_ttl, max_session, config,
        sealed_secret,
    )  # fmt: skip


def _sealed_secret(type_: str, config: dict[str, Any]) -> bytes | None:
    if SECRET in config:  # stored() seals it: a registration as given never derives with it
        raise ProviderError(f"{SECRET!r} is kept only sealed")
    sealed = config.get(SEALED)
    if sealed is None:
        return None
    if type_ != "supabase":
        raise ProviderError(f"{SECRET!r} is for type supabase only (its legacy HS256 secret)")
    try:
        return base64.b64decode(sealed, validate=True)
    except (binascii.Error, TypeError, ValueError):
        raise ProviderError(f"{SEALED!r} is not a sealed secret") from None


def _secret_context(domain: str, name: str) -> str:
    return f"idp-secret:{domain}/{name}"


def stored(
    domain: str,
    name: str,
    type_: str,
    given: dict[str, Any],
    sealing: SealingKey | None,
    current: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A registration as it is stored: what was ``given`` (a new registration, or the changes
    to the ``current`` one, merged: a null removes a field). A given ``jwt_secret`` is checked
    and kept only sealed (``jwt_secret_sealed``, base64), bound to the domain and the
    provider's name; a null one removes it."""
    if SEALED in given:
        raise ProviderError(f"{SEALED!r} is Conduit's own: give {SECRET!r}")
    if current is None:
        config = dict(given)
    else:
        config = dict(current)
        for key, value in given.items():
            if value is None:
                config.pop(key, None)
            else:
                config[key] = value
    secret = config.pop(SECRET, None)
    if SECRET in given:
        config.pop(SEALED, None)  # replaced, or removed
    if secret is None:
        return config
    if type_ != "supabase":
        raise ProviderError(f"{SECRET!r} is for type supabase only (its legacy HS256 secret)")
    if not isinstance(secret, str) or len(secret) < MIN_SECRET:
        raise ProviderError(
            f"{SECRET!r} is a string of at least {MIN_SECRET} characters (the project's legacy"
            " JWT secret)"
        )
    if sealing is None:
        raise ProviderError(f"{SECRET!r} is kept sealed: this gateway has no encryption key")
    sealed = sealing.seal(secret.encode(), _secret_context(domain, name))
    config[SEALED] = base64.b64encode(sealed).decode()
    return config


def _rules(domain: str, given: Any) -> tuple[Rule, ...]:
    if not isinstance(given, list) or not given:
        raise ProviderError("'rules' is a non-empty list of {when, publish, subscribe}")
    rules = []
    for i, rule in enumerate(given):
        if not isinstance(rule, dict) or not isinstance(rule.get("when", {}), dict):
            raise ProviderError(f"rule {i}: an object with 'when' (an object of claims)")
        filters = {}
        for action in ("publish", "subscribe"):
            items = rule.get(action, [])
            if not isinstance(items, list) or not all(isinstance(f, str) for f in items):
                raise ProviderError(f"rule {i}: {action!r} is a list of topic filters")
            for f in items:
                sample = _PLACEHOLDER.sub("x", f)
                try:
                    parsed = parse_filter(sample)
                except ValueError as exc:
                    raise ProviderError(f"rule {i}: {f!r} is not a topic filter: {exc}") from None
                if parsed.domain != domain:
                    raise ProviderError(f"rule {i}: {f!r} is not in domain {domain!r}")
            filters[action] = tuple(items)
        rules.append(Rule(rule.get("when", {}), filters["publish"], filters["subscribe"]))
    return tuple(rules)


# --- claims to rights -------------------------------------------------------------------------


def _holds(condition: Any, value: Any) -> bool:
    if isinstance(condition, dict):
        if "one_of" in condition:
            return isinstance(condition["one_of"], list) and value in condition["one_of"]
        if "contains" in condition:
            wanted = condition["contains"]
            if isinstance(value, list):
                return wanted in value
            return isinstance(value, str) and isinstance(wanted, str) and wanted in value.split()
        return False
    return bool(value == condition)


def _claim(claims: dict[str, Any], path: str) -> Any:
    value: Any = claims
    for part in path.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


def _safe(value: Any) -> str | None:
    """A claim value that can stand in a topic level as it is, or None."""
    if not isinstance(value, str | int) or isinstance(value, bool):
        return None
    text = str(value)
    if not text or any(c in "/+#" or not c.isprintable() for c in text):
        return None
    return text


def rights(provider: IdentityProvider, claims: dict[str, Any]) -> Rules:
    """The rights of the first rule whose conditions hold and whose placeholders all fill
    safely; AuthorizationError (403) when none does."""
    for rule in provider.rules:
        if not all(_holds(c, _claim(claims, k)) for k, c in rule.when.items()):
            continue
        try:
            filled = {
                action: tuple(parse_filter(_fill(f, claims)) for f in getattr(rule, action))
                for action in ("publish", "subscribe")
            }
        except (_Unsafe, ValueError):
            continue  # a claim would change a filter's meaning: the rule does not apply
        return Rules(publish=filled["publish"], subscribe=filled["subscribe"])
    raise AuthorizationError(f"no rule of provider {provider.name!r} matches this token's claims")


class _Unsafe(Exception):
    pass


def _fill(template: str, claims: dict[str, Any]) -> str:
    def one(match: re.Match[str]) -> str:
        name = match.group(1)
        value = _safe(_claim(claims, name[6:]) if name.startswith("claim:") else claims.get(name))
        if value is None:
            raise _Unsafe(name)
        return value

    return _PLACEHOLDER.sub(one, template)


# --- keys ---------------------------------------------------------------------------------------


@dataclass
class _Held:
    keys: dict[str, Any] = field(default_factory=dict)  # kid -> public key
    fresh_until: float = 0.0
    fetched_at: float = 0.0  # last attempt, for the unknown-kid rate bound
    jwks_url: str | None = None  # an oidc provider's, from its discovery document


class Keys:
    """Every provider's verification keys (see the module docstring)."""

    def __init__(
        self,
        allow_http: bool = False,
        refetch_every: float = REFETCH_EVERY,
        sealing: SealingKey | None = None,
    ) -> None:
        self.allow_http = allow_http
        self.refetch_every = refetch_every
        self.sealing = sealing  # opens the providers' jwt_secret
        self._held: dict[tuple[str, str], _Held] = {}

    async def key(self, provider: IdentityProvider, kid: str | None) -> Any:
        if provider.sealed_secret is not None:
            return self._secret(provider)  # nothing to fetch
        held = self._held.setdefault((provider.domain, provider.name), _Held())
        now = time.monotonic()
        stale = now >= held.fresh_until
        unknown = kid not in held.keys
        if stale or (unknown and now - held.fetched_at >= self.refetch_every):
            held.fetched_at = now
            try:
                await self._fetch(provider, held)
            except UnavailableError:
                if not held.keys:
                    raise
        found = held.keys.get(kid) if kid is not None else None
        if found is None and kid is None and len(held.keys) == 1:
            found = next(iter(held.keys.values()))
        if found is None:
            raise AuthenticationError("the token's signing key is not one of its provider's")
        return found

    def _secret(self, provider: IdentityProvider) -> bytes:
        """The provider's jwt_secret, opened: ProviderError (misconfigured) when it cannot be."""
        assert provider.sealed_secret is not None
        if self.sealing is None:
            raise ProviderError(
                f"provider {provider.name!r} has a {SECRET!r} and this gateway no encryption key"
            )
        try:
            return self.sealing.open(
                provider.sealed_secret, _secret_context(provider.domain, provider.name)
            )
        except SealError as exc:
            raise ProviderError(f"provider {provider.name!r}: {exc}") from None

    async def _fetch(self, provider: IdentityProvider, held: _Held) -> None:
        url = provider.keys_url
        if url is None:
            if held.jwks_url is None:
                discovery = provider.issuer.rstrip("/") + "/.well-known/openid-configuration"
                document, _ = await fetch_json(check_url(discovery, self.allow_http))
                if document.get("issuer") != provider.issuer or not isinstance(
                    document.get("jwks_uri"), str
                ):
                    raise UnavailableError(f"provider {provider.name!r}: bad discovery document")
                held.jwks_url = check_url(document["jwks_uri"], self.allow_http)
            url = held.jwks_url
        document, max_age = await fetch_json(check_url(url, self.allow_http))
        keys: dict[str, Any] = {}
        if provider.type == "firebase" and "keys" not in document:
            for kid, pem in document.items():  # Google's X.509 document: kid -> certificate
                keys[kid] = x509.load_pem_x509_certificate(pem.encode()).public_key()
        else:
            for jwk in document.get("keys", []):
                try:
                    keys[jwk.get("kid")] = jwt.PyJWK(jwk).key
                except (jwt.PyJWKError, jwt.InvalidKeyError, TypeError, ValueError):
                    continue  # a key of a kind Conduit does not verify with
        held.keys = keys
        held.fresh_until = time.monotonic() + max_age


async def fetch_json(url: str) -> tuple[dict[str, Any], float]:
    """A provider's key set or discovery document, and how long it may be kept (its
    ``max-age``, bounded): UnavailableError when it cannot be had, within
    :data:`FETCH_TIMEOUT` seconds and :data:`MAX_DOCUMENT` bytes."""
    timeout = aiohttp.ClientTimeout(total=FETCH_TIMEOUT)
    try:
        async with aiohttp.ClientSession(timeout=timeout) as session:
            async with session.get(url) as response:
                if response.status != 200:
                    raise UnavailableError(f"{url}: HTTP {response.status}")
                body = await response.content.read(MAX_DOCUMENT + 1)
                cache = response.headers.get("Cache-Control", "")
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise UnavailableError(f"{url}: {type(exc).__name__} {exc}") from None
    if len(body) > MAX_DOCUMENT:
        raise UnavailableError(f"{url}: more than {MAX_DOCUMENT} bytes")
    try:
        document = orjson.loads(body)
    except ValueError:
        raise UnavailableError(f"{url}: not JSON") from None
    if not isinstance(document, dict):
        raise UnavailableError(f"{url}: not a JSON object")
    age = _MAX_AGE.search(cache)
    max_age = float(age.group(1)) if age else DEFAULT_CACHE
    return document, min(MAX_CACHE, max(MIN_CACHE, max_age))


async def verify(keys: Keys, provider: IdentityProvider, token: str) -> dict[str, Any]:
    """The claims of a valid token of the provider: signature with its pinned algorithms,
    ``iss``, ``aud``, ``exp`` required, ``nbf``/``iat`` with leeway, ``sub`` not empty."""
    if not provider.enabled:
        raise AuthenticationError(f"provider {provider.name!r} is disabled")
    header = unverified(token, 0)  # PyJWT checks everything again when it verifies
    if header.get("alg") not in provider.algorithms:  # refused before any key is looked for
        raise _wrong_algorithm(provider)
    kid = header.get("kid")
    key = await keys.key(provider, kid if isinstance(kid, str) else None)
    try:
        claims: dict[str, Any] = jwt.decode(
            token, key, algorithms=list(provider.algorithms), audience=provider.audience,
            issuer=provider.issuer, leeway=LEEWAY,
            options={"require": ["exp", "iss", "aud", "sub"]},
        )  # fmt: skip
    except jwt.ExpiredSignatureError:
        raise AuthenticationError("the token has expired") from None
    except jwt.InvalidAlgorithmError:
        raise _wrong_algorithm(provider) from None
    except jwt.InvalidTokenError as exc:
        raise AuthenticationError(f"the token is not valid: {exc}") from None
    if not isinstance(claims.get("sub"), str) or not claims["sub"]:
        raise AuthenticationError("the token has no subject")
    return claims


def _wrong_algorithm(provider: IdentityProvider) -> AuthenticationError:
    return AuthenticationError(
        f"the token's algorithm is not one of {', '.join(provider.algorithms)}"
    )


# --- the exchange -------------------------------------------------------------------------------


def _limiter(per_minute: int, where: str) -> RateLimiter | None:
    if not per_minute:
        return None
    return RateLimiter(
        per_minute / 60.0, per_minute, f"more than {per_minute} token exchanges a minute {where}"
    )


class Exchange:
    """External tokens traded for broker tokens (``POST /auth/exchange``)."""

    def __init__(
        self,
        store: Store,
        tokens: Tokens,
        allow_http: bool = False,
        refetch_every: float = REFETCH_EVERY,
        *,
        per_address: int = 60,
        per_domain: int = 6000,
        sealing: SealingKey | None = None,
    ) -> None:
        self.store = store
        self.tokens = tokens
        self.allow_http = allow_http
        self.keys = Keys(allow_http, refetch_every, sealing)
        # The listeners' names and bound ports, for the answer's endpoints (the composition
        # root sets it).
        self.listeners: Callable[[], dict[str, int]] | None = None
        self._origins: dict[str, frozenset[str]] = {}
        # Providers derived from their registration (read twice from the store, rules parsed),
        # kept a while: (provider, until).
        self._providers: dict[tuple[str, str], tuple[IdentityProvider, float]] = {}
        self._origins_until = 0.0
        # Exchanges and refreshes a minute, per client address and per domain (0: any).
        self._addresses = _limiter(per_address, "from this address")
        self._domains = _limiter(per_domain, "for this domain")

    async def origins(self, domain: str | None = None) -> frozenset[str]:
        """The browser origins allowed to call the exchange (CORS): those of ``domain``'s
        providers, or of every domain's (a preflight does not say which). Read again at most
        every :data:`ORIGINS_TTL` seconds."""
        now = time.monotonic()
        if now >= self._origins_until:
            found: dict[str, set[str]] = {}
            for d in await self.store.list_domains():
                for _, _, config in await self.store.list_idps(d.name):
                    given = config.get("cors_origins", [])
                    if isinstance(given, list):
                        found.setdefault(d.name, set()).update(
                            o for o in given if isinstance(o, str)
                        )
            self._origins = {d: frozenset(o) for d, o in found.items()}
            self._origins_until = now + ORIGINS_TTL
        if domain is not None:
            return self._origins.get(domain, frozenset())
        return frozenset().union(*self._origins.values())

    def check_rate(self, domain: str | None, source: str | None) -> None:
        """RateLimitError (with ``retry_after``) past the limits."""
        if self._addresses is not None and source:
            self._addresses.check(source)
        if self._domains is not None and domain:
            self._domains.check(domain)

    async def provider(self, domain: str, name: str) -> IdentityProvider:
        """The domain's provider ``name``, derived from its registration: kept for
        :data:`PROVIDERS_TTL` seconds, forgotten at once on a change of it or of its domain
        (:meth:`changed`, on every node)."""
        key = (domain, name)
        held = self._providers.get(key)
        now = time.monotonic()
        if held is not None and held[1] > now:
            return held[0]
        provider = await self._read(domain, name)
        if len(self._providers) >= MAX_PROVIDERS:
            self._providers.clear()
        self._providers[key] = (provider, now + PROVIDERS_TTL)
        return provider

    async def changed(self, change: Change) -> None:
        """A change heard on the bus: a provider or domain changed, or everything may have."""
        if change.kind in ("idp", "domain", "bus"):
            self._providers.clear()

    async def _read(self, domain: str, name: str) -> IdentityProvider:
        try:
            await self.store.get_domain(domain)
        except NotFound as exc:
            raise NotRegistered("domain", str(exc)) from None
        try:
            type_, config = await self.store.get_idp(domain, name)
        except NotFound as exc:
            raise NotRegistered("provider", str(exc)) from None
        return derive(domain, name, type_, config, self.allow_http)

    async def exchange(
        self, domain: str, name: str, token: str, ttl: int | None = None
    ) -> dict[str, Any]:
        """Broker credentials for a valid token of the domain's provider ``name``."""
        provider = await self.provider(domain, name)
        claims = await verify(self.keys, provider, token)
        granted = rights(provider, claims)
        life = provider.ttl if ttl is None else ttl
        if not 0 < life <= provider.max_ttl:
            raise ValueError(f"'ttl' is 1 to {provider.max_ttl} seconds for this provider")
        subject = str(claims["sub"])
        identity = Identity(
            f"{provider.name}:{subject}", domain, str(claims.get("email") or subject), granted
        )
        session = {"sid": secrets.token_urlsafe(12), "idp": provider.name, "ses": int(time.time())}
        return self._credentials(identity, granted, life, session)

    async def test(self, domain: str, name: str, token: str) -> dict[str, Any]:
        """What an exchange of ``token`` would grant, without issuing anything: its verified
        claims and the rights of the first rule that applies (errors as the exchange's)."""
        provider = await self.provider(domain, name)
        claims = await verify(self.keys, provider, token)
        granted = rights(provider, claims)
        return {
            "claims": claims,
            "username": f"{provider.name}:{claims['sub']}",
            "rules": {
                "publish": [str(f) for f in granted.publish],
                "subscribe": [str(f) for f in granted.subscribe],
            },
        }

    async def refresh(self, token_id: str, password: str) -> dict[str, Any]:
        """Fresh credentials for the current ones (``password``, a broker token of an exchange
        named ``token_id``), while the provider is enabled, the subject not revoked and the
        session younger than the provider's ``max_session``."""
        from core.auth.tokens import check_not_revoked

        claims = await self.tokens.verify(password, "broker")
        if claims.get("sid") != token_id or not isinstance(claims.get("idp"), str):
            raise AuthenticationError("these are not the credentials of that exchange")
        identity = self.tokens.broker_identity(claims)
        provider = await self.provider(identity.domain, claims["idp"])
        if not provider.enabled:
            raise AuthenticationError(f"provider {provider.name!r} is disabled")
        await check_not_revoked(self.store, identity)
        started = float(claims.get("ses", 0))
        left = started + provider.max_session - time.time()
        if left <= 0:
            raise SessionEnded(
                f"the session is older than {provider.max_session} s: exchange a new token"
            )
        assert identity.rules is not None
        session = {k: claims[k] for k in ("sid", "idp", "ses")}
        return self._credentials(identity, identity.rules, min(provider.ttl, int(left)), session)

    def _credentials(
        self, identity: Identity, granted: Rules, life: int, session: dict[str, Any]
    ) -> dict[str, Any]:
        password, expires = self.tokens.broker(identity, granted, life, session)
        return {
            "token_id": session["sid"],
            "username": identity.client_id,
            "password": password,
            "expires_at": expires,
            # 80 % of the life, counted from the token's own start (expires - life) so that
            # rounding never puts it at the end of a short life.
            "refresh_at": expires - life + int(0.8 * life),
            "rules": {
                "publish": [str(f) for f in granted.publish],
                "subscribe": [str(f) for f in granted.subscribe],
            },
        }


# URL schemes of the listeners a client may use, by listener name (the management API is not
# one of them); MQTT over WebSocket is served on the path /mqtt.
_SCHEMES = {
    "http": "http://{}", "https": "https://{}", "ws": "ws://{}", "wss": "wss://{}",
    "mqtt": "mqtt://{}", "mqtts": "mqtts://{}", "mqtt-ws": "ws://{}/mqtt",
    "mqtt-wss": "wss://{}/mqtt", "coap": "coap://{}", "coaps": "coaps://{}",
}  # fmt: skip


def endpoint_urls(host: str, ports: dict[str, int]) -> dict[str, str]:
    """The URLs a client reaches this gateway's listeners at, on ``host`` (as it asked)."""
    return {
        name: _SCHEMES[name].format(f"{host}:{port}")
        for name, port in ports.items()
        if name in _SCHEMES
    }
