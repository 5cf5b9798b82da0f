"""Shared fixtures: a real gateway on a real SQLite file, provisioned with a domain, a channel
and clients with each kind of right; adapters on ephemeral ports (never a fixed one)."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pytest

from adapters.http import HTTPAdapter
from conduit.app import Adapter
from core.auth import store_auth
from core.bus import Subscription
from core.bus.local import LocalBus
from core.credentials import Credentials
from core.gateway import Gateway
from core.limits import Limits
from core.message import Message
from core.sealing import master_key
from core.signing import Keyring
from core.store.sqlite import SQLiteStore
from core.tokens import Tokens
from core.users import Users


@dataclass
class Party:
    id: str
    secret: str


@dataclass
class World:
    """What the `world` fixture provisioned: domain `acme`, channel `temps` (and `other`)."""

    gateway: Gateway
    domain: str
    channel: str
    publisher: Party  # may publish on temps
    subscriber: Party  # may subscribe on temps
    both: Party  # may do both on temps
    stranger: Party  # no connection at all

    @property
    def topic(self) -> str:
        return f"m/{self.domain}/c/{self.channel}"


async def make_gateway(tmp_path: Path, limits: Limits | None = None) -> Gateway:
    store = SQLiteStore(tmp_path / "conduit.db")
    sealing = master_key(tmp_path, None)
    tokens = Tokens(Keyring(store, sealing), "conduit")
    gateway = Gateway(
        store,
        LocalBus(),
        *store_auth(store, tokens=tokens),
        limits=limits,
        tokens=tokens,
        sealing=sealing,
        users=Users(store, tokens),
    )
    await gateway.start()
    return gateway


async def provision(gateway: Gateway) -> World:
    prov = gateway.provisioning
    await prov.create_domain("acme")
    await prov.create_channel("acme", "temps")
    await prov.create_channel("acme", "other")
    parties = {}
    for name, pub, sub in (
        ("publisher", True, False),
        ("subscriber", False, True),
        ("both", True, True),
        ("stranger", False, False),
    ):
        client, secret = await prov.create_client("acme", name)
        if pub or sub:
            await prov.connect("acme", client.id, "temps", pub, sub)
        parties[name] = Party(client.id, secret)
    return World(gateway, "acme", "temps", **parties)


@pytest.fixture
def limits() -> Limits:
    """Override in a test module to run the gateway with other limits."""
    return Limits()


@pytest.fixture
async def world(tmp_path: Path, limits: Limits) -> AsyncIterator[World]:
    gateway = await make_gateway(tmp_path, limits)
    try:
        yield await provision(gateway)
    finally:
        await gateway.close()


@pytest.fixture
async def watch(world: World) -> AsyncIterator[Subscription]:
    """A subscriber on the whole channel, outside any adapter: what it sees was published."""
    ident = await world.gateway.authenticate(Credentials(world.subscriber.secret))
    sub = await world.gateway.subscribe(ident, "m/acme/c/temps/#", "http")
    yield sub
    await world.gateway.unsubscribe(sub)


def drain(sub: Subscription) -> list[Message]:
    """Everything a watcher holds now."""
    out = []
    while (msg := sub.get_nowait()) is not None:
        out.append(msg)
    return out


A = TypeVar("A", bound=Adapter)


@contextlib.asynccontextmanager
async def running(adapter: A) -> AsyncIterator[A]:
    """An adapter started for a test, stopped after it (in-flight work gets 2 s)."""
    await adapter.start()
    try:
        yield adapter
    finally:
        await adapter.stop(timeout=2)


@pytest.fixture
async def http(world: World) -> AsyncIterator[str]:
    """The HTTP adapter on an ephemeral port; yields its base URL."""
    async with running(HTTPAdapter(world.gateway, "127.0.0.1", 0)) as adapter:
        yield f"http://127.0.0.1:{adapter.port}"


def require_command(name: str, debian_package: str) -> str:
    """The path of a command-line client a test needs. When it is missing and we are root,
    installs its Debian package (refreshing the package lists once if the first try fails);
    otherwise skips the test saying why, never silently."""
    path = shutil.which(name)
    if path:
        return path
    if os.geteuid() != 0:
        pytest.skip(f"{name} (Debian {debian_package}) is not installed and we are not root")
    install = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", debian_package]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        if subprocess.run(install, capture_output=True, timeout=600, env=env).returncode:
            subprocess.run(["apt-get", "update", "-qq"], capture_output=True, timeout=300, env=env)
            subprocess.run(install, check=True, capture_output=True, timeout=600, env=env)
    except (OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f"{name} (Debian {debian_package}) is not installed and could not be: {exc}")
    path = shutil.which(name)
    if not path:
        pytest.skip(f"{name} not found after installing Debian {debian_package}")
    return path


@pytest.fixture
def certificate(tmp_path: Path) -> tuple[Path, Path]:
    """A self-signed server certificate for 127.0.0.1 and localhost: (key, cert)."""
    openssl = require_command("openssl", "openssl")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-nodes", "-days", "1", "-subj", "/CN=localhost", "-addext",
         "subjectAltName=IP:127.0.0.1,DNS:localhost", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=30,
    )  # fmt: skip
    return key, cert
