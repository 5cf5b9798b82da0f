"""CoAP POST of a SenML JSON pack: Conduit's CoAP adapter beside the bare aiocoap server, in the
same run.

Conduit authenticates the ``auth=`` secret, validates the SenML and publishes to the in-process
bus. The anchor is ``../shared/bench/coap_server.py``: one aiocoap POST resource, orjson parse,
no auth, no validation, no routing. Both run on the default asyncio loop (aiocoap under uvloop
stopped answering after clients vanished: ``../shared/bench/README.md``), one after the other,
``--rounds`` times; the medians and their ratio are printed.

    .venv/bin/python bench/coap_bench.py [--rounds 3] [--duration 10] [--endpoints 50]

The load generator is ``coapbench`` (``bash ../shared/bench/build.sh``, into ``$BENCH_BIN`` or
``/tmp/bench-bin``): ENDPOINTS UDP sockets, one confirmable POST (Content-Format 110) in flight
on each. Without it, a Python generator in this process does the same (``--generator python``,
picked automatically when the binary is missing); it shares the CPU with the servers, so its
absolute figures are lower and only its ratio compares.

``--serve`` is the Conduit side, run in a subprocess: a gateway on a temporary SQLite file with
one domain, channel and client, and the CoAP adapter on a free port. It prints one JSON line
(port, secret, topic) and serves until it is terminated.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import cast

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import BENCH_BIN, SHARED_BENCH, free_port, median

DOMAIN, CHANNEL = "bench", "data"
TOPIC = f"m/{DOMAIN}/c/{CHANNEL}/room1"


# The Conduit side (subprocess)
async def serve() -> None:
    from adapters.coap import CoAPAdapter
    from core.auth import store_auth
    from core.bus.local import LocalBus
    from core.gateway import Gateway
    from core.store.sqlite import SQLiteStore

    with tempfile.TemporaryDirectory(prefix="conduit-coap-bench-") as tmp:
        store = SQLiteStore(Path(tmp) / "conduit.db")
        gateway = Gateway(store, LocalBus(), *store_auth(store))
        await gateway.start()
        prov = gateway.provisioning
        await prov.create_domain(DOMAIN)
        await prov.create_channel(DOMAIN, CHANNEL)
        client, secret = await prov.create_client(DOMAIN, "bench")
        await prov.connect(DOMAIN, client.id, CHANNEL, True, True)
        adapter = CoAPAdapter(gateway, "127.0.0.1", 0)
        await adapter.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        print(json.dumps({"port": adapter.port, "secret": secret, "topic": TOPIC}), flush=True)
        await stop.wait()
        await adapter.stop(1.0)
        await gateway.close()


# Load generators
def payload() -> bytes:
    sys.path.insert(0, str(SHARED_BENCH))
    from senml_samples import HTTP_BODY

    body: bytes = HTTP_BODY
    return body


def coapbench(
    port: int, path: str, query: str | None, endpoints: int, duration: int, pid: int, body: Path
) -> dict[str, float]:
    args = [str(BENCH_BIN / "coapbench"), "-p", str(port), "-e", str(endpoints),
            "-d", str(duration), "-u", path, "-f", str(body), "-B", str(pid)]  # fmt: skip
    if query:
        args += ["-q", query]
    out = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    result: dict[str, float] = json.loads(out.strip().splitlines()[-1])
    return result


def _option(number: int, last: int, value: bytes) -> bytes:
    """One CoAP option (RFC 7252 section 3.1), delta-encoded against the previous one."""

    def nibble(n: int) -> tuple[int, bytes]:
        if n < 13:
            return n, b""
        if n < 269:
            return 13, bytes([n - 13])
        return 14, struct.pack("!H", n - 269)

    d, dx = nibble(number - last)
    n, nx = nibble(len(value))
    return bytes([d << 4 | n]) + dx + nx + value


def request_template(path: str, query: str | None, body: bytes) -> bytearray:
    """A confirmable POST with a 2-byte token; message id and token are patched per send."""
    head = bytearray([0x42, 0x02, 0, 0, 0, 0])
    last = 0
    for segment in path.split("/"):
        head += _option(11, last, segment.encode())
        last = 11
    head += _option(12, last, bytes([110]))
    last = 12
    if query:
        head += _option(15, last, query.encode())
    return head + b"\xff" + body


class _Endpoint(asyncio.DatagramProtocol):
    """One simulated device: one confirmable POST in flight, the next sent on its 2.04 ACK."""

    def __init__(self, template: bytearray, stats: dict[str, float], until: float) -> None:
        self.template = bytearray(template)
        self.stats = stats
        self.until = until
        self.mid = random.randrange(0x10000)
        self.transport: asyncio.DatagramTransport | None = None
        self.sent_at = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # The selector transport is not registered as a DatagramTransport on 3.11.
        self.transport = cast(asyncio.DatagramTransport, transport)
        self.send()

    def send(self) -> None:
        assert self.transport is not None
        self.mid = (self.mid + 1) & 0xFFFF
        struct.pack_into("!HH", self.template, 2, self.mid, self.mid)
        self.sent_at = time.monotonic()
        self.transport.sendto(self.template)

    def datagram_received(self, data: bytes, addr: object) -> None:
        if len(data) >= 6 and data[0] >> 4 & 3 == 2 and data[2:4] == data[4:6]:
            if data[2:4] == struct.pack("!H", self.mid):
                self.stats["ok" if data[1] == 0x44 else "bad"] += 1
                if time.monotonic() < self.until:
                    self.send()
                return
        self.stats["bad"] += 1

    def stale(self, now: float) -> bool:
        return now - self.sent_at > 2.0


def python_generator(
    port: int, path: str, query: str | None, endpoints: int, duration: int, body: bytes
) -> dict[str, float]:
    async def run() -> dict[str, float]:
        loop = asyncio.get_running_loop()
        stats = {"ok": 0.0, "bad": 0.0, "timeouts": 0.0}
        start = time.monotonic()
        until = start + duration
        template = request_template(path, query, body)
        eps = []
        for _ in range(endpoints):
            _, ep = await loop.create_datagram_endpoint(
                lambda: _Endpoint(template, stats, until), remote_addr=("127.0.0.1", port)
            )
            eps.append(ep)
        while (now := time.monotonic()) < until:
            await asyncio.sleep(0.5)
            for ep in eps:
                if ep.stale(now):  # lost: count it and send a fresh one
                    stats["timeouts"] += 1
                    ep.send()
        elapsed = time.monotonic() - start
        for ep in eps:
            if ep.transport is not None:
                ep.transport.close()
        return {**stats, "elapsed_s": elapsed, "req_per_s": stats["ok"] / elapsed}

    return asyncio.run(run())


# One measurement of each side
def measure(
    port: int, pid: int, path: str, query: str | None, args: argparse.Namespace, body: Path
) -> dict[str, float]:
    if args.generator == "coapbench":
        return coapbench(port, path, query, args.endpoints, args.duration, pid, body)
    cpu0, t0 = cpu_seconds(pid), time.monotonic()
    result = python_generator(port, path, query, args.endpoints, args.duration, body.read_bytes())
    result["server_cpu_pct"] = (cpu_seconds(pid) - cpu0) / (time.monotonic() - t0) * 100
    return result


def cpu_seconds(pid: int) -> float:
    """User and system CPU time a process used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_udp(port: int, timeout: float = 15.0) -> None:
    """Until a CoAP ping (empty CON) on ``port`` is answered."""
    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(0.2)
        while time.monotonic() < deadline:
            s.sendto(b"\x40\x00\x12\x34", ("127.0.0.1", port))
            with contextlib.suppress(OSError):
                if s.recv(64):
                    return
    raise TimeoutError(f"nothing answers CoAP on {port}")


