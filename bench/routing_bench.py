"""Routing at scale: one commands channel, N devices each subscribed to its own subtopic, a
backend publishing to one device at a time. Conduit's MQTT adapter beside Mosquitto, same run,
same generator.

    .venv/bin/python bench/routing_bench.py [--n 100 1000 5000 10000] [--duration 5]
                                            [--window 500] [--conns 50] [--setup 50000]

For each N: ``--conns`` subscriber connections share N subscriptions ``<channel>/dev<i>/#``
(made with SUBSCRIBEs of 100 filters each; the time and the server CPU this takes are
reported), then one publisher sends QoS 0 PUBLISHes to ``<channel>/dev<i>/set`` for i in turn,
never more than ``--window`` messages ahead of what the subscribers received. Every message
matches exactly one subscription, so messages/s is deliveries/s. Reported: messages/s, the
server's CPU per message, and Conduit's ratio to Mosquitto; then Conduit's rate at the largest
N over its rate at the smallest (the flatness of routing), and the server CPU taken to set up
``--setup`` subscriptions (0: skip).

The generator is this process: plain sockets and ``selectors``, pre-encoded packets, a window of
batches (a few MB/s of Python work, above what either server does here). Conduit is
``mqtt_bench.py --serve`` (a gateway on SQLite, the in-process bus, the MQTT adapter, uvloop);
Mosquitto runs with ``../shared/bench/mosquitto.conf`` on a free port. MQTT 3.1.1 throughout.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import selectors
import statistics
import tempfile
import time
from pathlib import Path

from common import cpu_seconds
from mqtt_bench import Server, raise_nofile, start_conduit, start_mosquitto
from mqtt_instructions import Client, _packet, _utf8

CHANNEL = "m/bench/c/data"
PAYLOAD = b'[{"n":"on","vb":true}]'
FILTERS_PER_SUBSCRIBE = 100


def topic(i: int) -> str:
    return f"{CHANNEL}/dev{i:05d}"


def publish(i: int) -> bytes:
    return _packet(0x30, _utf8(f"{topic(i)}/set") + PAYLOAD)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def subscribe_all(clients: list[Client], n: int) -> None:
    """Subscription i goes to connection i % len(clients); every SUBACK must grant QoS 0."""
    per: list[list[str]] = [[] for _ in clients]
    for i in range(n):
        per[i % len(clients)].append(f"{topic(i)}/#")
    expected = []
    for client, filters in zip(clients, per, strict=True):
        out = bytearray()
        size = 0
        for k in range(0, len(filters), FILTERS_PER_SUBSCRIBE):
            chunk = filters[k : k + FILTERS_PER_SUBSCRIBE]
            packet_id = k // FILTERS_PER_SUBSCRIBE + 1
            body = packet_id.to_bytes(2, "big") + b"".join(_utf8(f) + b"\x00" for f in chunk)
            out += _packet(0x82, body)
            size += 1 + len(_varint(2 + len(chunk))) + 2 + len(chunk)
        client.sock.sendall(out)
        expected.append(size)
    for client, size in zip(clients, expected, strict=True):
        acks = client.read(size)
        at = 0
        while at < len(acks):  # SUBACK: 0x90, remaining length, packet id, return codes
            length, shift, at = 0, 0, at + 1
            while True:
                byte = acks[at]
                length |= (byte & 0x7F) << shift
                shift, at = shift + 7, at + 1
                if not byte & 0x80:
                    break
            if 0x80 in acks[at + 2 : at + length]:
                raise RuntimeError("a subscription was refused")
            at += length


def run(server: Server, n: int, conns: int, window: int, duration: float) -> dict[str, float]:
    clients = [
        Client(server.port, f"dev-conn-{c}", server.user, server.password)
        for c in range(min(conns, n))
    ]
    cpu0, t0 = cpu_seconds(server.pid), time.perf_counter()
    subscribe_all(clients, n)
    setup_cpu, setup_s = cpu_seconds(server.pid) - cpu0, time.perf_counter() - t0
    pub = Client(server.port, "backend", server.user, server.password)
    packets = [publish(i) for i in range(n)]
    size = len(packets[0])
    batch = max(1, min(64, window // 4, n))
    # Consecutive devices in every batch, every device in turn: lcm(n, batch) packets in all.
    rounds = batch // math.gcd(n, batch)
    ring = packets * rounds
    batches = [b"".join(ring[k : k + batch]) for k in range(0, len(ring), batch)]
    sel = selectors.DefaultSelector()
    for client in clients:
        client.sock.setblocking(False)
        sel.register(client.sock, selectors.EVENT_READ)
    received_bytes = sent = 0
    k = 0

    def pump(until: float) -> None:
        nonlocal received_bytes, sent, k
        while time.perf_counter() < until:
            while sent - received_bytes // size <= window - batch:
                pub.sock.sendall(batches[k])
                sent += batch
                k = (k + 1) % len(batches)
            for key, _ in sel.select(timeout=1.0):
                with contextlib.suppress(BlockingIOError):
                    received_bytes += len(key.fileobj.recv(1 << 20))  # type: ignore[union-attr]

    pump(time.perf_counter() + min(1.0, duration / 5))  # warm-up: caches filled
    start_received = received_bytes // size
    cpu1, t1 = cpu_seconds(server.pid), time.perf_counter()
    pump(t1 + duration)
    elapsed = time.perf_counter() - t1
    delivered = received_bytes // size - start_received
    cpu = cpu_seconds(server.pid) - cpu1
    for client in [*clients, pub]:
        client.close()
    sel.close()
    return {
        "msgs_per_s": delivered / elapsed,
        "cpu_us_per_msg": cpu / delivered * 1e6 if delivered else float("nan"),
        "setup_s": setup_s,
        "setup_cpu_s": setup_cpu,
    }


def setup_only(server: Server, n: int, conns: int) -> dict[str, float]:
    clients = [
        Client(server.port, f"setup-{c}", server.user, server.password) for c in range(conns)
    ]
    cpu0, t0 = cpu_seconds(server.pid), time.perf_counter()
    subscribe_all(clients, n)
    result = {"setup_s": time.perf_counter() - t0, "setup_cpu_s": cpu_seconds(server.pid) - cpu0}
    for client in clients:
        client.close()
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, nargs="+", default=[100, 1000, 5000, 10000])
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--window", type=int, default=500)
    ap.add_argument("--conns", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--setup", type=int, default=50_000)
    ap.add_argument("--loop", default="auto", choices=["auto", "uvloop", "asyncio"])
    args = ap.parse_args()
    raise_nofile()
    rows: dict[int, dict[str, list[dict[str, float]]]] = {}
    with tempfile.TemporaryDirectory(prefix="routing-bench-") as tmp:
        for rnd in range(args.rounds):
            for n in args.n:
                for name in ("mosquitto", "conduit"):
                    server = (
                        start_mosquitto(Path(tmp)) if name == "mosquitto" else
                        start_conduit(args.loop)
                    )  # fmt: skip
                    try:
                        r = run(server, n, args.conns, args.window, args.duration)
                    finally:
                        server.stop()
                    rows.setdefault(n, {}).setdefault(name, []).append(r)
                    print(
                        f"round {rnd + 1} N={n:<6} {name:10} {r['msgs_per_s']:>10,.0f} msgs/s"
                        f"  {r['cpu_us_per_msg']:6.1f} us CPU/msg  setup {r['setup_s']:.2f} s"
                        f" ({r['setup_cpu_s']:.2f} s CPU)",
                        flush=True,
                    )
        setup = None
        if args.setup:
            server = start_conduit(args.loop)
            try:
                setup = setup_only(server, args.setup, args.conns)
            finally:
                server.stop()
    print("\nmedians (shared 2-core machine; compare ratios)")
    print(f"{'N':>6} {'mosquitto':>12} {'conduit':>12} {'ratio':>6} {'conduit us/msg':>15}")
    summary: dict[str, object] = {"rounds": args.rounds, "duration_s": args.duration}
    rates = {}
    for n, by in rows.items():
        m = statistics.median(r["msgs_per_s"] for r in by["mosquitto"])
        c = statistics.median(r["msgs_per_s"] for r in by["conduit"])
        cpu = statistics.median(r["cpu_us_per_msg"] for r in by["conduit"])
        rates[n] = c
        print(f"{n:>6} {m:>12,.0f} {c:>12,.0f} {c / m:>6.2f} {cpu:>15.1f}")
        summary[f"n{n}"] = {"mosquitto": round(m), "conduit": round(c), "ratio": round(c / m, 3)}
    if len(rates) > 1:
        lo, hi = min(rates), max(rates)
        flat = rates[hi] / rates[lo]
        print(f"Conduit at N={hi} / at N={lo}: {flat:.2f} (target >= 0.8)")
        summary["flatness"] = round(flat, 3)
    if setup is not None:
        print(
            f"Conduit: {args.setup:,} subscriptions set up in {setup['setup_s']:.2f} s,"
            f" {setup['setup_cpu_s']:.2f} s of server CPU (target < 2 s)"
        )
        summary["setup"] = {"n": args.setup, **{k: round(v, 3) for k, v in setup.items()}}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
