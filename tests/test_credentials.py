"""Credentials, parsed once for every protocol (core.credentials): each protocol's idiom, the
token shape, and every refusal without repeating what was sent."""

from __future__ import annotations

import base64

import pytest

from core.credentials import Credentials, from_authorization, from_coap, from_mqtt, is_token
from core.errors import AuthenticationError, Condition

JWT = "eyJhbGciOiJFZERTQSJ9.eyJzdWIiOiJkZXYifQ.c2lnbmF0dXJl"
SECRET = "x6fh9MQStguSeX6X0g63zFRw8ukhJ7pdOMBY0OGoKMo"


def test_tokens_are_told_from_secrets_by_shape() -> None:
    assert is_token(JWT)
    assert not is_token(SECRET)
    assert not is_token("eyJnot-a-token")
    assert not is_token("a.b.c")


def test_authorization_forms() -> None:
    basic = base64.b64encode(f"id-1:{SECRET}".encode()).decode()
    assert from_authorization(f"Client {SECRET}") == Credentials(SECRET)
    assert from_authorization(f"Basic {basic}") == Credentials(SECRET, "id-1")
    assert from_authorization(f"Bearer {JWT}") == Credentials(token=JWT)
    assert from_authorization(SECRET) == Credentials(SECRET)
    assert from_authorization(JWT) == Credentials(token=JWT)  # a bare token
    assert Credentials(SECRET).kinds == ("secret",)
    assert Credentials(token=JWT).with_certificate(b"der").kinds == ("certificate", "token")


@pytest.mark.parametrize(
    ("value", "condition", "text"),
    [
        ("Bearer ", Condition.NO_CREDENTIALS, "empty bearer token"),
        ("Bearer  ", Condition.NO_CREDENTIALS, "empty bearer token"),
        (f"Token {SECRET}", Condition.BAD_CREDENTIALS, "unknown authorization scheme"),
    ],
)
def test_authorization_refusals(value: str, condition: Condition, text: str) -> None:
    with pytest.raises(AuthenticationError, match=text) as err:
        from_authorization(value)
    assert err.value.condition is condition
    assert SECRET not in err.value.detail


def test_mqtt_forms_and_refusals() -> None:
    assert from_mqtt("id-1", SECRET.encode()) == Credentials(SECRET, "id-1")
    assert from_mqtt("", SECRET.encode()) == Credentials(SECRET)
    assert from_mqtt(None, JWT.encode()) == Credentials(token=JWT)
    assert from_mqtt("dev", JWT.encode()) == Credentials(client_id="dev", token=JWT)
    for password, condition, text in [
        (None, Condition.NO_CREDENTIALS, "no password"),
        (b"", Condition.NO_CREDENTIALS, "no password"),
        (b"\xff\xfe", Condition.BAD_CREDENTIALS, "the password is not UTF-8"),
        ("caf\u00e9".encode(), Condition.BAD_CREDENTIALS, "credentials must be ASCII"),
    ]:
        with pytest.raises(AuthenticationError, match=text) as err:
            from_mqtt("id-1", password)
        assert err.value.condition is condition


def test_coap_forms_and_refusals() -> None:
    assert from_coap(["x=1", f"auth={SECRET}"]) == Credentials(SECRET)
    assert from_coap([f"auth={JWT}"]) == Credentials(token=JWT)
    with pytest.raises(AuthenticationError, match="no credentials") as err:
        from_coap(["x=1", "auth="])
    assert err.value.condition is Condition.NO_CREDENTIALS
    with pytest.raises(AuthenticationError, match="more than one auth= query"):
        from_coap([f"auth={SECRET}", f"auth={SECRET}"])
    # Over DTLS: the client whose key the handshake proved, alone or beside auth=.
    assert from_coap(["x=1"], "c1") == Credentials(psk_client="c1")
    assert from_coap([f"auth={SECRET}"], "c1") == Credentials(SECRET, psk_client="c1")
    assert from_coap([f"auth={SECRET}"], "c1").kinds == ("psk", "secret")
    with pytest.raises(AuthenticationError, match="no credentials"):
        from_coap(["auth="], "c1")  # an empty auth= is still a malformed credential
