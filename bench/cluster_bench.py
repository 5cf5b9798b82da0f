"""The NATS bus against the in-process bus, and delivery across two nodes against one, same run.

    .venv/bin/python bench/cluster_bench.py [--rounds 3] [--duration 5]

Needs the local NATS (127.0.0.1:4222, JetStream) and, for the two-node scenarios, the local
PostgreSQL (127.0.0.1:5432, database ``test``); each run uses a NATS subject prefix, stream and
PostgreSQL schema of its own, removed after. Generators: ``mqttbench`` and ``wrk`` (see
../shared/bench/README.md).

Scenarios (issue 17):

- **bus cost on one node**: one ``conduit serve`` with ``bus = "local"``, then one with
  ``bus = "nats"`` (SQLite store): MQTT QoS 0, 1 publisher to 10 subscribers
  (``mqttbench pubsub -s 10``: deliveries/s) and HTTP SenML publishes (``wrk -c50``:
  requests/s, with one SSE subscriber reading the channel). Ratio nats / local; target >= 0.7.
- **two nodes**: two ``conduit serve`` on one PostgreSQL schema and the NATS bus. ``wrk``
  publishes over HTTP to node A; 10 SSE subscribers (curl, counting) are on node B, then on
  node A: publishes/s and deliveries/s, across / same node.
- **latency**: one MQTT client publishes a timestamp every 2 ms (QoS 0) and one subscriber
  receives it: the one-way latency's p50 and p99 with the local bus, with NATS on one node, and
  with NATS across two nodes. What NATS adds is the difference.

Prints each round, the medians and the ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import ConduitProcess, cpu_seconds, median, wrk_post_senml
from mqtt_bench import MQTTBENCH, mqttbench, raise_nofile

NATS_URL = "nats://127.0.0.1:4222"
PG_DSN = os.environ.get("CONDUIT_TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test")
TOPIC = "m/bench/c/data/t"

# One-way latency (argv: pub port, sub port, user, password, seconds): p50, p99 in ms.
PROBE = r"""
import asyncio, json, struct, sys, time
import aiomqtt
pub_port, sub_port = int(sys.argv[1]), int(sys.argv[2])
user, password, seconds = sys.argv[3], sys.argv[4], float(sys.argv[5])
lat = []
async def receive(ready):
    async with aiomqtt.Client("127.0.0.1", sub_port, username=user, password=password,
                              identifier="probe-sub") as c:
        await c.subscribe("m/bench/c/data/probe")
        ready.set()
        async for m in c.messages:
            lat.append(time.perf_counter() - struct.unpack("!d", m.payload)[0])
async def main():
    ready = asyncio.Event()
    rx = asyncio.create_task(receive(ready))
    await ready.wait()
    await asyncio.sleep(0.5)
    async with aiomqtt.Client("127.0.0.1", pub_port, username=user, password=password,
                              identifier="probe-pub") as c:
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            await c.publish("m/bench/c/data/probe", struct.pack("!d", time.perf_counter()))
            await asyncio.sleep(0.002)
    await asyncio.sleep(0.5)
    rx.cancel()
    lat.sort()
    q = lambda p: lat[min(len(lat) - 1, int(p * len(lat)))] * 1000
    print(json.dumps({"n": len(lat), "p50_ms": q(0.5), "p99_ms": q(0.99)}))
asyncio.run(main())
"""


def nats_args(prefix: str) -> list[str]:
    return ["--bus", "nats", "--nats-url", NATS_URL, "--nats-prefix", prefix,
            "--nats-stream", f"{prefix}-stream"]  # fmt: skip


def cleanup_nats(prefix: str) -> None:
    """Delete the run's stream (its subjects go with the prefix)."""

    async def go() -> None:
        import nats

        nc = await nats.connect(NATS_URL)
        try:
            await nc.jetstream().delete_stream(f"{prefix}-stream")
        except Exception:
            pass
        await nc.close()

    asyncio.run(go())


