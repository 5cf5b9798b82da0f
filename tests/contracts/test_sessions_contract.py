"""What every session store must do (core.sessions.SessionStore): keep sessions and their
messages as bytes, in order, batch the writes of a loop turn, and make them durable by the time
``flush`` returns. A durable store gives back what it kept on a new instance (a restart); the
memory store is checked on the same instance."""

from __future__ import annotations

import asyncio

import pytest

from core.sessions import StoredSession
from tests.contracts.conftest import Sessions


async def test_empty_at_first(sessions: Sessions) -> None:
    store = await sessions.open()
    assert await store.load() == []
    assert not store.pending


async def test_sessions_and_messages_are_kept_in_order(sessions: Sessions) -> None:
    store = await sessions.open()
    await store.load()
    store.put_session("a", b"state a")
    store.put_session("b", b"state b")
    for seq in (3, 1, 2):
        store.put_message("a", seq, f"m{seq}".encode())
    store.put_message("b", 1, b"b1")
    assert store.pending
    await store.flush()
    assert not store.pending
    again = await sessions.open()
    loaded = sorted(await again.load(), key=lambda s: s.key)
    assert loaded == [
        StoredSession("a", b"state a", [(1, b"m1"), (2, b"m2"), (3, b"m3")]),
        StoredSession("b", b"state b", [(1, b"b1")]),
    ]


async def test_writes_of_a_turn_are_written_without_flush(sessions: Sessions) -> None:
    """Nobody calls flush: the end of the loop turn writes the batch."""
    store = await sessions.open()
    await store.load()
    store.put_session("a", b"s")
    store.put_message("a", 1, b"m")
    for _ in range(100):
        await asyncio.sleep(0.01)
        if not store.pending:
            break
    assert not store.pending
    assert await (await sessions.open()).load() == [StoredSession("a", b"s", [(1, b"m")])]


async def test_later_writes_replace_earlier_ones(sessions: Sessions) -> None:
    store = await sessions.open()
    await store.load()
    store.put_session("a", b"v1")
    store.put_message("a", 1, b"queued")
    store.put_message("a", 2, b"gone")
    await store.flush()
    store.put_session("a", b"v2")
    store.put_message("a", 1, b"in flight")
    store.delete_message("a", 2)
    store.put_message("a", 3, b"acknowledged at once")
    store.delete_message("a", 3)  # same batch: never written
    await store.flush()
    assert await (await sessions.open()).load() == [StoredSession("a", b"v2", [(1, b"in flight")])]


async def test_deleting_a_session_deletes_its_messages(sessions: Sessions) -> None:
    store = await sessions.open()
    await store.load()
    store.put_session("a", b"s")
    store.put_message("a", 1, b"m")
    store.put_session("b", b"t")
    store.put_message("b", 1, b"n")
    await store.flush()
    store.put_message("a", 2, b"pending when deleted")
    store.delete_session("a")
    await store.flush()
    assert await (await sessions.open()).load() == [StoredSession("b", b"t", [(1, b"n")])]


async def test_a_session_made_again_after_its_delete_in_one_batch(sessions: Sessions) -> None:
    """Clean start: the old session and its messages go, the new one stays."""
    store = await sessions.open()
    await store.load()
    store.put_session("a", b"old")
    store.put_message("a", 1, b"old message")
    await store.flush()
    store.delete_session("a")
    store.put_session("a", b"new")
    store.put_message("a", 1, b"new message")
    await store.flush()
    assert await (await sessions.open()).load() == [
        StoredSession("a", b"new", [(1, b"new message")])
    ]


async def test_flush_waits_for_a_write_in_progress(sessions: Sessions) -> None:
    """What a batch already being written holds is durable when a later flush returns."""
    store = await sessions.open()
    await store.load()
    store.put_session("a", b"s")
    first = asyncio.ensure_future(store.flush())
    await asyncio.sleep(0)  # the first batch is being written
    store.put_message("a", 1, b"m")
    await store.flush()
    await first
    assert await (await sessions.open()).load() == [StoredSession("a", b"s", [(1, b"m")])]


