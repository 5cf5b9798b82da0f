"""What Conduit writes to its log about input it did not ask for.

Anyone who can reach a port can send garbage: malformed HTTP requests, undecodable CoAP
datagrams, credentials that match nobody. Each of those is counted in the metrics (the
``conduit_refusals`` counter, by protocol and reason), and the log gets a sample: the first
:data:`SAMPLE` lines of a kind in each :data:`INTERVAL`, then one line when the interval is over
saying how many more there were. A flood of garbage costs a few lines a minute, never a line
(or a traceback) per packet.

Values that came from a client are written with :func:`printable`: control characters escaped,
so a CR/LF in a user name or a path cannot forge a log line, and long values cut; a claimed
identity only when it cannot be a secret (:func:`claimed_client`). Text that
a library logs with a client's credentials in it (a request line with ``?authorization=``, an
``Authorization`` header) goes through :func:`redact` first.
"""

from __future__ import annotations

import logging
import re
import time
from typing import Final

SAMPLE: Final = 10
"""Lines of one kind written in full per interval."""
INTERVAL: Final = 60.0
"""Seconds of one sampling interval."""
MAX_VALUE: Final = 200
"""Characters of a client value written to the log; longer values are cut."""

_CLIENT_ID: Final = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


# An Authorization header (to the end of its line), an authorization= / auth= / password=
# query value (to the next & or white space), percent-encoded or not, or the password of a
# URL (postgresql://user:password@host: a database's DSN in a library's error).
_CREDENTIALS: Final = re.compile(
    r"(?i)(\bauthorization\s*:\s*)[^\r\n]*"
    r"|((?:[?&;]|^|\s)(?:authorization|auth|password)(?:=|%3d))[^&\s#]*"
    r"|(\b[a-z][a-z0-9+.-]*://[^\s:/@]*:)[^\s@/]+(?=@)"
)


def redact(text: str) -> str:
    """``text`` with every credential it may carry replaced by ``[redacted]``."""
    return _CREDENTIALS.sub(lambda m: (m.group(1) or m.group(2) or m.group(3)) + "[redacted]", text)


def printable(value: object, limit: int = MAX_VALUE) -> str:
    """``value`` as text fit for one log line: cut to ``limit`` characters, and every character
    that is not printable (CR, LF, ESC, U+2028, bidirectional controls...) escaped the way
    ``repr()`` writes it, so that a client cannot start, end or rewrite a line."""
    text = value if isinstance(value, str) else str(value)
    if len(text) > limit:
        text = text[:limit] + "..."
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def claimed_client(username: str | None) -> str | None:
    """Who a not yet authenticated client claims to be, fit for the log: its user name when it
    has the shape of a Conduit client id (a canonical UUID, as provisioning makes them), else
    None. Devices put anything in a user name, their secret included (43 URL-safe characters,
    never that shape)."""
    if username is not None and len(username) == 36 and _CLIENT_ID.fullmatch(username):
        return username
    return None


class _Kind:
    __slots__ = ("logged", "protocol", "reason", "since", "suppressed")

    def __init__(self, protocol: str, reason: str, now: float) -> None:
        self.protocol = protocol
        self.reason = reason
        self.since = now
        self.logged = 0
        self.suppressed = 0


class NoiseLog:
    """A sampled log for one kind of unsolicited input per key (e.g. ``("http", "malformed")``).

    :meth:`allow` says whether this occurrence may be written; occurrences beyond the sample
    are counted and reported in one line once their interval is over (checked at most once a
    second, when anything noisy happens; and on :meth:`flush`).
    """

    def __init__(
        self, logger: logging.Logger, sample: int = SAMPLE, interval: float = INTERVAL
    ) -> None:
        self.logger = logger
        self.sample = sample
        self.interval = interval
        self._kinds: dict[tuple[str, str], _Kind] = {}
        self._next_report = 0.0

    def allow(self, protocol: str, reason: str) -> bool:
        now = time.monotonic()
        if now >= self._next_report:
            self._next_report = now + 1.0
            for other in self._kinds.values():
                if now - other.since >= self.interval:
                    self._report(other, now)
        key = (protocol, reason)
        kind = self._kinds.get(key)
        if kind is None:
            kind = self._kinds[key] = _Kind(protocol, reason, now)
        if kind.logged < self.sample:
            kind.logged += 1
            return True
        kind.suppressed += 1
        return False

    def flush(self) -> None:
        """Report what was suppressed so far (at shutdown)."""
        now = time.monotonic()
        for kind in self._kinds.values():
            self._report(kind, now)

    def _report(self, kind: _Kind, now: float) -> None:
        """End the kind's interval, with a line for what it did not log."""
        if kind.suppressed:
            self.logger.info(
                "%s %s: %d more like this not logged in the last %.0f s",
                kind.protocol,
                kind.reason,
                kind.suppressed,
                now - kind.since,
            )
        kind.since, kind.logged, kind.suppressed = now, 0, 0
