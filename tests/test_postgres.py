"""The PostgreSQL store beyond the contract suite: nodes that start together on an empty
schema, migrations of a database made by an older version, the database going away and
coming back (through a relay the test stops, never the shared server), and the DSN's password
kept out of every message. The store contract suite runs on PostgreSQL too
(tests/contracts)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from core.errors import UnavailableError
from core.store.postgres import MIGRATIONS, PostgresStore, redact_dsn
from core.store.sqlite import MIGRATIONS as SQLITE_MIGRATIONS
from tests import postgres
from tests.test_serve import CONDUIT, Server, start

PASSWORD = "pg-S3cret-never-shown"


async def _version(schema: str) -> int:
    conn = await asyncpg.connect(postgres.DSN)
    try:
        version: int = await conn.fetchval(f'SELECT version FROM "{schema}".schema_version')
        return version
    finally:
        await conn.close()


def test_one_migration_per_sqlite_migration() -> None:
    """A schema version means the same tables in both stores."""
    assert len(MIGRATIONS) == len(SQLITE_MIGRATIONS)


async def test_nodes_starting_at_once_on_an_empty_schema_all_start() -> None:
    async with postgres.fresh_schema() as schema:
        stores = [PostgresStore(postgres.DSN, schema=schema, pool_max=2) for _ in range(4)]
        try:
            await asyncio.gather(*(s.open() for s in stores))
            assert await _version(schema) == len(MIGRATIONS)
            await stores[0].create_domain("acme", {})
            for store in stores:
                assert [d.name for d in await store.list_domains()] == ["acme"]
        finally:
            for store in stores:
                await store.close()


async def test_a_schema_of_an_older_version_is_migrated_with_its_data() -> None:
    """Version 2 had client names that were not unique and retained messages that outlived
    their channel: migrations 3 and 4 fix both, as they do on SQLite."""
    async with postgres.fresh_schema() as schema:
        conn = await asyncpg.connect(postgres.DSN)
        try:
            await conn.execute(f'CREATE SCHEMA "{schema}"; SET search_path TO "{schema}"')
            for script in MIGRATIONS[:2]:
                await conn.execute(script)
            await conn.execute(
                "CREATE TABLE schema_version (version INTEGER NOT NULL);"
                " INSERT INTO schema_version VALUES (2);"
                " INSERT INTO domains (name, created) VALUES ('acme', 1);"
                " INSERT INTO clients (id, domain, name, secret_hash, created) VALUES"
                "  ('aaaaaaaa-1', 'acme', 'lamp', 'h1', 1),"
                "  ('bbbbbbbb-2', 'acme', 'lamp', 'h2', 2);"
                " INSERT INTO channels (id, domain, name, created) VALUES ('c1', 'acme', 't', 1);"
                " INSERT INTO retained VALUES ('acme', 't', 'a', 'x'), ('acme', 'gone', 'a', 'y')"
            )
        finally:
            await conn.close()
        store = PostgresStore(postgres.DSN, schema=schema, pool_max=2)
        await store.open()
        try:
            assert await _version(schema) == len(MIGRATIONS)
            names = {c.id: c.name for c in await store.list_clients("acme")}
            assert names == {"aaaaaaaa-1": "lamp", "bbbbbbbb-2": "lamp (bbbbbbbb)"}
            assert await store.retained("acme", "t") == [b"x"]
            assert await store.retained("acme", "gone") == []
        finally:
            await store.close()


async def test_a_store_opened_again_migrates_nothing(caplog: pytest.LogCaptureFixture) -> None:
    async with postgres.fresh_schema() as schema:
        for _ in range(2):
            store = PostgresStore(postgres.DSN, schema=schema, pool_max=1)
            with caplog.at_level(logging.INFO, "conduit.store"):
                await store.open()
            await store.close()
        migrated = [r for r in caplog.records if "migrated" in r.getMessage()]
        assert len(migrated) == 1


async def test_unreachable_at_start_is_unavailable_and_says_where_without_the_password() -> None:
    await postgres.require()
    relay = postgres.Proxy()
    await relay.start()
    await relay.stop()  # a port nobody listens on now
    store = PostgresStore(relay.dsn(PASSWORD), schema="conduit_never_made", timeout=2)
    with pytest.raises(UnavailableError) as caught:
        await store.open()
    text = str(caught.value)
    assert f"127.0.0.1:{relay.port}" in text and "Connection refused" in text
    assert PASSWORD not in text and ":[redacted]@" in text


async def test_the_database_going_away_and_coming_back(caplog: pytest.LogCaptureFixture) -> None:
    """Every call is UnavailableError while the database cannot be reached (the error the
    gateway answers 503 / 0x88 / 5.03 with), and the pool connects again by itself."""
    async with postgres.fresh_schema() as schema:
        relay = postgres.Proxy()
        await relay.start()
        store = PostgresStore(relay.dsn(PASSWORD), schema=schema, pool_max=2, timeout=2)
        await store.open()
        sessions = store.sessions()
        try:
            await store.create_domain("acme", {})
            await relay.stop()
            with caplog.at_level(logging.INFO, "conduit.store"):
                for call in (store.ping(), store.list_domains(), store.get_domain("acme"),
                             store.create_domain("beta", {}), sessions.load()):  # fmt: skip
                    with pytest.raises(UnavailableError) as caught:
                        await call
                    assert "PostgreSQL" in str(caught.value)
                    assert PASSWORD not in str(caught.value)
                await relay.start()
                await store.ping()
                assert [d.name for d in await store.list_domains()] == ["acme"]
            logged = [r.getMessage() for r in caplog.records]
            assert sum("is unavailable" in line for line in logged) == 1  # once, not per call
            assert any("answers again" in line for line in logged)
            assert not any(PASSWORD in line for line in logged)
        finally:
            await sessions.close()
            await store.close()
            await relay.stop()


async def test_a_database_gone_silent_is_unavailable_after_the_timeout() -> None:
    """No refusal, no answer (a network that drops everything): a statement gives up after
    ``timeout``, and the store serves again once answers come."""
    async with postgres.fresh_schema() as schema:
        relay = postgres.Proxy()
        await relay.start()
        store = PostgresStore(relay.dsn(), schema=schema, pool_min=1, pool_max=2, timeout=1)
        await store.open()
        try:
            relay.flowing.clear()
            started = time.monotonic()
            with pytest.raises(UnavailableError, match="timed out"):
                await store.list_domains()
            assert time.monotonic() - started < 5
            relay.flowing.set()
            for _ in range(50):  # the connection that timed out is replaced
                try:
                    await store.ping()
                    break
                except UnavailableError:
                    await asyncio.sleep(0.1)
            assert await store.list_domains() == []
        finally:
            await store.close()
            await relay.stop()


def test_redact_dsn() -> None:
    assert redact_dsn("postgresql://u:p@ss@h:5432/db") == "postgresql://u:[redacted]@h:5432/db"
    assert redact_dsn("postgres://u@h/db?password=x&sslmode=require") == (
        "postgres://u@h/db?password=[redacted]&sslmode=require"
    )
    assert redact_dsn("postgresql://h1:5432,h2:5433/db") == "postgresql://h1:5432,h2:5433/db"
    assert redact_dsn("host=h password=x") == "(not a URL)"


def test_settings_refuse_a_bad_schema_and_never_echo_the_dsn() -> None:
    from pydantic import ValidationError

    from conduit.settings import Settings

    dsn = f"postgresql://u:{PASSWORD}@h/db"
    with pytest.raises(ValidationError) as caught:
        Settings.load(store="postgres", postgres_dsn=dsn, postgres_schema="bad-name")
    assert "postgres_schema" in str(caught.value) and PASSWORD not in str(caught.value)
    with pytest.raises(ValidationError) as caught:  # a refusal of the whole: no input shown
        Settings.load(store="postgres", postgres_dsn=dsn, broker_token_ttl=10**9)
    assert "broker_token_ttl" in str(caught.value) and PASSWORD not in str(caught.value)
    with pytest.raises(ValidationError, match="needs postgres_dsn"):
        Settings.load(store="postgres")
    settings = Settings.load(store="postgres", postgres_dsn=dsn)
    assert PASSWORD not in repr(settings) and PASSWORD not in str(settings.model_dump())


class RelayThread:
    """A :class:`tests.postgres.Proxy` on a loop of its own, for tests that are not async."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.proxy = postgres.Proxy()

    def _run(self, coro: Coroutine[Any, Any, None]) -> None:
        asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    def start(self) -> None:
        self._run(self.proxy.start())

    def stop(self) -> None:
        self._run(self.proxy.stop())

    def close(self) -> None:
        self.stop()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@pytest.fixture
