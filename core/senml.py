"""SenML (RFC 8428): the one place where Conduit's SenML rules live.

This module owns the strict validation and the resolution of SenML packs in JSON
(``application/senml+json``, CoAP content-format 110) and CBOR (``application/senml+cbor``,
112). :func:`validate` is the check the gateway runs on every publish; :func:`parse` runs the
very same checks (one shared loop) and also returns the resolved :class:`Record` list. Both
raise :class:`~core.errors.SenMLError` with the 0-based record index and the field, named by
its JSON label also for CBOR (record ``None`` for pack-level faults), or
:class:`~core.errors.ContentTypeError` for a content type that is not SenML JSON or CBOR.

Rules, and the choices made where RFC 8428 leaves room
------------------------------------------------------
- A pack is an array of 1 to :data:`MAX_RECORDS` JSON objects / CBOR maps.
- Labels (sec 4.3): an unknown label is ignored unless it ends in ``_`` ("must understand",
  sec 4.4: refused). The CBOR integer labels are a closed table (sec 6: "any extensions will
  use string map keys"), so another integer label is refused, and so is a JSON label sent as
  CBOR text (``"v"`` for ``2``): an encoder bug that would otherwise surface as a confusing
  "no value" error.
- Types are strict: ``true`` is not a number, ``10.0`` is not an integer ``bver``, numbers are
  finite doubles (a JSON number beyond a double is refused even in an extension field, as it
  cannot be decoded). CBOR numbers may be integers, floats or decimal fractions (sec 6), and
  bignums within limits (below). ``vd`` is base64url without padding in JSON (sec 4.3) and a
  byte string in CBOR, which :attr:`Record.data_value` reports as base64url. A JSON exponent
  must be a lower-case ``e`` (sec 5, a MUST; checked in SenML fields only, extension fields
  being ignored).
- CBOR: indefinite-length items anywhere and duplicate map keys are refused (sec 6 requires
  definite lengths for the array, ``vs`` and ``vd``; RFC 8949 sec 5.6 makes duplicate keys
  invalid); a self-described CBOR tag (55799) in front is accepted. A JSON label repeated in
  one object is invisible through the decoder: the last one counts (RFC 8259 sec 4).
- CBOR tags: a pack may use three, anywhere but in a map key (labels are integers or text
  strings, sec 6). A decimal fraction (tag 4, RFC 8949 sec 3.4.4) is ``[exponent,
  mantissa]``, two integers, the exponent within +-10**9 (a double ends near 1e308, so no
  number is lost; ``Decimal`` itself stops near 10**18). A bignum (tags 2 and 3) is an
  integer, as in CBOR's data model, when its magnitude fits in 8 bytes: the integers CBOR
  holds without a tag. A longer one is refused, though it may be a finite double (send that
  as a float or a decimal fraction): an integer of any size, as a map key, lets a sender
  build thousands of keys with one Python hash (quadratic insertion inside cbor2), and one as
  the mantissa of a decimal fraction costs a quadratic conversion. Every other tag is refused,
  naming it: value sharing (28, 29) and string references (25, 256) above all, as a few bytes
  stand for a value decoded or checked again at each use (a 64 kB pack of one 5,000-label map
  shared by 10,000 records has 50 million labels to check); and dates, sets, regular
  expressions and the rest, which SenML has no use for. Tag errors name no record: cbor2 meets
  the tag while decoding, before any record exists.
- Nesting: at most :data:`MAX_DEPTH` (16) levels, the pack being level 1 and its records
  level 2; extension fields may nest arrays and objects (CBOR: arrays, maps and tags; a tag
  counts as a level, so a decimal fraction in a record is levels 3 and 4) down to level 16.
  A deeper pack is refused, in JSON naming the record.
- Base fields ``bn bt bu bv bs bver`` apply to their record and later ones until overridden.
- Name (sec 4.5.1): ``bn + n``, 1+ characters of ``A-Z a-z 0-9 - : . / _``, starting with a
  letter or digit. The error names the field holding the fault: ``bn`` or ``n``; for a
  missing name, ``n`` (or ``bn`` when an explicitly empty ``bn`` is all there is). Conduit
  accepts at most :data:`MAX_NAME_PART` (256) characters in ``bn`` and in ``n``: :func:`parse`
  copies ``bn`` into the name of each later record, so a long one would cost its length times
  the records (a 60 kB ``bn`` and 10,000 records: 600 MB).
- Values (sec 4.2): exactly one of ``v vs vb vd``, or none when the record has a sum ``s``.
  ``bv``/``bs`` are added to a ``v``/``s`` found in the record and never create one (sec 4.1,
  "added to the value found in an entry"); so a record of base fields only, like the first
  one of the sec 5.1.7 example, is refused: sec 4.2's MUST wins over the example. A record
  without ``s`` has no sum even when ``bs`` applies.
- Version (sec 4.4): ``bver`` is a positive integer, and one per pack: the first record sets
  it (10 when it has no ``bver``), a later ``bver`` must repeat it. 1 to 10 are understood,
  and 26 (RFC 9100: 10 plus "Secondary Units", which changes nothing checked here); others
  are refused, as sec 4.4 forbids using a pack of a version not understood.
  :attr:`Record.base_version` is the pack's version, 10 by default.
- Time (sec 4.5.3): ``bt + t``, a missing one counting 0; below 2**28 it is relative and
  resolves to ``now + bt + t``. ``ut`` is a period, so it may not be negative. The resolved
  ``bv + v``, ``bs + s`` and ``bt + t`` must stay finite.

Work in proportion to the bytes
-------------------------------
A payload is at most 256 KiB (``Limits.max_payload``) and any of it may be hostile, so the
work to check one grows with its bytes, never faster: no tag makes a value count twice, no
nesting recursion goes past :data:`MAX_DEPTH`, no name is copied per record beyond
:data:`MAX_NAME_PART`, the tokenizer of the error paths never backtracks, and an error message
repeats at most a short excerpt of what was sent. CBOR map keys are integers or text strings,
everywhere in a pack (labels, and the keys of maps in extension fields): cbor2 decodes an array
or a map used as a key into a tuple or a ``frozendict``, whose hashes a sender can make collide
(integers hash to themselves), and builds the map, quadratic in the colliding keys, before any
check here sees it (256 KiB of such keys: 11 s). So the item heads of a CBOR payload above
4 KiB are walked first (:func:`_check_cbor_keys`, about a microsecond per item); below, the
worst case costs a few milliseconds, and the same keys are refused after decoding.

Speed
-----
JSON takes a fast path: one msgspec decode into a typed struct that also checks the types,
the ``vd`` alphabet and ``ut >= 0`` in C and refuses unknown labels (and so nesting beyond a
record), then one Python loop over the records, with a small cache of name parts instead of
a regex per name. A pack with an extension label, or with any fault, takes the checked path
instead: a decode into plain values through a type that allows a few levels of nesting,
checked in C (a deeper pack is decoded untyped and its levels counted up to
:data:`MAX_DEPTH`), and each field checked in Python, giving the precise error. Both paths
feed the same loop, and the tests check that they agree. CBOR always takes the checked path,
after cbor2, which is given the tag decoders and the depth bound.

Figures for PACK10 of ``/work/shared/bench/senml_samples.py`` (10 records, 343 bytes; CBOR:
the same records with integer labels), Python 3.11.7, msgspec 0.23.0, cbor2 6.3.0, on the
shared 2-core development machine: CPU time, best of many interleaved rounds, beside the
anchor measured in the same run, ``msgspec.json.decode(p)`` (untyped, no checks). Absolute
figures move by up to 2x with the neighbours' load (these were taken under load: the anchor
has taken 1.6 us on a quiet machine); the ratios much less. To reproduce one::

    .venv/bin/python -m timeit -p -r 9 -n 20000 \\
      -s 'import sys; sys.path.insert(0, "/work/shared/bench")' \\
      -s 'import msgspec; from senml_samples import PACK10_BYTES as p' \\
      -s 'from core.senml import validate' 'validate(p, "application/senml+json", 1.7e9)'

    msgspec.json.decode (anchor)    2.6 us
    validate, JSON                  6.0 us   2.3x  (target <= 6 us; README anchors 4.8 / 7.2)
    parse, JSON                     9.4 us   3.6x
    validate, JSON, checked path   24.2 us   9.2x  (what a pack with an extension label costs)
    validate, CBOR                 26.8 us  10.2x  (cbor2 decoding alone: about 7 us)
"""

