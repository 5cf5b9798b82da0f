"""Sign-in of users with Google or any OpenID Connect provider: the authorization code flow
with PKCE, done by kept libraries (authlib's asynchronous OAuth 2 client for the flow, joserfc
for the ID token), not by hand.

``GET /oauth/<provider>/login`` (:meth:`SignIn.start`) makes a random ``state``, ``nonce`` and
PKCE code verifier for this one login and binds them to the browser in a cookie that is sealed
(:mod:`core.sealing`: encrypted and authenticated, so the browser can neither read the verifier
nor change the state), HTTP-only and short-lived; then redirects to the provider. The callback
(:meth:`SignIn.finish`) checks the ``state`` against the cookie (and that no callback used it
before), exchanges the code with the verifier, and verifies the ID token: signature through the
provider's JWKS with the algorithms its discovery document announces (asymmetric ones only,
never ``none`` or HMAC), ``iss``, ``aud`` (the client id), ``exp``, ``nonce`` and
``email_verified``. The user is found by the verified email, or made on a first sign-in; then
Conduit's own tokens are issued (:class:`core.users.Users`). The provider's tokens are never
kept.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
import uuid
from dataclasses import dataclass
from typing import Any

from authlib.integrations.httpx_client import AsyncOAuth2Client
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import KeySet

from core.auth import Expiring
from core.errors import UnavailableError
from core.idps import fetch_json
from core.sealing import SealError, SealingKey
from core.store import NotFound, User
from core.users import Users

GOOGLE = "https://accounts.google.com"
LOGIN_TTL = 600  # seconds a browser has from the login to the callback
SCOPES = "openid email profile"
# Algorithms an ID token may be signed with: asymmetric only (a client secret is not a key).
ASYMMETRIC = {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512",
              "EdDSA"}  # fmt: skip
DISCOVERY_TTL = 3600.0  # seconds a provider's discovery document and JWKS are kept


class SignInError(Exception):
    """A sign-in that cannot go on; the message is what the failure URL gets as ``error``."""


@dataclass(frozen=True, slots=True)
class Provider:
    """A user-login provider as configured."""

    name: str
    issuer: str
    client_id: str
    client_secret: str
    redirect_url: str
    success_url: str
    failure_url: str
    scopes: str = SCOPES


def cookie_name(provider: str) -> str:
    return f"conduit_login_{provider}"


class SignIn:
    """The configured providers and the flow (see the module docstring)."""

    def __init__(self, providers: list[Provider], users: Users, sealing: SealingKey) -> None:
        self.providers = {p.name: p for p in providers}
        self.users = users
        self.sealing = sealing
        self._metadata: Expiring[str, dict[str, Any]] = Expiring(64, DISCOVERY_TTL)
        self._keys: Expiring[str, KeySet] = Expiring(64, DISCOVERY_TTL)
        self._used: Expiring[bytes, bool] = Expiring(100_000, LOGIN_TTL)

    def provider(self, name: str) -> Provider:
        try:
            return self.providers[name]
        except KeyError:
            raise SignInError(f"no sign-in provider {name!r}") from None

    async def start(self, name: str) -> tuple[str, str]:
        """The provider's authorization URL to redirect to, and the sealed cookie value."""
        provider = self.provider(name)
        metadata = await self._discover(provider)
        state, nonce = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
        verifier = secrets.token_urlsafe(48)
        async with self._client(provider) as client:
            url, _ = client.create_authorization_url(
                metadata["authorization_endpoint"], state=state, nonce=nonce,
                code_verifier=verifier,
            )  # fmt: skip
        login = {"state": state, "nonce": nonce, "verifier": verifier, "at": int(time.time())}
        sealed = self.sealing.seal(json.dumps(login).encode(), f"oauth-login:{name}")
        return url, base64.urlsafe_b64encode(sealed).decode()

    async def finish(
        self, name: str, params: dict[str, str], cookie: str | None
    ) -> tuple[User, dict[str, Any]]:
        """The user a callback signs in, and Conduit's tokens for it (SignInError otherwise)."""
        provider = self.provider(name)
        if "error" in params:
            raise SignInError(f"the provider refused: {params['error'][:200]}")
        login = self._login(name, cookie)
        given = params.get("state", "")
        if not hmac.compare_digest(given.encode(), login["state"].encode()):
            raise SignInError("the state does not match this browser's login")
        used = hashlib.sha256(given.encode()).digest()
        if self._used.get(used) is not None:
            raise SignInError("this login was completed already")
        self._used.put(used, True)
        code = params.get("code")
        if not code:
            raise SignInError("the provider sent no code")
        metadata = await self._discover(provider)
        try:
            async with self._client(provider) as client:
                token = await client.fetch_token(
                    metadata["token_endpoint"], code=code, code_verifier=login["verifier"]
                )
        except Exception as exc:
            raise SignInError(f"the code could not be exchanged: {exc}") from None
        id_token = token.get("id_token")
        if not isinstance(id_token, str):
            raise SignInError("the provider sent no ID token")
        claims = await self._verify(provider, metadata, id_token, login["nonce"])
        user = await self._user(claims)
        return user, await self.users.session(user)

    # the parts -------------------------------------------------------------------------------

    def _client(self, provider: Provider) -> AsyncOAuth2Client:
        return AsyncOAuth2Client(
            provider.client_id,
            provider.client_secret,
            scope=provider.scopes,
            redirect_uri=provider.redirect_url,
            code_challenge_method="S256",
            timeout=15,
        )

    def _login(self, name: str, cookie: str | None) -> dict[str, Any]:
        if not cookie:
            raise SignInError("this browser started no login (no login cookie)")
        try:
            sealed = base64.urlsafe_b64decode(cookie.encode())
            login: dict[str, Any] = json.loads(self.sealing.open(sealed, f"oauth-login:{name}"))
        except (ValueError, SealError):
            raise SignInError("the login cookie is not one this gateway made") from None
        if time.time() - float(login.get("at", 0)) > LOGIN_TTL:
            raise SignInError("the login took too long: start again")
        return login

    async def _discover(self, provider: Provider) -> dict[str, Any]:
        cached = self._metadata.get(provider.name)
        if cached is not None:
            return cached[0]
        url = provider.issuer.rstrip("/") + "/.well-known/openid-configuration"
        try:
            metadata, _ = await fetch_json(url)
        except UnavailableError as exc:
            raise SignInError(f"the provider's discovery document is unavailable: {exc}") from None
        if metadata.get("issuer") != provider.issuer:
            raise SignInError("the discovery document names another issuer")
        for field in ("authorization_endpoint", "token_endpoint", "jwks_uri"):
            if not isinstance(metadata.get(field), str):
                raise SignInError(f"the discovery document has no {field}")
        self._metadata.put(provider.name, metadata)
        return metadata

    async def _keyset(self, provider: Provider, metadata: dict[str, Any], fresh: bool) -> KeySet:
        cached = None if fresh else self._keys.get(provider.name)
        if cached is not None:
            return cached[0]
        try:
            document, _ = await fetch_json(metadata["jwks_uri"])
            keys = KeySet.import_key_set(document)  # type: ignore[arg-type]
        except (UnavailableError, JoseError, ValueError) as exc:
            raise SignInError(f"the provider's keys are unavailable: {exc}") from None
        self._keys.put(provider.name, keys)
        return keys

    async def _verify(
        self, provider: Provider, metadata: dict[str, Any], id_token: str, nonce: str
    ) -> dict[str, Any]:
        announced = metadata.get("id_token_signing_alg_values_supported") or ["RS256"]
        algorithms = [a for a in announced if a in ASYMMETRIC]
        if not algorithms:
            raise SignInError("the provider announces no asymmetric ID token algorithm")
        token = None
        for fresh in (False, True):  # a key rotated at the provider: its JWKS read again
            try:
                keys = await self._keyset(provider, metadata, fresh)
                token = jwt.decode(id_token, keys, algorithms=algorithms)
                break
            except JoseError as exc:
                if fresh:
                    raise SignInError(f"the ID token does not verify: {exc.error}") from None
        assert token is not None
        registry = jwt.JWTClaimsRegistry(
            leeway=60,
            iss={"essential": True, "value": provider.issuer},
            aud={"essential": True, "value": provider.client_id},
            sub={"essential": True},
            exp={"essential": True},
            nonce={"essential": True, "value": nonce},
        )
        try:
            registry.validate(token.claims)
        except JoseError as exc:
            raise SignInError(f"the ID token is not for this login: {exc.description}") from None
        claims: dict[str, Any] = token.claims
        if not isinstance(claims.get("email"), str):
            raise SignInError("the ID token has no email")
        if claims.get("email_verified") is not True:
            raise SignInError("the provider has not verified this email")
        return claims

    async def _user(self, claims: dict[str, Any]) -> User:
        email = str(claims["email"])
        try:
            user = await self.users.store.get_user(email)
        except NotFound:
            name = str(claims.get("name") or email.split("@")[0])[:256]
            user = User(str(uuid.uuid4()), email, name, True, False, time.time(), None)
            user = await self.users.store.create_user(user, None)
        if not user.enabled:
            raise SignInError("this user is disabled")
        return user
