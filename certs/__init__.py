"""Conduit's PKI tool: a certificate authority, server certificates and client certificates,
on `cryptography` (no OpenSSL command line, no hand-written ASN.1).

A PKI lives in a directory: ``ca.pem`` and ``ca.key`` (the CA), and what was issued beside them
(``<name>.pem`` and ``<name>.key``). Keys are written with mode 0600 and never overwritten.

- :func:`create_ca`: a self-signed CA (3 years by default), or :func:`import_ca` for an existing
  CA certificate and key;
- :func:`issue_server`: a server certificate for DNS names and IP addresses (SANs; 1000 days);
- :func:`issue_client`: a client certificate whose subject CN names the client (2 years): its id,
  or its secret for Magistrala's convention (``mtls_identity``); the key is generated, or a CSR is
  signed and no key leaves the client.

Keys are ECDSA P-256 by default; RSA 2048 or 4096 and Ed25519 on request. Serial numbers are
random (RFC 5280 section 4.1.2.2). :func:`make_crl` signs a CRL. What the CA issued and
revoked is recorded in the store by :class:`certs.authority.Authority`, which the CLI and the
management API share.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypeAlias

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

KeyType = Literal["ec", "rsa2048", "rsa4096", "ed25519"]
KEY_TYPES: tuple[KeyType, ...] = ("ec", "rsa2048", "rsa4096", "ed25519")
PrivateKey: TypeAlias = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey

CA_DAYS = 3 * 365
SERVER_DAYS = 1000
CLIENT_DAYS = 2 * 365
# Certificates are valid from a little before they are made: clocks of peers differ.
BACKDATE = datetime.timedelta(minutes=5)


class PKIError(ValueError):
    """What the tool cannot do as asked; the message says why."""


class NoCA(PKIError):
    """The PKI directory holds no CA (yet)."""


@dataclass(frozen=True, slots=True)
class Issued:
    """A certificate and, when the tool made it, its key."""

    certificate: x509.Certificate
    key: PrivateKey | None

    def cert_pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    def key_pem(self) -> bytes:
        if self.key is None:
            raise PKIError("the key of this certificate is its holder's (a signed CSR)")
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )


def new_key(key_type: KeyType = "ec") -> PrivateKey:
    if key_type == "ec":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "rsa2048":
        return rsa.generate_private_key(65537, 2048)
    if key_type == "rsa4096":
        return rsa.generate_private_key(65537, 4096)
    if key_type == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    raise PKIError(f"unknown key type {key_type!r}: one of {', '.join(KEY_TYPES)}")


def signing_hash(key: PrivateKey) -> hashes.SHA256 | None:
    """The digest a key signs with (Ed25519 has its own: None)."""
    return None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()


def _name(common_name: str) -> x509.Name:
    if not common_name or len(common_name) > 64:
        raise PKIError("a common name is 1 to 64 characters (RFC 5280 ub-common-name)")
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _validity(days: int) -> tuple[datetime.datetime, datetime.datetime]:
    if days <= 0:
        raise PKIError("validity must be at least one day")
    now = datetime.datetime.now(datetime.UTC)
    return now - BACKDATE, now + datetime.timedelta(days=days)


def create_ca(
    common_name: str = "Conduit CA", *, key_type: KeyType = "ec", days: int = CA_DAYS
) -> Issued:
    """A self-signed CA that signs certificates and CRLs, and no intermediate CA."""
    key = new_key(key_type)
    name = _name(common_name)
    not_before, not_after = _validity(days)
    public = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, signing_hash(key))
    )
    return Issued(cert, key)


def import_ca(cert_pem: bytes, key_pem: bytes) -> Issued:
    """An existing CA: its certificate must be a CA's and match the key."""
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError:
        raise PKIError("the CA certificate is not a PEM certificate") from None
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as exc:
        raise PKIError(f"the CA key cannot be read: {exc}") from None
    if not isinstance(
        key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
    ):
        raise PKIError("the CA key is not an ECDSA, RSA or Ed25519 key")
    if key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ) != cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ):
        raise PKIError("the CA key does not match the CA certificate")
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        constraints = None
    if constraints is None or not constraints.ca:
        raise PKIError("the certificate is not a CA's (basicConstraints CA:TRUE is missing)")
    return Issued(cert, key)


def _leaf(
    ca: Issued,
    subject: x509.Name,
    public: CertificatePublicKeyTypes,
    days: int,
    usage: x509.ObjectIdentifier,
    sans: list[x509.GeneralName] | None = None,
) -> x509.Certificate:
    if ca.key is None:
        raise PKIError("the CA's key is needed to sign")
    not_before, not_after = _validity(days)
    if not_after > ca.certificate.not_valid_after_utc:
        not_after = ca.certificate.not_valid_after_utc  # never outlive the CA
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca.certificate.subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()),
            critical=False,
        )
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(ca.key, signing_hash(ca.key))


