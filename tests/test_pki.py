"""Conduit's CA behind the management API and the CLI, on a real server: certificates issued
and recorded in the store, listed and revoked; the CRL and the OCSP responder made from that
record (checked with ``openssl ocsp``); a revocation ends the connections its certificate
opened, on every protocol, at once through the API and at the next recheck through the CLI;
with ``mtls_identity = secret`` the store never holds the secret."""

from __future__ import annotations

import asyncio
import base64
import shutil
import sqlite3
import ssl
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import aiomqtt
import pytest
import websockets
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import ocsp
from cryptography.x509.oid import NameOID

import certs
from tests.test_serve import Server, start

CONDUIT = [sys.executable, "-m", "conduit.cli"]


@dataclass
class PKIServer:
    server: Server
    data: Path
    pki: Path
    key: str
    clients: dict[str, dict[str, str]]

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.server.ports['api']}"

    def certs(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*CONDUIT, "certs", *args], env=self.server.env, capture_output=True, text=True,
            timeout=60,
        )  # fmt: skip

    async def call(
        self, method: str, path: str, body: Any = None, key: str | None = "admin"
    ) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {self.key}"} if key == "admin" else {}
        async with aiohttp.ClientSession() as s:
            async with s.request(method, self.api + path, json=body, headers=headers) as r:
                if r.content_type in ("application/json", "application/problem+json"):
                    return r.status, await r.json()
                return r.status, await r.read()

    def context(self, holder: str | None) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=self.pki / "ca.pem")
        if holder is not None:
            ctx.load_cert_chain(self.pki / f"{holder}.pem", self.pki / f"{holder}.key")
        return ctx

    async def issue(self, client: str, holder: str) -> dict[str, Any]:
        """A certificate for a provisioned client through the API, written as ``holder``."""
        status, answer = await self.call("POST", f"/domains/acme/clients/{client}/certs", {})
        assert status == 201, answer
        (self.pki / f"{holder}.pem").write_text(answer["pem"])
        (self.pki / f"{holder}.key").write_text(answer["key"])
        return answer  # type: ignore[no-any-return]


def prepare(data: Path, *serve: str) -> PKIServer:
    env = {"CONDUIT_DATA_DIR": str(data)}
    pki = data / "pki"

    def tool(*args: str) -> None:
        r = subprocess.run([*CONDUIT, "certs", *args], env={**_env(), **env},
                           capture_output=True, text=True, timeout=60)  # fmt: skip
        assert r.returncode == 0, r.stderr

    tool("ca")
    tool("server", "--name", "localhost", "--name", "127.0.0.1")
    tool("crl")
    server = start(data, "--tls-cert", str(pki / "server.pem"),
                   "--tls-key", str(pki / "server.key"), "--tls-client-ca", str(pki / "ca.pem"),
                   "--tls-client-auth", "optional", "--tls-crl", str(pki / "crl.pem"),
                   "--https-port", "0", "--wss-port", "0", "--mqtts-port", "0",
                   "--mqtt-wss-port", "0", *serve)  # fmt: skip
    server.cli("domains", "create", "acme")
    server.cli("channels", "create", "--domain", "acme", "temps")
    clients = {}
    for name in ("dev", "other"):
        clients[name] = server.cli_json("clients", "create", "--domain", "acme", name)
        server.cli("connect", "--domain", "acme", "--client", name, "--channel", "temps")
    key = (data / "admin.key").read_text().strip()
    return PKIServer(server, data, pki, key, clients)  # type: ignore[arg-type]


def _env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if not k.startswith("CONDUIT_")}


@pytest.fixture
def conduit(tmp_path: Path) -> Iterator[PKIServer]:
    served = prepare(tmp_path / "data")
    try:
        yield served
    finally:
        served.server.proc.kill()
        served.server.proc.wait()


