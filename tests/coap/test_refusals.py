"""Every refusal of the CoAP adapter: the exact response code of the error table, piggy-backed on
the ACK, the diagnostic payload, that it was counted once, and that nothing was published."""

from __future__ import annotations

import json

import aiocoap
import cbor2
import pytest
from aiocoap.numbers.codes import Code

from core.bus import Subscription
from tests.coap.conftest import drain, observers, refusals, request
from tests.conftest import World

SENML = json.dumps([{"n": "temp", "v": 21.5}]).encode()
NO_VALUE = (
    "record 0, field 'v': record has no value: it needs one of v, vs, vb, vd, or a sum s"
    " (RFC 8428 sec 4.2)"
)

# (path?query, who, payload, content format, code, reason, diagnostic)
# "who" names the party whose secret fills {secret}.
# fmt: off
PUBLISH_REFUSALS = [
    ("m/acme/c/temps", None, SENML, 110, Code.UNAUTHORIZED, "no_credentials",
     "no credentials: add the Uri-Query auth=<secret>"),
    ("m/acme/c/temps?auth=", None, SENML, 110, Code.UNAUTHORIZED, "no_credentials",
     "no credentials: add the Uri-Query auth=<secret>"),
    ("m/acme/c/temps?auth=not-a-secret", None, SENML, 110, Code.UNAUTHORIZED,
     "bad_credentials", "unknown or disabled client"),
    ("m/acme/c/temps?auth={secret}&auth={secret}", "publisher", SENML, 110, Code.UNAUTHORIZED,
     "bad_credentials", "more than one auth= query"),
    ("m/acme/c/temps?auth={secret}", "subscriber", SENML, 110, Code.FORBIDDEN, "not_allowed",
     "client may not publish on channel 'temps'"),
    ("m/acme/c/temps?auth={secret}", "stranger", SENML, 110, Code.FORBIDDEN, "not_allowed",
     "client may not publish on channel 'temps'"),
    ("m/acme/c/other?auth={secret}", "publisher", SENML, 110, Code.FORBIDDEN, "not_allowed",
     "client may not publish on channel 'other'"),
    ("m/elsewhere/c/temps?auth={secret}", "publisher", SENML, 110, Code.FORBIDDEN,
     "not_allowed", "client is not in domain 'elsewhere'"),
    ("m/ac!me/c/temps?auth={secret}", "publisher", SENML, 110, Code.BAD_REQUEST, "bad_topic",
     "domain 'ac!me' is not a valid name"),
    ("m/acme/c/temps//x?auth={secret}", "publisher", SENML, 110, Code.BAD_REQUEST, "bad_topic",
     "subtopic level 1 is empty"),
    ("m/acme/c/temps/+?auth={secret}", "publisher", SENML, 110, Code.BAD_REQUEST, "bad_topic",
     "wildcards are not allowed when publishing"),
    ("m/acme/x/temps?auth={secret}", "publisher", SENML, 110, Code.BAD_REQUEST, "bad_topic",
     "topic 'm/acme/x/temps' is not of the form m/<domain>/c/<channel>[/<subtopic>...]"),
    ("other/path?auth={secret}", "publisher", SENML, 110, Code.NOT_FOUND, "not_found",
     "/other/path is not a messaging path: use m/<domain>/c/<channel>[/<subtopic>...]"),
    ("m?auth={secret}", "publisher", SENML, 110, Code.NOT_FOUND, "not_found",
     "/m is not a messaging path: use m/<domain>/c/<channel>[/<subtopic>...]"),
    ("m/acme/c/temps?auth={secret}", "publisher", b'[{"n": "temp"}]', 110, Code.BAD_REQUEST,
     "invalid_senml", NO_VALUE),
    ("m/acme/c/temps?auth={secret}", "publisher", cbor2.dumps([{0: "temp"}]), 112,
     Code.BAD_REQUEST, "invalid_senml", NO_VALUE),
    ("m/acme/c/temps?auth={secret}", "publisher", b"[{", 110, Code.BAD_REQUEST,
     "invalid_senml", None),
    ("m/acme/c/temps?auth={secret}", "publisher", b"</x>", 40, Code.UNSUPPORTED_CONTENT_FORMAT,
     "unsupported_content_type",
     "Content-Format 40 is not supported; use one of 110 (SenML JSON), 112 (SenML CBOR),"
     " 50 (JSON), 0 (text), 42 (octet-stream)"),
    ("m/acme/c/temps?auth={secret}", "publisher", cbor2.dumps({"a": 1}), 60,
     Code.UNSUPPORTED_CONTENT_FORMAT, "unsupported_content_type", None),
]
# fmt: on


def uri(coap: str, world: World, path: str, who: str | None) -> str:
    secret = getattr(world, who).secret if who else ""
    return f"{coap}/{path.format(secret=secret)}"