from __future__ import annotations

import base64
import math
import re
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from decimal import Decimal
from io import BytesIO
from typing import Annotated, Any, Final, NoReturn, cast

import cbor2
import msgspec
from msgspec import UNSET, UnsetType

from core.content import SENML_CBOR, SENML_JSON  # CoAP content-formats 110 and 112
from core.errors import ContentTypeError, SenMLError

__all__ = [
    "MAX_DEPTH",
    "MAX_NAME_PART",
    "MAX_RECORDS",
    "SENML_CBOR",
    "SENML_JSON",
    "Payload",
    "Record",
    "parse",
    "validate",
]


MAX_RECORDS: Final = 10_000
"""Largest pack accepted, in records."""

MAX_DEPTH: Final = 16
"""Deepest nesting accepted: the pack is level 1, its records level 2, and an extension field
may nest arrays and objects (CBOR: arrays, maps and tags) down to this level."""

MAX_NAME_PART: Final = 256
"""Longest ``bn``, and longest ``n``, in characters (a Conduit limit: RFC 8428 sets none)."""

Payload = bytes | bytearray | memoryview  # what transports hand over; copied once if not bytes

_DBL_MAX: Final = sys.float_info.max
_RELATIVE_LIMIT: Final = float(2**28)  # sec 4.5.3: smaller resolved times are relative to now
_UNDERSTOOD_VERSIONS: Final = frozenset(range(1, 11)) | {10 + (1 << 4)}  # RFC 9100 sec 4
_VERSION: Final = 10  # sec 4.1: the version when no record has bver


class Record(msgspec.Struct, frozen=True, gc=False):
    """One resolved SenML record (RFC 8428 sec 4.6): base fields applied, time absolute."""

    name: str
    """``bn + n``."""
    unit: str | None
    """``u``, else the applicable ``bu``."""
    value: float | None
    """``v + bv`` when the record has ``v``."""
    string_value: str | None
    """``vs``."""
    bool_value: bool | None
    """``vb``."""
    data_value: str | None
    """``vd`` as base64url without padding (JSON: as sent; CBOR: encoded from the bytes)."""
    sum: float | None
    """``s + bs`` when the record has ``s``."""
    time: float
    """Seconds since the Unix epoch: ``bt + t``, plus ``now`` when that is below 2**28."""
    update_time: float | None
    """``ut``, in seconds."""
    base_version: int
    """The pack's SenML version: its ``bver``, 10 when absent."""


# Sec 4.3 note to table 1: base64url (RFC 4648 sec 5) without padding; a length of 1 mod 4 is
# impossible. `\Z`, not `$`, which would let a trailing newline through.
_BASE64URL_PATTERN: Final = r"^(?:[A-Za-z0-9_-]{4})*(?:[A-Za-z0-9_-]{2,3})?\Z"
_Base64url = Annotated[str, msgspec.Meta(pattern=_BASE64URL_PATTERN)]
_Period = Annotated[float, msgspec.Meta(ge=0.0)]  # ut is a period in seconds


