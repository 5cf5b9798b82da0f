"""Conduit's own tokens: JWTs signed by the :class:`~core.signing.Keyring`, one type per use.

- ``broker``: a client's rights on the messaging protocols, as topic rules, for a short time
  (:meth:`Tokens.broker`); what ``POST /clients/tokens`` answers and, with issue 16, what an
  identity provider's token is exchanged for;
- ``access``, ``refresh``, ``recovery``: the tokens of people (users).

Every token names its type twice, both checked: in its header (``typ: broker+jwt``, the
explicit typing of RFC 8725 section 3.11) and in its audience (``conduit:broker``). A token of
one type is never accepted as another. Verification pins the algorithm to the one of the key
the token names (``kid``), never the header's ``alg``; it requires ``iss``, ``aud``, ``sub``,
``exp``, ``nbf``, ``iat`` and ``jti`` and checks the times with a small leeway
(:data:`LEEWAY`). Every refusal is bad credentials, with a detail that says which check failed
and never repeats the token.
"""

from __future__ import annotations

import base64
import binascii
import secrets
import time
from typing import Any, Literal

import jwt
import orjson

from core.errors import AuthenticationError, TopicError
from core.identity import Identity, Rules
from core.signing import Keyring, SigningKey
from core.topics import parse_filter

TokenType = Literal["broker", "access", "refresh", "recovery"]
AUDIENCES: dict[TokenType, str] = {
    "broker": "conduit:broker",
    "access": "conduit:api",
    "refresh": "conduit:refresh",
    "recovery": "conduit:recovery",
}
NAMED: dict[TokenType, str] = {
    "broker": "a broker token",
    "access": "an access token",
    "refresh": "a refresh token",
    "recovery": "a recovery token",
}
LEEWAY = 30  # seconds of clock difference forgiven on exp, nbf and iat
REQUIRED = ["iss", "aud", "sub", "exp", "nbf", "iat", "jti"]


