"""The topic grammar, parsed in one place: ``m/<domain>/c/<channel>[/<subtopic>...]``.

Every adapter hands its topic or path here: an MQTT topic as it is, an HTTP, WebSocket or CoAP
path without its leading slash. Publishing takes a :class:`Topic` (no wildcards); subscribing
takes a :class:`TopicFilter` (MQTT wildcards ``+`` and ``#`` in subtopic levels only).

The bus subject for NATS is derived here too (:func:`subject`), with the characters NATS reserves
escaped reversibly.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

from core.errors import Condition, TopicError

MAX_TOPIC_LENGTH = 1024
# Domain and channel names: what a URL, an MQTT topic, a CoAP Uri-Path and a NATS subject all carry
# without escaping.
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
# Subtopic levels may hold any printable character except the separators and wildcards.
_BAD_LEVEL_CHAR = re.compile(r"[\x00-\x20\x7f+#/]")


@dataclass(frozen=True, slots=True)
class Topic:
    """A concrete publish topic."""

    domain: str
    channel: str
    subtopic: str = ""  # levels joined by "/", "" when none

    def __str__(self) -> str:
        base = f"m/{self.domain}/c/{self.channel}"
        return f"{base}/{self.subtopic}" if self.subtopic else base


@dataclass(frozen=True, slots=True)
class TopicFilter:
    """A subscription: a domain, a channel and a subtopic filter that may hold ``+`` and ``#``.

    ``levels`` is ``None`` when the filter takes the channel's messages of any subtopic or none,
    that is the bare channel followed by ``#``. Otherwise it is the tuple of subtopic filter levels;
    an empty tuple matches only messages with no subtopic.
    """

    domain: str
    channel: str
    levels: tuple[str, ...] | None = ()

    @property
    def wildcard(self) -> bool:
        return self.levels is None or "+" in self.levels or "#" in self.levels

    @property
    def subtopic(self) -> str:
        return "#" if self.levels is None else "/".join(self.levels)

    def matches(self, subtopic: str) -> bool:
        """Whether a message published on this filter's channel with ``subtopic`` matches."""
        levels = self.levels
        if levels is None:
            return True
        if not levels:
            return subtopic == ""
        if not self.wildcard:
            return subtopic == "/".join(levels)
        parts = subtopic.split("/") if subtopic else []
        for i, want in enumerate(levels):
            if want == "#":
                # "a/#" also matches "a" itself (MQTT 4.7.1.2).
                return True
            if i >= len(parts):
                return False
            if want != "+" and want != parts[i]:
                return False
        return len(parts) == len(levels)

    def covers(self, other: TopicFilter) -> bool:
        """Whether every topic ``other`` matches is matched by this filter too."""
        if self.domain != other.domain or self.channel != other.channel:
            return False
        mine, theirs = self.levels, other.levels
        if mine is None:
            return True
        if theirs is None:
            return False
        for i, want in enumerate(mine):
            if want == "#":
                return True  # what "a/#" covers: "a" itself and anything below it
            if i >= len(theirs):
                return False
            level = theirs[i]
            if level == "#" or (want != "+" and want != level):
                return False
        return len(theirs) == len(mine)

    def __str__(self) -> str:
        base = f"m/{self.domain}/c/{self.channel}"
        if self.levels is None:
            return f"{base}/#"
        return f"{base}/{self.subtopic}" if self.levels else base


def _split(topic: str, what: str) -> tuple[str, str, list[str]]:
    if not topic:
        raise TopicError(f"empty {what}", "topic")
    if len(topic) > MAX_TOPIC_LENGTH:
        raise TopicError(f"{what} longer than {MAX_TOPIC_LENGTH} characters", "topic")
    parts = topic.split("/")
    if len(parts) < 4 or parts[0] != "m" or parts[2] != "c":
        raise TopicError(
            f"{what} {topic!r} is not of the form m/<domain>/c/<channel>[/<subtopic>...]",
            "topic",
            Condition.NOT_FOUND if not topic.startswith("m/") else None,
        )
    domain, channel = parts[1], parts[3]
    if not NAME_RE.fullmatch(domain):
        raise TopicError(f"domain {domain!r} is not a valid name", "domain")
    if not NAME_RE.fullmatch(channel):
        raise TopicError(f"channel {channel!r} is not a valid name", "channel")
    return domain, channel, parts[4:]


