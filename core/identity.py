"""Who an authenticated party is, and where its rights come from.

An :class:`Identity` is what the authenticator hands the gateway for a connection or request.
Its rights come from one of two places:

- the store's connections (a client and a channel, publish and/or subscribe), looked up by the
  authorizer through its cache: ``rules`` is None. Provisioned clients with a secret or a
  certificate are such identities;
- a set of topic :class:`Rules` carried by the identity itself, checked without a store call:
  token holders, whose rights were fixed when the token was issued.

An identity may have an expiry (``expires``, seconds since the epoch): from then on it is cut
off, on every protocol, as a disabled client is. One proven by a client certificate names it
(``certificate``, its serial in hex): when that certificate is revoked, it is cut off too.
"""

from __future__ import annotations

from typing import Literal

import msgspec

from core.topics import Topic, TopicFilter

Action = Literal["publish", "subscribe"]


class Rules(msgspec.Struct, frozen=True, gc=False):
    """Topic filters an identity may publish to and subscribe to."""

    publish: tuple[TopicFilter, ...] = ()
    subscribe: tuple[TopicFilter, ...] = ()

    def allows_publish(self, topic: Topic) -> bool:
        """Whether a publish filter matches the topic."""
        return any(
            f.domain == topic.domain and f.channel == topic.channel and f.matches(topic.subtopic)
            for f in self.publish
        )

    def allows_subscribe(self, wanted: TopicFilter) -> bool:
        """Whether a subscribe filter covers every topic ``wanted`` can match."""
        return any(f.covers(wanted) for f in self.subscribe)


class Identity(msgspec.Struct, frozen=True, gc=False):
    """An authenticated client: its id, domain and name; ``rules`` when its rights are its own
    (not the store's connections); ``expires`` when it ends (seconds since the epoch);
    ``certificate`` the serial (hex) of the client certificate that proved it."""

    client_id: str
    domain: str
    name: str
    rules: Rules | None = None
    expires: float | None = None
    certificate: str | None = None
    issued: float | None = None  # when its token was issued (a revocation ends older ones)
