"""The OpenAPI 3.1 description of the management API, served at ``GET /openapi.json``.

Kept as data beside the routes; a test checks that the two name the same operations.
"""

from __future__ import annotations

from typing import Any

_str = {"type": "string"}
_meta = {"type": "object", "additionalProperties": _str}
_named = {
    "type": "object",
    "required": ["name"],
    "properties": {"name": _str, "metadata": _meta},
}

SCHEMAS: dict[str, Any] = {
    "Problem": {
        "type": "object",
        "description": "RFC 9457 problem details",
        "properties": {
            "type": _str,
            "title": _str,
            "status": {"type": "integer"},
            "detail": _str,
        },
    },
    "Named": _named,
    "Domain": {
        "type": "object",
        "properties": {"name": _str, "created": {"type": "number"}, "metadata": _meta},
    },
    "Client": {
        "type": "object",
        "properties": {
            "id": _str,
            "domain": _str,
            "name": _str,
            "enabled": {"type": "boolean"},
            "created": {"type": "number"},
            "metadata": _meta,
        },
    },
    "ClientWithSecret": {
        "allOf": [
            {"$ref": "#/components/schemas/Client"},
            {
                "type": "object",
                "properties": {
                    "secret": {
                        "type": "string",
                        "description": "Shown once; stored only as a hash",
                    }
                },
            },
        ],
    },
    "DTLSKey": {
        "type": "object",
        "properties": {
            "client": {"type": "string", "description": "The client's id"},
            "identity": {
                "type": "string",
                "description": "The PSK identity: the client id without dashes",
            },
            "key": {
                "type": "string",
                "description": "The pre-shared key (16 characters, 96 random bits); shown once,"
                " stored encrypted",
            },
        },
    },
    "Channel": {
        "type": "object",
        "properties": {
            "id": _str,
            "domain": _str,
            "name": _str,
            "created": {"type": "number"},
            "metadata": _meta,
        },
    },
    "ConnectionRequest": {
        "type": "object",
        "required": ["client", "channel"],
        "properties": {
            "client": {"type": "string", "description": "client id or name"},
            "channel": {"type": "string", "description": "channel name"},
            "publish": {"type": "boolean", "default": True},
            "subscribe": {"type": "boolean", "default": True},
        },
    },
    "Connection": {
        "type": "object",
        "properties": {
            "domain": _str,
            "client_id": _str,
            "channel": _str,
            "publish": {"type": "boolean"},
            "subscribe": {"type": "boolean"},
        },
    },
    "CertificateRequest": {
        "type": "object",
        "description": "Every field is optional",
        "properties": {
            "key_type": {
                "type": "string",
                "enum": ["ec", "rsa2048", "rsa4096", "ed25519"],
                "default": "ec",
            },
            "days": {"type": "integer", "minimum": 1, "default": 730},
            "csr": {
                "type": "string",
                "description": "A PEM CSR to sign instead of making a key; its subject is not used",
            },
            "secret": {
                "type": "string",
                "description": "The client's secret: required with"
                " mtls_identity = secret, where it is the CN",
            },
        },
    },
    "IssuedCertificate": {
        "type": "object",
        "properties": {
            "serial": {"type": "string", "description": "Lowercase hexadecimal"},
            "kind": {"type": "string", "enum": ["client", "server"]},
            "common_name": _str,
            "domain": {"type": ["string", "null"]},
            "client_id": {"type": ["string", "null"]},
            "not_before": {"type": "number"},
            "not_after": {"type": "number"},
            "issued": {"type": "number"},
            "revoked": {"type": ["number", "null"], "description": "When; null while good"},
            "pem": {"type": "string", "description": "Empty with mtls_identity = secret"},
        },
    },
    "IssuedCertificateWithKey": {
        "allOf": [
            {"$ref": "#/components/schemas/IssuedCertificate"},
            {
                "type": "object",
                "properties": {
                    "key": {
                        "type": "string",
                        "description": "PEM private key, shown once and not kept (absent for"
                        " a CSR)",
                    },
                    "ca": {"type": "string", "description": "PEM certificate of the CA"},
                },
            },
        ],
    },
    "UserRequest": {
        "type": "object",
        "required": ["email", "name"],
        "properties": {
            "email": _str,
            "name": _str,
            "password": {
                "type": "string",
                "description": "12 to 1024 characters; omit for a"
                " user who signs in with an identity provider only",
            },
            "platform_admin": {"type": "boolean", "default": False},
        },
    },
    "User": {
        "type": "object",
        "properties": {
            "id": _str,
            "email": _str,
            "name": _str,
            "enabled": {"type": "boolean"},
            "platform_admin": {"type": "boolean"},
            "created": {"type": "number"},
            "last_login": {"type": ["number", "null"]},
        },
    },
    "UserWithRoles": {
        "allOf": [
            {"$ref": "#/components/schemas/User"},
            {
                "type": "object",
                "properties": {
                    "roles": {"type": "object", "additionalProperties": _str},
                },
            },
        ],
    },
    "Password": {
        "type": "object",
        "required": ["password"],
        "properties": {"password": _str},
    },
    "RoleRequest": {
        "type": "object",
        "required": ["role"],
        "properties": {"role": {"type": "string", "enum": ["admin", "member"]}},
    },
    "Member": {
        "type": "object",
        "properties": {"user_id": _str, "domain": _str, "role": _str},
    },
    "IdpRequest": {
        "type": "object",
        "required": ["name", "type", "rules"],
        "description": "supabase: url (and jwt_secret, its legacy HS256 secret, if its"
        " tokens are signed with it); firebase: project_id; auth0: tenant, audience; oidc:"
        " issuer, audience. Overrides: issuer, audience, keys_url, algorithms. ttl, max_ttl,"
        " enabled.",
        "properties": {
            "name": _str,
            "type": {"type": "string", "enum": ["supabase", "firebase", "auth0", "oidc"]},
            "jwt_secret": {
                "type": "string",
                "minLength": 32,
                "writeOnly": True,
                "description": "supabase only: the project's legacy JWT secret; its tokens"
                " are verified with HS256 (and nothing else). Kept encrypted, never shown.",
            },
            "rules": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "when": {"type": "object"},
                        "publish": {"type": "array", "items": _str},
                        "subscribe": {"type": "array", "items": _str},
                    },
                },
            },
        },
        "additionalProperties": True,
    },
    "IdpChange": {
        "type": "object",
        "description": "Merged into the registration: a null removes a field (jwt_secret:"
        " null removes the secret; a new jwt_secret replaces it).",
        "additionalProperties": True,
    },
    "Idp": {
        "type": "object",
        "properties": {
            "domain": _str,
            "name": _str,
            "type": _str,
            "enabled": {"type": "boolean"},
            "issuer": _str,
            "audience": _str,
            "keys_url": {"type": ["string", "null"]},
            "algorithms": {"type": "array", "items": _str},
            "jwt_secret": {
                "type": "string",
                "enum": ["set"],
                "description": "Present when a jwt_secret is set; its value is never shown",
            },
            "ttl": {"type": "integer"},
            "max_ttl": {"type": "integer"},
            "rules": {"type": "array", "items": {"type": "object"}},
        },
    },
    "TokenTest": {"type": "object", "required": ["token"], "properties": {"token": _str}},
    "Subject": {"type": "object", "required": ["subject"], "properties": {"subject": _str}},
    "Revocation": {
        "type": "object",
        "properties": {"domain": _str, "subject": _str, "revoked": {"type": "number"}},
    },
    "SigningKey": {
        "type": "object",
        "properties": {
            "kid": _str,
            "algorithm": {"type": "string", "enum": ["EdDSA", "ES256"]},
            "created": {"type": "number"},
            "retires": {
                "type": ["number", "null"],
                "description": "When it stops verifying; null while it signs",
            },
            "signs": {"type": "boolean"},
        },
    },
    "Revoked": {
        "type": "object",
        "properties": {
            "revoked": {
                "type": "array",
                "items": _str,
                "description": "Serials revoked by this call (not those revoked before)",
            }
        },
    },
    "Health": {
        "type": "object",
        "properties": {"status": _str, "store": _str, "bus": _str},
    },
}

