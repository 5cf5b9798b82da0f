"""The ``conduit`` command: ``serve``, and provisioning over the management API.

Every provisioning command takes ``--json`` for scripts; without it the output is for people.
``serve`` takes a flag for every setting (``--http-port`` for ``http_port``), generated from
the settings object so the two never drift.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, TextIO, get_args, get_origin

import click

from certs import cli as certs_cli
from conduit.settings import ADMIN_KEY_FILE as KEY_FILE
from conduit.settings import Settings


# serve
def _setting_options(func: Any) -> Any:
    for name, field in reversed(list(Settings.model_fields.items())):
        flag = "--" + name.replace("_", "-")
        kind = field.annotation
        if get_origin(kind) is list:
            continue  # a list of tables: the TOML file or a JSON environment variable
        help_text = f"{field.description} [CONDUIT_{name.upper()}]"
        args = [a for a in get_args(kind) if a is not type(None)]
        base = kind if get_origin(kind) is Literal else (args[0] if args else kind)
        if base is bool:
            option = click.option(f"{flag}/--no-{flag[2:]}", name, default=None, help=help_text)
        elif get_origin(base) is Literal:
            choices = click.Choice([str(c) for c in get_args(base)])
            option = click.option(flag, name, type=choices, default=None, help=help_text)
        else:
            types: dict[object, Any] = {int: int, float: float, Path: click.Path(path_type=Path)}
            ptype = types.get(base, str)
            option = click.option(flag, name, type=ptype, default=None, help=help_text)
        func = option(func)
    return func


@click.group()
def main() -> None:
    """Conduit: a multi-protocol IoT messaging gateway."""


main.add_command(certs_cli.group)


@main.command()
@click.option(
    "--config",
    "config",
    type=click.Path(path_type=Path),
    envvar="CONDUIT_CONFIG",
    help="TOML configuration file [CONDUIT_CONFIG]",
)
@_setting_options
def serve(config: Path | None, **overrides: Any) -> None:
    """Run the gateway until SIGTERM or SIGINT."""
    from conduit.app import StartupError, run

    try:
        settings = Settings.load(config, **overrides)
    except Exception as exc:
        raise click.ClickException(f"configuration: {exc}") from None
    try:
        run(settings)
    except StartupError as exc:
        raise click.ClickException(str(exc)) from None


# a user's sign-in, kept for the CLI
def login_file() -> Path:
    """Where `conduit login` keeps a user's tokens: $CONDUIT_LOGIN_FILE, or
    $XDG_CONFIG_HOME/conduit/login.json (~/.config/conduit/login.json), mode 0600."""
    if os.environ.get("CONDUIT_LOGIN_FILE"):
        return Path(os.environ["CONDUIT_LOGIN_FILE"])
    config = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(config) / "conduit" / "login.json"


def _request(
    method: str,
    url: str,
    body: dict[str, Any] | None = None,
    *,
    token: str | None = None,
    where: str | None = None,
) -> Any:
    """A JSON request to Conduit: its decoded answer, or a ClickException with the problem's
    status and detail (or saying that ``where``, the URL by default, cannot be reached)."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method)
    if token is not None:
        req.add_header("Authorization", f"Bearer {token}")
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            raw = resp.read()
    except urllib.error.HTTPError as exc:
        try:
            detail = json.loads(exc.read()).get("detail", exc.reason)
        except ValueError:
            detail = exc.reason
        raise click.ClickException(f"{exc.code}: {detail}") from None
    except urllib.error.URLError as exc:
        raise click.ClickException(f"cannot reach {where or url}: {exc.reason}") from None
    return json.loads(raw) if raw else None


def _keep_login(saved: dict[str, Any]) -> None:
    path = login_file()
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(saved, f)
    tmp.replace(path)


