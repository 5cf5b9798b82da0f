"""The backends every contract suite runs against. A backend that needs a server the machine
does not run is skipped with the reason (PostgreSQL joins here with its issue). The NATS bus
runs on the machine's NATS (127.0.0.1:4222), each test on a subject prefix and a stream of its
own, deleted after."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from core.bus import Bus, make_bus
from core.sessions import SessionStore, make_sessions
from core.store import Store, make_store
from tests import natsserver

STORES = ["sqlite"]
BUSES = ["local", "nats"]
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
