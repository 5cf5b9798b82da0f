"""The management API: provisioning over REST, plus ``/health`` and ``/metrics``.

It listens on its own address (127.0.0.1 by default) and every provisioning route requires the
admin key as ``Authorization: Bearer <key>``. ``/health``, ``/metrics`` and ``/openapi.json``
are open, for probes and scrapers on the same host, and so are the public parts of Conduit's CA
under ``/pki/`` (its certificate, its CRL and its OCSP responder), for relying parties. The
routes are described in ``conduit.openapi``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import os
import secrets
import time
import urllib.parse
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import orjson
from aiohttp import web

from conduit.openapi import spec as openapi
from conduit.settings import ADMIN_KEY_FILE as KEY_FILE
from core.bus import Change
from core.errors import (
    PROBLEM_JSON,
    AuthenticationError,
    ConduitError,
    RequestTimeoutError,
    plain_problem,
    problem,
)
from core.gateway import Gateway
from core.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from core.provisioning import InvalidRequest
from core.store import Conflict, NotFound, StoreError
from core.topics import NAME_RE
from core.users import InvalidUser, Principal, check_role

if TYPE_CHECKING:
    from certs.authority import Authority
    from core.users import Users

OPEN_ROUTES = ("/health", "/metrics", "/openapi.json")
PRINCIPAL = web.RequestKey("principal", Principal)  # who calls: set by the middleware
OPEN_PREFIX = "/pki/"  # the CA's certificate, CRL and OCSP responder: public by nature
MAX_OCSP_REQUEST = 16384  # bytes of an OCSP request (one is a few hundred)

MIN_ADMIN_KEY = 32
"""Characters an admin key must have at least (a generated one has 43: 256 random bits)."""


class WeakAdminKey(ValueError):
    """The configured admin key is too short to protect the management API."""


def admin_key(data_dir: Path, configured: str | None) -> str:
    """The admin key: the configured one, or the one kept in the data directory (made once).
    Raises :class:`WeakAdminKey` for a key shorter than :data:`MIN_ADMIN_KEY` characters (an
    empty or blank one included), which must not start a server."""
    if configured is not None:
        return _strong(configured.strip(), "the admin_key setting (CONDUIT_ADMIN_KEY)")
    path = data_dir / KEY_FILE
    if path.exists():
        return _strong(path.read_text().strip(), str(path))
    data_dir.mkdir(parents=True, exist_ok=True)
    key = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key + "\n")
    return key


def _strong(key: str, source: str) -> str:
    if len(key) < MIN_ADMIN_KEY:
        raise WeakAdminKey(
            f"admin key from {source} has {len(key)} characters; at least {MIN_ADMIN_KEY} are"
            " needed (make one with: openssl rand -hex 32)"
        )
    return key


def _problem(status: int, title: str, detail: str) -> web.Response:
    body = orjson.dumps(plain_problem(status, title, detail))
    return web.Response(status=status, body=body, content_type=PROBLEM_JSON)


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(
        status=status, body=orjson.dumps(data, default=_default), content_type="application/json"
    )


def _default(obj: Any) -> Any:
    if hasattr(obj, "__dataclass_fields__"):
        return {k: getattr(obj, k) for k in obj.__dataclass_fields__}
    raise TypeError


class ManagementAPI:
    def __init__(
        self,
        gateway: Gateway,
        key: str,
        *,
        body_timeout: float = 30.0,
        pki: Path | None = None,
        mtls_identity: Literal["client_id", "secret"] = "client_id",
        idp_allow_http: bool = False,
        exchange: Any = None,
    ) -> None:
        self.gateway = gateway
        self.body_timeout = body_timeout
        self.prov = gateway.provisioning
        self._key = key.encode()
        self._pki = pki
        self._mtls_identity = mtls_identity
        self._idp_allow_http = idp_allow_http
        self._exchange = exchange  # core.idps.Exchange; made at the first test when not given
        self._authority: Authority | None = None
        app = web.Application(middlewares=[self._errors])
        r = app.router
        r.add_get("/health", self.health)
        r.add_get("/metrics", self.metrics)
        r.add_get("/openapi.json", self.spec)
        r.add_post("/domains", self.create_domain)
        r.add_get("/domains", self.list_domains)
        r.add_get("/domains/{domain}", self.get_domain)
        r.add_delete("/domains/{domain}", self.delete_domain)
        r.add_post("/domains/{domain}/clients", self.create_client)
        r.add_get("/domains/{domain}/clients", self.list_clients)
        r.add_get("/domains/{domain}/clients/{client}", self.get_client)
        r.add_delete("/domains/{domain}/clients/{client}", self.delete_client)
        r.add_post("/domains/{domain}/clients/{client}/enable", self.enable_client)
        r.add_post("/domains/{domain}/clients/{client}/disable", self.disable_client)
        r.add_post("/domains/{domain}/clients/{client}/secret", self.rotate_secret)
        r.add_post("/domains/{domain}/clients/{client}/dtls-key", self.create_dtls_key)
        r.add_delete("/domains/{domain}/clients/{client}/dtls-key", self.revoke_dtls_key)
        r.add_post("/domains/{domain}/channels", self.create_channel)
        r.add_get("/domains/{domain}/channels", self.list_channels)
        r.add_get("/domains/{domain}/channels/{channel}", self.get_channel)
        r.add_delete("/domains/{domain}/channels/{channel}", self.delete_channel)
        r.add_post("/domains/{domain}/connections", self.connect)
        r.add_get("/domains/{domain}/connections", self.list_connections)
        r.add_delete("/domains/{domain}/connections/{client}/{channel}", self.disconnect)
        r.add_post("/domains/{domain}/clients/{client}/certs", self.issue_certificate)
        r.add_get("/domains/{domain}/clients/{client}/certs", self.client_certificates)
        r.add_delete("/domains/{domain}/clients/{client}/certs", self.revoke_client_certificates)
        r.add_get("/certs", self.list_certificates)
        r.add_get("/certs/{serial}", self.get_certificate)
        r.add_delete("/certs/{serial}", self.revoke_certificate)
        r.add_post("/users", self.create_user)
        r.add_get("/users", self.list_users)
        r.add_get("/users/{user}", self.get_user)
        r.add_delete("/users/{user}", self.delete_user)
        r.add_post("/users/{user}/enable", self.enable_user)
        r.add_post("/users/{user}/disable", self.disable_user)
        r.add_put("/users/{user}/password", self.set_password)
        r.add_get("/domains/{domain}/members", self.list_members)
        r.add_put("/domains/{domain}/members/{user}", self.set_member)
        r.add_delete("/domains/{domain}/members/{user}", self.remove_member)
        r.add_post("/domains/{domain}/idps", self.add_idp)
        r.add_get("/domains/{domain}/idps", self.list_idps)
        r.add_get("/domains/{domain}/idps/{name}", self.get_idp)
        r.add_patch("/domains/{domain}/idps/{name}", self.update_idp)
        r.add_delete("/domains/{domain}/idps/{name}", self.remove_idp)
        r.add_post("/domains/{domain}/idps/{name}/test", self.test_idp)
        r.add_post("/domains/{domain}/revocations", self.revoke_subject)
        r.add_get("/keys", self.list_keys)
        r.add_post("/keys/rotate", self.rotate_keys)
        r.add_get("/pki/ca.pem", self.ca_certificate)
        r.add_get("/pki/crl.pem", self.crl)
        r.add_post("/pki/ocsp", self.ocsp)
        r.add_get("/pki/ocsp/{request:.+}", self.ocsp)
        self.app = app

    async def _principal(self, request: web.Request) -> Principal:
        """The admin key (a platform principal), or a user's access token."""
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise AuthenticationError(
                "send the admin key or a user's access token: Authorization: Bearer <token>"
            )
        if hmac.compare_digest(token.encode(), self._key):
            return Principal(None)
        users = self.gateway.users
        if users is None or not token.startswith("eyJ"):
            raise AuthenticationError("not the admin key, nor a user's access token")
        return await users.principal(token)

    @staticmethod
    def _allowed(principal: Principal, request: web.Request) -> bool:
        """Platform principals may do anything. Within a domain, its members read and its
        admins manage; listing domains is open to every user (each sees its own)."""
        if principal.platform:
            return True
        route = request.match_info.route.resource
        path = route.canonical if route is not None else request.path
        if path == "/domains":
            return request.method == "GET"
        if path.startswith("/domains/{domain}/"):
            domain = request.match_info["domain"]
            if request.method == "GET":
                return principal.may_read(domain)
            return principal.may_manage(domain)
        if path == "/domains/{domain}":
            return request.method == "GET" and principal.may_read(request.match_info["domain"])
        return False

    @property
    def authority(self) -> Authority:
        """Conduit's CA with the store's record (made at first use: ``cryptography`` is loaded
        only by a deployment that uses it)."""
        if self._authority is None:
            from certs import NoCA
            from certs.authority import Authority

            if self._pki is None:
                raise NoCA("this server has no PKI directory (pki_dir)")
            self._authority = Authority(
                self.gateway.store,
                self._pki,
                mode=self._mtls_identity,
                announce=self.gateway.bus.announce,
            )
        return self._authority

    @web.middleware
    async def _errors(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if request.path not in OPEN_ROUTES and not request.path.startswith(OPEN_PREFIX):
            try:
                principal = await self._principal(request)
            except AuthenticationError as exc:
                return _problem(401, "Unauthorized", exc.detail)
            if not self._allowed(principal, request):
                return _problem(
                    403, "Forbidden", "your role does not allow this (see docs/users.md)"
                )
            request[PRINCIPAL] = principal
        try:
            response: web.StreamResponse = await handler(request)
            return response
        except NotFound as exc:
            return _problem(404, "Not found", str(exc))
        except Conflict as exc:
            return _problem(409, "Conflict", str(exc))
        except (InvalidRequest, StoreError, InvalidUser) as exc:
            return _problem(400, "Invalid request", str(exc))
        except ValueError as exc:  # certs.PKIError: a CSR, key type or secret refused; no CA
            from certs import NoCA, PKIError

            if isinstance(exc, NoCA):
                return _problem(404, "Not found", str(exc))
            if isinstance(exc, PKIError):
                return _problem(400, "Invalid request", str(exc))
            raise
        except ConduitError as exc:  # the store or the bus is unavailable; a body too slow
            status = exc.condition.answer.http
            answer = web.Response(
                status=status,
                body=orjson.dumps(problem(exc, status)),
                content_type=PROBLEM_JSON,
            )
            if isinstance(exc, RequestTimeoutError):
                answer.force_close()  # what is left of the body would be read as a request
            return answer
        except web.HTTPException as exc:
            if exc.status >= 400:
                return _problem(exc.status, exc.reason, exc.text or exc.reason)
            raise

    async def _body(self, request: web.Request, *required: str) -> dict[str, Any]:
        try:
            async with asyncio.timeout(self.body_timeout):
                body = await request.json(loads=orjson.loads) if request.can_read_body else {}
        except ValueError:
            raise InvalidRequest("the body is not valid JSON") from None
        except TimeoutError:
            raise RequestTimeoutError(
                f"the body did not arrive within {self.body_timeout:g} s"
            ) from None
        if not isinstance(body, dict):
            raise InvalidRequest("the body must be a JSON object")
        for name in required:
            if not isinstance(body.get(name), str):
                raise InvalidRequest(f"{name!r} is required (a string)")
        meta = body.get("metadata", {})
        if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
            raise InvalidRequest("'metadata' must be an object of strings")
        return body

    # open routes
    async def health(self, request: web.Request) -> web.Response:
        status = await self.gateway.health()
        return _json(status, 200 if status["status"] == "ok" else 503)

    async def metrics(self, request: web.Request) -> web.Response:
        resp = web.Response(body=self.gateway.metrics.exposition())
        resp.headers["Content-Type"] = METRICS_CONTENT_TYPE
        return resp

    async def spec(self, request: web.Request) -> web.Response:
        return _json(openapi())

    # domains
    async def create_domain(self, request: web.Request) -> web.Response:
        body = await self._body(request, "name")
        return _json(await self.prov.create_domain(body["name"], body.get("metadata")), 201)

    async def list_domains(self, request: web.Request) -> web.Response:
        principal = request[PRINCIPAL]
        domains = await self.prov.list_domains()
        return _json([d for d in domains if principal.may_read(d.name)])

    async def get_domain(self, request: web.Request) -> web.Response:
        return _json(await self.prov.get_domain(request.match_info["domain"]))

    async def delete_domain(self, request: web.Request) -> web.Response:
        await self.prov.delete_domain(request.match_info["domain"])
        return web.Response(status=204)

    # clients
    async def create_client(self, request: web.Request) -> web.Response:
        body = await self._body(request, "name")
        client, secret = await self.prov.create_client(
            request.match_info["domain"], body["name"], body.get("metadata")
        )
        return _json({**_default(client), "secret": secret}, 201)

    async def list_clients(self, request: web.Request) -> web.Response:
        return _json(await self.prov.list_clients(request.match_info["domain"]))

    async def get_client(self, request: web.Request) -> web.Response:
        m = request.match_info
        return _json(await self.prov.get_client(m["domain"], m["client"]))

    async def delete_client(self, request: web.Request) -> web.Response:
        m = request.match_info
        await self.prov.delete_client(m["domain"], m["client"])
        return web.Response(status=204)

    async def enable_client(self, request: web.Request) -> web.Response:
        m = request.match_info
        return _json(await self.prov.set_client_enabled(m["domain"], m["client"], True))

    async def disable_client(self, request: web.Request) -> web.Response:
        m = request.match_info
        return _json(await self.prov.set_client_enabled(m["domain"], m["client"], False))

    async def rotate_secret(self, request: web.Request) -> web.Response:
        m = request.match_info
        client, secret = await self.prov.rotate_secret(m["domain"], m["client"])
        return _json({**_default(client), "secret": secret})

    async def create_dtls_key(self, request: web.Request) -> web.Response:
        m = request.match_info
        grant = await self.prov.create_dtls_key(m["domain"], m["client"])
        return _json({"client": grant.client.id, "identity": grant.identity, "key": grant.key}, 201)

    async def revoke_dtls_key(self, request: web.Request) -> web.Response:
        m = request.match_info
        await self.prov.revoke_dtls_key(m["domain"], m["client"])
        return web.Response(status=204)

    # channels
    async def create_channel(self, request: web.Request) -> web.Response:
        body = await self._body(request, "name")
        channel = await self.prov.create_channel(
            request.match_info["domain"], body["name"], body.get("metadata")
        )
        return _json(channel, 201)

    async def list_channels(self, request: web.Request) -> web.Response:
        return _json(await self.prov.list_channels(request.match_info["domain"]))

    async def get_channel(self, request: web.Request) -> web.Response:
        m = request.match_info
        return _json(await self.prov.get_channel(m["domain"], m["channel"]))

    async def delete_channel(self, request: web.Request) -> web.Response:
        m = request.match_info
        await self.prov.delete_channel(m["domain"], m["channel"])
        return web.Response(status=204)

    # connections
    async def connect(self, request: web.Request) -> web.Response:
        body = await self._body(request, "client", "channel")
        publish, subscribe = body.get("publish", True), body.get("subscribe", True)
        if not isinstance(publish, bool) or not isinstance(subscribe, bool):
            raise InvalidRequest("'publish' and 'subscribe' must be booleans")
        conn = await self.prov.connect(
            request.match_info["domain"], body["client"], body["channel"], publish, subscribe
        )
        return _json(conn, 201)

    async def list_connections(self, request: web.Request) -> web.Response:
        q = request.query
        return _json(
            await self.prov.list_connections(
                request.match_info["domain"], q.get("client"), q.get("channel")
            )
        )

    async def disconnect(self, request: web.Request) -> web.Response:
        m = request.match_info
        await self.prov.disconnect(m["domain"], m["client"], m["channel"])
        return web.Response(status=204)

    # certificates of Conduit's CA
    async def issue_certificate(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        options = {k: body[k] for k in ("key_type", "days", "csr", "secret") if k in body}
        for name in ("key_type", "csr", "secret"):
            if name in options and not isinstance(options[name], str):
                raise InvalidRequest(f"{name!r} must be a string")
        days = options.get("days", 730)
        if not isinstance(days, int) or isinstance(days, bool) or days <= 0:
            raise InvalidRequest("'days' must be a positive integer")
        key_type = options.get("key_type", "ec")
        if key_type not in ("ec", "rsa2048", "rsa4096", "ed25519"):
            raise InvalidRequest("'key_type' is one of ec, rsa2048, rsa4096, ed25519")
        csr = options.get("csr")
        m = request.match_info
        issued, record = await self.authority.issue_client(
            m["domain"],
            m["client"],
            secret=options.get("secret"),
            key_type=key_type,
            days=days,
            csr_pem=csr.encode() if csr is not None else None,
        )
        answer = {**_default(record), "pem": issued.cert_pem().decode()}
        if issued.key is not None:
            answer["key"] = issued.key_pem().decode()
        answer["ca"] = self.authority.ca.cert_pem().decode()
        return _json(answer, 201)

    async def client_certificates(self, request: web.Request) -> web.Response:
        m = request.match_info
        client = await self.prov.get_client(m["domain"], m["client"])
        return _json(await self.gateway.store.list_certificates(client.domain, client.id))

    async def revoke_client_certificates(self, request: web.Request) -> web.Response:
        m = request.match_info
        return _json({"revoked": await self.authority.revoke_client(m["domain"], m["client"])})

    async def list_certificates(self, request: web.Request) -> web.Response:
        q = request.query
        return _json(await self.gateway.store.list_certificates(q.get("domain"), q.get("client")))

    async def get_certificate(self, request: web.Request) -> web.Response:
        return _json(await self.gateway.store.get_certificate(_serial(request)))

    async def revoke_certificate(self, request: web.Request) -> web.Response:
        serial = _serial(request)
        await self.authority.revoke([serial])
        return _json(await self.gateway.store.get_certificate(serial))

    # users and their roles
    def _users(self) -> Users:
        if self.gateway.users is None:
            raise NotFound("this gateway has no users")
        return self.gateway.users

    async def create_user(self, request: web.Request) -> web.Response:
        body = await self._body(request, "email", "name")
        password, admin = body.get("password"), body.get("platform_admin", False)
        if password is not None and not isinstance(password, str):
            raise InvalidRequest("'password' is a string")
        if not isinstance(admin, bool):
            raise InvalidRequest("'platform_admin' is a boolean")
        user = await self._users().create(body["email"], body["name"], password, admin)
        return _json(user, 201)

    async def list_users(self, request: web.Request) -> web.Response:
        return _json(await self.gateway.store.list_users())

    async def get_user(self, request: web.Request) -> web.Response:
        user = await self.gateway.store.get_user(request.match_info["user"])
        return _json({**_default(user), "roles": await self.gateway.store.roles(user.id)})

    async def delete_user(self, request: web.Request) -> web.Response:
        await self.gateway.store.delete_user(request.match_info["user"])
        return web.Response(status=204)

    async def enable_user(self, request: web.Request) -> web.Response:
        return _json(await self.gateway.store.set_user_enabled(request.match_info["user"], True))

    async def disable_user(self, request: web.Request) -> web.Response:
        """Disabled: its sign-ins end at once (their access tokens are refused)."""
        return _json(await self.gateway.store.set_user_enabled(request.match_info["user"], False))

    async def set_password(self, request: web.Request) -> web.Response:
        body = await self._body(request, "password")
        return _json(await self._users().set_password(request.match_info["user"], body["password"]))

    async def list_members(self, request: web.Request) -> web.Response:
        return _json(await self.gateway.store.list_members(request.match_info["domain"]))

    async def set_member(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        role = check_role(body.get("role"))
        m = request.match_info
        return _json(await self.gateway.store.set_member(m["domain"], m["user"], role))

    async def remove_member(self, request: web.Request) -> web.Response:
        m = request.match_info
        await self.gateway.store.remove_member(m["domain"], m["user"])
        return web.Response(status=204)

    # external identity providers of a domain
    def _derived(self, domain: str, name: str, type_: Any, config: dict[str, Any]) -> Any:
        from core.idps import ProviderError, derive

        if not isinstance(type_, str):
            raise InvalidRequest("'type' is required (a string)")
        try:
            return derive(domain, name, type_, config, self._idp_allow_http)
        except ProviderError as exc:
            raise InvalidRequest(str(exc)) from None

    def _stored(
        self,
        domain: str,
        name: str,
        type_: Any,
        given: dict[str, Any],
        current: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """The registration to store: ``given`` merged into ``current``, its jwt_secret
        sealed (core.idps.stored)."""
        from core.idps import ProviderError, stored

        if not isinstance(type_, str):
            raise InvalidRequest("'type' is required (a string)")
        try:
            return stored(domain, name, type_, given, self.gateway.sealing, current)
        except ProviderError as exc:
            raise InvalidRequest(str(exc)) from None

    async def add_idp(self, request: web.Request) -> web.Response:
        body = await self._body(request, "name", "type")
        domain, name, type_ = request.match_info["domain"], body.pop("name"), body.pop("type")
        if not NAME_RE.fullmatch(name):
            raise InvalidRequest(f"provider name {name!r}: 1-64 letters, digits, '-' and '_'")
        config = self._stored(domain, name, type_, body)
        provider = self._derived(domain, name, type_, config)
        await self.gateway.store.put_idp(domain, name, type_, config, create=True)
        await self.gateway.bus.announce(Change("idp", domain, name))
        return _json(provider.shown(), 201)

    async def list_idps(self, request: web.Request) -> web.Response:
        domain = request.match_info["domain"]
        found = await self.gateway.store.list_idps(domain)
        return _json([self._derived(domain, n, t, c).shown() for n, t, c in found])

    async def get_idp(self, request: web.Request) -> web.Response:
        m = request.match_info
        type_, config = await self.gateway.store.get_idp(m["domain"], m["name"])
        return _json(self._derived(m["domain"], m["name"], type_, config).shown())

    async def update_idp(self, request: web.Request) -> web.Response:
        """Change what is given (a JSON merge: a null removes a field)."""
        m = request.match_info
        type_, current = await self.gateway.store.get_idp(m["domain"], m["name"])
        changes = await self._body(request)
        type_ = changes.pop("type", type_)
        changes.pop("name", None)
        config = self._stored(m["domain"], m["name"], type_, changes, current)
        provider = self._derived(m["domain"], m["name"], type_, config)
        await self.gateway.store.put_idp(m["domain"], m["name"], type_, config, create=False)
        await self.gateway.bus.announce(Change("idp", m["domain"], m["name"]))
        return _json(provider.shown())

    async def remove_idp(self, request: web.Request) -> web.Response:
        m = request.match_info
        await self.gateway.store.delete_idp(m["domain"], m["name"])
        await self.gateway.bus.announce(Change("idp", m["domain"], m["name"]))
        return web.Response(status=204)

    async def test_idp(self, request: web.Request) -> web.Response:
        """``{token}``: what an exchange of it would grant (claims, rights), issuing nothing;
        a refusal is the exchange's, as a problem."""
        from core.idps import Exchange, NotRegistered, ProviderError

        body = await self._body(request, "token")
        tokens = self.gateway.tokens
        if tokens is None:
            raise NotFound("this gateway exchanges no tokens")
        if self._exchange is None:
            self._exchange = Exchange(
                self.gateway.store, tokens, self._idp_allow_http, sealing=self.gateway.sealing
            )
            self.gateway.on_change(self._exchange.changed)  # it keeps providers a while
        m = request.match_info
        try:
            return _json(await self._exchange.test(m["domain"], m["name"], body["token"]))
        except NotRegistered as exc:
            raise NotFound(str(exc)) from None
        except ProviderError as exc:  # as the exchange answers it (provider-misconfigured)
            return _problem(503, "Provider misconfigured", str(exc))
        except ConduitError as exc:
            status = exc.condition.answer.http
            return _problem(status, exc.condition.answer.title, exc.detail)

    async def revoke_subject(self, request: web.Request) -> web.Response:
        """``{subject}``: a token holder's client id (``<provider>:<sub>`` for an exchanged
        token, or a client's id). Its tokens issued until now stop working, its connections end
        at once on every node, and its credentials are not refreshed."""
        body = await self._body(request, "subject")
        domain = request.match_info["domain"]
        now = time.time()
        await self.gateway.store.revoke_subject(domain, body["subject"], now)
        await self.gateway.bus.announce(Change("subject", domain, body["subject"]))
        return _json({"domain": domain, "subject": body["subject"], "revoked": now})

    # the signing keys of Conduit's tokens
    def _keyring(self) -> Any:
        if self.gateway.tokens is None:
            raise NotFound("this gateway issues no tokens")
        return self.gateway.tokens.keyring

    async def list_keys(self, request: web.Request) -> web.Response:
        keyring = self._keyring()
        await keyring.reload()
        signing = keyring.signing.kid
        return _json([_key(k, signing) for k in keyring.keys()])

    async def rotate_keys(self, request: web.Request) -> web.Response:
        keyring = self._keyring()
        key = await keyring.rotate()
        await self.gateway.bus.announce(Change("keys", ""))
        return _json(_key(key, key.kid))

    async def ca_certificate(self, request: web.Request) -> web.Response:
        return web.Response(
            body=self.authority.ca.cert_pem(), content_type="application/x-pem-file"
        )

    async def crl(self, request: web.Request) -> web.Response:
        resp = web.Response(body=await self.authority.crl(), content_type="application/x-pem-file")
        resp.headers["Cache-Control"] = "no-cache"
        return resp

    async def ocsp(self, request: web.Request) -> web.Response:
        """RFC 6960 appendix A: a DER request in a POST body, or base64 (URL-encoded) in the
        path of a GET."""
        if request.method == "POST":
            if request.content_length is not None and request.content_length > MAX_OCSP_REQUEST:
                raise InvalidRequest(f"an OCSP request is at most {MAX_OCSP_REQUEST} bytes")
            try:
                async with asyncio.timeout(self.body_timeout):
                    der = await request.content.read(MAX_OCSP_REQUEST + 1)
            except TimeoutError:
                raise RequestTimeoutError(
                    f"the body did not arrive within {self.body_timeout:g} s"
                ) from None
            if len(der) > MAX_OCSP_REQUEST:
                raise InvalidRequest(f"an OCSP request is at most {MAX_OCSP_REQUEST} bytes")
        else:
            raw = urllib.parse.unquote(request.match_info["request"])
            try:
                der = base64.b64decode(raw, validate=True)
            except (binascii.Error, ValueError):
                der = b""  # answered as a malformed request, as the RFC asks
        answer = await self.authority.ocsp(der)
        return web.Response(body=answer, content_type="application/ocsp-response")


def _key(key: Any, signing: str) -> dict[str, Any]:
    """A signing key as the API shows it: never its private part."""
    return {
        "kid": key.kid,
        "algorithm": key.algorithm,
        "created": key.created,
        "retires": key.retires,
        "signs": key.kid == signing,
    }


def _serial(request: web.Request) -> str:
    serial = request.match_info["serial"].lower()
    try:
        return f"{int(serial, 16):x}"
    except ValueError:
        raise InvalidRequest(f"serial {serial!r} is not hexadecimal") from None
