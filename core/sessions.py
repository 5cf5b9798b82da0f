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

    def __bool__(self) -> bool:
        return bool(self.deleted or self.sessions or self.messages)


class SessionStore(Protocol):
    """See the module docstring."""

    @property
    def pending(self) -> bool:
        """Writes are buffered or being written."""

    async def load(self) -> list[StoredSession]:
        """Every session kept, with its messages (at start, before any write)."""

    def put_session(self, key: str, state: bytes) -> None: ...

    def delete_session(self, key: str) -> None:
        """Forget the session and its messages."""

    def put_message(self, key: str, seq: int, data: bytes) -> None: ...

    def delete_message(self, key: str, seq: int) -> None: ...

    async def flush(self) -> None:
        """Return once every write asked for before this call is durable."""

    async def close(self) -> None:
        """Flush; no writes after this."""


class Buffered:
    """The batching every session store shares; subclasses write a :class:`Batch`."""

    def __init__(self) -> None:
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
        self._schedule()

    def delete_session(self, key: str) -> None:
        batch = self._batch
        batch.sessions.pop(key, None)
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
    """Sessions in this process's memory: they outlive connections, not the process."""

    def __init__(self) -> None:
        super().__init__()
        self._sessions: dict[str, bytes] = {}
        self._messages: dict[str, dict[int, bytes]] = {}

    async def load(self) -> list[StoredSession]:
        return [
            StoredSession(key, state, sorted(self._messages.get(key, {}).items()))
            for key, state in self._sessions.items()
        ]

    async def _write(self, batch: Batch) -> None:
        for key in batch.deleted:
            self._sessions.pop(key, None)
            self._messages.pop(key, None)
        self._sessions.update(batch.sessions)
        for (key, seq), data in batch.messages.items():
            if data is None:
                self._messages.get(key, {}).pop(seq, None)
            else:
                self._messages.setdefault(key, {})[seq] = data


def make_sessions(kind: str, store: Store) -> SessionStore:
    """The session store a deployment's ``sessions`` setting names: ``store`` (kept by the
    store, so they survive a restart) or ``memory``."""
    if kind == "memory":
        return MemorySessions()
    if kind == "store":
        return store.sessions()
    raise ValueError(f"unknown sessions {kind!r}: 'store' or 'memory'")
