"""TLS listeners beside the plain ones, as `conduit serve` builds them from its settings: HTTPS,
WSS, MQTTS and MQTT over WSS with real clients that verify the server, the ports on the ready
line, and one clear line for a certificate or key that cannot serve."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import ssl
import subprocess
from pathlib import Path

import aiohttp
import aiomqtt
import pytest
import websockets
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.test_serve import CONDUIT, start

NOW = datetime.datetime.now(datetime.UTC)


def make_certificate(
    directory: Path,
    name: str,
    *,
    not_before: datetime.datetime = NOW - datetime.timedelta(hours=1),
    not_after: datetime.datetime = NOW + datetime.timedelta(days=1),
) -> tuple[Path, Path]:
    """A self-signed server certificate for 127.0.0.1 and localhost: (cert, key) PEM files."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / f"{name}.pem", directory / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    return cert_path, key_path


def serve_args(*extra: str) -> list[str]:
    return [*CONDUIT, "serve", "--host", "127.0.0.1", "--http-port", "0", "--ws-port", "0",
            "--coap-port", "0", "--mqtt-port", "0", "--mqtt-ws-port", "0", "--api-port", "0",
            "--https-port", "0", "--wss-port", "0", "--mqtts-port", "0", "--mqtt-wss-port", "0",
            *extra]  # fmt: skip


def test_https_and_wss_beside_http_and_ws(tmp_path: Path) -> None:
    cert, key = make_certificate(tmp_path, "server")
    server = start(tmp_path / "data", "--tls-cert", str(cert), "--tls-key", str(key),
                   "--https-port", "0", "--wss-port", "0")  # fmt: skip
    try:
        assert {"http", "https", "ws", "wss"} <= set(server.ports)
        server.cli("domains", "create", "acme")
        server.cli("channels", "create", "--domain", "acme", "temps")
        dev = server.cli_json("clients", "create", "--domain", "acme", "dev")
        server.cli("connect", "--domain", "acme", "--client", "dev", "--channel", "temps")
        secret = dev["secret"]  # type: ignore[index]
        trust = ssl.create_default_context(cafile=str(cert))

        async def flow() -> None:
            wss = f"wss://127.0.0.1:{server.ports['wss']}/m/acme/c/temps/%23"
            async with websockets.connect(
                wss, ssl=trust, additional_headers={"Authorization": f"Client {secret}"}
            ) as ws:
                https = f"https://127.0.0.1:{server.ports['https']}/m/acme/c/temps/t"
                http = f"http://127.0.0.1:{server.ports['http']}/m/acme/c/temps/t"
                async with aiohttp.ClientSession(
                    headers={"Authorization": f"Client {secret}"}
                ) as s:
                    async with s.post(https, data=b"over tls", ssl=trust) as r:
                        assert r.status == 202
                    async with s.post(http, data=b"in the clear") as r:
                        assert r.status == 202
                    with pytest.raises(aiohttp.ClientConnectorCertificateError):
                        await s.post(https, data=b"x")  # the default trust store: refused
                got = [await asyncio.wait_for(ws.recv(), 10) for _ in range(2)]
                assert got == [b"over tls", b"in the clear"]
            # A client of TLS 1.2 at most gets a forward-secret AEAD suite.
            tls12 = ssl.create_default_context(cafile=str(cert))
            tls12.maximum_version = ssl.TLSVersion.TLSv1_2
            _, writer = await asyncio.open_connection(
                "127.0.0.1", server.ports["https"], ssl=tls12
            )
            name, version, _ = writer.get_extra_info("ssl_object").cipher()
            assert version == "TLSv1.2" and name.startswith("ECDHE-") and (
                "GCM" in name or "CHACHA20" in name
            )
            writer.close()

        asyncio.run(flow())
    finally:
        server.proc.kill()
        server.proc.wait()