def drop_schema(schema: str) -> None:
    async def go() -> None:
        import asyncpg

        conn = await asyncpg.connect(PG_DSN)
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await conn.close()

    asyncio.run(go())


def mqtt_fanout(node: ConduitProcess, duration: float) -> float:
    result = mqttbench(
        ["pubsub", "-p", str(node.ports["mqtt"]), "-u", node.client_id, "-P", node.secret,
         "-t", TOPIC, "-q", "0", "-s", "10", "-w", "1000", "-d", str(duration),
         "-B", str(node.pid)],
        timeout=duration + 60,
    )  # fmt: skip
    return float(result["delivered_per_s"])


def http_publish(node: ConduitProcess, duration: int) -> float:
    url = f"http://127.0.0.1:{node.ports['http']}/{TOPIC}"
    summary = wrk_post_senml(url, duration, auth=f"Client {node.secret}")
    return summary["requests"] / (summary["duration_us"] / 1e6)


def with_sse(node: ConduitProcess) -> subprocess.Popen[bytes]:
    """One SSE subscriber reading the channel (curl), so that publishes are delivered."""
    return subprocess.Popen(
        ["curl", "-sN", "-H", f"Authorization: Client {node.secret}",
         f"http://127.0.0.1:{node.ports['http']}/m/bench/c/data/%23"],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip


def counted(receiver: ConduitProcess, sender: ConduitProcess, duration: int) -> dict[str, float]:
    """wrk publishing to ``sender`` while 10 SSE subscribers on ``receiver`` count messages
    (curl piped to grep: C readers, which keep up where a Python client would not)."""
    url = f"http://127.0.0.1:{receiver.ports['http']}/m/bench/c/data/%23"
    # curl ends itself after the run (-m); grep then prints its count.
    command = (f"curl -sN -m {duration + 3} -H 'Accept: text/event-stream'"
               f" -H 'Authorization: Client {receiver.secret}'"
               f" '{url}' | grep -c '^event: message'")  # fmt: skip
    readers = [
        subprocess.Popen(command, shell=True, stdout=subprocess.PIPE, text=True) for _ in range(10)
    ]
    time.sleep(1.0)
    cpu = cpu_seconds(sender.pid), cpu_seconds(receiver.pid)
    url = f"http://127.0.0.1:{sender.ports['http']}/{TOPIC}"
    summary = wrk_post_senml(url, duration, auth=f"Client {sender.secret}")
    used = cpu_seconds(sender.pid) - cpu[0]
    if receiver is not sender:
        used += cpu_seconds(receiver.pid) - cpu[1]
    delivered = 0
    for reader in readers:
        out, _ = reader.communicate()
        delivered += int(out.strip() or 0)
    seconds = summary["duration_us"] / 1e6
    return {
        "published_per_s": summary["requests"] / seconds,
        "delivered_per_s": delivered / seconds,
        "delivered_share": delivered / (10 * summary["requests"]),
        "server_cpu_us_per_publish": used / summary["requests"] * 1e6,
    }


def probe(pub: ConduitProcess, sub: ConduitProcess, seconds: float) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, str(pub.ports["mqtt"]), str(sub.ports["mqtt"]),
         pub.client_id, pub.secret, str(seconds)],
        capture_output=True, text=True, timeout=seconds + 30, check=True,
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def one_node(args: argparse.Namespace, results: dict[str, list[float]]) -> None:
    for bus in ("local", "nats"):
        prefix = f"cb{secrets.token_hex(4)}"
        extra = nats_args(prefix) if bus == "nats" else []
        try:
            with ConduitProcess(extra=extra) as node:
                fan = mqtt_fanout(node, args.duration)
                sse = with_sse(node)
                try:
                    rps = http_publish(node, int(args.duration))
                finally:
                    sse.terminate()
                lat = probe(node, node, args.duration)
        finally:
            if bus == "nats":
                cleanup_nats(prefix)
        results[f"mqtt qos0 1->10 deliveries/s {bus}"].append(fan)
        results[f"http publishes/s {bus}"].append(rps)
        results[f"latency p50 ms one node {bus}"].append(lat["p50_ms"])
        results[f"latency p99 ms one node {bus}"].append(lat["p99_ms"])
        print(f"  one node, {bus:5} bus: mqtt 1->10 {fan:>10,.0f} deliveries/s  http "
              f"{rps:>8,.0f} publishes/s  latency p50 {lat['p50_ms']:.2f} ms "
              f"p99 {lat['p99_ms']:.2f} ms", flush=True)  # fmt: skip


