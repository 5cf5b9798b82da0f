"""The OpenAPI 3.1 description of the public HTTP listeners (plain and TLS), served at
``GET /openapi.json`` on them: publishing and subscribing, broker tokens, users' sign-in, the
token exchange, the JWKS, sign-in with a provider, health.

Kept as data beside the adapter's route table (``adapters.http.adapter.ROUTES``); a test checks
that the two name the same operations and that a running adapter routes every one of them. The
management API has its own description (``conduit.openapi``).
"""

from __future__ import annotations

import copy
from typing import Any

PROBLEM_JSON = "application/problem+json"

_str = {"type": "string"}
_int = {"type": "integer"}
_strings = {"type": "array", "items": _str}


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


def _object(required: list[str], **properties: Any) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "object", "properties": properties}
    if required:
        schema["required"] = required
    return schema


# The refusals of the exchange and the refresh, each with its own problem type
# (urn:conduit:exchange:<kind>): kind -> (status, when). docs/identity-providers.md has the same
# table.
EXCHANGE_REFUSALS: dict[str, tuple[int, str]] = {
    "invalid-request": (400, "the body, or a ttl beyond the provider's max_ttl"),
    "token-invalid": (
        401,
        "a bad signature, issuer, audience or algorithm, a missing claim, a key id the provider"
        " does not have, a disabled provider; on refresh, a password that is not the current"
        " credentials of that exchange",
    ),
    "token-expired": (401, "the token (on refresh: the password) has expired"),
    "subject-revoked": (401, "the subject was revoked after these credentials were issued"),
    "session-ended": (401, "a refresh past the provider's max_session: exchange a new token"),
    "no-rule-matched": (403, "no rule of the provider applies to the token's claims"),
    "domain-not-found": (404, "no such domain"),
    "provider-not-found": (404, "no such provider in the domain"),
    "rate-limited": (
        429,
        "more than exchange_rate_per_address exchanges and refreshes a minute from one"
        " address, or exchange_rate_per_domain exchanges a minute for one domain",
    ),
    "provider-unreachable": (503, "the provider's keys cannot be fetched and none are kept"),
    "provider-misconfigured": (
        503,
        "a registration that no longer derives, or a jwt_secret that cannot be opened",
    ),
}
_EXCHANGE_KINDS = [k for k in EXCHANGE_REFUSALS if k not in ("subject-revoked", "session-ended")]
_REFRESH_KINDS = [
    k for k in EXCHANGE_REFUSALS if k not in ("no-rule-matched", "provider-unreachable")
]

_SENML_RECORD = {
    "type": "object",
    "description": "A SenML record (RFC 8428): base fields (b*) apply to the records after it",
    "properties": {
        "bn": {"type": "string", "description": "Base name"},
        "bt": {"type": "number", "description": "Base time"},
        "bu": {"type": "string", "description": "Base unit"},
        "bv": {"type": "number", "description": "Base value"},
        "bs": {"type": "number", "description": "Base sum"},
        "bver": {"type": "integer", "description": "Base version"},
        "n": {"type": "string", "description": "Name"},
        "u": {"type": "string", "description": "Unit"},
        "v": {"type": "number", "description": "Value"},
        "vs": {"type": "string", "description": "String value"},
        "vb": {"type": "boolean", "description": "Boolean value"},
        "vd": {"type": "string", "description": "Data value (base64url)"},
        "s": {"type": "number", "description": "Sum"},
        "t": {"type": "number", "description": "Time"},
        "ut": {"type": "number", "description": "Update time"},
    },
}

