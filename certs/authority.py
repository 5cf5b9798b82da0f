"""Conduit's CA at work: what it issues and revokes is recorded in the store, and the CRL and
the OCSP answers are made from that record. The CLI (``conduit certs``) and the management API
both go through :class:`Authority`, so the two never disagree.

The CA itself (``ca.pem``, ``ca.key``) stays in its PKI directory, where ``conduit certs ca``
made or imported it; the CRL is written beside it (``crl.pem``), where ``tls_crl`` can name it.
A revocation through the management API is announced on the bus (a ``certificate``
:class:`~core.bus.Change`): every node ends the connections made with that certificate at once.
One made with the CLI, which has no bus, reaches running servers at their next recheck
(``cache_ttl``) and their next reading of the CRL file (they watch it).

With ``mtls_identity = secret`` a client certificate's CN is the client's secret, which Conduit
keeps only as a hash: such a certificate is recorded without its PEM and without its CN, so the
store never holds the secret.
"""

from __future__ import annotations

import datetime
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.x509 import ocsp

import certs
from certs import CLIENT_DAYS, SERVER_DAYS, Issued, KeyType, PKIError
from core.auth.secrets import hash_secret
from core.bus import Change
from core.store import IssuedCertificate, NotFound, Store

Mode = Literal["client_id", "secret"]
SECRET_CN = "(the client's secret)"  # what is recorded for a CN that is a secret

OCSP_VALIDITY = datetime.timedelta(hours=1)  # an OCSP answer's nextUpdate
"""How long a relying party may keep an OCSP answer: revocation is immediate here, so short."""


def serial_hex(serial: int) -> str:
    """A serial as the store keys it and people see it: lowercase hex (``conduit certs show``)."""
    return f"{serial:x}"


