"""SenML (RFC 8428) validation and resolution: the RFC examples in JSON and CBOR, every rule
pass and fail with the record index and field the error names, the refusals of hostile packs
(CBOR tags, nesting, long names, what error messages repeat), and properties checked with
hypothesis (validate agrees with parse; the JSON fast path agrees with the checked path)."""

from __future__ import annotations

import base64
import json
import math
import sys
from decimal import Decimal
from fractions import Fraction
from typing import Any

import cbor2
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from core.errors import Condition, ContentTypeError, SenMLError
from core.senml import (
    MAX_DEPTH,
    MAX_NAME_PART,
    MAX_RECORDS,
    SENML_CBOR,
    SENML_JSON,
    Record,
    _json_records_checked,
    _resolve,
    parse,
    validate,
)

NOW = 1_700_000_000.5
CBOR_LABELS = {
    "bver": -1, "bn": -2, "bt": -3, "bu": -4, "bv": -5, "bs": -6,
    "n": 0, "u": 1, "v": 2, "vs": 3, "vb": 4, "s": 5, "t": 6, "ut": 7, "vd": 8,
}  # fmt: skip
Pack = list[Any]


def as_json(pack: Pack) -> bytes:
    return json.dumps(pack).encode()


def as_cbor(pack: Pack) -> bytes:
    """The CBOR form of a JSON-style pack: integer labels, vd as a byte string."""

    def record(obj: Any) -> Any:
        if not isinstance(obj, dict):
            return obj
        out: dict[Any, Any] = {}
        for label, value in obj.items():
            if label == "vd" and isinstance(value, str):
                value = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
            out[CBOR_LABELS.get(label, label)] = value
        return out

    return cbor2.dumps([record(obj) for obj in pack])


def both(pack: Pack) -> list[tuple[bytes, str]]:
    return [(as_json(pack), SENML_JSON), (as_cbor(pack), SENML_CBOR)]


def accepted(payload: bytes, content_type: str = SENML_JSON) -> list[Record]:
    records = parse(payload, content_type, NOW)
    validate(payload, content_type, NOW)
    return records


def refused(payload: bytes, content_type: str, record: int | None, field: str | None) -> SenMLError:
    """The error parse raises, after checking validate raises the very same one."""
    with pytest.raises(SenMLError) as parsed:
        parse(payload, content_type, NOW)
    with pytest.raises(SenMLError) as validated:
        validate(payload, content_type, NOW)
    error = parsed.value
    assert (error.record, error.field) == (record, field), error.detail
    assert (validated.value.record, validated.value.field, validated.value.detail) == (
        record,
        field,
        error.detail,
    )
    assert error.condition is Condition.INVALID_SENML
    return error


def refused_both(pack: Pack, record: int | None, field: str | None, text: str) -> None:
    for payload, content_type in both(pack):
        error = refused(payload, content_type, record, field)
        assert text in error.detail, error.detail


def rec(name: str, **fields: Any) -> Record:
    """A resolved record with the defaults of an absent field."""
    values: dict[str, Any] = {
        "unit": None,
        "value": None,
        "string_value": None,
        "bool_value": None,
        "data_value": None,
        "sum": None,
        "time": NOW,
        "update_time": None,
        "base_version": 10,
    }
    values.update(fields)
    return Record(name=name, **values)


# --- RFC 8428 sec 5.1 examples, JSON and CBOR ----------------------------------------------

SINGLE = [{"n": "urn:dev:ow:10e2073a01080063", "u": "Cel", "v": 23.1}]  # sec 5.1.1

MULTIPLE_NOW = [  # sec 5.1.2, first example
    {"bn": "urn:dev:ow:10e2073a01080063:", "n": "voltage", "u": "V", "v": 120.1},
    {"n": "current", "u": "A", "v": 1.2},
]

MULTIPLE_TIMED = [  # sec 5.1.2, second example
    {
        "bn": "urn:dev:ow:10e2073a0108006:",
        "bt": 1.276020076001e09,
        "bu": "A",
        "bver": 5,
        "n": "voltage",
        "u": "V",
        "v": 120.1,
    },
    {"n": "current", "t": -5, "v": 1.2},
    {"n": "current", "t": -4, "v": 1.3},
    {"n": "current", "t": -3, "v": 1.4},
    {"n": "current", "t": -2, "v": 1.5},
    {"n": "current", "t": -1, "v": 1.6},
    {"n": "current", "v": 1.7},
]

# Sec 6: the CBOR dump of MULTIPLE_TIMED, byte for byte as printed in the RFC (it encodes
# 1.5 as a half-precision float).
RFC_CBOR = bytes.fromhex(
    """
    87 a7 21 78 1b 75 72 6e 3a 64 65 76 3a 6f 77 3a
    31 30 65 32 30 37 33 61 30 31 30 38 30 30 36 3a
    22 fb 41 d3 03 a1 5b 00 10 62 23 61 41 20 05 00
    67 76 6f 6c 74 61 67 65 01 61 56 02 fb 40 5e 06
    66 66 66 66 66 a3 00 67 63 75 72 72 65 6e 74 06
    24 02 fb 3f f3 33 33 33 33 33 33 a3 00 67 63 75
    72 72 65 6e 74 06 23 02 fb 3f f4 cc cc cc cc cc
    cd a3 00 67 63 75 72 72 65 6e 74 06 22 02 fb 3f
    f6 66 66 66 66 66 66 a3 00 67 63 75 72 72 65 6e
    74 06 21 02 f9 3e 00 a3 00 67 63 75 72 72 65 6e
    74 06 20 02 fb 3f f9 99 99 99 99 99 9a a3 00 67
    63 75 72 72 65 6e 74 06 00 02 fb 3f fb 33 33 33
    33 33 33
    """
)

MEASUREMENTS = [  # sec 5.1.3
    {"bn": "urn:dev:ow:10e2073a01080063", "bt": 1.320067464e09, "bu": "%RH", "v": 20},
    {"u": "lon", "v": 24.30621},
    {"u": "lat", "v": 60.07965},
    {"t": 60, "v": 20.3},
    {"u": "lon", "t": 60, "v": 24.30622},
    {"u": "lat", "t": 60, "v": 60.07965},
    {"t": 120, "v": 20.7},
    {"u": "lon", "t": 120, "v": 24.30623},
    {"u": "lat", "t": 120, "v": 60.07966},
    {"u": "%EL", "t": 150, "v": 98},
    {"t": 180, "v": 21.2},
    {"u": "lon", "t": 180, "v": 24.30628},
    {"u": "lat", "t": 180, "v": 60.07967},
]

RESOLVED = [  # sec 5.1.4: MEASUREMENTS resolved
    {"n": "urn:dev:ow:10e2073a01080063", "u": u, "t": t, "v": v}
    for u, t, v in [
        ("%RH", 1.320067464e09, 20),
        ("lon", 1.320067464e09, 24.30621),
        ("lat", 1.320067464e09, 60.07965),
        ("%RH", 1.320067524e09, 20.3),
        ("lon", 1.320067524e09, 24.30622),
        ("lat", 1.320067524e09, 60.07965),
        ("%RH", 1.320067584e09, 20.7),
        ("lon", 1.320067584e09, 24.30623),
        ("lat", 1.320067584e09, 60.07966),
        ("%EL", 1.320067614e09, 98),
        ("%RH", 1.320067644e09, 21.2),
        ("lon", 1.320067644e09, 24.30628),
        ("lat", 1.320067644e09, 60.07967),
    ]
]

DATA_TYPES = [  # sec 5.1.5
    {"bn": "urn:dev:ow:10e2073a01080063:", "n": "temp", "u": "Cel", "v": 23.1},
    {"n": "label", "vs": "Machine Room"},
    {"n": "open", "vb": False},
    {"n": "nfv-reader", "vd": "aGkgCg"},
]

