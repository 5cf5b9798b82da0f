"""Where adapters listen: each serves a list of :class:`Endpoint` s, plain and TLS side by side
(HTTP 8008 and HTTPS 8443, MQTT 1883 and MQTTS 8883, ...). The composition root builds them from
the settings, with the TLS context of each; an adapter only binds them and reports the ports it
got (:class:`Listening`). Core holds the type because every adapter and the composition root share
it; nothing here opens a socket."""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One address to listen on. ``name`` says what it serves (``http``, ``https``, ``mqtt``,
    ``mqtts``, ``mqtt-ws``, ``mqtt-wss``, ``ws``, ``wss``, ``coap``, ``api``) and is how it is
    reported; ``tls`` is its server context (None: plain); ``websocket`` marks MQTT carried in
    WebSocket frames. Port 0 takes a free port."""

    name: str
    host: str
    port: int
    tls: ssl.SSLContext | None = None
    websocket: bool = False

    @property
    def setting(self) -> str:
        """The environment variable that sets this endpoint's port."""
        return f"CONDUIT_{self.name.upper().replace('-', '_')}_PORT"


class Listening:
    """What an adapter reports of its endpoints: each one's name and port, the bound port once
    started (port 0 takes a free one). The adapter sets ``endpoints`` and records each bound
    port in ``_bound``."""

    endpoints: list[Endpoint]
    _bound: dict[str, int]

    @property
    def ports(self) -> dict[str, int]:
        """Each endpoint's name and port (the bound one once started)."""
        return {e.name: self._bound.get(e.name, e.port) for e in self.endpoints}

    @property
    def port(self) -> int:
        """The first endpoint's port."""
        return next(iter(self.ports.values()))


def peer_certificate(transport: Any) -> bytes | None:
    """The DER certificate a TLS client presented on this transport (mutual TLS), or None."""
    ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
    if ssl_object is None:
        return None
    der: bytes | None = ssl_object.getpeercert(binary_form=True)
    return der


def verifies_clients(endpoints: Any) -> bool:
    """Whether any of these endpoints asks TLS clients for a certificate."""
    return any(e.tls is not None and e.tls.verify_mode != ssl.CERT_NONE for e in endpoints)


class ListenError(OSError):
    """An endpoint could not be bound; ``endpoint`` says which, the cause says why."""

    def __init__(self, endpoint: Endpoint, cause: OSError) -> None:
        super().__init__(cause.errno, cause.strerror)
        self.endpoint = endpoint
        self.cause = cause