def test_mqtts_and_mqtt_over_wss_beside_mqtt(tmp_path: Path) -> None:
    cert, key = make_certificate(tmp_path, "server")
    server = start(tmp_path / "data", "--tls-cert", str(cert), "--tls-key", str(key),
                   "--mqtts-port", "0", "--mqtt-wss-port", "0")  # fmt: skip
    try:
        assert {"mqtt", "mqtts", "mqtt-ws", "mqtt-wss"} <= set(server.ports)
        server.cli("domains", "create", "acme")
        server.cli("channels", "create", "--domain", "acme", "temps")
        dev = server.cli_json("clients", "create", "--domain", "acme", "dev")
        server.cli("connect", "--domain", "acme", "--client", "dev", "--channel", "temps")
        auth = {"username": dev["id"], "password": dev["secret"]}  # type: ignore[index]
        trust = ssl.create_default_context(cafile=str(cert))

        def client(port: str, name: str, **options: object) -> aiomqtt.Client:
            return aiomqtt.Client("127.0.0.1", server.ports[port], identifier=name, timeout=10,
                                  **auth, **options)  # type: ignore[arg-type]  # fmt: skip

        async def flow() -> None:
            async with client("mqtts", "sub", tls_context=trust) as sub:
                await sub.subscribe("m/acme/c/temps/#", qos=1)
                ws = {"transport": "websockets", "websocket_path": "/mqtt"}
                async with client("mqtt-wss", "pub-wss", tls_context=trust, **ws) as pub:
                    await pub.publish("m/acme/c/temps/t", b"over wss", qos=1)
                async with client("mqtt", "pub-plain") as pub:
                    await pub.publish("m/acme/c/temps/t", b"in the clear", qos=1)
                got: list[bytes] = []
                async with asyncio.timeout(10):
                    async for message in sub.messages:
                        got.append(message.payload)  # type: ignore[arg-type]
                        if len(got) == 2:
                            break
                assert got == [b"over wss", b"in the clear"]
            # A client that does not trust the certificate is refused by its own TLS check.
            with pytest.raises(aiomqtt.MqttError):
                async with client("mqtts", "untrusting", tls_context=ssl.create_default_context()):
                    pass

        asyncio.run(flow())
    finally:
        server.proc.kill()
        server.proc.wait()


def test_tls_only(tmp_path: Path) -> None:
    """With the plain listeners off, only the TLS ones are served."""
    cert, key = make_certificate(tmp_path, "server")
    server = start(tmp_path / "data", "--tls-cert", str(cert), "--tls-key", str(key),
                   "--no-http-enabled", "--no-ws-enabled", "--no-mqtt-enabled",
                   "--no-mqtt-ws-enabled", "--https-port", "0", "--wss-port", "0",
                   "--mqtts-port", "0", "--mqtt-wss-port", "0")  # fmt: skip
    try:
        assert "https" in server.ports and "wss" in server.ports
        assert "http" not in server.ports and "ws" not in server.ports
        assert "mqtts" in server.ports and "mqtt-wss" in server.ports
        assert "mqtt" not in server.ports and "mqtt-ws" not in server.ports
    finally:
        server.proc.kill()
        server.proc.wait()


@pytest.mark.parametrize("case", ["missing", "mismatch", "expired", "not yet", "not pem", "no key"])
def test_a_tls_file_that_cannot_serve_stops_the_start(tmp_path: Path, case: str) -> None:
    cert, key = make_certificate(tmp_path, "server")
    _, other_key = make_certificate(tmp_path, "other")
    args = ["--tls-cert", str(cert), "--tls-key", str(key)]
    expected = ""
    if case == "missing":
        args[1] = str(tmp_path / "nope.pem")
        expected = f"tls_cert {tmp_path / 'nope.pem'}: no such file"
    elif case == "mismatch":
        args[3] = str(other_key)
        expected = f"tls_key {other_key}: this key does not match the certificate in {cert}"
    elif case == "expired":
        old_cert, old_key = make_certificate(
            tmp_path, "old", not_before=NOW - datetime.timedelta(days=30),
            not_after=NOW - datetime.timedelta(days=1),
        )  # fmt: skip
        args = ["--tls-cert", str(old_cert), "--tls-key", str(old_key)]
        day = (NOW - datetime.timedelta(days=1)).strftime("%Y-%m-%d")
        expected = f"tls_cert {old_cert}: the certificate expired on {day}"
    elif case == "not yet":
        new_cert, new_key = make_certificate(
            tmp_path, "new", not_before=NOW + datetime.timedelta(days=1),
            not_after=NOW + datetime.timedelta(days=30),
        )  # fmt: skip
        args = ["--tls-cert", str(new_cert), "--tls-key", str(new_key)]
        expected = f"tls_cert {new_cert}: the certificate is not valid before"
    elif case == "not pem":
        args[1] = str(key)
        expected = f"tls_cert {key}: not a PEM certificate"
    elif case == "no key":
        args = args[:2]
        expected = "tls_cert is set but tls_key is not: TLS needs both"
    env = {"CONDUIT_DATA_DIR": str(tmp_path / "data"), "PATH": "/usr/bin:/bin"}
    r = subprocess.run(serve_args(*args), env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"Error: {expected}"), r.stderr