@pytest.mark.parametrize(
    ("path", "who", "body", "cf", "code", "reason", "detail"), PUBLISH_REFUSALS
)
async def test_publish_refused(
    world: World,
    coap: str,
    client: aiocoap.Context,
    watch: Subscription,
    path: str,
    who: str | None,
    body: bytes,
    cf: int,
    code: Code,
    reason: str,
    detail: str | None,
) -> None:
    before = refusals(world, reason)
    response = await request(
        client, Code.POST, uri(coap, world, path, who), body, content_format=cf
    )
    assert response.code == code
    assert response.mtype == aiocoap.ACK  # piggy-backed
    assert response.opt.content_format is None  # a diagnostic payload has none
    if detail is not None:
        assert response.payload.decode() == detail
    else:
        assert response.payload  # there is always a diagnostic
    assert refusals(world, reason) == before + 1
    assert drain(watch) == []


# (path?query, who, code, reason, diagnostic)
# fmt: off
READ_REFUSALS = [
    ("m/acme/c/temps", None, Code.UNAUTHORIZED, "no_credentials",
     "no credentials: add the Uri-Query auth=<secret>"),
    ("m/acme/c/temps?auth=nope", None, Code.UNAUTHORIZED, "bad_credentials",
     "unknown or disabled client"),
    ("m/acme/c/temps?auth={secret}", "publisher", Code.FORBIDDEN, "not_allowed",
     "client may not subscribe on channel 'temps'"),
    ("m/acme/c/temps?auth={secret}", "stranger", Code.FORBIDDEN, "not_allowed",
     "client may not subscribe on channel 'temps'"),
    ("m/acme/c/-bad?auth={secret}", "subscriber", Code.BAD_REQUEST, "bad_topic",
     "channel '-bad' is not a valid name"),
    ("nothing/here", None, Code.NOT_FOUND, "not_found",
     "/nothing/here is not a messaging path: use m/<domain>/c/<channel>[/<subtopic>...]"),
]
# fmt: on


@pytest.mark.parametrize(("path", "who", "code", "reason", "detail"), READ_REFUSALS)
@pytest.mark.parametrize("observe", [False, True], ids=["get", "observe"])
async def test_read_and_observe_refused(
    world: World,
    coap: str,
    client: aiocoap.Context,
    path: str,
    who: str | None,
    code: Code,
    reason: str,
    detail: str,
    observe: bool,
) -> None:
    before = refusals(world, reason)
    options = {"observe": 0} if observe else {}
    response = await request(client, Code.GET, uri(coap, world, path, who), **options)
    assert response.code == code
    assert response.mtype == aiocoap.ACK
    assert response.opt.observe is None  # no observation was established
    assert response.payload.decode() == detail
    assert refusals(world, reason) == before + 1
    assert observers(world) == 0


@pytest.mark.parametrize(
    ("path", "detail"),
    [
        ("m/acme/c/+", "wildcards are not allowed in the channel"),
        ("m/%2B/c/temps", "wildcards are not allowed in the domain"),
        ("m/acme/c/temps/%23/x", "'#' must be the last level of a filter"),
    ],
)
async def test_observe_bad_filter(
    world: World, coap: str, client: aiocoap.Context, path: str, detail: str
) -> None:
    url = f"{coap}/{path}?auth={world.subscriber.secret}"
    response = await request(client, Code.GET, url, observe=0)
    assert response.code == Code.BAD_REQUEST
    assert response.payload.decode() == detail
    assert observers(world) == 0


async def test_plain_get_takes_no_wildcards(
    world: World, coap: str, client: aiocoap.Context
) -> None:
    url = f"{coap}/m/acme/c/temps/%23?auth={world.subscriber.secret}"
    response = await request(client, Code.GET, url)
    assert response.code == Code.BAD_REQUEST
    assert response.payload == b"wildcards are only allowed when observing (Observe: 0)"
    assert refusals(world, "bad_topic") == 1


async def test_bus_unavailable(
    world: World, coap: str, client: aiocoap.Context, watch: Subscription
) -> None:
    await world.gateway.bus.close()
    url = f"{coap}/m/acme/c/temps?auth={world.publisher.secret}"
    response = await request(client, Code.POST, url, SENML, content_format=110)
    assert response.code == Code.SERVICE_UNAVAILABLE
    assert response.payload == b"bus is closed"
    url = f"{coap}/m/acme/c/temps?auth={world.subscriber.secret}"
    response = await request(client, Code.GET, url, observe=0)
    assert response.code == Code.SERVICE_UNAVAILABLE
    assert refusals(world, "unavailable") == 2
    assert drain(watch) == []


@pytest.mark.parametrize("method", [Code.DELETE, Code.FETCH, Code.PATCH])
async def test_other_methods(
    world: World, coap: str, client: aiocoap.Context, watch: Subscription, method: Code
) -> None:
    url = f"{coap}/m/acme/c/temps?auth={world.both.secret}"
    response = await request(client, method, url, b"x")
    assert response.code == Code.METHOD_NOT_ALLOWED
    assert response.payload == (
        b"use POST or PUT to publish, GET to read the latest message or to observe"
    )
    assert drain(watch) == []
