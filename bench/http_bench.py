"""HTTP POST of a SenML pack: Conduit beside the bare aiohttp ceiling, in the same run.

Conduit authenticates the client secret, validates the SenML, and publishes to the in-process bus
with one subscriber attached (an SSE stream read by ``curl -N``). The anchor is
``../shared/bench/http_server.py``: aiohttp + orjson, no auth, no validation, no routing.

    .venv/bin/python bench/http_bench.py [--rounds 3] [--duration 10] [--loop uvloop|asyncio]
                                         [--tls]

``--tls``: HTTPS on both, with one server certificate made by Conduit's PKI tool (the anchor is
the same handler behind aiohttp's TLS; wrk negotiates TLS 1.3 with each, keep-alive, so the
handshakes are few and the figure is the cost of encrypted requests).

Needs ``wrk`` (Debian package). Prints one line per run and the medians with the ratios.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import (
    SHARED_BENCH,
    ConduitProcess,
    cpu_seconds,
    free_port,
    median,
    wait_port,
    wrk_post_senml,
)

import certs


def wrk(url: str, duration: int, server_pid: int, auth: str | None = None) -> dict[str, float]:
    """One wrk run: requests/s, p99, and the server's CPU time (user + system) per request."""
    cpu_before = cpu_seconds(server_pid)
    s = wrk_post_senml(url, duration, auth=auth)
    cpu = cpu_seconds(server_pid) - cpu_before
    return {
        "rps": s["requests"] / (s["duration_us"] / 1e6),
        "p99_ms": s["lat_p99_us"] / 1000,
        "cpu_us": cpu / s["requests"] * 1e6,
    }


# The anchor's handler behind aiohttp's TLS (argv: shared bench dir, port, cert, key, uvloop).
ANCHOR_TLS = """
import asyncio, ssl, sys
sys.path.insert(0, sys.argv[1])
import http_server
from aiohttp import web
if sys.argv[5] == "1":
    import uvloop
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
context.load_cert_chain(sys.argv[3], sys.argv[4])
app = web.Application()
app.router.add_post("/senml", http_server.ingest)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[2]), access_log=None, print=None,
            ssl_context=context)
"""


def anchor(duration: int, loop: str, tls: Path | None = None) -> dict[str, float]:
    port = free_port()
    if tls is None:
        args = [sys.executable, str(SHARED_BENCH / "http_server.py"), "--port", str(port)]
        if loop == "uvloop":
            args.append("--uvloop")
    else:
        uv = "1" if loop == "uvloop" else "0"
        args = [sys.executable, "-c", ANCHOR_TLS, str(SHARED_BENCH), str(port),
                str(tls / "server.pem"), str(tls / "server.key"), uv]  # fmt: skip
    proc = subprocess.Popen(args)
    try:
        wait_port(port)
        scheme = "https" if tls is not None else "http"
        return wrk(f"{scheme}://127.0.0.1:{port}/senml", duration, proc.pid)
    finally:
        proc.terminate()
        proc.wait()


def conduit(duration: int, loop: str, subscriber: str, tls: Path | None = None) -> dict[str, float]:
    port = free_port()
    extra = ["--http-port", str(port), "--loop", loop]
    if tls is not None:
        extra = ["--https-port", str(port), "--no-http-enabled", "--wss-port", "0",
                 "--mqtts-port", "0", "--mqtt-wss-port", "0", "--loop", loop,
                 "--tls-cert", str(tls / "server.pem"),
                 "--tls-key", str(tls / "server.key")]  # fmt: skip
    with ConduitProcess(extra=extra) as c:
        base = f"{'https' if tls is not None else 'http'}://127.0.0.1:{port}/{c.topic}"
        sub = None
        if subscriber == "sse":
            sub = subprocess.Popen(
                [
                    "curl",
                    "-sNk",
                    "-H",
                    "Accept: text/event-stream",
                    "-H",
                    f"Authorization: Client {c.secret}",
                    base + "/%23",
                ],
                stdout=subprocess.DEVNULL,
            )
        try:
            result = wrk(base + "/room1", duration, c.pid, f"Client {c.secret}")
        finally:
            if sub is not None:
                sub.terminate()
                sub.wait()
        return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=int, default=10)
    ap.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop")
    ap.add_argument(
        "--subscriber",
        choices=["sse", "none"],
        default="sse",
        help="sse: an SSE stream on the channel, read by curl -N (default); none: no subscriber",
    )
    ap.add_argument("--tls", action="store_true", help="HTTPS on both (see the docstring)")
    args = ap.parse_args()
    if not shutil.which("wrk"):
        sys.exit("wrk is needed: apt-get install wrk")
    tls = None
    if args.tls:
        tls = Path(tempfile.mkdtemp(prefix="http-bench-pki-"))
        ca = certs.create_ca()
        certs.write(tls / "pki", "ca", ca)
        certs.write(tls / "pki", "server", certs.issue_server(ca, ["127.0.0.1"]))
        tls = tls / "pki"
    runs: dict[str, list[dict[str, float]]] = {"anchor": [], "conduit": []}
    for i in range(args.rounds):
        for name in ("anchor", "conduit"):
            if name == "anchor":
                r = anchor(args.duration, args.loop, tls)
            else:
                r = conduit(args.duration, args.loop, args.subscriber, tls)
            runs[name].append(r)
            print(
                f"round {i + 1} {name:8} {r['rps']:9.0f} req/s  p99 {r['p99_ms']:6.2f} ms"
                f"  server CPU {r['cpu_us']:6.1f} us/req",
                flush=True,
            )
    a_rps = median([r["rps"] for r in runs["anchor"]])
    c_rps = median([r["rps"] for r in runs["conduit"]])
    a_p99 = median([r["p99_ms"] for r in runs["anchor"]])
    c_p99 = median([r["p99_ms"] for r in runs["conduit"]])
    a_cpu = median([r["cpu_us"] for r in runs["anchor"]])
    c_cpu = median([r["cpu_us"] for r in runs["conduit"]])
    # Each round runs the anchor, then Conduit: the ratio within a round, less exposed to the
    # machine's drift over the whole run, is reported beside the ratio of the medians.
    paired = [c["rps"] / a["rps"] for a, c in zip(runs["anchor"], runs["conduit"], strict=True)]
    print(
        json.dumps(
            {
                "loop": args.loop,
                "tls": args.tls,
                "subscriber": args.subscriber,
                "rounds": args.rounds,
                "duration_s": args.duration,
                "anchor_rps": round(a_rps),
                "conduit_rps": round(c_rps),
                "rps_ratio": round(c_rps / a_rps, 3),
                "rps_ratio_paired_median": round(median(paired), 3),
                "anchor_p99_ms": a_p99,
                "conduit_p99_ms": c_p99,
                "p99_ratio": round(c_p99 / a_p99, 3),
                "anchor_cpu_us_per_req": round(a_cpu, 1),
                "conduit_cpu_us_per_req": round(c_cpu, 1),
                "cpu_ratio": round(a_cpu / c_cpu, 3),
                "targets": "rps_ratio >= 0.8, p99_ratio <= 2.0",
            }
        )
    )


if __name__ == "__main__":
    main()
