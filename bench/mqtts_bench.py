"""MQTT over TLS: Conduit's MQTTS listener beside Mosquitto with TLS, on the same certificates,
same run, same load generator (``mqttbench -T``).

    .venv/bin/python bench/mqtts_bench.py [--rounds 3] [--duration 5] [--window 500]
                                          [--conns 2000]

A PKI made by Conduit's own tool (``certs``): a CA, a server certificate for 127.0.0.1, and a
client certificate whose CN is the Conduit client's id (mutual TLS: the certificate is the
client's only credential on both servers; Mosquitto with ``require_certificate`` and
``use_identity_as_username``). Scenarios:

- ``pubsub`` QoS 0, 1 publisher to 1 and to 10 subscribers, and QoS 1 to 1, at most
  ``--window`` messages beyond the slowest subscriber (500 at most for QoS 1 over TLS: past its
  queue Mosquitto drops QoS 1 messages);
- ``conn``: ``--conns`` connections, each a full TLS handshake with a client certificate, then
  CONNECT/CONNACK: connects per second (no session resumption);
- ``memory``: ``--idle`` MQTTS connections opened with the client certificate and left idle
  (a Python client in another process): the server's RSS growth per connection.

For ``conn`` and ``memory`` a third server is measured beside the two: a bare uvloop TLS server
on the same certificates that answers a CONNACK to anything (the floor of Python's TLS on
uvloop, nothing of Conduit in it).

``--only connects`` or ``--only memory`` runs that scenario alone.

Prints each round and, per scenario, the medians and Conduit's ratio to Mosquitto.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from mqtt_bench import (
    MQTTBENCH,
    ROOT,
    SHARED,
    TOPIC,
    Server,
    free_port,
    mqttbench,
    raise_nofile,
    start_conduit,
    wait_port,
)

sys.path.insert(0, str(ROOT))

import certs

SCENARIOS = [("qos0 1->1", 0, 1, "published_per_s"), ("qos0 1->10", 0, 10, "delivered_per_s"),
             ("qos1 1->1", 1, 1, "published_per_s")]  # fmt: skip


def make_pki(directory: Path) -> None:
    ca = certs.create_ca()
    certs.write(directory, "ca", ca)
    certs.write(directory, "server", certs.issue_server(ca, ["127.0.0.1", "localhost"]))
    client_certificate(directory, "bench")


def client_certificate(directory: Path, cn: str) -> None:
    """``client.pem``/``client.key`` for ``cn`` (Mosquitto takes any CN as the user name)."""
    for suffix in (".pem", ".key"):
        (directory / f"client{suffix}").unlink(missing_ok=True)
    certs.write(directory, "client", certs.issue_client(certs.load_ca(directory), cn))


def start_mosquitto_tls(conf_dir: Path, pki: Path) -> Server:
    mosquitto = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    port = free_port()
    conf = (
        (SHARED / "mosquitto.conf")
        .read_text()
        .replace("listener 18840 127.0.0.1", f"listener {port} 127.0.0.1")
    )
    conf += (
        f"\ncafile {pki / 'ca.pem'}\ncertfile {pki / 'server.pem'}\nkeyfile {pki / 'server.key'}\n"
        "require_certificate true\nuse_identity_as_username true\ntls_version tlsv1.2\n"
        # Run as root: it drops to the mosquitto user otherwise, who cannot read keys of mode 0600.
        "user root\n"
    )
    path = conf_dir / "mosquitto-tls.conf"
    path.write_text(conf)
    proc = subprocess.Popen(
        [mosquitto, "-c", str(path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        preexec_fn=raise_nofile, text=True,
    )  # fmt: skip
    wait_port(port)
    return Server(proc, port, "", "")


def tls_args(pki: Path) -> list[str]:
    return ["-T", "--cafile", str(pki / "ca.pem"), "--cert", str(pki / "client.pem"),
            "--key", str(pki / "client.key")]  # fmt: skip


def pubsub(server: Server, pki: Path, qos: int, subs: int, window: int, duration: float) -> Any:
    return mqttbench(
        ["pubsub", "-p", str(server.port), "-t", TOPIC, "-q", str(qos), "-s", str(subs),
         "-w", str(window), "-d", str(duration), "-B", str(server.pid), *tls_args(pki)],
        timeout=duration + 60,
    )  # fmt: skip


def conn(server: Server, pki: Path, n: int) -> Any:
    return mqttbench(
        ["conn", "-p", str(server.port), "-N", str(n), "-C", "50", "-H", "1",
         "-B", str(server.pid), *tls_args(pki)],
        timeout=300,
    )  # fmt: skip


IDLE_CLIENTS = r"""
import socket, ssl, sys
sys.path.insert(0, sys.argv[4])
from mqtt_instructions import connect_packet
port, n, pki = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
ctx = ssl.create_default_context(cafile=f"{pki}/ca.pem")
ctx.load_cert_chain(f"{pki}/client.pem", f"{pki}/client.key")
ctx.check_hostname = False
held = []
for i in range(n):
    s = ctx.wrap_socket(socket.create_connection(("127.0.0.1", port)))
    s.sendall(connect_packet(f"idle{i}", None, None))
    ack = s.recv(4)
    assert ack[:1] == b"\x20" and ack[3:4] == b"\x00", ack
    held.append(s)
