"""Credentials, the authenticator's cache and its invalidation, provisioning rules."""

from __future__ import annotations

import asyncio
import base64
from pathlib import Path

import pytest

from core.bus import Change
from core.credentials import Credentials, from_authorization
from core.errors import AuthenticationError, AuthorizationError, Condition, SenMLError
from core.provisioning import InvalidRequest, PreSharedKey, Provisioning
from core.sealing import SealingKey
from core.store import Conflict, NotFound
from tests.conftest import World


def test_authorization_forms() -> None:
    assert from_authorization("Client s3cret") == Credentials("s3cret")
    assert from_authorization("client  s3cret ") == Credentials("s3cret")
    basic = base64.b64encode(b"id-1:s3cret").decode()
    assert from_authorization(f"Basic {basic}") == Credentials("s3cret", "id-1")
    assert from_authorization("s3cret") == Credentials("s3cret")


@pytest.mark.parametrize(
    ("value", "condition", "text"),
    [
        (None, Condition.NO_CREDENTIALS, "no credentials"),
        ("", Condition.NO_CREDENTIALS, "no credentials"),
        ("Client ", Condition.NO_CREDENTIALS, "empty client secret"),
        ("Basic !!!", Condition.BAD_CREDENTIALS, "malformed Basic"),
        ("Basic " + base64.b64encode(b"nocolon").decode(), Condition.BAD_CREDENTIALS,
         "client_id:secret"),
        ("Digest x=y", Condition.BAD_CREDENTIALS, "unknown authorization scheme"),
        # a secret sent where the scheme goes is not repeated in the refusal (nor in the log)
        ("Sup3rSecretValue x", Condition.BAD_CREDENTIALS, "unknown authorization scheme"),
        # bytes that were not UTF-8 reach here as surrogates; other non-ASCII text too
        ("Client \udcff\udcfeabc", Condition.BAD_CREDENTIALS, "credentials must be ASCII"),
        ("Client caf\u00e9", Condition.BAD_CREDENTIALS, "credentials must be ASCII"),
        ("Basic \udcff", Condition.BAD_CREDENTIALS, "credentials must be ASCII"),
    ],
)
def test_authorization_refusals(value: str | None, condition: Condition, text: str) -> None:
    with pytest.raises(AuthenticationError, match=text) as err:
        from_authorization(value)
    assert err.value.condition is condition
    assert "Sup3rSecretValue" not in err.value.detail


async def test_secret_authenticates_and_secret_is_only_hashed(world: World) -> None:
    gw = world.gateway
    ident = await gw.authenticate(Credentials(world.publisher.secret))
    assert (ident.client_id, ident.domain, ident.name) == (world.publisher.id, "acme", "publisher")
    with pytest.raises(AuthenticationError):
        await gw.authenticate(Credentials("wrong"))
    with pytest.raises(AuthenticationError, match="does not match"):
        await gw.authenticate(Credentials(world.publisher.secret, world.both.id))
    # The secret is nowhere in the database file.
    store_path = gw.store.path  # type: ignore[attr-defined]
    data = await asyncio.to_thread(Path(store_path).read_bytes)
    assert world.publisher.secret.encode() not in data


async def test_rights_follow_connections(world: World) -> None:
    gw = world.gateway
    pub = await gw.authenticate(Credentials(world.publisher.secret))
    await gw.authorize(pub, "m/acme/c/temps", "publish")
    with pytest.raises(AuthorizationError):
        await gw.authorize(pub, "m/acme/c/temps", "subscribe")
    with pytest.raises(AuthorizationError):
        await gw.authorize(pub, "m/acme/c/other", "publish")
    with pytest.raises(AuthorizationError, match="not in domain"):
        await gw.authorize(pub, "m/beta/c/temps", "publish")


async def test_changes_through_provisioning_take_effect_at_once(world: World) -> None:
    gw = world.gateway
    prov = gw.provisioning
    ident = await gw.authenticate(Credentials(world.publisher.secret))
    await gw.authorize(ident, "m/acme/c/temps", "publish")  # now cached
    await prov.disconnect("acme", world.publisher.id, "temps")
    with pytest.raises(AuthorizationError):
        await gw.authorize(ident, "m/acme/c/temps", "publish")
    await prov.connect("acme", world.publisher.id, "temps", True, False)
    await gw.authorize(ident, "m/acme/c/temps", "publish")
    await prov.set_client_enabled("acme", world.publisher.id, False)
    with pytest.raises(AuthenticationError):
        await gw.authenticate(Credentials(world.publisher.secret))
    with pytest.raises(AuthorizationError):  # an open connection loses its rights too
        await gw.authorize(ident, "m/acme/c/temps", "publish")
    await prov.set_client_enabled("acme", world.publisher.id, True)
    _, new_secret = await prov.rotate_secret("acme", world.publisher.id)
    with pytest.raises(AuthenticationError):
        await gw.authenticate(Credentials(world.publisher.secret))
    assert (await gw.authenticate(Credentials(new_secret))).client_id == world.publisher.id


