"""Instructions per MQTT QoS 0 PUBLISH, delivery included, counted by callgrind: Conduit's MQTT
adapter beside Mosquitto.

Wall-clock rates on a shared 2-CPU machine move by a third from one run to the next; an
instruction count does not (same binary, same inputs: same count). Each server runs under
``valgrind --tool=callgrind`` twice, passing N1 and then N2 QoS 0 PUBLISHes from one MQTT 3.1.1
client to one subscriber of the topic; (count(N2) - count(N1)) / (N2 - N1) is the cost of one
publish and its delivery, start-up and shutdown cancelled out. Conduit runs ``conduit serve``
with only its MQTT adapter (TCP; the management API idles), uvloop, and the SenML pack of
``mqttbench`` as payload (content type application/octet-stream: not validated, as in
mqtt_bench.py).

    .venv/bin/python bench/mqtt_instructions.py [--n1 200] [--n2 1200] [--batch 1]

``--batch B`` writes B PUBLISHes at once and waits until the subscriber has them all before
the next B: 1 (the default) is lockstep, one packet per read and one delivery per write; 100
shows the cost when a read holds many publishes and a write many deliveries, as under load.

Run it from the root of the tree to measure: the server is ``python -m conduit.cli`` started in
the current directory, so a ``git worktree`` of another revision is measured by running this
file from that worktree's root (the client side does not import Conduit).

Needs valgrind. Takes about two minutes. Counts user-space instructions only: the kernel's share
(socket reads and writes) is not in them.
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
import time
from pathlib import Path

from common import SHARED_BENCH, ConduitProcess, free_port, instructions, wait_port

PAYLOAD = (
    b'[{"bn":"urn:dev:mac:0024befffe804ff1:","n":"temperature",'
    b'"u":"Cel","v":23.5,"t":1718000000.125}]'
)
TOPIC = "t"  # under the Conduit channel's topic, see conduit()


def _utf8(value: str) -> bytes:
    data = value.encode()
    return len(data).to_bytes(2, "big") + data


def _packet(first: int, body: bytes) -> bytes:
    """Fixed header (remaining length below 16384 here) and body."""
    n = len(body)
    length = bytes((n,)) if n < 0x80 else bytes((n & 0x7F | 0x80, n >> 7))
    return bytes((first,)) + length + body


def connect_packet(client_id: str, user: str | None, password: str | None) -> bytes:
    flags = 0x02 | (0x80 if user is not None else 0) | (0x40 if password is not None else 0)
    body = _utf8("MQTT") + bytes((4, flags, 0, 0)) + _utf8(client_id)
    if user is not None:
        body += _utf8(user)
    if password is not None:
        body += _utf8(password)
    return _packet(0x10, body)


def publish_packet(topic: str) -> bytes:
    return _packet(0x30, _utf8(topic) + PAYLOAD)


def subscribe_packet(topic: str) -> bytes:
    return _packet(0x82, b"\x00\x01" + _utf8(topic) + b"\x00")


class Client:
    """A blocking MQTT 3.1.1 client that knows just enough: CONNECT, SUBSCRIBE, PUBLISH."""

    def __init__(self, port: int, client_id: str, user: str | None, password: str | None):
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""
        self.sock.sendall(connect_packet(client_id, user, password))
        connack = self.read(4)
        if connack != b"\x20\x02\x00\x00":
            raise RuntimeError(f"CONNECT refused: {connack!r}")

    def read(self, n: int) -> bytes:
        while len(self.buf) < n:
            data = self.sock.recv(1 << 16)
            if not data:
                raise RuntimeError("the server closed the connection")
            self.buf += data
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def close(self) -> None:
        self.sock.close()


def run(port: int, user: str | None, password: str | None, topic: str, n: int, batch: int) -> None:
    """Subscribe, warm up (caches filled), then ``n`` publishes, each delivered."""
    sub = Client(port, "bench-sub", user, password)
    sub.sock.sendall(subscribe_packet(topic))
    suback = sub.read(5)
    if suback[0] != 0x90 or suback[4] != 0:
        raise RuntimeError(f"SUBSCRIBE refused: {suback!r}")
    pub = Client(port, "bench-pub", user, password)
    packet = publish_packet(topic)
    size = len(packet)  # the delivery is the same packet (QoS 0, retain 0, level 4)

    def send(count: int) -> None:
        done = 0
        while done < count:
            k = min(batch, count - done)
            pub.sock.sendall(packet * k)
            if sub.read(size * k) != packet * k:
                raise RuntimeError("the subscriber got something else than the publishes")
            done += k

    send(20)  # fills the rights cache and the topic cache: steady state
    send(n)
    pub.close()
    sub.close()


def callgrind(out: Path) -> list[str]:
    return ["valgrind", "-q", "--tool=callgrind", f"--callgrind-out-file={out}"]


def mosquitto(n: int, tmp: Path, batch: int) -> int:
    port, out = free_port(), tmp / f"mosquitto.{n}"
    conf = (SHARED_BENCH / "mosquitto.conf").read_text()
    conf_path = tmp / "mosquitto.conf"
    # As root, Mosquitto drops to the user "mosquitto", which cannot write callgrind's output.
    user = "user root\n" if os.geteuid() == 0 else ""
    conf_path.write_text(user + conf.replace("listener 18840", f"listener {port}"))
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    proc = subprocess.Popen(
        [*callgrind(out), binary, "-c", str(conf_path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_port(port, timeout=120)
        run(port, None, None, "m/bench/c/data/t", n, batch)
        time.sleep(0.5)
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(300)
    return instructions(out)


def conduit(n: int, tmp: Path, batch: int) -> int:
    out = tmp / f"conduit.{n}"
    flags = ["--loop", "uvloop", "--no-http-enabled", "--no-ws-enabled", "--no-coap-enabled"]
    flags += ["--no-mqtt-ws-enabled"]
    c = ConduitProcess(extra=flags, wrapper=callgrind(out))
    with c:
        run(c.ports["mqtt"], c.client_id, c.secret, f"{c.topic}/{TOPIC}", n, batch)
        time.sleep(0.5)  # the sessions end (the clients closed) before the count stops
        assert c.proc is not None
        c.proc.send_signal(signal.SIGTERM)
        c.proc.wait(300)
    return instructions(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n1", type=int, default=200)
    ap.add_argument("--n2", type=int, default=1200)
    ap.add_argument("--batch", type=int, default=1, help="PUBLISHes per write (default 1)")
    ap.add_argument("--only", choices=["mosquitto", "conduit"])
    args = ap.parse_args()
    if not shutil.which("valgrind"):
        sys.exit("valgrind is needed: apt-get install valgrind")
    per_publish: dict[str, int] = {}
    runs = (("mosquitto", mosquitto), ("conduit", conduit))
    with tempfile.TemporaryDirectory(prefix="conduit-callgrind-") as tmp:
        for name, measure in runs:
            if args.only and name != args.only:
                continue
            low, high = (measure(n, Path(tmp), args.batch) for n in (args.n1, args.n2))
            per_publish[name] = round((high - low) / (args.n2 - args.n1))
            print(f"{name:9} {per_publish[name]:8d} instructions per publish", flush=True)
    result: dict[str, object] = {f"{k}_instructions_per_publish": v for k, v in per_publish.items()}
    if len(per_publish) == 2:
        result["ratio"] = round(per_publish["mosquitto"] / per_publish["conduit"], 3)
    result.update({"batch": args.batch, "tree": os.getcwd(), "cpus": os.cpu_count()})
    print(json.dumps(result))


if __name__ == "__main__":
    main()