def test_issue_list_and_revoke_through_the_api(conduit: PKIServer) -> None:
    dev = conduit.clients["dev"]

    async def flow() -> None:
        # Issued: certificate, key and CA, once; the CN is the client's id.
        answer = await conduit.issue("dev", "dev")
        cert = x509.load_pem_x509_certificate(answer["pem"].encode())
        ca = x509.load_pem_x509_certificate(answer["ca"].encode())
        cert.verify_directly_issued_by(ca)
        assert certs.common_name(cert) == dev["id"]
        assert answer["serial"] == f"{cert.serial_number:x}"
        assert answer["client_id"] == dev["id"] and answer["domain"] == "acme"
        assert answer["revoked"] is None
        serialization.load_pem_private_key(answer["key"].encode(), None)
        # Kept in the store: listed, shown, without the key.
        status, listed = await conduit.call("GET", "/domains/acme/clients/dev/certs")
        assert status == 200 and [c["serial"] for c in listed] == [answer["serial"]]
        status, shown = await conduit.call("GET", f"/certs/{answer['serial']}")
        assert status == 200 and "key" not in shown and shown["pem"] == answer["pem"]
        # A CSR: certified with the CN Conduit says, no key in the answer.
        key = ec.generate_private_key(ec.SECP256R1())
        csr = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "admin")]))
            .sign(key, hashes.SHA256())
            .public_bytes(serialization.Encoding.PEM)
            .decode()
        )
        status, signed = await conduit.call("POST", "/domains/acme/clients/dev/certs", {"csr": csr})
        assert status == 201 and "key" not in signed
        assert (
            certs.common_name(x509.load_pem_x509_certificate(signed["pem"].encode())) == dev["id"]
        )
        # Refusals.
        status, problem = await conduit.call(
            "POST", "/domains/acme/clients/dev/certs", {"csr": "not a csr"}
        )
        assert (status, problem["detail"]) == (
            400,
            "the CSR is not a PEM certificate signing request",
        )
        status, problem = await conduit.call(
            "POST", "/domains/acme/clients/dev/certs", {"key_type": "dsa"}
        )
        assert (status, problem["detail"]) == (
            400,
            "'key_type' is one of ec, rsa2048, rsa4096, ed25519",
        )
        status, problem = await conduit.call("POST", "/domains/acme/clients/ghost/certs", {})
        assert (status, problem["detail"]) == (404, "no client 'ghost' in domain 'acme'")
        status, _ = await conduit.call("POST", "/domains/acme/clients/dev/certs", {}, key=None)
        assert status == 401
        status, _ = await conduit.call("GET", "/certs", key=None)
        assert status == 401
        status, problem = await conduit.call("GET", "/certs/zz")
        assert (status, problem["detail"]) == (400, "serial 'zz' is not hexadecimal")
        status, problem = await conduit.call("GET", "/certs/abc")
        assert (status, problem["detail"]) == (404, "no certificate with serial abc")
        # The CA certificate and the CRL are public.
        status, pem = await conduit.call("GET", "/pki/ca.pem", key=None)
        assert status == 200 and pem == (conduit.pki / "ca.pem").read_bytes()
        # Revoked: in the CRL served and in the file the server checks.
        status, revoked = await conduit.call("DELETE", f"/certs/{answer['serial']}")
        assert status == 200 and revoked["revoked"] is not None
        status, crl_pem = await conduit.call("GET", "/pki/crl.pem", key=None)
        for crl in (crl_pem, (conduit.pki / "crl.pem").read_bytes()):
            listed_serials = {r.serial_number for r in x509.load_pem_x509_crl(crl)}
            assert listed_serials == {cert.serial_number}
        # Every certificate of a client at once; revoking again changes nothing.
        status, answer2 = await conduit.call("DELETE", "/domains/acme/clients/dev/certs")
        assert status == 200 and answer2 == {"revoked": [signed["serial"]]}
        status, answer3 = await conduit.call("DELETE", "/domains/acme/clients/dev/certs")
        assert status == 200 and answer3 == {"revoked": []}
        status, everything = await conduit.call("GET", "/certs?domain=acme")
        assert status == 200 and all(c["revoked"] for c in everything) and len(everything) == 2

    asyncio.run(flow())


