"""What the benchmarks share: free ports, a provisioned Conduit process, waiting for a port."""

from __future__ import annotations

import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ADMIN_KEY = "bench-" + "0" * 32  # at least 32 characters, as conduit serve requires
SHARED_BENCH = Path(os.environ.get("SHARED_BENCH", ROOT.parent / "shared" / "bench"))
BENCH_BIN = Path(os.environ.get("BENCH_BIN", "/tmp/bench-bin"))


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {port}")


def instructions(out: Path) -> int:
    """The total instruction count of a callgrind output file, which is then removed."""
    for line in out.read_text().splitlines():
        if line.startswith(("summary:", "totals:")):
            out.unlink()
            return int(line.split()[1])
    raise RuntimeError(f"no total in {out}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wrk_post_senml(
    url: str, duration: int, threads: int = 2, auth: str | None = None
) -> dict[str, float]:
    """``wrk -c50`` POSTing the SenML pack of post_senml.lua to ``url``: its JSON summary
    (requests, duration_us, lat_p99_us, ...). Raises when a request failed."""
    env = {**os.environ, **({"BENCH_AUTH": auth} if auth else {})}
    out = subprocess.run(
        [
            "wrk",
            f"-t{threads}",
            "-c50",
            f"-d{duration}s",
            "--latency",
            "-s",
            str(SHARED_BENCH / "post_senml.lua"),
            url,
        ],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    m = re.search(r"JSONSUMMARY (\{.*\})", out)
    if not m:
        raise RuntimeError(out)
    summary: dict[str, float] = json.loads(m.group(1))
    if summary["errors_status"] or summary["errors_connect"]:
        raise RuntimeError(f"wrk saw errors: {summary}")
    return summary


def median(values: list[float]) -> float:
    return statistics.median(values) if values else 0.0


@dataclass
class ConduitProcess:
    """`conduit serve` in a temporary data directory, with one domain, channel and client."""

    extra: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    wrapper: list[str] = field(default_factory=list)  # e.g. valgrind and its options
    provision: bool = True  # False: another node of the same store provisioned it
    proc: subprocess.Popen[str] | None = None
    ports: dict[str, int] = field(default_factory=dict)
    secret: str = ""
    client_id: str = ""
    topic: str = "m/bench/c/data"

    def __enter__(self) -> ConduitProcess:
        self._tmp = tempfile.TemporaryDirectory(prefix="conduit-bench-")
        env = {
            **os.environ,
            "CONDUIT_DATA_DIR": self._tmp.name,
            "CONDUIT_LOG_LEVEL": "warning",
            "CONDUIT_ADMIN_KEY": ADMIN_KEY,
            **self.env,
        }
        self.proc = subprocess.Popen(
            [
                *self.wrapper,
                sys.executable,
                "-m",
                "conduit.cli",
                "serve",
                "--host",
                "127.0.0.1",
                "--api-port",
                "0",
                # every listener on a free port unless the caller names one (last flag wins)
                "--http-port",
                "0",
                "--ws-port",
                "0",
                "--coap-port",
                "0",
                "--mqtt-port",
                "0",
                "--mqtt-ws-port",
                "0",
                *self.extra,
            ],
            env=env,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        m = re.match(r"conduit ready: (.*)", line)
        if not m:
            raise RuntimeError(f"conduit did not start: {line!r}")
        self.ports = {k: int(v) for k, v in (p.split("=") for p in m.group(1).split())}
        if not self.provision:
            return self
        self._api("POST", "/domains", {"name": "bench"})
        client = self._api("POST", "/domains/bench/clients", {"name": "bench"})
        self.secret, self.client_id = client["secret"], client["id"]
        self._api("POST", "/domains/bench/channels", {"name": "data"})
        self._api("POST", "/domains/bench/connections", {"client": "bench", "channel": "data"})
        return self

    def _api(self, method: str, path: str, body: dict[str, object]) -> dict[str, str]:
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.ports['api']}{path}",
            method=method,
            data=json.dumps(body).encode(),
            headers={"Authorization": f"Bearer {ADMIN_KEY}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req) as r:
            return json.loads(r.read())  # type: ignore[no-any-return]

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self._tmp.cleanup()
