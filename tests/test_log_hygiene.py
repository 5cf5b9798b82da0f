"""What `conduit serve` writes to its log when clients misbehave, read as an operator reads it.

A real server at debug level; every refusal path of every protocol driven with credentials in
the wrong place: a valid client's secret, a secret nobody has, and the admin key. None of them
may appear anywhere in the log, at any level; a user name with a line break may not forge a
log line; and each line is one record (in the JSON format, each line parses)."""

from __future__ import annotations

import asyncio
import base64
import json
import re
import secrets
import signal
import socket
import subprocess
from pathlib import Path
from typing import Any

import aiocoap
import aiohttp
import pytest
import websockets
from aiocoap.numbers.codes import Code

from adapters.mqtt.codec import Connect, encode
from tests.mqtt.conftest import Closed, RawClient
from tests.test_serve import Server, start

FORGED = "2001-01-01 00:00:00,000 INFO conduit.gateway: forged"


def _provision(server: Server) -> dict[str, Any]:
    server.cli("domains", "create", "acme")
    server.cli("channels", "create", "--domain", "acme", "temps")
    server.cli("channels", "create", "--domain", "acme", "other")
    dev = server.cli_json("clients", "create", "--domain", "acme", "dev")
    other = server.cli_json("clients", "create", "--domain", "acme", "other")
    server.cli("connect", "--domain", "acme", "--client", "dev", "--channel", "temps")
    key = (Path(server.env["CONDUIT_DATA_DIR"]) / "admin.key").read_text().strip()
    return {"dev": dev, "other": other, "admin": key}


async def _http(server: Server, secret: str, unknown: str, admin: str) -> None:
    base = f"http://127.0.0.1:{server.ports['http']}"
    post = f"{base}/m/acme/c/temps/x"
    senml = {"Content-Type": "application/senml+json"}
    basic = base64.b64encode(f"not-the-id:{secret}".encode()).decode()
    async with aiohttp.ClientSession() as s:
        for headers, url, status in [
            ({"Authorization": f"{secret} x"}, post, 401),  # the secret where the scheme goes
            ({"Authorization": f"Client {unknown}"}, post, 401),
            ({"Authorization": f"Basic {basic}"}, post, 401),  # the secret with another id
            ({"Authorization": f"Client {secret}"}, f"{base}/m/acme/c/other/x", 403),
            ({"Authorization": f"Client {secret}"}, f"{base}/m/globex/c/temps", 403),
            ({"Authorization": f"Client {secret}", **senml}, post, 400),  # invalid SenML
            ({"Authorization": f"Client {secret}"}, f"{base}/nowhere", 404),
            ({"Authorization": f"Bearer {admin}"}, post, 401),  # the admin key, misplaced
        ]:
            async with s.post(url, data=b'[{"v":1}]', headers=headers) as r:
                assert r.status == status, (headers, url)
        sse = {"Accept": "text/event-stream", "Authorization": f"Client {unknown}"}
        async with s.get(f"{base}/m/acme/c/temps/%23", headers=sse) as r:
            assert r.status == 401
    for raw in [  # written to the socket as they are
        f"POST /m/acme/c/temps HTTP/1.1\nHost: x\nAuthorization: Client {secret}\n"
        "Content-Length: 2\n\n[]",  # lines ending with a bare LF: malformed
        f"POST /m/acme/c/temps HTTP/1.1\r\nHost: x\r\nAuthorization: Client {secret}\xff\r\n"
        "Content-Length: 2\r\n\r\n[]",  # a byte that is not UTF-8
        f"GET /m/acme/c/temps?authorization={secret} HTTP/1.1\r\nHost: x\r\n"
        "Accept: text/event-stream\r\n\r\n",  # the WebSocket query form, on HTTP
    ]:
        with socket.create_connection(("127.0.0.1", server.ports["http"])) as sock:
            sock.sendall(raw.encode("latin-1"))
            assert sock.recv(4096).split()[1] in (b"400", b"401")


async def _api(server: Server, secret: str, admin: str) -> None:
    base = f"http://127.0.0.1:{server.ports['api']}"
    async with aiohttp.ClientSession() as s:
        for value in (f"Bearer {secret}", f"Bearer {admin}x", f"Client {admin}", admin):
            async with s.get(f"{base}/domains", headers={"Authorization": value}) as r:
                assert r.status == 401


async def _ws(server: Server, secret: str, unknown: str) -> None:
    base = f"ws://127.0.0.1:{server.ports['ws']}"
    for url, headers, status in [
        (f"{base}/x?authorization=Client%20{secret}", None, 404),
        (f"{base}/m/acme/c/temps?authorization={unknown}", None, 401),
        (f"{base}/m/acme/c/other", {"Authorization": f"Client {secret}"}, 403),
        (f"{base}/m/acme/c/temps?format=nope", {"Authorization": f"Client {secret}"}, 400),
    ]:
        with pytest.raises(websockets.InvalidStatus) as info:
            async with websockets.connect(url, additional_headers=headers):
                pass
        assert info.value.response.status_code == status, url
    url = f"{base}/m/acme/c/temps/x?authorization={secret}&ct=application/senml%2Bjson"
    async with websockets.connect(url) as ws:  # open, then a refused frame: close 1007
        await ws.send('[{"v":1}]')
        await asyncio.wait_for(ws.wait_closed(), 10)
        assert ws.close_code == 1007


