"""CoAP adapter (aiocoap, UDP): the paths ``m/<domain>/c/<channel>[/<subtopic>...]``.

- ``POST`` or ``PUT`` publishes the payload (2.04 Changed). Content-Formats: see
  :mod:`adapters.coap.formats`; no Content-Format means ``application/octet-stream``.
- ``GET`` answers the latest message published on exactly that topic (2.05), or 4.04 when
  there is none yet.
- ``GET`` with ``Observe: 0`` subscribes (wildcards ``+`` and ``#`` allowed in subtopic
  levels): see :mod:`adapters.coap.observe`.
- Credentials: the ``auth=<secret>`` Uri-Query option, in any position among the queries;
  over DTLS (:mod:`adapters.coap.dtls`), the client whose pre-shared key the handshake proved,
  with no other credential needed (an ``auth=`` beside it must name the same client).
- Block-wise transfers both ways (RFC 7959): aiocoap assembles Block1 requests and splits
  Block2 answers; the adapter refuses a Block1 upload as soon as it is bigger than the gateway's
  payload limit, and serves block-wise notifications itself.
- ``/.well-known/core`` lists ``</m>``.

Refusals follow the error table of ``core.errors`` (``condition.answer.coap``), piggy-backed on
the ACK of a confirmable request, with the detail as diagnostic payload (RFC 7252 section 5.5.2:
UTF-8 text, no Content-Format); 4.13 carries Size1, the largest payload accepted.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Callable, Sequence
from typing import Any

import aiocoap
import aiocoap.resource as resource
from aiocoap import error as coap_error
from aiocoap.numbers import COAP_PORT, COAPS_PORT
from aiocoap.numbers.codes import Code
from aiocoap.options import Options
from aiocoap.pipe import Pipe
from aiocoap.util.linkformat import Link, LinkFormat

from adapters.coap import dtls
from adapters.coap.dtls import (
    DTLSError,
    KeyTable,
    cannot_serve,
    end_sessions,
    guard_undecodable,
)
from adapters.coap.dtls import bound_port as dtls_bound_port
from adapters.coap.formats import CONTENT_FORMATS, content_format, media_type
from adapters.coap.observe import DTLS_KEY_REVOKED, Backlog, Observation, Transfers, sequence
from core.bus import Change
from core.credentials import from_coap
from core.errors import (
    Condition,
    ConduitError,
    QuotaError,
    TooLargeError,
    TopicError,
)
from core.gateway import Gateway
from core.identity import Identity
from core.listeners import Endpoint, ListenError, Listening

log = logging.getLogger("conduit.coap")

PROTOCOL = "coap"
DIAGNOSTIC_LIMIT = 512  # bytes of diagnostic payload; it must fit one datagram with the header
_METHODS = "use POST or PUT to publish, GET to read the latest message or to observe"
_NO_OPTIONS = Options()  # shared, never written: see Messaging.render_to_pipe


def diagnostic(text: str) -> bytes:
    """A diagnostic payload: UTF-8, cut (on a character boundary) to fit one datagram."""
    data = text.encode()
    if len(data) > DIAGNOSTIC_LIMIT:
        data = data[: DIAGNOSTIC_LIMIT - 3].decode(errors="ignore").encode() + b"..."
    return data


def refusal(error: ConduitError, max_payload: int) -> aiocoap.Message:
    """The CoAP answer to a refusal: the error table's code and the detail as diagnostic."""
    response = aiocoap.Message(
        code=Code(error.condition.answer.coap), payload=diagnostic(error.detail)
    )
    if error.condition is Condition.TOO_LARGE:
        response.opt.size1 = max_payload
    return response


