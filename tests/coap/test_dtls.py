"""CoAP over DTLS with libcoap's ``coap-client-openssl`` (Debian ``libcoap3-bin``): pre-shared
keys given and revoked through the management API; publish, read and observe as over plain
CoAP; a wrong, revoked or replaced key refused in the handshake, a disabled client with 4.01,
and nothing published by any of them. ``conduit serve`` with the listener on: the CLI, the key
sealed at rest, the master key file private, a clear line when DTLSSocket is missing."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiocoap
import aiohttp
import pytest
from aiocoap.numbers.codes import Code

from adapters.coap import CoAPAdapter
from adapters.coap.dtls import DTLSError, missing
from adapters.http.server import Listener
from conduit.api import ManagementAPI
from core.bus import Subscription
from core.limits import ListenerLimits
from core.listeners import Endpoint
from tests.coap.conftest import TIMEOUT, drain, eventually, observers, refusals
from tests.conftest import World, require_command, running
from tests.test_serve import CONDUIT, Server, start

SENML = json.dumps([{"bn": "urn:dev:9:", "n": "temp", "u": "Cel", "v": 21.5}])
KEY = "test-admin-key-for-the-dtls-tests-0123456789"
# Seconds coap-client waits for an answer before it gives up: a handshake with a key the server
# does not know gets no answer at all (tinydtls drops it), so a refusal ends this way.
GIVE_UP = "3"


@pytest.fixture(scope="module")
def coap_client() -> str:
    return require_command("coap-client-openssl", "libcoap3-bin")


@pytest.fixture
async def coaps(world: World) -> AsyncIterator[CoAPAdapter]:
    """The adapter with CoAP over DTLS only, on an ephemeral port."""
    try:
        adapter = CoAPAdapter(world.gateway, endpoints=[], dtls=Endpoint("coaps", "127.0.0.1", 0))
    except DTLSError as exc:
        pytest.skip(str(exc))
    async with running(adapter):
        yield adapter


@pytest.fixture
async def api(world: World) -> AsyncIterator[aiohttp.ClientSession]:
    """A management API client, on its base URL."""
    app = ManagementAPI(world.gateway, KEY).app
    listener = Listener(
        world.gateway, "api", app, Endpoint("api", "127.0.0.1", 0), limits=ListenerLimits()
    )
    await listener.start()
    async with aiohttp.ClientSession(
        base_url=f"http://127.0.0.1:{listener.port}", headers={"Authorization": f"Bearer {KEY}"}
    ) as session:
        yield session
    await listener.stop(2)


async def give_key(api: aiohttp.ClientSession, client: str) -> tuple[str, str]:
    """A DTLS key for a client through the management API: (identity, key)."""
    async with api.post(f"/domains/acme/clients/{client}/dtls-key") as r:
        assert r.status == 201
        grant = await r.json()
    assert grant["client"] == client
    assert grant["identity"] == client.replace("-", "")
    assert len(grant["key"]) == 16
    return grant["identity"], grant["key"]


async def run(*args: str) -> tuple[bytes, str]:
    """Run coap-client to completion; its stdout (the payload) and stderr (errors)."""
    proc = await asyncio.create_subprocess_exec(
        *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), TIMEOUT)
    return out, err.decode()


def url(adapter: CoAPAdapter, path: str = "m/acme/c/temps/dev9") -> str:
    return f"coaps://127.0.0.1:{adapter.dtls_port}/{path}"


async def publish(coap_client: str, adapter: CoAPAdapter, identity: str, key: str,
                  *extra: str, path: str = "m/acme/c/temps/dev9") -> tuple[bytes, str]:  # fmt: skip
    return await run(
        coap_client, "-B", GIVE_UP, "-m", "post", "-t", "110", "-e", SENML, "-u", identity,
        "-k", key, *extra, url(adapter, path),
    )  # fmt: skip


def handshake_failed(out: bytes, err: str) -> bool:
    """What coap-client shows when the server never completes the handshake: no answer (an
    answer's code would be on stderr, its payload on stdout), only its log line saying that the
    request could not be sent."""
    return err == "" and out.strip().endswith(b"ERR  cannot send CoAP pdu")


async def test_publish_and_read(
    world: World, coaps: CoAPAdapter, api: aiohttp.ClientSession, coap_client: str,
    watch: Subscription,
) -> None:  # fmt: skip
    identity, key = await give_key(api, world.publisher.id)
    out, err = await publish(coap_client, coaps, identity, key)
    assert (out, err) == (b"", "")
    [msg] = drain(watch)
    assert (msg.payload, msg.publisher, msg.protocol, msg.subtopic) == (
        SENML.encode(), world.publisher.id, "coap", "dev9",
    )  # fmt: skip
    # An auth= beside the DTLS key naming the same client is fine.
    path = f"m/acme/c/temps/dev9?auth={world.publisher.secret}"
    out, err = await publish(coap_client, coaps, identity, key, path=path)
    assert (out, err) == (b"", "")
    assert len(drain(watch)) == 1
    # Read the latest over DTLS, as the subscriber.
    identity, key = await give_key(api, world.subscriber.id)
    out, err = await run(coap_client, "-m", "get", "-u", identity, "-k", key, url(coaps))
    assert (out, err) == (SENML.encode() + b"\n", "")


async def test_observe_http_in_dtls_out(
    world: World, coaps: CoAPAdapter, api: aiohttp.ClientSession, coap_client: str, http: str,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    identity, key = await give_key(api, world.subscriber.id)
    proc = await asyncio.create_subprocess_exec(
        coap_client, "-m", "get", "-s", "30", "-u", identity, "-k", key,
        url(coaps, "m/acme/c/temps/%23"),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        await eventually(lambda: observers(world) == 1, "coap-client registered over DTLS")
        headers = {"Authorization": f"Client {world.publisher.secret}",
                   "Content-Type": "application/senml+json"}  # fmt: skip
        async with aiohttp.ClientSession(headers=headers) as session:
            async with session.post(f"{http}/m/acme/c/temps/room1", data=SENML) as r:
                assert r.status == 202
        assert proc.stdout is not None
        seen = b""
        while len(seen) < len(SENML):
            chunk = await asyncio.wait_for(proc.stdout.read(65536), TIMEOUT)
            assert chunk, "coap-client ended early"
            seen += chunk
        assert seen == SENML.encode()
        # Revoking the key ends the observation (its last notification: 4.01) and the session.
        caplog.set_level("INFO", "conduit.coap")
        async with api.delete(f"/domains/acme/clients/{world.subscriber.id}/dtls-key") as r:
            assert r.status == 204
        assert observers(world) == 0
        assert "coaps: 1 DTLS session(s) ended" in caplog.text
        assert proc.stderr is not None
        line = await asyncio.wait_for(proc.stderr.readline(), TIMEOUT)
        assert line.decode().strip() == "4.01 DTLS key revoked or replaced, or client disabled"
        assert await asyncio.wait_for(proc.wait(), TIMEOUT) == 0  # the observation is over
    finally:
        if proc.returncode is None:
            proc.terminate()
            await proc.wait()


async def test_aiocoap_client(
    world: World, coaps: CoAPAdapter, api: aiohttp.ClientSession, watch: Subscription
) -> None:
    """The aiocoap example of docs/coap.md."""
    identity, key = await give_key(api, world.publisher.id)
    ctx = await aiocoap.Context.create_client_context()
    try:
        ctx.client_credentials.load_from_dict({
            f"coaps://127.0.0.1:{coaps.dtls_port}/*": {
                "dtls": {"psk": {"ascii": key}, "client-identity": {"ascii": identity}},
            },
        })  # fmt: skip
        request = aiocoap.Message(
            code=aiocoap.POST, payload=SENML.encode(), content_format=110, uri=url(coaps)
        )
        response = await asyncio.wait_for(ctx.request(request).response, TIMEOUT)
        assert response.code == Code.CHANGED
    finally:
        await ctx.shutdown()
    [msg] = drain(watch)
    assert msg.publisher == world.publisher.id


async def test_wrong_key_or_identity_is_refused(
    world: World, coaps: CoAPAdapter, api: aiohttp.ClientSession, coap_client: str,
    watch: Subscription,
) -> None:  # fmt: skip
    identity, key = await give_key(api, world.publisher.id)
    wrong = key[:-1] + ("A" if key[-1] != "A" else "B")
    assert handshake_failed(*await publish(coap_client, coaps, identity, wrong))
    assert handshake_failed(*await publish(coap_client, coaps, "nobody", key))
    # The client id with its dashes is not the identity (and is too long for tinydtls).
    assert handshake_failed(*await publish(coap_client, coaps, world.publisher.id, key))
    assert drain(watch) == []


async def test_revoked_key_is_refused(
    world: World, coaps: CoAPAdapter, api: aiohttp.ClientSession, coap_client: str,
    watch: Subscription,
) -> None:  # fmt: skip
    identity, key = await give_key(api, world.publisher.id)
    assert await publish(coap_client, coaps, identity, key) == (b"", "")
    assert len(drain(watch)) == 1
    async with api.delete(f"/domains/acme/clients/{world.publisher.id}/dtls-key") as r:
        assert r.status == 204
    assert handshake_failed(*await publish(coap_client, coaps, identity, key))
    assert drain(watch) == []
    async with api.delete(f"/domains/acme/clients/{world.publisher.id}/dtls-key") as r:
        assert r.status == 404
        assert "has no DTLS key" in (await r.json())["detail"]


async def test_rotated_key_replaces_the_old_one(
    world: World, coaps: CoAPAdapter, api: aiohttp.ClientSession, coap_client: str,
    watch: Subscription,
) -> None:  # fmt: skip
    identity, old = await give_key(api, world.publisher.id)
    _, new = await give_key(api, world.publisher.id)
    assert new != old
    assert handshake_failed(*await publish(coap_client, coaps, identity, old))
    assert drain(watch) == []
    assert await publish(coap_client, coaps, identity, new) == (b"", "")
    assert len(drain(watch)) == 1


async def test_disabled_or_deleted_client_is_refused(
    world: World, coaps: CoAPAdapter, api: aiohttp.ClientSession, coap_client: str,
    watch: Subscription,
) -> None:  # fmt: skip
    identity, key = await give_key(api, world.publisher.id)
    async with api.post(f"/domains/acme/clients/{world.publisher.id}/disable") as r:
        assert r.status == 200
    out, err = await publish(coap_client, coaps, identity, key)
    assert (out, err.strip()) == (b"", "4.01 the DTLS key's client is unknown or disabled")
    out, err = await run(coap_client, "-m", "get", "-s", "5", "-u", identity, "-k", key,
                         url(coaps))  # fmt: skip
    assert (out, err.strip()) == (b"", "4.01 the DTLS key's client is unknown or disabled")
    assert observers(world) == 0
    assert drain(watch) == []
    async with api.delete(f"/domains/acme/clients/{world.publisher.id}") as r:
        assert r.status == 204
    assert handshake_failed(*await publish(coap_client, coaps, identity, key))  # key gone too
    assert drain(watch) == []


async def test_auth_query_must_name_the_same_client(
    world: World, coaps: CoAPAdapter, api: aiohttp.ClientSession, coap_client: str,
    watch: Subscription,
) -> None:  # fmt: skip
    identity, key = await give_key(api, world.publisher.id)
    path = f"m/acme/c/temps/dev9?auth={world.both.secret}"
    out, err = await publish(coap_client, coaps, identity, key, path=path)
    assert (out, err.strip()) == (b"", "4.01 the psk and the secret name different clients")
    out, err = await publish(coap_client, coaps, identity, key, path="m/acme/c/temps?auth=nope")
    assert (out, err.strip()) == (b"", "4.01 unknown or disabled client")
    assert drain(watch) == []


async def test_refusals_keep_the_error_table(
    world: World, coaps: CoAPAdapter, api: aiohttp.ClientSession, coap_client: str,
    watch: Subscription,
) -> None:  # fmt: skip
    identity, key = await give_key(api, world.subscriber.id)  # may not publish
    out, err = await publish(coap_client, coaps, identity, key)
    assert (out, err.strip()) == (b"", "4.03 client may not publish on channel 'temps'")
    out, err = await publish(coap_client, coaps, identity, key, path="nowhere")
    assert err.startswith("4.04 /nowhere is not a messaging path")
    assert drain(watch) == []


async def test_key_is_sealed_at_rest(
    world: World, coaps: CoAPAdapter, api: aiohttp.ClientSession, tmp_path: Path
) -> None:
    _, key = await give_key(api, world.publisher.id)
    with sqlite3.connect(tmp_path / "conduit.db") as db:
        [(client_id, sealed)] = db.execute("SELECT client_id, sealed FROM dtls_keys").fetchall()
    assert client_id == world.publisher.id
    assert key.encode() not in sealed and len(sealed) > len(key)


def test_a_wildcard_address_is_refused(world: World) -> None:
    with pytest.raises(DTLSError, match=r"cannot listen on the wildcard address '0\.0\.0\.0'"):
        CoAPAdapter(world.gateway, endpoints=[], dtls=Endpoint("coaps", "0.0.0.0", 0))


# conduit serve
@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    if missing():
        pytest.skip(missing())
    srv = start(tmp_path / "data", "--coaps-enabled", "--coaps-port", "0")
    yield srv
    if srv.proc.poll() is None:
        srv.proc.kill()
        srv.proc.wait()


def test_serve_with_dtls(server: Server, tmp_path: Path, coap_client: str) -> None:
    data = tmp_path / "data"
    assert (data / "encryption.key").stat().st_mode & 0o777 == 0o600
    server.cli("domains", "create", "acme")
    dev = server.cli_json("clients", "create", "--domain", "acme", "sensor")
    server.cli("channels", "create", "--domain", "acme", "temps")
    server.cli("connect", "--domain", "acme", "--client", "sensor", "--channel", "temps")
    grant = server.cli_json("clients", "dtls-key", "--domain", "acme", "sensor")
    assert grant["client"] == dev["id"]  # type: ignore[index, call-overload]
    identity, key = grant["identity"], grant["key"]  # type: ignore[index, call-overload]
    target = f"coaps://127.0.0.1:{server.ports['coaps']}/m/acme/c/temps"
    done = subprocess.run(
        [coap_client, "-m", "put", "-t", "110", "-e", SENML, "-u", identity, "-k", key, target],
        capture_output=True, text=True, timeout=TIMEOUT,
    )  # fmt: skip
    assert (done.stdout, done.stderr) == ("", "")
    done = subprocess.run(
        [coap_client, "-m", "get", "-u", identity, "-k", key, target],
        capture_output=True, text=True, timeout=TIMEOUT,
    )  # fmt: skip
    assert (done.stdout, done.stderr) == (SENML + "\n", "")
    with sqlite3.connect(data / "conduit.db") as db:
        [(sealed,)] = db.execute("SELECT sealed FROM dtls_keys").fetchall()
    assert key.encode() not in sealed
    revoked = server.cli("clients", "revoke-dtls-key", "--domain", "acme", "sensor")
    assert revoked.stdout.strip() == "revoked=sensor"
    done = subprocess.run(
        [coap_client, "-B", GIVE_UP, "-m", "get", "-u", identity, "-k", key, target],
        capture_output=True, text=True, timeout=TIMEOUT,
    )  # fmt: skip
    assert handshake_failed(done.stdout.encode(), done.stderr), done


def test_serve_without_dtlssocket_says_what_to_install(tmp_path: Path) -> None:
    # The interpreter as it would be without the package: its import fails.
    hide = "import sys; sys.modules['DTLSSocket'] = None; from conduit.cli import main; main()"
    done = subprocess.run(
        [sys.executable, "-c", hide, "serve", "--host", "127.0.0.1", "--coaps-enabled",
         "--data-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        "Error: CoAP over DTLS (coaps_enabled) needs the DTLSSocket package: pip install"
        " 'conduit-gateway[dtls]' (it builds tinydtls from source: Debian autoconf automake"
        " libtool)"
    ]


def serve_fails(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> list[str]:
    """The lines ``conduit serve`` ends with when it cannot start (it must exit 1)."""
    done = subprocess.run(
        [*CONDUIT, "serve", "--data-dir", str(tmp_path), "--api-port", "0", "--http-port", "0",
         "--ws-port", "0", "--coap-port", "0", "--mqtt-port", "0", "--mqtt-ws-port", "0",
         "--coaps-port", "0", *args],
        capture_output=True, text=True, timeout=30, env={**os.environ, **(env or {})},
    )  # fmt: skip
    assert done.returncode == 1, done
    assert "conduit ready" not in done.stdout
    return done.stderr.strip().splitlines()


def test_serve_on_a_wildcard_address_says_to_set_coaps_host(tmp_path: Path) -> None:
    if missing():
        pytest.skip(missing())
    assert serve_fails(tmp_path, "--host", "0.0.0.0", "--coaps-enabled") == [
        "Error: CoAP over DTLS cannot listen on the wildcard address '0.0.0.0': aiocoap's DTLS"
        " server answers from the one address it is bound to; set coaps_host"
        " (CONDUIT_COAPS_HOST) to an address of this machine"
    ]


def test_serve_with_another_master_key_says_so(tmp_path: Path) -> None:
    if missing():
        pytest.skip(missing())
    srv = start(tmp_path, "--coaps-enabled", "--coaps-port", "0")
    try:
        srv.cli("domains", "create", "acme")
        dev = srv.cli_json("clients", "create", "--domain", "acme", "sensor")
        srv.cli("clients", "dtls-key", "--domain", "acme", "sensor")
    finally:
        srv.proc.terminate()
        srv.proc.wait()
    # Another master key: the token signing keys, opened first, say so.
    other = "ab" * 32
    [*_, last] = serve_fails(tmp_path, "--host", "127.0.0.1", "--coaps-enabled",
                             env={"CONDUIT_ENCRYPTION_KEY": other})  # fmt: skip
    assert last.startswith(
        "Error: the signing keys of Conduit's tokens cannot be opened: signing-key:"
    ), last
    assert "sealed under another master key" in last
    # The right master key, a DTLS key altered in the database: the DTLS listener says so.
    client = dev["id"]  # type: ignore[index, call-overload]
    with sqlite3.connect(tmp_path / "conduit.db") as db:
        (sealed,) = db.execute("SELECT sealed FROM dtls_keys").fetchone()
        altered = sealed[:-1] + bytes([sealed[-1] ^ 1])
        db.execute("UPDATE dtls_keys SET sealed = ?", (altered,))
    [*_, last] = serve_fails(tmp_path, "--host", "127.0.0.1", "--coaps-enabled")
    assert last == (
        f"Error: coaps: the DTLS key of client {client} cannot be opened: dtls-psk:{client}: the"
        " sealed value was altered, or was sealed for something else (1 such key(s))"
    ), last


def test_serve_with_a_malformed_encryption_key_says_so(tmp_path: Path) -> None:
    assert serve_fails(tmp_path, "--host", "127.0.0.1", env={"CONDUIT_ENCRYPTION_KEY": "nope"}) == [
        "Error: the encryption key from the encryption_key setting (CONDUIT_ENCRYPTION_KEY) must"
        " be 64 hex digits (32 bytes; make one with: openssl rand -hex 32)"
    ]


async def test_an_undecodable_option_is_dropped(
    world: World, coaps: CoAPAdapter, api: aiohttp.ClientSession, coap_client: str,
    caplog: pytest.LogCaptureFixture, watch: Subscription,
) -> None:  # fmt: skip
    identity, key = await give_key(api, world.publisher.id)
    # Uri-Path (option 11) of one byte 0xff: not UTF-8.
    _, err = await run(coap_client, "-B", GIVE_UP, "-m", "post", "-O", "11,0xff", "-u",
                         identity, "-k", key, f"coaps://127.0.0.1:{coaps.dtls_port}")  # fmt: skip
    assert err == ""  # no answer (were the path decoded, it would be a 4.04 on stderr)
    assert refusals(world, "malformed_datagram") >= 1
    assert [r.getMessage() for r in caplog.records if r.levelname == "ERROR"] == []
    assert await publish(coap_client, coaps, identity, key) == (b"", "")  # still serving
    assert len(drain(watch)) == 1


def test_serve_with_the_coaps_port_taken_says_so(tmp_path: Path) -> None:
    if missing():
        pytest.skip(missing())
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        lines = serve_fails(tmp_path, "--host", "127.0.0.1", "--coaps-enabled",
                            "--coaps-port", str(port))  # fmt: skip
    assert lines[-1] == (
        f"Error: coaps port {port} is already in use; stop what holds it or choose another port"
        " (CONDUIT_COAPS_PORT)"
    )