class _Raw(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    """One record as sent: the fields this module understands, UNSET when absent.

    The JSON decoder checks types and the per-field rules (``vd`` base64url, ``ut`` not
    negative) in C; :func:`_typed` applies the same ones on the slow path.
    """

    bn: str | UnsetType = UNSET
    bt: float | UnsetType = UNSET
    bu: str | UnsetType = UNSET
    bv: float | UnsetType = UNSET
    bs: float | UnsetType = UNSET
    bver: int | UnsetType = UNSET
    n: str | UnsetType = UNSET
    u: str | UnsetType = UNSET
    v: float | UnsetType = UNSET
    vs: str | UnsetType = UNSET
    vb: bool | UnsetType = UNSET
    vd: _Base64url | UnsetType = UNSET
    s: float | UnsetType = UNSET
    t: float | UnsetType = UNSET
    ut: _Period | UnsetType = UNSET


_STR, _NUM, _BOOL, _INT = "a string", "a number", "a boolean", "an integer"
_KINDS: Final[dict[str, str]] = {
    "bn": _STR, "bt": _NUM, "bu": _STR, "bv": _NUM, "bs": _NUM, "bver": _INT,
    "n": _STR, "u": _STR, "v": _NUM, "vs": _STR, "vb": _BOOL, "vd": _STR,
    "s": _NUM, "t": _NUM, "ut": _NUM,
}  # fmt: skip
_CBOR_LABELS: Final[dict[int, str]] = {
    -1: "bver", -2: "bn", -3: "bt", -4: "bu", -5: "bv", -6: "bs",
    0: "n", 1: "u", 2: "v", 3: "vs", 4: "vb", 5: "s", 6: "t", 7: "ut", 8: "vd",
}  # fmt: skip
_CBOR_KEY_OF: Final = {label: key for key, label in _CBOR_LABELS.items()}
_VALUE_LABELS: Final = ("v", "vs", "vb", "vd")


def _json_value(depth: int) -> Any:
    """The type of any JSON value holding at most ``depth`` levels of arrays and objects.

    msgspec expands the shared subtypes, so the decoder grows as 2**depth: kept shallow."""
    value: Any = bool | int | float | str | None
    for _ in range(depth):
        value = bool | int | float | str | None | list[value] | dict[str, value]
    return value


class _FloatText(str):
    """A JSON float as sent: "1E5" stays "1E5"."""


_JSON_PACK: Final = msgspec.json.Decoder(list[_Raw])
_SHALLOW: Final = 6  # levels of nesting the first decode of the checked path accepts
_JSON_SHALLOW: Final = msgspec.json.Decoder(_json_value(_SHALLOW))  # 3 ms to build
_JSON_STR: Final = msgspec.json.Decoder(str)
_JSON_FLOATS_AS_SENT: Final = msgspec.json.Decoder(float_hook=_FloatText)
# "E" after a digit. Written with the literal first so that the regex engine skips to each "E"
# (0.3 us on a 300-byte pack, against 2.4 us for the equivalent rb"[0-9]E").
_UPPER_EXPONENT: Final = re.compile(rb"E(?<=[0-9]E)")
# A string runs to its closing quote or, in the bytes after a number msgspec refused (which
# need not be JSON), to the end: it always matches and never backtracks, so a scan is linear.
_JSON_TOKEN: Final = re.compile(
    rb'("(?:[^"\\]|\\.?)*+(?:"|\Z))(\s*:)?|[\[{]|[\]}]|-?[0-9][0-9.eE+\-]*|true|false|null',
    re.DOTALL,
)
_JSON_STRING: Final = re.compile(rb'"[^"\\]*+(?:\\.[^"\\]*+)*+"', re.DOTALL)
_NOT_STRUCTURE: Final = bytes(sorted(set(range(256)) - set(b"[]{},")))
_RECORD_IN_PATH: Final = re.compile(r"\$\[(\d+)\]")  # a msgspec error's path: `$[3].v`
_EXCERPT: Final = 40  # characters of a sent text or number an error message repeats

_NAME_CHARS: Final = re.compile(r"[A-Za-z0-9\-:./_]*")
_NAME_ALPHABET: Final = frozenset(
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-:./_"
)
_NAME_FIRST: Final = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789")
_BASE64URL: Final = re.compile(_BASE64URL_PATTERN)

# Name parts known to be valid (in the alphabet, at most MAX_NAME_PART long), mapped to
# "starts with a letter or digit". Devices repeat their names, so most records skip the regex.
# Bounded: cleared when full.
_name_parts: dict[str, bool] = {}
_NAME_CACHE_SIZE: Final = 4096


# --- public API -------------------------------------------------------------------------------


def parse(payload: Payload, content_type: str, now: float) -> list[Record]:
    """Validate a SenML pack and return its resolved records.

    ``now`` (seconds since the epoch) resolves relative times. Raises :class:`SenMLError`
    naming the record index and field, or :class:`ContentTypeError` when ``content_type``
    is not SenML JSON or CBOR.
    """
    records: list[Record] = []
    try:
        _resolve(_raw_records(payload, content_type), now, records)
    except RecursionError as exc:  # see validate()
        raise _undecodable(exc) from None
    return records


def validate(payload: Payload, content_type: str, now: float) -> None:
    """Run exactly the checks of :func:`parse` without building the records (the hot path)."""
    try:
        _resolve(_raw_records(payload, content_type), now, None)
    except RecursionError as exc:
        # msgspec counts its nesting against Python's recursion limit: with MAX_DEPTH, only a
        # caller already near that limit meets it. A payload is refused, never a crash.
        raise _undecodable(exc) from None


# --- decoding ---------------------------------------------------------------------------------


def _raw_records(payload: Payload, content_type: str) -> Iterable[_Raw]:
    """The records of a pack, decoded and type-checked, with the pack-level checks done."""
    if type(payload) is not bytes:  # a bytearray or memoryview from a transport: copy once
        payload = bytes(payload)
    if content_type != SENML_JSON:
        # Media types are case-insensitive and may carry parameters (RFC 9110 sec 8.3.1).
        media = content_type.partition(";")[0].strip().lower()
        if media == SENML_CBOR:
            return _cbor_records(payload)
        if media != SENML_JSON:
            raise ContentTypeError(
                f"content type {content_type!r} is not SenML: expected {SENML_JSON} or {SENML_CBOR}"
            )
    # The fast path: msgspec decodes and type-checks every record in C. It forbids unknown
    # labels, so a pack with an extension field (and any must-understand one) takes the
    # slow path, as does any error, which the slow path then describes precisely.
    try:
        raws = _JSON_PACK.decode(payload)
    except msgspec.MsgspecError:
        return _json_records_checked(payload)
    if not 0 < len(raws) <= MAX_RECORDS:
        _check_size(len(raws))
    if 0x45 in payload:  # b"E"; an int is much cheaper to look for than a bytes
        _check_json_exponents(payload)
    return raws


def _json_records_checked(payload: bytes) -> Iterator[_Raw]:
    """The slow path: a decode into plain values with the nesting checked, every field
    checked in Python for a precise error."""
    deep = False
    try:
        # Most packs nest a few levels, decoded with that checked in C. A deeper one is
        # decoded untyped, msgspec then recursing as deep as the payload nests, but within
        # Python's recursion limit (RecursionError, never a crash), and its levels counted.
        try:
            pack = _JSON_SHALLOW.decode(payload)
        except msgspec.ValidationError as exc:
            message = str(exc)
            if "got `array`" not in message and "got `object`" not in message:
                raise
            pack, deep = msgspec.json.decode(payload), True
    except msgspec.ValidationError as exc:  # a number beyond a double
        _raise_out_of_range(payload, str(exc))
    except msgspec.DecodeError as exc:
        raise SenMLError(f"payload is not valid JSON: {exc}") from None
    except RecursionError as exc:
        raise _too_deep_json(payload) or _undecodable(exc) from None
    except Exception as exc:  # worse
        raise _undecodable(exc) from None
    if deep:
        _check_json_depth(pack)
    if type(pack) is not list:
        raise SenMLError(f"a SenML pack is a JSON array of records, got {_kind(pack, False)}")
    _check_size(len(pack))
    if 0x45 in payload:
        _check_json_exponents(payload)
    return (_checked_raw(i, obj, False) for i, obj in enumerate(pack))


def _check_json_depth(pack: object) -> None:
    """Refuses a decoded JSON pack nesting arrays and objects deeper than :data:`MAX_DEPTH`,
    naming the record. Level by level, so that it never recurses."""
    if type(pack) is dict:
        _check_levels(pack, 1, None)
    elif type(pack) is list:
        for i, record in enumerate(pack):
            if type(record) is dict or type(record) is list:
                _check_levels(record, 2, i)


def _check_levels(value: list[Any] | dict[str, Any], depth: int, record: int | None) -> None:
    level = [value]
    while level:
        if depth > MAX_DEPTH:
            raise _too_deep(False, record)
        inner = []
        for container in level:
            for item in container.values() if type(container) is dict else container:
                if type(item) is dict or type(item) is list:
                    inner.append(item)
        level, depth = inner, depth + 1


def _too_deep_json(payload: bytes) -> SenMLError | None:
    """The refusal of JSON that nests deeper than :data:`MAX_DEPTH`, found without decoding it
    (for a payload too deep to decode). Linear: one regex pass drops the strings (possessive,
    it never backtracks), one C pass keeps brackets and commas, then one loop over those."""
    structure = _JSON_STRING.sub(b"", payload).translate(None, _NOT_STRUCTURE)
    in_pack = structure[:1] == b"["  # record numbers are indexes in a top-level array
    depth, record = 0, 0
    for byte in structure:
        if byte == 0x2C:  # ","
            if depth == 1:
                record += 1
        elif byte == 0x5B or byte == 0x7B:  # "[" or "{"
            depth += 1
            if depth > MAX_DEPTH:
                return _too_deep(False, record if in_pack else None)
        else:
            depth -= 1
    return None


def _cbor_records(payload: bytes) -> Iterator[_Raw]:
    body = payload[3:] if payload[:3] == b"\xd9\xd9\xf7" else payload  # self-described CBOR
    if body[:1] == b"\x9f":
        raise SenMLError(
            "a SenML pack is a definite-length CBOR array; an indefinite-length one is a "
            "SensML stream (RFC 8428 sec 6)"
        )
    if len(body) > _CBOR_WALK_FROM:
        _check_cbor_keys(body)
    stream = BytesIO(body)
    decoder = cbor2.CBORDecoder(
        stream,
        semantic_decoders=_CBOR_TAGS,
        max_depth=MAX_DEPTH,
        allow_indefinite=False,
        allow_duplicate_keys=False,
    )
    try:
        pack = decoder.decode()
    except Exception as exc:  # cbor2 raises several types on hostile input; all mean "invalid"
        cause: BaseException | None = exc
        while cause is not None:  # a refusal of ours, raised in a tag decoder, comes wrapped
            if isinstance(cause, SenMLError):
                raise cause from None
            cause = cause.__cause__
        message = str(exc)
        if "nesting depth" in message:
            raise _too_deep(True, None) from None
        if len(message) > 2 * _EXCERPT:  # cbor2 may quote a key: never repeat a payload back
            message = f"{message[: 2 * _EXCERPT]}... ({len(message)} characters)"
        raise SenMLError(f"payload is not valid CBOR: {message}") from None
    if stream.tell() != len(body):
        raise SenMLError(f"payload has {len(body) - stream.tell()} bytes after the CBOR pack")
    if type(pack) is not list:
        raise SenMLError(f"a SenML pack is a CBOR array of records, got {_kind(pack, True)}")
    _check_size(len(pack))
    return (_checked_raw(i, obj, True) for i, obj in enumerate(pack))


def _key_refusal(kind: str, record: int | None) -> SenMLError:
    return SenMLError(
        f"a CBOR map key is {kind}: SenML CBOR labels, and the keys of maps in extension "
        "fields, are integers or text strings (RFC 8428 sec 6)",
        record=record,
    )


def _check_nested_keys(value: object, i: int) -> None:
    """The keys of the maps inside an extension field's value (depth is bounded by cbor2)."""
    if isinstance(value, Mapping):
        for key, inner in value.items():
            if type(key) is not int and type(key) is not str:
                raise _key_refusal(_kind(key, True), i)
            _check_nested_keys(inner, i)
    elif isinstance(value, list):
        for inner in value:
            _check_nested_keys(inner, i)


# Kinds of CBOR items by major type (RFC 8949 sec 3.1), as the refusal of a key names them.
_CBOR_KINDS: Final = (
    "", "", "a byte string", "", "an array", "a map", "a tag", "a float or a simple value"
)  # fmt: skip


def _check_cbor_keys(body: bytes) -> None:
    """Refuse a map key other than an integer or a text string, from the item heads alone,
    before cbor2 decodes anything.

    cbor2 decodes an array or map used as a key into a tuple or a ``frozendict``, whose hashes
    a sender can make collide (integers hash to themselves), and builds the dict, quadratic in
    the colliding keys, before any check of ours sees it: 256 KiB of such keys took 11 s. The
    walk costs about a microsecond per item, so it runs on payloads above
    :data:`_CBOR_WALK_FROM` bytes only; below, the worst case is a few milliseconds, and the
    same keys are refused after decoding. Anything else wrong with the heads is left to cbor2.
    """
    end = len(body)
    pos = 0
    record = -1  # the index of the item being read in the pack (depth 1)
    counts = [1]  # items still to come in each open container
    is_map = [False]
    while counts:
        if pos >= end:
            return
        head = body[pos]
        pos += 1
        major = head >> 5
        info = head & 31
        if info < 24:
            arg = info
        elif info < 28:
            size = 1 << (info - 24)
            arg = int.from_bytes(body[pos : pos + size], "big")
            pos += size
        else:
            return  # indefinite length or reserved: cbor2 refuses it
        depth = len(counts)
        count = counts[-1]
        if depth == 2 and not is_map[-1]:
            record += 1
        if is_map[-1] and count % 2 == 0 and major != 0 and major != 1 and major != 3:
            raise _key_refusal(_CBOR_KINDS[major], record if depth > 1 else None)
        counts[-1] = count - 1
        if major == 2 or major == 3:
            pos += arg
        elif major == 4 or major == 5:
            if depth > MAX_DEPTH:
                return  # cbor2 refuses it
            counts.append(arg if major == 4 else 2 * arg)
            is_map.append(major == 5)
        elif major == 6:
            counts[-1] += 1  # the tag's content is one more item in this container
        while counts and counts[-1] == 0:
            counts.pop()
            is_map.pop()


_CBOR_WALK_FROM: Final = 4096  # bytes of a CBOR payload from which its heads are walked first


def _too_deep(cbor: bool, record: int | None) -> SenMLError:
    kinds = "arrays, maps and tags" if cbor else "arrays and objects"
    return SenMLError(
        f"the pack nests {kinds} deeper than {MAX_DEPTH} levels (the pack is level 1, "
        "its records level 2)",
        record=record,
    )


def _undecodable(exc: Exception) -> SenMLError:
    return SenMLError(f"payload could not be decoded ({type(exc).__name__})")


def _record_in(message: str) -> int | None:
    """The record a msgspec error's path points into, if any."""
    where = _RECORD_IN_PATH.search(message)
    return int(where.group(1)) if where else None


# --- CBOR tags --------------------------------------------------------------------------------
# cbor2 calls a semantic decoder with a tag's content, once decoded, and whether the tag is in
# a map key (or set element): "immutable". An exception raised there ends the decode, wrapped.

_MAX_BIGNUM_BYTES: Final = 8  # a magnitude below 2**64: the integers CBOR holds without tags
_MAX_DECIMAL_EXPONENT: Final = 10**9  # far past a double (1e308), well within Decimal
_AMPLIFYING_TAGS: Final = {  # a few bytes standing for a value decoded or checked again
    25: "string references (tag 25) are",
    256: "string references (tag 256) are",
    28: "value sharing (tag 28) is",
    29: "value sharing (tag 29) is",
}


def _refused_tag(tag: int) -> SenMLError:
    what = _AMPLIFYING_TAGS.get(tag)
    if what is not None:
        return SenMLError(
            f"CBOR {what} not accepted in SenML: a pack spells out each value where it is "
            "used, so that checking it costs what its bytes do"
        )
    return SenMLError(
        f"CBOR tag {tag} is not accepted in SenML: numbers are integers, floats or decimal "
        "fractions (tag 4; RFC 8428 sec 6), and bignums (tags 2 and 3) of at most "
        f"{_MAX_BIGNUM_BYTES} bytes are integers; no other tag is used"
    )


def _tag_in_key(tag: int) -> SenMLError:
    return SenMLError(
        f"CBOR tag {tag} in a map key is not accepted in SenML: labels are integers or "
        "text strings (RFC 8428 sec 6)"
    )


def _bignum(tag: int) -> Callable[[object, bool], int]:
    """Tag 2 (``n``) or 3 (``-1 - n``): an integer, its magnitude in at most 8 bytes."""

    def decode(value: object, immutable: bool) -> int:
        if immutable:
            raise _tag_in_key(tag)
        if type(value) is not bytes:
            raise SenMLError(
                f"a CBOR bignum (tag {tag}) holds a byte string, got {_kind(value, True)}"
            )
        if len(value) > _MAX_BIGNUM_BYTES:
            raise SenMLError(
                f"a CBOR bignum (tag {tag}) of {len(value)} bytes is not accepted in SenML: at "
                f"most {_MAX_BIGNUM_BYTES} (a magnitude below 2**64); send a larger number as "
                "a float or a decimal fraction (tag 4)"
            )
        magnitude = int.from_bytes(value, "big")
        return magnitude if tag == 2 else -1 - magnitude

    return decode


def _decimal_fraction(value: object, immutable: bool) -> Decimal:
    """Tag 4, ``[exponent, mantissa]`` (RFC 8949 sec 3.4.4): ``mantissa * 10**exponent``."""
    if immutable:
        raise _tag_in_key(4)
    if type(value) is list and len(value) == 2:
        exponent, mantissa = value
        if type(exponent) is int and type(mantissa) is int:  # a bignum is an int by now
            if -_MAX_DECIMAL_EXPONENT <= exponent <= _MAX_DECIMAL_EXPONENT:
                return Decimal(f"{mantissa}E{exponent}")  # exact: at most 20 digits
            raise SenMLError(
                f"a CBOR decimal fraction (tag 4) with the exponent {_number(exponent)} is "
                f"not accepted in SenML: at most {_MAX_DECIMAL_EXPONENT} either way (a double "
                "ends near 1e308)"
            )
    raise SenMLError(
        "a CBOR decimal fraction (tag 4) is an array of two integers, [exponent, mantissa] "
        f"(RFC 8949 sec 3.4.4), got {_kind(value, True)}"
    )


class _Tags(dict[int, Callable[[object, bool], object]]):
    """cbor2's semantic decoders: the tags SenML needs; any other tag, including those cbor2
    would decode itself (value sharing 28 and 29, string references 25 and 256, dates, sets,
    regular expressions...), is refused by the decoder :meth:`__missing__` makes for it."""

    def __missing__(self, tag: int) -> Callable[[object, bool], NoReturn]:
        def refuse(value: object, immutable: bool) -> NoReturn:
            raise _refused_tag(tag)

        return refuse


_CBOR_TAGS: Final = _Tags({2: _bignum(2), 3: _bignum(3), 4: _decimal_fraction})


def _check_size(count: int) -> None:
    if count == 0:
        raise SenMLError("the pack is empty: a SenML pack has at least one record")
    if count > MAX_RECORDS:
        raise SenMLError(f"the pack has {count} records; at most {MAX_RECORDS} are allowed")


def _checked_raw(i: int, obj: object, cbor: bool) -> _Raw:
    """Record ``i`` of a decoded pack, every label and type checked here in Python.

    The common cases (a finite number, a plain string) are tested inline; anything else goes
    through :func:`_typed`, which converts it or says precisely what is wrong.
    """
    if type(obj) is not dict and not (cbor and isinstance(obj, Mapping)):
        raise SenMLError(
            f"a record is a {'CBOR map' if cbor else 'JSON object'}, got {_kind(obj, cbor)}",
            record=i,
        )
    fields: dict[str, Any] = {}
    for key, value in obj.items():
        if cbor:
            label = _CBOR_LABELS.get(key) if type(key) is int else None
        else:
            label = key if key in _KINDS else None
        if label is None:
            _unknown_label(key, i, cbor)  # raises unless it is an extension to ignore
            if cbor and isinstance(value, list | Mapping):
                _check_nested_keys(value, i)
            continue
        kind = _KINDS[label]
        t = type(value)
        if kind is _NUM:
            if (
                (t is float or t is int)
                and -_DBL_MAX <= value <= _DBL_MAX  # false for nan
                and (value >= 0 or label != "ut")
            ):
                fields[label] = float(value)
                continue
        elif kind is _STR and t is str and label != "vd":
            fields[label] = value
            continue
        fields[label] = _typed(value, kind, i, label, cbor)
    return _Raw(**fields)


def _unknown_label(key: object, i: int, cbor: bool) -> None:
    """Return if ``key`` is an extension label to ignore (sec 4.4), else raise."""
    if type(key) is str:
        if key.endswith("_"):
            raise SenMLError(
                f"unknown field {_excerpt(key)} must be understood (its label ends in '_'), "
                "so the pack cannot be used (RFC 8428 sec 4.4)",
                record=i,
                field=key if len(key) <= _EXCERPT else key[:_EXCERPT] + "...",
            )
        if cbor and key in _KINDS:
            raise SenMLError(
                f"label {key!r} is the JSON label; SenML CBOR uses the integer label "
                f"{_CBOR_KEY_OF[key]} (RFC 8428 sec 6)",
                record=i,
                field=key,
            )
        return
    if type(key) is int:
        raise SenMLError(
            f"integer label {_number(key)} is not a SenML label; CBOR extensions use text "
            "labels (RFC 8428 sec 6)",
            record=i,
            field=_number(key),
        )
    raise _key_refusal(_kind(key, cbor), i)  # only CBOR has keys that are not text


def _typed(value: object, kind: str, i: int, label: str, cbor: bool) -> Any:
    """``value`` as the type the label needs (numbers as finite floats, CBOR ``vd`` as
    base64url), or raise saying what is wrong."""
    if kind is _NUM:
        if type(value) is float or type(value) is int or (cbor and type(value) is Decimal):
            try:
                number = float(cast(float, value))
            except (OverflowError, ValueError):  # a huge integer; a signalling NaN decimal
                number = math.inf
            if not math.isfinite(number):
                raise SenMLError(
                    f"{label!r} must be a finite number within the range of a double, "
                    f"got {_number(value)}",
                    record=i,
                    field=label,
                )
            if number < 0.0 and label == "ut":
                raise SenMLError(
                    f"'ut' is a period in seconds and cannot be negative, got {number}",
                    record=i,
                    field="ut",
                )
            return number
    elif label == "vd" and cbor:
        if type(value) is bytes:
            return base64.urlsafe_b64encode(value).rstrip(b"=").decode("ascii")
        raise SenMLError(
            f"'vd' is a byte string in SenML CBOR, got {_kind(value, cbor)}",
            record=i,
            field="vd",
        )
    elif kind is _STR and type(value) is str:
        if label == "vd" and _BASE64URL.search(value) is None:
            raise SenMLError(
                "'vd' must be base64url (RFC 4648 sec 5) without padding (RFC 8428 sec 4.3)",
                record=i,
                field="vd",
            )
        return value
    elif (kind is _BOOL and type(value) is bool) or (kind is _INT and type(value) is int):
        return value
    raise SenMLError(f"{label!r} must be {kind}, got {_kind(value, cbor)}", record=i, field=label)


def _kind(value: object, cbor: bool) -> str:
    """How the sender's encoding calls the type of ``value``."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float | Decimal):
        return f"the number {_number(value)}"
    if isinstance(value, str):
        return "a text string" if cbor else "a string"
    if isinstance(value, bytes):
        return "a byte string"
    if isinstance(value, list | tuple):
        return "an array"
    if isinstance(value, Mapping):
        return "a map" if cbor else "an object"
    return type(value).__name__


def _excerpt(text: str, limit: int = _EXCERPT) -> str:
    """``repr(text)``, or for a long text its start and its length: an error message tells
    what was sent without repeating a payload back."""
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text)} characters)"


def _token(token: bytes) -> str:
    """A JSON number as sent, or for a long one its start and its length."""
    if len(token) <= _EXCERPT:
        return token.decode()
    return f"{token[:_EXCERPT].decode()}... ({len(token)} characters)"


def _number(value: object) -> str:
    """A number for a message; a huge integer is described, not printed (nor refused by
    Python's limit on converting long integers to text)."""
    if isinstance(value, int) and value.bit_length() > 64:
        return f"an integer of {value.bit_length()} bits"
    return str(value)


def _check_json_exponents(payload: bytes) -> None:
    """Sec 5: "If the value has an exponent, the 'e' MUST be in lower case"."""
    if _UPPER_EXPONENT.search(payload) is None:
        return
    # An "E" after a digit is most often in a string (a name, a unit): out of strings, only
    # a number can hold one.
    if _UPPER_EXPONENT.search(_JSON_STRING.sub(b'""', payload)) is None:
        return
    # Decoded again, each float as sent. Untyped, but the payload has just decoded with its
    # nesting bounded. A record that is not an object is refused later.
    for i, obj in enumerate(_JSON_FLOATS_AS_SENT.decode(payload)):
        if type(obj) is dict:
            for label, value in obj.items():
                if type(value) is _FloatText and "E" in value and _KINDS.get(label) is _NUM:
                    raise SenMLError(
                        f"number {_token(value.encode())} has an upper-case exponent; SenML "
                        "JSON requires 'e' (RFC 8428 sec 5)",
                        record=i,
                        field=label,
                    )


def _raise_out_of_range(payload: bytes, message: str) -> NoReturn:
    def beyond_double(token: bytes) -> bool:
        try:
            return not math.isfinite(float(token))
        except ValueError:  # after the refused number, the bytes need not be JSON
            return False

    found = _find_number(payload, beyond_double)
    if found is not None:
        record, label, token = found
        raise SenMLError(
            f"{label!r} must be a finite number within the range of a double, got {_token(token)}",
            record=record,
            field=label,
        )
    raise SenMLError(
        "payload has a number beyond the range of a double", record=_record_in(message)
    )


def _find_number(payload: bytes, wanted: Callable[[bytes], bool]) -> tuple[int, str, bytes] | None:
    """The first number of a SenML field (record, label, token) for which ``wanted`` holds.

    A small tokenizer over JSON known to be well-formed up to the number looked for (msgspec
    stops at a number it refuses); only the rare error paths use it. Depth 1 is the pack,
    depth 2 a record's own fields. Linear: tokens never overlap and nothing backtracks.
    """
    depth, record, label = 0, -1, ""
    for match in _JSON_TOKEN.finditer(payload):
        token = match.group()
        first = token[:1]
        if first in b"]}":
            depth -= 1
            continue
        if depth == 1:
            record, label = record + 1, ""
        if first in b"[{":
            depth += 1
        elif first == b'"':
            if depth == 2 and match.group(2):
                raw = match.group(1)
                try:
                    label = _JSON_STR.decode(raw) if b"\\" in raw else raw[1:-1].decode()
                except (msgspec.MsgspecError, UnicodeDecodeError):  # past the refused number
                    label = ""
        elif depth == 2 and _KINDS.get(label) is _NUM and first not in b"tfn" and wanted(token):
            return record, label, token
    return None


# --- the rules --------------------------------------------------------------------------------


def _name_part(part: str) -> bool | None:
    """None if ``part`` is longer than :data:`MAX_NAME_PART` or has a character outside the
    name alphabet (sec 4.5.1), else whether it starts with a letter or digit."""
    if len(part) > MAX_NAME_PART or _NAME_CHARS.fullmatch(part) is None:
        return None
    starts = part[:1] in _NAME_FIRST and part != ""
    if len(_name_parts) >= _NAME_CACHE_SIZE:
        _name_parts.clear()
    _name_parts[part] = starts
    return starts


def _bad_name(name: str, part: str, i: int, field: str) -> SenMLError:
    if len(part) > MAX_NAME_PART:
        # parse() copies bn into every record's name: a long one would cost its length times
        # the records, and validate() refuses what parse() would.
        return SenMLError(
            f"{field!r} has {len(part)} characters; Conduit accepts at most {MAX_NAME_PART} "
            "in bn and in n",
            record=i,
            field=field,
        )
    quoted = _excerpt(name, 2 * MAX_NAME_PART)  # bn + n: only n may not have been checked
    bad = next((c for c in part if c not in _NAME_ALPHABET), None)
    if bad is not None:
        detail = f"name {quoted} has a character not allowed ({bad!r})"
    elif name == "":
        detail = "name is empty"
    else:
        detail = f"name {quoted} must start with a letter or a digit"
    return SenMLError(detail + " (RFC 8428 sec 4.5.1)", record=i, field=field)


def _check_version(version: int, current: int, i: int) -> None:
    if version < 1:
        raise SenMLError(
            f"'bver' must be a positive integer, got {_number(version)}", record=i, field="bver"
        )
    if version not in _UNDERSTOOD_VERSIONS:
        raise SenMLError(
            f"SenML version {_number(version)} is not understood (understood: 1 to 10, and 26 with "
            "secondary units), so the pack cannot be used (RFC 8428 sec 4.4, RFC 9100)",
            record=i,
            field="bver",
        )
    if i:
        raise SenMLError(
            f"'bver' {version} changes the pack's version {current}, which its first record "
            "sets (10 when it has no bver); all records of a pack have the same version "
            "(RFC 8428 sec 4.4)",
            record=i,
            field="bver",
        )


def _too_many_values(r: _Raw, i: int) -> SenMLError:
    present = [label for label in _VALUE_LABELS if getattr(r, label) is not UNSET]
    return SenMLError(
        f"record has {len(present)} value fields ({', '.join(present)}); "
        "exactly one of v, vs, vb, vd is allowed (RFC 8428 sec 4.2)",
        record=i,
        field=present[1],
    )


def _not_finite(what: str, i: int, field: str) -> SenMLError:
    return SenMLError(f"resolved {what} is beyond the range of a double", record=i, field=field)


def _resolve(raws: Iterable[_Raw], now: float, out: list[Record] | None) -> None:
    """Apply the rules to each record in order; append resolved records to ``out`` if given.

    This loop is most of the cost of :func:`validate`, so it is written for the interpreter:
    base values live in locals, absent fields cost one attribute read and one identity test,
    and what only :func:`parse` needs is read in its own branch.
    """
    unset: Final = UNSET
    parts = _name_parts
    bn = ""
    has_bn = False
    bt = 0.0
    bu: str | None = None
    bv = 0.0
    bs = 0.0
    version = _VERSION
    for i, r in enumerate(raws):
        # Base fields (sec 4.1) apply to this record and every later one.
        if r.bn is not unset:
            bn = r.bn
            has_bn = True
            starts = parts.get(bn)
            if starts is None:
                starts = _name_part(bn)
            if starts is None or (bn and not starts):
                n = r.n
                raise _bad_name(bn + (n if n is not unset else ""), bn, i, "bn")
        if r.bt is not unset:
            bt = r.bt
        if r.bu is not unset:
            bu = r.bu
        if r.bv is not unset:
            bv = r.bv
        if r.bs is not unset:
            bs = r.bs
        if r.bver is not unset and r.bver != version:
            _check_version(r.bver, version, i)
            version = r.bver

        # Name (sec 4.5.1): bn + n, checked part by part against the cache.
        n = r.n
        if n is unset:
            if not bn:
                if has_bn:
                    raise _bad_name("", "", i, "bn")
                raise SenMLError(
                    "record has no name: it has no 'n' and no base name 'bn' applies",
                    record=i,
                    field="n",
                )
        elif bn:
            if n not in parts and _name_part(n) is None:
                raise _bad_name(bn + n, n, i, "n")
        else:
            starts = parts.get(n)
            if starts is None:
                starts = _name_part(n)
                if starts is None:
                    raise _bad_name(n, n, i, "n")
            if not starts:
                raise _bad_name(n, n, i, "n")

        # Values (sec 4.2): exactly one of v, vs, vb, vd, or none if there is a sum.
        if r.v is not unset:
            if r.vs is not unset or r.vb is not unset or r.vd is not unset:
                raise _too_many_values(r, i)
            if bv and not _finite(r.v + bv):
                raise _not_finite("value bv + v", i, "v")
        elif r.vs is not unset:
            if r.vb is not unset or r.vd is not unset:
                raise _too_many_values(r, i)
        elif r.vb is not unset:
            if r.vd is not unset:
                raise _too_many_values(r, i)
        elif r.vd is unset and r.s is unset:
            raise SenMLError(
                "record has no value: it needs one of v, vs, vb, vd, or a sum s (RFC 8428 sec 4.2)",
                record=i,
                field="v",
            )
        if bs and r.s is not unset and not _finite(r.s + bs):
            raise _not_finite("sum bs + s", i, "s")

        # Time (sec 4.5.3): bt + t must stay a double. Inlined: it runs for most records.
        if bt and r.t is not unset:
            t = r.t + bt
            if t - t:  # inf - inf is nan; a finite t - t is 0.0
                raise _not_finite("time bt + t", i, "t")

        if out is not None:
            u = r.u
            v = r.v
            s = r.s
            t_ = r.t
            time = bt if t_ is unset else t_ + bt
            vs = r.vs
            vb = r.vb
            vd = r.vd
            ut = r.ut
            out.append(
                Record(
                    bn if n is unset else bn + n,
                    bu if u is unset else u,
                    None if v is unset else v + bv,
                    None if vs is unset else vs,
                    None if vb is unset else vb,
                    None if vd is unset else vd,
                    None if s is unset else s + bs,
                    now + time if time < _RELATIVE_LIMIT else time,
                    None if ut is unset else ut,
                    version,
                )
            )


def _finite(x: float) -> bool:
    return x - x == 0.0  # inf - inf is nan; only overflowed sums get here, so this is rare