def schema() -> Iterator[str]:
    """A schema of its own for a test that runs servers (made by them, dropped after)."""
    asyncio.run(postgres.require())
    name = f"conduit_test_{secrets.token_hex(6)}"
    yield name
    asyncio.run(postgres.drop(name))


def _health(port: int) -> tuple[int, dict[str, str]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


async def _publish(port: int, secret: str, body: bytes = b'[{"n":"t","v":21}]') -> int:
    async with aiohttp.ClientSession() as s:
        r = await s.post(
            f"http://127.0.0.1:{port}/m/acme/c/temps/kitchen", data=body,
            headers={"Content-Type": "application/senml+json",
                     "Authorization": f"Client {secret}"},
        )  # fmt: skip
        return r.status


@pytest.mark.timeout(180)
def test_serve_on_postgres(tmp_path: Path, schema: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two `conduit serve` nodes on one schema: what the CLI provisions through one, the other
    serves; a publish over HTTP reaches an SSE subscriber. The database away: /health says so
    (503) and a publish that needs the store is refused with 503; back: both serve again. The
    DSN's password appears in no output, no log, no health answer."""
    relay = RelayThread()
    relay.start()
    dsn = relay.proxy.dsn(PASSWORD)
    # Nodes of one gateway share the master key: each opens the signing keys the other made.
    monkeypatch.setenv("CONDUIT_ENCRYPTION_KEY", secrets.token_hex(32))
    monkeypatch.setenv("CONDUIT_POSTGRES_DSN", dsn)  # node a: from the environment
    nodes = []
    try:
        a = start(tmp_path / "a", "--store", "postgres", "--postgres-schema", schema,
                  "--postgres-pool-max", "3")  # fmt: skip
        nodes.append(a)
        monkeypatch.delenv("CONDUIT_POSTGRES_DSN")
        b = start(tmp_path / "b", "--store", "postgres", "--postgres-dsn", dsn,
                  "--postgres-schema", schema, "--postgres-pool-max", "3")  # fmt: skip
        nodes.append(b)

        a.cli("domains", "create", "acme")
        dev = a.cli_json("clients", "create", "--domain", "acme", "sensor-1")
        app = a.cli_json("clients", "create", "--domain", "acme", "dashboard")
        a.cli("channels", "create", "--domain", "acme", "temps")
        a.cli("connect", "--domain", "acme", "--client", "sensor-1", "--channel", "temps",
              "--publish")  # fmt: skip
        a.cli("connect", "--domain", "acme", "--client", "dashboard", "--channel", "temps",
              "--subscribe")  # fmt: skip
        assert [d["name"] for d in b.cli_json("domains", "list")] == ["acme"]  # type: ignore[union-attr, index]
        assert _health(a.ports["http"]) == (200, {"store": "ok", "bus": "ok", "status": "ok"})

        async def flow(node: Server) -> str:
            base = f"http://127.0.0.1:{node.ports['http']}"
            async with aiohttp.ClientSession() as s:
                sse = await s.get(
                    f"{base}/m/acme/c/temps/%23",
                    headers={
                        "Accept": "text/event-stream",
                        "Authorization": f"Client {app['secret']}",
                    },
                )  # type: ignore[index]
                await sse.content.readline()
                assert await _publish(node.ports["http"], dev["secret"]) == 202  # type: ignore[index]
                while not (line := (await asyncio.wait_for(sse.content.readline(), 5))).strip():
                    pass
                while not (line := (await asyncio.wait_for(sse.content.readline(), 5))).strip():
                    pass
                sse.close()
                return line.decode()

        for node in (a, b):  # b knows the clients a made: they are in the shared store
            assert json.loads(asyncio.run(flow(node))[6:])["subtopic"] == "kitchen"

        relay.stop()  # PostgreSQL away
        status, health = _health(a.ports["http"])
        assert status == 503 and health["status"] == "unavailable"
        assert health["store"].startswith("unavailable: store: PostgreSQL")
        assert health["bus"] == "ok"
        assert asyncio.run(_publish(b.ports["http"], "not-a-known-secret")) == 503
        assert _health(b.ports["api"])[0] == 503

        relay.start()  # back: service resumes by itself
        for _ in range(50):
            if _health(a.ports["http"])[0] == 200 and _health(b.ports["http"])[0] == 200:
                break
            time.sleep(0.1)
        assert _health(a.ports["http"])[0] == 200
        assert asyncio.run(_publish(b.ports["http"], dev["secret"])) == 202  # type: ignore[index]
        assert asyncio.run(_publish(b.ports["http"], "not-a-known-secret")) == 401
    finally:
        outputs = []
        for node in nodes:
            node.proc.send_signal(signal.SIGTERM)
            out, err = node.proc.communicate(timeout=30)
            outputs.append(out + err)
        relay.close()
    for log in outputs:
        assert PASSWORD not in log
        assert (
            f"store: PostgreSQL at postgresql://postgres:[redacted]@127.0.0.1:{relay.proxy.port}"
            in log
        )
    assert any("is unavailable" in log for log in outputs)


def test_serve_stops_with_a_clear_error_when_postgres_cannot_be_reached(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    env = {**os.environ, "CONDUIT_DATA_DIR": str(tmp_path)}
    env.pop("CONDUIT_ADMIN_KEY", None)
    r = subprocess.run(
        [*CONDUIT, "serve", "--store", "postgres", "--api-port", "0",
         "--postgres-dsn", f"postgresql://conduit:{PASSWORD}@127.0.0.1:{free}/test"],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1] == (
        "Error: the store cannot be opened: PostgreSQL at"
        f" postgresql://conduit:[redacted]@127.0.0.1:{free}/test (schema public):"
        " Connection refused"
    )
    assert PASSWORD not in r.stdout + r.stderr
