"""What every Store must do (core.store.Store), whatever keeps the state."""

from __future__ import annotations

import pytest

from core.errors import UnavailableError
from core.store import Conflict, IssuedCertificate, Member, NotFound, SigningKeyRecord, Store, User


async def _acme(store: Store) -> None:
    await store.create_domain("acme", {"tier": "gold"})
    await store.create_client("acme", "id-1", "lamp", "hash-1", {"room": "hall"})
    await store.create_client("acme", "id-2", "fan", "hash-2", {})
    await store.create_channel("acme", "ch-1", "temps", {})
    await store.create_channel("acme", "ch-2", "other", {})


async def test_domains(store: Store) -> None:
    await store.create_domain("beta", {})
    await store.create_domain("acme", {"tier": "gold"})
    assert (await store.get_domain("acme")).metadata == {"tier": "gold"}
    assert [d.name for d in await store.list_domains()] == ["acme", "beta"]
    with pytest.raises(Conflict):
        await store.create_domain("acme", {})
    await store.delete_domain("beta")
    with pytest.raises(NotFound):
        await store.get_domain("beta")
    with pytest.raises(NotFound):
        await store.delete_domain("beta")


async def test_clients(store: Store) -> None:
    with pytest.raises(NotFound):
        await store.create_client("nope", "id-0", "x", "hash-0", {})
    await _acme(store)
    lamp = await store.get_client("acme", "id-1")
    assert (lamp.name, lamp.enabled, lamp.metadata) == ("lamp", True, {"room": "hall"})
    assert await store.get_client("acme", "lamp") == lamp  # by name too
    assert [c.name for c in await store.list_clients("acme")] == ["fan", "lamp"]
    with pytest.raises(Conflict):  # names are unique in a domain
        await store.create_client("acme", "id-3", "lamp", "hash-3", {})
    await store.create_domain("beta", {})
    await store.create_client("beta", "id-4", "lamp", "hash-4", {})  # not across domains
    with pytest.raises(NotFound):
        await store.get_client("acme", "id-4")
    assert (await store.client_by_secret("hash-1")) == lamp
    assert await store.client_by_secret("hash-x") is None
    assert (await store.client_by_id("id-1")) == lamp
    assert (await store.client_by_id("id-4")).domain == "beta"  # type: ignore[union-attr]
    assert await store.client_by_id("lamp") is None  # an id, never a name
    assert not (await store.set_client_enabled("acme", "lamp", False)).enabled
    assert not (await store.get_client("acme", "id-1")).enabled
    await store.set_client_secret("acme", "id-1", "hash-new")
    assert await store.client_by_secret("hash-1") is None
    assert (await store.client_by_secret("hash-new")).id == "id-1"  # type: ignore[union-attr]
    await store.delete_client("acme", "fan")
    with pytest.raises(NotFound):
        await store.get_client("acme", "id-2")
    with pytest.raises(NotFound):
        await store.delete_client("acme", "id-2")


async def test_channels(store: Store) -> None:
    await _acme(store)
    temps = await store.get_channel("acme", "temps")
    assert temps.id == "ch-1" and await store.get_channel("acme", "ch-1") == temps
    assert [c.name for c in await store.list_channels("acme")] == ["other", "temps"]
    with pytest.raises(Conflict):
        await store.create_channel("acme", "ch-3", "temps", {})
    await store.delete_channel("acme", "other")
    with pytest.raises(NotFound):
        await store.get_channel("acme", "other")


async def test_connections_and_permissions(store: Store) -> None:
    await _acme(store)
    await store.connect("acme", "lamp", "temps", True, False)
    await store.connect("acme", "id-2", "temps", True, True)
    await store.connect("acme", "id-2", "other", False, True)
    perms = await store.permissions("id-1", "acme", "temps")
    assert perms is not None and (perms.publish, perms.subscribe) == (True, False)
    await store.connect("acme", "lamp", "temps", False, True)  # replaces the rights
    perms = await store.permissions("id-1", "acme", "temps")
    assert perms is not None and (perms.publish, perms.subscribe) == (False, True)
    assert await store.permissions("id-1", "acme", "other") is None
    assert len(await store.list_connections("acme")) == 3
    assert {c.channel for c in await store.list_connections("acme", client_id="fan")} == {
        "temps", "other",
    }  # fmt: skip
    assert {c.client_id for c in await store.list_connections("acme", channel="temps")} == {
        "id-1", "id-2",
    }  # fmt: skip
    await store.set_client_enabled("acme", "id-1", False)
    assert await store.permissions("id-1", "acme", "temps") is None  # a disabled client: none
    await store.disconnect("acme", "fan", "other")
    with pytest.raises(NotFound):
        await store.disconnect("acme", "fan", "other")
    await store.delete_channel("acme", "temps")  # its connections go with it
    assert await store.list_connections("acme") == []