SCHEMAS: dict[str, Any] = {
    "Problem": {
        "type": "object",
        "description": "RFC 9457 problem details. type is urn:conduit:error:<reason> for a"
        " refusal of the error table (docs/http.md), about:blank for others (404 of a feature"
        " this gateway does not run, 405, 406, a malformed request).",
        "required": ["type", "title", "status", "detail"],
        "properties": {
            "type": _str,
            "title": _str,
            "status": _int,
            "detail": _str,
            "record": {"type": ["integer", "null"], "description": "Invalid SenML: the record"},
            "field": {"type": ["string", "null"], "description": "Invalid SenML: the field"},
            "part": {
                "type": "string",
                "description": "Malformed topic: domain, channel, subtopic, topic or path",
            },
        },
    },
    "ExchangeProblem": {
        "type": "object",
        "description": "A refusal of the exchange or the refresh, with a stable type to switch"
        " on (docs/identity-providers.md)",
        "required": ["type", "title", "status", "detail"],
        "properties": {
            "type": {
                "type": "string",
                "enum": [f"urn:conduit:exchange:{kind}" for kind in EXCHANGE_REFUSALS],
            },
            "title": _str,
            "status": _int,
            "detail": _str,
        },
    },
    "SenMLPack": {"type": "array", "minItems": 1, "items": _SENML_RECORD},
    "Message": {
        "type": "object",
        "description": "The data of an SSE event 'message'",
        "properties": {
            "topic": {"type": "string", "description": "m/<domain>/c/<channel>[/<subtopic>]"},
            "domain": _str,
            "channel": _str,
            "subtopic": {"type": "string", "description": "Empty when there is none"},
            "publisher": {"type": "string", "description": "The publisher's client id"},
            "protocol": {"type": "string", "description": "What it was published over"},
            "content_type": _str,
            "encoding": {
                "type": "string",
                "enum": ["json", "utf-8", "base64"],
                "description": "json: a SenML JSON pack, embedded; utf-8: text; base64: other"
                " bytes",
            },
            "created": {"type": "integer", "description": "Receive time, in nanoseconds"},
            "payload": {},
            "metadata": {"type": "object", "additionalProperties": _str},
        },
    },
    "BrokerTokenRequest": _object(
        [],
        ttl={
            "type": "number",
            "minimum": 1,
            "description": "Seconds; at most broker_token_max_ttl, default broker_token_ttl",
        },
    ),
    "BrokerToken": _object(
        ["token", "token_type", "expires_at"],
        token={"type": "string", "description": "A JWT carrying the client's rights"},
        token_type={"type": "string", "enum": ["Bearer"]},
        expires_at={"type": "integer", "description": "Unix time"},
    ),
    "Login": _object(["email", "password"], email=_str, password=_str),
    "RefreshToken": _object(["refresh_token"], refresh_token=_str),
    "TokenPair": _object(
        ["access_token", "refresh_token", "token_type", "expires_at", "refresh_expires_at"],
        access_token={
            "type": "string",
            "description": "For the management API, and GET /users/me",
        },
        refresh_token={"type": "string", "description": "Used once"},
        token_type={"type": "string", "enum": ["Bearer"]},
        expires_at={"type": "integer", "description": "Unix time the access token expires"},
        refresh_expires_at={
            "type": "integer",
            "description": "Unix time the refresh token expires",
        },
    ),
    "Me": _object(
        ["id", "email", "name", "roles"],
        id=_str,
        email=_str,
        name=_str,
        roles={
            "type": "object",
            "description": "Role (admin or member) by domain",
            "additionalProperties": _str,
        },
    ),
    "RecoveryRequest": _object(["email"], email=_str),
    "PasswordReset": _object(
        ["key", "password"],
        key={"type": "string", "description": "The recovery key the mail held"},
        password={"type": "string", "minLength": 12, "maxLength": 1024},
    ),
    "ExchangeRequest": _object(
        ["domain", "provider", "token"],
        domain=_str,
        provider={"type": "string", "description": "The provider's name in the domain"},
        token={"type": "string", "description": "The app's login token from that provider"},
        ttl={
            "type": "integer",
            "minimum": 1,
            "description": "Seconds the credentials live; at most the provider's max_ttl,"
            " default its ttl",
        },
    ),
    "ExchangeRefresh": _object(
        ["token_id", "password"],
        token_id={"type": "string", "description": "token_id of the exchange's answer"},
        password={"type": "string", "description": "The current password"},
    ),
    "BrokerCredentials": _object(
        ["token_id", "username", "password", "expires_at", "refresh_at", "rules"],
        token_id={"type": "string", "description": "Names the exchange; the same on refresh"},
        username={"type": "string", "description": "<provider>:<sub>"},
        password={
            "type": "string",
            "description": "A broker token: the MQTT password, or Authorization: Bearer",
        },
        expires_at={"type": "integer", "description": "Unix time"},
        refresh_at={
            "type": "integer",
            "description": "Unix time to refresh at (80 % of the life)",
        },
        rules=_object(["publish", "subscribe"], publish=_strings, subscribe=_strings),
        endpoints={
            "type": "object",
            "description": "URL of each listener this gateway serves (http, https, ws, wss,"
            " mqtt, mqtts, mqtt-ws, mqtt-wss, coap, coaps), on the host asked",
            "additionalProperties": _str,
        },
    ),
    "JWKSet": _object(
        ["keys"],
        keys={
            "type": "array",
            "description": "Every key that verifies, the signing one first",
            "items": {
                "type": "object",
                "required": ["kty", "kid", "alg", "use"],
                "properties": {
                    "kty": {"type": "string", "enum": ["OKP", "EC"]},
                    "kid": _str,
                    "alg": {"type": "string", "enum": ["EdDSA", "ES256"]},
                    "use": {"type": "string", "enum": ["sig"]},
                    "crv": _str,
                    "x": _str,
                    "y": _str,
                },
            },
        },
    ),
    "Health": _object(
        ["status", "store", "bus"],
        status={"type": "string", "enum": ["ok", "unavailable"]},
        store={"type": "string", "description": "ok, or unavailable: <why>"},
        bus={"type": "string", "description": "ok, or unavailable: <why>"},
    ),
}

