"""MQTT: Conduit's MQTT adapter beside Mosquitto, same run, same load generator.

    .venv/bin/python bench/mqtt_bench.py [--rounds 3] [--duration 5] [--window 1000]
                                         [--conns 5000] [--loop auto|uvloop|asyncio]
                                         [--only pubsub|conn]

Scenarios (``mqttbench`` from ``../shared/bench``, built by ``../shared/bench/build.sh`` into
``/tmp/bench-bin`` or ``$BENCH_BIN``; MQTT 3.1.1, client id as user name, secret as password, on a
topic of a channel the client is connected to):

- ``pubsub`` QoS 0 and QoS 1, 1 publisher to 1 and to 10 subscribers, at most ``--window``
  messages beyond the slowest subscriber: deliveries/s (and published messages/s);
- ``conn``: ``--conns`` idle authenticated connections opened 100 at a time: connects/s and the
  server's RSS growth per connection (each round on a fresh server process).

Each round measures Mosquitto (``../shared/bench/mosquitto.conf``, copied to a temporary file
with a free port when 18840 is taken; the system Mosquitto on 1883 is never touched) and then
Conduit: this file re-run with ``--serve`` as a separate process holding a gateway on a SQLite
store in a temporary directory, the in-process bus and the MQTT adapter (uvloop when installed).
Prints each round and, per scenario, the medians and Conduit's ratio to Mosquitto beside the
targets of issue 3. The machine is shared: run several rounds and quote medians.

Without ``mqttbench`` a small Python generator (``pyload``) drives the same scenarios; it is
slower than either server, so its figures show that the path works, not how fast it is.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

SHARED = Path(os.environ.get("SHARED_BENCH", ROOT.parent / "shared" / "bench"))
BENCH_BIN = Path(os.environ.get("BENCH_BIN", "/tmp/bench-bin"))
MQTTBENCH = BENCH_BIN / "mqttbench"
TOPIC = "m/bench/c/data/t"
NOFILE = 20_000

# (name, qos, subscribers, figure, target ratio to Mosquitto)
PUBSUB = [
    ("qos0 1->1", 0, 1, "published_per_s", 0.25),
    ("qos0 1->10", 0, 10, "delivered_per_s", 0.4),
    ("qos1 1->1", 1, 1, "published_per_s", 0.25),
    ("qos1 1->10", 1, 10, "delivered_per_s", None),
]


def raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = NOFILE if hard == resource.RLIM_INFINITY else min(NOFILE, hard)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, want), max(hard, want)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_taken(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def wait_port(port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if port_taken(port):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {port}")


# --- the Conduit server process ----------------------------------------------------------


async def serve(loop_name: str, tls_dir: str | None = None) -> None:
    """Gateway + MQTT adapter; prints one JSON line with the port and credentials. With
    ``tls_dir`` (a PKI of ``conduit certs``: server.pem, server.key, ca.pem), MQTTS only, with
    client certificates (CN = client id) accepted as credentials."""
    from adapters.mqtt import MQTTAdapter
    from conduit.app import tune_gc
    from conduit.tls import server_context
    from core.auth import store_auth
    from core.bus.local import LocalBus
    from core.gateway import Gateway
    from core.limits import Limits
    from core.listeners import Endpoint
    from core.store.sqlite import SQLiteStore

    with tempfile.TemporaryDirectory(prefix="conduit-mqtt-bench-") as tmp:
        store = SQLiteStore(Path(tmp) / "conduit.db")
        # One client holds every benchmark connection: no cap on its subscriptions.
        auth = store_auth(store, certificates="client_id" if tls_dir else None)
        gateway = Gateway(store, LocalBus(), *auth, limits=Limits(max_subscriptions=0))
        await gateway.start()
        prov = gateway.provisioning
        await prov.create_domain("bench")
        await prov.create_channel("bench", "data")
        client, secret = await prov.create_client("bench", "bench")
        await prov.connect("bench", client.id, "data", True, True)
        # Limits per client off: every benchmark connection is the same client.
        endpoints = None
        if tls_dir is not None:
            pki = Path(tls_dir)
            context = server_context(
                pki / "server.pem", pki / "server.key", pki / "ca.pem", "optional"
            )
            endpoints = [Endpoint("mqtts", "127.0.0.1", 0, context)]
        adapter = MQTTAdapter(
            gateway, "127.0.0.1", 0, ws_port=None, max_sessions=0, max_subscriptions=0,
            endpoints=endpoints,
        )  # fmt: skip
        await adapter.start()
        tune_gc()  # as conduit serve does
        print(
            json.dumps(
                {"port": adapter.port, "client_id": client.id, "secret": secret, "loop": loop_name}
            ),
            flush=True,
        )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await adapter.stop(timeout=2)
        await gateway.close()


def serve_main(loop_name: str, tls_dir: str | None = None) -> None:
    raise_nofile()
    if loop_name != "asyncio":
        try:
            import uvloop

            uvloop.run(serve("uvloop", tls_dir))
            return
        except ImportError:
            if loop_name == "uvloop":
                raise
    asyncio.run(serve("asyncio", tls_dir))


class Server:
    """A server under test in its own process: ``port``, ``pid``, credentials."""

    def __init__(self, proc: subprocess.Popen[str], port: int, user: str, password: str) -> None:
        self.proc = proc
        self.port = port
        self.user = user
        self.password = password

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def start_conduit(loop_name: str, tls_dir: Path | None = None) -> Server:
    tls = ["--tls-dir", str(tls_dir)] if tls_dir is not None else []
    proc = subprocess.Popen(
        [sys.executable, __file__, "--serve", "--loop", loop_name, *tls],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError("the Conduit MQTT server did not start")
    info = json.loads(line)
    return Server(proc, info["port"], info["client_id"], info["secret"])


def start_mosquitto(conf_dir: Path) -> Server:
    mosquitto = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    conf = (SHARED / "mosquitto.conf").read_text()
    port = 18840
    if port_taken(port):
        port = free_port()
        conf = conf.replace("listener 18840", f"listener {port}")
    path = conf_dir / "mosquitto.conf"
    path.write_text(conf)
    proc = subprocess.Popen(
        [mosquitto, "-c", str(path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=raise_nofile,
        text=True,
    )
    wait_port(port)
    return Server(proc, port, "bench", "bench")


# --- load ---------------------------------------------------------------------------------


def mqttbench(args: list[str], timeout: float) -> dict[str, Any]:
    out = subprocess.run(
        [str(MQTTBENCH), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        preexec_fn=raise_nofile,
    )
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if not lines:
        raise RuntimeError(f"mqttbench failed: {out.stderr.strip()}")
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def pubsub(server: Server, qos: int, subs: int, window: int, duration: float) -> dict[str, Any]:
    if MQTTBENCH.exists():
        return mqttbench(
            [
                "pubsub",
                "-p",
                str(server.port),
                "-u",
                server.user,
                "-P",
                server.password,
                "-t",
                TOPIC,
                "-q",
                str(qos),
                "-s",
                str(subs),
                "-w",
                str(window),
                "-d",
                str(duration),
                "-B",
                str(server.pid),
            ],
            timeout=duration + 60,
        )
    return asyncio.run(pyload_pubsub(server, qos, subs, window, duration))


def conn(server: Server, n: int) -> dict[str, Any]:
    if MQTTBENCH.exists():
        return mqttbench(
            [
                "conn",
                "-p",
                str(server.port),
                "-u",
                server.user,
                "-P",
                server.password,
                "-N",
                str(n),
                "-C",
                "100",
                "-H",
                "3",
                "-B",
                str(server.pid),
            ],
            timeout=180,
        )
    return asyncio.run(pyload_conn(server, n))


# Python fallback load (no mqttbench): the same scenarios, much slower than the servers.


def _connect_packet(client_id: str, user: str, password: str) -> bytes:
    from adapters.mqtt.codec import Connect, encode

    return encode(Connect(4, True, 0, client_id, user, password.encode()), 4)


async def _open(
    server: Server, client_id: str
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(_connect_packet(client_id, server.user, server.password))
    await reader.readexactly(4)
    return reader, writer


async def pyload_pubsub(
    server: Server, qos: int, subs: int, window: int, duration: float
) -> dict[str, Any]:
    from adapters.mqtt.codec import Decoder, PubAck, Publish, Subscribe, Subscription, encode

    counts = [0] * subs
    readers = []
    for i in range(subs):
        reader, writer = await _open(server, f"pys{i}")
        writer.write(encode(Subscribe(1, [Subscription(TOPIC, qos)]), 4))
        await reader.readexactly(5)
        readers.append((reader, writer))

    async def consume(i: int) -> None:
        reader, writer = readers[i]
        decoder = Decoder(protocol_level=4)
        while data := await reader.read(65536):
            decoder.feed(data)
            acks = []
            for p in decoder:
                if isinstance(p, Publish):
                    counts[i] += 1
                    if p.qos:
                        acks.append(encode(PubAck(p.packet_id), 4))
            if acks:
                writer.write(b"".join(acks))

    tasks = [asyncio.create_task(consume(i)) for i in range(subs)]
    _, pub = await _open(server, "pyp")
    payload = b'[{"bn":"urn:dev:mac:0024befffe804ff1:","n":"temperature","v":23.5}]'
    sent = 0
    start = time.monotonic()
    while time.monotonic() - start < duration:
        if sent - min(counts) < window:
            pub.write(encode(Publish(TOPIC, payload, qos, packet_id=sent % 65535 + 1), 4))
            sent += 1
            if sent % 100 == 0:
                await pub.drain()
        else:
            await asyncio.sleep(0)
    elapsed = time.monotonic() - start
    for task in tasks:
        task.cancel()
    return {
        "delivered_per_s": sum(counts) / elapsed,
        "published_per_s": sent / elapsed,
        "generator": "python",
    }


async def pyload_conn(server: Server, n: int) -> dict[str, Any]:
    rss0 = _rss_kb(server.pid)
    start = time.monotonic()
    conns = [await _open(server, f"pyi{i}") for i in range(n)]
    elapsed = time.monotonic() - start
    await asyncio.sleep(1)
    rss1 = _rss_kb(server.pid)
    for _, writer in conns:
        writer.close()
    return {
        "connected": n,
        "connects_per_s": n / elapsed,
        "rss_kb_per_conn": (rss1 - rss0) / n,
        "generator": "python",
    }


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


# --- the run ------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--window", type=int, default=1000)
    ap.add_argument("--conns", type=int, default=5000)
    ap.add_argument("--loop", default="auto", choices=["auto", "uvloop", "asyncio"])
    ap.add_argument("--only", choices=["pubsub", "conn"])
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--tls-dir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        serve_main(args.loop, args.tls_dir)
        return
    raise_nofile()
    if not MQTTBENCH.exists():
        print(f"{MQTTBENCH} not found (bash ../shared/bench/build.sh): using the slow Python load")
    results: dict[str, dict[str, list[float]]] = {}

    def record(scenario: str, who: str, value: float) -> None:
        results.setdefault(scenario, {}).setdefault(who, []).append(value)

    with tempfile.TemporaryDirectory(prefix="mqtt-bench-") as tmp:
        for rnd in range(1, args.rounds + 1):
            if args.only in (None, "pubsub"):
                servers = {
                    "mosquitto": start_mosquitto(Path(tmp)),
                    "conduit": start_conduit(args.loop),
                }
                try:
                    for name, qos, subs, figure, _ in PUBSUB:
                        for who, server in servers.items():
                            r = pubsub(server, qos, subs, args.window, args.duration)
                            record(name, who, r[figure])
                            print(
                                f"round {rnd} {name:11} {who:9} {r[figure]:>10,.0f} {figure}"
                                f"  (server cpu {r.get('broker_cpu_pct', -1):.0f}%,"
                                f" end {r.get('end', '-')},"
                                f" protocol errors {r.get('proto_errors', 0)})",
                                flush=True,
                            )
                finally:
                    for server in servers.values():
                        server.stop()
            if args.only in (None, "conn"):
                for who in ("mosquitto", "conduit"):
                    server = (
                        start_mosquitto(Path(tmp))
                        if who == "mosquitto"
                        else start_conduit(args.loop)
                    )
                    try:
                        r = conn(server, args.conns)
                    finally:
                        server.stop()
                    record("connect rate", who, r["connects_per_s"])
                    record("RSS per idle conn (kB)", who, r["rss_kb_per_conn"])
                    print(
                        f"round {rnd} conn        {who:9} {r['connects_per_s']:>10,.0f} connects/s"
                        f"  {r['rss_kb_per_conn']:.2f} kB/conn"
                        f"  ({r.get('connected', '?')} connected, {r.get('failed', 0)} failed)",
                        flush=True,
                    )

    targets = {name: target for name, _, _, _, target in PUBSUB}
    print()
    if not MQTTBENCH.exists():
        print("Python load generator: these figures show the path works, not the servers' speed")
    print(f"medians of {args.rounds} rounds (shared 2-core machine; compare ratios)")
    print(f"{'scenario':24} {'mosquitto':>12} {'conduit':>12} {'ratio':>7}  target")
    for scenario, by in results.items():
        mosq = statistics.median(by.get("mosquitto", [0.0]))
        cond = statistics.median(by.get("conduit", [0.0]))
        ratio = cond / mosq if mosq else 0.0
        if scenario == "connect rate":
            target = ">= 5,000/s" + (" ok" if cond >= 5000 else " MISSED")
        elif scenario.startswith("RSS"):
            target = "<= 10 kB" + (" ok" if cond <= 10 else " MISSED")
        elif targets.get(scenario):
            t = targets[scenario]
            target = f">= {t}" + (" ok" if ratio >= t else " MISSED")  # type: ignore[operator]
        else:
            target = "-"
        print(f"{scenario:24} {mosq:>12,.1f} {cond:>12,.1f} {ratio:>7.2f}  {target}")


if __name__ == "__main__":
    main()
