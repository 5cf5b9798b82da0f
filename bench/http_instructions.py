"""Instructions per HTTP POST, counted by callgrind: Conduit beside the bare aiohttp ceiling.

Wall-clock rates on a shared 2-CPU machine move by a third from one run to the next; an
instruction count does not (same binary, same inputs: same count). Each server runs under
``valgrind --tool=callgrind`` twice, answering N1 and then N2 sequential keep-alive POSTs of the
wrk pack (authenticated, as post_senml.lua sends it); (count(N2) - count(N1)) / (N2 - N1) is the
cost of one request, start-up and shutdown cancelled out. Conduit runs with only its HTTP
adapter, uvloop, and an SSE subscriber reading the channel, as in http_bench.py.

    .venv/bin/python bench/http_instructions.py [--n1 200] [--n2 1200]

Needs valgrind. Takes about three minutes. Counts user-space instructions only: the kernel's
share of each request (socket reads and writes) is not in them.
"""

from __future__ import annotations

import argparse
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

from common import SHARED_BENCH, ConduitProcess, free_port, wait_port

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


def instructions(out: Path) -> int:
    """The total instruction count of a callgrind output file, which is then removed."""
    for line in out.read_text().splitlines():
        if line.startswith(("summary:", "totals:")):
            out.unlink()
            return int(line.split()[1])
    raise RuntimeError(f"no total in {out}")


def callgrind(out: Path) -> list[str]:
    return ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}"]


def anchor(n: int, tmp: Path) -> int:
    port, out = free_port(), tmp / f"anchor.{n}"
    args = [sys.executable, str(SHARED_BENCH / "http_server.py"), "--port", str(port), "--uvloop"]
    proc = subprocess.Popen([*callgrind(out), *args], stderr=subprocess.DEVNULL)
    try:
        wait_port(port, timeout=120)
        post(port, "/senml", None, n)
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(120)
    return instructions(out)


def conduit(n: int, tmp: Path) -> int:
    port, out = free_port(), tmp / f"conduit.{n}"
    flags = ["--http-port", str(port), "--loop", "uvloop", "--no-ws-enabled"]
    flags += ["--no-mqtt-enabled", "--no-coap-enabled"]
    c = ConduitProcess(extra=flags, wrapper=callgrind(out))
    with c:
        auth = f"Client {c.secret}"
        reader = socket.create_connection(("127.0.0.1", port))
        reader.sendall(
            f"GET /{c.topic}/%23 HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n"
            f"Authorization: {auth}\r\n\r\n".encode()
        )
        threading.Thread(target=_drain, args=(reader,), daemon=True).start()
        time.sleep(0.5)
        post(port, f"/{c.topic}/room1", auth, 20)  # fills the caches: steady state
        post(port, f"/{c.topic}/room1", auth, n)
        assert c.proc is not None
        c.proc.send_signal(signal.SIGTERM)
        c.proc.wait(120)
        reader.close()
    return instructions(out)


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
    args = ap.parse_args()
    if not shutil.which("valgrind"):
        sys.exit("valgrind is needed: apt-get install valgrind")
    per_request = {}
    with tempfile.TemporaryDirectory(prefix="conduit-callgrind-") as tmp:
        for name, run in (("anchor", anchor), ("conduit", conduit)):
            low, high = run(args.n1, Path(tmp)), run(args.n2, Path(tmp))
            per_request[name] = round((high - low) / (args.n2 - args.n1))
            print(f"{name:8} {per_request[name]:8d} instructions per request", flush=True)
    print(
        json.dumps(
            {
                **{f"{k}_instructions_per_request": v for k, v in per_request.items()},
                "ratio": round(per_request["anchor"] / per_request["conduit"], 3),
                "cpus": os.cpu_count(),
            }
        )
    )


if __name__ == "__main__":
    main()