async def test_revoked_subscription_is_closed(world: World) -> None:
    gw = world.gateway
    ident = await gw.authenticate(Credentials(world.subscriber.secret))
    sub = await gw.subscribe(ident, "m/acme/c/temps/#", "http")
    await gw.provisioning.connect("acme", world.subscriber.id, "temps", True, False)
    assert sub.closed == "authorization revoked"


async def test_provisioning_refusals(world: World) -> None:
    prov = world.gateway.provisioning
    with pytest.raises(InvalidRequest, match="domain name"):
        await prov.create_domain("bad name")
    with pytest.raises(Conflict):
        await prov.create_domain("acme")
    with pytest.raises(Conflict):
        await prov.create_channel("acme", "temps")
    with pytest.raises(NotFound):
        await prov.create_channel("nope", "temps")
    with pytest.raises(NotFound):
        await prov.connect("acme", "no-such-client", "temps", True, True)
    with pytest.raises(InvalidRequest, match="publish, subscribe or both"):
        await prov.connect("acme", world.stranger.id, "temps", False, False)
    # clients are found by id or by name
    assert (await prov.get_client("acme", "stranger")).id == world.stranger.id
    await prov.delete_domain("acme")
    with pytest.raises(NotFound):
        await prov.get_client("acme", world.stranger.id)


async def test_dtls_keys_are_given_opened_rotated_and_revoked(world: World) -> None:
    prov = world.gateway.provisioning
    heard: list[Change] = []

    async def hear(change: Change) -> None:
        heard.append(change)

    world.gateway.on_change(hear)
    grant = await prov.create_dtls_key("acme", "publisher")  # by name
    assert grant.client.id == world.publisher.id
    assert grant.identity == world.publisher.id.replace("-", "")
    assert len(grant.key) == 16 and len(grant.identity) == 32
    assert heard == [Change("dtls_key", "acme", world.publisher.id)]
    keys, failed = await prov.dtls_keys()
    assert failed == []
    assert keys == {grant.identity: PreSharedKey(world.publisher.id, grant.key.encode(), True)}
    rotated = await prov.create_dtls_key("acme", world.publisher.id)
    assert rotated.key != grant.key
    assert (await prov.dtls_keys())[0][grant.identity].key == rotated.key.encode()
    await prov.set_client_enabled("acme", world.publisher.id, False)
    assert not (await prov.dtls_keys())[0][grant.identity].enabled
    await prov.revoke_dtls_key("acme", world.publisher.id)
    assert await prov.dtls_keys() == ({}, [])
    assert len(heard) == 4
    with pytest.raises(NotFound, match="has no DTLS key"):
        await prov.revoke_dtls_key("acme", world.publisher.id)
    with pytest.raises(NotFound):
        await prov.create_dtls_key("acme", "nobody")


async def test_dtls_keys_under_another_master_key_do_not_open(world: World) -> None:
    await world.gateway.provisioning.create_dtls_key("acme", "publisher")
    other = Provisioning(world.gateway.store, world.gateway.bus.announce, SealingKey.generate())
    keys, [failed] = await other.dtls_keys()
    assert keys == {}
    assert failed.startswith(f"the DTLS key of client {world.publisher.id} cannot be opened:")
    assert "sealed under another master key" in failed
    without = Provisioning(world.gateway.store, world.gateway.bus.announce)
    with pytest.raises(InvalidRequest, match="DTLS keys need an encryption key"):
        await without.create_dtls_key("acme", "publisher")


async def test_a_dtls_client_and_a_secret_must_agree(world: World) -> None:
    gw = world.gateway
    ident = await gw.authenticate(Credentials(psk_client=world.publisher.id))
    assert ident.client_id == world.publisher.id
    # The secret's answer is cached now: the fast path must still not skip the DTLS client.
    await gw.authenticate(Credentials(world.both.secret))
    both = Credentials(world.both.secret, psk_client=world.publisher.id)
    assert gw.authenticate_nowait(both) is None
    with pytest.raises(AuthenticationError, match="the psk and the secret name different"):
        await gw.authenticate(both)
    with pytest.raises(AuthenticationError, match="the DTLS key's client is unknown or disabled"):
        await gw.authenticate(Credentials(psk_client="nobody"))