class Messaging(resource.Resource, resource.PathCapable):
    """Every path under ``m/``: publish, read the latest message, observe."""

    def __init__(self, gateway: Gateway, max_uploads: int = 16) -> None:
        super().__init__()
        self.gateway = gateway
        self.max_uploads = max_uploads  # block-wise uploads assembled at once; 0: any
        self.transfers = Transfers()
        self.observations: dict[Observation, asyncio.Task[Any]] = {}
        self.backlog: Backlog | None = None  # set once the context exists
        self._sequence = sequence()
        self._requests = gateway.metrics.reqs[PROTOCOL]

    def get_resources_as_linkheader(self) -> LinkFormat:
        # One link for the whole tree: listing channels would tell strangers what exists.
        formats = " ".join(str(n) for n in sorted(CONTENT_FORMATS.values()))
        return LinkFormat([Link("", rt="conduit.messages", ct=formats, obs=None)])

    # request dispatch
    async def render_to_pipe(self, pipe: Pipe) -> None:
        request = pipe.request
        self._requests.inc()
        code = request.code
        reserved = _reserved_block_size(request)
        if reserved is not None:
            self.gateway.refused_input(PROTOCOL, "malformed_request", reserved, None)
            pipe.add_response(
                aiocoap.Message(code=Code.BAD_REQUEST, payload=reserved.encode()), is_last=True
            )
            return
        if code is Code.POST or code is Code.PUT:
            if request.opt.block1 is None:
                # The hot path: one datagram, one answer; no block-wise machinery to run.
                response = await self.render_post(request)
                no_response = request.opt.no_response
                if no_response is not None:
                    response.opt.no_response = no_response
                pipe.add_response(response, is_last=True)
                # aiocoap keeps every answer for EXCHANGE_LIFETIME (247 s) to repeat it to a
                # duplicate, and the answer keeps its request. The repeat needs neither the
                # payload nor the options: dropping them halves what an answered publish costs
                # in memory and in garbage-collector work (3.5 kB -> 1.6 kB per request).
                request.opt = _NO_OPTIONS
                request.payload = b""
                return
            refused = await self._check_block1(request)
            if refused is not None:
                pipe.add_response(refused, is_last=True)
                return
        elif code is Code.GET:
            block2 = request.opt.block2
            if block2 is not None and block2.block_number > 0:
                served = self.transfers.serve(request)
                if served is not None:
                    pipe.add_response(served, is_last=True)
                    return
            elif request.opt.observe == 0:
                await self._observe(pipe)
                return
        else:
            pipe.add_response(
                aiocoap.Message(code=Code.METHOD_NOT_ALLOWED, payload=_METHODS.encode()),
                is_last=True,
            )
            return
        # aiocoap's block-wise handling, then render() -> render_post / render_get.
        await super().render_to_pipe(pipe)

    async def render_post(self, request: aiocoap.Message) -> aiocoap.Message:
        identity: Identity | None = None
        try:
            identity = await self._identity(request)
            await self.gateway.publish(
                identity,
                self._topic(request),
                request.payload,
                media_type(request.opt.content_format),
                PROTOCOL,
            )
        except ConduitError as exc:
            return self._refuse(exc, identity)
        return aiocoap.Message(code=Code.CHANGED)

    render_put = render_post

    async def render_get(self, request: aiocoap.Message) -> aiocoap.Message:
        identity: Identity | None = None
        try:
            identity = await self._identity(request)
            topic = self._topic(request)
            if "+" in request.opt.uri_path or "#" in request.opt.uri_path:
                raise TopicError(
                    "wildcards are only allowed when observing (Observe: 0)", "subtopic"
                )
            message = await self.gateway.last(identity, topic)
        except ConduitError as exc:
            return self._refuse(exc, identity)
        if message is None:
            return aiocoap.Message(
                code=Code.NOT_FOUND, payload=b"nothing was published on this topic yet"
            )
        response = aiocoap.Message(code=Code.CONTENT, payload=message.payload)
        cf = content_format(message.content_type)
        if cf is not None:
            response.opt.content_format = cf
        return response

    # observe
    async def _observe(self, pipe: Pipe) -> None:
        request = pipe.request
        identity: Identity | None = None
        try:
            identity = await self._identity(request)
            topic = self._topic(request)
            sub = await self.gateway.subscribe(identity, topic, PROTOCOL)
        except ConduitError as exc:
            pipe.add_response(self._refuse(exc, identity), is_last=True)
            return
        current = None
        if not sub.filter.wildcard:
            with contextlib.suppress(ConduitError):
                current = await self.gateway.last(identity, topic)
        assert self.backlog is not None
        observation = Observation(
            self.gateway,
            pipe,
            sub,
            sequence=self._sequence,
            transfers=self.transfers,
            backlog=self.backlog,
        )
        task = asyncio.current_task()
        assert task is not None
        self.observations[observation] = task
        try:
            await observation.run(current)
        finally:
            self.observations.pop(observation, None)

    # checks
    async def _check_block1(self, request: aiocoap.Message) -> aiocoap.Message | None:
        """Refuse a block-wise upload at its first bad block, before aiocoap spools more."""
        identity: Identity | None = None
        try:
            identity = await self._identity(request)
            media_type(request.opt.content_format)
            limit = self.gateway.limits.max_payload
            block1 = request.opt.block1
            size1 = request.opt.size1
            if size1 is not None and size1 > limit:
                raise TooLargeError(f"payload of {size1} bytes (Size1) exceeds {limit}")
            if block1.start + len(request.payload) > limit:
                raise TooLargeError(f"payload exceeds {limit} bytes")
            uploads = self._uploads()
            if block1.block_number == 0 and self.max_uploads and uploads >= self.max_uploads:
                self.gateway.metrics.limit("coap_max_uploads")
                raise QuotaError(
                    f"{uploads} block-wise uploads are being assembled, the most allowed:"
                    " retry later",
                    "coap_max_uploads",
                )
        except ConduitError as exc:
            return self._refuse(exc, identity)
        return None

    def _uploads(self) -> int:
        """Block-wise uploads aiocoap is assembling: the entries of its Block1 spool (aiocoap
        keeps one up to twice MAX_TRANSMIT_WAIT, 93 s, after its last block). aiocoap has no
        public count; if its internals change this reads 0, and tests/coap/test_limits.py
        fails."""
        spool = getattr(self, "_block1", None)
        items = getattr(getattr(spool, "_assemblies", None), "_items", None)
        return len(items) if isinstance(items, dict) else 0

    async def _identity(self, request: aiocoap.Message) -> Identity:
        psk_client = dtls.psk_client(request.remote)
        return await self.gateway.authenticate(from_coap(request.opt.uri_query, psk_client))

    @staticmethod
    def _topic(request: aiocoap.Message) -> str:
        return "/".join(request.opt.uri_path)

    def _refuse(self, error: ConduitError, identity: Identity | None) -> aiocoap.Message:
        self.gateway.refused(PROTOCOL, error, identity.client_id if identity else None)
        return refusal(error, self.gateway.limits.max_payload)


