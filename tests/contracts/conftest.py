"""The backends every contract suite runs against. A backend that needs a server the machine
does not run is skipped with the reason (PostgreSQL and NATS join here with their issue)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from core.bus import Bus, make_bus
from core.sessions import SessionStore, make_sessions
from core.store import Store, make_store

STORES = ["sqlite"]
BUSES = ["local"]
SESSIONS = [*(f"store:{kind}" for kind in STORES), "memory"]


@pytest.fixture(params=STORES)
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    backend = make_store(request.param, sqlite_path=tmp_path / "contract.db")
    await backend.open()
    try:
        yield backend
    finally:
        await backend.close()


@pytest.fixture(params=BUSES)
async def bus(request: pytest.FixtureRequest) -> AsyncIterator[Bus]:
    backend = make_bus(request.param)
    await backend.start()
    try:
        yield backend
    finally:
        await backend.close()


class Sessions:
    """A session store under test, and how to get a new one on the same data (a restart)."""

    def __init__(self, kind: str, path: Path) -> None:
        self.kind = kind
        self.path = path
        self._open: list[tuple[SessionStore, Store]] = []

    async def open(self) -> SessionStore:
        """The memory store keeps nothing across instances: it is the same instance again."""
        if self.kind == "memory" and self._open:
            return self._open[0][0]
        store = make_store(self.kind.removeprefix("store:").replace("memory", "sqlite"),
                           sqlite_path=self.path)  # fmt: skip
        await store.open()
        sessions = make_sessions("memory" if self.kind == "memory" else "store", store)
        self._open.append((sessions, store))
        return sessions

    async def close(self) -> None:
        for sessions, store in self._open:
            await sessions.close()
            await store.close()


@pytest.fixture(params=SESSIONS)
async def sessions(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Sessions]:
    backends = Sessions(request.param, tmp_path / "sessions.db")
    try:
        yield backends
    finally:
        await backends.close()
