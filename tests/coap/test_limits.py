"""CoAP refusals that need tight limits: too large (4.13 with Size1, also in the middle of a
block-wise upload, before the rest is sent), rate exceeded (4.29) and too many block-wise uploads
at once (4.29)."""

from __future__ import annotations

import asyncio

import aiocoap
import pytest
from aiocoap.numbers.codes import Code

from adapters.coap import CoAPAdapter
from core.bus import Subscription
from core.limits import Limits
from tests.coap.conftest import TIMEOUT, RawClient, drain, refusals, request
from tests.conftest import World, running

LIMIT = 1000


@pytest.fixture
def limits() -> Limits:
    # A token comes back every 1000 s: the fourth publish is refused however slow the machine.
    return Limits(max_payload=LIMIT, rate=0.001, burst=3)


async def test_too_large_in_one_datagram(
    world: World, coap: str, client: aiocoap.Context, watch: Subscription
) -> None:
    url = f"{coap}/m/acme/c/temps?auth={world.publisher.secret}"
    # Under the block size (1024), so aiocoap sends it whole.
    response = await request(client, Code.POST, url, b"x" * (LIMIT + 1), content_format=0)
    assert response.code == Code.REQUEST_ENTITY_TOO_LARGE
    assert response.payload == b"payload of 1001 bytes exceeds 1000"
    assert response.opt.size1 == LIMIT
    assert refusals(world, "too_large") == 1
    assert drain(watch) == []


async def test_too_large_announced_by_size1(
    world: World, coap: str, client: aiocoap.Context, watch: Subscription
) -> None:
    # aiocoap splits it into blocks and announces the total in Size1 on the first one.
    url = f"{coap}/m/acme/c/temps?auth={world.publisher.secret}"
    response = await request(client, Code.POST, url, b"x" * 3000, content_format=0)
    assert response.code == Code.REQUEST_ENTITY_TOO_LARGE
    assert response.payload == b"payload of 3000 bytes (Size1) exceeds 1000"
    assert response.opt.size1 == LIMIT
    assert drain(watch) == []


async def test_too_large_found_mid_upload(
    world: World, coap: str, client: aiocoap.Context, watch: Subscription
) -> None:
    """Blocks sent one by one, without Size1: the block that crosses the limit is refused."""
    url = f"{coap}/m/acme/c/temps?auth={world.publisher.secret}"

    async def block(number: int, more: bool) -> aiocoap.Message:
        message = aiocoap.Message(
            code=Code.POST, uri=url, payload=b"y" * 512, content_format=0,
            block1=(number, more, 5),
        )  # fmt: skip
        return await asyncio.wait_for(
            client.request(message, handle_blockwise=False).response, TIMEOUT
        )

    first = await block(0, True)
    assert first.code == Code.CONTINUE
    second = await block(1, True)  # bytes 512..1023 pass the limit
    assert second.code == Code.REQUEST_ENTITY_TOO_LARGE
    assert second.payload == b"payload exceeds 1000 bytes"
    assert second.opt.size1 == LIMIT
    assert drain(watch) == []


async def test_rate_limited(
    world: World, coap: str, client: aiocoap.Context, watch: Subscription
) -> None:
    url = f"{coap}/m/acme/c/temps?auth={world.publisher.secret}"
    answers = [await request(client, Code.POST, url, b"n", content_format=0) for _ in range(4)]
    assert [a.code for a in answers[:3]] == [Code.CHANGED] * 3
    assert answers[3].code == Code.TOO_MANY_REQUESTS
    assert answers[3].payload == b"more than 0.001 messages per second"
    assert refusals(world, "rate_limited") == 1
    assert len(drain(watch)) == 3


async def test_block_wise_uploads_at_once_are_bounded(world: World) -> None:
    """Past ``max_uploads`` uploads being assembled, a new one is refused at its first block
    (4.29, the limit counted); a block of one already under way still goes on."""
    async with running(CoAPAdapter(world.gateway, "127.0.0.1", 0, max_uploads=2)) as adapter:
        raw = await RawClient.connect(adapter.port)
        try:
            answers = []
            for n, subtopic in enumerate("abc"):
                raw.send(
                    aiocoap.Message(
                        code=Code.POST, payload=b"y" * 512, content_format=0,
                        uri_path=("m", "acme", "c", "temps", subtopic),
                        uri_query=(f"auth={world.publisher.secret}",), block1=(0, True, 5),
                    ),
                    token=bytes([n + 1]),
                )  # fmt: skip
                answers.append(await raw.recv())
            codes = [a.code for a in answers]
            assert codes == [Code.CONTINUE, Code.CONTINUE, Code.TOO_MANY_REQUESTS]
            assert answers[2].payload.startswith(b"2 block-wise uploads are being assembled")
            assert refusals(world, "rate_limited") == 1
            limit = world.gateway.metrics.registry.get_sample_value(
                "conduit_limit_reached_total", {"limit": "coap_max_uploads"}
            )
            assert limit == 1
            raw.send(
                aiocoap.Message(
                    code=Code.POST, payload=b"z" * 10, content_format=0,
                    uri_path=("m", "acme", "c", "temps", "a"),
                    uri_query=(f"auth={world.publisher.secret}",), block1=(1, False, 5),
                ),
                token=b"\x01",
            )  # fmt: skip
            assert (await raw.recv()).code == Code.CHANGED
        finally:
            raw.close()
