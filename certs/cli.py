"""``conduit certs``: the PKI tool from the command line (see :mod:`certs`).

    conduit certs ca     [--dir pki] [--cn "Conduit CA"] [--import-cert F --import-key F]
    conduit certs server [--dir pki] --name example.com --name 192.0.2.10 [--out server]
    conduit certs client [--dir pki] CLIENT_ID | --domain D CLIENT [--csr F] [--out NAME]
    conduit certs revoke [--dir pki] --serial HEX | --cert FILE | --domain D --client C
    conduit certs crl    [--dir pki]
    conduit certs list   [--domain D] [--client C]
    conduit certs show   FILE

The PKI directory defaults to ``pki_dir`` (``<data_dir>/pki``). What is issued and revoked is
recorded in Conduit's store, found through the same settings as ``conduit serve`` (the
``CONDUIT_`` variables, or ``--config``). Every command that makes a certificate takes
``--key-type`` (ec, rsa2048, rsa4096, ed25519) and ``--days``. Files are never overwritten;
keys are written with mode 0600.
"""

from __future__ import annotations

import asyncio
import datetime
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click
from cryptography import x509

import certs
from certs.authority import Authority

T = TypeVar("T")

DIR = click.option(
    "--dir", "directory", type=click.Path(path_type=Path), default=None,
    help="The PKI directory (ca.pem, ca.key and what was issued) [default: pki_dir]",
)  # fmt: skip
KEY_TYPE = click.option(
    "--key-type", type=click.Choice(certs.KEY_TYPES), default="ec", show_default=True,
    help="ECDSA P-256 (ec), RSA 2048 or 4096, or Ed25519",
)  # fmt: skip


def _fail(exc: Exception) -> NoReturn:
    raise click.ClickException(str(exc))


def _written(cert: Path, key: Path | None) -> None:
    click.echo(f"certificate: {cert}")
    if key is not None:
        click.echo(f"key:         {key} (mode 0600)")


def _settings() -> Any:
    from conduit.settings import Settings

    return Settings.load(click.get_current_context().obj)


def _directory(directory: Path | None) -> Path:
    return directory if directory is not None else Path(_settings().pki)


def _with_authority(directory: Path | None, work: Callable[[Authority], Awaitable[T]]) -> T:
    """Run ``work`` with the authority of the PKI directory and the configured store."""
    from core.errors import UnavailableError
    from core.store import StoreError

    settings = _settings()
    pki = directory if directory is not None else Path(settings.pki)

    async def run() -> T:
        store = settings.make_store()
        await store.open()
        try:
            return await work(Authority(store, pki, mode=settings.mtls_identity))
        finally:
            await store.close()

    try:
        return asyncio.run(run())
    except (certs.PKIError, StoreError, UnavailableError) as exc:
        _fail(exc)


@click.group("certs")
@click.option(
    "--config", type=click.Path(path_type=Path), envvar="CONDUIT_CONFIG", default=None,
    help="TOML configuration file, for the store and pki_dir [CONDUIT_CONFIG]",
)  # fmt: skip
@click.pass_context
def group(ctx: click.Context, config: Path | None) -> None:
    """The PKI tool: a CA, server and client certificates, revocation and the CRL."""
    ctx.obj = config


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
    directory: Path | None,
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
        _written(*certs.write(_directory(directory), "ca", issued))
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
    directory: Path | None, key_type: certs.KeyType, names: tuple[str, ...], days: int, out: str
) -> None:
    """Issue a server certificate (tls_cert and tls_key of `conduit serve`)."""

    async def work(authority: Authority) -> None:
        target = authority.directory / f"{out}.pem"
        if target.exists():
            raise certs.PKIError(f"{target} exists: not overwritten")
        issued, _ = await authority.issue_server(list(names), key_type=key_type, days=days)
        _written(*certs.write(authority.directory, out, issued))

    _with_authority(directory, work)


@group.command()
@DIR
@KEY_TYPE
@click.argument("client")
@click.option("--domain", default=None,
              help="CLIENT is a provisioned client of this domain (id or name); without it,"
                   " CLIENT is the certificate's CN as given")  # fmt: skip
