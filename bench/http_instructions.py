"""Instructions per HTTP POST, counted by callgrind: Conduit beside the bare aiohttp ceiling.

Wall-clock rates on a shared 2-CPU machine move by a third from one run to the next; an
instruction count does not (same binary, same inputs: same count). Each server runs under
``valgrind --tool=callgrind`` twice, answering N1 and then N2 sequential keep-alive POSTs of the
wrk pack (authenticated, as post_senml.lua sends it); (count(N2) - count(N1)) / (N2 - N1) is the
cost of one request, start-up and shutdown cancelled out. Conduit runs with only its HTTP
adapter, uvloop, and an SSE subscriber reading the channel, as in http_bench.py.

    .venv/bin/python bench/http_instructions.py [--n1 200] [--n2 1200]
    .venv/bin/python bench/http_instructions.py --wrk [--subscriber sse|none]
    .venv/bin/python bench/http_instructions.py --auth token   # Conduit only, both credentials

``--auth token`` counts Conduit alone twice: publishing with the client secret
(``Authorization: Client``) and with a broker token (``Authorization: Bearer``); the ratio is
token / secret.

``--wrk`` drives each server with ``wrk -t1 -c50`` for 10 s and then 40 s instead (the difference
divided by the difference in requests): the server is saturated, so requests are handled in
batches per loop turn as in http_bench.py, and SSE events go out many per write.

Needs valgrind (and wrk for ``--wrk``). Takes about three minutes. Counts user-space
instructions only: the kernel's share of each request (socket reads and writes) is not in them.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from common import (
    SHARED_BENCH,
    ConduitProcess,
    free_port,
    instructions,
    wait_port,
    wrk_post_senml,
)

BODY = (
    (SHARED_BENCH / "post_senml.lua").read_text().split("wrk.body = '")[1].split("'\n")[0].encode()
)


def post(port: int, path: str, auth: str | None, n: int) -> None:
    """``n`` POSTs, one after the other, on one keep-alive connection; each must get 202."""
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/senml+json\r\n"
        f"Content-Length: {len(BODY)}\r\n"
    )
    if auth:
        head += f"Authorization: {auth}\r\n"
    request = head.encode() + b"\r\n" + BODY
    with socket.create_connection(("127.0.0.1", port)) as s:
        for _ in range(n):
            s.sendall(request)
            answer = b""
            while b"\r\n\r\n" not in answer:
                answer += s.recv(4096)
            if not answer.startswith(b"HTTP/1.1 202"):
                raise RuntimeError(f"expected 202, got {answer[:80]!r}")


def drive(port: int, path: str, auth: str | None, amount: int, use_wrk: bool) -> int:
    """Send ``amount`` sequential requests, or run wrk for ``amount`` seconds; returns how
    many requests were answered."""
    if not use_wrk:
        post(port, path, auth, amount)
        return amount
    summary = wrk_post_senml(f"http://127.0.0.1:{port}{path}", amount, threads=1, auth=auth)
    return int(summary["requests"])


def callgrind(out: Path) -> list[str]:
    return ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}"]


def anchor(n: int, tmp: Path, use_wrk: bool, subscriber: str) -> tuple[int, int]:
    port, out = free_port(), tmp / f"anchor.{n}"
    args = [sys.executable, str(SHARED_BENCH / "http_server.py"), "--port", str(port), "--uvloop"]
    proc = subprocess.Popen([*callgrind(out), *args], stderr=subprocess.DEVNULL)
    try:
        wait_port(port, timeout=120)
        answered = drive(port, "/senml", None, n, use_wrk)
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(300)
    return answered, instructions(out)


def conduit(
    n: int, tmp: Path, use_wrk: bool, subscriber: str, token: bool = False
) -> tuple[int, int]:
    port, out = free_port(), tmp / f"conduit.{n}"
    flags = ["--http-port", str(port), "--loop", "uvloop", "--no-ws-enabled"]
    flags += ["--no-mqtt-enabled", "--no-coap-enabled"]
    c = ConduitProcess(extra=flags, wrapper=callgrind(out))
    with c:
        auth = f"Client {c.secret}"
        if token:
            auth = f"Bearer {_broker_token(port, auth)}"
        reader = None
        if subscriber == "sse":
            reader = socket.create_connection(("127.0.0.1", port))
            reader.sendall(
                f"GET /{c.topic}/%23 HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n"
                f"Authorization: {auth}\r\n\r\n".encode()
            )
            threading.Thread(target=_drain, args=(reader,), daemon=True).start()
            time.sleep(0.5)
        post(port, f"/{c.topic}/room1", auth, 20)  # fills the caches: steady state
        answered = drive(port, f"/{c.topic}/room1", auth, n, use_wrk)
        assert c.proc is not None
        c.proc.send_signal(signal.SIGTERM)
        c.proc.wait(300)
        if reader is not None:
            reader.close()
    return answered, instructions(out)


def _broker_token(port: int, auth: str) -> str:
    import urllib.request

    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/clients/tokens", method="POST", headers={"Authorization": auth}
    )
    with urllib.request.urlopen(req, timeout=120) as r:
        return str(json.loads(r.read())["token"])


def _drain(s: socket.socket) -> None:
    try:
        while s.recv(65536):
            pass
    except OSError:
        pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n1", type=int, default=200)
    ap.add_argument("--n2", type=int, default=1200)
    ap.add_argument("--wrk", action="store_true", help="drive with wrk for 10 s and 40 s")
    ap.add_argument("--subscriber", choices=["sse", "none"], default="sse")
    ap.add_argument("--auth", choices=["secret", "token"], default="secret",
                    help="token: Conduit with its secret, then with a broker token")  # fmt: skip
    args = ap.parse_args()
    low_n, high_n = (10, 40) if args.wrk else (args.n1, args.n2)
    if not shutil.which("valgrind"):
        sys.exit("valgrind is needed: apt-get install valgrind")
    per_request = {}
    runs: list[tuple[str, Any]] = [("anchor", anchor), ("conduit", conduit)]
    if args.auth == "token":
        runs = [("secret", conduit), ("token", functools.partial(conduit, token=True))]
    with tempfile.TemporaryDirectory(prefix="conduit-callgrind-") as tmp:
        for name, run in runs:
            (n1, low), (n2, high) = (
                run(amount, Path(tmp), args.wrk, args.subscriber) for amount in (low_n, high_n)
            )
            per_request[name] = round((high - low) / (n2 - n1))
            print(f"{name:8} {per_request[name]:8d} instructions per request", flush=True)
    print(
        json.dumps(
            {
                **{f"{k}_instructions_per_request": v for k, v in per_request.items()},
                "ratio": round(per_request["anchor"] / per_request["conduit"], 3)
                if args.auth == "secret"
                else round(per_request["secret"] / per_request["token"], 3),
                "driver": "wrk -t1 -c50" if args.wrk else "sequential",
                "subscriber": args.subscriber,
                "cpus": os.cpu_count(),
            }
        )
    )


if __name__ == "__main__":
    main()