def stop(proc: subprocess.Popen[str]) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def free_coap_port() -> int:
    """A port free for UDP and TCP alike (aiocoap's defaults also listen on TCP)."""
    while True:
        port = free_port(socket.SOCK_DGRAM)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port


def anchor(args: argparse.Namespace, body: Path) -> dict[str, float]:
    port = free_coap_port()
    proc = subprocess.Popen(
        [sys.executable, str(SHARED_BENCH / "coap_server.py"), "--port", str(port)], text=True
    )
    try:
        wait_udp(port)
        return measure(port, proc.pid, "senml", None, args, body)
    finally:
        stop(proc)


def conduit(args: argparse.Namespace, body: Path) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    proc = subprocess.Popen(
        [sys.executable, __file__, "--serve"], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert proc.stdout is not None
        info = json.loads(proc.stdout.readline())
        wait_udp(info["port"])
        return measure(info["port"], proc.pid, info["topic"], f"auth={info['secret']}", args, body)
    finally:
        stop(proc)


def describe(name: str, r: dict[str, float]) -> str:
    line = f"{name:8} {r['req_per_s']:8.0f} req/s  timeouts {r.get('timeouts', 0):.0f}"
    line += f"  bad {r.get('bad', 0):.0f}"
    if "server_cpu_pct" in r:
        line += f"  server cpu {r['server_cpu_pct']:.0f}%"
    if "p99_ms" in r:
        line += f"  p99 {r['p99_ms']:.1f} ms"
    return line


def per_cpu_second(runs: list[dict[str, float]]) -> float | None:
    """Requests per second of server CPU: steadier than req/s on a shared machine."""
    if not all(r.get("server_cpu_pct", 0) > 0 for r in runs):
        return None
    return median([r["req_per_s"] / (r["server_cpu_pct"] / 100) for r in runs])


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=int, default=10)
    ap.add_argument("--endpoints", type=int, default=50)
    ap.add_argument("--generator", choices=["coapbench", "python"])
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        # Requests still arriving while the context shuts down are dropped unstarted; aiocoap
        # then leaves a "never awaited" warning per request. Nothing is lost that was answered.
        warnings.filterwarnings("ignore", "coroutine 'Context._render_to_pipe' was never awaited")
        asyncio.run(serve())  # the default asyncio loop, on purpose
        return
    found = (BENCH_BIN / "coapbench").exists()
    if args.generator is None:
        args.generator = "coapbench" if found else "python"
        if not found:
            print(f"{BENCH_BIN}/coapbench not found (bash {SHARED_BENCH}/build.sh builds it):"
                  " using the Python generator", file=sys.stderr)  # fmt: skip
    elif args.generator == "coapbench" and not found:
        sys.exit(f"{BENCH_BIN}/coapbench not found: bash {SHARED_BENCH}/build.sh")
    runs: dict[str, list[dict[str, float]]] = {"anchor": [], "conduit": []}
    body = payload()
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        f.write(body)
        f.flush()
        for i in range(args.rounds):
            for name, fn in (("anchor", anchor), ("conduit", conduit)):
                r = fn(args, Path(f.name))
                runs[name].append(r)
                print(f"round {i + 1} {describe(name, r)}", flush=True)
    a = median([r["req_per_s"] for r in runs["anchor"]])
    c = median([r["req_per_s"] for r in runs["conduit"]])
    summary: dict[str, object] = {
        "generator": args.generator,
        "endpoints": args.endpoints,
        "rounds": args.rounds,
        "duration_s": args.duration,
        "payload_bytes": len(body),
        "loop": "asyncio",
        "anchor_rps": round(a),
        "conduit_rps": round(c),
        "rps_ratio": round(c / a, 3),
        "target": "rps_ratio >= 0.8",
    }
    a_cpu, c_cpu = per_cpu_second(runs["anchor"]), per_cpu_second(runs["conduit"])
    if a_cpu and c_cpu:
        summary["anchor_req_per_cpu_s"] = round(a_cpu)
        summary["conduit_req_per_cpu_s"] = round(c_cpu)
        summary["cpu_ratio"] = round(c_cpu / a_cpu, 3)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