def issue_server(
    ca: Issued, names: list[str], *, key_type: KeyType = "ec", days: int = SERVER_DAYS
) -> Issued:
    """A server certificate for ``names``: DNS names and IP addresses (the first is the CN)."""
    names = list(dict.fromkeys(names))  # each once, in order
    if not names:
        raise PKIError("a server certificate needs at least one DNS name or IP address")
    sans: list[x509.GeneralName] = []
    for name in names:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            sans.append(x509.DNSName(name))
    key = new_key(key_type)
    cert = _leaf(ca, _name(names[0]), key.public_key(), days, ExtendedKeyUsageOID.SERVER_AUTH, sans)
    return Issued(cert, key)


def issue_client(
    ca: Issued,
    common_name: str,
    *,
    key_type: KeyType = "ec",
    days: int = CLIENT_DAYS,
    csr_pem: bytes | None = None,
) -> Issued:
    """A client certificate whose CN is ``common_name`` (the client's id, or its secret in
    Magistrala's mode). With ``csr_pem``, the CSR's key is certified (its signature checked) and
    no key is made; the CSR's subject is not used: the CN is what Conduit says it is."""
    if csr_pem is None:
        key: PrivateKey | None = new_key(key_type)
        assert key is not None
        public: CertificatePublicKeyTypes = key.public_key()
    else:
        try:
            csr = x509.load_pem_x509_csr(csr_pem)
        except ValueError:
            raise PKIError("the CSR is not a PEM certificate signing request") from None
        if not csr.is_signature_valid:
            raise PKIError("the CSR's signature does not verify")
        key, public = None, csr.public_key()
    cert = _leaf(ca, _name(common_name), public, days, ExtendedKeyUsageOID.CLIENT_AUTH)
    return Issued(cert, key)


def common_name(cert: x509.Certificate) -> str:
    """The subject's one CN (a certificate with none or several names nobody)."""
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(names) != 1:
        raise PKIError(f"the certificate has {len(names)} common names, not one")
    value = names[0].value
    return value if isinstance(value, str) else value.decode()


# --- files ------------------------------------------------------------------------------------


def write(directory: Path, name: str, issued: Issued) -> tuple[Path, Path | None]:
    """``<name>.pem`` and (when the tool made the key) ``<name>.key``, mode 0600; neither may
    exist already."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    cert_path = directory / f"{name}.pem"
    key_path = directory / f"{name}.key" if issued.key is not None else None
    for path in (cert_path, key_path):
        if path is not None and path.exists():
            raise PKIError(f"{path} exists: not overwritten")
    if key_path is not None:
        _write_private(key_path, issued.key_pem())
    cert_path.write_bytes(issued.cert_pem())
    return cert_path, key_path


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def load_ca(directory: Path) -> Issued:
    """The CA of a PKI directory (``ca.pem``, ``ca.key``)."""
    cert, key = directory / "ca.pem", directory / "ca.key"
    if not cert.exists() or not key.exists():
        raise NoCA(f"no CA in {directory}: make one with `conduit certs ca --dir {directory}`")
    return import_ca(cert.read_bytes(), key.read_bytes())


# --- revocation ---------------------------------------------------------------------------------

CRL_DAYS = 7  # a CRL's nextUpdate: `conduit serve` makes it again every day


def make_crl(
    ca: Issued,
    revoked: dict[int, datetime.datetime],
    days: int = CRL_DAYS,
    after: datetime.datetime | None = None,
) -> bytes:
    """A CRL (PEM) signed by ``ca`` listing ``revoked`` (serial -> revocation time).

    ``after``: the thisUpdate of the CRL this one replaces. This one's is later, by a second
    at least: a server that loads a newer CRL beside the one in use (``tls_crl`` reloaded)
    checks with the one of the latest thisUpdate, to the second, and keeps the first loaded on
    a tie, so a CRL made in the same second as the last would not take over. Its CRL number
    (RFC 5280 section 5.2.3) is that time in seconds, so it grows too."""
    if ca.key is None:
        raise PKIError("the CA's key is needed to sign a CRL")
    now = datetime.datetime.now(datetime.UTC)
    this_update = (now - BACKDATE).replace(microsecond=0)
    if after is not None and this_update <= after:
        this_update = after + datetime.timedelta(seconds=1)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.certificate.subject)
        .last_update(this_update)
        .next_update(now + datetime.timedelta(days=days))
        .add_extension(x509.CRLNumber(int(this_update.timestamp())), critical=False)
    )
    for serial, when in sorted(revoked.items()):
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(when).build()
        )
    crl = builder.sign(ca.key, signing_hash(ca.key))
    return crl.public_bytes(serialization.Encoding.PEM)


def crl_updated(path: Path) -> datetime.datetime | None:
    """The thisUpdate of the CRL in ``path``; None when there is none to read."""
    try:
        return x509.load_pem_x509_crl(path.read_bytes()).last_update_utc
    except (OSError, ValueError):
        return None
