"""The error table of DESIGN.md, in one place.

Every refusal anywhere in Conduit is a :class:`ConduitError` carrying one :class:`Condition`.
A condition knows its answer in each protocol's idiom (HTTP status, WebSocket close code,
MQTT 3.1.1 and 5.0 codes, CoAP response code), so an adapter maps an error to its protocol by
reading the condition, never by keeping a table of its own.

The codes are plain integers: core imports no protocol library.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Answer:
    """How one condition is answered in each protocol.

    ``mqtt3`` is a CONNACK return code where the condition arises at CONNECT, 0x80 for a refused
    subscription, or ``None`` where MQTT 3.1.1 can only close the connection. ``mqtt5`` is the
    MQTT 5 reason code. ``coap`` is the response code as ``class * 32 + detail`` (4.01 -> 129).
    """

    http: int
    ws_upgrade: int | None  # HTTP status refusing the upgrade; None: arises after it
    ws_close: int | None  # close code once the connection is open
    mqtt3: int | None
    mqtt5: int
    coap: int
    title: str


def _coap(cls: int, detail: int) -> int:
    return cls * 32 + detail


class Condition(enum.Enum):
    """The rows of the error table (DESIGN.md, "Errors")."""

    NO_CREDENTIALS = Answer(401, 401, 1008, 4, 0x86, _coap(4, 1), "No credentials")
    BAD_CREDENTIALS = Answer(401, 401, 1008, 4, 0x86, _coap(4, 1), "Bad credentials")
    NOT_ALLOWED = Answer(403, 403, 1008, 0x80, 0x87, _coap(4, 3), "Not allowed on this channel")
    BAD_TOPIC = Answer(400, 400, 1008, None, 0x90, _coap(4, 0), "Malformed topic")
    NOT_FOUND = Answer(404, 404, None, None, 0x90, _coap(4, 4), "Not a messaging path")
    INVALID_SENML = Answer(400, None, 1007, None, 0x99, _coap(4, 0), "Invalid SenML")
    UNSUPPORTED_CONTENT_TYPE = Answer(
        415, 415, 1003, None, 0x99, _coap(4, 15), "Unsupported content type"
    )
    TOO_LARGE = Answer(413, 413, 1009, None, 0x95, _coap(4, 13), "Too large")
    RATE_LIMITED = Answer(429, 429, 1008, None, 0x97, _coap(4, 29), "Rate or quota exceeded")
    # Beyond DESIGN.md's table: a request (its body) that does not arrive in time.
    REQUEST_TIMEOUT = Answer(408, 408, 1008, None, 0x8D, _coap(4, 8), "Request timeout")
    UNAVAILABLE = Answer(503, 503, 1011, 3, 0x88, _coap(5, 3), "Service unavailable")

    @property
    def answer(self) -> Answer:
        return self.value

    @property
    def reason(self) -> str:
        """Short machine-readable name, used as the metrics label and problem type."""
        return self.name.lower()


class ConduitError(Exception):
    """A refusal: one condition of the error table and a human-readable detail.

    The detail never contains a secret; it is what the client is told and what is logged.
    """

    condition: Condition = Condition.BAD_TOPIC

    def __init__(self, detail: str, condition: Condition | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        if condition is not None:
            self.condition = condition

    @property
    def reason(self) -> str:
        return self.condition.reason


PROBLEM_JSON = "application/problem+json"
# The challenge sent with a 401 (HTTP, WebSocket upgrade): the schemes Conduit accepts.
WWW_AUTHENTICATE = 'Client realm="conduit", Basic realm="conduit"'


def problem(error: ConduitError, status: int) -> dict[str, object]:
    """The RFC 9457 problem document for a refusal answered over HTTP (``status``)."""
    cond = error.condition
    body: dict[str, object] = {
        "type": f"urn:conduit:error:{cond.reason}",
        "title": cond.answer.title,
        "status": status,
        "detail": error.detail,
    }
    if isinstance(error, SenMLError):
        body["record"] = error.record
        body["field"] = error.field
    if isinstance(error, TopicError):
        body["part"] = error.part
    return body


def plain_problem(status: int, title: str, detail: str) -> dict[str, object]:
    """An RFC 9457 problem document for an answer outside the error table (405, 406, 409...)."""
    return {"type": "about:blank", "title": title, "status": status, "detail": detail}


def challenge(error: ConduitError) -> bool:
    """Whether the answer to this refusal carries ``WWW-Authenticate``."""
    return error.condition in (Condition.NO_CREDENTIALS, Condition.BAD_CREDENTIALS)


class AuthenticationError(ConduitError):
    condition = Condition.BAD_CREDENTIALS


class AuthorizationError(ConduitError):
    condition = Condition.NOT_ALLOWED


class TopicError(ConduitError):
    """A topic or path that breaks the grammar; ``part`` names the offending part."""

    condition = Condition.BAD_TOPIC

    def __init__(self, detail: str, part: str, condition: Condition | None = None) -> None:
        super().__init__(detail, condition)
        self.part = part


class SenMLError(ConduitError):
    """Invalid SenML. ``record`` is the 0-based record index, ``field`` the offending field."""

    condition = Condition.INVALID_SENML

    def __init__(self, detail: str, record: int | None = None, field: str | None = None) -> None:
        where = []
        if record is not None:
            where.append(f"record {record}")
        if field is not None:
            where.append(f"field {field!r}")
        super().__init__(f"{', '.join(where)}: {detail}" if where else detail)
        self.record = record
        self.field = field


class ContentTypeError(ConduitError):
    condition = Condition.UNSUPPORTED_CONTENT_TYPE


class TooLargeError(ConduitError):
    condition = Condition.TOO_LARGE


class RateLimitError(ConduitError):
    condition = Condition.RATE_LIMITED
    retry_after: float | None = None  # seconds until the next one is allowed, when known


class QuotaError(RateLimitError):
    """A limit that bounds what one client may hold was reached; ``limit`` names the setting."""

    def __init__(self, detail: str, limit: str) -> None:
        super().__init__(detail)
        self.limit = limit


class RequestTimeoutError(ConduitError):
    condition = Condition.REQUEST_TIMEOUT


class UnavailableError(ConduitError):
    condition = Condition.UNAVAILABLE