# (method, path): (summary, request schema or None, success status, response schema or None)
OPERATIONS: dict[tuple[str, str], tuple[str, str | None, int, str | None]] = {
    ("get", "/health"): ("Liveness and readiness, with backend status", None, 200, "Health"),
    ("get", "/metrics"): ("Prometheus metrics", None, 200, None),
    ("get", "/openapi.json"): ("This description", None, 200, None),
    ("post", "/domains"): ("Create a domain", "Named", 201, "Domain"),
    ("get", "/domains"): ("List domains", None, 200, "Domain[]"),
    ("get", "/domains/{domain}"): ("Show a domain", None, 200, "Domain"),
    ("delete", "/domains/{domain}"): ("Delete a domain and all it holds", None, 204, None),
    ("post", "/domains/{domain}/clients"): (
        "Create a client; the answer holds its secret, shown this once",
        "Named",
        201,
        "ClientWithSecret",
    ),
    ("get", "/domains/{domain}/clients"): ("List clients", None, 200, "Client[]"),
    ("get", "/domains/{domain}/clients/{client}"): (
        "Show a client (by id or name)",
        None,
        200,
        "Client",
    ),
    ("delete", "/domains/{domain}/clients/{client}"): ("Delete a client", None, 204, None),
    ("post", "/domains/{domain}/clients/{client}/enable"): (
        "Enable a client",
        None,
        200,
        "Client",
    ),
    ("post", "/domains/{domain}/clients/{client}/disable"): (
        "Disable a client; refused from now on",
        None,
        200,
        "Client",
    ),
    ("post", "/domains/{domain}/clients/{client}/secret"): (
        "Give the client a new secret, shown this once",
        None,
        200,
        "ClientWithSecret",
    ),
    ("post", "/domains/{domain}/clients/{client}/dtls-key"): (
        "Give the client a DTLS pre-shared key (CoAP over DTLS), shown this once; again: a new"
        " key, the old one stops working",
        None,
        201,
        "DTLSKey",
    ),
    ("delete", "/domains/{domain}/clients/{client}/dtls-key"): (
        "Revoke the client's DTLS key: its handshakes fail, its DTLS sessions end",
        None,
        204,
        None,
    ),
    ("post", "/domains/{domain}/channels"): ("Create a channel", "Named", 201, "Channel"),
    ("get", "/domains/{domain}/channels"): ("List channels", None, 200, "Channel[]"),
    ("get", "/domains/{domain}/channels/{channel}"): ("Show a channel", None, 200, "Channel"),
    ("delete", "/domains/{domain}/channels/{channel}"): ("Delete a channel", None, 204, None),
    ("post", "/domains/{domain}/connections"): (
        "Connect a client to a channel (create or update its rights)",
        "ConnectionRequest",
        201,
        "Connection",
    ),
    ("get", "/domains/{domain}/connections"): (
        "List connections, optionally of one client or channel",
        None,
        200,
        "Connection[]",
    ),
    ("delete", "/domains/{domain}/connections/{client}/{channel}"): (
        "Disconnect a client from a channel",
        None,
        204,
        None,
    ),
    ("post", "/domains/{domain}/clients/{client}/certs"): (
        "Issue a client certificate (or sign a CSR) from Conduit's CA; the key is shown once",
        "CertificateRequest",
        201,
        "IssuedCertificateWithKey",
    ),
    ("get", "/domains/{domain}/clients/{client}/certs"): (
        "List a client's certificates",
        None,
        200,
        "IssuedCertificate[]",
    ),
    ("delete", "/domains/{domain}/clients/{client}/certs"): (
        "Revoke every certificate of a client; its connections made with them end",
        None,
        200,
        "Revoked",
    ),
    ("get", "/certs"): (
        "List the certificates Conduit's CA issued, optionally of a domain or client",
        None,
        200,
        "IssuedCertificate[]",
    ),
    ("get", "/certs/{serial}"): (
        "Show a certificate (serial in hex)",
        None,
        200,
        "IssuedCertificate",
    ),
    ("delete", "/certs/{serial}"): (
        "Revoke a certificate; the CRL is made again and its connections end",
        None,
        200,
        "IssuedCertificate",
    ),
    ("post", "/users"): ("Create a user (platform administrators)", "UserRequest", 201, "User"),
    ("get", "/users"): ("List users", None, 200, "User[]"),
    ("get", "/users/{user}"): (
        "Show a user (by id or email) with its roles",
        None,
        200,
        "UserWithRoles",
    ),
    ("delete", "/users/{user}"): ("Delete a user", None, 204, None),
    ("post", "/users/{user}/enable"): ("Enable a user", None, 200, "User"),
    ("post", "/users/{user}/disable"): (
        "Disable a user; its sign-ins end at once",
        None,
        200,
        "User",
    ),
    ("put", "/users/{user}/password"): ("Set a user's password", "Password", 200, "User"),
    ("get", "/domains/{domain}/members"): (
        "The users with a role in the domain",
        None,
        200,
        "Member[]",
    ),
    ("put", "/domains/{domain}/members/{user}"): (
        "Give a user a role in the domain (replacing the one it had)",
        "RoleRequest",
        200,
        "Member",
    ),
    ("delete", "/domains/{domain}/members/{user}"): (
        "Take a user's role in the domain away",
        None,
        204,
        None,
    ),
    ("post", "/domains/{domain}/idps"): (
        "Register an identity provider of the domain (its type's fields, rules, ttl)",
        "IdpRequest",
        201,
        "Idp",
    ),
    ("get", "/domains/{domain}/idps"): ("List the domain's identity providers", None, 200, "Idp[]"),
    ("get", "/domains/{domain}/idps/{name}"): (
        "Show a provider: what was given and what Conduit derived",
        None,
        200,
        "Idp",
    ),
    ("patch", "/domains/{domain}/idps/{name}"): (
        "Change a provider (a JSON merge: null removes a field)",
        "IdpChange",
        200,
        "Idp",
    ),
    ("delete", "/domains/{domain}/idps/{name}"): ("Remove a provider", None, 204, None),
    ("post", "/domains/{domain}/idps/{name}/test"): (
        "What an exchange of a token would grant (its claims and rights), issuing nothing",
        "TokenTest",
        200,
        None,
    ),
    ("post", "/domains/{domain}/revocations"): (
        "Revoke a token holder (<provider>:<sub>, or a client id): its tokens issued until now"
        " stop, its connections end, its credentials are not refreshed",
        "Subject",
        200,
        "Revocation",
    ),
    ("get", "/keys"): (
        "The keys that sign and verify Conduit's tokens (public facts only)",
        None,
        200,
        "SigningKey[]",
    ),
    ("post", "/keys/rotate"): (
        "A new signing key signs from now on; the others verify for signing_key_grace more",
        None,
        200,
        "SigningKey",
    ),
    ("get", "/pki/ca.pem"): ("The CA certificate (PEM)", None, 200, "pem"),
    ("get", "/pki/crl.pem"): ("The CRL, signed now (PEM)", None, 200, "pem"),
    ("post", "/pki/ocsp"): ("OCSP (RFC 6960), a DER request in the body", "ocsp", 200, "ocsp"),
    ("get", "/pki/ocsp/{request}"): (
        "OCSP (RFC 6960), a base64 DER request in the path (URL-encoded)",
        None,
        200,
        "ocsp",
    ),
}