COLLECTION = [  # sec 5.1.6
    {"bn": "2001:db8::2/", "bt": 1.320078429e09, "n": "temperature", "u": "Cel", "v": 25.2},
    {"n": "humidity", "u": "%RH", "v": 30},
    {"bn": "2001:db8::1/", "n": "temperature", "u": "Cel", "v": 12.3},
    {"n": "humidity", "u": "%RH", "v": 67},
]


@pytest.mark.parametrize("encoding", ["json", "cbor"])
def test_single_datapoint(encoding: str) -> None:
    payload, content_type = both(SINGLE)[encoding == "cbor"]
    assert accepted(payload, content_type) == [
        rec("urn:dev:ow:10e2073a01080063", unit="Cel", value=23.1)
    ]


@pytest.mark.parametrize("encoding", ["json", "cbor"])
def test_multiple_datapoints_now(encoding: str) -> None:
    payload, content_type = both(MULTIPLE_NOW)[encoding == "cbor"]
    assert accepted(payload, content_type) == [
        rec("urn:dev:ow:10e2073a01080063:voltage", unit="V", value=120.1),
        rec("urn:dev:ow:10e2073a01080063:current", unit="A", value=1.2),
    ]


def test_multiple_datapoints_timed() -> None:
    bt = 1.276020076001e09
    base = "urn:dev:ow:10e2073a0108006:"
    expected = [rec(base + "voltage", unit="V", value=120.1, time=bt, base_version=5)] + [
        rec(base + "current", unit="A", value=v, time=bt + t, base_version=5)
        for t, v in [(-5, 1.2), (-4, 1.3), (-3, 1.4), (-2, 1.5), (-1, 1.6), (0, 1.7)]
    ]
    assert accepted(as_json(MULTIPLE_TIMED)) == expected
    assert accepted(as_cbor(MULTIPLE_TIMED), SENML_CBOR) == expected
    assert accepted(RFC_CBOR, SENML_CBOR) == expected


@pytest.mark.parametrize("encoding", ["json", "cbor"])
def test_multiple_measurements_resolve_to_the_rfc_resolved_data(encoding: str) -> None:
    payload, content_type = both(MEASUREMENTS)[encoding == "cbor"]
    records = accepted(payload, content_type)
    assert records == accepted(as_json(RESOLVED))
    assert [(r.unit, r.time, r.value) for r in records[-4:]] == [
        ("%EL", 1.320067614e09, 98.0),
        ("%RH", 1.320067644e09, 21.2),
        ("lon", 1.320067644e09, 24.30628),
        ("lat", 1.320067644e09, 60.07967),
    ]
    assert {r.name for r in records} == {"urn:dev:ow:10e2073a01080063"}


@pytest.mark.parametrize("encoding", ["json", "cbor"])
def test_multiple_data_types(encoding: str) -> None:
    payload, content_type = both(DATA_TYPES)[encoding == "cbor"]
    base = "urn:dev:ow:10e2073a01080063:"
    assert accepted(payload, content_type) == [
        rec(base + "temp", unit="Cel", value=23.1),
        rec(base + "label", string_value="Machine Room"),
        rec(base + "open", bool_value=False),
        rec(base + "nfv-reader", data_value="aGkgCg"),
    ]


@pytest.mark.parametrize("encoding", ["json", "cbor"])
def test_collection_of_resources(encoding: str) -> None:
    payload, content_type = both(COLLECTION)[encoding == "cbor"]
    bt = 1.320078429e09
    assert accepted(payload, content_type) == [
        rec("2001:db8::2/temperature", unit="Cel", value=25.2, time=bt),
        rec("2001:db8::2/humidity", unit="%RH", value=30.0, time=bt),
        rec("2001:db8::1/temperature", unit="Cel", value=12.3, time=bt),
        rec("2001:db8::1/humidity", unit="%RH", value=67.0, time=bt),  # bn of 3rd, bt of 1st
    ]


def test_actuator_example_with_a_base_only_record_is_refused() -> None:
    """Sec 5.1.7 opens with a record holding only bn; sec 4.2's MUST (a value or a sum in
    every record) wins over the example."""
    pack = [
        {"bn": "urn:dev:ow:10e2073a01080063:"},
        {"n": "temp", "u": "Cel", "v": 23.1},
    ]
    refused_both(pack, 0, "v", "record has no value")


# --- pack level ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "text"),
    [
        (b"", "not valid JSON"),
        (b"[{", "not valid JSON"),
        (b'[{"n":"a","v":1}] x', "not valid JSON"),
        (b'[{"n":"a","v":NaN}]', "not valid JSON"),
        (b'[{"n":"a","v":Infinity}]', "not valid JSON"),
        (b"\xff\xfe[]", "not valid JSON"),
        (b'{"n":"a","v":1}', "a JSON array of records, got an object"),
        (b'"x"', "a JSON array of records, got a string"),
        (b"[]", "the pack is empty"),
    ],
)
def test_json_pack_refused_without_a_record(payload: bytes, text: str) -> None:
    assert text in refused(payload, SENML_JSON, None, None).detail


@pytest.mark.parametrize(
    ("payload", "text"),
    [
        (b"", "not valid CBOR"),
        (bytes.fromhex("81a2"), "not valid CBOR"),
        (cbor2.dumps([{0: "a", 2: 1}]) + b"\x00", "1 bytes after the CBOR pack"),
        (cbor2.dumps({0: "a", 2: 1}), "a CBOR array of records, got a map"),
        (cbor2.dumps([]), "the pack is empty"),
        (bytes.fromhex("9fa20061610201ff"), "definite-length CBOR array"),
        (bytes.fromhex("81bf00616102 01ff".replace(" ", "")), "indefinite length"),
        (bytes.fromhex("81a3006161020102f93e00"), "Duplicate map key"),
        (bytes.fromhex("81a200616102c11a"), "not valid CBOR"),  # truncated tag
        (b"\x81" * 1000 + b"\xa0", "nests arrays, maps and tags deeper than 16 levels"),
    ],
)
def test_cbor_pack_refused_without_a_record(payload: bytes, text: str) -> None:
    assert text in refused(payload, SENML_CBOR, None, None).detail


def test_indefinite_length_strings_are_refused_in_cbor() -> None:
    payload = bytes.fromhex("81a2006161037f6161ff")  # vs as an indefinite text string
    assert "indefinite length" in refused(payload, SENML_CBOR, None, None).detail


def test_self_described_cbor_is_accepted() -> None:
    payload = b"\xd9\xd9\xf7" + cbor2.dumps([{0: "a", 2: 1}])
    assert accepted(payload, SENML_CBOR) == [rec("a", value=1.0)]


def test_transport_buffers_are_accepted() -> None:
    payload = as_json(SINGLE)
    expected = accepted(payload)
    assert parse(bytearray(payload), SENML_JSON, NOW) == expected
    assert parse(memoryview(payload), SENML_JSON, NOW) == expected
    validate(memoryview(b'[{"n":"a","v":1}]'), SENML_JSON, NOW)


def test_max_records() -> None:
    pack = [{"n": "a", "v": 1}] * MAX_RECORDS
    for payload, content_type in both(pack):
        assert len(accepted(payload, content_type)) == MAX_RECORDS
    for payload, content_type in both([*pack, {"n": "a", "v": 1}]):
        error = refused(payload, content_type, None, None)
        assert error.detail == f"the pack has {MAX_RECORDS + 1} records; at most 10000 are allowed"


@pytest.mark.parametrize(
    ("record", "text"),
    [(1, "the number 1"), ("x", "a string"), (None, "null"), ([], "an array"), (True, "true")],
)
def test_a_record_that_is_not_an_object_is_named(record: Any, text: str) -> None:
    pack = [{"n": "a", "v": 1}, {"n": "b", "v": 2}, record]
    error = refused(as_json(pack), SENML_JSON, 2, None)
    assert error.detail == f"record 2: a record is a JSON object, got {text}"
    cbor_error = refused(as_cbor(pack), SENML_CBOR, 2, None)
    assert "a record is a CBOR map" in cbor_error.detail


