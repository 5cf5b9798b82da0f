"""The topic grammar: every rule, pass and fail, with the part the error names."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.errors import Condition, TopicError
from core.topics import (
    Topic,
    TopicFilter,
    filter_subject,
    parse_filter,
    parse_path,
    parse_topic,
    path_topic,
    subject,
    topic_from_subject,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("m/acme/c/temps", Topic("acme", "temps", "")),
        ("m/acme/c/temps/room1", Topic("acme", "temps", "room1")),
        ("m/acme/c/temps/a/b.c/d-e", Topic("acme", "temps", "a/b.c/d-e")),
        ("m/a-b_c/c/9x/é", Topic("a-b_c", "9x", "é")),
    ],
)
def test_publish_topics(text: str, expected: Topic) -> None:
    assert parse_topic(text) == expected
    assert str(expected) == text


@pytest.mark.parametrize(
    ("text", "part", "condition"),
    [
        ("", "topic", Condition.BAD_TOPIC),
        ("x/acme/c/temps", "topic", Condition.NOT_FOUND),
        ("m/acme/temps", "topic", Condition.BAD_TOPIC),
        ("m/acme/x/temps", "topic", Condition.BAD_TOPIC),
        ("m//c/temps", "domain", Condition.BAD_TOPIC),
        ("m/acme/c/", "channel", Condition.BAD_TOPIC),
        ("m/ac me/c/temps", "domain", Condition.BAD_TOPIC),
        ("m/-acme/c/temps", "domain", Condition.BAD_TOPIC),
        ("m/acme/c/te.mps", "channel", Condition.BAD_TOPIC),
        ("m/acme/c/temps/", "subtopic", Condition.BAD_TOPIC),
        ("m/acme/c/temps/a//b", "subtopic", Condition.BAD_TOPIC),
        ("m/acme/c/temps/+", "subtopic", Condition.BAD_TOPIC),
        ("m/acme/c/temps/#", "subtopic", Condition.BAD_TOPIC),
        ("m/acme/c/temps/a+b", "subtopic", Condition.BAD_TOPIC),
        ("m/acme/c/temps/a b", "subtopic", Condition.BAD_TOPIC),
        ("m/acme/c/temps/a\x00", "subtopic", Condition.BAD_TOPIC),
        ("m/+/c/temps", "domain", Condition.BAD_TOPIC),
        ("m/acme/c/" + "x" * 2000, "topic", Condition.BAD_TOPIC),
    ],
)
def test_bad_publish_topics(text: str, part: str, condition: Condition) -> None:
    with pytest.raises(TopicError) as err:
        parse_topic(text)
    assert err.value.part == part
    assert err.value.condition is condition


def test_wildcard_refusal_says_why() -> None:
    with pytest.raises(TopicError, match="wildcards are not allowed when publishing"):
        parse_topic("m/acme/c/temps/+")


@pytest.mark.parametrize(
    ("text", "levels"),
    [
        ("m/acme/c/temps", ()),
        ("m/acme/c/temps/#", None),
        ("m/acme/c/temps/+", ("+",)),
        ("m/acme/c/temps/+/t", ("+", "t")),
        ("m/acme/c/temps/a/#", ("a", "#")),
    ],
)
def test_filters(text: str, levels: tuple[str, ...] | None) -> None:
    flt = parse_filter(text)
    assert flt == TopicFilter("acme", "temps", levels)
    assert str(flt) == text


@pytest.mark.parametrize(
    ("text", "part"),
    [
        ("m/+/c/temps", "domain"),
        ("m/#", "domain"),
        ("m/acme/c/+", "channel"),
        ("m/acme/c/#", "channel"),
        ("m/acme/c/temps/#/a", "subtopic"),
        ("m/acme/c/temps/a#", "subtopic"),
        ("m/acme/c/temps/+a", "subtopic"),
        ("m/acme/c/temps//+", "subtopic"),
    ],
)
def test_bad_filters(text: str, part: str) -> None:
    with pytest.raises(TopicError) as err:
        parse_filter(text)
    assert err.value.part == part


@pytest.mark.parametrize(
    ("flt", "subtopic", "match"),
    [
        ("m/d/c/ch", "", True),
        ("m/d/c/ch", "a", False),
        ("m/d/c/ch/#", "", True),
        ("m/d/c/ch/#", "a/b/c", True),
        ("m/d/c/ch/a", "a", True),
        ("m/d/c/ch/a", "a/b", False),
        ("m/d/c/ch/+", "a", True),
        ("m/d/c/ch/+", "", False),
        ("m/d/c/ch/+", "a/b", False),
        ("m/d/c/ch/+/b", "a/b", True),
        ("m/d/c/ch/+/b", "a/c", False),
        ("m/d/c/ch/a/#", "a", True),  # MQTT: "a/#" matches its parent "a"
        ("m/d/c/ch/a/#", "a/b/c", True),
        ("m/d/c/ch/a/#", "b", False),
        ("m/d/c/ch/+/#", "x/y", True),
    ],
)
def test_matching(flt: str, subtopic: str, match: bool) -> None:
    assert parse_filter(flt).matches(subtopic) is match


def test_paths() -> None:
    assert parse_path("/m/acme/c/temps/") == "m/acme/c/temps"
    assert parse_path("m/acme/c/temps") == "m/acme/c/temps"


def test_path_topic_parses_a_path_and_refuses_a_bad_one_every_time() -> None:
    assert path_topic("/m/acme/c/temps/room1/") == Topic("acme", "temps", "room1")
    assert path_topic("/m/acme/c/temps/room1/") is path_topic("/m/acme/c/temps/room1/")
    for _ in range(2):  # a refusal is not cached as an answer
        with pytest.raises(TopicError) as err:
            path_topic("/m/acme/c/temps/+")
        assert err.value.part == "subtopic"


@pytest.mark.parametrize("subtopic", ["", "a", "a/b", "v1.2/x*y/>z/100%", "%2E"])
def test_subjects_are_reversible(subtopic: str) -> None:
    topic = Topic("acme", "temps", subtopic)
    subj = subject(topic)
    assert all(token for token in subj.split("."))
    assert "*" not in subj and ">" not in subj
    assert topic_from_subject(subj) == topic


def test_filter_subjects() -> None:
    assert filter_subject(parse_filter("m/a/c/b/#")) == "m.a.b.>"
    assert filter_subject(parse_filter("m/a/c/b/+/x.y")) == "m.a.b.*.x%2Ey"
    assert filter_subject(parse_filter("m/a/c/b")) == "m.a.b"


# A filter covers another when every topic the other matches, it matches too. Checked against
# the plain rule over every subtopic of up to 5 levels of a small alphabet (a filter of up to 3
# levels can only differ from another within 4 levels, "+" needing a level of its own).
_LEVELS = ("a", "b", "+", "#")
_UNIVERSE = [""] + [
    "/".join(levels)
    for depth in range(1, 6)
    for levels in itertools.product(("a", "b", "c"), repeat=depth)
]


def _filter_from(levels: list[str]) -> TopicFilter:
    text = "/".join(["m/d/c/ch", *levels]) if levels else "m/d/c/ch"
    return parse_filter(text)


_filters = st.lists(st.sampled_from(_LEVELS), max_size=3).filter(
    lambda levels: "#" not in levels[:-1]
).map(_filter_from)


@settings(max_examples=400, deadline=None)
@given(_filters, _filters)
def test_covers_is_the_plain_rule(mine: TopicFilter, theirs: TopicFilter) -> None:
    plain = all(mine.matches(s) for s in _UNIVERSE if theirs.matches(s))
    assert mine.covers(theirs) == plain, (str(mine), str(theirs))


def test_covers_needs_the_same_channel() -> None:
    assert parse_filter("m/d/c/ch/#").covers(parse_filter("m/d/c/ch/a/+"))
    assert not parse_filter("m/d/c/ch/#").covers(parse_filter("m/d/c/other/a"))
    assert not parse_filter("m/d/c/ch/#").covers(parse_filter("m/e/c/ch/a"))
