"""Where protocol sessions that outlive their connection are kept: the session store.

An MQTT persistent session (its subscriptions, the QoS 1/2 messages it must still get, its will)
must survive the connection, and with a durable store also a crash and restart of the server.
The store sees opaque bytes: a session's state under its key, and its messages under the key
and a sequence number that orders them. What the bytes mean is the adapter's business
(:mod:`adapters.mqtt.persist`).

Writes are buffered: ``put_session``, ``delete_session``, ``put_message`` and
``delete_message`` return at once and what they ask for is written in one batch at the end of
the loop turn (a later operation on the same key replaces an earlier one in the batch, so a
message queued and acknowledged in the same turn is never written). :meth:`SessionStore.flush`
returns once everything asked before it is durable: an adapter awaits it before telling a
publisher its message is safe. Deleting a session deletes its messages.

Every session is held by one node (``node``: the ``node_id`` setting), which alone restores,
writes and expires it. When its client connects to another node, the holder writes the
session's last state and hands it over (:meth:`SessionStore.hand_over`, a buffered write like
the others); the new node reads who holds it (:meth:`SessionStore.holder`) until it is its
own, then takes it (:meth:`SessionStore.take`). A session written before holders were
recorded is held by nobody (``""``) and goes to the first node that loads.

Implementations: :class:`MemorySessions` (the process's memory: sessions survive their
connection, not a restart) and the stores' (:class:`core.store.sqlite.SQLiteSessions`,
:class:`core.store.postgres.PostgresSessions`).
:func:`make_sessions` picks one for the ``sessions`` setting.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from core.store import Store

log = logging.getLogger("conduit.sessions")


@dataclass(frozen=True, slots=True)
class StoredSession:
    """A session as the store holds it: its state and its messages in sequence order."""

    key: str
    state: bytes
    messages: list[tuple[int, bytes]]


@dataclass(slots=True)
class Batch:
    """The writes of one loop turn. Applied in this order: the sessions deleted (with their
    messages), the sessions put, then the messages put (bytes) or deleted (None)."""

    deleted: set[str] = field(default_factory=set)
    sessions: dict[str, bytes] = field(default_factory=dict)
    messages: dict[tuple[str, int], bytes | None] = field(default_factory=dict)
    # Last: sessions handed to another node (key: the node), if this node still holds them.
    handed: dict[str, str] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.deleted or self.sessions or self.messages or self.handed)


class SessionStore(Protocol):
    """See the module docstring."""

    #: The node whose sessions this store writes: a session put is held by it.
    node: str

    @property
    def pending(self) -> bool:
        """Writes are buffered or being written."""

    async def load(self, every: bool = False) -> list[StoredSession]:
        """The sessions this node holds, and those nobody holds (made this node's), with their
        messages (at start, before any write). ``every``: all of them, whoever held them (one
        node on the store: its id may have changed)."""

    def put_session(self, key: str, state: bytes) -> None:
        """Keep the session's state; this node holds it (unless another node took it)."""

    def delete_session(self, key: str) -> None:
        """Forget the session and its messages (unless another node took it)."""

    def hand_over(self, key: str, node: str) -> None:
        """``node`` holds the session from now on, if this node still does (buffered)."""

    async def holder(self, key: str) -> str | None:
        """The node holding the session (``""``: none), or None when there is no such session.
        Reads what is written: buffered writes of this node are not seen."""

    async def take(self, key: str) -> StoredSession | None:
        """This node holds the session from now on, whoever did; it with its messages, or None
        when there is no such session."""

    def put_message(self, key: str, seq: int, data: bytes) -> None: ...

    def delete_message(self, key: str, seq: int) -> None: ...

    async def flush(self) -> None:
        """Return once every write asked for before this call is durable."""

    async def close(self) -> None:
        """Flush; no writes after this."""


class Buffered:
    """The batching every session store shares; subclasses write a :class:`Batch`."""

    def __init__(self, node: str = "") -> None:
        self.node = node
        self._batch = Batch()
        self._lock = asyncio.Lock()
        self._writing = False
        self._scheduled = False
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def pending(self) -> bool:
        return self._writing or bool(self._batch)

    def put_session(self, key: str, state: bytes) -> None:
        self._batch.sessions[key] = state
        self._batch.handed.pop(key, None)
        self._schedule()

    def delete_session(self, key: str) -> None:
        batch = self._batch
        batch.sessions.pop(key, None)
        batch.handed.pop(key, None)
        for message in [m for m in batch.messages if m[0] == key]:
            del batch.messages[message]
        batch.deleted.add(key)
        self._schedule()

    def put_message(self, key: str, seq: int, data: bytes) -> None:
        self._batch.messages[key, seq] = data
        self._schedule()

    def delete_message(self, key: str, seq: int) -> None:
        self._batch.messages[key, seq] = None
        self._schedule()

    def hand_over(self, key: str, node: str) -> None:
        self._batch.handed[key] = node
        self._schedule()

    def _schedule(self) -> None:
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._turn_ended)

    def _turn_ended(self) -> None:
        self._scheduled = False
        if not self._batch:  # a flush took it already
            return
        task = asyncio.get_running_loop().create_task(self.flush())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def flush(self) -> None:
        async with self._lock:  # a write in progress is durable when this is acquired
            batch, self._batch = self._batch, Batch()
            if not batch:
                return
            self._writing = True
            try:
                await self._write(batch)
            except Exception:
                log.exception(
                    "sessions: could not write %d sessions and %d messages",
                    len(batch.sessions) + len(batch.deleted),
                    len(batch.messages),
                )
            finally:
                self._writing = False

    async def close(self) -> None:
        await self.flush()
        for task in list(self._tasks):
            await task

    async def _write(self, batch: Batch) -> None:
        raise NotImplementedError


