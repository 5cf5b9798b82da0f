"""`conduit serve` as a user runs it: a real process, the CLI against its management API,
curl-like publishing and SSE, a clear error when a port is taken, graceful SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

CONDUIT = [sys.executable, "-m", "conduit.cli"]


@dataclass
class Server:
    proc: subprocess.Popen[str]
    ports: dict[str, int]
    env: dict[str, str]

    def cli(
        self,
        *args: str,
        check: bool = True,
        input_text: str | None = None,
        env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*CONDUIT, *args], env={**self.env, **(env or {})}, capture_output=True, text=True,
            timeout=30, check=check, input=input_text,
        )  # fmt: skip

    def cli_json(self, *args: str) -> object:
        return json.loads(self.cli(*args, "--json").stdout)


def start(data_dir: Path, *extra: str) -> Server:
    env = {**os.environ, "CONDUIT_DATA_DIR": str(data_dir), "CONDUIT_LOG_LEVEL": "info"}
    env.pop("CONDUIT_ADMIN_KEY", None)
    proc = subprocess.Popen(
        [*CONDUIT, "serve", "--host", "127.0.0.1", "--http-port", "0", "--ws-port", "0",
         "--coap-port", "0", "--mqtt-port", "0", "--mqtt-ws-port", "0", "--api-port", "0", *extra],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    match = re.match(r"conduit ready: (.*)", line)
    if not match:
        proc.kill()
        raise AssertionError(f"no ready line: {line!r} {proc.stderr.read()}")  # type: ignore[union-attr]
    ports = {k: int(v) for k, v in (p.split("=") for p in match.group(1).split())}
    env["CONDUIT_API_URL"] = f"http://127.0.0.1:{ports['api']}"
    return Server(proc, ports, env)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    srv = start(tmp_path / "data")
    yield srv
    if srv.proc.poll() is None:
        srv.proc.kill()
        srv.proc.wait()


def test_admin_key_file_is_private(server: Server, tmp_path: Path) -> None:
    key = tmp_path / "data" / "admin.key"
    assert key.stat().st_mode & 0o777 == 0o600
    assert len(key.read_text().strip()) >= 40


def test_cli_walkthrough_and_publish(server: Server) -> None:
    assert server.cli_json("domains", "create", "acme") ["name"] == "acme"  # type: ignore[index]
    dev = server.cli_json("clients", "create", "--domain", "acme", "sensor-1")
    app = server.cli_json("clients", "create", "--domain", "acme", "dashboard")
    assert set(dev) >= {"id", "secret", "name", "enabled"}  # type: ignore[arg-type]
    server.cli("channels", "create", "--domain", "acme", "temps")
    server.cli("connect", "--domain", "acme", "--client", "sensor-1", "--channel", "temps",
               "--publish")
    server.cli("connect", "--domain", "acme", "--client", "dashboard", "--channel", "temps",
               "--subscribe")
    conns = server.cli_json("connections", "--domain", "acme")
    assert {(c["client_id"], c["publish"], c["subscribe"]) for c in conns} == {  # type: ignore[union-attr, index]
        (dev["id"], True, False), (app["id"], False, True)  # type: ignore[index]
    }
    # human output shows the secret once, and warns
    human = server.cli("clients", "create", "--domain", "acme", "other")
    assert "secret=" in human.stdout and "cannot be shown again" in human.stderr
    listing = server.cli("clients", "list", "--domain", "acme").stdout
    assert "sensor-1" in listing and "secret" not in listing
    # times as dates, in UTC
    assert re.search(r"name=acme  created=20\d\d-\d\d-\d\dT[\d:]{8}\+00:00 ",
                     server.cli("domains", "list").stdout)

    async def flow() -> list[str]:
        base = f"http://127.0.0.1:{server.ports['http']}"
        async with aiohttp.ClientSession() as s:
            sse = await s.get(f"{base}/m/acme/c/temps/%23", headers={
                "Accept": "text/event-stream", "Authorization": f"Client {app['secret']}"})  # type: ignore[index]
            await sse.content.readline()
            r = await s.post(f"{base}/m/acme/c/temps/kitchen", data=b'[{"n":"t","v":21}]',
                             headers={"Content-Type": "application/senml+json",
                                      "Authorization": f"Client {dev['secret']}"})  # type: ignore[index]
            assert r.status == 202
            lines = []
            while len(lines) < 2:
                line = (await asyncio.wait_for(sse.content.readline(), 5)).decode().strip()
                if line:
                    lines.append(line)
            sse.close()
            return lines

    event, data = asyncio.run(flow())
    assert event == "event: message"
    assert json.loads(data[6:])["subtopic"] == "kitchen"

    # errors are said plainly, with a non-zero exit
    bad = server.cli("channels", "create", "--domain", "nope", "x", check=False)
    assert bad.returncode != 0 and "404" in bad.stderr and "no domain 'nope'" in bad.stderr
    server.cli("clients", "disable", "--domain", "acme", "sensor-1")
    assert server.cli_json("clients", "show", "--domain", "acme", "sensor-1")["enabled"] is False  # type: ignore[index]


def test_cli_without_admin_key_or_server(tmp_path: Path) -> None:
    env = {**os.environ, "CONDUIT_DATA_DIR": str(tmp_path)}
    env.pop("CONDUIT_ADMIN_KEY", None)
    r = subprocess.run([*CONDUIT, "domains", "list"], env=env, capture_output=True, text=True)
    assert r.returncode != 0 and "no admin key" in r.stderr
    env["CONDUIT_ADMIN_KEY"] = "k"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    env["CONDUIT_API_URL"] = f"http://127.0.0.1:{free}"
    r = subprocess.run([*CONDUIT, "domains", "list"], env=env, capture_output=True, text=True)
    assert r.returncode != 0 and "cannot reach the management API" in r.stderr


def test_cli_finds_the_server_from_its_settings(server: Server, tmp_path: Path) -> None:
    """Without --api, the CLI reaches the API where `conduit serve` puts it with the same
    environment or configuration file, and finds the admin key in the same data directory."""
    env = {k: v for k, v in server.env.items() if k != "CONDUIT_API_URL"}
    env["CONDUIT_API_PORT"] = str(server.ports["api"])
    r = subprocess.run([*CONDUIT, "domains", "create", "from-env"], env=env,
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr

    cfg = tmp_path / "conduit.toml"
    data_dir = env.pop("CONDUIT_DATA_DIR")
    del env["CONDUIT_API_PORT"]
    port = server.ports["api"]
    cfg.write_text(f'data_dir = "{data_dir}"\napi_host = "0.0.0.0"\napi_port = {port}\n')
    r = subprocess.run([*CONDUIT, "domains", "list", "--json", "--config", str(cfg)], env=env,
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert [d["name"] for d in json.loads(r.stdout)] == ["from-env"]


def test_wrong_admin_key_is_refused(server: Server) -> None:
    env = {**server.env, "CONDUIT_ADMIN_KEY": "wrong"}
    r = subprocess.run([*CONDUIT, "domains", "list"], env=env, capture_output=True, text=True)
    assert r.returncode != 0 and "401" in r.stderr


@pytest.mark.parametrize("name", ["http", "mqtt", "mqtt-ws"])
def test_port_in_use_is_a_clear_error(tmp_path: Path, name: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {**os.environ, "CONDUIT_DATA_DIR": str(tmp_path)}
        ports = {"http": "0", "mqtt": "0", "mqtt-ws": "0", name: str(port)}
        r = subprocess.run(
            [*CONDUIT, "serve", "--host", "127.0.0.1", "--api-port", "0", "--ws-port", "0",
             "--coap-port", "0", "--mqtt-port", ports["mqtt"],
             "--mqtt-ws-port", ports["mqtt-ws"], "--http-port", ports["http"]],
            env=env, capture_output=True, text=True, timeout=30,
        )
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1] == (  # after the log of listeners started
        f"Error: {name} port {port} is already in use; stop what holds it or choose another"
        f" port (CONDUIT_{name.upper().replace('-', '_')}_PORT)"
    )


def test_bad_configuration_is_a_clear_error(tmp_path: Path) -> None:
    cfg = tmp_path / "conduit.toml"
    cfg.write_text("htp_port = 1\n")
    r = subprocess.run([*CONDUIT, "serve", "--config", str(cfg)], capture_output=True, text=True,
                       timeout=30)
    assert r.returncode != 0 and "htp_port" in r.stderr


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_drains_and_exits(tmp_path: Path, sig: signal.Signals) -> None:
    srv = start(tmp_path / "data")
    srv.cli("domains", "create", "acme")
    sub = srv.cli_json("clients", "create", "--domain", "acme", "s")
    srv.cli("channels", "create", "--domain", "acme", "temps")
    srv.cli("connect", "--domain", "acme", "--client", "s", "--channel", "temps")

    async def watch_until_close() -> str:
        base = f"http://127.0.0.1:{srv.ports['http']}"
        async with aiohttp.ClientSession() as s:
            sse = await s.get(f"{base}/m/acme/c/temps", headers={
                "Accept": "text/event-stream", "Authorization": f"Client {sub['secret']}"})  # type: ignore[index]
            await sse.content.readline()
            srv.proc.send_signal(sig)
            body = await asyncio.wait_for(sse.content.read(), 10)
            return body.decode()

    tail = asyncio.run(watch_until_close())
    assert "event: close" in tail and "server shutting down" in tail
    assert srv.proc.wait(timeout=15) == 0
    assert "stopped" in srv.proc.stderr.read()  # type: ignore[union-attr]


@pytest.mark.parametrize("where", ["file", "environment"])
@pytest.mark.parametrize("key", ["", "   \n", "short-key"])
def test_a_weak_admin_key_stops_the_start(tmp_path: Path, where: str, key: str) -> None:
    env = {**os.environ, "CONDUIT_DATA_DIR": str(tmp_path)}
    env.pop("CONDUIT_ADMIN_KEY", None)
    if where == "file":
        (tmp_path / "admin.key").write_text(key)
        source = str(tmp_path / "admin.key")
    else:
        env["CONDUIT_ADMIN_KEY"] = key
        source = "the admin_key setting (CONDUIT_ADMIN_KEY)"
    r = subprocess.run(
        [*CONDUIT, "serve", "--host", "127.0.0.1", "--http-port", "0", "--ws-port", "0",
         "--coap-port", "0", "--mqtt-port", "0", "--mqtt-ws-port", "0", "--api-port", "0"],
        env=env, capture_output=True, text=True, timeout=30,
    )
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [
        f"Error: admin key from {source} has {len(key.strip())} characters; at least 32 are"
        " needed (make one with: openssl rand -hex 32)"
    ]
    assert "conduit ready" not in r.stdout


def test_state_files_are_private(server: Server, tmp_path: Path) -> None:
    server.cli("domains", "create", "acme")  # written through the WAL
    data = tmp_path / "data"
    files = [data / name for name in ("conduit.db", "conduit.db-wal", "conduit.db-shm")]
    assert {f.name: f.stat().st_mode & 0o777 for f in files} == {f.name: 0o600 for f in files}


def test_an_older_database_is_made_private(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "conduit.db").touch(mode=0o644)
    (data / "conduit.db").chmod(0o644)
    srv = start(data)
    try:
        assert (data / "conduit.db").stat().st_mode & 0o777 == 0o600
    finally:
        srv.proc.kill()
        srv.proc.wait()


def test_sigterm_does_not_wait_for_idle_connections(tmp_path: Path) -> None:
    """Idle HTTP, API and WebSocket connections (and one that never upgraded), and an MQTT one:
    none of them holds the exit for the shutdown timeout (an hour here)."""
    srv = start(tmp_path / "data", "--shutdown-timeout", "3600", "--header-timeout", "3600",
                "--idle-timeout", "3600")
    srv.cli("domains", "create", "acme")
    client = srv.cli_json("clients", "create", "--domain", "acme", "c")
    srv.cli("channels", "create", "--domain", "acme", "temps")
    srv.cli("connect", "--domain", "acme", "--client", "c", "--channel", "temps")
    held = []
    for name in ("http", "api"):  # one request each, then idle on a kept-alive connection
        s = socket.create_connection(("127.0.0.1", srv.ports[name]))
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert s.recv(4096).startswith(b"HTTP/1.1 200")
        held.append(s)
    held.append(socket.create_connection(("127.0.0.1", srv.ports["http"])))  # nothing sent
    held.append(socket.create_connection(("127.0.0.1", srv.ports["ws"])))  # never upgrades
    held.append(socket.create_connection(("127.0.0.1", srv.ports["mqtt"])))  # no CONNECT

    async def upgraded_and_idle() -> None:
        import websockets

        url = f"ws://127.0.0.1:{srv.ports['ws']}/m/acme/c/temps?mode=subscribe"
        async with websockets.connect(
            url, additional_headers={"Authorization": f"Client {client['secret']}"}  # type: ignore[index]
        ) as ws:
            srv.proc.send_signal(signal.SIGTERM)
            await asyncio.wait_for(ws.wait_closed(), 30)
            assert ws.close_code == 1001

    asyncio.run(upgraded_and_idle())
    assert srv.proc.wait(timeout=30) == 0
    for s in held:
        s.close()
