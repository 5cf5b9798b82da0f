"""The local PostgreSQL the tests use: 127.0.0.1:5432, database ``test``, trust authentication
(``CONDUIT_TEST_POSTGRES_DSN`` names another). Each test gets a schema of its own
(``conduit_test_<random>``), dropped after it; the server itself is never touched otherwise.
When it cannot be reached the test is skipped, saying why."""

from __future__ import annotations

import asyncio
import os
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from urllib.parse import urlsplit

import asyncpg
import pytest

DSN = os.environ.get("CONDUIT_TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test")
_url = urlsplit(DSN)
WHERE = f"{_url.hostname}:{_url.port or 5432}"

_reachable: str | None = None  # "" once reached; the reason it was not, otherwise


async def _check() -> str:
    try:
        conn = await asyncpg.connect(DSN, timeout=3)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    await conn.close()
    return ""


async def require() -> None:
    """Skip the test unless the PostgreSQL of the tests answers (asked once per run)."""
    global _reachable
    if _reachable is None:
        _reachable = await _check()
    if _reachable:
        pytest.skip(f"PostgreSQL at {WHERE} is not reachable: {_reachable}")


async def drop(schema: str) -> None:
    conn = await asyncpg.connect(DSN, timeout=10)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


@asynccontextmanager
async def fresh_schema() -> AsyncIterator[str]:
    """A schema name nobody uses (not made: the store makes it), dropped afterwards."""
    await require()
    schema = f"conduit_test_{secrets.token_hex(6)}"
    try:
        yield schema
    finally:
        await asyncio.shield(drop(schema))


def with_password(dsn: str, password: str) -> str:
    """``dsn`` with a password in it (trust authentication lets any through)."""
    scheme, rest = dsn.split("://", 1)
    user, host = rest.split("@", 1) if "@" in rest else (os.environ.get("USER", "postgres"), rest)
    return f"{scheme}://{user.split(':', 1)[0]}:{password}@{host}"