def _reserved_block_size(request: aiocoap.Message) -> str | None:
    """Why a request's Block1 or Block2 option is refused: size exponent 7 is reserved over UDP
    (RFC 7959 sec 2.2; RFC 8323 gives it to BERT over TCP only). None when it is fine."""
    for name, block in (("Block1", request.opt.block1), ("Block2", request.opt.block2)):
        if block is not None and block.size_exponent == 7:
            return f"{name} size exponent 7 is reserved over UDP (RFC 7959 sec 2.2): use 0 to 6"
    return None


class _LibraryLog(logging.Filter):
    """What aiocoap logs for this adapter's context. It writes a line for every datagram that
    it cannot parse, and for duplicates and pings, which anyone can send by the thousand: an
    unparsable datagram is a counted refusal (``malformed_datagram``), logged as a sample like
    every refusal of a stranger; the rest below ERROR is sampled too."""

    def __init__(self, gateway: Gateway) -> None:
        super().__init__()
        self.gateway = gateway

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno <= logging.DEBUG or record.levelno >= logging.ERROR:
            return True
        if record.msg == _UNPARSABLE:
            source = record.args[0] if isinstance(record.args, tuple) and record.args else "?"
            self.gateway.refused_input(
                PROTOCOL, "malformed_datagram", f"unparsable datagram from {source}", None
            )
            return False
        return self.gateway.noise.allow(PROTOCOL, f"aiocoap: {record.msg}")


_UNPARSABLE = "Ignoring unparsable message from %s"  # aiocoap 0.4's udp6 transport
_contexts = itertools.count(1)


class ConduitSite(resource.Site):
    """aiocoap's site: ``/.well-known/core`` and ``m/...``, and a diagnostic 4.04 for the rest.

    Requests under ``m/`` go straight to :class:`Messaging` with their path as it is: the site's
    own dispatch would copy every request to strip the ``m`` (a deep copy of all its options,
    the largest single cost per request).
    """

    def __init__(self, gateway: Gateway, messaging: Messaging) -> None:
        super().__init__()
        self.gateway = gateway
        self.messaging = messaging
        self.add_resource(
            [".well-known", "core"],
            resource.WKCResource(self.get_resources_as_linkheader, impl_info=None),
        )
        self.add_resource(["m"], messaging)  # listed in /.well-known/core

    async def render_to_pipe(self, pipe: Pipe) -> None:
        path = pipe.request.opt.uri_path
        if path and path[0] == "m" and len(path) > 1:
            await self.messaging.render_to_pipe(pipe)
            return
        try:
            await super().render_to_pipe(pipe)
        except coap_error.NotFound:
            exc = TopicError(
                f"/{'/'.join(path)} is not a messaging path:"
                " use m/<domain>/c/<channel>[/<subtopic>...]",
                "path",
                Condition.NOT_FOUND,
            )
            self.gateway.refused(PROTOCOL, exc)
            pipe.add_response(refusal(exc, self.gateway.limits.max_payload), is_last=True)


