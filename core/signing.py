"""The keys Conduit signs its own tokens with: made, kept, rotated and published.

A :class:`Keyring` holds every key that verifies: the one that signs (the newest) and those
rotated out, which keep verifying for a grace period (``signing_key_grace``, at least the
longest token lifetime) so that tokens signed before a rotation stay good until they expire.
Keys are EdDSA (Ed25519) by default, ES256 (P-256) on request; each has a random key id
(``kid``) that every token names in its header.

Keys live in the store, their private part sealed under the master key
(:mod:`core.sealing`, bound to the key id), so every node of a deployment signs and verifies
with the same keys and a copy of the database alone does not give them away. A rotation on one
node reaches the others through the bus (a ``keys`` change), and a token naming a key id this
node does not know makes it read the store again (at most once a second).

:meth:`Keyring.jwks` is the public half, served at ``/.well-known/jwks.json``.
"""

from __future__ import annotations

import logging
import secrets
import time
from dataclasses import dataclass
from typing import Any, Literal

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from jwt.algorithms import ECAlgorithm, OKPAlgorithm

from core.sealing import SealingKey
from core.store import SigningKeyRecord, Store

Algorithm = Literal["EdDSA", "ES256"]
ALGORITHMS: tuple[Algorithm, ...] = ("EdDSA", "ES256")
PrivateKey = ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey
PublicKey = ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey

RELOAD_EVERY = 1.0  # seconds between two store reads for an unknown key id

log = logging.getLogger("conduit.signing")


@dataclass(frozen=True, slots=True)
class SigningKey:
    kid: str
    algorithm: Algorithm
    created: float
    retires: float | None
    private: PrivateKey

    @property
    def public(self) -> PublicKey:
        return self.private.public_key()

    def jwk(self) -> dict[str, Any]:
        """The public key as a JWK (RFC 7517), with its id, algorithm and use."""
        if isinstance(self.private, ed25519.Ed25519PrivateKey):
            jwk = OKPAlgorithm.to_jwk(self.private.public_key(), as_dict=True)
        else:
            jwk = ECAlgorithm.to_jwk(self.private.public_key(), as_dict=True)
        return {**jwk, "kid": self.kid, "alg": self.algorithm, "use": "sig"}


def _generate(algorithm: Algorithm) -> PrivateKey:
    if algorithm == "EdDSA":
        return ed25519.Ed25519PrivateKey.generate()
    if algorithm == "ES256":
        return ec.generate_private_key(ec.SECP256R1())
    raise ValueError(f"unknown signing algorithm {algorithm!r}: one of {', '.join(ALGORITHMS)}")


def _context(kid: str) -> str:
    return f"signing-key:{kid}"


class Keyring:
    """Conduit's signing keys (see the module docstring)."""

    def __init__(
        self,
        store: Store,
        sealing: SealingKey,
        *,
        algorithm: Algorithm = "EdDSA",
        grace: float = 2 * 86400,
    ) -> None:
        self.store = store
        self.sealing = sealing
        self.algorithm = algorithm
        self.grace = grace
        self._keys: dict[str, SigningKey] = {}
        self._signing: SigningKey | None = None
        self._read_at = 0.0

    async def load(self) -> None:
        """Read the keys from the store; make the first one if there is none that signs, or
        a new one if the one that signs is not of the configured algorithm."""
        await self._read()
        signing = self._signing
        if signing is None or signing.algorithm != self.algorithm:
            await self.rotate()

    async def _read(self) -> None:
        now = time.time()
        await self.store.delete_signing_keys(now)
        keys: dict[str, SigningKey] = {}
        for record in await self.store.signing_keys():
            private = serialization.load_der_private_key(
                self.sealing.open(record.sealed, _context(record.kid)), password=None
            )
            if not isinstance(private, ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey):
                raise ValueError(f"signing key {record.kid} is not an Ed25519 or P-256 key")
            algorithm: Algorithm = "EdDSA" if record.algorithm == "EdDSA" else "ES256"
            keys[record.kid] = SigningKey(
                record.kid, algorithm, record.created, record.retires, private
            )
        self._keys = keys
        signing = [k for k in keys.values() if k.retires is None]
        self._signing = max(signing, key=lambda k: (k.created, k.kid)) if signing else None
        self._read_at = time.monotonic()

    async def rotate(self) -> SigningKey:
        """A new key signs from now on; the others stop signing and verify for ``grace``
        seconds more."""
        private = _generate(self.algorithm)
        kid = secrets.token_urlsafe(12)
        der = private.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        now = time.time()
        record = SigningKeyRecord(
            kid, self.algorithm, now, None, self.sealing.seal(der, _context(kid))
        )
        await self.store.add_signing_key(record)
        await self.store.retire_signing_keys(before=now, retires=now + self.grace)
        await self._read()
        log.info("signing key %s (%s) signs from now on", kid, self.algorithm)
        assert self._signing is not None and self._signing.kid == kid
        return self._signing

    async def reload(self) -> None:
        """Read the keys again (a rotation on another node)."""
        await self._read()

    @property
    def signing(self) -> SigningKey:
        if self._signing is None:
            raise RuntimeError("the keyring is not loaded")
        return self._signing

    def keys(self) -> list[SigningKey]:
        """Every key that verifies, the newest first."""
        now = time.time()
        live = [k for k in self._keys.values() if k.retires is None or k.retires >= now]
        return sorted(live, key=lambda k: (-k.created, k.kid))

    def key(self, kid: str) -> SigningKey | None:
        """The key of that id while it verifies."""
        key = self._keys.get(kid)
        if key is None or (key.retires is not None and key.retires < time.time()):
            return None
        return key

    async def find(self, kid: str) -> SigningKey | None:
        """:meth:`key`, reading the store again first when the id is unknown here (made by
        another node since), at most once every :data:`RELOAD_EVERY` seconds."""
        key = self.key(kid)
        if key is None and time.monotonic() - self._read_at >= RELOAD_EVERY:
            await self._read()
            key = self.key(kid)
        return key

    def jwks(self) -> dict[str, Any]:
        """The JWK Set of every key that verifies, the newest (the signing one) first."""
        return {"keys": [k.jwk() for k in self.keys()]}