print("ready", flush=True)
sys.stdin.read()
"""


# A bare TLS server on uvloop (argv: port file, pki directory): a CONNACK for anything.
BARE_TLS = r"""
import asyncio, ssl, sys
import uvloop
class Answer(asyncio.Protocol):
    def connection_made(self, transport): self.transport = transport
    def data_received(self, data): self.transport.write(b"\x20\x02\x00\x00")
async def main():
    pki = sys.argv[2]
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(f"{pki}/server.pem", f"{pki}/server.key")
    context.load_verify_locations(f"{pki}/ca.pem")
    context.verify_mode = ssl.CERT_OPTIONAL
    server = await asyncio.get_running_loop().create_server(Answer, "127.0.0.1", 0, ssl=context)
    print(server.sockets[0].getsockname()[1], flush=True)
    await asyncio.Event().wait()
uvloop.run(main())
"""


def start_bare_tls(pki: Path) -> Server:
    proc = subprocess.Popen(
        [sys.executable, "-c", BARE_TLS, "-", str(pki)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    return Server(proc, int(proc.stdout.readline()), "", "")


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(f.read().split("VmRSS:")[1].split()[0])


def idle_memory(server: Server, pki: Path, n: int) -> float:
    """kB of server RSS per idle MQTTS connection (10 opened first, to warm up)."""
    here = str(Path(__file__).resolve().parent)

    def open_clients(k: int) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            [sys.executable, "-c", IDLE_CLIENTS, str(server.port), str(k), str(pki), here],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != "ready":
            raise RuntimeError("the idle clients failed")
        return proc

    warm = open_clients(10)
    time.sleep(0.5)
    before = rss_kb(server.pid)
    held = open_clients(n)
    time.sleep(1.0)
    grown = rss_kb(server.pid) - before
    for proc in (held, warm):
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait()
    return grown / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--window", type=int, default=500)
    ap.add_argument("--conns", type=int, default=2000)
    ap.add_argument("--idle", type=int, default=1000)
    ap.add_argument("--loop", default="auto", choices=["auto", "uvloop", "asyncio"])
    ap.add_argument(
        "--only", choices=["connects", "memory"], default=None, help="run one scenario alone"
    )
    args = ap.parse_args()
    if not MQTTBENCH.exists():
        sys.exit(f"{MQTTBENCH} not found: build it with ../shared/bench/build.sh")
    raise_nofile()
    results: dict[str, dict[str, list[float]]] = {}
    with tempfile.TemporaryDirectory(prefix="mqtts-bench-") as tmp:
        pki = Path(tmp) / "pki"
        make_pki(pki)
        for rnd in range(args.rounds):
            scenarios = [*SCENARIOS, ("connects/s", -1, 0, ""), ("kB/idle conn", -2, 0, "")]
            if args.only == "memory":
                scenarios = scenarios[-1:]
            elif args.only == "connects":
                scenarios = scenarios[-2:-1]
            for name, qos, subs, figure in scenarios:
                servers = ("mosquitto", "conduit", "bare-uvloop") if qos < 0 else (
                    "mosquitto", "conduit")  # fmt: skip
                for who in servers:
                    if who == "bare-uvloop":
                        server = start_bare_tls(pki)
                    elif who == "conduit":
                        # Its client is made at start: the certificate carries its id.
                        server = start_conduit(args.loop, pki)
                        client_certificate(pki, server.user)
                    else:
                        server = start_mosquitto_tls(Path(tmp), pki)
                    try:
                        if qos == -2:
                            r = {"kB_per_connection": idle_memory(server, pki, args.idle)}
                            value = r["kB_per_connection"]
                        elif qos < 0:
                            r = conn(server, pki, args.conns)
                            value = float(r["connects_per_s"])
                        else:
                            r = pubsub(server, pki, qos, subs, args.window, args.duration)
                            value = float(r[figure])
                    finally:
                        server.stop()
                    results.setdefault(name, {}).setdefault(who, []).append(value)
                    detail = json.dumps(r)[:160]
                    print(
                        f"round {rnd + 1} {name:12} {who:10} {value:>12,.1f}  {detail}", flush=True
                    )
    print("\nmedians (shared machine; compare ratios)")
    summary = {}
    for name, by in results.items():
        m, c = statistics.median(by["mosquitto"]), statistics.median(by["conduit"])
        ratio = c / m if m else float("nan")
        print(f"{name:12} mosquitto {m:>12,.1f}  conduit {c:>12,.1f}  ratio {ratio:.2f}")
        summary[name] = {"mosquitto": m, "conduit": c, "ratio": round(ratio, 3)}
        if "bare-uvloop" in by:
            b = statistics.median(by["bare-uvloop"])
            print(f"{'':12} bare uvloop TLS {b:>6,.1f}  ratio to mosquitto {b / m:.2f}")
            summary[name]["bare-uvloop"] = b
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
