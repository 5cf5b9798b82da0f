"""External identity providers (issue 16): token exchanges against HTTP publishes, and MQTT 5
re-authentications on open connections against new connections, same server, same run.

    SHARED_BENCH=../shared/bench .venv/bin/python bench/idp_bench.py [--rounds 3] [--duration 5]
        [--conc 100] [--procs 2] [--conns 6000] [--reauths 16000] [--tokens 30000]

One ``conduit serve`` (exchange rate limits and per-client limits lifted: the load comes from
one address and few subjects) and a local identity provider in a subprocess (this file with
``--idp``: an aiohttp app serving an OpenID Connect discovery document and a JWKS with one
RSA-2048 and one P-256 key, on loopback http). Two ``oidc`` providers are registered in the
domain through the management API, ``rs`` pinned to RS256 and ``es`` to ES256, with one rule
granting ``m/bench/c/data/{sub}/#``. Each round, one after the other:

- HTTP publish (the anchor): ``wrk -c50`` POSTing a SenML pack with the client's secret, as
  ``token_bench.py`` does: requests/s;
- exchanges, ES256 then RS256: ``wrk -c50`` POSTing ``{domain, provider, token}`` to
  ``/auth/exchange``, each request the next of ``--tokens`` distinct external tokens per
  algorithm (distinct ``sub`` and ``jti``, minted here before the run; a later round goes on
  where the last stopped). The exchange keeps nothing per token (only the provider's keys), so
  each request is a full verification, rights from the claims and a broker token signed;
- MQTT connects: ``--conc`` connections in flight, each a fresh TCP connection, a CONNECT of
  MQTT 5 with the enhanced authentication method ``CONDUIT-TOKEN`` and a broker token never
  used before as its Authentication Data, the CONNACK awaited, the socket closed; from
  ``--conns`` tokens, or until ``--duration`` seconds;
- MQTT re-authentications: ``--conc`` connections opened with ``CONDUIT-TOKEN``, each sending
  AUTH (reason 0x19, re-authenticate) with a fresh broker token of its subject and awaiting the
  AUTH success, again and again, from ``--reauths`` tokens, or until ``--duration`` seconds.

The broker tokens of the MQTT phases are fresh: the server caches a verified token under its
digest, so a token sent twice would measure the cache. Before each round's MQTT phases they
are minted through the server (one exchange per subject, then ``POST /auth/refresh``), outside
the measured windows. The MQTT client is a small MQTT 5 client on asyncio streams (paho cannot
send AUTH) in ``--procs`` processes; each phase reports the CPU the clients used beside the
server's, to show which side was the bottleneck.

Prints each phase of each round (rate, the server's CPU time per operation and its share of a
core, the generator's), then the medians, the ratios asked for (exchanges/s / publishes/s,
target >= 0.3; re-auths/s / connects/s, target >= 1.0), what the exchange's parts cost called
in this process without HTTP (the provider read from the store, the external token's check,
the broker token's signature, the whole exchange), and one JSON line. ``--profile DIR``
records the server with py-spy during each phase of round 1 (speedscope files; that round runs
slower).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing as mp
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import ConduitProcess, cpu_seconds, median
from http_bench import wrk as wrk_publish
from mqtt_bench import raise_nofile

DOMAIN = "bench"
AUDIENCE = "conduit-bench"
AUTH_METHOD = b"CONDUIT-TOKEN"
KIDS = {"RS256": "rsa-1", "ES256": "ec-1"}
PROVIDERS = {"RS256": "rs", "ES256": "es"}
RULES = [{"when": {"role": "app"}, "publish": [f"m/{DOMAIN}/c/data/{{sub}}/#"],
          "subscribe": [f"m/{DOMAIN}/c/data/{{sub}}/#"]}]  # fmt: skip

# wrk: keep-alive POSTs of the lines of $BENCH_BODIES in turn, each thread its share, from the
# line $BENCH_OFFSET on (so that a round goes on with tokens the last did not use).
ROTATE_LUA = r"""
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local threads = 0
function setup(thread)
  thread:set("id", threads)
  threads = threads + 1