@pytest.mark.parametrize(
    "content_type",
    ["application/json", "text/plain", "application/senml+xml", "application/senml-exi", ""],
)
def test_other_content_types_are_not_senml(content_type: str) -> None:
    for call in (parse, validate):
        with pytest.raises(ContentTypeError) as info:
            call(as_json(SINGLE), content_type, NOW)
        assert info.value.condition is Condition.UNSUPPORTED_CONTENT_TYPE
        assert "is not SenML" in info.value.detail


@pytest.mark.parametrize(
    ("content_type", "encode"),
    [
        ("Application/SenML+JSON", as_json),
        ("application/senml+json; charset=utf-8", as_json),
        (" application/senml+cbor ", as_cbor),
    ],
)
def test_media_types_are_case_insensitive_with_parameters(content_type: str, encode: Any) -> None:
    assert accepted(encode(SINGLE), content_type) == accepted(as_json(SINGLE))


# --- field types -----------------------------------------------------------------------------

STRING_LABELS = ["bn", "bu", "n", "u", "vs", "vd"]
NUMBER_LABELS = ["bt", "bv", "bs", "v", "s", "t", "ut"]


def with_field(label: str, value: Any) -> Pack:
    """A valid two-record pack whose second record also has ``label: value``."""
    second: dict[str, Any] = {"n": "b", "s": 1}
    second[label] = value
    return [{"n": "a", "v": 1}, second]


@pytest.mark.parametrize("label", STRING_LABELS)
@pytest.mark.parametrize(("value", "text"), [(1, "the number 1"), (True, "true"), (None, "null")])
def test_string_fields(label: str, value: Any, text: str) -> None:
    error = refused(as_json(with_field(label, value)), SENML_JSON, 1, label)
    assert error.detail == f"record 1, field {label!r}: {label!r} must be a string, got {text}"
    refused(as_cbor(with_field(label, value)), SENML_CBOR, 1, label)


@pytest.mark.parametrize("label", NUMBER_LABELS)
@pytest.mark.parametrize(
    ("value", "text"),
    [(True, "true"), (False, "false"), ("1", "a string"), (None, "null"), ([1], "an array")],
)
def test_number_fields(label: str, value: Any, text: str) -> None:
    pack = with_field(label, value)
    error = refused(as_json(pack), SENML_JSON, 1, label)
    assert error.detail == f"record 1, field {label!r}: {label!r} must be a number, got {text}"
    refused(as_cbor(pack), SENML_CBOR, 1, label)


@pytest.mark.parametrize("label", NUMBER_LABELS)
def test_numbers_must_be_finite_doubles(label: str) -> None:
    error = refused(as_json(with_field(label, 10**400)), SENML_JSON, 1, label)
    assert error.detail.endswith("got an integer of 1329 bits")
    # CBOR: a decimal fraction (a bignum of 10**400 is refused while decoding, see below)
    error = refused(as_cbor(with_field(label, Decimal("1e400"))), SENML_CBOR, 1, label)
    assert error.detail.endswith("must be a finite number within the range of a double, got 1E+400")
    for value in (math.nan, math.inf, -math.inf):
        payload = cbor2.dumps([{0: "a", 2: 1}, {0: "b", 5: 1, CBOR_LABELS[label]: value}])
        assert "must be a finite number" in refused(payload, SENML_CBOR, 1, label).detail
    # 1e400 is a float literal beyond a double: msgspec refuses it while decoding.
    payload = b'[{"n": "a", "v": 1}, {"n": "b", "s": 1, "%s": 1e400}]' % label.encode()
    error = refused(payload, SENML_JSON, 1, label)
    assert error.detail.endswith("got 1e400")


def test_out_of_range_number_in_an_extension_field() -> None:
    payload = b'[{"n": "a", "v": 1}, {"n": "b", "v": 1, "x": [1e400]}]'
    error = refused(payload, SENML_JSON, 1, None)
    assert "beyond the range of a double" in error.detail


def test_numbers_are_integers_floats_or_cbor_decimal_fractions() -> None:
    pack = [{"n": "a", "v": 1, "t": -2, "ut": 5}, {"n": "b", "v": -0.5, "s": 2**60}]
    records = accepted(as_json(pack))
    assert [(r.value, r.time, r.update_time, r.sum) for r in records] == [
        (1.0, NOW - 2, 5.0, None),
        (-0.5, NOW, None, float(2**60)),
    ]
    assert accepted(as_cbor(pack), SENML_CBOR) == records
    payload = cbor2.dumps([{0: "a", 2: Decimal("273.15")}])
    assert accepted(payload, SENML_CBOR) == [rec("a", value=273.15)]


def test_cbor_refuses_other_number_types() -> None:
    error = refused(cbor2.dumps([{0: "a", 2: cbor2.CBORSimpleValue(16)}]), SENML_CBOR, 0, "v")
    assert error.detail.endswith("'v' must be a number, got CBORSimpleValue")
    # A rational (tag 30) is refused with every tag SenML does not use: see the tag policy.
    error = refused(cbor2.dumps([{0: "a", 2: Fraction(1, 3)}]), SENML_CBOR, None, None)
    assert error.detail.startswith("CBOR tag 30 is not accepted in SenML")


def test_vb_is_a_boolean() -> None:
    for value, text in [(1, "the number 1"), ("true", "a string"), (None, "null")]:
        pack = with_field("vb", value)
        pack[1].pop("s")
        error = refused(as_json(pack), SENML_JSON, 1, "vb")
        assert error.detail.endswith(f"'vb' must be a boolean, got {text}")
        refused(as_cbor(pack), SENML_CBOR, 1, "vb")


@pytest.mark.parametrize(
    ("value", "text"), [(10.0, "the number 10.0"), ("10", "string"), (True, "true")]
)
def test_bver_is_an_integer(value: Any, text: str) -> None:
    pack = [{"bver": value, "n": "a", "v": 1}]
    for payload, content_type in both(pack):
        error = refused(payload, content_type, 0, "bver")
        assert "'bver' must be an integer, got " in error.detail
        assert error.detail.endswith(text)


@pytest.mark.parametrize("number", [b"1E5", b"1.5E-3", b"-2E+2"])
def test_json_exponent_must_be_lower_case(number: bytes) -> None:
    payload = b'[{"n":"a","v":1},{"n":"b","t":%s,"v":1}]' % number
    error = refused(payload, SENML_JSON, 1, "t")
    assert f"number {number.decode()} has an upper-case exponent" in error.detail
    accepted(payload.replace(b"E", b"e"))


def test_upper_case_e_elsewhere_is_fine() -> None:
    accepted(as_json([{"n": "E1", "vs": "1E5", "u": "%EL", "x": "2E3"}]))
    accepted(b'[{"n":"a","v":1,"ext":1E5,"nested":[{"v":2E5}]}]')  # extensions are ignored


@pytest.mark.parametrize(
    "value", ["aGkgCg=", "aGkgCg==", "aGkgC", "aGk+Cg", "aGk/Cg", "aGk Cg", "aGkgCg\n"]
)
def test_vd_is_base64url_without_padding(value: str) -> None:
    error = refused(as_json([{"n": "a", "vd": value}]), SENML_JSON, 0, "vd")
    assert "base64url" in error.detail


@pytest.mark.parametrize("value", ["", "aGk", "aGkgCg", "aGkgCgA-_w"])
def test_vd_accepted(value: str) -> None:
    assert accepted(as_json([{"n": "a", "vd": value}]))[0].data_value == value


def test_vd_in_cbor_is_a_byte_string_reported_as_base64url() -> None:
    payload = cbor2.dumps([{0: "a", 8: b"\xfb\xff\x00"}])
    assert accepted(payload, SENML_CBOR)[0].data_value == "-_8A"
    error = refused(cbor2.dumps([{0: "a", 8: "aGk"}]), SENML_CBOR, 0, "vd")
    assert error.detail.endswith("'vd' is a byte string in SenML CBOR, got a text string")


