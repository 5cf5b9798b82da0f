"""Memory per client, server side: what N idle MQTT connections, N MQTT subscribers (one
subscription each) and N WebSocket subscribers cost a gateway, counted by tracemalloc (the
Python objects the server allocates for them; the clients run in another process) and by the
process's RSS growth.

    .venv/bin/python bench/memory_bench.py [--n 1000]

The traced column is what the server's Python objects take (C allocations outside Python's
allocator, such as uvloop's transports, are not traced); the RSS column is the growth of a
fresh server's RSS, one server per kind of client, without tracemalloc (whose bookkeeping would
count in it).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import subprocess
import sys
import tempfile
import tracemalloc
from collections.abc import Awaitable, Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

MQTT_CLIENTS = r"""
import sys
sys.path.insert(0, sys.argv[6])
from mqtt_instructions import Client, subscribe_packet
port, user, password = int(sys.argv[1]), sys.argv[2], sys.argv[3]
n, subscribe = int(sys.argv[4]), sys.argv[5] == "1"
held = []
for i in range(n):
    c = Client(port, f"c{i}", user, password)
    if subscribe:
        c.sock.sendall(subscribe_packet(f"m/acme/c/temps/dev{i}/#"))
        c.read(5)
    held.append(c)
print("ready", flush=True)
sys.stdin.read()
"""

WS_CLIENTS = r"""
import asyncio, sys
from websockets.asyncio.client import connect
async def main():
    url, n = sys.argv[1], int(sys.argv[2])
    held = [await connect(url, ping_interval=None) for _ in range(n)]
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
asyncio.run(main())
"""


def rss_kb() -> int:
    with open("/proc/self/status") as f:
        return int(f.read().split("VmRSS:")[1].split()[0])


async def clients(*args: str) -> asyncio.subprocess.Process:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", *args, stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    assert proc.stdout is not None
    if not await proc.stdout.readline():
        raise RuntimeError("the clients failed")
    return proc


async def measure(
    n: int, start: Callable[[int], Awaitable[asyncio.subprocess.Process]], traced: bool
) -> float:
    """What ``n`` clients cost the server, in kB each: traced by tracemalloc, or its RSS
    growth."""
    warm = await start(10)
    gc.collect()
    if traced:
        tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0] if traced else rss_kb() * 1024
    proc = await start(n)
    await asyncio.sleep(0.3)
    gc.collect()
    after = tracemalloc.get_traced_memory()[0] if traced else rss_kb() * 1024
    tracemalloc.stop()
    for p in (proc, warm):
        assert p.stdin is not None
        p.stdin.close()
        await p.wait()
    await asyncio.sleep(0.3)
    return (after - before) / n / 1024


KINDS = {"idle": "idle MQTT connection", "sub": "MQTT subscriber (1 sub)",
         "ws": "WebSocket subscriber"}  # fmt: skip


async def main(n: int, kinds: list[str], traced: bool) -> None:
    from adapters.mqtt import MQTTAdapter
    from adapters.ws import WSAdapter
    from tests.conftest import make_gateway, provision

    gateway = await make_gateway(Path(tempfile.mkdtemp(prefix="memory-bench-")))
    world = await provision(gateway)
    party = world.both
    mqtt = MQTTAdapter(gateway, "127.0.0.1", 0, ws_port=None, max_sessions=0)
    ws = WSAdapter(gateway, "127.0.0.1", 0, dashboard=False)
    await mqtt.start()
    await ws.start()
    url = f"ws://127.0.0.1:{ws.port}/m/acme/c/temps/%23?authorization={party.secret}"

    def mqtt_clients(subscribe: bool) -> Callable[[int], Awaitable[asyncio.subprocess.Process]]:
        flag = "1" if subscribe else "0"
        port = str(mqtt.port)
        return lambda k: clients(
            MQTT_CLIENTS, port, party.id, party.secret, str(k), flag, str(HERE)
        )

    starts = {
        "idle": mqtt_clients(False),
        "sub": mqtt_clients(True),
        "ws": lambda k: clients(WS_CLIENTS, url, str(k)),
    }
    for kind in kinds:
        print(f"{kind} {await measure(n, starts[kind], traced):.2f}", flush=True)
    await ws.stop(1)
    await mqtt.stop(1)
    await gateway.close()


def report(n: int) -> None:
    """The traced pass for every kind in one server, then each kind's RSS pass in a fresh
    server of its own (memory another pass freed would be reused and hide the growth)."""
    run = [sys.executable, __file__, "--n", str(n), "--kinds"]
    traced = dict(
        line.split() for line in subprocess.check_output([*run, *KINDS], text=True).splitlines()
    )
    print(f"per client, {n} clients (server side)")
    for kind, name in KINDS.items():
        out = subprocess.check_output([*run, kind, "--rss"], text=True).split()
        print(f"{name:<26}{float(traced[kind]):6.1f} kB traced  {float(out[1]):6.1f} kB RSS")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--kinds", nargs="+", choices=list(KINDS), help=argparse.SUPPRESS)
    ap.add_argument("--rss", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.kinds is None:
        report(args.n)
    else:
        import uvloop

        uvloop.run(main(args.n, args.kinds, traced=not args.rss))