def two_nodes(args: argparse.Namespace, results: dict[str, list[float]]) -> None:
    prefix, schema = f"cb{secrets.token_hex(4)}", f"conduit_bench_{secrets.token_hex(4)}"
    env = {"CONDUIT_POSTGRES_DSN": PG_DSN, "CONDUIT_ENCRYPTION_KEY": secrets.token_hex(32)}
    common = ["--store", "postgres", "--postgres-schema", schema, *nats_args(prefix)]
    try:
        with ConduitProcess(extra=common, env=env) as a:
            with ConduitProcess(extra=common, env=env, provision=False) as b:
                b.secret, b.client_id = a.secret, a.client_id
                for where, receiver in (("same node", a), ("across nodes", b)):
                    r = counted(receiver, a, int(args.duration))
                    for key, value in r.items():
                        results[f"{key} {where}"].append(value)
                    print(f"  two nodes, subscribers {where:12}: "
                          f"{r['published_per_s']:>8,.0f} publishes/s "
                          f"{r['delivered_per_s']:>9,.0f} deliveries/s "
                          f"({r['delivered_share']:.1%} delivered), "
                          f"{r['server_cpu_us_per_publish']:.0f} µs server CPU per publish",
                          flush=True)  # fmt: skip
                lat = probe(a, b, args.duration)
                results["latency p50 ms two nodes nats"].append(lat["p50_ms"])
                results["latency p99 ms two nodes nats"].append(lat["p99_ms"])
                print(f"  two nodes, latency A -> B: p50 {lat['p50_ms']:.2f} ms "
                      f"p99 {lat['p99_ms']:.2f} ms", flush=True)  # fmt: skip
    finally:
        cleanup_nats(prefix)
        drop_schema(schema)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=float, default=5.0)
    args = ap.parse_args()
    if not MQTTBENCH.exists():
        sys.exit(f"{MQTTBENCH} not found: build ../shared/bench (./build.sh)")
    raise_nofile()
    results: dict[str, list[float]] = collections.defaultdict(list)
    for i in range(args.rounds):
        print(f"round {i + 1}", flush=True)
        one_node(args, results)
        two_nodes(args, results)
    m = {key: median(values) for key, values in results.items()}
    print("\nmedians (shared machine; compare ratios)")
    for key in sorted(m):
        print(f"  {key:55} {m[key]:>12,.2f}")

    def ratio(a: str, b: str) -> float:
        return m[a] / m[b] if m.get(b) else 0.0

    print("\nratios")
    print(
        f"  mqtt qos0 1->10, nats / local bus (target >= 0.7): "
        f"{ratio('mqtt qos0 1->10 deliveries/s nats', 'mqtt qos0 1->10 deliveries/s local'):.2f}"
    )
    print(
        f"  http publish, nats / local bus (target >= 0.7):    "
        f"{ratio('http publishes/s nats', 'http publishes/s local'):.2f}"
    )
    print(
        f"  two nodes, deliveries across / same node:          "
        f"{ratio('delivered_per_s across nodes', 'delivered_per_s same node'):.2f}"
    )
    print(
        f"  p99 latency added by NATS on one node:  "
        f"{m['latency p99 ms one node nats'] - m['latency p99 ms one node local']:.2f} ms; "
        f"across two nodes: "
        f"{m['latency p99 ms two nodes nats'] - m['latency p99 ms one node local']:.2f} ms"
    )
    print(json.dumps({k: round(v, 3) for k, v in m.items()}))


if __name__ == "__main__":
    main()
