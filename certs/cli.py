"""``conduit certs``: the PKI tool from the command line (see :mod:`certs`).

    conduit certs ca     --dir pki [--cn "Conduit CA"] [--import-cert F --import-key F]
    conduit certs server --dir pki --name example.com --name 192.0.2.10 [--out server]
    conduit certs client --dir pki CLIENT_ID [--csr client.csr] [--out NAME]
    conduit certs revoke --dir pki --cert FILE | --serial HEX
    conduit certs crl    --dir pki
    conduit certs show   FILE

Every command takes ``--key-type`` (ec, rsa2048, rsa4096, ed25519) and ``--days`` where it makes
a certificate. Files are never overwritten; keys are written with mode 0600.
"""

from __future__ import annotations

from pathlib import Path
from typing import NoReturn

import click
from cryptography import x509

import certs

DIR = click.option(
    "--dir", "directory", type=click.Path(path_type=Path), default=Path("pki"), show_default=True,
    help="The PKI directory (ca.pem, ca.key and what was issued)",
)  # fmt: skip
KEY_TYPE = click.option(
    "--key-type", type=click.Choice(certs.KEY_TYPES), default="ec", show_default=True,
    help="ECDSA P-256 (ec), RSA 2048 or 4096, or Ed25519",
)  # fmt: skip


def _fail(exc: certs.PKIError) -> NoReturn:
    raise click.ClickException(str(exc))


def _written(cert: Path, key: Path | None) -> None:
    click.echo(f"certificate: {cert}")
    if key is not None:
        click.echo(f"key:         {key} (mode 0600)")


@click.group("certs")
def group() -> None:
    """The PKI tool: a CA, server and client certificates."""


@group.command()
@DIR
@KEY_TYPE
@click.option("--cn", default="Conduit CA", show_default=True, help="The CA's common name")
@click.option("--days", type=int, default=certs.CA_DAYS, show_default=True)
@click.option("--import-cert", type=click.Path(exists=True, path_type=Path), default=None,
              help="Import this CA certificate (PEM) instead of creating one")  # fmt: skip
@click.option("--import-key", type=click.Path(exists=True, path_type=Path), default=None,
              help="The key of --import-cert (PEM, unencrypted)")  # fmt: skip
def ca(
    directory: Path,
    key_type: certs.KeyType,
    cn: str,
    days: int,
    import_cert: Path | None,
    import_key: Path | None,
) -> None:
    """Create the CA of a PKI directory, or import one."""
    try:
        if (import_cert is None) != (import_key is None):
            raise certs.PKIError("--import-cert and --import-key go together")
        if import_cert is not None and import_key is not None:
            issued = certs.import_ca(import_cert.read_bytes(), import_key.read_bytes())
        else:
            issued = certs.create_ca(cn, key_type=key_type, days=days)
        _written(*certs.write(directory, "ca", issued))
    except certs.PKIError as exc:
        _fail(exc)


@group.command()
@DIR
@KEY_TYPE
@click.option(
    "--name", "names", multiple=True, required=True,
    help="A DNS name or IP address of the server (repeat; the first is the CN)",
)  # fmt: skip
@click.option("--days", type=int, default=certs.SERVER_DAYS, show_default=True)
@click.option("--out", default="server", show_default=True, help="Base name of the files")
def server(
    directory: Path, key_type: certs.KeyType, names: tuple[str, ...], days: int, out: str
) -> None:
    """Issue a server certificate (tls_cert and tls_key of `conduit serve`)."""
    try:
        issued = certs.issue_server(certs.load_ca(directory), list(names), key_type=key_type,
                                    days=days)  # fmt: skip
        _written(*certs.write(directory, out, issued))
    except certs.PKIError as exc:
        _fail(exc)


@group.command()
@DIR
@KEY_TYPE
@click.argument("common_name")
@click.option("--days", type=int, default=certs.CLIENT_DAYS, show_default=True)
@click.option("--csr", type=click.Path(exists=True, path_type=Path), default=None,
              help="Sign this CSR (PEM) instead of making a key")  # fmt: skip
@click.option("--out", default=None, help="Base name of the files (default: client-<CN>)")
def client(
    directory: Path,
    key_type: certs.KeyType,
    common_name: str,
    days: int,
    csr: Path | None,
    out: str | None,
) -> None:
    """Issue a client certificate whose CN is COMMON_NAME: the client's id (or its secret with
    mtls_identity = secret)."""
    try:
        issued = certs.issue_client(
            certs.load_ca(directory), common_name, key_type=key_type, days=days,
            csr_pem=csr.read_bytes() if csr is not None else None,
        )  # fmt: skip
        _written(*certs.write(directory, out or f"client-{common_name}", issued))
    except certs.PKIError as exc:
        _fail(exc)


@group.command()
@click.argument("file", type=click.Path(exists=True, path_type=Path))
def show(file: Path) -> None:
    """What a certificate says: subject, issuer, serial, validity, names."""
    try:
        cert = x509.load_pem_x509_certificate(file.read_bytes())
    except ValueError:
        raise click.ClickException(f"{file}: not a PEM certificate") from None
    click.echo(f"subject:   {cert.subject.rfc4514_string()}")
    click.echo(f"issuer:    {cert.issuer.rfc4514_string()}")
    click.echo(f"serial:    {cert.serial_number:x}")
    click.echo(f"valid:     {cert.not_valid_before_utc:%Y-%m-%d %H:%M} to "
               f"{cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC")  # fmt: skip
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        click.echo(f"names:     {', '.join(str(n.value) for n in sans)}")
    except x509.ExtensionNotFound:
        pass


@group.command()
@DIR
@click.option("--serial", "serials", multiple=True, help="A serial number, in hex (repeat)")
@click.option("--cert", "files", multiple=True, type=click.Path(exists=True, path_type=Path),
              help="A certificate file whose serial is revoked (repeat)")  # fmt: skip
def revoke(directory: Path, serials: tuple[str, ...], files: tuple[Path, ...]) -> None:
    """Revoke certificates (by serial or file) and write the CRL again (crl.pem)."""
    try:
        numbers = [int(s, 16) for s in serials]
    except ValueError:
        raise click.ClickException("a serial is hexadecimal") from None
    for file in files:
        numbers.append(x509.load_pem_x509_certificate(file.read_bytes()).serial_number)
    if not numbers:
        raise click.ClickException("nothing to revoke: give --serial or --cert")
    try:
        path = certs.revoke(directory, numbers)
    except certs.PKIError as exc:
        _fail(exc)
    click.echo(f"revoked: {', '.join(f'{n:x}' for n in numbers)}")
    click.echo(f"crl:     {path}")


@group.command()
@DIR
def crl(directory: Path) -> None:
    """Write the CRL again (crl.pem; valid 7 days: make it again before then)."""
    try:
        click.echo(f"crl: {certs.write_crl(directory)}")
    except certs.PKIError as exc:
        _fail(exc)