# --- labels ----------------------------------------------------------------------------------


def test_unknown_labels_are_ignored() -> None:
    pack = [{"n": "a", "v": 1, "x": {"deep": [1, "E"]}, "_x": None, "ext": "z"}]
    for payload, content_type in both(pack):
        assert accepted(payload, content_type) == [rec("a", value=1.0)]


@pytest.mark.parametrize("label", ["x_", "v_", "_", "ext_field_"])
def test_must_understand_labels_are_refused(label: str) -> None:
    pack = [{"n": "a", "v": 1}, {"n": "b", "v": 2, "ok": 1, label: 1}]
    for payload, content_type in both(pack):
        error = refused(payload, content_type, 1, label)
        assert error.detail.startswith(f"record 1, field {label!r}: unknown field {label!r}")
        assert "RFC 8428 sec 4.4" in error.detail


def test_escaped_must_understand_label_is_refused() -> None:
    payload = b'[{"n":"a","v":1,"x\\u005f":1}]'
    refused(payload, SENML_JSON, 0, "x_")


def test_escaped_known_label_is_that_label() -> None:
    assert accepted(b'[{"\\u006e":"a","\\u0076":1}]') == [rec("a", value=1.0)]


def test_cbor_integer_labels_outside_the_table_are_refused() -> None:
    for key in (9, -7, 100):
        error = refused(cbor2.dumps([{0: "a", 2: 1, key: 1}]), SENML_CBOR, 0, str(key))
        assert f"integer label {key} is not a SenML label" in error.detail


def test_cbor_refuses_json_labels() -> None:
    error = refused(cbor2.dumps([{0: "a", "v": 1}]), SENML_CBOR, 0, "v")
    assert "uses the integer label 2" in error.detail


def test_cbor_refuses_labels_of_other_types() -> None:
    for key in (b"v", 2.5, True, None):
        error = refused(cbor2.dumps([{0: "a", 2: 1, key: 1}]), SENML_CBOR, 0, None)
        assert "labels, and the keys of maps in extension fields, are integers or text" \
            in error.detail


# --- base fields -----------------------------------------------------------------------------


def test_base_fields_carry_forward_until_overridden() -> None:
    pack = [
        {"bn": "dev:", "bt": 1.5e9, "bu": "Cel", "bv": 10, "bs": 100, "n": "a", "v": 1, "s": 1},
        {"n": "b", "u": "K", "v": 2, "t": 1},
        {"bn": "other:", "bu": "W", "bv": 0, "n": "c", "v": 3, "s": 2},
        {"bt": 2e9, "bs": 0, "n": "d", "s": 3},
    ]
    expected = [
        rec("dev:a", unit="Cel", value=11.0, sum=101.0, time=1.5e9),
        rec("dev:b", unit="K", value=12.0, time=1.5e9 + 1),
        rec("other:c", unit="W", value=3.0, sum=102.0, time=1.5e9),
        rec("other:d", unit="W", sum=3.0, time=2e9),
    ]
    for payload, content_type in both(pack):
        assert accepted(payload, content_type) == expected


def test_bv_and_bs_apply_only_to_a_v_or_s_in_the_record() -> None:
    pack = [{"bn": "d:", "bv": 5, "bs": 7, "n": "a", "vs": "x"}, {"n": "b", "vb": True}]
    assert accepted(as_json(pack)) == [
        rec("d:a", string_value="x"),
        rec("d:b", bool_value=True),
    ]


def test_bv_alone_is_not_a_value() -> None:
    refused_both([{"n": "a", "v": 1}, {"n": "b", "bv": 3}], 1, "v", "record has no value")


def test_bs_alone_is_not_a_sum() -> None:
    refused_both([{"n": "a", "bs": 3}], 0, "v", "record has no value")


# --- names -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "pack",
    [
        [{"n": "A-Z:a.z/0_9", "v": 1}],
        [{"bn": "0", "v": 1}],
        [{"bn": "dev", "n": "-x", "v": 1}],  # only the concatenation must start well
        [{"bn": "dev", "n": "", "v": 1}],
        [{"bn": "", "n": "x", "v": 1}],
    ],
)
def test_names_accepted(pack: Pack) -> None:
    for payload, content_type in both(pack):
        accepted(payload, content_type)


@pytest.mark.parametrize(
    ("pack", "record", "field", "detail"),
    [
        (
            [{"n": "a", "v": 1}, {"n": "b", "v": 1}, {"n": "x y", "v": 1}],
            2,
            "n",
            "name 'x y' has a character not allowed (' ')",
        ),
        (
            [{"bn": "dev:", "n": "a", "v": 1}, {"n": "té", "v": 1}],
            1,
            "n",
            "name 'dev:té' has a character not allowed ('é')",
        ),
        (
            [{"n": "a", "v": 1}, {"bn": "dev#1:", "n": "a", "v": 1}],
            1,
            "bn",
            "name 'dev#1:a' has a character not allowed ('#')",
        ),
        ([{"n": "-a", "v": 1}], 0, "n", "name '-a' must start with a letter or a digit"),
        ([{"n": "_a", "v": 1}], 0, "n", "name '_a' must start with a letter or a digit"),
        ([{"bn": ":x", "n": "a", "v": 1}], 0, "bn", "name ':xa' must start with a letter"),
        ([{"bn": "/", "v": 1}], 0, "bn", "name '/' must start with a letter or a digit"),
        ([{"n": "", "v": 1}], 0, "n", "name is empty"),
        ([{"bn": "", "n": "", "v": 1}], 0, "n", "name is empty"),
        ([{"bn": "", "v": 1}], 0, "bn", "name is empty"),
        ([{"v": 1}], 0, "n", "record has no name"),
        ([{"n": "a", "v": 1}, {"v": 2}], 1, "n", "record has no name"),
        ([{"n": "a\n", "v": 1}], 0, "n", "has a character not allowed ('\\n')"),
    ],
)
def test_names_refused(pack: Pack, record: int, field: str, detail: str) -> None:
    refused_both(pack, record, field, detail)


def test_a_name_refused_after_it_was_accepted_with_a_base_name() -> None:
    """The cache of name parts must not let '-x' through once bn is gone."""
    accepted(as_json([{"bn": "d", "n": "-x", "v": 1}]))
    refused(as_json([{"n": "-x", "v": 1}]), SENML_JSON, 0, "n")


# --- values ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fields",
    [
        {"v": 1},
        {"vs": ""},
        {"vb": True},
        {"vd": "aGk"},
        {"s": 0},
        {"s": 1, "v": 2},
        {"s": 1, "vs": "x"},
        {"s": 1, "vd": ""},
    ],
)
def test_one_value_or_a_sum(fields: dict[str, Any]) -> None:
    for payload, content_type in both([{"n": "a", **fields}]):
        accepted(payload, content_type)


@pytest.mark.parametrize(
    ("fields", "field", "listed"),
    [
        ({"v": 1, "vs": "x"}, "vs", "2 value fields (v, vs)"),
        ({"v": 1, "vb": True}, "vb", "2 value fields (v, vb)"),
        ({"vs": "x", "vd": "aGk"}, "vd", "2 value fields (vs, vd)"),
        ({"vb": False, "vd": "aGk", "s": 1}, "vd", "2 value fields (vb, vd)"),
        ({"v": 1, "vs": "x", "vb": True, "vd": ""}, "vs", "4 value fields (v, vs, vb, vd)"),
    ],
)
def test_more_than_one_value_is_refused(fields: dict[str, Any], field: str, listed: str) -> None:
    refused_both([{"n": "a", "v": 1}, {"n": "b", **fields}], 1, field, listed)


def test_no_value_and_no_sum_is_refused() -> None:
    refused_both(
        [{"n": "a", "v": 1}, {"n": "b", "u": "Cel", "t": 1}],
        1,
        "v",
        "record has no value: it needs one of v, vs, vb, vd, or a sum s",
    )


