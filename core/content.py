"""Content types a message may carry, and which of them are validated as SenML."""

from __future__ import annotations

from core.errors import ContentTypeError

SENML_JSON = "application/senml+json"
SENML_CBOR = "application/senml+cbor"
JSON = "application/json"
TEXT = "text/plain"
OCTETS = "application/octet-stream"

SENML = frozenset({SENML_JSON, SENML_CBOR})
# What HTTP, WebSocket and CoAP accept; other types are refused (415 / 1003 / 4.15).
ACCEPTED = frozenset({SENML_JSON, SENML_CBOR, JSON, TEXT, OCTETS})


def normalize(value: str | None, default: str = OCTETS) -> str:
    """The bare media type of a Content-Type value, lower case, parameters dropped.

    Raises :class:`ContentTypeError` for a type Conduit does not accept.
    """
    if not value:
        return default
    if value in ACCEPTED:  # already bare and lower case: the usual header
        return value
    media = value.split(";", 1)[0].strip().lower()
    if media not in ACCEPTED:
        raise ContentTypeError(
            f"content type {media!r} is not supported; use one of {', '.join(sorted(ACCEPTED))}"
        )
    return media
