"""The provider of client certificates (mutual TLS): the certificate's subject CN names the
client.

The TLS layer has verified the certificate against the client CA (and, with issue 14's
revocation, the CRL) before any of this runs; this provider only maps the certificate to a
client, with an exact match and never a prefix or suffix (Magistrala's nginx script matched a
suffix of the password). Two modes (``mtls_identity``):

- ``client_id`` (the default): the CN is the client's id;
- ``secret``: the CN is the client's secret, as Magistrala's certificates carry it.

A certificate of an unknown or disabled client, one without exactly one CN, or one the store
records as revoked (Conduit's own CA, :mod:`certs.authority`; the CRL refuses it earlier when
``tls_crl`` names Conduit's CRL) is bad credentials. The identity carries the certificate's
serial, so that a revocation ends the connections it opened. Answers are cached with a TTL
under the certificate's SHA-256 digest; every provisioning change and revocation clears them.
"""

from __future__ import annotations

import hashlib
from typing import Literal

import msgspec
from cryptography import x509
from cryptography.x509.oid import NameOID

from core.auth import Expiring
from core.auth.secrets import client_identity, hash_secret
from core.credentials import Credentials, Kind
from core.errors import AuthenticationError
from core.identity import Identity
from core.store import Store

Mode = Literal["client_id", "secret"]


def subject_cn(cert: x509.Certificate) -> str:
    """The one common name of a certificate's subject (AuthenticationError otherwise)."""
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
        try:
            cert = x509.load_der_x509_certificate(der)
        except ValueError:
            raise AuthenticationError("the client certificate cannot be read") from None
        cn = subject_cn(cert)
        serial = f"{cert.serial_number:x}"
        if await self.store.revoked_certificates([serial]):
            raise AuthenticationError("the client certificate is revoked")
        if self.mode == "secret":
            client = await self.store.client_by_secret(hash_secret(cn))
        else:
            client = await self.store.client_by_id(cn)
        found = client_identity(client)
        if found is not None:
            found = msgspec.structs.replace(found, certificate=serial)
        self._identities.put(hashlib.sha256(der).digest(), found)
        return _found(found)


def _found(identity: Identity | None) -> Identity:
    if identity is None:
        raise AuthenticationError("the client certificate names no enabled client")
    return identity
