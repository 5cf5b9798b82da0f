"""The provider of client certificates (mutual TLS): the certificate's subject CN names the
client.

The TLS layer has verified the certificate against the client CA (and, with issue 14's
revocation, the CRL) before any of this runs; this provider only maps the certificate to a
client, with an exact match and never a prefix or suffix (Magistrala's nginx script matched a
suffix of the password). Two modes (``mtls_identity``):

- ``client_id`` (the default): the CN is the client's id;
- ``secret``: the CN is the client's secret, as Magistrala's certificates carry it.

A certificate of an unknown or disabled client, or one without exactly one CN, is bad
credentials. Answers are cached with a TTL under the certificate's SHA-256 digest; every
provisioning change clears them.
"""

from __future__ import annotations

import hashlib
from typing import Literal

from cryptography import x509
from cryptography.x509.oid import NameOID

from core.auth import Expiring
from core.auth.secrets import client_identity, hash_secret
from core.credentials import Credentials, Kind
from core.errors import AuthenticationError
from core.identity import Identity
from core.store import Store

Mode = Literal["client_id", "secret"]


def subject_cn(der: bytes) -> str:
    """The one common name of a DER certificate's subject (AuthenticationError otherwise)."""
    try:
        cert = x509.load_der_x509_certificate(der)
    except ValueError:
        raise AuthenticationError("the client certificate cannot be read") from None
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(names) != 1:
        raise AuthenticationError(
            f"the client certificate has {len(names)} common names: it must have one"
        )
    value = names[0].value
    return value if isinstance(value, str) else value.decode(errors="replace")


class Certificates:
    """Client certificates whose CN names a client of the store."""

    kinds: frozenset[Kind] = frozenset({"certificate"})

    def __init__(
        self, store: Store, mode: Mode = "client_id", ttl: float = 30.0, maxsize: int = 100_000
    ) -> None:
        self.store = store
        self.mode = mode
        self._identities: Expiring[bytes, Identity | None] = Expiring(maxsize, ttl)

    def invalidate(self) -> None:
        self._identities.clear()

    def identify_cached(self, credentials: Credentials, kind: Kind) -> Identity | None:
        assert credentials.certificate is not None
        cached = self._identities.get(hashlib.sha256(credentials.certificate).digest())
        if cached is None:
            return None
        return _found(cached[0])

    async def identify(self, credentials: Credentials, kind: Kind) -> Identity | None:
        der = credentials.certificate
        assert der is not None
        cn = subject_cn(der)
        if self.mode == "secret":
            client = await self.store.client_by_secret(hash_secret(cn))
        else:
            client = await self.store.client_by_id(cn)
        found = client_identity(client)
        self._identities.put(hashlib.sha256(der).digest(), found)
        return _found(found)


def _found(identity: Identity | None) -> Identity:
    if identity is None:
        raise AuthenticationError("the client certificate names no enabled client")
    return identity
