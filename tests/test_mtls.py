"""Mutual TLS on `conduit serve`, with certificates made by the PKI tool and real clients
(aiohttp over HTTPS, websockets over WSS, aiomqtt over MQTTS): a client certificate whose CN is a
client's id authenticates alone; a credential sent beside it must name the same client, or the
request is refused as bad credentials (401 / CONNACK 4 or 0x86) and nothing is published; a
certificate of an unknown client is refused; with `optional`, clients without one use their
secret; with `required`, a client without one does not get through the handshake."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import aiomqtt
import pytest
import websockets
from cryptography.hazmat.primitives import serialization

import certs
from tests.conftest import World
from tests.test_serve import Server, start


@pytest.fixture(autouse=True)
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The store `conduit certs` records in (CONDUIT_DATA_DIR), one per test."""
    monkeypatch.setenv("CONDUIT_DATA_DIR", str(tmp_path / "data"))
    return tmp_path / "data"


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    directory = tmp_path / "pki"
    ca = certs.create_ca()
    certs.write(directory, "ca", ca)
    certs.write(directory, "server", certs.issue_server(ca, ["localhost", "127.0.0.1"]))
    return directory


def serve(tmp_path: Path, pki: Path, mode: str) -> Server:
    return start(tmp_path / "data", "--tls-cert", str(pki / "server.pem"),
                 "--tls-key", str(pki / "server.key"), "--tls-client-ca", str(pki / "ca.pem"),
                 "--tls-client-auth", mode, "--https-port", "0", "--wss-port", "0",
                 "--mqtts-port", "0", "--mqtt-wss-port", "0")  # fmt: skip


@pytest.fixture
def optional(tmp_path: Path, pki: Path) -> Iterator[tuple[Server, dict[str, dict[str, str]]]]:
    server = serve(tmp_path, pki, "optional")
    try:
        server.cli("domains", "create", "acme")
        server.cli("channels", "create", "--domain", "acme", "temps")
        clients = {}
        for name in ("dev", "other"):
            clients[name] = server.cli_json("clients", "create", "--domain", "acme", name)
            server.cli("connect", "--domain", "acme", "--client", name, "--channel", "temps")
        ca = certs.load_ca(pki)
        for name, cn in (("dev", clients["dev"]["id"]), ("nobody", "no-such-client")):  # type: ignore[index]
            certs.write(pki, name, certs.issue_client(ca, cn))
        yield server, clients  # type: ignore[misc]
    finally:
        server.proc.kill()
        server.proc.wait()


def context(pki: Path, holder: str | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=pki / "ca.pem")
    if holder is not None:
        ctx.load_cert_chain(pki / f"{holder}.pem", pki / f"{holder}.key")
    return ctx


def test_each_protocol_with_a_client_certificate(
    optional: tuple[Server, dict[str, dict[str, str]]], pki: Path
) -> None:
    server, clients = optional
    dev, other = clients["dev"], clients["other"]
    ports = server.ports

    async def flow() -> None:
        # A watcher on the plain WebSocket listener: what it gets was published.
        watch_url = f"ws://127.0.0.1:{ports['ws']}/m/acme/c/temps/%23"
        async with websockets.connect(
            watch_url, additional_headers={"Authorization": f"Client {other['secret']}"}
        ) as watcher:
            https = f"https://localhost:{ports['https']}/m/acme/c/temps/t"

            async def post(holder: str | None, auth: str | None, body: bytes) -> int:
                headers = {"Authorization": auth} if auth else {}
                async with aiohttp.ClientSession() as s:
                    async with s.post(https, data=body, headers=headers,
                                      ssl=context(pki, holder)) as r:  # fmt: skip
                        return r.status

            assert await post("dev", None, b"cert alone") == 202
            assert await post("dev", f"Client {dev['secret']}", b"cert and its secret") == 202
            assert await post("dev", f"Client {other['secret']}", b"two clients") == 401
            assert await post("nobody", None, b"unknown CN") == 401
            assert await post(None, f"Client {other['secret']}", b"secret alone") == 202

            # WSS: a subscriber with its certificate alone.
            wss = f"wss://localhost:{ports['wss']}/m/acme/c/temps/%23"
            async with websockets.connect(wss, ssl=context(pki, "dev")) as subscriber:
                # MQTTS: the certificate alone; then with another client's password.
                async with aiomqtt.Client(
                    "localhost", ports["mqtts"], identifier="dev-mqtt",
                    tls_context=context(pki, "dev"),
                ) as mqtt:  # fmt: skip
                    await mqtt.publish("m/acme/c/temps/t", b"over mqtts", qos=1)
                assert await asyncio.wait_for(subscriber.recv(), 10) == b"over mqtts"
            with pytest.raises(aiomqtt.MqttError, match=r"[Bb]ad user name or password"):
                async with aiomqtt.Client(
                    "localhost", ports["mqtts"], identifier="dev-mqtt-2",
                    username=other["id"], password=other["secret"],
                    tls_context=context(pki, "dev"),
                ):  # fmt: skip
                    pass
            got = []
            while True:
                try:
                    got.append(await asyncio.wait_for(watcher.recv(), 1))
                except TimeoutError:
                    break
            assert got == [b"cert alone", b"cert and its secret", b"secret alone", b"over mqtts"]

    asyncio.run(flow())


