"""TLS files reloaded on SIGHUP without a restart: new handshakes get the new server
certificate while a connection made before keeps working; a revocation written to the CRL
refuses the certificate from then on; a file that cannot serve is logged and the files in use
stay."""

from __future__ import annotations

import asyncio
import datetime
import signal
import ssl
import time
from pathlib import Path

import aiohttp
import pytest
from cryptography import x509

import certs
from tests.test_serve import Server, start


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    directory = tmp_path / "pki"
    ca = certs.create_ca()
    certs.write(directory, "ca", ca)
    certs.write(directory, "server", certs.issue_server(ca, ["localhost"]))
    certs.write(directory, "dev", certs.issue_client(ca, "dev"))
    (directory / "crl.pem").write_bytes(certs.make_crl(ca, {}))
    return directory


def serve(tmp_path: Path, pki: Path) -> Server:
    return start(tmp_path / "data", "--tls-cert", str(pki / "server.pem"),
                 "--tls-key", str(pki / "server.key"), "--tls-client-ca", str(pki / "ca.pem"),
                 "--tls-client-auth", "optional", "--tls-crl", str(pki / "crl.pem"),
                 "--https-port", "0", "--wss-port", "0", "--mqtts-port", "0",
                 "--mqtt-wss-port", "0")  # fmt: skip


def context(pki: Path, holder: str | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=pki / "ca.pem")
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2  # a refused certificate fails the handshake
    if holder is not None:
        ctx.load_cert_chain(pki / f"{holder}.pem", pki / f"{holder}.key")
    return ctx


async def served_serial(port: int, pki: Path) -> int:
    _, writer = await asyncio.open_connection("localhost", port, ssl=context(pki))
    der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    writer.close()
    return x509.load_der_x509_certificate(der).serial_number


async def until_serial(port: int, pki: Path, serial: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while await served_serial(port, pki) != serial:
        assert time.monotonic() < deadline, "the new certificate is not served"
        await asyncio.sleep(0.1)


async def health(port: int, ctx: ssl.SSLContext) -> int:
    async with aiohttp.ClientSession() as s:
        async with s.get(f"https://localhost:{port}/health", ssl=ctx) as r:
            return r.status


def test_sighup_reloads_the_certificate_and_the_crl(tmp_path: Path, pki: Path) -> None:
    server = serve(tmp_path, pki)
    port = server.ports["https"]
    try:

        async def flow() -> None:
            first = x509.load_pem_x509_certificate((pki / "server.pem").read_bytes())
            assert await served_serial(port, pki) == first.serial_number
            # A connection made before the reload.
            reader, writer = await asyncio.open_connection("localhost", port, ssl=context(pki))
            # A new server certificate in place of the old, then SIGHUP.
            renewed = certs.issue_server(certs.load_ca(pki), ["localhost"])
            (pki / "server.key").write_bytes(renewed.key_pem())
            (pki / "server.pem").write_bytes(renewed.cert_pem())
            server.proc.send_signal(signal.SIGHUP)
            await until_serial(port, pki, renewed.certificate.serial_number)
            writer.write(b"GET /health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            assert (await reader.read()).startswith(b"HTTP/1.1 200")  # the old one still works
            # Revoke the client certificate: refused after the next SIGHUP, not before.
            assert await health(port, context(pki, "dev")) == 200
            dev = x509.load_pem_x509_certificate((pki / "dev.pem").read_bytes())
            now = datetime.datetime.now(datetime.UTC)
            (pki / "crl.pem").write_bytes(
                certs.make_crl(
                    certs.load_ca(pki),
                    {dev.serial_number: now},
                    after=certs.crl_updated(pki / "crl.pem"),
                )
            )
            server.proc.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 10
            while True:
                try:
                    await health(port, context(pki, "dev"))
                except aiohttp.ClientError:
                    break
                assert time.monotonic() < deadline, "the revocation is not in force"
                await asyncio.sleep(0.1)
            # A certificate file that cannot serve: logged, the files in use stay.
            (pki / "server.pem").write_text("not a certificate")
            server.proc.send_signal(signal.SIGHUP)
            await asyncio.sleep(0.5)
            assert await served_serial(port, pki) == renewed.certificate.serial_number
            assert server.proc.poll() is None

        asyncio.run(flow())
    finally:
        server.proc.terminate()
        _, err = server.proc.communicate(timeout=20)
    assert "tls: certificate, key, client CA and CRL reloaded" in err
    assert "tls: not reloaded, the files in use stay: tls_cert" in err


def test_a_changed_file_is_reloaded_without_a_signal(tmp_path: Path, pki: Path) -> None:
    """The certificate renewed in place (written over, or renamed over as tools like certbot
    do): served from the next handshake on, no SIGHUP."""
    server = serve(tmp_path, pki)
    port = server.ports["https"]
    try:

        async def flow() -> None:
            ca = certs.load_ca(pki)
            renewed = certs.issue_server(ca, ["localhost"])
            (pki / "server.key").write_bytes(renewed.key_pem())
            (pki / "server.pem").write_bytes(renewed.cert_pem())
            # Written at once after the start: the periodic look finds it if the watch was late.
            await until_serial(port, pki, renewed.certificate.serial_number, timeout=20)
            again = certs.issue_server(ca, ["localhost"])
            for name, data in (("server.key", again.key_pem()), ("server.pem", again.cert_pem())):
                (pki / f"{name}.new").write_bytes(data)
                (pki / f"{name}.new").rename(pki / name)
            await until_serial(port, pki, again.certificate.serial_number)

        asyncio.run(flow())
    finally:
        server.proc.kill()
        server.proc.wait()