def test_resolved_values_must_stay_finite() -> None:
    big = 1.7e308
    refused_both([{"bv": big, "n": "a", "v": big}], 0, "v", "resolved value bv + v")
    refused_both([{"bs": big, "n": "a", "s": big}], 0, "s", "resolved sum bs + s")
    refused_both([{"bt": big, "n": "a", "v": 1, "t": big}], 0, "t", "resolved time bt + t")


# --- version ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pack", "version"),
    [
        ([{"n": "a", "v": 1}], 10),
        ([{"bver": 10, "n": "a", "v": 1}, {"bver": 10, "n": "b", "v": 1}], 10),
        ([{"n": "a", "v": 1}, {"bver": 10, "n": "b", "v": 1}], 10),  # the default, repeated
        ([{"bver": 5, "n": "a", "v": 1}, {"n": "b", "v": 1}, {"bver": 5, "n": "c", "v": 1}], 5),
        ([{"bver": 1, "n": "a", "v": 1}], 1),
        ([{"bver": 26, "n": "a", "v": 1, "u": "kWh"}], 26),  # RFC 9100 secondary units
    ],
)
def test_versions_accepted(pack: Pack, version: int) -> None:
    for payload, content_type in both(pack):
        assert {r.base_version for r in accepted(payload, content_type)} == {version}


@pytest.mark.parametrize(
    ("pack", "record", "detail"),
    [
        ([{"bver": 0, "n": "a", "v": 1}], 0, "'bver' must be a positive integer, got 0"),
        ([{"bver": -10, "n": "a", "v": 1}], 0, "'bver' must be a positive integer, got -10"),
        ([{"bver": 11, "n": "a", "v": 1}], 0, "SenML version 11 is not understood"),
        ([{"bver": 42, "n": "a", "v": 1}], 0, "SenML version 42 is not understood"),
        (
            [{"bver": 5, "n": "a", "v": 1}, {"n": "b", "v": 1}, {"bver": 10, "n": "c", "v": 1}],
            2,
            "'bver' 10 changes the pack's version 5, which its first record sets",
        ),
        (
            [{"n": "a", "v": 1}, {"bver": 5, "n": "b", "v": 1}],
            1,
            "'bver' 5 changes the pack's version 10, which its first record sets (10 when it "
            "has no bver); all records of a pack have the same version (RFC 8428 sec 4.4)",
        ),
        (
            [{"n": "a", "v": 1}, {"bver": 11, "n": "b", "v": 1}],
            1,
            "SenML version 11 is not understood",
        ),
    ],
)
def test_versions_refused(pack: Pack, record: int, detail: str) -> None:
    refused_both(pack, record, "bver", detail)


def test_a_huge_version_is_described_not_printed() -> None:
    pack = [{"bver": 2**70, "n": "a", "v": 1}]
    error = refused(as_json(pack), SENML_JSON, 0, "bver")
    assert "SenML version an integer of 71 bits is not understood" in error.detail
    error = refused(as_cbor(pack), SENML_CBOR, None, None)  # a bignum of 9 bytes
    assert error.detail.startswith("a CBOR bignum (tag 2) of 9 bytes is not accepted")


# --- time ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "time"),
    [
        ({}, NOW),  # no t, no bt: now
        ({"t": 0}, NOW),
        ({"t": -60}, NOW - 60),
        ({"t": 5.5}, NOW + 5.5),  # in the future, for actuation
        ({"t": 2**28 - 1}, NOW + 2**28 - 1),
        ({"t": 2**28}, float(2**28)),  # the smallest absolute time
        ({"t": 1.7e9}, 1.7e9),
        ({"bt": 1.7e9}, 1.7e9),
        ({"bt": 1.7e9, "t": -30}, 1.7e9 - 30),
        ({"bt": 100, "t": -30}, NOW + 70),  # a relative base time stays relative
        ({"bt": -10}, NOW - 10),
        ({"bt": 2**28, "t": -1}, NOW + 2**28 - 1),  # the sum decides, not its parts
    ],
)
def test_time_resolution(fields: dict[str, Any], time: float) -> None:
    for payload, content_type in both([{"n": "a", "v": 1, **fields}]):
        assert accepted(payload, content_type)[0].time == time


def test_update_time() -> None:
    assert accepted(as_json([{"n": "a", "v": 1, "ut": 30}]))[0].update_time == 30.0
    assert accepted(as_json([{"n": "a", "v": 1, "ut": 0}]))[0].update_time == 0.0
    refused_both(
        [{"n": "a", "v": 1}, {"n": "b", "v": 1, "ut": -1}],
        1,
        "ut",
        "'ut' is a period in seconds and cannot be negative, got -1.0",
    )


# --- hostile packs: work in proportion to the bytes -----------------------------------------


def nested(levels: int, inner: Any = 0) -> Any:
    """``inner`` inside ``levels`` arrays."""
    for _ in range(levels):
        inner = [inner]
    return inner


def value_sharing_bomb() -> bytes:
    """The tester's payload: one map of 5,000 labels referenced by 10,000 records (~64 kB)."""
    labels = {0: "a", 2: 1, **{f"l{i:04d}": 0 for i in range(4998)}}
    return cbor2.dumps([labels] * 10_000, value_sharing=True)


def test_cbor_value_sharing_is_refused() -> None:
    bomb = value_sharing_bomb()
    assert len(bomb) < 70_000
    error = refused(bomb, SENML_CBOR, None, None)
    assert error.detail.startswith("CBOR value sharing (tag 28) is not accepted in SenML")
    # A shared reference (tag 29) alone, pointing nowhere, is refused the same way.
    error = refused(bytes.fromhex("81d81d00"), SENML_CBOR, None, None)
    assert error.detail.startswith("CBOR value sharing (tag 29) is not accepted in SenML")
    # Spelled out, the same records pass.
    assert len(accepted(cbor2.dumps([{0: "a", 2: 1}] * 3), SENML_CBOR)) == 3


def test_cbor_string_references_are_refused() -> None:
    # A repeated name is sent once, then referenced (tag 25) inside a namespace (tag 256).
    payload = cbor2.dumps([{0: "temperature", 2: 1}] * 2, string_referencing=True)
    error = refused(payload, SENML_CBOR, None, None)
    assert error.detail.startswith("CBOR string references (tag 25) are not accepted in SenML")
    payload = cbor2.dumps([{0: "a", 2: 1}], string_referencing=True)  # a namespace, no reference
    error = refused(payload, SENML_CBOR, None, None)
    assert error.detail.startswith("CBOR string references (tag 256) are not accepted in SenML")


@pytest.mark.parametrize(
    ("tag", "content"),
    [
        (0, "2024-01-01T00:00:00Z"),  # date/time string
        (1, 1_700_000_000),  # epoch date/time
        (5, [-1, 3]),  # bigfloat
        (24, b"\x01"),  # embedded CBOR
        (30, [1, 3]),  # rational
        (35, "a+"),  # regular expression
        (37, b"\x00" * 16),  # UUID
        (258, [1, 2]),  # set
        (1004, "2024-01-01"),  # date string
        (55799, 1),  # self-described CBOR, but not in front
        (42, 0),  # a tag nobody decodes
    ],
)
@pytest.mark.parametrize("where", ["v", "extension"])
def test_other_cbor_tags_are_refused(tag: int, content: Any, where: str) -> None:
    value = cbor2.CBORTag(tag, content)
    record = {0: "a", 2: value} if where == "v" else {0: "a", 2: 1, "x": [value]}
    error = refused(cbor2.dumps([record]), SENML_CBOR, None, None)
    assert error.detail.startswith(f"CBOR tag {tag} is not accepted in SenML: numbers are ")