class Authority:
    """The CA of a PKI directory, with the store's record of what it issued."""

    def __init__(
        self,
        store: Store,
        directory: Path,
        *,
        mode: Mode = "client_id",
        announce: Callable[[Change], Awaitable[None]] | None = None,
    ) -> None:
        self.store = store
        self.directory = directory
        self.mode = mode
        self._announce = announce
        self._ca: Issued | None = None

    @property
    def ca(self) -> Issued:
        """The CA (read from the directory once it is there)."""
        if self._ca is None:
            self._ca = certs.load_ca(self.directory)
        return self._ca

    @property
    def has_ca(self) -> bool:
        return self._ca is not None or (self.directory / "ca.key").exists()

    @property
    def crl_path(self) -> Path:
        return self.directory / "crl.pem"

    # issuing ------------------------------------------------------------------------------

    async def record(
        self,
        issued: Issued,
        kind: Literal["client", "server"],
        domain: str | None = None,
        client_id: str | None = None,
        secret_cn: bool = False,
    ) -> IssuedCertificate:
        cert = issued.certificate
        record = IssuedCertificate(
            serial=serial_hex(cert.serial_number),
            kind=kind,
            common_name=SECRET_CN if secret_cn else certs.common_name(cert),
            domain=domain,
            client_id=client_id,
            not_before=cert.not_valid_before_utc.timestamp(),
            not_after=cert.not_valid_after_utc.timestamp(),
            issued=time.time(),
            revoked=None,
            pem="" if secret_cn else issued.cert_pem().decode(),
        )
        await self.store.add_certificate(record)
        return record

    async def issue_client(
        self,
        domain: str,
        ref: str,
        *,
        secret: str | None = None,
        key_type: KeyType = "ec",
        days: int = CLIENT_DAYS,
        csr_pem: bytes | None = None,
    ) -> tuple[Issued, IssuedCertificate]:
        """A certificate for a provisioned client (by id or name): its CN is the client's id,
        or with ``mtls_identity = secret`` the client's ``secret``, which must be its own."""
        client = await self.store.get_client(domain, ref)
        if self.mode == "secret":
            if secret is None:
                raise PKIError(
                    "with mtls_identity = secret the CN is the client's secret: give 'secret'"
                )
            owner = await self.store.client_by_secret(hash_secret(secret))
            if owner is None or owner.id != client.id:
                raise PKIError("the secret given is not this client's")
            common_name = secret
        else:
            common_name = client.id
        issued = certs.issue_client(
            self.ca, common_name, key_type=key_type, days=days, csr_pem=csr_pem
        )
        record = await self.record(
            issued, "client", client.domain, client.id, secret_cn=self.mode == "secret"
        )
        return issued, record

    async def issue_named(
        self,
        common_name: str,
        *,
        key_type: KeyType = "ec",
        days: int = CLIENT_DAYS,
        csr_pem: bytes | None = None,
    ) -> tuple[Issued, IssuedCertificate]:
        """A client certificate for a CN as given (the CLI, Magistrala's Makefile): recorded
        with its client when the CN names one in the current mode."""
        if self.mode == "secret":
            client = await self.store.client_by_secret(hash_secret(common_name))
        else:
            client = await self.store.client_by_id(common_name)
        issued = certs.issue_client(
            self.ca, common_name, key_type=key_type, days=days, csr_pem=csr_pem
        )
        domain, client_id = (client.domain, client.id) if client is not None else (None, None)
        record = await self.record(
            issued, "client", domain, client_id, secret_cn=self.mode == "secret"
        )
        return issued, record

    async def issue_server(
        self, names: list[str], *, key_type: KeyType = "ec", days: int = SERVER_DAYS
    ) -> tuple[Issued, IssuedCertificate]:
        issued = certs.issue_server(self.ca, names, key_type=key_type, days=days)
        return issued, await self.record(issued, "server")

    async def adopt(self, cert: x509.Certificate) -> IssuedCertificate:
        """The record of a certificate this CA signed that the store does not hold (made
        before records were kept): added so that it can be revoked."""
        try:
            cert.verify_directly_issued_by(self.ca.certificate)
        except (ValueError, TypeError, InvalidSignature):
            raise PKIError("the certificate was not issued by this CA") from None
        try:
            return await self.store.get_certificate(serial_hex(cert.serial_number))
        except NotFound:
            pass
        kind: Literal["client", "server"] = "client"
        try:
            eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
            if x509.oid.ExtendedKeyUsageOID.SERVER_AUTH in eku:
                kind = "server"
        except x509.ExtensionNotFound:
            pass
        return await self.record(Issued(cert, None), kind, secret_cn=self.mode == "secret")

    # revoking -----------------------------------------------------------------------------

    async def revoke(self, serials: list[str]) -> list[str]:
        """Revoke certificates this CA issued, by serial (hex): the CRL is written again, and
        the connections made with them end. Returns the serials that were good until now."""
        records = [await self.store.get_certificate(s.lower().lstrip("0") or "0") for s in serials]
        newly = await self.store.revoke_certificates([r.serial for r in records], time.time())
        await self.write_crl()
        if self._announce is not None:
            for record in records:
                if record.serial in newly:
                    await self._announce(Change("certificate", record.domain or "", record.serial))
        return newly

    async def revoke_client(self, domain: str, ref: str) -> list[str]:
        """Revoke every good certificate of a client."""
        client = await self.store.get_client(domain, ref)
        held = await self.store.list_certificates(client.domain, client.id)
        return await self.revoke([c.serial for c in held if c.revoked is None])

    async def crl(self) -> bytes:
        """The CRL (PEM), signed now, listing every revocation the store records; later than
        the one in ``crl.pem`` (see :func:`certs.make_crl`)."""
        listed = await self.store.revoked_certificates()
        return certs.make_crl(
            self.ca,
            {
                int(serial, 16): datetime.datetime.fromtimestamp(int(when), datetime.UTC)
                for serial, when in listed.items()
            },
            after=certs.crl_updated(self.crl_path),
        )

    async def import_revoked_txt(self) -> int:
        """Serials listed in the directory's ``revoked.txt`` (where the tool kept revocations
        before the store did) recorded as revoked, so that the CRL made from the store keeps
        them; the file is renamed ``revoked.txt.imported``. Returns how many were new."""
        path = self.directory / "revoked.txt"
        if not path.exists():
            return 0
        new = 0
        for line in path.read_text().splitlines():
            if not line.strip():
                continue
            serial_text, when_text = line.split()
            serial = serial_hex(int(serial_text, 16))
            when = datetime.datetime.fromisoformat(when_text).timestamp()
            try:
                await self.store.get_certificate(serial)
            except NotFound:
                await self.store.add_certificate(
                    IssuedCertificate(serial, "client", "(from revoked.txt)", None, None,
                                      0.0, 0.0, when, when, "")
                )  # fmt: skip
                new += 1
            else:
                new += len(await self.store.revoke_certificates([serial], when))
        path.rename(path.with_name("revoked.txt.imported"))
        return new

    async def write_crl(self) -> Path:
        """``crl.pem`` made now, replaced in one rename (a server watching it never reads half
        a file)."""
        data = await self.crl()
        tmp = self.crl_path.with_name(f".crl.pem.{os.getpid()}")
        tmp.write_bytes(data)
        tmp.replace(self.crl_path)
        return self.crl_path

    # OCSP (RFC 6960) -------------------------------------------------------------------------

    async def ocsp(self, request_der: bytes) -> bytes:
        """The DER OCSP response to a DER request: good, revoked (with its time) or unknown
        for a serial this CA did not issue; signed by the CA itself."""
        try:
            request = ocsp.load_der_ocsp_request(request_der)
            algorithm = request.hash_algorithm
        except (ValueError, NotImplementedError, x509.UnsupportedGeneralNameType):
            return _unsuccessful(ocsp.OCSPResponseStatus.MALFORMED_REQUEST)
        ca = self.ca
        ours = ocsp.OCSPRequestBuilder().add_certificate(ca.certificate, ca.certificate, algorithm)
        mine = ours.build()
        if (request.issuer_name_hash, request.issuer_key_hash) != (
            mine.issuer_name_hash,
            mine.issuer_key_hash,
        ):
            return _unsuccessful(ocsp.OCSPResponseStatus.UNAUTHORIZED)
        now = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
        revoked_at: datetime.datetime | None = None
        try:
            record = await self.store.get_certificate(serial_hex(request.serial_number))
        except NotFound:
            status = ocsp.OCSPCertStatus.UNKNOWN
        else:
            if record.revoked is None:
                status = ocsp.OCSPCertStatus.GOOD
            else:
                status = ocsp.OCSPCertStatus.REVOKED
                revoked_at = datetime.datetime.fromtimestamp(int(record.revoked), datetime.UTC)
        assert ca.key is not None
        builder = (
            ocsp.OCSPResponseBuilder()
            .add_response_by_hash(
                issuer_name_hash=request.issuer_name_hash,
                issuer_key_hash=request.issuer_key_hash,
                serial_number=request.serial_number,
                algorithm=algorithm,
                cert_status=status,
                this_update=now,
                next_update=now + OCSP_VALIDITY,
                revocation_time=revoked_at,
                revocation_reason=None,
            )
            .responder_id(ocsp.OCSPResponderEncoding.HASH, ca.certificate)
        )
        for extension in request.extensions:
            if isinstance(extension.value, x509.OCSPNonce):
                builder = builder.add_extension(extension.value, critical=False)
        signed = builder.sign(ca.key, certs.signing_hash(ca.key))
        return signed.public_bytes(serialization.Encoding.DER)


def _unsuccessful(status: ocsp.OCSPResponseStatus) -> bytes:
    return ocsp.OCSPResponseBuilder.build_unsuccessful(status).public_bytes(
        serialization.Encoding.DER
    )