@click.option(
    "--secret", default=None, help="The client's secret (with --domain and mtls_identity = secret)"
)
@click.option("--days", type=int, default=certs.CLIENT_DAYS, show_default=True)
@click.option("--csr", type=click.Path(exists=True, path_type=Path), default=None,
              help="Sign this CSR (PEM) instead of making a key")  # fmt: skip
@click.option("--out", default=None, help="Base name of the files (default: client-<CN>)")
def client(
    directory: Path | None,
    key_type: certs.KeyType,
    client: str,
    domain: str | None,
    secret: str | None,
    days: int,
    csr: Path | None,
    out: str | None,
) -> None:
    """Issue a client certificate. Its CN is the client's id (or its secret with
    mtls_identity = secret): CLIENT as given, or the provisioned client named with --domain."""
    csr_pem = csr.read_bytes() if csr is not None else None

    async def work(authority: Authority) -> None:
        if domain is not None:
            issued, record = await authority.issue_client(
                domain, client, secret=secret, key_type=key_type, days=days, csr_pem=csr_pem
            )
        else:
            issued, record = await authority.issue_named(
                client, key_type=key_type, days=days, csr_pem=csr_pem
            )
        name = out or f"client-{record.client_id or client}"
        _written(*certs.write(authority.directory, name, issued))
        click.echo(f"serial:      {record.serial}")

    _with_authority(directory, work)


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
@click.option("--domain", default=None, help="With --client: every certificate of a client")
@click.option("--client", "client_ref", default=None, help="A client's id or name (--domain)")
def revoke(
    directory: Path | None,
    serials: tuple[str, ...],
    files: tuple[Path, ...],
    domain: str | None,
    client_ref: str | None,
) -> None:
    """Revoke certificates (by serial, by file, or every one of a client) and write the CRL
    again (crl.pem). Running servers end the connections made with them at their next check
    (cache_ttl); the management API's revocation ends them at once."""
    try:
        numbers = [f"{int(s, 16):x}" for s in serials]
    except ValueError:
        raise click.ClickException("a serial is hexadecimal") from None
    if (domain is None) != (client_ref is None):
        raise click.ClickException("--domain and --client go together")
    if not (numbers or files or client_ref):
        raise click.ClickException("nothing to revoke: give --serial, --cert or --client")

    async def work(authority: Authority) -> list[str]:
        wanted = list(numbers)
        for file in files:
            try:
                cert = x509.load_pem_x509_certificate(file.read_bytes())
            except ValueError:
                raise certs.PKIError(f"{file}: not a PEM certificate") from None
            wanted.append((await authority.adopt(cert)).serial)
        newly = await authority.revoke(wanted) if wanted else []
        if domain is not None and client_ref is not None:
            newly += await authority.revoke_client(domain, client_ref)
        return newly

    newly = _with_authority(directory, work)
    click.echo(f"revoked: {', '.join(newly) if newly else 'nothing new (already revoked)'}")
    click.echo(f"crl:     {_directory(directory) / 'crl.pem'}")


@group.command()
@DIR
def crl(directory: Path | None) -> None:
    """Write the CRL again (crl.pem; valid 7 days: `conduit serve` makes it again daily)."""
    click.echo(f"crl: {_with_authority(directory, lambda authority: authority.write_crl())}")


@group.command("list")
@DIR
@click.option("--domain", default=None, help="Only the certificates of this domain's clients")
@click.option("--client", "client_id", default=None, help="Only this client's (its id)")
def list_(directory: Path | None, domain: str | None, client_id: str | None) -> None:
    """The certificates the CA issued, oldest first, and whether they are revoked."""

    async def work(authority: Authority) -> list[Any]:
        return await authority.store.list_certificates(domain, client_id)

    for record in _with_authority(directory, work):
        state = "good" if record.revoked is None else f"revoked {_when(record.revoked)}"
        owner = f"{record.domain}/{record.client_id}" if record.client_id else "-"
        click.echo(
            f"{record.serial}  {record.kind:6}  {record.common_name}  {owner}"
            f"  until {_when(record.not_after)}  {state}"
        )


def _when(timestamp: float) -> str:
    return f"{datetime.datetime.fromtimestamp(timestamp, datetime.UTC):%Y-%m-%d %H:%M}"