def test_a_revocation_through_the_api_ends_open_connections_at_once(conduit: PKIServer) -> None:
    """MQTT 5 over TLS, WSS and SSE over HTTPS, all opened with one certificate, end when it is
    revoked (cache_ttl is 30 s: the end comes from the revocation, not a recheck); a new
    handshake with it is refused; another client's certificate still works."""
    ports = conduit.server.ports

    async def flow() -> None:
        dev = await conduit.issue("dev", "dev")
        await conduit.issue("other", "other")
        async with aiomqtt.Client(
            "localhost", ports["mqtts"], identifier="dev-held",
            protocol=aiomqtt.ProtocolVersion.V5, tls_context=conduit.context("dev"),
        ) as mqtt:  # fmt: skip
            await mqtt.subscribe("m/acme/c/temps/#")
            wss = f"wss://localhost:{ports['wss']}/m/acme/c/temps/%23"
            async with websockets.connect(wss, ssl=conduit.context("dev")) as ws:
                async with aiohttp.ClientSession() as http:
                    sse = f"https://localhost:{ports['https']}/m/acme/c/temps/%23"
                    async with http.get(
                        sse, headers={"Accept": "text/event-stream"},
                        ssl=conduit.context("dev"),
                    ) as stream:  # fmt: skip
                        assert stream.status == 200
                        status, _ = await conduit.call("DELETE", f"/certs/{dev['serial']}")
                        assert status == 200
                        async with asyncio.timeout(10):
                            tail = b""
                            async for chunk in stream.content.iter_any():
                                tail += chunk
                        assert b"event: close" in tail and b"certificate revoked" in tail
                with pytest.raises(websockets.ConnectionClosed) as closed:
                    await asyncio.wait_for(ws.recv(), 10)
                assert closed.value.rcvd is not None
                assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (
                    1008,
                    "certificate revoked",
                )
            with pytest.raises(aiomqtt.MqttError, match="Disconnected"):
                async with asyncio.timeout(10):
                    async for _ in mqtt.messages:
                        pass
        # New handshakes with it: refused once the CRL file is reloaded (the server watches it).
        async with asyncio.timeout(20):
            while True:
                try:
                    await post("dev")
                except aiohttp.ClientError:
                    break
                await asyncio.sleep(0.2)
        assert await post("other") == 202

    async def post(holder: str) -> int:
        async with aiohttp.ClientSession() as s:
            url = f"https://localhost:{ports['https']}/m/acme/c/temps/t"
            async with s.post(url, data=b"x", ssl=conduit.context(holder)) as r:
                return r.status

    asyncio.run(flow())