SECURITY_SCHEMES: dict[str, Any] = {
    "clientSecret": {
        "type": "apiKey",
        "in": "header",
        "name": "Authorization",
        "description": "A client's secret: Authorization: Client <secret> (or the bare secret)",
    },
    "clientBasic": {
        "type": "http",
        "scheme": "basic",
        "description": "base64(<client id>:<secret>); the id must be the secret's client",
    },
    "clientCertificate": {
        "type": "mutualTLS",
        "description": "HTTPS with mutual TLS on: a client certificate whose CN is the client's id",
    },
    "brokerToken": {
        "type": "http",
        "scheme": "bearer",
        "bearerFormat": "JWT",
        "description": "A broker token: from POST /clients/tokens, or the password of POST"
        " /auth/exchange",
    },
    "accessToken": {
        "type": "http",
        "scheme": "bearer",
        "bearerFormat": "JWT",
        "description": "A user's access token (POST /users/tokens)",
    },
    "accessCookie": {
        "type": "apiKey",
        "in": "cookie",
        "name": "conduit_access",
        "description": "The access token a provider sign-in left as a cookie",
    },
}

_CLIENT: list[dict[str, list[str]]] = [
    {"clientSecret": []},
    {"clientBasic": []},
    {"clientCertificate": []},
]
_MESSAGING_SECURITY = [*_CLIENT, {"brokerToken": []}]

_WWW_AUTHENTICATE = {
    "WWW-Authenticate": {
        "description": "The schemes accepted: Client and Basic",
        "schema": _str,
    }
}
_RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait", "schema": _int}}
_NO_STORE = {"Cache-Control": {"description": "no-store", "schema": _str}}
_CORS = {
    "Access-Control-Allow-Origin": {
        "description": "The request's Origin, when the domain's providers list it",
        "schema": _str,
    }
}


