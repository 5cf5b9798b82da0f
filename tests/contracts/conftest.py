"""The backends every contract suite runs against. A backend that needs a server the machine
does not run is skipped with the reason: PostgreSQL is the local one (``tests/postgres.py``),
in a schema of its own per test, dropped after it; the NATS bus runs on the machine's NATS
(127.0.0.1:4222), each test on a subject prefix and a stream of its own, deleted after."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path

import pytest

from core.bus import Bus, make_bus
from core.sessions import SessionStore, make_sessions
from core.store import Store, make_store
from tests import natsserver, postgres

STORES = ["sqlite", "postgres"]
BUSES = ["local", "nats"]
SESSIONS = [*(f"store:{kind}" for kind in STORES), "memory"]


def _store(kind: str, path: Path, schema: str | None) -> Store:
    """A store of ``kind`` on the test's data: its SQLite file, or its PostgreSQL schema.
    Pools stay small: the server's connections are shared with other test runs."""
    return make_store(kind, sqlite_path=path, postgres_dsn=postgres.DSN,
                      postgres_schema=schema or "public", postgres_pool_max=2)  # fmt: skip


@pytest.fixture(params=STORES)
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    async with AsyncExitStack() as stack:
        schema = None
        if request.param == "postgres":
            schema = await stack.enter_async_context(postgres.fresh_schema())
        backend = _store(request.param, tmp_path / "contract.db", schema)
        await backend.open()
        stack.push_async_callback(backend.close)
        yield backend


@pytest.fixture(params=BUSES)
async def bus(request: pytest.FixtureRequest) -> AsyncIterator[Bus]:
    if request.param == "nats":
        if (reason := natsserver.unreachable()) is not None:
            pytest.skip(reason)
        opts = natsserver.options()
        backend = make_bus("nats", nats=opts)
        await backend.start()
        try:
            yield backend
        finally:
            await backend.close()
            await natsserver.delete_stream(opts)
        return
    backend = make_bus(request.param)
    await backend.start()
    try:
        yield backend
    finally:
        await backend.close()


class Sessions:
    """A session store under test, and how to get a new one on the same data (a restart)."""

    def __init__(self, kind: str, path: Path, schema: str | None = None) -> None:
        self.kind = kind
        self.path = path
        self.schema = schema
        self._open: list[tuple[SessionStore, Store]] = []

    async def open(self, node: str = "") -> SessionStore:
        """The memory store keeps nothing across instances: it is the same instance again.
        ``node``: the node the store writes as (a store per node on the same data)."""
        if self.kind == "memory" and self._open:
            return self._open[0][0]
        kind = self.kind.removeprefix("store:").replace("memory", "sqlite")
        store = _store(kind, self.path, self.schema)
        await store.open()
        sessions = make_sessions("memory" if self.kind == "memory" else "store", store, node)
        self._open.append((sessions, store))
        return sessions

    async def close(self) -> None:
        for sessions, store in self._open:
            await sessions.close()
            await store.close()


@pytest.fixture(params=SESSIONS)
async def sessions(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Sessions]:
    async with AsyncExitStack() as stack:
        schema = None
        if request.param == "store:postgres":
            schema = await stack.enter_async_context(postgres.fresh_schema())
        backends = Sessions(request.param, tmp_path / "sessions.db", schema)
        stack.push_async_callback(backends.close)
        yield backends