def test_ocsp_answers_from_the_store(conduit: PKIServer) -> None:
    """``openssl ocsp`` (POST) and a GET request (RFC 6960 appendix A): good, revoked, unknown
    for a certificate the store does not record; a malformed request is answered as such."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")

    def check(holder: str) -> str:
        r = subprocess.run(
            ["openssl", "ocsp", "-issuer", str(conduit.pki / "ca.pem"),
             "-cert", str(conduit.pki / f"{holder}.pem"), "-url", f"{conduit.api}/pki/ocsp",
             "-CAfile", str(conduit.pki / "ca.pem")],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert "Response verify OK" in r.stderr, r.stderr
        return r.stdout.splitlines()[0]

    async def flow() -> None:
        dev = await conduit.issue("dev", "dev")
        assert check("dev") == f"{conduit.pki / 'dev.pem'}: good"
        # Signed by the CA but not recorded: unknown.
        certs.write(conduit.pki, "stray", certs.issue_client(certs.load_ca(conduit.pki), "x"))
        assert check("stray") == f"{conduit.pki / 'stray.pem'}: unknown"
        await conduit.call("DELETE", f"/certs/{dev['serial']}")
        assert check("dev") == f"{conduit.pki / 'dev.pem'}: revoked"
        # GET, base64 in the path.
        cert = x509.load_pem_x509_certificate((conduit.pki / "dev.pem").read_bytes())
        ca = x509.load_pem_x509_certificate((conduit.pki / "ca.pem").read_bytes())
        request = ocsp.OCSPRequestBuilder().add_certificate(cert, ca, hashes.SHA256()).build()
        der = request.public_bytes(serialization.Encoding.DER)
        path = "/pki/ocsp/" + urllib.parse.quote(base64.b64encode(der).decode(), safe="")
        status, body = await conduit.call("GET", path, key=None)
        answer = ocsp.load_der_ocsp_response(body)
        assert status == 200 and answer.certificate_status == ocsp.OCSPCertStatus.REVOKED
        status, body = await conduit.call("GET", "/pki/ocsp/bm90LW9jc3A=", key=None)
        malformed = ocsp.load_der_ocsp_response(body)
        assert malformed.response_status == ocsp.OCSPResponseStatus.MALFORMED_REQUEST
        # A request about another CA's certificate: this responder is not authorized for it.
        other_ca = certs.create_ca("Other CA")
        foreign = certs.issue_client(other_ca, "y").certificate
        request = ocsp.OCSPRequestBuilder().add_certificate(
            foreign, other_ca.certificate, hashes.SHA1()
        )
        der = request.build().public_bytes(serialization.Encoding.DER)
        async with aiohttp.ClientSession() as s:
            async with s.post(f"{conduit.api}/pki/ocsp", data=der) as r:
                refused = ocsp.load_der_ocsp_response(await r.read())
        assert refused.response_status == ocsp.OCSPResponseStatus.UNAUTHORIZED

    asyncio.run(flow())


def test_the_cli_records_lists_and_revokes(tmp_path: Path) -> None:
    """`conduit certs client --domain`, `list`, `revoke --domain --client`: the running server
    (cache_ttl 1 s) ends the MQTTS connection of the revoked certificate at its next recheck."""
    conduit = prepare(tmp_path / "data", "--cache-ttl", "1")
    try:
        r = conduit.certs("client", "--domain", "acme", "dev", "--out", "dev")
        assert r.returncode == 0, r.stderr
        issued = x509.load_pem_x509_certificate((conduit.pki / "dev.pem").read_bytes())
        serial = f"{issued.serial_number:x}"
        assert f"serial:      {serial}" in r.stdout
        listed = conduit.certs("list", "--domain", "acme").stdout
        assert f"{serial}  client  {conduit.clients['dev']['id']}  acme/" in listed
        assert listed.rstrip().endswith("good")

        async def flow() -> None:
            async with aiomqtt.Client(
                "localhost", conduit.server.ports["mqtts"], identifier="dev-cli",
                protocol=aiomqtt.ProtocolVersion.V5, tls_context=conduit.context("dev"),
            ) as mqtt:  # fmt: skip
                await mqtt.subscribe("m/acme/c/temps/#")
                revoked = await asyncio.to_thread(
                    conduit.certs, "revoke", "--domain", "acme", "--client", "dev"
                )
                assert revoked.returncode == 0 and f"revoked: {serial}" in revoked.stdout
                with pytest.raises(aiomqtt.MqttError, match="Disconnected"):
                    async with asyncio.timeout(10):
                        async for _ in mqtt.messages:
                            pass

        asyncio.run(flow())
        assert "revoked" in conduit.certs("list").stdout
        again = conduit.certs("revoke", "--serial", serial)
        assert again.returncode == 0 and "nothing new (already revoked)" in again.stdout
        unknown = conduit.certs("revoke", "--serial", "abc")
        assert unknown.returncode == 1 and "no certificate with serial abc" in unknown.stderr
    finally:
        conduit.server.proc.kill()
        conduit.server.proc.wait()


def test_secret_mode_keeps_no_secret_in_the_store(tmp_path: Path) -> None:
    """With mtls_identity = secret the CN is the client's secret: the API needs it (and checks
    it is the client's), and the record keeps neither the CN nor the PEM."""
    conduit = prepare(tmp_path / "data", "--mtls-identity", "secret")
    dev, other = conduit.clients["dev"], conduit.clients["other"]
    try:

        async def flow() -> None:
            path = "/domains/acme/clients/dev/certs"
            status, problem = await conduit.call("POST", path, {})
            assert (status, problem["detail"]) == (
                400,
                "with mtls_identity = secret the CN is the client's secret: give 'secret'",
            )
            status, problem = await conduit.call("POST", path, {"secret": other["secret"]})
            assert (status, problem["detail"]) == (400, "the secret given is not this client's")
            status, answer = await conduit.call("POST", path, {"secret": dev["secret"]})
            assert status == 201
            cert = x509.load_pem_x509_certificate(answer["pem"].encode())
            assert certs.common_name(cert) == dev["secret"]
            status, shown = await conduit.call("GET", f"/certs/{answer['serial']}")
            assert shown["pem"] == "" and shown["common_name"] == "(the client's secret)"
            (conduit.pki / "dev.pem").write_text(answer["pem"])
            (conduit.pki / "dev.key").write_text(answer["key"])
            async with aiohttp.ClientSession() as s:
                url = f"https://localhost:{conduit.server.ports['https']}/m/acme/c/temps/t"
                async with s.post(url, data=b"x", ssl=conduit.context("dev")) as r:
                    assert r.status == 202

        asyncio.run(flow())
        with sqlite3.connect(conduit.data / "conduit.db") as db:
            dump = "\n".join(db.iterdump())
        assert dev["secret"] not in dump
    finally:
        conduit.server.proc.kill()
        conduit.server.proc.wait()