class CoAPAdapter(Listening):
    """CoAP over UDP on ``host:port`` (5683 by default; 0 picks a free port, read ``port``),
    and CoAP over DTLS beside it when a ``dtls`` endpoint is given (read ``dtls_port``)."""

    protocol = PROTOCOL

    def __init__(
        self,
        gateway: Gateway,
        host: str = "0.0.0.0",
        port: int = 5683,
        *,
        endpoints: Sequence[Endpoint] | None = None,
        dtls: Endpoint | None = None,
        max_uploads: int = 16,
    ) -> None:
        """Serve plain CoAP on ``endpoints`` (none, or one; None: ``host`` and ``port``) and
        CoAP over DTLS on ``dtls`` (one address, not a wildcard: aiocoap's DTLS server cannot
        answer from the right address otherwise). ``max_uploads``: block-wise uploads
        assembled at once (each up to the gateway's maximum payload). Raises
        :class:`~adapters.coap.dtls.DTLSError` when DTLS cannot be served here."""
        self.gateway = gateway
        plain = list(endpoints) if endpoints is not None else [Endpoint("coap", host, port)]
        if len(plain) > 1 or any(e.tls is not None for e in plain):
            raise ValueError("CoAP serves one plain UDP endpoint; DTLS is the dtls endpoint")
        if dtls is not None:
            why = cannot_serve(dtls)
            if why is not None:
                raise DTLSError(why)
        self.endpoint = plain[0] if plain else None
        self.dtls_endpoint = dtls
        self.endpoints = [e for e in (self.endpoint, dtls) if e is not None]
        self._bound: dict[str, int] = {}
        self.messaging = Messaging(gateway, max_uploads)
        self.site = ConduitSite(gateway, self.messaging)
        self.keys = KeyTable()
        self._reloading = asyncio.Lock()  # one load of the keys at a time: the last one wins
        self._context: aiocoap.Context | None = None
        self._dtls_context: aiocoap.Context | None = None
        self._stop_hearing: Callable[[], None] | None = None

    @property
    def dtls_port(self) -> int:
        """The CoAP over DTLS port (the bound one once started)."""
        assert self.dtls_endpoint is not None
        return self._bound.get(self.dtls_endpoint.name, self.dtls_endpoint.port)

    # lifecycle
    async def start(self) -> None:
        try:
            if self.endpoint is not None:
                await self._start_plain(self.endpoint)
            if self.dtls_endpoint is not None:
                await self._start_dtls(self.dtls_endpoint)
        except BaseException:
            await self.stop(0)
            raise
        contexts = [c for c in (self._context, self._dtls_context) if c is not None]
        self.messaging.backlog = Backlog(*contexts)

    async def _start_plain(self, endpoint: Endpoint) -> None:
        try:
            self._context = await aiocoap.Context.create_server_context(
                self.site,
                bind=(endpoint.host, endpoint.port),
                transports=["udp6"],
                loggername=_logger(self.gateway),
            )
        except OSError as exc:
            raise ListenError(endpoint, exc) from exc
        _ignore_undecodable(self._context, self.gateway)
        self._bound[endpoint.name] = _bound_port(self._context)

    async def _start_dtls(self, endpoint: Endpoint) -> None:
        keys, failed = await self.gateway.provisioning.dtls_keys()
        if failed:
            raise DTLSError(f"{failed[0]} ({len(failed)} such key(s))")
        self.keys.replace(keys)
        try:
            self._dtls_context = await aiocoap.Context.create_server_context(
                self.site,
                # aiocoap binds its DTLS server one port above the port it is given (the
                # CoAP port of the pair): ask for one below. Port 0 stays 0 (-1 + 1).
                bind=(endpoint.host, endpoint.port - (COAPS_PORT - COAP_PORT)),
                transports=["tinydtls_server"],
                server_credentials=self.keys,
                loggername=_logger(self.gateway),
            )
        except OSError as exc:
            raise ListenError(endpoint, exc) from exc
        self._bound[endpoint.name] = dtls_bound_port(self._dtls_context)
        gateway = self.gateway

        def refuse(remote: Any) -> None:
            gateway.refused_input(
                PROTOCOL,
                "malformed_datagram",
                f"datagram over DTLS from {remote.hostinfo} has an option that is not UTF-8",
                dtls.psk_client(remote),
            )

        guard_undecodable(self._dtls_context, refuse)
        self._stop_hearing = self.gateway.on_change(self._changed)

    async def _changed(self, change: Change) -> None:
        """Load the DTLS keys again; end the DTLS sessions and observations of the clients
        whose key is gone or replaced, or who are disabled."""
        async with self._reloading:
            keys, failed = await self.gateway.provisioning.dtls_keys()
            ended = self.keys.replace(keys)
        for line in failed:
            log.error("coaps: %s", line)
        if not ended or self._dtls_context is None:
            return
        observations = {
            observation: task
            for observation, task in self.messaging.observations.items()
            if dtls.psk_client(observation.pipe.request.remote) in ended
        }
        for observation in observations:
            await self.gateway.unsubscribe(observation.sub, DTLS_KEY_REVOKED)
        if observations:
            # Let them send their last notification before their sessions end.
            await asyncio.wait(observations.values(), timeout=1.0)
        count = end_sessions(self._dtls_context, ended, DTLS_KEY_REVOKED)
        if count:
            log.info("coaps: %d DTLS session(s) ended: %s", count, DTLS_KEY_REVOKED)

    async def stop(self, timeout: float = 10.0) -> None:
        """End every observation with 5.03 "server shutting down", then close the sockets."""
        if self._stop_hearing is not None:
            self._stop_hearing()
            self._stop_hearing = None
        observations = dict(self.messaging.observations)
        for observation in observations:
            await self.gateway.unsubscribe(observation.sub, "server shutting down")
        if observations:
            # Let the observations send their last notification before the socket closes.
            await asyncio.wait(observations.values(), timeout=min(timeout, 1.0))
        for context in (self._context, self._dtls_context):
            if context is not None:
                await context.shutdown()
        self._context = self._dtls_context = None


