"""What held connections cost ``innova-smollm serve``: memory and descriptors per idle connection and per connection
holding part of a request head, and health's latency meanwhile (the README's figures for the open-file limit).

    PYTHONPATH=service .venv/bin/python scripts/connection_costs.py [--count 5000]

Runs the service with the echo provider (no model needed) on loopback, from the repository root.
"""

from __future__ import annotations

import argparse
import socket
import sys
import time
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.servers import API, run_service, wait_until


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def fds(pid: int) -> int:
    return sum(1 for _ in Path(f"/proc/{pid}/fd").iterdir())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=5000, help="connections of each kind")
    args = parser.parse_args()
    health = f"{API}/health"
    with run_service({"PROVIDER": "echo", "SMOLLM_HEAD_TIMEOUT_S": "120"}) as service:
        pid, port = service.process.pid, int(service.url.rsplit(":", 1)[1])
        wait_until(lambda: requests.get(service.url + health, timeout=5).status_code == 200, timeout=60)
        time.sleep(0.5)
        rss0, fds0 = rss_mb(pid), fds(pid)
        held = [socket.create_connection(("127.0.0.1", port)) for _ in range(args.count)]
        time.sleep(1)
        rss1, fds1 = rss_mb(pid), fds(pid)
        partial = b"GET " + health.encode() + b" HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 8000
        for _ in range(args.count):
            sock = socket.create_connection(("127.0.0.1", port))
            sock.sendall(partial)
            held.append(sock)
        time.sleep(1)
        rss2, fds2 = rss_mb(pid), fds(pid)
        started = time.monotonic()
        status = requests.get(service.url + health, timeout=5).status_code
        latency_ms = (time.monotonic() - started) * 1000
        for sock in held:
            sock.close()
        time.sleep(2)
        print(f"baseline: {rss0:.1f} MB RSS, {fds0} descriptors")
        print(f"{args.count} idle: +{rss1 - rss0:.1f} MB ({(rss1 - rss0) * 1024 / args.count:.1f} KB each), {fds1} fds")
        print(
            f"{args.count} holding 8 KB of a head: +{rss2 - rss1:.1f} MB "
            f"({(rss2 - rss1) * 1024 / args.count:.1f} KB each), {fds2} descriptors"
        )
        print(f"health with {2 * args.count} held: {status} in {latency_ms:.1f} ms")
        print(f"after closing them: {rss_mb(pid):.1f} MB RSS, {fds(pid)} descriptors")
    return 0


if __name__ == "__main__":
    sys.exit(main())
