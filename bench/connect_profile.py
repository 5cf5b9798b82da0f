"""Where the time of an MQTT CONNECT goes: cProfile on the server side of N sequential
authenticated connects (MQTT 3.1.1, credentials cached by a first round), the clients in
another process.

    .venv/bin/python bench/connect_profile.py [--n 3000] [--no-gc] [--tune-gc]

Prints the profiled Python time per connect and the functions that take it. ``--no-gc`` turns
the cycle collector off (the spikes it adds land in whatever function runs when it starts);
``--tune-gc`` applies what ``conduit serve`` does (``conduit.app.tune_gc``). cProfile slows
everything down: compare the lines, not the total against a wall-clock rate.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import os
import pstats
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

CLIENTS = r"""
import sys
sys.path.insert(0, sys.argv[5])
from mqtt_instructions import Client
port, user, password, n = int(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
held = [Client(port, f"c{i}", user, password) for i in range(n)]
print("connected", flush=True)
sys.stdin.read()
"""


async def connects(port: int, user: str, password: str, n: int) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CLIENTS, str(port), user, password, str(n), str(HERE),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None and proc.stdin is not None
    if not await proc.stdout.readline():
        raise RuntimeError("the clients failed")
    proc.stdin.close()
    await proc.wait()


async def main(n: int, tune: bool) -> None:
    from adapters.mqtt import MQTTAdapter
    from conduit.app import tune_gc
    from tests.conftest import make_gateway, provision

    gateway = await make_gateway(Path(tempfile.mkdtemp(prefix="connect-profile-")))
    world = await provision(gateway)
    adapter = MQTTAdapter(gateway, "127.0.0.1", 0, ws_port=None, max_sessions=0)
    await adapter.start()
    if tune:
        tune_gc()
    party = world.both
    await connects(adapter.port, party.id, party.secret, 10)  # credentials cached
    profile = cProfile.Profile()
    profile.enable()
    await connects(adapter.port, party.id, party.secret, n)
    profile.disable()
    await adapter.stop()
    await gateway.close()
    stats = pstats.Stats(profile).stats  # type: ignore[attr-defined]
    total = sum(v[2] for v in stats.values())
    print(f"profiled Python time per connect: {total / n * 1e6:.1f} us")
    for (file, line, name), (_, calls, own, _, _) in sorted(
        stats.items(), key=lambda kv: kv[1][2], reverse=True
    )[:20]:
        where = f"{os.path.basename(file)}:{line}({name})"
        print(f"{own / n * 1e6:7.2f} us  {calls / n:5.2f}x  {where}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=3000)
    ap.add_argument("--no-gc", action="store_true")
    ap.add_argument("--tune-gc", action="store_true")
    args = ap.parse_args()
    if args.no_gc:
        gc.disable()
    import uvloop

    uvloop.run(main(args.n, args.tune_gc))