def _logger(gateway: Gateway) -> str:
    """A logger of a context's own, so that the filter counts for this gateway only."""
    logger = log.getChild(f"aiocoap{next(_contexts)}")
    logger.addFilter(_LibraryLog(gateway))
    return logger.name


def _message_interfaces(context: aiocoap.Context) -> list[Any]:
    """aiocoap's UDP endpoints of a context (one: the context has the udp6 transport only)."""
    found = []
    for interface in context.request_interfaces:
        token_interface = getattr(interface, "token_interface", None)
        message_interface = getattr(token_interface, "message_interface", None)
        if message_interface is not None:
            found.append(message_interface)
    return found


def _ignore_undecodable(context: aiocoap.Context, gateway: Gateway) -> None:
    """Drop datagrams whose string options are not UTF-8, as a counted refusal.

    aiocoap 0.4.17 ignores unparsable datagrams, except that one: its decoder raises
    UnicodeDecodeError out of the transport callback, which asyncio logs with a traceback for
    every such datagram (the server keeps serving). One bad packet must not cost an error log.
    """
    for endpoint in _message_interfaces(context):
        received = endpoint.datagram_msg_received

        def guarded(
            data: bytes, ancdata: Any, flags: int, address: Any, received: Any = received
        ) -> None:
            try:
                received(data, ancdata, flags, address)
            except UnicodeDecodeError:
                gateway.refused_input(
                    PROTOCOL,
                    "malformed_datagram",
                    f"datagram from {address[:2]} has an option that is not UTF-8",
                    None,
                )

        endpoint.datagram_msg_received = guarded


def _bound_port(context: aiocoap.Context) -> int:
    for endpoint in _message_interfaces(context):
        transport: Any = getattr(endpoint, "transport", None)
        if transport is not None:
            port: int = transport.get_extra_info("socket").getsockname()[1]
            return port
    raise RuntimeError("cannot find the UDP port aiocoap bound")