async def test_deleting_a_domain_deletes_what_it_holds(store: Store) -> None:
    await _acme(store)
    await store.connect("acme", "lamp", "temps", True, True)
    await store.put_retained("acme", "temps", "a", b"x")
    await store.delete_domain("acme")
    assert await store.client_by_secret("hash-1") is None
    await store.create_domain("acme", {})  # a new tenant of the same name inherits nothing
    assert await store.list_clients("acme") == []
    assert await store.list_channels("acme") == []
    assert await store.retained("acme", "temps") == []


async def test_deleting_a_channel_deletes_its_retained_messages(store: Store) -> None:
    await _acme(store)
    await store.put_retained("acme", "temps", "a", b"x")
    await store.put_retained("acme", "other", "a", b"y")
    await store.delete_channel("acme", "temps")
    await store.create_channel("acme", "ch-9", "temps", {})
    assert await store.retained("acme", "temps") == []
    assert await store.retained("acme", "other") == [b"y"]


async def test_retained_messages(store: Store) -> None:
    await _acme(store)
    await store.put_retained("acme", "temps", "b/c", b"2")
    await store.put_retained("acme", "temps", "a", b"1")
    await store.put_retained("acme", "temps", "a", b"3")  # replaces
    await store.put_retained("acme", "other", "a", b"4")
    assert await store.retained("acme", "temps") == [b"3", b"2"]  # by subtopic
    await store.put_retained("acme", "temps", "a", b"")  # empty: removed
    assert await store.retained("acme", "temps") == [b"2"]


def _cert(serial: str, client_id: str | None, issued: float) -> IssuedCertificate:
    domain = "acme" if client_id else None
    kind = "client" if client_id else "server"
    return IssuedCertificate(serial, kind, client_id or "example.com", domain, client_id,
                             1.0, 2.0, issued, None, f"PEM {serial}")  # fmt: skip


async def test_certificates(store: Store) -> None:
    await _acme(store)
    await store.add_certificate(_cert("a1", "id-1", 10.0))
    await store.add_certificate(_cert("b2", "id-2", 11.0))
    await store.add_certificate(_cert("c3", None, 12.0))
    await store.add_certificate(_cert("d4", "id-1", 13.0))
    with pytest.raises(Conflict):
        await store.add_certificate(_cert("a1", "id-1", 14.0))
    assert await store.get_certificate("b2") == _cert("b2", "id-2", 11.0)
    with pytest.raises(NotFound):
        await store.get_certificate("ff")
    assert [c.serial for c in await store.list_certificates()] == ["a1", "b2", "c3", "d4"]
    assert [c.serial for c in await store.list_certificates("acme")] == ["a1", "b2", "d4"]
    assert [c.serial for c in await store.list_certificates("acme", "id-1")] == ["a1", "d4"]
    assert await store.revoked_certificates() == {}
    assert await store.revoke_certificates(["a1", "c3", "ff"], 20.0) == ["a1", "c3"]
    assert await store.revoke_certificates(["a1", "d4"], 30.0) == ["d4"]  # a1 keeps 20.0
    assert await store.revoked_certificates() == {"a1": 20.0, "c3": 20.0, "d4": 30.0}
    assert await store.revoked_certificates(["a1", "b2", "ff"]) == {"a1": 20.0}
    assert await store.revoked_certificates([]) == {}
    assert (await store.get_certificate("a1")).revoked == 20.0


async def test_dtls_keys(store: Store) -> None:
    await _acme(store)
    assert await store.dtls_keys() == []
    assert (await store.put_dtls_key("acme", "lamp", b"sealed-1")).id == "id-1"  # by name
    await store.put_dtls_key("acme", "id-2", b"sealed-2")
    [lamp, _] = sorted(await store.dtls_keys(), key=lambda k: k.client_id)
    assert (lamp.client_id, lamp.domain, lamp.enabled, lamp.sealed) == (
        "id-1", "acme", True, b"sealed-1",
    )  # fmt: skip
    await store.put_dtls_key("acme", "id-1", b"sealed-3")  # replaces (rotation)
    await store.set_client_enabled("acme", "id-1", False)
    lamp = next(k for k in await store.dtls_keys() if k.client_id == "id-1")
    assert (lamp.sealed, lamp.enabled) == (b"sealed-3", False)
    assert (await store.delete_dtls_key("acme", "lamp")).id == "id-1"
    with pytest.raises(NotFound):  # no key left to delete
        await store.delete_dtls_key("acme", "lamp")
    with pytest.raises(NotFound):
        await store.put_dtls_key("acme", "nobody", b"x")
    await store.delete_client("acme", "fan")  # its key goes with it
    assert await store.dtls_keys() == []
    await store.create_client("acme", "id-2", "fan", "hash-2", {})
    assert await store.dtls_keys() == []  # a client made again with the same id inherits none


