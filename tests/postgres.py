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


class Proxy:
    """A TCP relay to the PostgreSQL of the tests on a port of its own: stopping it makes the
    database unreachable for whoever connects through it (open connections are cut), without
    touching the server, which other runs share. Started again, on the same port."""

    def __init__(self) -> None:
        url = urlsplit(DSN)
        self.target = (url.hostname or "127.0.0.1", url.port or 5432)
        self.port = 0
        self._server: asyncio.Server | None = None
        self._open: set[asyncio.StreamWriter] = set()
        self.flowing = asyncio.Event()  # cleared: bytes are held, as by a network gone silent
        self.flowing.set()

    def dsn(self, password: str | None = None) -> str:
        """The tests' DSN through this relay, with ``password`` in it when given."""
        url = urlsplit(DSN)
        user = url.username or os.environ.get("USER", "postgres")
        auth = f"{user}:{password}" if password else user
        return f"{url.scheme}://{auth}@127.0.0.1:{self.port}{url.path}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for writer in list(self._open):
                writer.transport.abort()
            await self._server.wait_closed()
            self._server = None

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self._open |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    await self.flowing.wait()
                    dst.write(data)
                    await dst.drain()
            except (OSError, asyncio.IncompleteReadError):
                pass
            finally:
                dst.transport.abort()

        try:
            await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        finally:
            self._open -= {writer, up_writer}
