"""One aiohttp listener with Conduit's guards, for the HTTP adapter and the management API.

aiohttp's server reads requests for as long as a client likes: its keep-alive default is an
hour, and it has no timeout for a request head that arrives one byte at a time. Every such
connection is a stranger holding a file descriptor. :class:`Listener` serves a handler on one
address with:

- a header timeout (``header_timeout``), from connecting or from the first byte of the next
  request on a kept-alive connection to its complete head; a body timeout is the handler's
  (:data:`ListenerLimits.body_timeout`), as only it knows when it reads a body;
- an idle timeout between requests (aiohttp's ``keepalive_timeout``);
- a cap on open connections (``max_connections``): one more is answered 503 and closed;
- malformed requests answered with a problem document that never repeats what was sent (it may
  hold a secret), counted as refusals and logged as a sample (:mod:`core.noise`), instead of
  aiohttp's traceback per request, which also printed the raw request;
- a prompt stop: idle connections close at once, only requests in flight get the timeout.

It steps under aiohttp's documented API in one place: the connection class is a subclass of
aiohttp's ``RequestHandler`` (made by a ``web.Server`` subclass), which reads its
``_request_in_progress`` and ``_messages`` to tell a request head from a body. pyproject.toml
pins aiohttp below 4.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import Any, cast

import orjson
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError, LineTooLong
from aiohttp.web_protocol import RequestHandler

from adapters import tls
from core.errors import PROBLEM_JSON, plain_problem
from core.gateway import Gateway
from core.limits import ListenerLimits
from core.listeners import Endpoint, ListenError

log = logging.getLogger("conduit.http")

_monotonic = time.monotonic
SWEEP_INTERVAL = 1.0  # seconds between header-timeout checks, at most
LINGER = 2.0  # seconds an unread request body is drained after the answer, at most

Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]


def _problem_bytes(status: int, reason: str, detail: str, *extra: str) -> bytes:
    """A whole HTTP/1.1 answer with a problem document, closing the connection."""
    body = orjson.dumps(plain_problem(status, reason, detail))
    head = [
        f"HTTP/1.1 {status} {reason}",
        f"Content-Type: {PROBLEM_JSON}",
        f"Content-Length: {len(body)}",
        "Connection: close",
        *extra,
    ]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


_TOO_MANY = _problem_bytes(
    503,
    "Service Unavailable",
    "this listener has as many connections as it accepts; retry later",
    "Retry-After: 5",
)


class Connection(RequestHandler):
    """aiohttp's connection protocol, watched by its :class:`Listener`.

    ``head_since`` is when the request head now awaited began: the connection's start, then the
    first byte after each request. None once the parser has made a request of it.
    """

    __slots__ = ("_listener", "head_since")

    def __init__(self, manager: web.Server, listener: Listener, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._listener = listener
        self.head_since: float | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        listener = self._listener
        if len(listener.connections) >= listener.limits.max_connections:
            listener.refused("connection_limit", "too many connections", None)
            transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
            transport.write(_TOO_MANY)
            transport.close()
            return
        listener.connections.add(self)
        self.head_since = _monotonic()
        super().connection_made(transport)

    def connection_lost(self, exc: BaseException | None) -> None:
        self._listener.connections.discard(self)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        # Bytes that arrive while no request is handled begin the next request head; a request
        # the parser has made of them ends it. (aiohttp's own fields.)
        if self.head_since is None and not self._request_in_progress:
            self.head_since = _monotonic()
        RequestHandler.data_received(self, data)
        if self._messages:
            self.head_since = None

    async def shutdown(self, timeout: float | None = 15.0) -> None:
        if not self._request_in_progress:  # idle: nothing to finish, no reason to wait
            self.force_close()
            return
        await super().shutdown(timeout)

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """A problem document instead of aiohttp's text (which quoted the raw request), and a
        sampled log line instead of a traceback per malformed request."""
        listener = self._listener
        if isinstance(exc, HttpProcessingError):
            detail = _describe(exc)
            listener.refused("malformed_request", f"{detail} from {request.remote}", None)
        else:  # a fault of ours: counted, and logged with its traceback (sampled)
            detail = "the server could not answer this request"
            gateway = listener.gateway
            gateway.metrics.refusals.labels(listener.protocol, "internal_error").inc()
            if gateway.noise.allow(listener.protocol, "internal_error"):
                log.error("%s: error handling a request", listener.protocol, exc_info=exc)
        if request.writer.output_size > 0:  # an answer was already begun: only closing is left
            raise ConnectionError("cannot answer after a response began")
        title = "Bad Request" if status < 500 else "Internal Server Error"
        response = web.Response(
            status=status,
            body=orjson.dumps(plain_problem(status, title, detail)),
            content_type=PROBLEM_JSON,
        )
        response.force_close()
        return response


def _describe(exc: HttpProcessingError) -> str:
    """What was wrong with a request, in words that quote none of it."""
    if isinstance(exc, LineTooLong):
        return "a request line or header is too long"
    name = type(exc).__name__
    return {
        "BadHttpMethod": "not an HTTP request",
        "BadStatusLine": "malformed request line (lines end with CRLF)",
        "InvalidHeader": "malformed header",
        "InvalidURLError": "malformed request target",
        "TransferEncodingError": "malformed chunked body",
        "ContentLengthError": "body shorter than its Content-Length",
    }.get(name, "malformed request")


class _Server(web.Server):
    """aiohttp's low-level server, making :class:`Connection` instead of its RequestHandler."""

    def __init__(
        self,
        handler: Handler,
        listener: Listener,
        request_factory: Any,
        connection_options: dict[str, Any],
    ) -> None:
        super().__init__(handler, request_factory=request_factory)
        self._listener = listener
        self._options = connection_options

    def __call__(self) -> RequestHandler:
        return Connection(self, self._listener, loop=self._loop, **self._options)