def _json(schema: str, description: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    answer: dict[str, Any] = {
        "description": description,
        "content": {"application/json": {"schema": _ref(schema)}},
    }
    if headers:
        answer["headers"] = headers
    return answer


def _empty(description: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    answer: dict[str, Any] = {"description": description}
    if headers:
        answer["headers"] = headers
    return answer


def _problems(refusals: dict[int, str], challenge: bool = True) -> dict[str, Any]:
    """Problem documents by status, each with what it means on this route; a 401 of the error
    table (``challenge``) carries WWW-Authenticate."""
    answers: dict[str, Any] = {}
    for status, description in refusals.items():
        answer: dict[str, Any] = {
            "description": description,
            "content": {PROBLEM_JSON: {"schema": _ref("Problem")}},
        }
        if status == 401 and challenge:
            answer["headers"] = _WWW_AUTHENTICATE
        answers[str(status)] = answer
    return answers


def _exchange_problems(kinds: list[str]) -> dict[str, Any]:
    """The refusals of the exchange or the refresh: each status with the types it may carry.
    Those outside its table (a body too large or too slow, no exchange on this gateway) are
    plain problems."""
    answers: dict[str, Any] = {}
    for status in sorted({EXCHANGE_REFUSALS[k][0] for k in kinds}):
        mine = [k for k in kinds if EXCHANGE_REFUSALS[k][0] == status]
        narrowed = {
            "allOf": [
                _ref("ExchangeProblem"),
                {"properties": {"type": {"enum": [f"urn:conduit:exchange:{k}" for k in mine]}}},
            ]
        }
        schema: dict[str, Any] = narrowed
        if status == 404:  # also about:blank when this gateway exchanges no tokens
            schema = {"anyOf": [narrowed, _ref("Problem")]}
        answer: dict[str, Any] = {
            "description": "; ".join(f"{k}: {EXCHANGE_REFUSALS[k][1]}" for k in mine)
            + ("; about:blank: this gateway exchanges no tokens" if status == 404 else ""),
            "content": {PROBLEM_JSON: {"schema": schema}},
            "headers": {"Vary": {"description": "Origin, when one was sent", "schema": _str}},
        }
        if status == 429:
            answer["headers"] = {**answer["headers"], **_RETRY_AFTER}
        answers[str(status)] = answer
    answers.update(
        _problems({408: "The body did not arrive within body_timeout", 413: "Body too large"})
    )
    return answers


def _body(schema: str, required: bool = True) -> dict[str, Any]:
    return {"required": required, "content": {"application/json": {"schema": _ref(schema)}}}


_TOPIC_PARAMETERS = [
    {"name": "domain", "in": "path", "required": True, "schema": _str},
    {"name": "channel", "in": "path", "required": True, "schema": _str},
]
_SUBTOPIC = {
    "name": "subtopic",
    "in": "path",
    "required": True,
    "description": "One or more levels separated by '/' (a '/' sent percent-encoded, %2F,"
    " separates levels too)",
    "schema": _str,
}
_SUBSCRIBE_SUBTOPIC = {
    **_SUBTOPIC,
    "description": "One or more levels separated by '/'; a level may be the wildcard '+' (one"
    " level), and the last may be '#' (any number of levels), written %23",
}

_PUBLISH_BODY = {
    "required": True,
    "description": "The payload, published as sent (never re-encoded); SenML is validated"
    " first. At most max_payload bytes. No Content-Type: application/octet-stream.",
    "content": {
        "application/senml+json": {"schema": _ref("SenMLPack")},
        "application/senml+cbor": {},
        "application/json": {"schema": {}},
        "text/plain": {"schema": _str},
        "application/octet-stream": {},
    },
}
_PUBLISH_ANSWERS = {
    "202": _empty("Published (empty body)"),
    **_problems(
        {
            400: "Malformed topic (bad_topic, with part), or invalid SenML (invalid_senml, with"
            " record and field)",
            401: "No credentials, or bad ones (unknown, disabled, id mismatch, expired token)",
            403: "Not allowed to publish on the channel",
            408: "The body did not arrive within body_timeout; the connection is closed",
            413: "Body larger than max_payload (refused before it is read when announced)",
            415: "A content type other than those above",
            429: "More than the client's rate",
            503: "Store or bus unavailable",
        }
    ),
}
_SUBSCRIBE_ANSWERS = {
    "200": {
        "description": "An event stream: a comment ': subscribed to <filter>', ': keep-alive'"
        " every 15 s, an event 'message' per message (data: a Message), and a last event"
        " 'close' with data {\"reason\": ...} when the server ends the stream",
        "headers": {"Cache-Control": {"description": "no-cache", "schema": _str}},
        "content": {
            "text/event-stream": {
                "schema": {
                    "type": "string",
                    "description": "Server-Sent Events; the data of each event 'message' is a"
                    " JSON Message (#/components/schemas/Message)",
                }
            }
        },
    },
    **_problems(
        {
            400: "Malformed topic filter (bad_topic, with part)",
            401: "No credentials, or bad ones",
            403: "Not allowed to subscribe on the channel",
            406: "No Accept: text/event-stream",
            429: "The client holds max_subscriptions subscriptions",
            503: "Store or bus unavailable, or the server is shutting down",
        }
    ),
}


def _messaging() -> dict[tuple[str, str], dict[str, Any]]:
    operations: dict[tuple[str, str], dict[str, Any]] = {}
    for template, params, suffix in (
        ("/m/{domain}/c/{channel}", [], ""),
        ("/m/{domain}/c/{channel}/{subtopic}", ["subtopic"], "Subtopic"),
    ):
        for method, op_id, summary in (
            ("post", "publish", "Publish a message"),
            ("put", "publishPut", "Publish a message (as POST)"),
        ):
            operations[(method, template)] = {
                "operationId": op_id + suffix,
                "summary": summary + (" to a subtopic" if params else " to the channel"),
                "description": "Checked before anything is published: credentials, the right"
                " to publish, the topic, the content type, the size, the rate, SenML."
                " Expect: 100-continue gets 100 Continue once the credentials and the content"
                " type pass.",
                "tags": ["messaging"],
                "security": _MESSAGING_SECURITY,
                "parameters": [*_TOPIC_PARAMETERS, *([_SUBTOPIC] if params else [])],
                "requestBody": _PUBLISH_BODY,
                "responses": _PUBLISH_ANSWERS,
            }
        operations[("get", template)] = {
            "operationId": "subscribe" + suffix,
            "summary": "Subscribe with Server-Sent Events"
            + (" to a subtopic filter" if params else " to the channel"),
            "description": "Send Accept: text/event-stream. A subscriber that cannot keep up"
            " loses messages; after max_dropped losses in a row the stream is closed.",
            "tags": ["messaging"],
            "security": _MESSAGING_SECURITY,
            "parameters": [
                *_TOPIC_PARAMETERS,
                *([_SUBSCRIBE_SUBTOPIC] if params else []),
            ],
            "responses": _SUBSCRIBE_ANSWERS,
        }
    return operations


_NO_USERS = "this gateway has no users"

# (method, path template): the operation, without the parts spec() adds (HEAD twins).
OPERATIONS: dict[tuple[str, str], dict[str, Any]] = {
    **_messaging(),
    ("post", "/clients/tokens"): {
        "operationId": "brokerToken",
        "summary": "Trade a client's secret or certificate for a broker token",
        "description": "The token carries the client's rights of now and is sent instead of"
        " the secret on any protocol. A bearer token is refused: only the secret or the"
        " certificate renews one.",
        "tags": ["tokens"],
        "security": _CLIENT,
        "requestBody": _body("BrokerTokenRequest", required=False),
        "responses": {
            "200": _json("BrokerToken", "The token", _NO_STORE),
            **_problems(
                {
                    400: "Invalid body, or a ttl out of range",
                    401: "No credentials, bad ones, or a bearer token",
                    408: "The body did not arrive within body_timeout",
                    413: "Body too large",
                    503: "This gateway issues no tokens, or the store is unavailable",
                }
            ),
        },
    },
    ("get", "/.well-known/jwks.json"): {
        "operationId": "jwks",
        "summary": "The public keys that verify Conduit's tokens (a JWK Set)",
        "tags": ["tokens"],
        "responses": {
            "200": _json(
                "JWKSet",
                "The keys",
                {"Cache-Control": {"description": "public, max-age=300", "schema": _str}},
            ),
            **_problems({404: "This gateway issues no tokens (about:blank)"}),
        },
    },
    ("post", "/users/tokens"): {
        "operationId": "login",
        "summary": "Sign in with an email and a password: an access and a refresh token",
        "description": "A wrong password and an unknown email get the same answer. At most"
        " signin_attempts attempts a minute per email and per address.",
        "tags": ["users"],
        "requestBody": _body("Login"),
        "responses": {
            "200": _json("TokenPair", "A new sign-in", _NO_STORE),
            **_problems(
                {
                    400: "Invalid body",
                    401: "Wrong email or password, or a disabled user",
                    404: f"{_NO_USERS} (about:blank)",
                    408: "The body did not arrive within body_timeout",
                    413: "Body too large",
                    429: "Too many sign-in attempts",
                }
            ),
        },
    },
    ("delete", "/users/tokens"): {
        "operationId": "logout",
        "summary": "Sign out: every token of the sign-in is revoked",
        "tags": ["users"],
        "requestBody": _body("RefreshToken"),
        "responses": {
            "204": _empty("Signed out"),
            **_problems(
                {
                    400: "Invalid body",
                    401: "Not a valid refresh token",
                    404: f"{_NO_USERS} (about:blank)",
                    408: "The body did not arrive within body_timeout",
                    413: "Body too large",
                }
            ),
        },
    },
    ("post", "/users/tokens/refresh"): {
        "operationId": "refreshLogin",
        "summary": "A new pair for a refresh token, which is spent",
        "description": "A refresh token presented a second time revokes its whole sign-in.",
        "tags": ["users"],
        "requestBody": _body("RefreshToken"),
        "responses": {
            "200": _json("TokenPair", "The next pair", _NO_STORE),
            **_problems(
                {
                    400: "Invalid body",
                    401: "Not a valid refresh token, one used before, or a sign-in that ended",
                    404: f"{_NO_USERS} (about:blank)",
                    408: "The body did not arrive within body_timeout",
                    413: "Body too large",
                }
            ),
        },
    },
    ("get", "/users/me"): {
        "operationId": "me",
        "summary": "The signed-in user",
        "tags": ["users"],
        "security": [{"accessToken": []}, {"accessCookie": []}],
        "responses": {
            "200": _json("Me", "The user and its roles", _NO_STORE),
            **_problems(
                {401: "No access token, or not a valid one (about:blank)"}, challenge=False
            ),
        },
    },
    ("post", "/password/recovery"): {
        "operationId": "passwordRecovery",
        "summary": "Mail a recovery key to a user",
        "description": "Answered at once, the same whether the email is a user's or not.",
        "tags": ["users"],
        "requestBody": _body("RecoveryRequest"),
        "responses": {
            "202": _empty("Accepted: a user with that email gets a mail"),
            **_problems(
                {
                    400: "Invalid body or email",
                    404: f"Recovery is off (no smtp_host), or {_NO_USERS} (about:blank)",
                    408: "The body did not arrive within body_timeout",
                    413: "Body too large",
                }
            ),
        },
    },
    ("post", "/password/reset"): {
        "operationId": "passwordReset",
        "summary": "Set a new password with a recovery key; every sign-in of the user ends",
        "tags": ["users"],
        "requestBody": _body("PasswordReset"),
        "responses": {
            "204": _empty("Password set"),
            **_problems(
                {
                    400: "Invalid body or password",
                    401: "Not a valid recovery key, one used before, or a disabled user",
                    404: f"{_NO_USERS} (about:blank)",
                    408: "The body did not arrive within body_timeout",
                    413: "Body too large",
                }
            ),
        },
    },
    ("post", "/auth/exchange"): {
        "operationId": "exchange",
        "summary": "Trade an identity provider's login token for broker credentials",
        "description": "The token is verified with the domain's provider; its claims give the"
        " rights through the provider's rules. Browsers may call it from an origin the"
        " providers list (cors_origins).",
        "tags": ["exchange"],
        "requestBody": _body("ExchangeRequest"),
        "responses": {
            "200": _json("BrokerCredentials", "The credentials", {**_NO_STORE, **_CORS}),
            **_exchange_problems(_EXCHANGE_KINDS),
        },
    },
    ("post", "/auth/refresh"): {
        "operationId": "refreshExchange",
        "summary": "Fresh credentials for the current ones of an exchange",
        "description": "The same token_id, username and rights, a new password; while the"
        " current password is valid and the session younger than the provider's"
        " max_session.",
        "tags": ["exchange"],
        "requestBody": _body("ExchangeRefresh"),
        "responses": {
            "200": _json("BrokerCredentials", "The credentials", {**_NO_STORE, **_CORS}),
            **_exchange_problems(_REFRESH_KINDS),
        },
    },
    ("get", "/oauth/{provider}/login"): {
        "operationId": "signinLogin",
        "summary": "Begin a sign-in with a provider: redirect to it",
        "description": "Sets a sealed cookie bound to this browser for the callback.",
        "tags": ["sign-in"],
        "parameters": [{"name": "provider", "in": "path", "required": True, "schema": _str}],
        "responses": {
            "302": _empty(
                "To the provider; to failure_url?error=<reason> when it cannot begin",
                {"Location": {"schema": _str}, "Set-Cookie": {"schema": _str}},
            ),
            **_problems(
                {404: "No such provider, or no sign-in providers on this gateway (about:blank)"}
            ),
        },
    },
    ("get", "/oauth/{provider}/callback"): {
        "operationId": "signinCallback",
        "summary": "Where the provider sends the browser back",
        "description": "On success, Conduit's tokens are set as cookies (conduit_access,"
        " conduit_refresh) and the browser goes to success_url; on any failure to"
        " failure_url?error=<reason>.",
        "tags": ["sign-in"],
        "parameters": [
            {"name": "provider", "in": "path", "required": True, "schema": _str},
            {"name": "code", "in": "query", "schema": _str},
            {"name": "state", "in": "query", "schema": _str},
            {"name": "error", "in": "query", "schema": _str},
        ],
        "responses": {
            "302": _empty(
                "To success_url or failure_url",
                {"Location": {"schema": _str}, "Set-Cookie": {"schema": _str}},
            ),
            **_problems(
                {404: "No such provider, or no sign-in providers on this gateway (about:blank)"}
            ),
        },
    },
    ("options", "/auth/exchange"): {
        "operationId": "exchangePreflight",
        "summary": "CORS preflight of the exchange",
        "tags": ["exchange"],
        "responses": {
            "204": _empty(
                "The Origin is one a provider lists (cors_origins)",
                {
                    "Access-Control-Allow-Origin": {"schema": _str},
                    "Access-Control-Allow-Methods": {"schema": _str},
                    "Access-Control-Allow-Headers": {"schema": _str},
                    "Access-Control-Max-Age": {"schema": _str},
                },
            ),
            "403": _empty("No Origin, or one no provider lists (no body)"),
        },
    },
    ("get", "/health"): {
        "operationId": "health",
        "summary": "Liveness and readiness, with backend status",
        "tags": ["operations"],
        "responses": {
            "200": _json("Health", "Every backend answers"),
            "503": _json("Health", "A backend is down, or the server is stopping"),
        },
    },
    ("get", "/openapi.json"): {
        "operationId": "openapi",
        "summary": "This description",
        "tags": ["operations"],
        "parameters": [{"name": "If-None-Match", "in": "header", "schema": _str}],
        "responses": {
            "200": {
                "description": "The OpenAPI 3.1 document",
                "headers": {
                    "ETag": {"schema": _str},
                    "Cache-Control": {"description": "public, max-age=3600", "schema": _str},
                },
                "content": {"application/json": {"schema": {"type": "object"}}},
            },
            "304": _empty("Not modified (If-None-Match names the ETag)"),
        },
    },
}
# The refresh's preflight is the exchange's.
OPERATIONS[("options", "/auth/refresh")] = {
    **OPERATIONS[("options", "/auth/exchange")],
    "operationId": "refreshPreflight",
    "summary": "CORS preflight of the refresh",
}
# GET routes that answer HEAD as well: the same answers without their bodies.
HEAD = ("/health", "/openapi.json", "/.well-known/jwks.json")


def _head(operation: dict[str, Any]) -> dict[str, Any]:
    head = copy.deepcopy(operation)
    head["operationId"] += "Head"
    head["summary"] += " (the headers of GET)"
    for answer in head["responses"].values():
        answer.pop("content", None)
    return head


def spec() -> dict[str, Any]:
    """The OpenAPI document."""
    paths: dict[str, Any] = {}
    for (method, path), operation in OPERATIONS.items():
        paths.setdefault(path, {})[method] = operation
    for path in HEAD:
        paths[path]["head"] = _head(paths[path]["get"])
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Conduit HTTP API",
            "version": "1",
            "description": "The public HTTP listeners (http_port, and https_port with TLS):"
            " publish with POST and subscribe with Server-Sent Events on"
            " /m/<domain>/c/<channel>[/<subtopic>], broker tokens, users' sign-in, the"
            " exchange of an identity provider's token for broker credentials. Refusals are"
            " application/problem+json (RFC 9457). The management API, on its own listener,"
            " has its own description.",
        },
        "tags": [
            {"name": "messaging", "description": "Publish and subscribe (docs/http.md)"},
            {"name": "tokens", "description": "Broker tokens and the keys that verify them"},
            {"name": "users", "description": "Users' sign-in and password (docs/users.md)"},
            {
                "name": "exchange",
                "description": "An app's login token for broker credentials"
                " (docs/identity-providers.md)",
            },
            {"name": "sign-in", "description": "Sign in with an OpenID Connect provider"},
            {"name": "operations", "description": "Health and this description"},
        ],
        "paths": paths,
        "components": {"schemas": SCHEMAS, "securitySchemes": SECURITY_SCHEMES},
    }