@pytest.mark.parametrize(
    ("tag", "magnitude", "value"),
    [
        (2, b"", 0.0),
        (2, b"\x01", 1.0),  # a bignum for what a plain integer holds: valid, if not preferred
        (2, b"\xff" * 8, float(2**64 - 1)),
        (3, b"\x00" * 8, -1.0),
        (3, b"\xff" * 8, -float(2**64)),
    ],
)
def test_bignums_of_up_to_8_bytes_are_integers(tag: int, magnitude: bytes, value: float) -> None:
    payload = cbor2.dumps([{0: "a", 2: cbor2.CBORTag(tag, magnitude)}])
    assert accepted(payload, SENML_CBOR) == [rec("a", value=value)]


@pytest.mark.parametrize("tag", [2, 3])
@pytest.mark.parametrize("size", [9, 167, 200_000])
def test_longer_bignums_are_refused(tag: int, size: int) -> None:
    payload = cbor2.dumps([{0: "a", 2: 1}, {0: "b", 2: cbor2.CBORTag(tag, b"\x01" * size)}])
    error = refused(payload, SENML_CBOR, None, None)
    assert error.detail == (
        f"a CBOR bignum (tag {tag}) of {size} bytes is not accepted in SenML: at most 8 (a "
        "magnitude below 2**64); send a larger number as a float or a decimal fraction (tag 4)"
    )


def test_a_bignum_holds_a_byte_string() -> None:
    error = refused(cbor2.dumps([{0: "a", 2: cbor2.CBORTag(2, [1])}]), SENML_CBOR, None, None)
    assert error.detail == "a CBOR bignum (tag 2) holds a byte string, got an array"


def test_decimal_fractions() -> None:
    cases = [
        ([-2, -27315], -273.15),
        ([3, 5], 5000.0),
        ([-400, 1], 0.0),
        ([0, 2**64 - 1], 2**64 - 1),
    ]
    for content, value in cases:
        payload = cbor2.dumps([{0: "a", 2: cbor2.CBORTag(4, content)}])
        assert accepted(payload, SENML_CBOR) == [rec("a", value=float(value))]
    # A bignum mantissa of up to 8 bytes is an integer like another.
    mantissa = cbor2.CBORTag(3, b"\xff" * 8)
    payload = cbor2.dumps([{0: "a", 2: cbor2.CBORTag(4, [-2, mantissa])}])
    assert accepted(payload, SENML_CBOR) == [rec("a", value=-float(2**64) / 100)]
    # In an extension field, too.
    payload = cbor2.dumps([{0: "a", 2: 1, "x": [cbor2.CBORTag(4, [1, 2])]}])
    assert accepted(payload, SENML_CBOR) == [rec("a", value=1.0)]


@pytest.mark.parametrize("exponent", [400, 10**9])
def test_a_decimal_fraction_beyond_a_double_is_not_finite(exponent: int) -> None:
    payload = cbor2.dumps([{0: "a", 2: 1}, {0: "b", 2: cbor2.CBORTag(4, [exponent, 1])}])
    error = refused(payload, SENML_CBOR, 1, "v")
    assert error.detail.endswith(f"a double, got 1E+{exponent}")


@pytest.mark.parametrize(
    ("exponent", "shown"),
    [(10**9 + 1, "1000000001"), (-(10**9) - 1, "-1000000001"), (2**64 - 1, str(2**64 - 1))],
)
def test_a_decimal_fraction_exponent_is_bounded(exponent: int, shown: str) -> None:
    payload = cbor2.dumps([{0: "a", 2: cbor2.CBORTag(4, [exponent, 1])}])
    error = refused(payload, SENML_CBOR, None, None)
    assert error.detail.startswith(f"a CBOR decimal fraction (tag 4) with the exponent {shown} ")
    assert "at most 1000000000 either way" in error.detail


@pytest.mark.parametrize(
    ("content", "kind"),
    [
        ([1.5, 2], "an array"),
        ([1, 2, 3], "an array"),
        ([1, "2"], "an array"),
        ("1", "a text string"),
    ],
)
def test_a_decimal_fraction_is_two_integers(content: Any, kind: str) -> None:
    payload = cbor2.dumps([{0: "a", 2: cbor2.CBORTag(4, content)}])
    error = refused(payload, SENML_CBOR, None, None)
    assert error.detail == (
        "a CBOR decimal fraction (tag 4) is an array of two integers, [exponent, mantissa] "
        f"(RFC 8949 sec 3.4.4), got {kind}"
    )


@pytest.mark.parametrize(
    ("key", "tag"),
    [
        (cbor2.CBORTag(2, b"\x01"), 2),
        (cbor2.CBORTag(3, b"\x01"), 3),
        (cbor2.CBORTag(4, (1, 2)), 4),
        ((1, cbor2.CBORTag(2, b"\x01")), 2),  # inside an array used as a key
    ],
)
@pytest.mark.parametrize("where", ["record", "extension"])
def test_tags_in_map_keys_are_refused(key: Any, tag: int, where: str) -> None:
    """A bignum or a decimal fraction as a key could be made to collide with thousands of
    others in one hash: refused before the map is built."""
    record = {0: "a", 2: 1, key: 1} if where == "record" else {0: "a", 2: 1, "x": {key: 1}}
    error = refused(cbor2.dumps([record]), SENML_CBOR, None, None)
    assert error.detail == (
        f"CBOR tag {tag} in a map key is not accepted in SenML: labels are integers or text "
        "strings (RFC 8428 sec 6)"
    )


def test_nesting_up_to_the_bound_is_accepted() -> None:
    assert MAX_DEPTH == 16
    # pack (1), record (2), then 14 arrays: levels 3 to 16
    pack = [{"n": "a", "v": 1}, {"n": "b", "v": 1, "x": nested(14), "y": {"z": nested(13)}}]
    for payload, content_type in both(pack):
        assert len(accepted(payload, content_type)) == 2
    # CBOR: a tag is a level; a decimal fraction at level 15 holds its array at 16.
    deep_decimal = nested(12, cbor2.CBORTag(4, [1, 2]))
    assert accepted(cbor2.dumps([{0: "a", 2: 1, "x": deep_decimal}]), SENML_CBOR)


def test_nesting_beyond_the_bound_is_refused() -> None:
    pack = [{"n": "a", "v": 1}, {"n": "b", "v": 1, "x": nested(15)}]
    error = refused(as_json(pack), SENML_JSON, 1, None)
    assert error.detail == (
        "record 1: the pack nests arrays and objects deeper than 16 levels (the pack is "
        "level 1, its records level 2)"
    )
    error = refused(as_cbor(pack), SENML_CBOR, None, None)
    assert error.detail == (
        "the pack nests arrays, maps and tags deeper than 16 levels (the pack is level 1, its "
        "records level 2)"
    )
    deep_decimal = nested(13, cbor2.CBORTag(4, [1, 2]))
    error = refused(cbor2.dumps([{0: "a", 2: 1, "x": deep_decimal}]), SENML_CBOR, None, None)
    assert "deeper than 16 levels" in error.detail
    # Objects count as arrays do.
    deep_objects: Any = 0
    for _ in range(15):
        deep_objects = {"k": deep_objects}
    error = refused(as_json([{"n": "a", "v": 1, "x": deep_objects}]), SENML_JSON, 0, None)
    assert "deeper than 16 levels" in error.detail


@pytest.mark.parametrize("levels", [17, 997, 100_000])
def test_a_deeply_nested_json_pack_is_invalid_senml(levels: int) -> None:
    """997 levels, 2 kB, used to raise RecursionError from the checked path's decode."""
    payload = b"[" * levels + b"]" * levels
    error = refused(payload, SENML_JSON, 0, None)
    assert "nests arrays and objects deeper than 16 levels" in error.detail
    payload = b'{"x":' + b"[" * levels + b"]" * levels + b"}"
    assert "deeper than 16 levels" in refused(payload, SENML_JSON, None, None).detail


