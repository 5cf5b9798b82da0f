"""People who sign in: users, their passwords, their roles in domains, and the tokens they get.

Password recovery (:meth:`Users.request_recovery`, :meth:`Users.reset_password`): a recovery
key, a short-lived ``recovery`` token, is mailed to the user. It names a digest of the password
hash it was made under, so it works once: the reset changes the hash. The reset also ends every
sign-in of the user. Asking for a key answers the same whether the email exists or not, at once;
the lookup and the mail happen after the answer.

A user has an email (unique in any case), a name, a password hashed with Argon2id
(``argon2-cffi``), and roles per domain: ``admin`` (manage the domain's clients, channels,
connections and certificates) or ``member`` (read them). A platform administrator manages
domains and users; the admin key of the management API is the bootstrap platform credential.

Signing in (:meth:`Users.login`) gives a pair: an access token (``access_token_ttl``, 15
minutes) and a refresh token (``refresh_token_ttl``, 24 hours), both of one *family*, one per
sign-in. :meth:`Users.refresh` trades a refresh token for a new pair of the same family, and the
refresh token used is spent: presenting a spent one again is a replay (the token was stolen, or
the client lost an answer), and the whole family is revoked, so that neither the thief's nor
the owner's tokens work on (RFC 9700 section 4.14.2). Signing out revokes the family. An access
token is checked against its family on every use: a revoked family, or a disabled user, is
refused at once.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import secrets
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

import argon2

from core.errors import AuthenticationError, AuthorizationError
from core.limits import RateLimiter
from core.mail import Mailer
from core.store import NotFound, Store, User
from core.tokens import Tokens

log = logging.getLogger("conduit.users")

Role = Literal["admin", "member"]
ROLES: tuple[Role, ...] = ("admin", "member")
MIN_PASSWORD = 12  # characters
MAX_PASSWORD = 1024  # characters: Argon2 hashes any length; a bound keeps requests cheap
_EMAIL = re.compile(r"[^@\s]+@[^@\s]+\.[^@\s]+")
BAD_LOGIN = "wrong email or password"


class InvalidUser(ValueError):
    """A user request with a bad email, name, password or role; the message says which."""


@dataclass(frozen=True, slots=True)
class Principal:
    """Who calls the management API: the admin key, or a user with its roles."""

    user: User | None  # None: the admin key
    roles: dict[str, str] = field(default_factory=dict)

    @property
    def platform(self) -> bool:
        return self.user is None or self.user.platform_admin

    def may_read(self, domain: str) -> bool:
        return self.platform or domain in self.roles

    def may_manage(self, domain: str) -> bool:
        return self.platform or self.roles.get(domain) == "admin"

    def require(self, allowed: bool, what: str) -> None:
        if not allowed:
            raise AuthorizationError(f"your role does not allow you to {what}")


def check_password(password: str) -> None:
    if not MIN_PASSWORD <= len(password) <= MAX_PASSWORD:
        raise InvalidUser(f"a password has {MIN_PASSWORD} to {MAX_PASSWORD} characters")


def check_email(email: str) -> None:
    if len(email) > 254 or not _EMAIL.fullmatch(email):
        raise InvalidUser(f"{email!r} is not an email address")


def check_role(role: object) -> Role:
    if role not in ROLES:
        raise InvalidUser("'role' is admin or member")
    return role


class Users:
    """Users, their passwords and their tokens (see the module docstring)."""

    def __init__(
        self,
        store: Store,
        tokens: Tokens,
        *,
        access_ttl: int = 900,
        refresh_ttl: int = 86400,
        recovery_ttl: int = 900,
        mailer: Mailer | None = None,
        recovery_url: str | None = None,
        attempts_per_minute: int = 10,
    ) -> None:
        self.store = store
        self.tokens = tokens
        self.access_ttl = access_ttl
        self.refresh_ttl = refresh_ttl
        self.recovery_ttl = recovery_ttl
        self.mailer = mailer
        self.recovery_url = recovery_url
        self._mailing: set[asyncio.Task[None]] = set()
        # Sign-in attempts per email and per address: each is an Argon2 check (tens of ms and
        # 64 MiB), and each guess of a password.
        self._attempts = (
            RateLimiter(
                attempts_per_minute / 60.0,
                attempts_per_minute,
                f"more than {attempts_per_minute} sign-in attempts a minute: wait a minute",
            )
            if attempts_per_minute
            else None
        )
        self._hasher = argon2.PasswordHasher()  # Argon2id, RFC 9106's second recommendation
        # What an unknown email's password is checked against, for the same work as a known
        # one: made at the first sign-in (a hash takes tens of milliseconds).
        self._decoy: str | None = None

    # people -----------------------------------------------------------------------------------

    async def create(
        self, email: str, name: str, password: str | None, platform_admin: bool = False
    ) -> User:
        check_email(email)
        if not 0 < len(name) <= 256 or not name.isprintable():
            raise InvalidUser("a name has 1 to 256 printable characters")
        hashed = None
        if password is not None:
            check_password(password)
            hashed = self._hasher.hash(password)
        user = User(str(uuid.uuid4()), email, name, True, platform_admin, time.time(), None)
        return await self.store.create_user(user, hashed)

    async def set_password(self, ref: str, password: str) -> User:
        check_password(password)
        user = await self.store.set_user_password(ref, self._hasher.hash(password))
        return user

    # tokens -----------------------------------------------------------------------------------

    async def login(self, email: str, password: str, source: str | None = None) -> dict[str, Any]:
        """A new pair for a user's email and password; AuthenticationError otherwise, the same
        for an unknown email as for a wrong password. Attempts are limited per email and per
        ``source`` (the client's address): RateLimitError past the limit."""
        if self._attempts is not None:
            self._attempts.check("email:" + email.lower())
            if source:
                self._attempts.check("from:" + source)
        found = await self.store.user_password(email) if len(password) <= MAX_PASSWORD else None
        hashed = found[1] if found is not None else None
        if hashed is None and self._decoy is None:
            self._decoy = self._hasher.hash(secrets.token_urlsafe(16))
        try:
            self._hasher.verify(hashed or self._decoy or "", password)
        except (argon2.exceptions.VerificationError, argon2.exceptions.InvalidHashError):
            raise AuthenticationError(BAD_LOGIN) from None
        if found is None or hashed is None:
            raise AuthenticationError(BAD_LOGIN)
        user = found[0]
        if not user.enabled:
            raise AuthenticationError("this user is disabled")
        if self._hasher.check_needs_rehash(hashed):
            await self.store.set_user_password(user.id, self._hasher.hash(password))
        return await self.session(user)

    async def session(self, user: User) -> dict[str, Any]:
        """A new sign-in of a user whose identity was proven (a password, a provider): a new
        family and its first pair."""
        now = time.time()
        await self.store.set_last_login(user.id, now)
        family = secrets.token_urlsafe(16)
        await self.store.add_token_family(family, user.id, now)
        return await self._pair(user.id, family)

    async def refresh(self, refresh_token: str) -> dict[str, Any]:
        """A new pair for a refresh token, which is spent; a spent one revokes its family."""
        claims = await self.tokens.verify(refresh_token, "refresh")
        family = str(claims.get("fam", ""))
        state = await self.store.use_refresh_token(str(claims["jti"]), time.time())
        if state == "used":
            await self.store.revoke_token_family(family, time.time())
            raise AuthenticationError(
                "this refresh token was used before: every token of its sign-in is revoked"
            )
        if state != "fresh" or not await self.store.token_family_live(family):
            raise AuthenticationError("this sign-in has ended (signed out, or user disabled)")
        return await self._pair(str(claims["sub"]), family)

    async def logout(self, refresh_token: str) -> None:
        """End a sign-in: its family is revoked, access tokens included."""
        claims = await self.tokens.verify(refresh_token, "refresh")
        await self.store.revoke_token_family(str(claims.get("fam", "")), time.time())

    async def _pair(self, user_id: str, family: str) -> dict[str, Any]:
        access, expires = self.tokens.issue("access", user_id, self.access_ttl, {"fam": family})
        jti = secrets.token_urlsafe(16)
        refresh, refresh_expires = self.tokens.issue(
            "refresh", user_id, self.refresh_ttl, {"fam": family}, jti
        )
        await self.store.add_refresh_token(jti, family, refresh_expires)
        return {
            "access_token": access,
            "refresh_token": refresh,
            "token_type": "Bearer",
            "expires_at": expires,
            "refresh_expires_at": refresh_expires,
        }

    # recovery --------------------------------------------------------------------------------

    def request_recovery(self, email: str) -> None:
        """Mail a recovery key to ``email`` if it is an enabled user's, after returning: the
        caller answers the same, as fast, either way."""
        if self.mailer is None:
            raise AuthenticationError("password recovery is not configured (smtp_host)")
        check_email(email)
        task = asyncio.get_running_loop().create_task(self._mail_recovery(email))
        self._mailing.add(task)
        task.add_done_callback(self._mailing.discard)

    async def _mail_recovery(self, email: str) -> None:
        assert self.mailer is not None
        try:
            found = await self.store.user_password(email)
            if found is None or not found[0].enabled:
                return  # nobody to tell; the answer was the same
            user, hashed = found
            key, _ = self.tokens.issue(
                "recovery", user.id, self.recovery_ttl, {"pwh": _fingerprint(hashed or "")}
            )
            where = self.recovery_url.format(key=key) if self.recovery_url else key
            minutes = max(1, self.recovery_ttl // 60)
            await self.mailer.send(
                user.email,
                "Reset your Conduit password",
                f"Someone asked to reset the password of {user.email} on Conduit.\n\n"
                f"To choose a new one, use this recovery key within {minutes} minutes:\n\n"
                f"{where}\n\nIt works once. If you did not ask, ignore this message: your"
                " password stays as it is.\n",
            )
        except Exception as exc:  # the SMTP server is down: logged, the answer was given
            log.error("recovery mail to a user not sent: %s", exc)

    async def reset_password(self, key: str, password: str) -> None:
        """A new password for the user a recovery key names; the key is spent and every
        sign-in of the user ends."""
        claims = await self.tokens.verify(key, "recovery")
        check_password(password)
        try:
            user = await self.store.get_user(str(claims["sub"]))
        except NotFound:
            raise AuthenticationError("this user no longer exists") from None
        found = await self.store.user_password(user.email)
        if found is None or _fingerprint(found[1] or "") != claims.get("pwh"):
            raise AuthenticationError("this recovery key was used, or the password changed since")
        if not user.enabled:
            raise AuthenticationError("this user is disabled")
        await self.store.set_user_password(user.id, self._hasher.hash(password))
        await self.store.revoke_user_token_families(user.id, time.time())

    async def principal(self, access_token: str) -> Principal:
        """The user an access token names, with its roles; AuthenticationError when the token
        is not a valid access token, its sign-in ended, or the user is disabled or gone."""
        claims = await self.tokens.verify(access_token, "access")
        if not await self.store.token_family_live(str(claims.get("fam", ""))):
            raise AuthenticationError("this sign-in has ended (signed out, or user disabled)")
        try:
            user = await self.store.get_user(str(claims["sub"]))
        except NotFound:
            raise AuthenticationError("this user no longer exists") from None
        return Principal(user, await self.store.roles(user.id))


def _fingerprint(password_hash: str) -> str:
    """What a recovery key knows of the password hash it was made under: enough to tell that it
    changed, nothing to attack it with."""
    return hashlib.sha256(password_hash.encode()).hexdigest()[:32]
