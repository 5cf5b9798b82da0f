"""The backends every contract suite runs against. A backend that needs a server the machine
does not run is skipped with the reason (PostgreSQL and NATS join here with their issue)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from core.bus import Bus, make_bus
from core.store import Store, make_store

STORES = ["sqlite"]
BUSES = ["local"]


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
