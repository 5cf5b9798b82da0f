"""The live dashboard page in headless Chromium: it subscribes to a wildcard with the envelope
format and shows messages published over HTTP and WebSocket as they arrive. The screenshot is
kept in ``test-artifacts/ws-live.png``.

Needs Debian's ``chromium`` and Node with ``playwright-core`` (``npm install`` in
``tests/ws/browser``); skips saying which is missing."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
from pathlib import Path

import aiohttp
import pytest
from websockets.asyncio.client import connect

from adapters.ws import WSAdapter
from tests.conftest import World, require_command

HERE = Path(__file__).resolve().parent / "browser"
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
SENML = '[{"bn":"urn:dev:kitchen:","n":"temp","u":"Cel","v":21.5}]'


def browser_tools() -> tuple[str, str]:
    chromium = require_command("chromium", "chromium")
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed (needed to drive Chromium with playwright-core)")
    if not (HERE / "node_modules" / "playwright-core").is_dir():
        npm = shutil.which("npm")
        try:
            if npm is None:
                raise OSError("npm not found")
            subprocess.run(
                [npm, "install", "--no-audit", "--no-fund"],
                cwd=HERE,
                check=True,
                capture_output=True,
                timeout=180,
            )
        except (OSError, subprocess.SubprocessError) as exc:
            pytest.skip(f"playwright-core is not installed in {HERE} and npm install failed: {exc}")
    return chromium, node


async def test_dashboard_shows_live_messages(
    world: World, ws_adapter: WSAdapter, http: str
) -> None:
    chromium, node = browser_tools()
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "ws-live.png"
    shot.unlink(missing_ok=True)
    page = (
        f"http://127.0.0.1:{ws_adapter.port}/"
        f"#topic=m/acme/c/temps/%23&authorization={world.subscriber.secret}"
    )
    proc = await asyncio.create_subprocess_exec(
        node,
        str(HERE / "live.mjs"),
        page,
        str(shot),
        "3",
        cwd=HERE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={"CHROMIUM": chromium, "PATH": "/usr/bin:/bin"},
    )
    assert proc.stdout is not None
    try:
        ready = await asyncio.wait_for(proc.stdout.readline(), 45)
        if ready.strip() != b"READY":
            _, err = await proc.communicate()
            pytest.fail(f"the page did not connect: {ready!r} {err.decode()[-2000:]}")
        headers = {"Authorization": f"Client {world.publisher.secret}"}
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                f"{http}/m/acme/c/temps/kitchen",
                data=SENML,
                headers={**headers, "Content-Type": "application/senml+json"},
            ) as r,
        ):
            assert r.status == 202
        url = f"ws://127.0.0.1:{ws_adapter.port}/m/acme/c/temps"
        async with connect(f"{url}/hall", additional_headers=headers) as device:
            await device.send('{"door": "open"}')
        async with connect(f"{url}/garage", additional_headers=headers) as device:
            await device.send(b"\x00\x01\xfe")
        out, err = await asyncio.wait_for(proc.communicate(), 45)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, err.decode()[-2000:]
    result = json.loads(out.decode().strip().splitlines()[-1])
    assert result["errors"] == []
    assert result["status"] == "subscribed to m/acme/c/temps/#"
    assert result["count"] == "3"
    assert world.subscriber.secret not in result["address"]  # removed from the address bar
    rows = {row[1]: row for row in result["rows"]}  # by subtopic
    assert rows["kitchen"][2:5] == [world.publisher.id, "http", "application/senml+json"]
    assert rows["kitchen"][5] == SENML
    assert rows["hall"][2:6] == [world.publisher.id, "ws", "application/json", '{"door":"open"}']
    assert rows["garage"][3:6] == ["ws", "application/octet-stream", "base64 AAH+"]
    assert shot.stat().st_size > 0