async def test_close_flushes(sessions: Sessions) -> None:
    store = await sessions.open()
    await store.load()
    store.put_session("a", b"s")
    await store.close()
    assert await (await sessions.open()).load() == [StoredSession("a", b"s", [])]


async def test_an_in_memory_database_keeps_sessions_in_memory() -> None:
    """``sqlite_path = ":memory:"``: sessions work, and last as long as the process."""
    from core.store.sqlite import SQLiteStore

    store = SQLiteStore(":memory:")
    await store.open()
    try:
        sessions = store.sessions()
        assert await sessions.load() == []
        sessions.put_session("a", b"s")
        await sessions.flush()
        assert await sessions.load() == [StoredSession("a", b"s", [])]
    finally:
        await store.close()


# ---------------------------------------------------------------------------------------------
# holders: several nodes on one store (the memory store is one process's: it has no other node)


def shared(sessions: Sessions) -> None:
    if sessions.kind == "memory":
        pytest.skip("memory sessions are one process's: no other node sees them")


async def test_a_node_loads_what_it_holds_and_what_nobody_holds(sessions: Sessions) -> None:
    shared(sessions)
    legacy = await sessions.open()  # written as nobody: before holders were recorded
    await legacy.load()
    legacy.put_session("old", b"o")
    await legacy.flush()
    a = await sessions.open("a")
    assert await a.load() == [StoredSession("old", b"o", [])]  # a takes it
    a.put_session("x", b"ax")
    a.put_message("x", 1, b"m")
    await a.flush()
    b = await sessions.open("b")
    assert await b.load() == []
    b.put_session("y", b"by")
    await b.flush()
    assert await b.holder("x") == "a" and await b.holder("y") == "b"
    assert await b.holder("none") is None
    again = await sessions.open("a")  # a restarts with the same id: its own come back
    loaded = sorted(await again.load(), key=lambda s: s.key)
    assert loaded == [StoredSession("old", b"o", []), StoredSession("x", b"ax", [(1, b"m")])]


async def test_load_every_takes_all(sessions: Sessions) -> None:
    """One node on the store, whose id changed: everything is its."""
    shared(sessions)
    a = await sessions.open("a")
    await a.load()
    a.put_session("x", b"s")
    await a.flush()
    c = await sessions.open("c")
    assert await c.load(every=True) == [StoredSession("x", b"s", [])]
    assert await c.holder("x") == "c"


async def test_hand_over_then_take(sessions: Sessions) -> None:
    shared(sessions)
    a = await sessions.open("a")
    b = await sessions.open("b")
    await a.load()
    await b.load()
    a.put_session("x", b"v1")
    a.put_message("x", 1, b"m1")
    await a.flush()
    a.put_session("x", b"v2")  # its last state and the hand-over go in one batch
    a.hand_over("x", "b")
    await a.flush()
    assert await b.holder("x") == "b"
    assert await b.take("x") == StoredSession("x", b"v2", [(1, b"m1")])
    assert await b.take("none") is None


async def test_a_node_cannot_write_or_delete_a_session_taken_from_it(sessions: Sessions) -> None:
    """Its holder presumed dead, another node took it: late writes of the old holder are lost."""
    shared(sessions)
    a = await sessions.open("a")
    b = await sessions.open("b")
    await a.load()
    await b.load()
    a.put_session("x", b"a's")
    await a.flush()
    assert await b.take("x") == StoredSession("x", b"a's", [])
    a.put_session("x", b"late")
    await a.flush()
    a.delete_session("x")
    a.hand_over("x", "c")
    await a.flush()
    assert await b.holder("x") == "b"
    assert await b.take("x") == StoredSession("x", b"a's", [])
    b.delete_session("x")
    await b.flush()
    assert await a.holder("x") is None
