"""The PKI tool (`certs/`, `conduit certs ...`): a CA, server and client certificates that real
TLS stacks accept, keys with mode 0600, nothing overwritten, random serials, the defaults of
issue 14 (CA 3 years, server 1000 days, client 2 years), CSRs signed without a key leaving the
client, and `conduit serve` serving HTTPS with what the tool made."""

from __future__ import annotations

import asyncio
import datetime
import ssl
import stat
from pathlib import Path

import aiohttp
import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

import certs
from conduit.cli import main
from tests.test_serve import start


@pytest.fixture(autouse=True)
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The store `conduit certs` records in (CONDUIT_DATA_DIR), one per test."""
    monkeypatch.setenv("CONDUIT_DATA_DIR", str(tmp_path / "data"))
    return tmp_path / "data"


def run(*args: str) -> str:
    result = CliRunner().invoke(main, ["certs", *args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def refused(*args: str) -> str:
    result = CliRunner().invoke(main, ["certs", *args])
    assert result.exit_code != 0
    return result.output


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    directory = tmp_path / "pki"
    run("ca", "--dir", str(directory))
    run("server", "--dir", str(directory), "--name", "localhost", "--name", "127.0.0.1")
    run("client", "--dir", str(directory), "dev-1")
    return directory


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def days(cert: x509.Certificate) -> float:
    return (cert.not_valid_after_utc - cert.not_valid_before_utc) / datetime.timedelta(days=1)


def test_files_modes_and_defaults(pki: Path) -> None:
    for key in ("ca.key", "server.key", "client-dev-1.key"):
        assert stat.S_IMODE((pki / key).stat().st_mode) == 0o600
    assert stat.S_IMODE(pki.stat().st_mode) == 0o700
    ca, server, client = (
        load(pki / "ca.pem"),
        load(pki / "server.pem"),
        load(pki / "client-dev-1.pem"),
    )
    assert round(days(ca)) == 3 * 365 and round(days(server)) == 1000 and round(days(client)) == 730
    assert isinstance(ca.public_key(), ec.EllipticCurvePublicKey)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    eku = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(n.value) for n in sans] == ["localhost", "127.0.0.1"]
    assert client.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "dev-1"
    assert certs.common_name(client) == "dev-1"
    assert len({ca.serial_number, server.serial_number, client.serial_number}) == 3
    for cert in (server, client):
        cert.verify_directly_issued_by(ca)


def test_nothing_is_overwritten_and_a_ca_comes_first(tmp_path: Path, pki: Path) -> None:
    before = (pki / "ca.key").read_bytes()
    assert "exists: not overwritten" in refused("ca", "--dir", str(pki))
    assert (pki / "ca.key").read_bytes() == before
    assert "exists: not overwritten" in refused("client", "--dir", str(pki), "dev-1")
    empty = tmp_path / "empty"
    assert "no CA in" in refused("server", "--dir", str(empty), "--name", "x")
    assert "1 to 64 characters" in refused("client", "--dir", str(pki), "x" * 65)


@pytest.mark.parametrize("key_type", ["rsa2048", "ed25519"])
def test_other_key_types(tmp_path: Path, key_type: str) -> None:
    directory = tmp_path / "pki"
    run("ca", "--dir", str(directory), "--key-type", key_type, "--days", "30")
    run("server", "--dir", str(directory), "--key-type", key_type, "--name", "localhost")
    ca, server = load(directory / "ca.pem"), load(directory / "server.pem")
    server.verify_directly_issued_by(ca)
    assert round(days(ca)) == 30
    assert server.not_valid_after_utc <= ca.not_valid_after_utc  # never outlives its CA


def test_a_csr_is_signed_and_its_subject_not_trusted(pki: Path, tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "admin")]))
        .sign(key, hashes.SHA256())
    )
    path = tmp_path / "dev.csr"
    path.write_bytes(csr.public_bytes(serialization.Encoding.PEM))
    output = run("client", "--dir", str(pki), "dev-2", "--csr", str(path))
    assert "key:" not in output and not (pki / "client-dev-2.key").exists()
    cert = load(pki / "client-dev-2.pem")
    assert certs.common_name(cert) == "dev-2"  # what Conduit says, not what the CSR asked
    assert cert.public_key() == key.public_key()
    path.write_bytes(
        b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"
    )
    assert "not a PEM certificate signing request" in refused(
        "client", "--dir", str(pki), "dev-3", "--csr", str(path)
    )


def test_an_imported_ca_signs(tmp_path: Path, pki: Path) -> None:
    other = tmp_path / "other"
    run("ca", "--dir", str(other), "--import-cert", str(pki / "ca.pem"),
        "--import-key", str(pki / "ca.key"))  # fmt: skip
    run("client", "--dir", str(other), "dev-9")
    load(other / "client-dev-9.pem").verify_directly_issued_by(load(pki / "ca.pem"))
    assert "does not match" in refused(
        "ca", "--dir", str(tmp_path / "third"), "--import-cert", str(pki / "ca.pem"),
        "--import-key", str(pki / "server.key"),
    )  # fmt: skip
    assert "not a CA's" in refused(
        "ca", "--dir", str(tmp_path / "fourth"), "--import-cert", str(pki / "server.pem"),
        "--import-key", str(pki / "server.key"),
    )  # fmt: skip


async def says_ok(context: ssl.SSLContext, seen: list[bytes] | None = None) -> asyncio.Server:
    """A TLS server on a free port that answers "ok" and closes, keeping each client's
    certificate (DER) in ``seen``."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if seen is not None:
            seen.append(writer.get_extra_info("ssl_object").getpeercert(binary_form=True))
        writer.write(b"ok")
        await writer.drain()
        writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0, ssl=context)