def _access_token() -> str | None:
    """The signed-in user's access token, refreshed when it is about to expire; None when
    nobody signed in with `conduit login`."""
    path = login_file()
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if saved["expires_at"] - time.time() < 30:
        if saved["refresh_expires_at"] <= time.time():
            raise click.ClickException("the sign-in has expired: run conduit login again")
        pair = _request("POST", f"{saved['url']}/users/tokens/refresh",
                        {"refresh_token": saved["refresh_token"]})  # fmt: skip
        saved.update(pair)
        _keep_login(saved)
    return str(saved["access_token"])


@main.command()
@click.argument("email")
@click.option("--url", envvar="CONDUIT_HTTP_URL", default="http://127.0.0.1:8008",
              show_default=True, help="Conduit's HTTP listener [CONDUIT_HTTP_URL]")  # fmt: skip
@click.option("--password-stdin", is_flag=True, help="Read the password from standard input")
def login(email: str, url: str, password_stdin: bool) -> None:
    """Sign in as a user: the management commands then act as that user (with its roles),
    until `conduit logout`. The tokens are kept in a 0600 file and refreshed as needed."""
    password = _password(password_stdin, confirm=False)
    url = url.rstrip("/")
    pair = _request("POST", f"{url}/users/tokens", {"email": email, "password": password})
    _keep_login({"url": url, "email": email, **pair})
    click.echo(f"signed in as {email} (kept in {login_file()})")


@main.command()
def logout() -> None:
    """End the sign-in of `conduit login` (every token of it is revoked)."""
    path = login_file()
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        raise click.ClickException("nobody is signed in") from None
    try:
        _request("DELETE", f"{saved['url']}/users/tokens",
                 {"refresh_token": saved["refresh_token"]})  # fmt: skip
    finally:
        path.unlink(missing_ok=True)
    click.echo(f"signed out {saved.get('email', '')}")


# provisioning client
class API:
    def __init__(self, url: str, key: str | None, data_dir: Path, as_json: bool) -> None:
        self.url = url.rstrip("/")
        self.as_json = as_json
        if key is None:
            key = _access_token()
        if key is None:
            path = data_dir / KEY_FILE
            try:
                key = path.read_text().strip()
            except OSError:
                raise click.ClickException(
                    f"no admin key: set CONDUIT_ADMIN_KEY or run where {path} is readable"
                ) from None
        self.key = key

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        where = f"the management API at {self.url}"
        return _request(method, self.url + path, body, token=self.key, where=where)

    def show(self, data: Any, fields: tuple[str, ...] = ()) -> None:
        if self.as_json:
            click.echo(json.dumps(data, indent=2))
            return
        rows = data if isinstance(data, list) else [data]
        if not rows:
            click.echo("(none)")
        for row in rows:
            if isinstance(row, dict):
                keys = fields or tuple(row)
                click.echo("  ".join(f"{k}={_fmt(row.get(k), k)}" for k in keys))


def _fmt(value: Any, key: str = "") -> str:
    if isinstance(value, dict):
        return json.dumps(value)
    if key in ("created", "retires") and isinstance(value, int | float):  # since the epoch
        return datetime.fromtimestamp(value, UTC).isoformat(timespec="seconds")
    return str(value)


