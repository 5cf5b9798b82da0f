"""The server TLS context of the TLS listeners, built once from the settings at start.

TLS 1.2 at least, forward-secret AEAD ciphers for 1.2 (1.3 has only such), the certificate
chain sent as the file holds it (leaf first). Every file is checked before a listener opens: a
file that is missing or unreadable, a certificate that is expired or not yet valid, a key that
does not match its certificate each stop the start with one line naming the file and the
problem.
"""

from __future__ import annotations

import datetime
import ssl
from pathlib import Path
from typing import Literal

# TLS 1.2 suites: ECDHE key exchange with AES-GCM or ChaCha20-Poly1305 (TLS 1.3's are fixed).
CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"
# TLS 1.3 session tickets after a full handshake (OpenSSL sends 2). One is what a device that
# reconnects needs: it resumes with it and gets a fresh one. Each is more than a kilobyte in
# mutual TLS (it carries the client's certificate) and costs the server about as much again as
# a tenth of the handshake (docs/performance.md).
SESSION_TICKETS = 1


class TLSFileError(ValueError):
    """A TLS setting names a file that cannot serve; the message says which and why."""


ClientAuth = Literal["none", "optional", "required"]


def server_context(
    cert: Path | None,
    key: Path | None,
    client_ca: Path | None = None,
    client_auth: ClientAuth = "none",
    crl: Path | None = None,
    *,
    session_tickets: int = SESSION_TICKETS,
) -> ssl.SSLContext | None:
    """The context for ``tls_cert`` and ``tls_key``; None when neither is set. With
    ``client_auth`` ``optional`` or ``required``, clients are asked for a certificate that
    ``client_ca`` (``tls_client_ca``, PEM) issued (mutual TLS), checked against ``crl``.
    ``session_tickets``: TLS 1.3 tickets sent after a full handshake (0: no resumption; none
    with a CRL, which a resumed session would not be checked against)."""
    if crl is not None and client_auth == "none":
        raise TLSFileError(
            "tls_crl is set but tls_client_auth is none: no client certificate to check"
        )
    if client_auth != "none" and client_ca is None:
        raise TLSFileError(f"tls_client_auth is {client_auth} but tls_client_ca is not set")
    if cert is None and key is None:
        if client_auth != "none":
            raise TLSFileError("tls_client_auth needs tls_cert and tls_key (a TLS listener)")
        return None
    if cert is None or key is None:
        missing, given = ("tls_cert", "tls_key") if cert is None else ("tls_key", "tls_cert")
        raise TLSFileError(f"{given} is set but {missing} is not: TLS needs both")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(CIPHERS)
    context.num_tickets = session_tickets
    _load(context, cert, key, client_ca if client_auth != "none" else None, crl)
    if client_auth != "none":
        context.verify_mode = ssl.CERT_REQUIRED if client_auth == "required" else ssl.CERT_OPTIONAL
    return context


def reload(
    context: ssl.SSLContext,
    cert: Path,
    key: Path,
    client_ca: Path | None = None,
    client_auth: ClientAuth = "none",
    crl: Path | None = None,
) -> None:
    """Load the files again into a context in use: handshakes from now on use them, connections
    made before keep theirs. Every file is checked first (in a context of its own): on
    TLSFileError the context in use is left as it was. A newer CRL takes over from the one
    loaded before (OpenSSL prefers the latest of an issuer's CRLs); a CA is added, never
    removed (removing one takes a restart)."""
    server_context(cert, key, client_ca, client_auth, crl)  # raises before anything changes
    _load(context, cert, key, client_ca if client_auth != "none" else None, crl)


def _load(
    context: ssl.SSLContext, cert: Path, key: Path, client_ca: Path | None, crl: Path | None
) -> None:
    _check_certificate(cert)
    _readable(key, "tls_key")
    try:
        context.load_cert_chain(cert, key)
    except ssl.SSLError as exc:
        if "KEY_VALUES_MISMATCH" in str(exc) or "key values mismatch" in str(exc):
            raise TLSFileError(
                f"tls_key {key}: this key does not match the certificate in {cert}"
            ) from None
        raise TLSFileError(f"tls_key {key} or tls_cert {cert}: {exc.reason or exc}") from None
    if client_ca is not None:
        _check_ca(client_ca)
        context.load_verify_locations(cafile=client_ca)
        if crl is not None:
            _check_crl(crl)
            context.load_verify_locations(cafile=crl)
            context.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
            # A resumed session skips the certificate checks: a certificate revoked since its
            # ticket was issued would come back with the ticket.
            context.num_tickets = 0


def _check_ca(path: Path) -> None:
    from cryptography import x509

    data = _readable(path, "tls_client_ca")
    try:
        x509.load_pem_x509_certificates(data)
    except ValueError:
        raise TLSFileError(f"tls_client_ca {path}: not a PEM certificate") from None


def _check_crl(path: Path) -> None:
    from cryptography import x509

    data = _readable(path, "tls_crl")
    try:
        crl = x509.load_pem_x509_crl(data)
    except ValueError:
        raise TLSFileError(f"tls_crl {path}: not a PEM CRL") from None
    next_update = crl.next_update_utc
    if next_update is not None and next_update < datetime.datetime.now(datetime.UTC):
        raise TLSFileError(
            f"tls_crl {path}: out of date since {next_update:%Y-%m-%d %H:%M} UTC"
            " (every client certificate would be refused): make it again"
        )


def _readable(path: Path, setting: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise TLSFileError(f"{setting} {path}: no such file") from None
    except OSError as exc:
        raise TLSFileError(f"{setting} {path}: cannot be read ({exc.strerror})") from None


def _check_certificate(path: Path) -> None:
    from cryptography import x509  # only with TLS configured: 10 MB of RSS otherwise

    data = _readable(path, "tls_cert")
    try:
        leaf = x509.load_pem_x509_certificates(data)[0]
    except ValueError:
        raise TLSFileError(f"tls_cert {path}: not a PEM certificate") from None
    now = datetime.datetime.now(datetime.UTC)
    if leaf.not_valid_after_utc < now:
        raise TLSFileError(
            f"tls_cert {path}: the certificate expired on {leaf.not_valid_after_utc:%Y-%m-%d}"
        )
    if leaf.not_valid_before_utc > now:
        raise TLSFileError(
            f"tls_cert {path}: the certificate is not valid before"
            f" {leaf.not_valid_before_utc:%Y-%m-%d %H:%M} UTC"
        )