class MemorySessions(Buffered):
    """Sessions in this process's memory: they outlive connections, not the process (nor do
    they move to another process: no other node sees them)."""

    def __init__(self, node: str = "") -> None:
        super().__init__(node)
        self._sessions: dict[str, bytes] = {}
        self._holders: dict[str, str] = {}
        self._messages: dict[str, dict[int, bytes]] = {}

    async def load(self, every: bool = False) -> list[StoredSession]:
        for key, holder in self._holders.items():
            if every or not holder:
                self._holders[key] = self.node
        return [self._stored(key) for key in self._sessions if self._holders[key] == self.node]

    def _stored(self, key: str) -> StoredSession:
        messages = sorted(self._messages.get(key, {}).items())
        return StoredSession(key, self._sessions[key], messages)

    async def holder(self, key: str) -> str | None:
        return self._holders.get(key)

    async def take(self, key: str) -> StoredSession | None:
        if key not in self._sessions:
            return None
        self._holders[key] = self.node
        return self._stored(key)

    def _mine(self, key: str) -> bool:
        return self._holders.get(key, "") in ("", self.node)

    async def _write(self, batch: Batch) -> None:
        for key in batch.deleted:
            if self._mine(key):
                self._sessions.pop(key, None)
                self._holders.pop(key, None)
                self._messages.pop(key, None)
        for key, state in batch.sessions.items():
            if self._mine(key):
                self._sessions[key] = state
                self._holders[key] = self.node
        for (key, seq), data in batch.messages.items():
            if data is None:
                self._messages.get(key, {}).pop(seq, None)
            else:
                self._messages.setdefault(key, {})[seq] = data
        for key, node in batch.handed.items():
            if self._holders.get(key) == self.node:
                self._holders[key] = node


def make_sessions(kind: str, store: Store, node: str = "") -> SessionStore:
    """The session store a deployment's ``sessions`` setting names: ``store`` (kept by the
    store, so they survive a restart) or ``memory``; ``node``: this node's id."""
    if kind == "memory":
        return MemorySessions(node)
    if kind == "store":
        return store.sessions(node)
    raise ValueError(f"unknown sessions {kind!r}: 'store' or 'memory'")