class _AppRunner(web.AppRunner):
    """aiohttp's runner of an Application, serving it through :class:`_Server`."""

    def __init__(
        self, app: web.Application, listener: Listener, options: dict[str, Any]
    ) -> None:
        super().__init__(app, access_log=None, handle_signals=False)
        self._listener = listener
        self._options = options

    async def _make_server(self) -> web.Server:  # BaseRunner's hook for this
        server = await super()._make_server()
        return _Server(
            server.request_handler,
            self._listener,
            server.request_factory,
            self._options,
        )


class _TLSSite(web.BaseSite):
    """aiohttp's site for a TLS endpoint on Conduit's TLS transport (:mod:`adapters.tls`), as
    the other adapters' TLS endpoints are."""

    def __init__(
        self, runner: web.BaseRunner, host: str, port: int, context: ssl.SSLContext
    ) -> None:
        super().__init__(runner)
        self._host, self._port, self._context = host, port, context

    @property
    def name(self) -> str:
        return f"https://{self._host}:{self._port}"

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None
        self._server = await tls.create_server(  # type: ignore[assignment]
            server, self._host, self._port, self._context, backlog=self._backlog
        )


class Listener:
    """One aiohttp server on one endpoint, guarded (see the module docstring).

    ``target`` is a low-level handler (``web.BaseRequest`` to response), with its
    ``request_factory`` if any, or a ``web.Application``.
    """

    def __init__(
        self,
        gateway: Gateway,
        protocol: str,
        target: Handler | web.Application,
        endpoint: Endpoint,
        *,
        limits: ListenerLimits,
        request_factory: Any = None,
    ) -> None:
        self.gateway = gateway
        self.protocol = protocol
        self.endpoint = endpoint
        self.port = endpoint.port  # the bound port once started
        self.limits = limits
        self.connections: set[Connection] = set()
        self._target = target
        self._request_factory = request_factory
        self._runner: web.BaseRunner | None = None
        self._sweeper: asyncio.TimerHandle | None = None
        self._sweep_interval = SWEEP_INTERVAL

    async def start(self) -> None:
        options = {
            "keepalive_timeout": self.limits.idle_timeout,
            # After a refusal that left a body unread, aiohttp reads and drops the rest for this
            # long before closing, so that the client sees the answer (10 s by default).
            "lingering_time": LINGER,
            "access_log": None,
            "logger": log,
        }
        target = self._target
        runner: web.BaseRunner
        if isinstance(target, web.Application):
            runner = _AppRunner(target, self, options)
        else:
            server = _Server(target, self, self._request_factory, options)
            runner = web.ServerRunner(server, access_log=None, handle_signals=False)
        await runner.setup()
        endpoint = self.endpoint
        site: web.BaseSite
        if endpoint.tls is not None:
            site = _TLSSite(runner, endpoint.host, endpoint.port, endpoint.tls)
        else:
            site = web.TCPSite(runner, endpoint.host, endpoint.port, reuse_address=True)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            raise ListenError(endpoint, exc) from exc
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        if self.port == 0:
            self.port = runner.addresses[0][1]
        self._sweep_interval = min(SWEEP_INTERVAL, self.limits.header_timeout / 2)
        self._sweeper = asyncio.get_running_loop().call_later(self._sweep_interval, self._sweep)

    @property
    def ports(self) -> dict[str, int]:
        """The endpoint's name and port (the bound one once started)."""
        return {self.endpoint.name: self.port}

    async def stop_accepting(self) -> None:
        """Close the listening socket; open connections go on (:meth:`stop` ends them)."""
        if self._runner is not None:
            for site in list(self._runner.sites):
                await site.stop()

    async def stop(self, timeout: float = 10.0) -> None:
        """Stop accepting, close idle connections at once, give requests in flight
        ``timeout`` seconds, then close everything."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        await self.stop_accepting()
        runner = self._runner
        if runner is None:
            return
        self._runner = None
        if runner.server is not None:
            await runner.server.shutdown(timeout)
        await runner.cleanup()

    def refused(self, reason: str, detail: str, client_id: str | None) -> None:
        self.gateway.refused_input(self.protocol, reason, detail, client_id)

    def _sweep(self) -> None:
        now = time.monotonic()
        limit = self.limits.header_timeout
        for connection in list(self.connections):
            since = connection.head_since
            if since is not None and now - since > limit:
                self.connections.discard(connection)
                self.refused(
                    "header_timeout", f"no complete request head within {limit:g} s", None
                )
                connection.force_close()
        self._sweeper = asyncio.get_running_loop().call_later(self._sweep_interval, self._sweep)