def test_revocations_of_revoked_txt_are_imported(tmp_path: Path) -> None:
    """A PKI directory from before the store kept revocations: its revoked.txt is imported at
    the start and the CRL still lists them."""
    data = tmp_path / "data"
    pki = data / "pki"
    ca = certs.create_ca()
    certs.write(pki, "ca", ca)
    (pki / "revoked.txt").write_text("1f2e 2026-01-02T03:04:05+00:00\n")
    server = start(data)
    try:
        import time

        deadline = time.monotonic() + 20
        while not ((pki / "revoked.txt.imported").exists() and (pki / "crl.pem").exists()):
            assert time.monotonic() < deadline, "revoked.txt was not imported"
            time.sleep(0.1)
        listed = {r.serial_number for r in x509.load_pem_x509_crl((pki / "crl.pem").read_bytes())}
        assert listed == {0x1F2E}
    finally:
        server.proc.kill()
        server.proc.wait()


def test_openssl_refused_at_the_handshake_revoked_and_expired(conduit: PKIServer) -> None:
    """``openssl s_client`` over TLS 1.2 (the refusal comes within the handshake): a good
    certificate gets through; a revoked one (CRL reloaded after the API's revocation) and an
    expired one are refused. (The event loop's TLS layer closes without flushing OpenSSL's
    alert, so the client reads an end of file rather than the alert's name.)"""
    import datetime

    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")

    def s_client(holder: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["openssl", "s_client", "-connect", f"127.0.0.1:{conduit.server.ports['https']}",
             "-CAfile", str(conduit.pki / "ca.pem"), "-cert", str(conduit.pki / f"{holder}.pem"),
             "-key", str(conduit.pki / f"{holder}.key"), "-brief", "-tls1_2"],
            input="", capture_output=True, text=True, timeout=30,
        )  # fmt: skip

    async def flow() -> None:
        good = await conduit.issue("dev", "dev")
        await conduit.issue("other", "other")
        assert s_client("dev").returncode == 0
        await conduit.call("DELETE", f"/certs/{good['serial']}")

    asyncio.run(flow())
    deadline = time.monotonic() + 20
    while (r := s_client("dev")).returncode == 0:
        assert time.monotonic() < deadline, "the CRL was not reloaded"
        time.sleep(0.2)
    assert "unexpected eof" in r.stderr or "alert" in r.stderr, r.stderr
    assert s_client("other").returncode == 0
    # Expired: made by the CA, valid until yesterday.
    ca = certs.load_ca(conduit.pki)
    assert ca.key is not None
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    expired = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "old")]))
        .issuer_name(ca.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=30))
        .not_valid_after(now - datetime.timedelta(days=1))
        .sign(ca.key, hashes.SHA256())  # type: ignore[arg-type]
    )
    certs.write(conduit.pki, "old", certs.Issued(expired, key))
    r = s_client("old")
    assert r.returncode != 0, r.stderr


def test_a_certificate_traded_for_a_broker_token(conduit: PKIServer) -> None:
    """POST /clients/tokens over HTTPS with the client certificate alone: a broker token of
    that client, which then publishes without the certificate."""
    import jwt

    async def flow() -> None:
        await conduit.issue("dev", "dev")
        https = f"https://localhost:{conduit.server.ports['https']}"
        async with aiohttp.ClientSession() as s:
            async with s.post(f"{https}/clients/tokens", ssl=conduit.context("dev")) as r:
                assert r.status == 200
                token = (await r.json())["token"]
            claims = jwt.decode(token, options={"verify_signature": False})
            assert claims["sub"] == conduit.clients["dev"]["id"]
            async with s.post(f"{https}/m/acme/c/temps/t", data=b"x",
                              headers={"Authorization": f"Bearer {token}",
                                       "Content-Type": "text/plain"},
                              ssl=conduit.context(None)) as r:  # fmt: skip
                assert r.status == 202

    asyncio.run(flow())
