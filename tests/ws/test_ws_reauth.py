"""The WebSocket ``auth`` message: on a ``format=envelope`` connection opened with a broker
token, ``{"type": "auth", "token": ...}`` renews it in place with a fresh token of the same
client. The connection outlives the first token, its rights become the new token's, and every
misuse closes it (1008) with nothing published; on a raw connection the same frame is just a
message."""

from __future__ import annotations

import asyncio
import json
import time
from urllib.parse import quote

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from core.bus import Subscription
from core.credentials import Credentials
from core.gateway import EXPIRED, REVOKED
from tests.conftest import Party, World
from tests.ws.conftest import drain


async def token(world: World, party: Party, ttl: int) -> str:
    identity = await world.gateway.authenticate(Credentials(party.secret))
    value, _ = await world.gateway.broker_token(identity, ttl)
    return value


def url(ws: str, path: str, value: str, fmt: str = "envelope", mode: str | None = None) -> str:
    more = f"&mode={mode}" if mode else ""
    return f"{ws}{path}?format={fmt}{more}&authorization={quote('Bearer ' + value)}"


async def auth(conn: ClientConnection, value: str) -> None:
    await conn.send(json.dumps({"type": "auth", "token": value}))


async def closed_with(conn: ClientConnection) -> tuple[int, str]:
    with pytest.raises(ConnectionClosed) as closed:
        while True:
            await asyncio.wait_for(conn.recv(), 5)
    assert closed.value.rcvd is not None
    return closed.value.rcvd.code, closed.value.rcvd.reason


async def publish(world: World, payload: bytes) -> None:
    publisher = await world.gateway.authenticate(Credentials(world.publisher.secret))
    await world.gateway.publish(publisher, "m/acme/c/temps/t", payload, "text/plain", "http")


async def test_a_connection_renewed_in_place_outlives_its_first_token(
    world: World, ws: str
) -> None:
    first = await token(world, world.both, ttl=2)
    async with connect(url(ws, "/m/acme/c/temps/%23", first)) as conn:
        fresh = await token(world, world.both, ttl=60)
        await auth(conn, fresh)
        answer = json.loads(await asyncio.wait_for(conn.recv(), 5))
        assert answer == {"type": "auth", "status": "ok", "expires_at": answer["expires_at"]}
        assert abs(answer["expires_at"] - (time.time() + 60)) < 5
        await asyncio.sleep(3.0)  # past the first token's end (2 s, whole seconds)
        await publish(world, b"still here")
        got = json.loads(await asyncio.wait_for(conn.recv(), 5))
        assert got["payload"] == "still here"


async def test_without_renewal_the_connection_ends_with_its_token(world: World, ws: str) -> None:
    async with connect(url(ws, "/m/acme/c/temps/%23", await token(world, world.both, 1))) as conn:
        assert await closed_with(conn) == (1008, EXPIRED)


async def test_rights_follow_the_new_token(world: World, ws: str, watch: Subscription) -> None:
    """The client lost its subscribe right, then its publish right: after renewal its
    subscription ends (the connection with it), and frames are refused."""
    prov = world.gateway.provisioning
    # Publish right lost: frames after the renewal are refused, nothing published.
    async with connect(url(ws, "/m/acme/c/temps", await token(world, world.both, 60))) as conn:
        await prov.connect("acme", world.both.id, "temps", False, True)
        await auth(conn, await token(world, world.both, 60))
        assert json.loads(await asyncio.wait_for(conn.recv(), 5))["status"] == "ok"
        await conn.send("not allowed any more")
        assert await closed_with(conn) == (
            1008,
            "the credentials' rules do not allow to publish on m/acme/c/temps",
        )
    await asyncio.sleep(0.1)
    assert drain(watch) == []
    # Subscribe right lost: the subscription ends at the renewal, and the connection with it.
    await prov.connect("acme", world.both.id, "temps", True, True)
    async with connect(url(ws, "/m/acme/c/temps/%23", await token(world, world.both, 60))) as conn:
        await prov.connect("acme", world.both.id, "temps", True, False)
        await auth(conn, await token(world, world.both, 60))
        code, reason = await closed_with(conn)
        assert (code, reason) == (1008, REVOKED)


@pytest.mark.parametrize(
    ("frame", "reason"),
    [
        ({"type": "auth"}, "an auth message carries a broker token (a JWT) as 'token'"),
        ({"type": "auth", "token": "not a jwt"},
         "an auth message carries a broker token (a JWT) as 'token'"),
        ({"type": "auth", "token": "eyJhbGciOiJFZERTQSJ9.eyJ9.c2ln"},
         "no identity provider of this gateway knows this token"),
        ("other", "re-authentication with another client's token"),
    ],
)  # fmt: skip
async def test_what_the_auth_message_refuses(
    world: World, ws: str, watch: Subscription, frame: object, reason: str
) -> None:
    async with connect(url(ws, "/m/acme/c/temps", await token(world, world.both, 60))) as conn:
        if frame == "other":
            frame = {"type": "auth", "token": await token(world, world.publisher, 60)}
        await conn.send(json.dumps(frame))
        assert await closed_with(conn) == (1008, reason)
    await asyncio.sleep(0.1)
    assert drain(watch) == []


async def test_on_a_raw_connection_the_same_frame_is_a_message(
    world: World, ws: str, watch: Subscription
) -> None:
    frame = json.dumps({"type": "auth", "token": await token(world, world.both, 60)})
    value = await token(world, world.both, 60)
    async with connect(url(ws, "/m/acme/c/temps", value, "raw", "publish")) as conn:
        await conn.send(frame)
        await asyncio.sleep(0.2)
    assert [m.payload for m in drain(watch)] == [frame.encode()]


async def test_an_envelope_connection_still_publishes_other_json(
    world: World, ws: str, watch: Subscription
) -> None:
    value = await token(world, world.both, 60)
    frames = ['{"type": "temperature", "v": 21}', '{"note": "mentions \\"auth\\""}', "[1, 2]"]
    async with connect(url(ws, "/m/acme/c/temps", value, mode="publish")) as conn:
        for frame in frames:
            await conn.send(frame)
        await asyncio.sleep(0.2)
    assert [m.payload for m in drain(watch)] == [f.encode() for f in frames]