def _check_level(level: str, index: int) -> None:
    if not level:
        raise TopicError(f"subtopic level {index + 1} is empty", "subtopic")
    bad = _BAD_LEVEL_CHAR.search(level)
    if bad:
        raise TopicError(
            f"subtopic level {index + 1} {level!r} has a character not allowed ({bad.group()!r})",
            "subtopic",
        )


def parse_topic(topic: str) -> Topic:
    """Parse a publish topic; wildcards are refused."""
    domain, channel, levels = _split(topic, "topic")
    for i, level in enumerate(levels):
        if level in ("+", "#"):
            raise TopicError("wildcards are not allowed when publishing", "subtopic")
        _check_level(level, i)
    return Topic(domain, channel, "/".join(levels))


def parse_filter(topic: str) -> TopicFilter:
    """Parse a subscription filter; ``+`` and ``#`` are allowed in subtopic levels only."""
    if topic.count("/") >= 1:
        head = topic.split("/", 4)
        for i, part in ((1, "domain"), (3, "channel")):
            if len(head) > i and head[i] in ("+", "#"):
                raise TopicError(f"wildcards are not allowed in the {part}", part)
    domain, channel, levels = _split(topic, "topic filter")
    for i, level in enumerate(levels):
        if level == "#":
            if i != len(levels) - 1:
                raise TopicError("'#' must be the last level of a filter", "subtopic")
            if i == 0:
                return TopicFilter(domain, channel, None)
        elif level != "+":
            _check_level(level, i)
    return TopicFilter(domain, channel, tuple(levels))


# Parsed topics kept (LRU): a fleet publishes to one topic per device, and a cache smaller than
# the fleet parses every publish again (at 10,000 devices: 5.0 -> 8.4 us of server CPU per
# MQTT message, bench/routing_bench.py). About 250 bytes per entry once filled.
TOPIC_CACHE = 65_536


@functools.lru_cache(maxsize=TOPIC_CACHE)
def path_topic(path: str) -> Topic:
    """The publish topic of a URL path: :func:`parse_path`, then :func:`parse_topic`. Cached,
    as devices publish to the same paths again and again (raises like :func:`parse_topic`)."""
    return parse_topic(parse_path(path))


def parse_path(path: str) -> str:
    """Turn a URL or CoAP path into a topic string: strip one leading and one trailing slash."""
    if path.startswith("/"):
        path = path[1:]
    if path.endswith("/"):
        path = path[:-1]
    return path


# NATS reserves "." (token separator), "*" and ">" (wildcards) and whitespace. Subtopic levels may
# hold "." and "*" and ">"; escape them (and the escape character "%") reversibly, percent-style.
_NATS_ESCAPES = {"%": "%25", ".": "%2E", "*": "%2A", ">": "%3E"}
_NATS_ESCAPE_RE = re.compile(r"[%.*>]")
_NATS_UNESCAPE_RE = re.compile(r"%(25|2E|2A|3E)")
_NATS_UNESCAPES = {v[1:]: k for k, v in _NATS_ESCAPES.items()}


def _escape(level: str) -> str:
    return _NATS_ESCAPE_RE.sub(lambda m: _NATS_ESCAPES[m.group()], level)


def subject(topic: Topic, prefix: str = "m") -> str:
    """The bus subject of a topic: ``m.<domain>.<channel>[.<level>...]``."""
    base = f"{prefix}.{topic.domain}.{topic.channel}"
    if not topic.subtopic:
        return base
    return base + "." + ".".join(_escape(level) for level in topic.subtopic.split("/"))


def filter_subject(flt: TopicFilter, prefix: str = "m") -> str:
    """The NATS subject pattern of a filter: ``+`` becomes ``*`` and ``#`` becomes ``>``.

    A filter ``.../#`` also matches its parent level in MQTT, which ``>`` alone does not; a bus
    that routes by subject subscribes to the parent subject as well.
    """
    base = f"{prefix}.{flt.domain}.{flt.channel}"
    if flt.levels is None:
        return base + ".>"
    parts = ["*" if lv == "+" else ">" if lv == "#" else _escape(lv) for lv in flt.levels]
    return ".".join([base, *parts]) if parts else base


def topic_from_subject(subj: str, prefix: str = "m") -> Topic:
    """Inverse of :func:`subject`."""
    parts = subj.split(".")
    if len(parts) < 3 or parts[0] != prefix:
        raise TopicError(f"subject {subj!r} is not a message subject", "topic")
    levels = [_NATS_UNESCAPE_RE.sub(lambda m: _NATS_UNESCAPES[m.group(1)], p) for p in parts[3:]]
    return Topic(parts[1], parts[2], "/".join(levels))