def _meta(pairs: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise click.BadParameter(f"{pair!r} is not KEY=VALUE", param_hint="--metadata")
        out[key] = value
    return out


def api_command(
    group: click.Group, name: str, **kw: Any
) -> Callable[[Callable[..., None]], click.Command]:
    """A provisioning command: the management API options, and an ``api`` argument.

    Where the API is and where its admin key lies default to what ``conduit serve`` would use
    with the same configuration file and environment (``api_host``, ``api_port``,
    ``data_dir``), so a CLI run beside the server finds it."""

    def decorate(func: Callable[..., None]) -> click.Command:
        @group.command(name, **kw)
        @click.option(
            "--api",
            "url",
            envvar="CONDUIT_API_URL",
            help="Management API URL [CONDUIT_API_URL]; default: from api_host and api_port",
        )
        @click.option(
            "--admin-key",
            envvar="CONDUIT_ADMIN_KEY",
            help="Admin key [CONDUIT_ADMIN_KEY]; default: <data-dir>/admin.key",
        )
        @click.option(
            "--data-dir",
            type=click.Path(path_type=Path),
            help="Data directory, to find admin.key [CONDUIT_DATA_DIR]",
        )
        @click.option(
            "--config",
            type=click.Path(path_type=Path),
            envvar="CONDUIT_CONFIG",
            help="The server's TOML configuration file [CONDUIT_CONFIG]",
        )
        @click.option("--json", "as_json", is_flag=True, help="JSON output, for scripts")
        @functools.wraps(func)
        def command(
            url: str | None,
            admin_key: str | None,
            data_dir: Path | None,
            config: Path | None,
            as_json: bool,
            **params: Any,
        ) -> None:
            try:
                settings = Settings.load(config, data_dir=data_dir)
            except Exception as exc:
                raise click.ClickException(f"configuration: {exc}") from None
            url = url or _api_url(settings.api_host, settings.api_port)
            func(API(url, admin_key, settings.data_dir, as_json), **params)

        return command

    return decorate


def _api_url(host: str, port: int) -> str:
    """The URL that reaches an API listening on ``host``: a wildcard address is reached on
    the loopback."""
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


domain_opt = click.option("--domain", "-d", required=True, help="Domain name")
meta_opt = click.option("--metadata", "-m", multiple=True, help="KEY=VALUE, repeatable")
client_opt = click.option("--client", required=True, help="Client id or name")
channel_opt = click.option("--channel", required=True, help="Channel name")


@main.group()
def domains() -> None:
    """Domains: the tenants; topics start m/<domain>/."""


@api_command(domains, "create")
@click.argument("name")
@meta_opt
def domains_create(api: API, name: str, metadata: tuple[str, ...]) -> None:
    """Create a domain."""
    api.show(api.call("POST", "/domains", {"name": name, "metadata": _meta(metadata)}))


@api_command(domains, "list")
def domains_list(api: API) -> None:
    """List domains."""
    api.show(api.call("GET", "/domains"))


@api_command(domains, "show")
@click.argument("name")
def domains_show(api: API, name: str) -> None:
    """Show a domain."""
    api.show(api.call("GET", f"/domains/{_q(name)}"))


@api_command(domains, "delete")
@click.argument("name")
def domains_delete(api: API, name: str) -> None:
    """Delete a domain with its clients, channels and connections."""
    api.call("DELETE", f"/domains/{_q(name)}")
    api.show({"deleted": name})


@main.group()
def clients() -> None:
    """Clients: devices and applications, each with a secret."""


CLIENT_FIELDS = ("id", "name", "domain", "enabled")


@api_command(clients, "create")
@domain_opt
@click.argument("name")
@meta_opt
def clients_create(api: API, domain: str, name: str, metadata: tuple[str, ...]) -> None:
    """Create a client; prints its id and secret. The secret is shown this once."""
    created = api.call(
        "POST", f"/domains/{_q(domain)}/clients", {"name": name, "metadata": _meta(metadata)}
    )
    api.show(created, (*CLIENT_FIELDS, "secret"))
    if not api.as_json:
        click.echo(
            "Keep the secret now: it is stored only as a hash and cannot be shown again.", err=True
        )


@api_command(clients, "list")
@domain_opt
def clients_list(api: API, domain: str) -> None:
    """List a domain's clients."""
    api.show(api.call("GET", f"/domains/{_q(domain)}/clients"), CLIENT_FIELDS)


def _password(password_stdin: bool, confirm: bool = True) -> str:
    """A password from standard input (one line), or from a prompt that does not echo."""
    if password_stdin:
        line = sys.stdin.readline().rstrip("\n")
        if not line:
            raise click.ClickException("no password on standard input")
        return line
    return str(click.prompt("Password", hide_input=True, confirmation_prompt=confirm))


@main.group()
def users() -> None:
    """Users: people who sign in, with roles in domains."""


@api_command(users, "create")
@click.argument("email")
@click.option("--name", required=True, help="Display name")
@click.option("--password-stdin", is_flag=True, help="Read the password from standard input")
@click.option("--no-password", is_flag=True, help="No password (sign-in with a provider only)")
@click.option("--platform-admin", is_flag=True, help="May manage every domain and user")
def users_create(
    api: API, email: str, name: str, password_stdin: bool, no_password: bool, platform_admin: bool
) -> None:
    """Create a user; the password is asked for (or read from standard input)."""
    body: dict[str, Any] = {"email": email, "name": name, "platform_admin": platform_admin}
    if not no_password:
        body["password"] = _password(password_stdin)
    api.show(api.call("POST", "/users", body))


@api_command(users, "list")
def users_list(api: API) -> None:
    """Every user."""
    api.show(api.call("GET", "/users"), ("id", "email", "name", "enabled", "platform_admin"))


def _user_command(name: str, method: str, suffix: str, help_text: str) -> None:
    @api_command(users, name, help=help_text)
    @click.argument("user")
    def command(api: API, user: str) -> None:
        result = api.call(method, f"/users/{_q(user)}{suffix}")
        api.show(result if result is not None else {"deleted": user})


_user_command("show", "GET", "", "Show a user (by id or email) and its roles.")
_user_command("enable", "POST", "/enable", "Enable a user.")
_user_command("disable", "POST", "/disable", "Disable a user: its sign-ins end at once.")
_user_command("delete", "DELETE", "", "Delete a user.")


@api_command(users, "set-password")
@click.argument("user")
@click.option("--password-stdin", is_flag=True, help="Read the password from standard input")
def users_set_password(api: API, user: str, password_stdin: bool) -> None:
    """Set a user's password."""
    api.show(
        api.call("PUT", f"/users/{_q(user)}/password", {"password": _password(password_stdin)})
    )


@main.group()
def members() -> None:
    """Users' roles in a domain: admin or member."""


@api_command(members, "list")
@domain_opt
def members_list(api: API, domain: str) -> None:
    """The users with a role in the domain."""
    api.show(api.call("GET", f"/domains/{_q(domain)}/members"))


@api_command(members, "grant")
@domain_opt
@click.argument("user")
@click.option("--role", type=click.Choice(["admin", "member"]), required=True)
def members_grant(api: API, domain: str, user: str, role: str) -> None:
    """Give a user (id or email) a role in the domain (replacing the one it had)."""
    api.show(api.call("PUT", f"/domains/{_q(domain)}/members/{_q(user)}", {"role": role}))


@api_command(members, "revoke")
@domain_opt
@click.argument("user")
def members_revoke(api: API, domain: str, user: str) -> None:
    """Take a user's role in the domain away."""
    api.call("DELETE", f"/domains/{_q(domain)}/members/{_q(user)}")
    api.show({"revoked": user, "domain": domain})


@main.group()
def idps() -> None:
    """Identity providers of a domain, whose tokens are exchanged for broker credentials."""


def _config(path: Path) -> dict[str, Any]:
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise click.ClickException(f"{path}: {exc}") from None
    if not isinstance(config, dict):
        raise click.ClickException(f"{path}: a JSON object (the type's fields and rules)")
    return config


def _with_secret(config: dict[str, Any], secret_file: TextIO | None) -> dict[str, Any]:
    """``config`` with the ``jwt_secret`` read from a file or standard input: never from the
    command line, where ``ps`` and the shell's history would show it."""
    if secret_file is None:
        return config
    secret = secret_file.read().strip()
    if not secret:
        raise click.ClickException(f"{secret_file.name}: no JWT secret in it")
    return {**config, "jwt_secret": secret}


jwt_secret_opt = click.option(
    "--jwt-secret-file", "secret_file", type=click.File("r"),
    help="supabase: a file holding the project's legacy JWT secret (HS256; '-': standard"
         " input); kept encrypted, never shown",
)  # fmt: skip


@api_command(idps, "add")
@domain_opt
@click.argument("name")
@click.option("--type", "type_", required=True,
              type=click.Choice(["supabase", "firebase", "auth0", "oidc"]))  # fmt: skip
@click.option("--config", "config_file", required=True, type=click.Path(path_type=Path),
              help="JSON: what the type needs (url, project_id, tenant, issuer, audience...),"
                   " overrides, ttl, max_ttl and rules")  # fmt: skip
@jwt_secret_opt
def idps_add(
    api: API, domain: str, name: str, type_: str, config_file: Path, secret_file: TextIO | None
) -> None:
    """Register a provider; shows what Conduit derived."""
    body = {**_with_secret(_config(config_file), secret_file), "name": name, "type": type_}
    api.show(api.call("POST", f"/domains/{_q(domain)}/idps", body))


@api_command(idps, "update")
@domain_opt
@click.argument("name")
@click.option("--config", "config_file", type=click.Path(path_type=Path),
              help="JSON merged into the registration (null removes a field)")  # fmt: skip
@jwt_secret_opt
def idps_update(
    api: API, domain: str, name: str, config_file: Path | None, secret_file: TextIO | None
) -> None:
    """Change a provider (--jwt-secret-file: a new secret replaces the one it had)."""
    if config_file is None and secret_file is None:
        raise click.UsageError("give --config, --jwt-secret-file, or both")
    changes = _with_secret(_config(config_file) if config_file else {}, secret_file)
    api.show(api.call("PATCH", f"/domains/{_q(domain)}/idps/{_q(name)}", changes))


@api_command(idps, "list")
@domain_opt
def idps_list(api: API, domain: str) -> None:
    """The domain's providers."""
    api.show(api.call("GET", f"/domains/{_q(domain)}/idps"),
             ("name", "type", "enabled", "issuer", "audience"))  # fmt: skip


@api_command(idps, "show")
@domain_opt
@click.argument("name")
def idps_show(api: API, domain: str, name: str) -> None:
    """A provider: what was given and what was derived."""
    api.show(api.call("GET", f"/domains/{_q(domain)}/idps/{_q(name)}"))


@api_command(idps, "test")
@domain_opt
@click.argument("name")
@click.argument("token")
def idps_test(api: API, domain: str, name: str, token: str) -> None:
    """Verify a token of the provider and show what an exchange would grant (nothing issued)."""
    api.show(api.call("POST", f"/domains/{_q(domain)}/idps/{_q(name)}/test", {"token": token}))


@api_command(idps, "remove")
@domain_opt
@click.argument("name")
def idps_remove(api: API, domain: str, name: str) -> None:
    """Remove a provider."""
    api.call("DELETE", f"/domains/{_q(domain)}/idps/{_q(name)}")
    api.show({"removed": name, "domain": domain})


@main.group()
def keys() -> None:
    """The keys Conduit signs its tokens with."""


@api_command(keys, "list")
def keys_list(api: API) -> None:
    """The keys that verify (the one that signs is marked)."""
    api.show(api.call("GET", "/keys"), ("kid", "algorithm", "created", "retires", "signs"))


@api_command(keys, "rotate")
def keys_rotate(api: API) -> None:
    """A new key signs from now on; the previous ones verify for signing_key_grace more."""
    api.show(api.call("POST", "/keys/rotate"))


def _client_command(name: str, method: str, suffix: str, help_text: str) -> None:
    @api_command(clients, name, help=help_text)
    @domain_opt
    @click.argument("client")
    def command(api: API, domain: str, client: str) -> None:
        result = api.call(method, f"/domains/{_q(domain)}/clients/{_q(client)}{suffix}")
        api.show(result if result is not None else {"deleted": client})


_client_command("show", "GET", "", "Show a client (by id or name).")
_client_command("enable", "POST", "/enable", "Enable a client.")
_client_command("disable", "POST", "/disable", "Disable a client: it is refused from now on.")
_client_command("rotate-secret", "POST", "/secret", "Give a client a new secret (shown once).")
_client_command("delete", "DELETE", "", "Delete a client.")


@api_command(clients, "dtls-key")
@domain_opt
@click.argument("client")
def clients_dtls_key(api: API, domain: str, client: str) -> None:
    """Give a client a DTLS pre-shared key for CoAP over DTLS (shown once); again: a new key,
    the old one stops working."""
    grant = api.call("POST", f"/domains/{_q(domain)}/clients/{_q(client)}/dtls-key")
    api.show(grant, ("client", "identity", "key"))
    if not api.as_json:
        click.echo(
            "Keep the key now: it cannot be shown again."
            f" coap-client: -u {grant['identity']} -k {grant['key']}",
            err=True,
        )


@api_command(clients, "revoke-dtls-key")
@domain_opt
@click.argument("client")
def clients_revoke_dtls_key(api: API, domain: str, client: str) -> None:
    """Revoke a client's DTLS key: its handshakes fail and its DTLS sessions end."""
    api.call("DELETE", f"/domains/{_q(domain)}/clients/{_q(client)}/dtls-key")
    api.show({"revoked": client})


@main.group()
def channels() -> None:
    """Channels: topics m/<domain>/c/<channel>/..."""


@api_command(channels, "create")
@domain_opt
@click.argument("name")
@meta_opt
def channels_create(api: API, domain: str, name: str, metadata: tuple[str, ...]) -> None:
    """Create a channel."""
    api.show(
        api.call(
            "POST", f"/domains/{_q(domain)}/channels", {"name": name, "metadata": _meta(metadata)}
        )
    )


@api_command(channels, "list")
@domain_opt
def channels_list(api: API, domain: str) -> None:
    """List a domain's channels."""
    api.show(api.call("GET", f"/domains/{_q(domain)}/channels"), ("id", "name", "domain"))


@api_command(channels, "show")
@domain_opt
@click.argument("channel")
def channels_show(api: API, domain: str, channel: str) -> None:
    """Show a channel."""
    api.show(api.call("GET", f"/domains/{_q(domain)}/channels/{_q(channel)}"))


@api_command(channels, "delete")
@domain_opt
@click.argument("channel")
def channels_delete(api: API, domain: str, channel: str) -> None:
    """Delete a channel and its connections."""
    api.call("DELETE", f"/domains/{_q(domain)}/channels/{_q(channel)}")
    api.show({"deleted": channel})


@api_command(main, "connect")
@domain_opt
@client_opt
@channel_opt
@click.option("--publish", is_flag=True, help="Allow publishing")
@click.option("--subscribe", is_flag=True, help="Allow subscribing")
def connect(
    api: API, domain: str, client: str, channel: str, publish: bool, subscribe: bool
) -> None:
    """Let a client publish and/or subscribe on a channel (both when neither flag is given)."""
    if not (publish or subscribe):
        publish = subscribe = True
    api.show(
        api.call(
            "POST",
            f"/domains/{_q(domain)}/connections",
            {
                "client": client,
                "channel": channel,
                "publish": publish,
                "subscribe": subscribe,
            },
        )
    )


@api_command(main, "disconnect")
@domain_opt
@client_opt
@channel_opt
def disconnect(api: API, domain: str, client: str, channel: str) -> None:
    """Take a client's rights on a channel away."""
    api.call("DELETE", f"/domains/{_q(domain)}/connections/{_q(client)}/{_q(channel)}")
    api.show({"disconnected": client, "channel": channel})


@api_command(main, "connections")
@domain_opt
@click.option("--client", help="Only this client")
@click.option("--channel", help="Only this channel")
def connections(api: API, domain: str, client: str | None, channel: str | None) -> None:
    """List connections."""
    query = urllib.parse.urlencode(
        {k: v for k, v in (("client", client), ("channel", channel)) if v}
    )
    api.show(api.call("GET", f"/domains/{_q(domain)}/connections" + (f"?{query}" if query else "")))


def _q(part: str) -> str:
    return urllib.parse.quote(part, safe="")


if __name__ == "__main__":
    main()