async def test_a_closed_store_is_unavailable(store: Store) -> None:
    await store.ping()
    await store.close()
    with pytest.raises(UnavailableError):
        await store.ping()
    with pytest.raises(UnavailableError):
        await store.list_domains()


async def test_a_client_id_wins_over_a_name_and_a_channel_name_over_an_id(store: Store) -> None:
    await _acme(store)
    await store.create_client("acme", "lamp-id", "id-1", "hash-9", {})  # named like id-1's id
    assert (await store.get_client("acme", "id-1")).name == "lamp"
    await store.create_channel("acme", "temps", "ch-x", {})  # its id is temps' name
    assert (await store.get_channel("acme", "temps")).id == "ch-1"
    assert (await store.get_channel("acme", "ch-x")).id == "temps"


async def test_names_order_by_bytes_whatever_the_locale(store: Store) -> None:
    for name in ("b", "B", "a-1", "a_1", "A"):
        await store.create_domain(name, {})
    assert [d.name for d in await store.list_domains()] == ["A", "B", "a-1", "a_1", "b"]


def _user(uid: str, email: str, created: float = 1.0) -> User:
    return User(uid, email, email.split("@")[0], True, False, created, None)


async def test_users(store: Store) -> None:
    ann = await store.create_user(_user("u-1", "Ann@Example.com"), "hash-a")
    await store.create_user(_user("u-2", "carl@example.com"), None)
    await store.create_user(_user("u-3", "Bob@example.com"), "hash-b")
    with pytest.raises(Conflict):  # an email is one user, in any case
        await store.create_user(_user("u-4", "ann@example.COM"), None)
    assert await store.get_user("u-1") == ann
    assert await store.get_user("ANN@example.com") == ann
    with pytest.raises(NotFound):
        await store.get_user("nobody@example.com")
    assert [u.id for u in await store.list_users()] == ["u-1", "u-3", "u-2"]  # case ignored
    assert await store.user_password("ann@EXAMPLE.com") == (ann, "hash-a")
    assert await store.user_password("carl@example.com") == (await store.get_user("u-2"), None)
    assert await store.user_password("nobody@example.com") is None
    assert not (await store.set_user_enabled("Ann@Example.com", False)).enabled
    assert not (await store.get_user("u-1")).enabled
    await store.set_user_password("u-1", None)
    assert (await store.user_password("ann@example.com"))[1] is None  # type: ignore[index]
    await store.set_last_login("u-1", 5.5)
    assert (await store.get_user("u-1")).last_login == 5.5
    admin = await store.create_user(
        User("u-5", "root@example.com", "Root", True, True, 2.0, None), "h"
    )
    assert (await store.get_user("u-5")) == admin and admin.platform_admin
    await store.delete_user("bob@example.com")
    with pytest.raises(NotFound):
        await store.get_user("u-3")
    with pytest.raises(NotFound):
        await store.delete_user("u-3")


async def test_members_and_roles(store: Store) -> None:
    await _acme(store)
    await store.create_domain("beta", {})
    await store.create_user(_user("u-1", "ann@example.com"), None)
    await store.create_user(_user("u-2", "Bob@example.com"), None)
    assert await store.set_member("acme", "ANN@example.com", "admin") == Member(
        "u-1", "acme", "admin"
    )
    await store.set_member("acme", "u-1", "member")  # replaces the role
    await store.set_member("acme", "u-2", "admin")
    await store.set_member("beta", "u-1", "admin")
    assert await store.list_members("acme") == [
        Member("u-1", "acme", "member"), Member("u-2", "acme", "admin"),
    ]  # fmt: skip
    assert await store.roles("u-1") == {"acme": "member", "beta": "admin"}
    assert await store.roles("u-9") == {}
    with pytest.raises(NotFound):
        await store.set_member("nope", "u-1", "admin")
    with pytest.raises(NotFound):
        await store.set_member("acme", "nobody@example.com", "admin")
    with pytest.raises(NotFound):
        await store.list_members("nope")
    await store.remove_member("acme", "u-2")
    with pytest.raises(NotFound):
        await store.remove_member("acme", "u-2")
    await store.delete_domain("beta")  # its memberships go with it
    assert await store.roles("u-1") == {"acme": "member"}
    await store.delete_user("u-1")  # and a user's
    assert await store.list_members("acme") == []


