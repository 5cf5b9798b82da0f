"""The CoAP adapter with libcoap's ``coap-client-notls`` (Debian ``libcoap3-bin``): publish, read,
block-wise both ways, observe across protocols (HTTP in, CoAP notification out), and every
publish refusal of the table, as the command prints it."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiohttp
import cbor2
import pytest
from aiocoap.numbers.codes import Code

from core.bus import Subscription
from tests.coap.conftest import TIMEOUT, drain, eventually, observers
from tests.coap.test_refusals import PUBLISH_REFUSALS
from tests.conftest import World, require_command

SENML = json.dumps([{"bn": "urn:dev:2:", "n": "temp", "u": "Cel", "v": 19.5}])


@pytest.fixture(scope="module")
def coap_client() -> str:
    return require_command("coap-client-notls", "libcoap3-bin")


async def run(*args: str) -> tuple[bytes, str]:
    """Run coap-client to completion; its stdout (the payload) and stderr (errors)."""
    proc = await asyncio.create_subprocess_exec(
        *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), TIMEOUT)
    return out, err.decode()


async def test_publish_and_read(
    world: World, coap: str, coap_client: str, watch: Subscription
) -> None:
    url = f"{coap}/m/acme/c/temps/dev2?auth={world.publisher.secret}"
    out, err = await run(coap_client, "-m", "post", "-t", "110", "-e", SENML, url)
    assert (out, err) == (b"", "")
    [msg] = drain(watch)
    assert (msg.payload, msg.content_type, msg.subtopic) == (
        SENML.encode(), "application/senml+json", "dev2",
    )  # fmt: skip
    url = f"{coap}/m/acme/c/temps/dev2?auth={world.subscriber.secret}"
    out, err = await run(coap_client, "-m", "get", url)
    assert (out, err) == (SENML.encode() + b"\n", "")  # coap-client ends its output with a newline


async def test_block_wise_both_ways(
    world: World, coap: str, coap_client: str, watch: Subscription, tmp_path: Path
) -> None:
    body = json.dumps([{"n": f"t{i}", "v": i} for i in range(150)]).encode()
    upload = tmp_path / "pack.json"
    upload.write_bytes(body)
    url = f"{coap}/m/acme/c/temps/big?auth={world.publisher.secret}"
    # 64-byte blocks: dozens of Block1 exchanges.
    out, err = await run(coap_client, "-m", "post", "-b", "64", "-t", "110", "-f", str(upload), url)
    assert (out, err) == (b"", "")
    [msg] = drain(watch)
    assert msg.payload == body
    url = f"{coap}/m/acme/c/temps/big?auth={world.subscriber.secret}"
    out, err = await run(coap_client, "-m", "get", "-b", "64", url)
    assert (out, err) == (body + b"\n", "")


async def test_observe_http_in_coap_out(
    world: World, coap: str, http: str, coap_client: str
) -> None:
    url = f"{coap}/m/acme/c/temps/%23?auth={world.subscriber.secret}"
    proc = await asyncio.create_subprocess_exec(
        coap_client, "-m", "get", "-s", "30", url,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        await eventually(lambda: observers(world) == 1, "coap-client registered")
        big = json.dumps([{"n": f"r{i}", "v": i} for i in range(100)])
        headers = {"Authorization": f"Client {world.publisher.secret}"}
        async with aiohttp.ClientSession(headers=headers) as session:
            for body in (SENML, big):
                async with session.post(
                    f"{http}/m/acme/c/temps/room1", data=body,
                    headers={"Content-Type": "application/senml+json"},
                ) as r:  # fmt: skip
                    assert r.status == 202
        assert proc.stdout is not None
        want = (SENML + big).encode()
        seen = b""
        while len(seen) < len(want):
            chunk = await asyncio.wait_for(proc.stdout.read(65536), TIMEOUT)
            assert chunk, "coap-client ended early"
            seen += chunk
        # Notifications are printed one after the other: the small one, then the large one
        # reassembled from its blocks.
        assert seen == want
    finally:
        proc.terminate()
        await proc.wait()


@pytest.mark.parametrize(
    ("path", "who", "body", "cf", "code", "reason", "detail"), PUBLISH_REFUSALS
)
async def test_publish_refused(
    world: World,
    coap: str,
    coap_client: str,
    watch: Subscription,
    tmp_path: Path,
    path: str,
    who: str | None,
    body: bytes,
    cf: int,
    code: Code,
    reason: str,
    detail: str | None,
) -> None:
    secret = getattr(world, who).secret if who else ""
    payload = tmp_path / "payload"
    payload.write_bytes(body)
    url = f"{coap}/{path.format(secret=secret)}"
    out, err = await run(coap_client, "-m", "post", "-t", str(cf), "-f", str(payload), url)
    assert out == b""
    expected = f"{code.dotted} {detail}" if detail else f"{code.dotted} "
    assert err.startswith(expected), err
    assert drain(watch) == []


async def test_read_refused(world: World, coap: str, coap_client: str) -> None:
    url = f"{coap}/m/acme/c/temps?auth={world.publisher.secret}"
    out, err = await run(coap_client, "-m", "get", url)
    assert (out, err.strip()) == (b"", "4.03 client may not subscribe on channel 'temps'")
    out, err = await run(coap_client, "-m", "get", "-s", "5", url)
    assert (out, err.strip()) == (b"", "4.03 client may not subscribe on channel 'temps'")
    assert observers(world) == 0


async def test_cbor_pack(world: World, coap: str, coap_client: str, watch: Subscription,
                         tmp_path: Path) -> None:  # fmt: skip
    body = cbor2.dumps([{-2: "urn:dev:3:", 0: "temp", 2: 20.25}])
    payload = tmp_path / "pack.cbor"
    payload.write_bytes(body)
    url = f"{coap}/m/acme/c/temps?auth={world.publisher.secret}"
    out, err = await run(coap_client, "-m", "put", "-t", "112", "-f", str(payload), url)
    assert (out, err) == (b"", "")
    [msg] = drain(watch)
    assert (msg.payload, msg.content_type) == (body, "application/senml+cbor")