_OPEN = {"/health", "/metrics", "/openapi.json"}
_OPEN_PREFIX = "/pki/"
# Bodies that are not JSON, by their OPERATIONS name.
_MEDIA = {
    "pem": ("application/x-pem-file", {"type": "string"}),
    "ocsp": ("application/ocsp-response", {"type": "string", "format": "binary"}),
}
_MEDIA_REQUEST = {"ocsp": ("application/ocsp-request", {"type": "string", "format": "binary"})}
# Query parameters, all optional strings.
_QUERY = {
    ("get", "/domains/{domain}/connections"): ("client", "channel"),
    ("get", "/certs"): ("domain", "client"),
}


def _schema(name: str) -> dict[str, Any]:
    if name.endswith("[]"):
        return {"type": "array", "items": _schema(name[:-2])}
    return {"$ref": f"#/components/schemas/{name}"}


def _problem(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/problem+json": {"schema": _schema("Problem")}},
    }


def spec() -> dict[str, Any]:
    paths: dict[str, Any] = {}
    for (method, path), (summary, request, status, response) in OPERATIONS.items():
        op: dict[str, Any] = {"summary": summary, "responses": {}}
        params = [p.strip("{}") for p in path.split("/") if p.startswith("{")]
        parameters = [{"name": p, "in": "path", "required": True, "schema": _str} for p in params]
        parameters += [
            {"name": q, "in": "query", "required": False, "schema": _str}
            for q in _QUERY.get((method, path), ())
        ]
        if parameters:
            op["parameters"] = parameters
        if request in _MEDIA_REQUEST:
            media, schema = _MEDIA_REQUEST[request]
            op["requestBody"] = {"required": True, "content": {media: {"schema": schema}}}
        elif request:
            op["requestBody"] = {
                "required": request != "CertificateRequest",
                "content": {"application/json": {"schema": _schema(request)}},
            }
        ok: dict[str, Any] = {"description": "Success"}
        if response in _MEDIA:
            media, schema = _MEDIA[response]
            ok["content"] = {media: {"schema": schema}}
        elif response:
            ok["content"] = {"application/json": {"schema": _schema(response)}}
        op["responses"][str(status)] = ok
        if path.startswith(_OPEN_PREFIX):
            op["responses"]["404"] = _problem("No CA in pki_dir")
        if path not in _OPEN and not path.startswith(_OPEN_PREFIX):
            op["security"] = [{"adminKey": []}]
            op["responses"]["401"] = _problem("Missing or wrong admin key or access token")
            op["responses"]["403"] = _problem(
                "A user's role does not allow it (members read their domains, admins manage"
                " them, platform administrators manage domains and users)"
            )
            op["responses"]["404"] = _problem(
                "No such domain, client, channel, connection, certificate or DTLS key; no CA in"
                " pki_dir"
            )
        if request and request not in _MEDIA_REQUEST:
            op["responses"]["400"] = _problem("Invalid request body or name")
            op["responses"]["408"] = _problem("The body did not arrive within body_timeout")
        if method == "post" and status == 201 and request:
            op["responses"]["409"] = _problem(
                "Already exists (a domain or channel of that name; a client of that name in"
                " the domain)"
            )
        paths.setdefault(path, {})[method] = op
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Conduit management API",
            "version": "1",
            "description": "Provisioning of domains, clients, channels, connections and DTLS"
            " keys; the certificates of Conduit's CA, its CRL and its OCSP responder.",
        },
        "paths": paths,
        "components": {
            "schemas": SCHEMAS,
            "securitySchemes": {
                "adminKey": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "The admin key (CONDUIT_ADMIN_KEY or <data_dir>/admin.key),"
                    " or a user's access token (POST /users/tokens on the HTTP listeners)",
                },
            },
        },
    }