async def test_store_survives_reopen(world: World, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from core.store.sqlite import SQLiteStore

    store = SQLiteStore(tmp_path / "conduit.db")
    await store.open()
    try:
        assert [c.name for c in await store.list_channels("acme")] == ["other", "temps"]
        conns = await store.list_connections("acme", channel="temps")
        assert {c.client_id for c in conns} == {
            world.publisher.id, world.subscriber.id, world.both.id
        }
    finally:
        await store.close()


async def test_retained_messages_survive_a_restart(world: World, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from tests.conftest import make_gateway

    gw = world.gateway
    pub = await gw.authenticate(Credentials(world.both.secret))
    await gw.publish(pub, "m/acme/c/temps/a", b"1", "text/plain", "mqtt", retain=True)
    await gw.publish(pub, "m/acme/c/temps/b/c", b"2", "text/plain", "mqtt", retain=True)
    await gw.publish(pub, "m/acme/c/temps/a", b"3", "text/plain", "mqtt", retain=True)
    await gw.publish(pub, "m/acme/c/temps/d", b"4", "text/plain", "mqtt", retain=True)
    await gw.publish(pub, "m/acme/c/temps/d", b"", "text/plain", "mqtt", retain=True)  # clears
    await gw.close()
    again = await make_gateway(tmp_path)
    try:
        sub = await again.authenticate(Credentials(world.subscriber.secret))
        got = await again.retained(sub, "m/acme/c/temps/#")
        assert [(m.subtopic, m.payload) for m in got] == [("a", b"3"), ("b/c", b"2")]
        assert [m.payload for m in await again.retained(sub, "m/acme/c/temps/+")] == [b"3"]
        with pytest.raises(AuthorizationError):
            await again.retained(await again.authenticate(Credentials(world.publisher.secret)),
                                 "m/acme/c/temps/#")
    finally:
        await again.close()


async def test_publish_nowait_needs_a_warm_cache(world: World) -> None:
    gw = world.gateway
    ident = await gw.authenticate(Credentials(world.both.secret))
    watch = await gw.subscribe(ident, "m/acme/c/temps/#", "mqtt")
    gw.authorizer.invalidate()
    assert gw.publish_nowait(ident, "m/acme/c/temps/a", b"x", "text/plain", "mqtt") is None
    assert watch.get_nowait() is None  # nothing was published
    await gw.publish(ident, "m/acme/c/temps/a", b"1", "text/plain", "mqtt")  # warms the cache
    msg = gw.publish_nowait(ident, "m/acme/c/temps/a", b"2", "text/plain", "mqtt")
    assert msg is not None and msg.payload == b"2"
    assert [watch.get_nowait().payload, watch.get_nowait().payload] == [b"1", b"2"]  # type: ignore[union-attr]
    stranger = await gw.authenticate(Credentials(world.subscriber.secret))
    await gw.subscribe(stranger, "m/acme/c/temps", "mqtt")  # caches the subscriber's rights
    with pytest.raises(AuthorizationError):
        gw.publish_nowait(stranger, "m/acme/c/temps", b"x", "text/plain", "mqtt")
    with pytest.raises(SenMLError):
        gw.publish_nowait(ident, "m/acme/c/temps", b"[]", "application/senml+json", "mqtt")
    assert watch.get_nowait() is None


async def test_open_connections_are_told_when_their_client_goes(world: World) -> None:
    gw = world.gateway
    told: list[tuple[str, str]] = []
    ident = {name: await gw.authenticate(Credentials(getattr(world, name).secret))
             for name in ("publisher", "both", "stranger")}
    unregister = {name: gw.connected(i, lambda reason, n=name: told.append((n, reason)))
                  for name, i in ident.items()}
    unregister["stranger"]()  # an ended connection is not told
    await gw.provisioning.disconnect("acme", world.both.id, "temps")  # rights, not the client
    assert told == []
    await gw.provisioning.set_client_enabled("acme", world.publisher.id, False)
    await gw.provisioning.delete_client("acme", world.stranger.id)
    await gw.provisioning.delete_client("acme", world.both.id)
    assert told == [("publisher", "client disabled or deleted"),
                    ("both", "client disabled or deleted")]


async def test_store_outage_revokes_nothing(world: World) -> None:
    gw = world.gateway
    told: list[str] = []
    ident = await gw.authenticate(Credentials(world.subscriber.secret))
    sub = await gw.subscribe(ident, "m/acme/c/temps", "http")
    gw.connected(ident, told.append)
    await gw.store.close()
    gw.authorizer.invalidate()
    await gw.revalidate()
    assert told == [] and sub.closed is None


async def test_migration_makes_client_names_unique(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A database made before names were unique: the first client of a name keeps it, each later
    duplicate gets the start of its id appended; then a duplicate is a conflict."""
    import sqlite3

    from core.store import Conflict
    from core.store.sqlite import MIGRATIONS, SQLiteStore

    path = tmp_path / "old.db"
    db = sqlite3.connect(path)
    for i, script in enumerate(MIGRATIONS[:2]):
        db.executescript(f"BEGIN; {script}; PRAGMA user_version = {i + 1}; COMMIT;")
    db.execute("INSERT INTO domains VALUES ('acme', 0, '{}')")
    rows = [
        ("id-b", "lamp", 2.0), ("id-a", "lamp", 1.0), ("id-c", "lamp", 3.0), ("id-d", "fan", 1.0)
    ]
    for client_id, name, created in rows:
        db.execute(
            "INSERT INTO clients (id, domain, name, secret_hash, enabled, created, metadata)"
            " VALUES (?, 'acme', ?, ?, 1, ?, '{}')",
            (client_id, name, "hash-" + client_id, created),
        )
    db.commit()
    db.close()
    store = SQLiteStore(path)
    await store.open()
    try:
        names = {c.id: c.name for c in await store.list_clients("acme")}
        assert names == {
            "id-a": "lamp", "id-b": "lamp (id-b)", "id-c": "lamp (id-c)", "id-d": "fan"
        }
        with pytest.raises(Conflict):
            await store.create_client("acme", "id-e", "fan", "hash-e", {})
    finally:
        await store.close()
