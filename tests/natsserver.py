"""NATS for the tests: the machine's shared server (127.0.0.1:4222, JetStream on), each test on
a subject prefix and a stream of its own (deleted after), or a server a test starts itself on
a free port (to stop and start again: the shared one is never stopped)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import secrets
import shutil
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path

import nats

from core.bus.nats import NatsBus, NatsOptions

SHARED_HOST, SHARED_PORT = "127.0.0.1", 4222
SHARED = f"nats://{SHARED_HOST}:{SHARED_PORT}"
NATS_SERVER = shutil.which("nats-server") or "/usr/sbin/nats-server"


def unreachable(host: str = SHARED_HOST, port: int = SHARED_PORT) -> str | None:
    """Why the tests cannot use the NATS server at host:port, or None when they can."""
    try:
        with socket.create_connection((host, port), timeout=0.5):
            pass
    except OSError as exc:
        return f"NATS not reachable at {host}:{port} ({exc}): start nats-server -js"
    return None


def options(url: str = SHARED, **changes: object) -> NatsOptions:
    """Options of a deployment of its own: a fresh subject prefix and stream, small limits."""
    tag = secrets.token_hex(4)
    base = NatsOptions(
        url=url,
        prefix=f"t{tag}",
        stream=f"conduit-test-{tag}",
        stream_max_bytes=8 * 1024 * 1024,
        connect_timeout=5.0,
        reconnect_wait=0.2,
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


async def delete_stream(opts: NatsOptions) -> None:
    nc = await nats.connect(opts.servers, allow_reconnect=False, connect_timeout=2)
    try:
        with contextlib.suppress(Exception):
            await nc.jsm().delete_stream(opts.stream)
    finally:
        await nc.close()


@contextlib.asynccontextmanager
async def nodes(opts: NatsOptions, n: int) -> AsyncIterator[list[NatsBus]]:
    """``n`` started buses on the same NATS and prefix (``n`` nodes of one deployment), closed
    and their stream deleted after."""
    buses: list[NatsBus] = []
    try:
        for _ in range(n):
            bus = NatsBus(opts)
            await bus.start()
            buses.append(bus)
        yield buses
    finally:
        for bus in buses:
            await bus.close()
        await delete_stream(opts)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class OwnServer:
    """A nats-server with JetStream, on a free port and a store directory of its own."""

    def __init__(self, store: Path) -> None:
        self.store = store
        self.port = free_port()
        self.process: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self.process = await asyncio.create_subprocess_exec(
            NATS_SERVER,
            *("-a", "127.0.0.1", "-p", str(self.port), "-js", "-sd", str(self.store)),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while unreachable("127.0.0.1", self.port) is not None:
            if self.process.returncode is not None:
                raise RuntimeError(f"nats-server exited with {self.process.returncode}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"nats-server did not listen on {self.port}")
            await asyncio.sleep(0.05)

    async def stop(self) -> None:
        process = self.process
        if process is None:
            return
        self.process = None
        process.terminate()
        try:
            await asyncio.wait_for(process.wait(), 10)
        except TimeoutError:
            process.kill()
            await process.wait()
