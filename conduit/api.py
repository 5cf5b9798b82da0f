"""The management API: provisioning over REST, plus ``/health`` and ``/metrics``.

It listens on its own address (127.0.0.1 by default) and every provisioning route requires the
admin key as ``Authorization: Bearer <key>``. ``/health``, ``/metrics`` and ``/openapi.json``
are open, for probes and scrapers on the same host. The routes are described in ``conduit.openapi``.
"""

from __future__ import annotations

import asyncio
import hmac
import os
import secrets
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

from conduit.openapi import spec as openapi
from conduit.settings import ADMIN_KEY_FILE as KEY_FILE
from core.errors import (
    PROBLEM_JSON,
    ConduitError,
    RequestTimeoutError,
    plain_problem,
    problem,
)
from core.gateway import Gateway
from core.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from core.provisioning import InvalidRequest
from core.store import Conflict, NotFound, StoreError

MIN_ADMIN_KEY = 32
"""Characters an admin key must have at least (a generated one has 43: 256 random bits)."""


class WeakAdminKey(ValueError):
    """The configured admin key is too short to protect the management API."""


def admin_key(data_dir: Path, configured: str | None) -> str:
    """The admin key: the configured one, or the one kept in the data directory (made once).
    Raises :class:`WeakAdminKey` for a key shorter than :data:`MIN_ADMIN_KEY` characters (an
    empty or blank one included), which must not start a server."""
    if configured is not None:
        return _strong(configured.strip(), "the admin_key setting (CONDUIT_ADMIN_KEY)")
    path = data_dir / KEY_FILE
    if path.exists():
        return _strong(path.read_text().strip(), str(path))
    data_dir.mkdir(parents=True, exist_ok=True)
    key = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key + "\n")
    return key


def _strong(key: str, source: str) -> str:
    if len(key) < MIN_ADMIN_KEY:
        raise WeakAdminKey(
            f"admin key from {source} has {len(key)} characters; at least {MIN_ADMIN_KEY} are"
            " needed (make one with: openssl rand -hex 32)"
        )
    return key


def _problem(status: int, title: str, detail: str) -> web.Response:
    body = orjson.dumps(plain_problem(status, title, detail))
    return web.Response(status=status, body=body, content_type=PROBLEM_JSON)


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(
        status=status, body=orjson.dumps(data, default=_default), content_type="application/json"
    )


def _default(obj: Any) -> Any:
    if hasattr(obj, "__dataclass_fields__"):
        return {k: getattr(obj, k) for k in obj.__dataclass_fields__}
    raise TypeError