async def test_token_families_and_refresh_tokens(store: Store) -> None:
    await store.create_user(_user("u-1", "ann@example.com"), None)
    await store.add_token_family("f1", "u-1", 10.0)
    assert await store.token_family_live("f1")
    assert not await store.token_family_live("fx")
    with pytest.raises(Conflict):  # a family belongs to a user
        await store.add_token_family("f9", "u-9", 10.0)
    await store.add_refresh_token("j1", "f1", 100.0)
    assert await store.use_refresh_token("j1", 20.0) == "fresh"
    assert await store.use_refresh_token("j1", 21.0) == "used"  # a replay
    assert await store.use_refresh_token("jx", 21.0) == "unknown"
    assert await store.revoke_token_family("f1", 30.0)
    assert not await store.revoke_token_family("f1", 31.0)
    assert not await store.token_family_live("f1")
    await store.add_token_family("f2", "u-1", 40.0)
    await store.set_user_enabled("u-1", False)
    assert not await store.token_family_live("f2")  # a disabled user's sign-ins are not live
    await store.set_user_enabled("u-1", True)
    assert await store.token_family_live("f2")
    await store.add_refresh_token("j2", "f2", 45.0)
    await store.add_token_family("f3", "u-1", 60.0)  # drops the refresh tokens expired by then
    assert await store.use_refresh_token("j2", 61.0) == "unknown"
    await store.revoke_user_token_families("u-1", 70.0)
    assert not await store.token_family_live("f2")
    assert not await store.token_family_live("f3")
    await store.add_token_family("f4", "u-1", 80.0)
    await store.delete_user("u-1")
    assert not await store.token_family_live("f4")


async def test_identity_providers(store: Store) -> None:
    await _acme(store)
    config = {"issuer": "https://id.example.com", "rules": [{"claim": "sub", "n": 1.5}]}
    await store.put_idp("acme", "sb", "supabase", config, create=True)
    await store.put_idp("acme", "a0", "auth0", {"x": None, "ok": True}, create=True)
    with pytest.raises(Conflict):
        await store.put_idp("acme", "sb", "supabase", {}, create=True)
    assert await store.get_idp("acme", "sb") == ("supabase", config)
    await store.put_idp("acme", "sb", "oidc", {"issuer": "https://other"}, create=False)
    assert await store.get_idp("acme", "sb") == ("oidc", {"issuer": "https://other"})
    with pytest.raises(NotFound):
        await store.put_idp("acme", "none", "oidc", {}, create=False)
    with pytest.raises(NotFound):
        await store.put_idp("nope", "sb", "oidc", {}, create=True)
    assert await store.list_idps("acme") == [
        ("a0", "auth0", {"x": None, "ok": True}), ("sb", "oidc", {"issuer": "https://other"}),
    ]  # fmt: skip
    with pytest.raises(NotFound):
        await store.list_idps("nope")
    await store.delete_idp("acme", "a0")
    with pytest.raises(NotFound):
        await store.delete_idp("acme", "a0")
    with pytest.raises(NotFound):
        await store.get_idp("acme", "a0")
    await store.delete_domain("acme")  # its providers go with it
    await store.create_domain("acme", {})
    assert await store.list_idps("acme") == []


async def test_revoked_subjects(store: Store) -> None:
    await _acme(store)
    await store.create_domain("beta", {})
    await store.revoke_subject("acme", "c1", 10.0)
    await store.revoke_subject("acme", "c1", 20.0)  # the latest counts
    await store.revoke_subject("beta", "c2", 30.0)
    wanted = [("acme", "c1"), ("acme", "c2"), ("beta", "c1"), ("beta", "c2")]
    assert await store.subject_revocations(wanted) == {("acme", "c1"): 20.0, ("beta", "c2"): 30.0}
    assert await store.subject_revocations([]) == {}
    with pytest.raises(NotFound):
        await store.revoke_subject("nope", "c1", 1.0)
    await store.delete_domain("beta")
    assert await store.subject_revocations(wanted) == {("acme", "c1"): 20.0}


async def test_signing_keys(store: Store) -> None:
    k1 = SigningKeyRecord("k1", "EdDSA", 1.0, None, b"sealed-1\x00\xff")
    k2 = SigningKeyRecord("k2", "ES256", 2.0, None, b"sealed-2")
    await store.add_signing_key(k2)
    await store.add_signing_key(k1)
    with pytest.raises(Conflict):
        await store.add_signing_key(k1)
    assert await store.signing_keys() == [k1, k2]  # oldest first
    await store.retire_signing_keys(before=2.0, retires=100.0)
    await store.retire_signing_keys(before=3.0, retires=200.0)  # k1 keeps its first retirement
    assert [k.retires for k in await store.signing_keys()] == [100.0, 200.0]
    await store.delete_signing_keys(retired_before=150.0)
    assert [k.kid for k in await store.signing_keys()] == ["k2"]