def test_a_recursion_error_from_the_decoder_is_invalid_senml() -> None:
    """msgspec counts its nesting against Python's recursion limit: called by a caller already
    near it, validate answers with a SenMLError, not a RecursionError. (A few frames from the
    limit, validate's own frames cannot run either: no code can answer there.)"""
    payload = as_json([{"n": "a", "v": 1, "x": nested(14)}])

    def at_depth(n: int) -> str:
        if n:
            return at_depth(n - 1)
        try:
            validate(payload, SENML_JSON, NOW)
        except SenMLError as error:
            return error.detail
        except RecursionError:
            return "RecursionError from validate"
        return "accepted"

    outcomes = set()
    for margin in range(300, 0, -1):  # from room to spare to none at all
        try:
            outcomes.add(at_depth(sys.getrecursionlimit() - margin))
        except RecursionError:
            pass  # our own frames ran out before validate was called
    assert {"accepted", "payload could not be decoded (RecursionError)"} <= outcomes


@pytest.mark.parametrize("cbor", [False, True], ids=["json", "cbor"])
def test_names_are_bounded(cbor: bool) -> None:
    assert MAX_NAME_PART == 256
    longest = [{"bn": "b" * 256, "n": "a" * 256, "v": 1}, {"n": "c" * 256, "v": 2}]
    payload, content_type = both(longest)[cbor]
    assert [len(r.name) for r in accepted(payload, content_type)] == [512, 512]
    for pack, record, field in [
        ([{"bn": "b" * 257, "n": "a", "v": 1}], 0, "bn"),
        ([{"n": "a", "v": 1}, {"n": "a" * 257, "v": 1}], 1, "n"),
        ([{"bn": "b", "n": "a" * 257, "v": 1}], 0, "n"),
        ([{"n": "a", "v": 1}, {"bn": "b" * 100_000 + " ", "v": 1}], 1, "bn"),
    ]:
        payload, content_type = both(pack)[cbor]
        error = refused(payload, content_type, record, field)
        size = len(pack[record][field])
        assert error.detail.endswith(
            f"{field!r} has {size} characters; Conduit accepts at most 256 in bn and in n"
        )


def test_a_long_bn_is_refused_before_parse_copies_it_into_every_record() -> None:
    pack = [{"bn": "b" * 20_000, "n": "a0", "v": 1}] + [{"n": f"a{i}", "v": 1} for i in range(9999)]
    for payload, content_type in both(pack):
        refused(payload, content_type, 0, "bn")


def test_error_messages_repeat_only_an_excerpt_of_what_was_sent() -> None:
    label = "x" * 100_000 + "_"
    error = refused(as_json([{"n": "a", "v": 1, label: 1}]), SENML_JSON, 0, "x" * 40 + "...")
    assert error.detail == (
        f"record 0, field {'x' * 40 + '...'!r}: unknown field {'x' * 40!r}... (100001 "
        "characters) must be understood (its label ends in '_'), so the pack cannot be used "
        "(RFC 8428 sec 4.4)"
    )
    digits = b"1" * 100_000
    error = refused(b'[{"n":"a","v":0.' + digits + b"E5}]", SENML_JSON, 0, "v")
    assert f"number 0.{'1' * 38}... (100004 characters) has an upper-case exponent" in error.detail
    error = refused(b'[{"n":"a","v":' + digits + b"e400}]", SENML_JSON, 0, "v")
    assert error.detail.endswith(f"a double, got {'1' * 40}... (100004 characters)")
    error = refused(as_json([{"bn": "a b", "n": "c" * 100_000, "v": 1}]), SENML_JSON, 0, "bn")
    assert error.detail == (
        f"record 0, field 'bn': name {'a b' + 'c' * 509!r}... (100003 characters) has a "
        "character not allowed (' ') (RFC 8428 sec 4.5.1)"
    )
    key = cbor2.dumps("k" * 10_000)
    duplicate = b"\x81\xa4\x00\x61a\x02\x01" + key + b"\x01" + key + b"\x01"
    error = refused(duplicate, SENML_CBOR, None, None)
    assert error.detail.startswith("payload is not valid CBOR: error decoding map: Duplicate")
    assert len(error.detail) < 200


@pytest.mark.parametrize(
    "rest",
    [
        b'"v":1-}]',  # a number that is not one
        b'"\\x":1}]',  # a label that is not a string
        b'"v":1},"' + b'\\"' * 5_000,  # a string that never ends
        b"\xff\xfe",
    ],
)
def test_bytes_after_a_refused_number_need_not_be_json(rest: bytes) -> None:
    """msgspec stops at a number beyond a double; the search for its field then reads on,
    into whatever follows."""
    payload = b'[{"n":"a","x":1e400,' + rest
    error = refused(payload, SENML_JSON, 0, None)
    assert error.detail == "record 0: payload has a number beyond the range of a double"


def test_upper_case_exponents_are_found_past_strings_that_hold_an_e() -> None:
    payload = b'[{"n":"a1E","vs":"\\"1E"},{"n":"b","vs":"2E\\\\","x":3E1,"t":4E0,"s":1}]'
    error = refused(payload, SENML_JSON, 1, "t")
    assert "number 4E0 has an upper-case exponent" in error.detail
    accepted(payload.replace(b"4E0", b"4e0"))  # names, strings and extensions may hold an E


# --- errors carry the table's condition ------------------------------------------------------


def test_error_text_names_the_record_and_the_field() -> None:
    pack = [{"n": "a", "v": 1}, {"n": "b", "v": 1}, {"n": "x y", "v": 1}]
    error = refused(as_json(pack), SENML_JSON, 2, "n")
    assert str(error) == (
        "record 2, field 'n': name 'x y' has a character not allowed (' ') (RFC 8428 sec 4.5.1)"
    )
    assert error.condition.answer.http == 400


# --- properties ------------------------------------------------------------------------------

LABELS = [*CBOR_LABELS, "x", "ext", "x_", "bz_"]
NAMES = st.text(alphabet="ab09-:./_ #é", max_size=5)
ANY_VALUE = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False),
    st.floats(min_value=-(2.0**30), max_value=2.0**30),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.integers(min_value=-3, max_value=30),
    st.booleans(),
    NAMES,
    st.sampled_from(["aGk", "aGkgCg", "a=", "", "aGkgC"]),
    st.none(),
    st.lists(st.integers(), max_size=2),
)
PLAUSIBLE = st.fixed_dictionaries(
    {"n": NAMES},
    optional={
        "bn": NAMES,
        "bt": st.one_of(st.just(1.7e9), st.integers(-100, 100)),
        "bu": st.sampled_from(["Cel", "%RH"]),
        "bv": st.floats(-10, 10),
        "bs": st.floats(-10, 10),
        "bver": st.sampled_from([5, 10, 10, 11, 26, 0]),
        "u": st.sampled_from(["Cel", "W"]),
        "v": st.floats(allow_nan=False, allow_infinity=False),
        "vs": NAMES,
        "vb": st.booleans(),
        "vd": st.sampled_from(["aGk", "aGkgCg", "a="]),
        "s": st.integers(-5, 5),
        "t": st.one_of(st.integers(-100, 100), st.just(1.7e9)),
        "ut": st.integers(-1, 60),
        "ext": ANY_VALUE,
        "x_": st.just(1),
    },
)
FINITE = st.floats(allow_nan=False, allow_infinity=False)
VALID = st.builds(
    lambda fields, value: {**fields, **value},
    st.fixed_dictionaries(
        {"n": st.from_regex(r"[a-z0-9][a-z0-9:._/-]{0,4}", fullmatch=True)},
        optional={
            "bn": st.sampled_from(["", "dev:", "urn:dev:ow:10e2073a01080063:"]),
            "bt": st.one_of(st.just(1.7e9), st.integers(-100, 100), FINITE),
            "bu": st.sampled_from(["Cel", "%RH"]),
            "bv": st.one_of(st.integers(-10, 10), FINITE),
            "bs": st.one_of(st.integers(-10, 10), FINITE),
            "bver": st.just(10),
            "u": st.sampled_from(["Cel", "W", ""]),
            "t": st.one_of(st.integers(-100, 100), st.just(1.7e9), FINITE),
            "ut": st.floats(min_value=0, max_value=1e9),
            "ext": ANY_VALUE,
        },
    ),
    st.one_of(
        st.fixed_dictionaries({"v": st.one_of(FINITE, st.integers(-(2**64), 2**64))}),
        st.fixed_dictionaries({"vs": st.text(max_size=5)}),
        st.fixed_dictionaries({"vb": st.booleans()}),
        st.fixed_dictionaries({"vd": st.sampled_from(["", "aGk", "aGkgCg", "-_8A"])}),
        st.fixed_dictionaries({"s": FINITE}, optional={"v": FINITE}),
    ),
)
RECORDS = st.one_of(
    st.lists(VALID, min_size=1, max_size=5),
    st.lists(
        st.one_of(
            VALID, PLAUSIBLE, st.dictionaries(st.sampled_from(LABELS), ANY_VALUE, max_size=5)
        ),
        max_size=5,
    ),
)


