"""Broker tokens against client secrets, same server, same run: what a token costs a client that
presents it instead of its secret.

    .venv/bin/python bench/token_bench.py [--rounds 3] [--duration 5] [--conns 2000]

One ``conduit serve`` (per-client limits lifted: every connection is the same client), one
client, and one broker token of that client (``POST /clients/tokens``). Scenarios, alternated
secret / token in each round:

- HTTP publish: ``wrk -c50`` POSTing a SenML pack with ``Authorization: Client <secret>``, then
  with ``Authorization: Bearer <token>``: requests per second;
- MQTT connects: ``mqttbench conn`` (``--conns`` MQTT 3.1.1 connections, 100 at a time) with
  the secret as the password, then the token: connects per second.

Both credentials are verified once and then cached (a digest of the secret or token): these
figures are the steady state of devices that connect and publish again and again. A device's
first use of a new token costs one signature check; the last lines give that cost, per token,
against the first use of a secret (a store lookup), measured in this process: the token's
signature and claims and the store's answer on its subject's revocation.

Prints each run, the medians and the ratios (token / secret).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import ConduitProcess, median
from http_bench import wrk
from mqtt_bench import MQTTBENCH, mqttbench, raise_nofile


def broker_token(c: ConduitProcess) -> str:
    req = urllib.request.Request(
        f"http://127.0.0.1:{c.ports['http']}/clients/tokens",
        method="POST",
        data=json.dumps({"ttl": 86400}).encode(),
        headers={"Authorization": f"Client {c.secret}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req) as r:
        return str(json.loads(r.read())["token"])


def connects(c: ConduitProcess, password: str, n: int) -> float:
    result = mqttbench(
        ["conn", "-p", str(c.ports["mqtt"]), "-u", c.client_id, "-P", password, "-N", str(n),
         "-C", "100", "-H", "1", "-B", str(c.pid)],
        timeout=300,
    )  # fmt: skip
    return float(result["connects_per_s"])


async def first_use(n: int) -> tuple[float, float]:
    """Microseconds of the first use of a credential: a token's signature check and claims,
    against a secret's store lookup (hash, SQLite query), each on ``n`` distinct ones."""
    from core.auth.secrets import StoredSecrets, hash_secret, new_secret
    from core.auth.tokens import BrokerTokens
    from core.credentials import Credentials
    from core.identity import Identity, Rules
    from core.sealing import SealingKey
    from core.signing import Keyring
    from core.store.sqlite import SQLiteStore
    from core.tokens import Tokens
    from core.topics import parse_filter

    with tempfile.TemporaryDirectory() as tmp:
        store = SQLiteStore(Path(tmp) / "bench.db")
        await store.open()
        tokens = Tokens(Keyring(store, SealingKey.generate()), "conduit")
        await tokens.keyring.load()
        await store.create_domain("bench", {})
        rules = Rules(publish=(parse_filter("m/bench/c/data/#"),))
        issued = [
            tokens.broker(Identity(f"c{i}", "bench", f"c{i}"), rules, 3600)[0] for i in range(n)
        ]
        secrets = []
        for i in range(n):
            secret = new_secret()
            await store.create_client("bench", f"c{i}", f"c{i}", hash_secret(secret), {})
            secrets.append(secret)
        provider = BrokerTokens(tokens, store)
        start = time.perf_counter()
        for token in issued:
            assert await provider.identify(Credentials(token=token), "token") is not None
        token_us = (time.perf_counter() - start) / n * 1e6
        stored = StoredSecrets(store)
        start = time.perf_counter()
        for secret in secrets:
            assert await stored.identify(Credentials(secret), "secret") is not None
        secret_us = (time.perf_counter() - start) / n * 1e6
        await store.close()
        return token_us, secret_us


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=int, default=5)
    ap.add_argument("--conns", type=int, default=2000)
    args = ap.parse_args()
    if not MQTTBENCH.exists():
        sys.exit(f"{MQTTBENCH} not found: build it with ../shared/bench/build.sh")
    raise_nofile()
    results: dict[str, dict[str, list[float]]] = {"http publish/s": {}, "mqtt connects/s": {}}
    extra = ["--mqtt-max-sessions", "0", "--max-subscriptions", "0", "--loop", "uvloop"]
    with ConduitProcess(extra=extra) as c:
        token = broker_token(c)
        url = f"http://127.0.0.1:{c.ports['http']}/{c.topic}/room1"
        for rnd in range(args.rounds):
            for who, auth, password in (
                ("secret", f"Client {c.secret}", c.secret),
                ("token", f"Bearer {token}", token),
            ):
                rate = wrk(url, args.duration, c.pid, auth)["rps"]
                results["http publish/s"].setdefault(who, []).append(rate)
                per_s = connects(c, password, args.conns)
                results["mqtt connects/s"].setdefault(who, []).append(per_s)
                print(f"round {rnd + 1} {who:6} http {rate:>10,.0f}/s  mqtt {per_s:>8,.0f}/s",
                      flush=True)  # fmt: skip
    print("\nmedians (same server, same run; compare ratios)")
    summary = {}
    for name, by in results.items():
        s, t = median(by["secret"]), median(by["token"])
        print(f"{name:16} secret {s:>10,.0f}  token {t:>10,.0f}  ratio {t / s:.2f}")
        summary[name] = {"secret": round(s), "token": round(t), "ratio": round(t / s, 3)}
    token_us, secret_us = asyncio.run(first_use(2000))
    print(f"first use of a credential: token {token_us:.0f} us, secret {secret_us:.0f} us")
    summary["first use us"] = {"secret": round(secret_us), "token": round(token_us)}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