def test_required_refuses_a_client_without_a_certificate(tmp_path: Path, pki: Path) -> None:
    server = serve(tmp_path, pki, "required")
    try:

        async def health(holder: str | None) -> int:
            async with aiohttp.ClientSession() as s:
                url = f"https://localhost:{server.ports['https']}/health"
                async with s.get(url, ssl=context(pki, holder)) as r:
                    return r.status

        certs.write(pki, "any", certs.issue_client(certs.load_ca(pki), "whoever"))
        assert asyncio.run(health("any")) == 200  # health needs no identity, only TLS
        with pytest.raises(aiohttp.ClientError):
            asyncio.run(health(None))
    finally:
        server.proc.kill()
        server.proc.wait()


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (["--tls-client-auth", "required"],
         "tls_client_auth is required but tls_client_ca is not set"),
        (["--tls-crl", "crl.pem"],
         "tls_crl is set but tls_client_auth is none: no client certificate to check"),
        (["--tls-client-auth", "optional", "--tls-client-ca", "ca.pem", "--tls-crl", "ca.pem"],
         "tls_crl {pki}/ca.pem: not a PEM CRL"),
    ],
)  # fmt: skip
def test_a_client_tls_setting_that_cannot_work_stops_the_start(
    tmp_path: Path, pki: Path, args: list[str], line: str
) -> None:
    import subprocess

    from tests.test_tls import serve_args

    args = [str(pki / a) if a.endswith(".pem") else a for a in args]
    r = subprocess.run(
        serve_args("--tls-cert", str(pki / "server.pem"), "--tls-key", str(pki / "server.key"),
                   *args),
        env={"CONDUIT_DATA_DIR": str(tmp_path / "data"), "PATH": "/usr/bin:/bin"},
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [f"Error: {line.format(pki=pki)}"]


@pytest.mark.parametrize("mode", ["client_id", "secret"])
async def test_the_cn_names_the_client_exactly(world: World, mode: str) -> None:
    """Both modes, exact: a CN that is a prefix, a suffix or a superstring of the right value
    names nobody; a disabled client's certificate is refused."""
    from core.auth.certificates import Certificates
    from core.credentials import Credentials
    from core.errors import AuthenticationError

    provider = Certificates(world.gateway.store, mode)  # type: ignore[arg-type]
    ca = certs.create_ca()
    right = world.publisher.id if mode == "client_id" else world.publisher.secret

    def der(cn: str) -> Credentials:
        cert = certs.issue_client(ca, cn).certificate
        return Credentials(certificate=cert.public_bytes(serialization.Encoding.DER))

    identity = await provider.identify(der(right), "certificate")
    assert identity is not None and identity.client_id == world.publisher.id
    for wrong in (right[:-1], right[1:], right + "x", "x" + right):
        with pytest.raises(AuthenticationError):
            await provider.identify(der(wrong), "certificate")
    await world.gateway.provisioning.set_client_enabled("acme", world.publisher.id, False)
    provider.invalidate()
    with pytest.raises(AuthenticationError):
        await provider.identify(der(right), "certificate")


def test_a_revoked_certificate_is_refused_in_the_handshake(tmp_path: Path, pki: Path) -> None:
    """`conduit certs revoke` lists it in the CRL; `conduit serve` with `tls_crl` refuses it
    while another certificate of the same CA still gets through."""
    from click.testing import CliRunner

    from conduit.cli import main

    ca = certs.load_ca(pki)
    certs.write(pki, "kept", certs.issue_client(ca, "kept"))
    certs.write(pki, "gone", certs.issue_client(ca, "gone"))
    result = CliRunner().invoke(main, ["certs", "revoke", "--dir", str(pki),
                                       "--cert", str(pki / "gone.pem")])  # fmt: skip
    assert result.exit_code == 0, result.output
    serial = x509_serial(pki / "gone.pem")
    assert f"revoked: {serial:x}" in result.output
    listed = CliRunner().invoke(main, ["certs", "list", "--dir", str(pki)]).output
    assert f"{serial:x}  client  gone" in listed and "revoked" in listed
    server = start(tmp_path / "data", "--tls-cert", str(pki / "server.pem"),
                   "--tls-key", str(pki / "server.key"), "--tls-client-ca", str(pki / "ca.pem"),
                   "--tls-client-auth", "optional", "--tls-crl", str(pki / "crl.pem"),
                   "--https-port", "0", "--wss-port", "0", "--mqtts-port", "0",
                   "--mqtt-wss-port", "0")  # fmt: skip
    try:

        async def health(holder: str) -> int:
            async with aiohttp.ClientSession() as s:
                url = f"https://localhost:{server.ports['https']}/health"
                async with s.get(url, ssl=context(pki, holder)) as r:
                    return r.status

        assert asyncio.run(health("kept")) == 200
        with pytest.raises(aiohttp.ClientError):
            asyncio.run(health("gone"))
    finally:
        server.proc.kill()
        server.proc.wait()


def x509_serial(path: Path) -> int:
    from cryptography import x509

    return x509.load_pem_x509_certificate(path.read_bytes()).serial_number


def test_disabling_the_client_ends_its_certificate_connection(
    optional: tuple[Server, dict[str, dict[str, str]]], pki: Path
) -> None:
    """The certificate's identity is the client's: disabled, its MQTTS connection ends at once
    (DISCONNECT 0x87; aiomqtt reports the disconnection, not its code)."""
    server, clients = optional
    dev = clients["dev"]

    async def flow() -> None:
        async with aiomqtt.Client(
            "localhost", server.ports["mqtts"], identifier="dev-held",
            protocol=aiomqtt.ProtocolVersion.V5, tls_context=context(pki, "dev"),
        ) as mqtt:  # fmt: skip
            await mqtt.subscribe("m/acme/c/temps/#")
            await asyncio.to_thread(server.cli, "clients", "disable", "--domain", "acme", dev["id"])
            with pytest.raises(aiomqtt.MqttError, match="Disconnected"):
                async with asyncio.timeout(10):
                    async for _ in mqtt.messages:
                        pass

    asyncio.run(flow())


def test_curl_mosquitto_and_openssl(
    optional: tuple[Server, dict[str, dict[str, str]]], pki: Path
) -> None:
    """The command-line clients users have: curl over HTTPS and mosquitto_pub over MQTTS with
    the client certificate alone; openssl s_client refused with an untrusted certificate."""
    import shutil
    import subprocess

    server, _ = optional
    for tool in ("curl", "mosquitto_pub", "mosquitto_sub", "openssl"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    cert = ["--cert", str(pki / "dev.pem"), "--key", str(pki / "dev.key")]
    ports = server.ports
    sub = subprocess.Popen(
        ["mosquitto_sub", "-h", "localhost", "-p", str(ports["mqtts"]), "--cafile",
         str(pki / "ca.pem"), *cert, "-i", "dev-sub", "-t", "m/acme/c/temps/#", "-C", "2",
         "-W", "20"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        import time

        time.sleep(1.0)  # the subscription is made
        r = subprocess.run(
            ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "--cacert",
             str(pki / "ca.pem"), *cert, "-H", "Content-Type: text/plain",
             "--data-binary", "from curl",
             f"https://localhost:{ports['https']}/m/acme/c/temps/t"],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert r.stdout == "202", r.stderr
        r = subprocess.run(
            ["mosquitto_pub", "-h", "localhost", "-p", str(ports["mqtts"]), "--cafile",
             str(pki / "ca.pem"), *cert, "-i", "dev-pub", "-t", "m/acme/c/temps/t", "-q", "1",
             "-m", "from mosquitto_pub"],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
        out, _ = sub.communicate(timeout=30)
        assert out.splitlines() == ["from curl", "from mosquitto_pub"]
    finally:
        sub.kill()

    # A certificate from another CA: the handshake fails, whatever the mode (TLS 1.2, where the
    # client hears the refusal within the handshake; with 1.3 the alert comes after it).
    def s_client(holder: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["openssl", "s_client", "-connect", f"127.0.0.1:{ports['https']}", "-CAfile",
             str(pki / "ca.pem"), "-cert", str(pki / f"{holder}.pem"), "-key",
             str(pki / f"{holder}.key"), "-brief", "-tls1_2"],
            input="", capture_output=True, text=True, timeout=30,
        )  # fmt: skip

    assert s_client("dev").returncode == 0
    stranger = certs.issue_client(certs.create_ca("Another CA"), "stranger")
    certs.write(pki, "stranger", stranger)
    r = s_client("stranger")
    assert r.returncode != 0
    assert "alert" in r.stderr.lower() or "error" in r.stderr.lower(), r.stderr
