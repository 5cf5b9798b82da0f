"""CoAP Content-Formats and the media types of ``core.content``, both ways.

A POST names its payload with a Content-Format number; a notification or a GET answer names the
message's media type with one. Conduit accepts five formats (the rest is answered 4.15):

=====  ==========================  =====================================
  110  ``application/senml+json``  validated as SenML
  112  ``application/senml+cbor``  validated as SenML
   50  ``application/json``        passed through
    0  ``text/plain``              passed through
   42  ``application/octet-stream`` passed through (also when absent)
=====  ==========================  =====================================
"""

from __future__ import annotations

from core.content import JSON, OCTETS, SENML_CBOR, SENML_JSON, TEXT
from core.errors import ContentTypeError

MEDIA_TYPES: dict[int, str] = {
    110: SENML_JSON,
    112: SENML_CBOR,
    50: JSON,
    0: TEXT,
    42: OCTETS,
}
CONTENT_FORMATS: dict[str, int] = {media: number for number, media in MEDIA_TYPES.items()}

_ACCEPTED = "110 (SenML JSON), 112 (SenML CBOR), 50 (JSON), 0 (text), 42 (octet-stream)"


def media_type(content_format: int | None) -> str:
    """The media type of a request's Content-Format; absent means opaque bytes.

    Raises :class:`ContentTypeError` (4.15) for a format Conduit does not accept.
    """
    if content_format is None:
        return OCTETS
    media = MEDIA_TYPES.get(content_format)
    if media is None:
        raise ContentTypeError(
            f"Content-Format {int(content_format)} is not supported; use one of {_ACCEPTED}"
        )
    return media


def content_format(media: str) -> int | None:
    """The Content-Format of a message's media type, ``None`` when CoAP has no number for it."""
    return CONTENT_FORMATS.get(media)