async def _mqtt(server: Server, dev: dict[str, Any], other: dict[str, Any], unknown: str) -> None:
    secret = dev["secret"].encode()
    port = server.ports["mqtt"]
    for level, username, password in [
        (4, dev["secret"], b"wrong"),  # the secret in the user name
        (5, dev["secret"], b"wrong"),
        (4, dev["id"], unknown.encode()),
        (5, other["id"], secret),  # the secret of another client
        (4, "x\r\n" + FORGED, secret + b"x"),  # a line break in the user name
        (5, "x\n" + FORGED + "\r" + dev["secret"], None),
    ]:
        client = await RawClient.open(port, level)
        await client.send(Connect(level, True, 0, "c1", username, password))
        ack = await client.recv()
        assert getattr(ack, "reason_code", None) in (4, 5, 0x86, 0x87), ack
        await client.close()
    client = await RawClient.open(port, 4)  # connected, then a publish it may not make
    await client.send(Connect(4, True, 0, "c2", dev["id"], secret))
    await client.recv()
    await client.publish("m/acme/c/other/x", b"no")
    with pytest.raises((Closed, ConnectionError)):
        await client.recv()
    await client.close()
    url = f"ws://127.0.0.1:{server.ports['mqtt-ws']}/mqtt"
    async with websockets.connect(url, subprotocols=["mqtt"]) as ws:  # type: ignore[list-item]
        await ws.send(encode(Connect(4, True, 0, "c3", dev["secret"], b"wrong"), 4))
        assert (await asyncio.wait_for(ws.recv(), 10))[:1] == b"\x20"  # CONNACK


async def _coap(server: Server, secret: str, unknown: str) -> None:
    context = await aiocoap.Context.create_client_context()
    try:
        base = f"coap://127.0.0.1:{server.ports['coap']}"
        for method, url, code in [
            (Code.POST, f"{base}/m/acme/c/temps/x?auth={unknown}", Code.UNAUTHORIZED),
            (Code.POST, f"{base}/m/acme/c/other/x?auth={secret}", Code.FORBIDDEN),
            (Code.POST, f"{base}/nowhere?auth={secret}", Code.NOT_FOUND),
            (Code.POST, f"{base}/m/acme/c/temps?auth={secret}&auth={secret}", Code.UNAUTHORIZED),
            (Code.GET, f"{base}/m/acme/c/temps/%23?auth={secret}", Code.BAD_REQUEST),
        ]:
            message = aiocoap.Message(code=method, uri=url, payload=b"x")
            response = await asyncio.wait_for(context.request(message).response, 10)
            assert response.code == code, url
    finally:
        await context.shutdown()
    garbage = b"\x00\x01\x00\x01" + f"auth={secret}".encode()  # CoAP version 0: unparsable
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.sendto(garbage, ("127.0.0.1", server.ports["coap"]))


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_no_credential_in_the_log_and_no_forged_line(tmp_path: Path, log_format: str) -> None:
    server = start(tmp_path / "data", "--log-level", "debug", "--log-format", log_format)
    try:
        ids = _provision(server)
        dev, other, admin = ids["dev"], ids["other"], ids["admin"]
        unknown = secrets.token_urlsafe(32)

        async def drive() -> None:
            await _http(server, dev["secret"], unknown, admin)
            await _api(server, dev["secret"], admin)
            await _ws(server, dev["secret"], unknown)
            await _mqtt(server, dev, other, unknown)
            await _coap(server, dev["secret"], unknown)
            await asyncio.sleep(0.5)  # let the last refusals reach the log

        asyncio.run(drive())
    finally:
        server.proc.send_signal(signal.SIGTERM)
        try:
            _, log = server.proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            _, log = server.proc.communicate()
    assert "conduit ready" in log and "refused" in log  # the refusals were logged
    for name, value in (("secret", dev["secret"]), ("unknown secret", unknown), ("admin", admin)):
        found = [line for line in log.splitlines() if value in line]
        assert not found, f"the {name} is in the log: {found[:3]}"
    lines = log.splitlines()
    if log_format == "json":
        for line in lines:
            record = json.loads(line)  # one record per line, whatever a client sent
            assert not record["message"].startswith(FORGED[:23])
    else:
        record = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ \S+: ")
        for line in lines:
            assert not line.startswith(FORGED[:23]), line
            # every line is a record, or part of a traceback that a record began
            assert record.match(line) or line.startswith((" ", "Traceback", "The above", "\t")) \
                or re.match(r"[\w.]+(Error|Exception|Exit)\b", line), line