class ManagementAPI:
    def __init__(self, gateway: Gateway, key: str, *, body_timeout: float = 30.0) -> None:
        self.gateway = gateway
        self.body_timeout = body_timeout
        self.prov = gateway.provisioning
        self._key = key.encode()
        app = web.Application(middlewares=[self._errors])
        r = app.router
        r.add_get("/health", self.health)
        r.add_get("/metrics", self.metrics)
        r.add_get("/openapi.json", self.spec)
        r.add_post("/domains", self.create_domain)
        r.add_get("/domains", self.list_domains)
        r.add_get("/domains/{domain}", self.get_domain)
        r.add_delete("/domains/{domain}", self.delete_domain)
        r.add_post("/domains/{domain}/clients", self.create_client)
        r.add_get("/domains/{domain}/clients", self.list_clients)
        r.add_get("/domains/{domain}/clients/{client}", self.get_client)
        r.add_delete("/domains/{domain}/clients/{client}", self.delete_client)
        r.add_post("/domains/{domain}/clients/{client}/enable", self.enable_client)
        r.add_post("/domains/{domain}/clients/{client}/disable", self.disable_client)
        r.add_post("/domains/{domain}/clients/{client}/secret", self.rotate_secret)
        r.add_post("/domains/{domain}/clients/{client}/dtls-key", self.create_dtls_key)
        r.add_delete("/domains/{domain}/clients/{client}/dtls-key", self.revoke_dtls_key)
        r.add_post("/domains/{domain}/channels", self.create_channel)
        r.add_get("/domains/{domain}/channels", self.list_channels)
        r.add_get("/domains/{domain}/channels/{channel}", self.get_channel)
        r.add_delete("/domains/{domain}/channels/{channel}", self.delete_channel)
        r.add_post("/domains/{domain}/connections", self.connect)
        r.add_get("/domains/{domain}/connections", self.list_connections)
        r.add_delete("/domains/{domain}/connections/{client}/{channel}", self.disconnect)
        self.app = app

    @web.middleware
    async def _errors(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if request.path not in ("/health", "/metrics", "/openapi.json"):
            given = request.headers.get("Authorization", "")
            scheme, _, token = given.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(
                token.strip().encode(), self._key
            ):
                return _problem(
                    401, "Unauthorized", "send the admin key: Authorization: Bearer <key>"
                )
        try:
            response: web.StreamResponse = await handler(request)
            return response
        except NotFound as exc:
            return _problem(404, "Not found", str(exc))
        except Conflict as exc:
            return _problem(409, "Conflict", str(exc))
        except (InvalidRequest, StoreError) as exc:
            return _problem(400, "Invalid request", str(exc))
        except ConduitError as exc:  # the store or the bus is unavailable; a body too slow
            status = exc.condition.answer.http
            answer = web.Response(
                status=status,
                body=orjson.dumps(problem(exc, status)),
                content_type=PROBLEM_JSON,
            )
            if isinstance(exc, RequestTimeoutError):
                answer.force_close()  # what is left of the body would be read as a request
            return answer
        except web.HTTPException as exc:
            if exc.status >= 400:
                return _problem(exc.status, exc.reason, exc.text or exc.reason)
            raise

    async def _body(self, request: web.Request, *required: str) -> dict[str, Any]:
        try:
            async with asyncio.timeout(self.body_timeout):
                body = await request.json(loads=orjson.loads) if request.can_read_body else {}
        except ValueError:
            raise InvalidRequest("the body is not valid JSON") from None
        except TimeoutError:
            raise RequestTimeoutError(
                f"the body did not arrive within {self.body_timeout:g} s"
            ) from None
        if not isinstance(body, dict):
            raise InvalidRequest("the body must be a JSON object")
        for name in required:
            if not isinstance(body.get(name), str):
                raise InvalidRequest(f"{name!r} is required (a string)")
        meta = body.get("metadata", {})
        if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
            raise InvalidRequest("'metadata' must be an object of strings")
        return body

    # open routes
    async def health(self, request: web.Request) -> web.Response:
        status = await self.gateway.health()
        return _json(status, 200 if status["status"] == "ok" else 503)

    async def metrics(self, request: web.Request) -> web.Response:
        resp = web.Response(body=self.gateway.metrics.exposition())
        resp.headers["Content-Type"] = METRICS_CONTENT_TYPE
        return resp

    async def spec(self, request: web.Request) -> web.Response:
        return _json(openapi())

    # domains
    async def create_domain(self, request: web.Request) -> web.Response:
        body = await self._body(request, "name")
        return _json(await self.prov.create_domain(body["name"], body.get("metadata")), 201)

    async def list_domains(self, request: web.Request) -> web.Response:
        return _json(await self.prov.list_domains())

    async def get_domain(self, request: web.Request) -> web.Response:
        return _json(await self.prov.get_domain(request.match_info["domain"]))

    async def delete_domain(self, request: web.Request) -> web.Response:
        await self.prov.delete_domain(request.match_info["domain"])
        return web.Response(status=204)

    # clients
    async def create_client(self, request: web.Request) -> web.Response:
        body = await self._body(request, "name")
        client, secret = await self.prov.create_client(
            request.match_info["domain"], body["name"], body.get("metadata")
        )
        return _json({**_default(client), "secret": secret}, 201)

    async def list_clients(self, request: web.Request) -> web.Response:
        return _json(await self.prov.list_clients(request.match_info["domain"]))

    async def get_client(self, request: web.Request) -> web.Response:
        m = request.match_info
        return _json(await self.prov.get_client(m["domain"], m["client"]))

    async def delete_client(self, request: web.Request) -> web.Response:
        m = request.match_info
        await self.prov.delete_client(m["domain"], m["client"])
        return web.Response(status=204)

    async def enable_client(self, request: web.Request) -> web.Response:
        m = request.match_info
        return _json(await self.prov.set_client_enabled(m["domain"], m["client"], True))

    async def disable_client(self, request: web.Request) -> web.Response:
        m = request.match_info
        return _json(await self.prov.set_client_enabled(m["domain"], m["client"], False))

    async def rotate_secret(self, request: web.Request) -> web.Response:
        m = request.match_info
        client, secret = await self.prov.rotate_secret(m["domain"], m["client"])
        return _json({**_default(client), "secret": secret})

    async def create_dtls_key(self, request: web.Request) -> web.Response:
        m = request.match_info
        grant = await self.prov.create_dtls_key(m["domain"], m["client"])
        return _json(
            {"client": grant.client.id, "identity": grant.identity, "key": grant.key}, 201
        )

    async def revoke_dtls_key(self, request: web.Request) -> web.Response:
        m = request.match_info
        await self.prov.revoke_dtls_key(m["domain"], m["client"])
        return web.Response(status=204)

    # channels
    async def create_channel(self, request: web.Request) -> web.Response:
        body = await self._body(request, "name")
        channel = await self.prov.create_channel(
            request.match_info["domain"], body["name"], body.get("metadata")
        )
        return _json(channel, 201)

    async def list_channels(self, request: web.Request) -> web.Response:
        return _json(await self.prov.list_channels(request.match_info["domain"]))

    async def get_channel(self, request: web.Request) -> web.Response:
        m = request.match_info
        return _json(await self.prov.get_channel(m["domain"], m["channel"]))

    async def delete_channel(self, request: web.Request) -> web.Response:
        m = request.match_info
        await self.prov.delete_channel(m["domain"], m["channel"])
        return web.Response(status=204)

    # connections
    async def connect(self, request: web.Request) -> web.Response:
        body = await self._body(request, "client", "channel")
        publish, subscribe = body.get("publish", True), body.get("subscribe", True)
        if not isinstance(publish, bool) or not isinstance(subscribe, bool):
            raise InvalidRequest("'publish' and 'subscribe' must be booleans")
        conn = await self.prov.connect(
            request.match_info["domain"], body["client"], body["channel"], publish, subscribe
        )
        return _json(conn, 201)

    async def list_connections(self, request: web.Request) -> web.Response:
        q = request.query
        return _json(
            await self.prov.list_connections(
                request.match_info["domain"], q.get("client"), q.get("channel")
            )
        )

    async def disconnect(self, request: web.Request) -> web.Response:
        m = request.match_info
        await self.prov.disconnect(m["domain"], m["client"], m["channel"])
        return web.Response(status=204)