def outcome(call: Any, payload: bytes, content_type: str) -> tuple[Any, ...]:
    try:
        call(payload, content_type, NOW)
    except SenMLError as error:
        return ("refused", error.record, error.field, error.detail)
    return ("accepted",)


@settings(deadline=None, max_examples=300)
@given(pack=RECORDS, upper_e=st.booleans())
def test_validate_accepts_exactly_what_parse_accepts(pack: Pack, upper_e: bool) -> None:
    payload = as_json(pack)
    if upper_e:
        payload = payload.replace(b"e", b"E")
    result = outcome(parse, payload, SENML_JSON)
    event(f"json {result[0]}")
    assert outcome(validate, payload, SENML_JSON) == result
    try:
        cbor = as_cbor(pack)
    except ValueError:  # vd that is not base64: no bytes to send
        return
    assert outcome(validate, cbor, SENML_CBOR) == outcome(parse, cbor, SENML_CBOR)


@settings(deadline=None, max_examples=300)
@given(pack=RECORDS)
def test_json_fast_path_agrees_with_the_checked_path(pack: Pack) -> None:
    payload = as_json(pack)

    def checked(payload: bytes, content_type: str, now: float) -> list[Record]:
        records: list[Record] = []
        _resolve(_json_records_checked(payload), now, records)
        return records

    fast = outcome(parse, payload, SENML_JSON)
    event(f"json {fast[0]}")
    assert outcome(checked, payload, SENML_JSON) == fast
    if fast == ("accepted",):
        assert parse(payload, SENML_JSON, NOW) == checked(payload, SENML_JSON, NOW)


def cbor_integers(value: Any) -> bool:
    """Whether every integer in ``value`` is one CBOR holds without a tag: an integer beyond
    64 bits becomes a bignum, refused in SenML CBOR while its digits are fine in JSON."""
    if isinstance(value, int) and not isinstance(value, bool):
        return -(2**64) <= value < 2**64
    if isinstance(value, dict):
        return all(cbor_integers(v) for v in value.values())
    if isinstance(value, list):
        return all(cbor_integers(v) for v in value)
    return True


@settings(deadline=None, max_examples=200)
@given(pack=st.lists(st.one_of(VALID, PLAUSIBLE), min_size=1, max_size=5))
def test_json_and_cbor_resolve_alike(pack: Pack) -> None:
    json_outcome = outcome(parse, as_json(pack), SENML_JSON)
    event(f"json {json_outcome[0]}")
    if not cbor_integers(pack):
        return
    try:
        cbor = as_cbor(pack)
    except ValueError:
        return
    if json_outcome == ("accepted",):
        assert parse(cbor, SENML_CBOR, NOW) == parse(as_json(pack), SENML_JSON, NOW)
    else:
        assert outcome(parse, cbor, SENML_CBOR)[:3] == json_outcome[:3]


# --- CBOR map keys -----------------------------------------------------------------------------
# cbor2 makes an array key a tuple and builds the map before any check: keys that are arrays
# with one Python hash made 256 KiB take 11 s. Above 4 KiB the item heads are walked first.

KEY_RULE = "labels, and the keys of maps in extension fields, are integers or text strings"


def _records(n: int) -> list[dict[Any, Any]]:
    return [{0: f"t{i}", 2: i, 6: Decimal("1.5"), "ext": {"k": [1, {"x": 2}]}} for i in range(n)]


def test_a_large_pack_is_walked_and_passes() -> None:
    payload = cbor2.dumps(_records(200))
    assert len(payload) > 4096
    assert len(parse(payload, SENML_CBOR, NOW)) == 200


@pytest.mark.parametrize("n", [5, 400])  # decoded, then checked; walked before decoding
def test_array_keys_are_refused_in_any_pack(n: int) -> None:
    records = _records(n)
    records[-1][(1, 2)] = 3  # an array as a key in the last record
    payload = cbor2.dumps(records)
    assert (len(payload) > 4096) == (n == 400)
    error = refused(payload, SENML_CBOR, n - 1, None)
    assert f"a CBOR map key is an array: SenML CBOR {KEY_RULE}" in error.detail


@pytest.mark.parametrize("n", [5, 400])
def test_map_keys_in_extension_values_are_refused(n: int) -> None:
    records = _records(n)
    records[2]["ext"] = {"inner": [{(1, 2): 3}]}
    payload = cbor2.dumps(records)
    error = refused(payload, SENML_CBOR, 2, None)
    assert "a CBOR map key is an array" in error.detail


def test_many_array_keys_with_one_hash_are_refused_before_decoding(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Tuples of two integers whose hashes are equal (Python's tuple hash, inverted): one map
    of about 64 KiB of them. Refused from the heads; never handed to cbor2."""

    def no_decoding(*args: object, **kwargs: object) -> None:
        raise AssertionError("cbor2 was asked to decode the pack")

    monkeypatch.setattr(cbor2, "CBORDecoder", no_decoding)
    keys = _colliding_pairs(5_000)
    entries = b"".join(cbor2.dumps(list(k)) + b"\x00" for k in keys)
    payload = b"\x81\xb9" + (len(keys) + 2).to_bytes(2, "big") + b"\x00\x61a\x02\x01" + entries
    assert len(payload) > 60_000  # cbor2 took 0.6 s to build this map, 11 s at 256 KiB
    error = refused(payload, SENML_CBOR, 0, None)
    assert "a CBOR map key is an array" in error.detail


def _colliding_pairs(n: int) -> list[tuple[int, int]]:
    """``n`` pairs of integers with one ``hash``: CPython's tuple hash (xxHash-based, 3.8+) is
    invertible, solved here for the second element."""
    if sys.hash_info.width != 64:
        pytest.skip("the tuple hash is inverted here for 64-bit builds")
    mask, modulus = (1 << 64) - 1, (1 << 61) - 1
    p1, p2, p5 = 11400714785074694791, 14029467366897019727, 2870177450012600261

    def rotl(x: int, r: int) -> int:
        return ((x << r) | (x >> (64 - r))) & mask

    def rotr(x: int, r: int) -> int:
        return ((x >> r) | (x << (64 - r))) & mask

    target = 12345
    want = rotr(((target - (2 ^ (p5 ^ 3527539))) & mask) * pow(p1, -1, 1 << 64) & mask, 31)
    pairs: list[tuple[int, int]] = []
    a = 0
    while len(pairs) < n:
        acc = rotl((p5 + (hash(a) & mask) * p2) & mask, 31) * p1 & mask
        lane = (want - acc) * pow(p2, -1, 1 << 64) & mask
        b = lane - (1 << 64) if lane >> 63 else lane
        if 0 <= b < modulus or -modulus < b < -2:  # an int whose hash is the lane itself
            pairs.append((a, b))
        a += 1
    assert {hash(pair) for pair in pairs} == {target}
    return pairs