class Tokens:
    """Issues and verifies Conduit's tokens with the keys of a keyring."""

    def __init__(
        self,
        keyring: Keyring,
        issuer: str,
        *,
        broker_ttl: int = 900,
        broker_max_ttl: int = 86400,
        leeway: float = LEEWAY,
    ) -> None:
        self.keyring = keyring
        self.issuer = issuer
        self.leeway = leeway
        self._broker_ttl = broker_ttl
        self._broker_max_ttl = broker_max_ttl

    def broker_ttl(self, asked: float | None) -> int:
        """The life of a broker token: the default, or what was asked (ValueError past the
        maximum, or not a positive number of seconds)."""
        if asked is None:
            return self._broker_ttl
        if asked < 1:
            raise ValueError("'ttl' is at least 1 second")
        if asked > self._broker_max_ttl:
            raise ValueError(f"'ttl' is at most {self._broker_max_ttl} seconds")
        return int(asked)

    def issue(
        self,
        typ: TokenType,
        subject: str,
        ttl: float,
        claims: dict[str, Any] | None = None,
        jti: str | None = None,
    ) -> tuple[str, int]:
        """A signed token of ``typ`` for ``subject``, good for ``ttl`` seconds; with its expiry
        (seconds since the epoch). ``jti`` names it (random when not given)."""
        key = self.keyring.signing
        now = int(time.time())
        expires = now + max(1, int(ttl))
        payload = {
            **(claims or {}),
            "iss": self.issuer,
            "aud": AUDIENCES[typ],
            "sub": subject,
            "iat": now,
            "nbf": now,
            "exp": expires,
            "jti": jti or secrets.token_urlsafe(12),
        }
        headers = {"kid": key.kid, "typ": f"{typ}+jwt"}
        return jwt.encode(payload, key.private, key.algorithm, headers), expires

    def issued_here(self, token: str) -> bool:
        """Whether a token claims this gateway as its issuer (read without verifying: only to
        tell Conduit's tokens from other issuers', for whom a provider has no opinion)."""
        try:
            claims = unverified(token, 1)
        except AuthenticationError:
            return False
        return claims.get("iss") == self.issuer

    async def verify(self, token: str, typ: TokenType) -> dict[str, Any]:
        """The claims of a valid token of ``typ`` (AuthenticationError otherwise)."""
        key = await self.keyring.find(_kid(token))
        if key is None:
            raise AuthenticationError("the token's signing key is unknown or retired")
        return self._check(token, typ, key)

    def _check(self, token: str, typ: TokenType, key: SigningKey) -> dict[str, Any]:
        try:
            decoded = jwt.api_jwt.decode_complete(
                token,
                key.public,
                algorithms=[key.algorithm],
                audience=AUDIENCES[typ],
                issuer=self.issuer,
                leeway=self.leeway,
                options={"require": REQUIRED},
            )
        except jwt.ExpiredSignatureError:
            raise AuthenticationError("the token has expired") from None
        except jwt.ImmatureSignatureError:
            raise AuthenticationError("the token is not valid yet (nbf or iat)") from None
        except jwt.InvalidAudienceError:
            raise AuthenticationError(f"the token is not {NAMED[typ]} (aud)") from None
        except jwt.InvalidIssuerError:
            raise AuthenticationError("the token was not issued by this gateway (iss)") from None
        except jwt.InvalidAlgorithmError:
            raise AuthenticationError(
                f"the token's algorithm is not its key's ({key.algorithm})"
            ) from None
        except jwt.InvalidSignatureError:
            raise AuthenticationError("the token's signature does not verify") from None
        except jwt.MissingRequiredClaimError as exc:
            raise AuthenticationError(f"the token has no {exc.claim!r} claim") from None
        except jwt.InvalidTokenError:
            raise AuthenticationError("the token is malformed") from None
        if decoded["header"].get("typ") != f"{typ}+jwt":
            raise AuthenticationError(f"the token is not {NAMED[typ]} (typ)")
        payload: dict[str, Any] = decoded["payload"]
        return payload

    # broker tokens ---------------------------------------------------------------------------

    def broker(
        self, identity: Identity, rules: Rules, ttl: float, extra: dict[str, Any] | None = None
    ) -> tuple[str, int]:
        """A broker token: the identity's client, domain and name, and ``rules``."""
        claims = {
            **(extra or {}),
            "dom": identity.domain,
            "name": identity.name,
            "rules": {
                "publish": [str(f) for f in rules.publish],
                "subscribe": [str(f) for f in rules.subscribe],
            },
        }
        return self.issue("broker", identity.client_id, ttl, claims)

    @staticmethod
    def broker_identity(claims: dict[str, Any]) -> Identity:
        """The identity a verified broker token carries."""
        domain, name, rules = claims.get("dom"), claims.get("name", ""), claims.get("rules")
        if not isinstance(domain, str) or not isinstance(name, str) or not isinstance(rules, dict):
            raise AuthenticationError("the broker token has no domain, name or rules")
        try:
            parsed = Rules(
                publish=tuple(parse_filter(f) for f in rules.get("publish", ())),
                subscribe=tuple(parse_filter(f) for f in rules.get("subscribe", ())),
            )
        except (TopicError, TypeError, AttributeError):
            raise AuthenticationError("the broker token's rules are malformed") from None
        if float(claims["exp"]) <= time.time():  # within the leeway: still over
            raise AuthenticationError("the token has expired")
        return Identity(
            claims["sub"], domain, name, parsed, float(claims["exp"]), issued=float(claims["iat"])
        )


def unverified(token: str, segment: int) -> dict[str, Any]:
    """A JWT's header (``segment`` 0) or claims (1), read without verifying anything: only to
    route the token (whose is it, which key verifies it); PyJWT reads and checks it all when it
    verifies. One segment decoded: PyJWT's ``get_unverified_header`` and its decode without
    verification read all three, checking each character of each against the base64url
    alphabet in Python (PyJWT 2.15: 45 us for a broker token). AuthenticationError when the
    token is not three segments or that one is not a JSON object."""
    parts = token.split(".")
    try:
        if len(parts) != 3 or not parts[segment].isascii():
            raise ValueError
        part = parts[segment]
        value = orjson.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
    except (ValueError, binascii.Error):
        raise AuthenticationError("the token is not a JWT") from None
    if not isinstance(value, dict):
        raise AuthenticationError("the token is not a JWT")
    return value


def _kid(token: str) -> str:
    kid = unverified(token, 0).get("kid")
    if not isinstance(kid, str):
        raise AuthenticationError("the token names no signing key (kid)")
    return kid
