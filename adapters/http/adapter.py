"""HTTP adapter (aiohttp): ``POST /m/<domain>/c/<channel>[/<subtopic>...]`` publishes,
``GET`` on the same path with ``Accept: text/event-stream`` subscribes (Server-Sent Events).

Refusals follow the error table of ``core.errors`` as ``application/problem+json`` (RFC 9457).
"""

from __future__ import annotations

import contextlib
import logging
import ssl
from typing import Any

import orjson
from aiohttp import web

from core.auth import Credentials, Identity, parse_authorization
from core.bus import Subscription, SubscriptionClosed
from core.content import normalize
from core.errors import (
    PROBLEM_JSON,
    WWW_AUTHENTICATE,
    Condition,
    ConduitError,
    TooLargeError,
    TopicError,
    challenge,
)
from core.errors import problem as problem_document
from core.gateway import Gateway
from core.message import Message, envelope
from core.topics import parse_path

log = logging.getLogger("conduit.http")

SSE_KEEPALIVE = 15.0


def problem(error: ConduitError) -> web.Response:
    """An RFC 9457 problem response for a refusal."""
    status = error.condition.answer.http
    headers = {"WWW-Authenticate": WWW_AUTHENTICATE} if challenge(error) else {}
    return web.Response(
        status=status,
        body=orjson.dumps(problem_document(error, status)),
        content_type=PROBLEM_JSON,
        headers=headers,
    )


def sse_event(message: Message) -> bytes:
    return b"event: message\ndata: " + orjson.dumps(envelope(message)) + b"\n\n"


class HTTPAdapter:
    protocol = "http"

    def __init__(
        self,
        gateway: Gateway,
        host: str = "0.0.0.0",
        port: int = 8008,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.gateway = gateway
        self.host = host
        self.port = port
        self.ssl_context = ssl_context
        self._streams: set[Subscription] = set()
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        self.app = web.Application(client_max_size=gateway.limits.max_payload)
        self.app.router.add_get("/health", self.health)
        self.app.router.add_route("POST", "/m/{rest:.*}", self.publish)
        self.app.router.add_route("PUT", "/m/{rest:.*}", self.publish)
        self.app.router.add_route("GET", "/m/{rest:.*}", self.subscribe)
        self.app.router.add_route("*", "/{rest:.*}", self.not_found)

    # lifecycle
    async def start(self) -> None:
        self._runner = web.AppRunner(self.app, access_log=None, handle_signals=False)
        await self._runner.setup()
        self._site = web.TCPSite(
            self._runner, self.host, self.port, ssl_context=self.ssl_context, reuse_address=True
        )
        await self._site.start()
        server = self._site._server
        if self.port == 0 and server is not None:
            sockets = getattr(server, "sockets", None) or []
            self.port = sockets[0].getsockname()[1]

    async def stop(self, timeout: float = 10.0) -> None:
        """Stop accepting, end event streams, let in-flight requests finish."""
        if self._runner is None:
            return
        if self._site is not None:
            await self._site.stop()  # stop accepting new connections
        for sub in list(self._streams):
            await self.gateway.unsubscribe(sub, "server shutting down")
        if self._runner.server is not None:
            await self._runner.server.shutdown(timeout)  # in-flight requests finish
        await self._runner.cleanup()
        self._runner = None

    # handlers
    def _refuse(self, error: ConduitError, client_id: str | None = None) -> web.Response:
        self.gateway.refused(self.protocol, error, client_id)
        return problem(error)

    async def _identity(self, request: web.Request) -> Identity:
        # Basic credentials may arrive as userinfo too; the header is what clients send.
        creds: Credentials = parse_authorization(request.headers.get("Authorization"))
        return await self.gateway.authenticate(creds)

    async def health(self, request: web.Request) -> web.Response:
        status = await self.gateway.health()
        return web.json_response(
            status, status=200 if status["status"] == "ok" else 503, dumps=_dumps
        )

    async def not_found(self, request: web.Request) -> web.Response:
        return self._refuse(
            TopicError(f"{request.path} is not a messaging path", "path", Condition.NOT_FOUND)
        )

    async def publish(self, request: web.Request) -> web.Response:
        self.gateway.metrics.reqs[self.protocol].inc()
        identity: Identity | None = None
        try:
            identity = await self._identity(request)
            content_type = normalize(request.headers.get("Content-Type"))
            length = request.content_length
            limit = self.gateway.limits.max_payload
            if length is not None and length > limit:
                raise TooLargeError(f"body of {length} bytes exceeds {limit}")
            try:
                body = await request.read()
            except web.HTTPRequestEntityTooLarge:
                raise TooLargeError(f"body exceeds {limit} bytes") from None
            await self.gateway.publish(
                identity, parse_path(request.path), body, content_type, self.protocol
            )
        except ConduitError as exc:
            return self._refuse(exc, identity.client_id if identity else None)
        return web.Response(status=202)

    async def subscribe(self, request: web.Request) -> web.StreamResponse:
        self.gateway.metrics.reqs[self.protocol].inc()
        identity: Identity | None = None
        if "text/event-stream" not in request.headers.get("Accept", ""):
            return web.Response(
                status=406,
                content_type=PROBLEM_JSON,
                body=orjson.dumps(
                    {
                        "type": "urn:conduit:error:not_acceptable",
                        "title": "Not acceptable",
                        "status": 406,
                        "detail": "GET subscribes with Server-Sent Events:"
                        " send Accept: text/event-stream",
                    }
                ),
            )
        try:
            identity = await self._identity(request)
            sub = await self.gateway.subscribe(identity, parse_path(request.path), self.protocol)
        except ConduitError as exc:
            return self._refuse(exc, identity.client_id if identity else None)
        self._streams.add(sub)
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",
            }
        )
        try:
            await response.prepare(request)
            await response.write(b": subscribed to " + str(sub.filter).encode() + b"\n\n")
            while True:
                message = sub.get_nowait() or await sub.next(SSE_KEEPALIVE)
                if message is None:
                    await response.write(b": keep-alive\n\n")
                    continue
                # Write what has queued up meanwhile in one go.
                events = [sse_event(message)]
                while (message := sub.get_nowait()) is not None:
                    events.append(sse_event(message))
                await response.write(b"".join(events))
                self.gateway.delivered(self.protocol, len(events))
        except SubscriptionClosed as closed:
            with contextlib.suppress(Exception):
                await response.write(
                    b"event: close\ndata: " + orjson.dumps({"reason": closed.reason}) + b"\n\n"
                )
        except ConnectionError:
            pass
        finally:
            self._streams.discard(sub)
            await self.gateway.unsubscribe(sub, "stream closed")
        return response


def _dumps(obj: Any) -> str:
    return orjson.dumps(obj).decode()
