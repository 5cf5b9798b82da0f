"""CoAP over DTLS (coaps, UDP 5684): aiocoap's ``tinydtls_server`` transport, pre-shared keys.

aiocoap's DTLS server is built on tinydtls (the ``DTLSSocket`` package), calls itself
experimental, and does PSK only (TLS_PSK_WITH_AES_128_CCM_8): no certificates. A client's PSK
identity is its id without dashes and its key is the one provisioning gave it
(:mod:`core.provisioning`).

tinydtls asks for a key in the middle of a handshake and cannot wait, so the keys are held in
memory (:class:`KeyTable`): loaded from the store when the listener starts, and loaded again on
every provisioning change. A change that takes a client's key away, replaces it, or disables the
client ends that client's DTLS sessions (:func:`end_sessions`) and its observations over DTLS.

What the handshake proved reaches a request as ``request.remote.authenticated_claims``: a
:class:`PSKClaim` naming the client, which the adapter hands the authenticator like any other
credential (:func:`psk_client`).

aiocoap has no public API to list or end the DTLS sessions of a listener, to read its bound
port, or to drop a decrypted datagram it cannot decode: :func:`end_sessions`, :func:`bound_port`
and :func:`guard_undecodable` read aiocoap 0.4's internals defensively (the version is pinned
below 0.5 in pyproject.toml); ``tests/coap/test_dtls.py`` fails if they change.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import aiocoap
from aiocoap import error as coap_error

from core.listeners import Endpoint
from core.provisioning import PSK_KEY_MAX, PreSharedKey

log = logging.getLogger("conduit.coap")

INSTALL = (
    "CoAP over DTLS (coaps_enabled) needs the DTLSSocket package: pip install"
    " 'conduit-gateway[dtls]' (it builds tinydtls from source: Debian autoconf automake libtool)"
)


def missing() -> str | None:
    """Why the DTLS listener cannot run here (what to install), or None when it can."""
    from aiocoap.defaults import dtls_missing_modules

    return INSTALL if dtls_missing_modules() else None


def cannot_serve(endpoint: Endpoint) -> str | None:
    """Why CoAP over DTLS cannot be served on ``endpoint`` here, or None."""
    if endpoint.host in ("", "0.0.0.0", "::"):
        return (
            f"CoAP over DTLS cannot listen on the wildcard address {endpoint.host!r}:"
            " aiocoap's DTLS server answers from the one address it is bound to; set coaps_host"
            " (CONDUIT_COAPS_HOST) to an address of this machine"
        )
    return missing()


@dataclass(frozen=True, slots=True)
class PSKClaim:
    """What a DTLS handshake proved: the client whose key it was."""

    client_id: str


def psk_client(remote: Any) -> str | None:
    """The client a request's DTLS session authenticated, or None (plain CoAP)."""
    for claim in getattr(remote, "authenticated_claims", ()):
        if isinstance(claim, PSKClaim):
            return claim.client_id
    return None


class DTLSError(Exception):
    """The DTLS listener cannot serve as configured; the message says why."""


class KeyTable:
    """The pre-shared keys the DTLS listener accepts, by PSK identity: aiocoap's server
    credentials (it calls :meth:`find_dtls_psk` during handshakes). No ``__len__``: aiocoap
    takes a false value for "no credentials given" and would put an empty map in its place."""

    def __init__(self) -> None:
        self._keys: dict[bytes, PreSharedKey] = {}

    def find_dtls_psk(self, identity: bytes) -> tuple[bytes, PSKClaim]:
        found = self._keys.get(identity)
        if found is None or len(found.key) > PSK_KEY_MAX:
            raise KeyError(identity)
        return found.key, PSKClaim(found.client_id)

    def replace(self, keys: Mapping[str, PreSharedKey]) -> set[str]:
        """Hold ``keys`` from now on; returns the clients whose DTLS sessions must end: their
        key is gone or replaced, or they are disabled."""
        new = {identity.encode(): key for identity, key in keys.items()}
        ended = {
            old.client_id
            for identity, old in self._keys.items()
            if (now := new.get(identity)) is None or now.key != old.key or not now.enabled
        }
        self._keys = new
        return ended


def _pool(context: aiocoap.Context) -> Any:
    """The DTLS server socket of a context made with the ``tinydtls_server`` transport."""
    for interface in context.request_interfaces:
        message_interface = getattr(
            getattr(interface, "token_interface", None), "message_interface", None
        )
        pool = getattr(message_interface, "_pool", None)
        if pool is not None and hasattr(pool, "_connections"):
            return pool
    return None


def bound_port(context: aiocoap.Context) -> int:
    pool = _pool(context)
    transport = getattr(pool, "_transport", None)
    if transport is None:
        raise RuntimeError("cannot find the UDP port aiocoap's DTLS server bound")
    port: int = transport.get_extra_info("socket").getsockname()[1]
    return port


def guard_undecodable(context: aiocoap.Context, refuse: Callable[[Any], None]) -> None:
    """Drop decrypted datagrams whose string options are not UTF-8, calling ``refuse(remote)``.

    aiocoap's decoder raises UnicodeDecodeError for those (see the plain CoAP twin in
    :mod:`adapters.coap.adapter`); over DTLS it escapes from inside tinydtls's callback, which
    Cython turns into a SystemError logged with two tracebacks per datagram."""
    wrapper = getattr(_pool(context), "_message_interface", None)
    plaintext = getattr(wrapper, "_plaintext_interface", None)
    received = getattr(plaintext, "_received_datagram", None)
    if plaintext is None or received is None:
        log.warning("aiocoap internals changed: undecodable datagrams over DTLS are not guarded")
        return

    def guarded(address: Any, datagram: bytes) -> None:
        try:
            received(address, datagram)
        except UnicodeDecodeError:
            refuse(address)

    plaintext._received_datagram = guarded


def end_sessions(context: aiocoap.Context, clients: set[str], reason: str) -> int:
    """End the DTLS sessions of these clients (a close_notify, then the session is forgotten:
    the peer must shake hands again). Returns how many ended."""
    pool = _pool(context)
    connections = getattr(pool, "_connections", None)
    if not isinstance(connections, dict):
        log.warning("aiocoap internals changed: DTLS sessions cannot be ended on revocation")
        return 0
    ended = 0
    for address in list(connections.values()):
        claim = getattr(getattr(address, "_psk_store", None), "_claims", None)
        if not isinstance(claim, PSKClaim) or claim.client_id not in clients:
            continue
        with contextlib.suppress(Exception):
            address._dtls_socket.close(address._dtls_session)
        with contextlib.suppress(Exception):
            address._inject_error(coap_error.LibraryShutdown(reason))
        ended += 1
    return ended