end
function init(args)
  bodies = {}
  for line in io.lines(os.getenv("BENCH_BODIES")) do bodies[#bodies + 1] = line end
  stride = tonumber(os.getenv("BENCH_THREADS"))
  i = tonumber(os.getenv("BENCH_OFFSET")) + id
end
function request()
  local body = bodies[i % #bodies + 1]
  i = i + stride
  return wrk.format(nil, nil, nil, body)
end
done = function(summary, latency, requests)
  io.write(string.format("JSONSUMMARY {\"requests\":%d,\"duration_us\":%d,\"errors_status\":%d,\"errors_connect\":%d,\"errors_read\":%d,\"errors_write\":%d,\"errors_timeout\":%d,\"lat_p50_us\":%d,\"lat_p99_us\":%d}\n",
    summary.requests, summary.duration, summary.errors.status, summary.errors.connect,
    summary.errors.read, summary.errors.write, summary.errors.timeout,
    latency:percentile(50), latency:percentile(99)))
end
"""  # noqa: E501


# --- the identity provider ------------------------------------------------------------------


def serve_idp(jwks_path: str) -> None:
    """The provider's discovery document and JWKS (``--idp``); prints its port."""
    from aiohttp import web

    jwks = json.loads(Path(jwks_path).read_text())

    async def main() -> None:
        base = ""

        async def discovery(request: web.Request) -> web.Response:
            return web.json_response({"issuer": base, "jwks_uri": f"{base}/jwks"})

        async def keys(request: web.Request) -> web.Response:
            return web.json_response(jwks, headers={"Cache-Control": "public, max-age=3600"})

        app = web.Application()
        app.router.add_get("/.well-known/openid-configuration", discovery)
        app.router.add_get("/jwks", keys)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        base = f"http://127.0.0.1:{port}"
        print(port, flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())


class IdentityProvider:
    """The local provider: its private keys (here) and its public ones (served by a
    subprocess)."""

    def __init__(self, tmp: Path) -> None:
        import jwt
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ec, rsa

        rsa_key = rsa.generate_private_key(65537, 2048)
        ec_key = ec.generate_private_key(ec.SECP256R1())
        self.pems = {
            alg: key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
            for alg, key in (("RS256", rsa_key), ("ES256", ec_key))
        }
        jwks = {
            "keys": [
                {**jwt.algorithms.RSAAlgorithm.to_jwk(rsa_key.public_key(), as_dict=True),
                 "kid": KIDS["RS256"], "alg": "RS256", "use": "sig"},
                {**jwt.algorithms.ECAlgorithm.to_jwk(ec_key.public_key(), as_dict=True),
                 "kid": KIDS["ES256"], "alg": "ES256", "use": "sig"},
            ]
        }  # fmt: skip
        path = tmp / "jwks.json"
        path.write_text(json.dumps(jwks))
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--idp", str(path)], stdout=subprocess.PIPE, text=True
        )
        assert self.proc.stdout is not None
        self.issuer = f"http://127.0.0.1:{int(self.proc.stdout.readline())}"

    def mint(self, alg: str, subjects: list[str]) -> list[str]:
        """Tokens of ``subjects`` (one each), signed in parallel processes."""
        chunks = [subjects[i : i + 500] for i in range(0, len(subjects), 500)]
        ctx = mp.get_context("spawn")
        with ProcessPoolExecutor(os.cpu_count() or 1, mp_context=ctx) as pool:
            parts = pool.map(
                _mint, [self.pems[alg]] * len(chunks), [alg] * len(chunks),
                [self.issuer] * len(chunks), chunks,
            )  # fmt: skip
            return [t for part in parts for t in part]

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait()


def _mint(pem: bytes, alg: str, issuer: str, subjects: list[str]) -> list[str]:
    import jwt
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(pem, None)
    now = int(time.time())
    claims = {"iss": issuer, "aud": AUDIENCE, "iat": now, "exp": now + 7200, "role": "app"}
    return [
        jwt.encode({**claims, "sub": sub, "jti": uuid.uuid4().hex}, key, alg, {"kid": KIDS[alg]})  # type: ignore[arg-type]
        for sub in subjects
    ]


def register(c: ConduitProcess, issuer: str) -> None:
    for alg, name in PROVIDERS.items():
        c._api("POST", f"/domains/{DOMAIN}/idps", {
            "name": name, "type": "oidc", "issuer": issuer, "audience": AUDIENCE,
            "algorithms": [alg], "rules": RULES,
        })  # fmt: skip


def post(url: str, body: dict[str, Any]) -> dict[str, Any]:
    req = urllib.request.Request(
        url, method="POST", data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )  # fmt: skip
    with urllib.request.urlopen(req) as r:
        return json.loads(r.read())  # type: ignore[no-any-return]


async def in_process(idp: IdentityProvider, n: int, repeat: int = 3) -> dict[str, float]:
    """CPU microseconds (this process's, every thread) per operation of the exchange's parts,
    called here one after the other on ``n`` distinct tokens of each algorithm (no HTTP), the
    least of ``repeat`` passes: the external token's check (:func:`core.idps.verify`), the
    provider's registration read from a SQLite store and derived
    (:meth:`core.idps.Exchange.provider`, done for every exchange), the broker token's
    signature (:meth:`core.tokens.Tokens.broker`) and the whole
    :meth:`core.idps.Exchange.exchange` (the provider, the check, the rights, the signature)."""
    from core.identity import Identity
    from core.idps import Exchange, rights, verify
    from core.sealing import SealingKey
    from core.signing import Keyring
    from core.store.sqlite import SQLiteStore
    from core.tokens import Tokens

    async def per_op(call: Callable[[str], Awaitable[object]], items: list[str]) -> float:
        best = float("inf")
        for i in range(repeat):
            part = items[i * n : (i + 1) * n]
            start = time.process_time()
            for item in part:
                await call(item)
            best = min(best, (time.process_time() - start) / len(part) * 1e6)
        return best

    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        store = SQLiteStore(Path(tmp) / "bench.db")
        await store.open()
        tokens = Tokens(Keyring(store, SealingKey.generate()), "conduit")
        await tokens.keyring.load()
        await store.create_domain(DOMAIN, {})
        exchange = Exchange(store, tokens)
        for alg, name in PROVIDERS.items():
            config = {"issuer": idp.issuer, "audience": AUDIENCE, "algorithms": [alg],
                      "rules": RULES}  # fmt: skip
            await store.put_idp(DOMAIN, name, "oidc", config, create=True)
            provider = await exchange.provider(DOMAIN, name)
            minted = idp.mint(alg, [f"{alg}-in-process-{i}" for i in range(2 * repeat * n)])
            claims = await verify(exchange.keys, provider, minted.pop())  # keys fetched first
            each = repeat * n
            read = partial(exchange.provider, DOMAIN)
            out[f"provider read {alg}"] = await per_op(read, [name] * each)
            out[f"verify {alg}"] = await per_op(partial(verify, exchange.keys, provider), minted)
            swap = partial(exchange.exchange, DOMAIN, name)
            out[f"exchange {alg}"] = await per_op(swap, minted[each:])
        granted = rights(provider, claims)
        identity = Identity(f"es:{claims['sub']}", DOMAIN, str(claims["sub"]), granted)
        session = {"sid": "s", "idp": "es", "ses": int(time.time())}

        async def sign(_: str) -> None:
            tokens.broker(identity, granted, 3600, session)

        out["broker token signed"] = await per_op(sign, [""] * repeat * n)
        await store.close()
    return out


# --- exchanges with wrk ----------------------------------------------------------------------


def wrk_bodies(
    url: str, duration: int, bodies: Path, offset: int, server_pid: int, threads: int = 2
) -> dict[str, float]:
    """``wrk -c50`` POSTing the lines of ``bodies`` in turn from ``offset``: requests/s, p99,
    the server's and wrk's CPU time per request."""
    script = bodies.with_suffix(".lua")
    script.write_text(ROTATE_LUA)
    env = {**os.environ, "BENCH_BODIES": str(bodies), "BENCH_THREADS": str(threads),
           "BENCH_OFFSET": str(offset)}  # fmt: skip
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_before = cpu_seconds(server_pid)
    out = subprocess.run(
        ["wrk", f"-t{threads}", "-c50", f"-d{duration}s", "--latency", "-s", str(script), url],
        env=env, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    cpu = cpu_seconds(server_pid) - cpu_before
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    m = re.search(r"JSONSUMMARY (\{.*\})", out)
    if not m:
        raise RuntimeError(out)
    s = json.loads(m.group(1))
    if s["errors_status"] or s["errors_connect"] or not s["requests"]:
        raise RuntimeError(f"wrk saw errors: {s}")
    seconds = s["duration_us"] / 1e6
    generator = after.ru_utime + after.ru_stime - children.ru_utime - children.ru_stime
    return {
        "rate": s["requests"] / seconds,
        "requests": s["requests"],
        "p99_ms": s["lat_p99_us"] / 1000,
        "server_us": cpu / s["requests"] * 1e6,
        "server_cores": cpu / seconds,
        "client_cores": generator / seconds,
    }


# --- MQTT 5 with CONDUIT-TOKEN, on asyncio streams ------------------------------------------


def _vbi(n: int) -> bytes:
    out = bytearray()
    while True:
        n, digit = divmod(n, 128)
        out.append(digit | 0x80 if n else digit)
        if not n:
            return bytes(out)


def _field(data: bytes) -> bytes:
    return len(data).to_bytes(2, "big") + data


def _auth_properties(token: bytes) -> bytes:
    props = b"\x15" + _field(AUTH_METHOD) + b"\x16" + _field(token)
    return _vbi(len(props)) + props


def connect_packet(client_id: str, username: str, token: bytes) -> bytes:
    """CONNECT (MQTT 5, clean start, keep alive 60 s) with CONDUIT-TOKEN and the token as the
    Authentication Data, the user name set, no password."""
    variable = _field(b"MQTT") + bytes([5, 0x80 | 0x02]) + (60).to_bytes(2, "big")
    body = (
        variable + _auth_properties(token) + _field(client_id.encode()) + _field(username.encode())
    )
    return b"\x10" + _vbi(len(body)) + body


def auth_packet(token: bytes) -> bytes:
    """AUTH, reason 0x19 (re-authenticate), CONDUIT-TOKEN with a fresh token."""
    body = b"\x19" + _auth_properties(token)
    return b"\xf0" + _vbi(len(body)) + body


async def read_packet(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    first = (await reader.readexactly(1))[0]
    length, shift = 0, 0
    while True:
        digit = (await reader.readexactly(1))[0]
        length |= (digit & 0x7F) << shift
        if not digit & 0x80:
            break
        shift += 7
    return first >> 4, await reader.readexactly(length)


async def _open(port: int, packet: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(packet)
    kind, body = await read_packet(reader)
    if kind != 2 or body[1] != 0:
        raise RuntimeError(f"CONNECT refused: packet type {kind}, {body!r}")
    return reader, writer


async def _connects(port: int, packets: list[bytes], deadline: float) -> int:
    done = 0
    for packet in packets:
        if time.monotonic() >= deadline:
            break
        _, writer = await _open(port, packet)
        writer.close()
        done += 1
    return done


async def _reauths(
    conn: tuple[asyncio.StreamReader, asyncio.StreamWriter], packets: list[bytes], deadline: float
) -> int:
    reader, writer = conn
    done = 0
    for packet in packets:
        if time.monotonic() >= deadline:
            break
        writer.write(packet)
        kind, body = await read_packet(reader)
        if kind != 15 or body[0] != 0:
            raise RuntimeError(f"re-authentication refused: packet type {kind}, {body!r}")
        done += 1
    return done


def client_process(
    port: int, mode: str, slots: list[tuple[str, str, list[str]]], duration: float,
    ready: Any, go: Any, results: Any, finish: Any,
) -> None:  # fmt: skip
    """One load process: ``slots`` of (client id prefix, user name, fresh tokens), one
    operation in flight per slot. Puts (operations, start, end, CPU seconds) on ``results``."""
    raise_nofile()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass

    async def run() -> None:
        conns: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        if mode == "connect":
            work = [[connect_packet(f"{prefix}-{k}", user, t.encode())
                     for k, t in enumerate(tokens)] for prefix, user, tokens in slots]  # fmt: skip
        else:
            for prefix, user, tokens in slots:
                conns.append(await _open(port, connect_packet(prefix, user, tokens[0].encode())))
            work = [[auth_packet(t.encode()) for t in tokens[1:]] for _, _, tokens in slots]
        ready.put(True)
        await asyncio.get_running_loop().run_in_executor(None, go.wait)
        cpu, start = time.process_time(), time.time()
        deadline = time.monotonic() + duration
        if mode == "connect":
            counts = await asyncio.gather(*(_connects(port, w, deadline) for w in work))
        else:
            pairs = zip(conns, work, strict=True)
            counts = await asyncio.gather(*(_reauths(c, w, deadline) for c, w in pairs))
        results.put((sum(counts), start, time.time(), time.process_time() - cpu))
        await asyncio.get_running_loop().run_in_executor(None, finish.wait)
        for _, writer in conns:
            writer.close()

    asyncio.run(run())


def mqtt_phase(
    port: int, server_pid: int, mode: str, slots: list[tuple[str, str, list[str]]],
    procs: int, duration: float,
) -> dict[str, float]:  # fmt: skip
    """Run ``slots`` spread over ``procs`` processes: operations/s, the server's CPU per
    operation and share of a core, the clients' cores."""
    ctx = mp.get_context("spawn")
    ready, results = ctx.Queue(), ctx.Queue()
    go, finish = ctx.Event(), ctx.Event()
    workers = [
        ctx.Process(target=client_process,
                    args=(port, mode, slots[i::procs], duration, ready, go, results, finish))
        for i in range(procs)
    ]  # fmt: skip
    for w in workers:
        w.start()
    try:
        for _ in workers:
            ready.get(timeout=120)
        cpu_before = cpu_seconds(server_pid)
        go.set()
        got = [results.get(timeout=duration + 120) for _ in workers]
        cpu = cpu_seconds(server_pid) - cpu_before
    finally:
        finish.set()
        for w in workers:
            w.join(30)
    ops = sum(g[0] for g in got)
    seconds = max(g[2] for g in got) - min(g[1] for g in got)
    return {
        "rate": ops / seconds,
        "ops": ops,
        "seconds": seconds,
        "server_us": cpu / ops * 1e6,
        "server_cores": cpu / seconds,
        "client_cores": sum(g[3] for g in got) / seconds,
    }


async def broker_tokens(
    http: str, idp: IdentityProvider, subjects: list[str], each: int
) -> list[tuple[str, list[str]]]:
    """For each subject: its user name and ``each`` fresh broker tokens (an exchange of a
    token of the provider, then refreshes)."""
    import aiohttp

    external = idp.mint("ES256", subjects)
    out: list[tuple[str, list[str]]] = []
    limit = asyncio.Semaphore(64)
    async with aiohttp.ClientSession() as session:

        async def call(path: str, body: dict[str, Any]) -> dict[str, Any]:
            async with limit, session.post(f"{http}{path}", json=body) as r:
                answer: dict[str, Any] = await r.json()
                if r.status != 200:
                    raise RuntimeError(f"{path}: {r.status} {answer}")
                return answer

        async def one(token: str) -> tuple[str, list[str]]:
            first = await call("/auth/exchange", {"domain": DOMAIN, "provider": "es",
                                                  "token": token})  # fmt: skip
            more = await asyncio.gather(*(
                call("/auth/refresh", {"token_id": first["token_id"],
                                       "password": first["password"]})
                for _ in range(each - 1)
            ))  # fmt: skip
            return first["username"], [first["password"], *(m["password"] for m in more)]

        out = list(await asyncio.gather(*(one(t) for t in external)))
    return out


# --- the run ------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=int, default=5)
    ap.add_argument("--conc", type=int, default=100, help="MQTT operations in flight")
    ap.add_argument("--procs", type=int, default=2, help="MQTT client processes")
    ap.add_argument("--conns", type=int, default=6000, help="MQTT connect tokens per round")
    ap.add_argument("--reauths", type=int, default=16000, help="MQTT AUTH tokens per round")
    ap.add_argument("--tokens", type=int, default=30000, help="external tokens per algorithm")
    ap.add_argument("--profile", type=Path, help="py-spy record each phase of round 1 into DIR")
    ap.add_argument("--idp", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.idp:
        serve_idp(args.idp)
        return
    if not shutil.which("wrk"):
        sys.exit("wrk is needed: apt-get install wrk")
    raise_nofile()
    extra = ["--exchange-rate-per-address", "0", "--exchange-rate-per-domain", "0",
             "--mqtt-max-sessions", "0", "--max-subscriptions", "0",
             "--loop", "uvloop"]  # fmt: skip
    phases = ["http publish", "exchange ES256", "exchange RS256", "mqtt connect", "mqtt re-auth"]
    runs: dict[str, list[dict[str, float]]] = {p: [] for p in phases}
    with tempfile.TemporaryDirectory(prefix="idp-bench-") as name:
        tmp = Path(name)
        idp = IdentityProvider(tmp)
        try:
            bodies: dict[str, Path] = {}
            for alg in ("ES256", "RS256"):
                tokens = idp.mint(alg, [f"{alg.lower()}-user-{i}" for i in range(args.tokens)])
                bodies[alg] = tmp / f"{alg}.jsonl"
                bodies[alg].write_text("".join(
                    json.dumps({"domain": DOMAIN, "provider": PROVIDERS[alg], "token": t}) + "\n"
                    for t in tokens
                ))  # fmt: skip
            used = {"ES256": 0, "RS256": 0}
            with ConduitProcess(extra=extra) as c:
                register(c, idp.issuer)
                for alg in ("ES256", "RS256"):  # the providers' keys fetched once, before
                    first = bodies[alg].read_text().partition("\n")[0]
                    post(f"http://127.0.0.1:{c.ports['http']}/auth/exchange", json.loads(first))
                for rnd in range(1, args.rounds + 1):
                    one_round(rnd, c, idp, bodies, used, runs, args)
            parts = asyncio.run(in_process(idp, 1000))
        finally:
            idp.stop()
    wrapped = {alg: n for alg, n in used.items() if n > args.tokens}
    if wrapped:
        print(f"note: more exchanges than distinct tokens ({wrapped}; {args.tokens} each):"
              " some tokens were exchanged twice (the server keeps nothing per token)")  # fmt: skip
    summarize(runs, args, parts)


def one_round(
    rnd: int, c: ConduitProcess, idp: IdentityProvider, bodies: dict[str, Path],
    used: dict[str, int], runs: dict[str, list[dict[str, float]]], args: argparse.Namespace,
) -> None:  # fmt: skip
    http = f"http://127.0.0.1:{c.ports['http']}"
    print(f"round {rnd} (load average {Path('/proc/loadavg').read_text().split()[0]})", flush=True)
    spy = args.profile if rnd == 1 else None
    with profiled(spy, "http-publish", c.pid):
        r = wrk_publish(f"{http}/{c.topic}/room1", args.duration, c.pid, f"Client {c.secret}")
    report(rnd, "http publish", {"rate": r["rps"], "server_us": r["cpu_us"],
                                 "p99_ms": r["p99_ms"]}, runs)  # fmt: skip
    for alg in ("ES256", "RS256"):
        with profiled(spy, f"exchange-{alg}", c.pid):
            r = wrk_bodies(f"{http}/auth/exchange", args.duration, bodies[alg], used[alg], c.pid)
        used[alg] += int(r["requests"])
        report(rnd, f"exchange {alg}", r, runs)
    start = time.monotonic()
    connects = -(-args.conns // args.conc)  # tokens per slot
    reauths = -(-args.reauths // args.conc) + 1  # the CONNECT's, then the AUTHs'
    subjects = [f"mq{rnd}-{j}" for j in range(args.conc)]
    minted = asyncio.run(broker_tokens(http, idp, subjects, connects + reauths))
    print(f"round {rnd} ({args.conc * (connects + reauths)} fresh broker tokens minted in"
          f" {time.monotonic() - start:.1f} s, not measured)", flush=True)  # fmt: skip
    slots = [(f"c{rnd}-{j}", user, tokens[:connects]) for j, (user, tokens) in enumerate(minted)]
    with profiled(spy, "mqtt-connect", c.pid):
        r = mqtt_phase(c.ports["mqtt"], c.pid, "connect", slots, args.procs, args.duration)
    report(rnd, "mqtt connect", r, runs)
    slots = [(f"r{rnd}-{j}", user, tokens[connects:]) for j, (user, tokens) in enumerate(minted)]
    with profiled(spy, "mqtt-reauth", c.pid):
        r = mqtt_phase(c.ports["mqtt"], c.pid, "reauth", slots, args.procs, args.duration)
    report(rnd, "mqtt re-auth", r, runs)


@contextlib.contextmanager
def profiled(directory: Path | None, name: str, pid: int) -> Iterator[None]:
    """``py-spy record`` of the server while the block runs (nothing without ``directory``),
    into ``directory/name.speedscope.json`` (py-spy from this interpreter's bin directory)."""
    if directory is None:
        yield
        return
    directory.mkdir(parents=True, exist_ok=True)
    out = directory / f"{name}.speedscope.json"
    spy = subprocess.Popen(
        [str(Path(sys.executable).parent / "py-spy"), "record", "-p", str(pid), "--format",
         "speedscope", "-o", str(out), "--rate", "200"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    time.sleep(0.5)  # attached before the load starts
    try:
        yield
    finally:
        spy.send_signal(signal.SIGINT)
        spy.wait(60)
    print(f"  py-spy: {out}", flush=True)


def report(
    rnd: int, phase: str, r: dict[str, float], runs: dict[str, list[dict[str, float]]]
) -> None:
    runs[phase].append(r)
    more = ""
    if "server_cores" in r:
        more = f"  server {r['server_cores']:.2f} cores  generator {r['client_cores']:.2f} cores"
    if "seconds" in r:
        more += f"  ({r['ops']:.0f} in {r['seconds']:.1f} s)"
    if "p99_ms" in r:
        more += f"  p99 {r['p99_ms']:.1f} ms"
    print(f"round {rnd} {phase:15} {r['rate']:>9,.0f}/s  server CPU {r['server_us']:6.0f} us/op"
          f"{more}", flush=True)  # fmt: skip


# (name, figure, anchor, target of the rate ratio)
RATIOS = [
    ("exchange ES256 / publish", "exchange ES256", "http publish", 0.3),
    ("exchange RS256 / publish", "exchange RS256", "http publish", 0.3),
    ("re-auth / connect", "mqtt re-auth", "mqtt connect", 1.0),
]


def summarize(
    runs: dict[str, list[dict[str, float]]], args: argparse.Namespace, parts: dict[str, float]
) -> None:
    rate = {p: median([r["rate"] for r in rs]) for p, rs in runs.items()}
    cpu = {p: median([r["server_us"] for r in rs]) for p, rs in runs.items()}
    print(f"\nmedians of {args.rounds} rounds of {args.duration} s (same server, same run)")
    print(f"{'phase':16} {'per s':>9} {'server CPU us/op':>17}")
    for p in runs:
        print(f"{p:16} {rate[p]:>9,.0f} {cpu[p]:>17,.0f}")
    # The ratio of the medians, and the median of each round's ratio (its phases a few
    # seconds apart, less exposed to the machine's drift over the run).
    print(f"\n{'ratio':26} {'rate':>6} {'per round':>9} {'CPU/op':>7}  target (rate)")
    summary: dict[str, dict[str, float]] = {}
    for name, figure, anchor, target in RATIOS:
        value = rate[figure] / rate[anchor]
        pairs = zip(runs[figure], runs[anchor], strict=True)
        paired = median([f["rate"] / a["rate"] for f, a in pairs])
        by_cpu = cpu[anchor] / cpu[figure]
        met = "met" if value >= target else "NOT met"
        print(f"{name:26} {value:6.2f} {paired:9.2f} {by_cpu:7.2f}  >= {target} {met}")
        summary[name] = {"rate": round(value, 3), "per_round": round(paired, 3),
                         "cpu": round(by_cpu, 3), "target": target}  # fmt: skip
    print("(CPU/op: the anchor's server CPU time per operation over the figure's)")
    print("\nin this process, no HTTP (CPU us per operation): "
          + ", ".join(f"{k} {v:.0f}" for k, v in parts.items()))  # fmt: skip
    print(json.dumps({
        "rounds": args.rounds, "duration_s": args.duration, "conc": args.conc,
        "procs": args.procs,
        "per_s": {p: round(v) for p, v in rate.items()},
        "server_cpu_us_per_op": {p: round(v) for p, v in cpu.items()},
        "ratios": summary,
        "in_process_us": {k: round(v) for k, v in parts.items()},
    }))  # fmt: skip


if __name__ == "__main__":
    main()