def dev_client(pki: Path) -> ssl.SSLContext:
    """A client context trusting the CA and holding the certificate of client ``dev-1``."""
    context = ssl.create_default_context(cafile=pki / "ca.pem")
    context.load_cert_chain(pki / "client-dev-1.pem", pki / "client-dev-1.key")
    return context


async def test_mutual_tls_handshake_with_what_the_tool_made(pki: Path) -> None:
    """Python's TLS stack (OpenSSL) on both sides: the server proves its name, the client its
    certificate, and the server reads the client id from the CN."""
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(pki / "server.pem", pki / "server.key")
    server_ctx.load_verify_locations(pki / "ca.pem")
    server_ctx.verify_mode = ssl.CERT_REQUIRED
    seen: list[bytes] = []
    server = await says_ok(server_ctx, seen)
    port = server.sockets[0].getsockname()[1]
    client_ctx = dev_client(pki)
    for host in ("localhost", "127.0.0.1"):
        reader, writer = await asyncio.open_connection(host, port, ssl=client_ctx)
        assert await reader.read() == b"ok"
        writer.close()
    names = [certs.common_name(x509.load_der_x509_certificate(der)) for der in seen]
    assert names == ["dev-1", "dev-1"]
    server.close()
    await server.wait_closed()


def test_conduit_serves_https_with_the_tools_certificate(pki: Path, tmp_path: Path) -> None:
    server = start(tmp_path / "data", "--tls-cert", str(pki / "server.pem"),
                   "--tls-key", str(pki / "server.key"), "--https-port", "0", "--wss-port", "0",
                   "--mqtts-port", "0", "--mqtt-wss-port", "0")  # fmt: skip
    try:

        async def health() -> int:
            trust = ssl.create_default_context(cafile=pki / "ca.pem")
            async with aiohttp.ClientSession() as s:
                url = f"https://localhost:{server.ports['https']}/health"
                async with s.get(url, ssl=trust) as r:
                    return r.status

        assert asyncio.run(health()) == 200
    finally:
        server.proc.kill()
        server.proc.wait()


def test_the_magistrala_makefile(tmp_path: Path) -> None:
    """`make ca server_cert client_cert CLIENT_SECRET=...` as Magistrala users type it."""
    import shutil
    import subprocess
    import sys

    location = tmp_path / "certs"
    conduit = f"{sys.executable} -m conduit.cli"
    make = ["make", "-s", "-C", str(Path(__file__).parents[1] / "certs"),
            f"CRT_LOCATION={location}", f"CONDUIT={conduit}"]  # fmt: skip
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    r = subprocess.run([*make, "client_cert"], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "CLIENT_SECRET is not set" in r.stdout
    for target in (["ca"], ["server_cert"], ["client_cert", "CLIENT_SECRET=s3cr3t-value"]):
        r = subprocess.run([*make, *target], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
    ca = load(location / "ca.crt")
    server = load(location / "magistrala-server.crt")
    client = load(location / "client.crt")
    assert certs.common_name(client) == "s3cr3t-value"
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(n.value) for n in sans] == ["localhost", "nginx"]
    assert round(days(server)) == 1000 and round(days(client)) == 730
    for cert in (server, client):
        cert.verify_directly_issued_by(ca)
    assert stat.S_IMODE((location / "client.key").stat().st_mode) == 0o600


async def test_a_crl_made_in_the_same_second_takes_over(pki: Path) -> None:
    """OpenSSL checks with the CRL of the latest thisUpdate, to the second, and keeps the first
    loaded on a tie: each CRL the tool writes is a second later than the one it replaces, so a
    revocation right after the last CRL is in force once the server loads it again."""
    from conduit.tls import reload, server_context

    paths = (pki / "server.pem", pki / "server.key", pki / "ca.pem")
    await asyncio.to_thread(run, "crl", "--dir", str(pki))  # the CLI runs its own loop
    first = x509.load_pem_x509_crl((pki / "crl.pem").read_bytes())
    context = server_context(*paths, "required", pki / "crl.pem")
    assert context is not None

    server = await says_ok(context)
    port = server.sockets[0].getsockname()[1]
    client = dev_client(pki)

    async def answer() -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client)
        data = await reader.read()
        writer.close()
        return data

    assert await answer() == b"ok"
    await asyncio.to_thread(
        run, "revoke", "--dir", str(pki), "--cert", str(pki / "client-dev-1.pem")
    )
    second = x509.load_pem_x509_crl((pki / "crl.pem").read_bytes())
    assert second.last_update_utc > first.last_update_utc
    numbers = [c.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
               for c in (first, second)]  # fmt: skip
    assert numbers[1] > numbers[0]
    reload(context, *paths, "required", pki / "crl.pem")
    try:  # TLS 1.3: the client learns of the refusal after its side of the handshake
        refused = await answer()
    except (ssl.SSLError, ConnectionResetError) as exc:
        refused = str(exc).encode()
    assert refused != b"ok", "the revocation is not in force"
    server.close()
    await server.wait_closed()
