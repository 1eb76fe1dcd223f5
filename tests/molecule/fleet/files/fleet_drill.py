#!/usr/bin/env python3
"""Drills of the Molecule scenario "fleet", run on the controller against HAProxy on loopback.

    fleet_drill.py load  --out F --stop-file S ...  # bounded load (streamed + whole answers) until S exists
    fleet_drill.py slots ...                        # 7 long requests over 3 x 2 slots: 2 per backend, 1 queued
    fleet_drill.py drain ...                        # drain the backend of a running stream: the wait waits for it
    fleet_drill.py kill9 --victim NAME ...          # kill -9 of one backend's service under load
    fleet_drill.py hang  --victim NAME ...          # SIGSTOP of one backend's service under load, then SIGCONT

Each drill prints one JSON object (facts, timings and a one-line ``summary``) as its last line; verify.yml asserts
on the facts. The load is bounded in count and time and only ever talks to 127.0.0.0/8: a URL elsewhere is
refused. The balancer's view (`show stat`) is read through `podman exec <lb> innova-lb-ctl stat`; backend
services are signalled through `podman exec <backend> systemctl kill`. Only the standard library.
"""

from __future__ import annotations

import argparse
import http.client
import ipaddress
import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

UNIT = "innovaplus-backend.service"
CHAT = "/innova/api/smollm/chat"
GENERATE = "/innova/api/smollm/generate"
LOOPBACK = ipaddress.ip_network("127.0.0.0/8")
# Hard bounds on any load this script makes, whatever the arguments say.
MAX_REQUESTS = 3000
MAX_SECONDS = 900


def loopback_target(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.scheme != "http" or ipaddress.ip_address(host) not in LOOPBACK:
        sys.exit(f"fleet_drill: refusing {url!r}: the load only goes to http://127.0.0.0/8")
    return host, parts.port or 80


# --- one request ------------------------------------------------------------------------------------------


def request(
    host: str, port: int, kind: str, max_tokens: int, timeout: float, prompt: str | None = None
) -> dict[str, Any]:
    """One request through the balancer; what happened, with wall-clock start and end."""
    record: dict[str, Any] = {"kind": kind, "start": time.time(), "ok": False, "status": None, "server": None}
    if kind == "long":
        path, body = (
            GENERATE,
            {
                "prompt": prompt or "Count from 1 to 1000: 1, 2, 3, 4,",
                "max_tokens": max_tokens,
                "temperature": 0,
                "stream": True,
            },
        )
    else:
        path = CHAT
        body = {
            "messages": [{"role": "user", "content": prompt or "Say hi in three words."}],
            "max_tokens": max_tokens,
            "temperature": 0,
            "stream": kind == "stream",
        }
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        record["status"] = resp.status
        record["server"] = resp.getheader("X-Innova-Backend")
        if kind == "whole":
            data = resp.read()
            try:
                answer = json.loads(data) if data else {}
            except ValueError:
                answer = {}
            record["ok"] = resp.status == 200 and isinstance(answer.get("response"), str)
            record["model"] = (answer.get("model_info") or {}).get("model_name")
            if not record["ok"]:
                record["error"] = f"HTTP {resp.status}: " + data[:160].decode("utf-8", "replace")
        else:
            events: list[str] = []
            event = None
            while True:
                line = resp.readline()
                if not line:
                    break
                text = line.decode("utf-8", "replace").rstrip("\r\n")
                if text.startswith("event:"):
                    event = text[6:].strip()
                elif text.startswith("data:") and event in ("done", "error"):
                    events.append(event)
                    if event == "error":
                        record["error"] = text[5:].strip()[:200]
                elif text == "":
                    event = None
            record["events"] = events
            # A stream is whole only when it ends with its final "done" event (and no "error").
            record["ok"] = resp.status == 200 and events == ["done"]
            if resp.status != 200 and "error" not in record:
                record["error"] = f"HTTP {resp.status}"
            elif not record["ok"] and "error" not in record:
                record["error"] = "stream ended without its done event"
    except (OSError, http.client.HTTPException, ValueError) as exc:
        record["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        conn.close()
        record["end"] = time.time()
    return record


class Load:
    """Workers sending requests one after the other (streamed and whole answers alternating) until stopped."""

    def __init__(
        self,
        url: str,
        concurrency: int,
        max_tokens: int,
        max_requests: int,
        max_seconds: float,
        timeout: float = 180.0,
        stream_max_tokens: int | None = None,
    ) -> None:
        self.host, self.port = loopback_target(url)
        self.concurrency = concurrency
        self.max_tokens = max_tokens
        # Streams may be longer than whole answers, so that a drain has running requests to wait for.
        self.stream_max_tokens = stream_max_tokens or max_tokens
        self.stopped_by = "stop"
        self.max_requests = min(max_requests, MAX_REQUESTS)
        self.deadline = time.time() + min(max_seconds, MAX_SECONDS)
        self.timeout = timeout
        self.records: list[dict[str, Any]] = []
        self.stop = threading.Event()
        self._lock = threading.Lock()
        self._count = 0
        self._threads = [threading.Thread(target=self._work, args=(i,), daemon=True) for i in range(concurrency)]

    def _work(self, index: int) -> None:
        n = index
        while not self.stop.is_set():
            with self._lock:
                if time.time() >= self.deadline:
                    self.stopped_by = "max-seconds"
                    return
                if self._count >= self.max_requests:
                    self.stopped_by = "max-requests"
                    return
                self._count += 1
            kind = "stream" if n % 2 == 0 else "whole"
            n += 1
            tokens = self.stream_max_tokens if kind == "stream" else self.max_tokens
            record = request(self.host, self.port, kind, tokens, self.timeout)
            with self._lock:
                self.records.append(record)
            time.sleep(0.1)

    def start(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def finish(self) -> list[dict[str, Any]]:
        self.stop.set()
        for thread in self._threads:
            thread.join(self.timeout + 5)
        with self._lock:
            return sorted(self.records, key=lambda r: r["start"])


def tally(records: list[dict[str, Any]]) -> dict[str, Any]:
    failed = [r for r in records if not r["ok"]]
    by_server: dict[str, int] = {}
    for r in records:
        if r["ok"]:
            by_server[str(r["server"])] = by_server.get(str(r["server"]), 0) + 1
    return {
        "requests": len(records),
        "streamed": sum(r["kind"] == "stream" for r in records),
        "whole": sum(r["kind"] == "whole" for r in records),
        "failed": len(failed),
        "streams_without_done": sum(r["kind"] == "stream" and r["status"] == 200 and not r["ok"] for r in records),
        "ok_by_server": by_server,
        "failures": [{k: r.get(k) for k in ("kind", "status", "server", "error", "start")} for r in failed][:20],
    }


# --- the balancer and the backends ----------------------------------------------------------------------------


def lb_stat(lb: str, backend: str) -> dict[str, dict[str, Any]]:
    out = subprocess.run(
        ["podman", "exec", lb, "innova-lb-ctl", "stat", "--backend", backend],
        capture_output=True,
        text=True,
        check=True,
        timeout=20,
    ).stdout
    return {row["server"]: row for row in map(json.loads, out.splitlines())}


def signal_service(container: str, signal: str) -> None:
    subprocess.run(
        ["podman", "exec", container, "systemctl", "kill", "--kill-who=main", "-s", signal, UNIT],
        capture_output=True,
        text=True,
        check=True,
        timeout=20,
    )


#: How late wait_status may see a status change: one 0.1 s poll plus a stats call, with room to spare.
UP_SEEN_LATE_S = 0.5


def wait_status(lb: str, backend: str, server: str, prefix: str, timeout: float) -> float | None:
    """Time (epoch) when the balancer first shows the server with a status starting with ``prefix``."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if str(lb_stat(lb, backend)[server]["status"]).startswith(prefix):
            return time.time()
        time.sleep(0.1)
    return None


# --- drills ---------------------------------------------------------------------------------------------------


def drill_load(args: argparse.Namespace) -> dict[str, Any]:
    stop_file = Path(args.stop_file)
    load = Load(
        args.url,
        args.concurrency,
        args.max_tokens,
        args.max_requests,
        args.max_seconds,
        stream_max_tokens=args.stream_max_tokens,
    ).start()
    while not stop_file.exists() and time.time() < load.deadline and load.stopped_by == "stop":
        time.sleep(0.2)
    # A worker names the bound it hit; otherwise the stop file ended it, or the time bound ended this loop.
    ended = "stop file" if stop_file.exists() else "max-seconds"
    stopped_by = ended if load.stopped_by == "stop" else load.stopped_by
    records = load.finish()
    facts = tally(records)
    # The load must have lasted until the stop file (the end of the upgrade), not run out of its bounds before.
    facts["stopped_by"] = stopped_by
    facts["first_start"] = records[0]["start"] if records else None
    facts["last_end"] = max((r["end"] for r in records), default=None)
    Path(args.out).write_text(json.dumps(records))
    facts["summary"] = (
        f"load during the rolling upgrade: {facts['requests']} requests ({facts['streamed']} streamed, "
        f"{facts['whole']} whole), {facts['failed']} failed, {facts['streams_without_done']} streams without "
        f"their done event; answered by {facts['ok_by_server']}; stopped by the {stopped_by}"
    )
    return facts


def drill_slots(args: argparse.Namespace) -> dict[str, Any]:
    host, port = loopback_target(args.url)
    servers = args.servers.split(",")
    results: list[dict[str, Any]] = []
    threads = [
        threading.Thread(target=lambda: results.append(request(host, port, "long", args.max_tokens, 300)))
        for _ in range(args.requests)
    ]
    for thread in threads:
        thread.start()
    seen: dict[str, Any] | None = None
    last: dict[str, dict[str, Any]] = {}
    deadline = time.time() + 30
    while time.time() < deadline:
        last = lb_stat(args.lb, args.backend)
        running = {s: last[s]["sessions"] for s in servers}
        queued = last["BACKEND"]["queued"]
        if sum(running.values()) == args.slots * len(servers) and queued == args.requests - args.slots * len(servers):
            seen = {"sessions": running, "queued": queued, "limits": {s: last[s]["limit"] for s in servers}}
            break
        time.sleep(0.05)
    for thread in threads:
        thread.join(330)
    ok = sum(r["ok"] for r in results)
    facts: dict[str, Any] = {
        "seen": seen,
        "last_stat": last if seen is None else None,
        "ok": ok,
        "requests": len(results),
        "failures": tally(results)["failures"],
    }
    facts["summary"] = (
        f"slot-aware: {args.requests} long requests over {len(servers)} backends x {args.slots} slots -> "
        + (
            f"sessions {seen['sessions']}, {seen['queued']} waiting in HAProxy's queue"
            if seen
            else "never saw a full fleet"
        )
        + f"; {ok}/{len(results)} streams ended with done"
    )
    return facts


def drill_drain(args: argparse.Namespace) -> dict[str, Any]:
    """A long stream runs on one backend; drain that backend: wait-empty must wait for the stream, which must end."""
    host, port = loopback_target(args.url)
    result: dict[str, Any] = {}
    stream = threading.Thread(target=lambda: result.update(request(host, port, "long", args.max_tokens, 300)))
    stream.start()
    server = None
    deadline = time.time() + 30
    while server is None and time.time() < deadline:
        busy = [name for name, row in lb_stat(args.lb, args.backend).items() if name != "BACKEND" and row["sessions"]]
        server = busy[0] if busy else None
        time.sleep(0.05)
    if server is None:
        stream.join(300)
        return {"server": None, "summary": "drain: the long stream never showed on a backend", **result}
    target = f"{args.backend}/{server}"
    subprocess.run(
        ["podman", "exec", args.lb, "innova-lb-ctl", "state", target, "drain"],
        check=True,
        capture_output=True,
        timeout=20,
    )
    waited = subprocess.run(
        ["podman", "exec", args.lb, "innova-lb-ctl", "wait-empty", target, "--timeout", "240"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    stream.join(300)
    subprocess.run(
        ["podman", "exec", args.lb, "innova-lb-ctl", "state", target, "ready"],
        check=True,
        capture_output=True,
        timeout=20,
    )
    seen = json.loads(waited.stdout.strip().splitlines()[-1]) if waited.stdout.strip() else {}
    facts = {
        "server": server,
        "wait_rc": waited.returncode,
        "waited_s": seen.get("waited_s"),
        "sessions_after_wait": seen.get("sessions"),
        "stream_ok": result.get("ok"),
        "stream_server": result.get("server"),
        "stream_end": result.get("end"),
    }
    facts["summary"] = (
        f"drain: {server} drained while a {args.max_tokens}-token stream ran on it; wait-empty waited "
        f"{facts['waited_s']} s until 0 sessions; the stream ended with done: {facts['stream_ok']}"
    )
    return facts


def fault_drill(args: argparse.Namespace, signal: str) -> dict[str, Any]:
    servers = lb_stat(args.lb, args.backend)
    before_total = servers[args.victim]["total"]
    load = Load(args.url, args.concurrency, args.max_tokens, MAX_REQUESTS, args.max_seconds).start()
    time.sleep(args.warmup)
    t_fault = time.time()
    signal_service(args.victim_container, signal)
    t_down = wait_status(args.lb, args.backend, args.victim, "DOWN", 30)
    stat_down = lb_stat(args.lb, args.backend)[args.victim]["total"] if t_down else None
    facts: dict[str, Any] = {
        "fault_at": t_fault,
        "down_at": t_down,
        "detect_s": round(t_down - t_fault, 2) if t_down else None,
    }
    # Keep the load on the rest of the fleet for a while after the balancer took the victim out.
    time.sleep(args.after_down)
    if signal == "STOP":
        stat_before_cont = lb_stat(args.lb, args.backend)[args.victim]["total"]
        facts["victim_new_sessions_while_down"] = stat_before_cont - stat_down if t_down else None
        signal_service(args.victim_container, "CONT")
        t_resume = time.time()
    else:
        t_resume = t_fault
    t_up = wait_status(args.lb, args.backend, args.victim, "UP", args.rejoin_timeout)
    facts["rejoin_s"] = round(t_up - t_resume, 2) if t_up else None
    # Back in traffic: the victim takes requests again.
    rejoined = False
    if t_up:
        deadline = time.time() + 15
        while time.time() < deadline and not rejoined:
            rejoined = lb_stat(args.lb, args.backend)[args.victim]["total"] > (stat_down or before_total)
            time.sleep(0.2)
    facts["victim_serves_again"] = rejoined
    records = load.finish()
    facts.update(tally(records))
    early = [r for r in records if not r["ok"] and (t_down is None or r["start"] < t_down)]
    late = [r for r in records if t_down is not None and r["start"] >= t_down]
    facts["failed_in_flight"] = len(early)
    facts["started_after_down"] = len(late)
    facts["failed_after_down"] = sum(not r["ok"] for r in late)
    # Requests started while the balancer had the victim DOWN: before it was resumed (a stopped service is DOWN until
    # then), and before it was seen UP again, less one poll and a stat call (UP is seen up to that late, and leastconn
    # sends the next request to the idle server that just came back).
    window_end = min(t_up - UP_SEEN_LATE_S if t_up else float("inf"), t_resume if signal == "STOP" else float("inf"))
    down_window = [r for r in late if r["start"] < window_end]
    facts["after_down_served_by_victim"] = sum(r["server"] == args.victim for r in down_window if r["ok"])
    name = "kill -9" if signal == "KILL" else "SIGSTOP"
    facts["summary"] = (
        f"{name} of {args.victim}'s service under load: balancer saw it DOWN after {facts['detect_s']} s; "
        f"{facts['failed_in_flight']} in-flight request(s) failed, {facts['failed_after_down']} of "
        f"{facts['started_after_down']} started after that failed; "
        + (f"{facts['victim_new_sessions_while_down']} new session(s) on it while down; " if signal == "STOP" else "")
        + f"back UP {facts['rejoin_s']} s after {'SIGCONT' if signal == 'STOP' else 'the kill'}, "
        + f"serving again: {rejoined}"
    )
    return facts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("drill", choices=["load", "slots", "drain", "kill9", "hang"])
    parser.add_argument("--url", required=True, help="the balancer, http://127.0.0.1:PORT")
    parser.add_argument("--lb", default="innova-molecule-fleet-lb", help="container of the balancer")
    parser.add_argument("--backend", default="smollm", help="HAProxy backend section")
    parser.add_argument("--servers", default="innova-molecule-fleet-1,innova-molecule-fleet-2,innova-molecule-fleet-3")
    parser.add_argument("--slots", type=int, default=2)
    parser.add_argument("--requests", type=int, default=7)
    parser.add_argument("--victim", default="innova-molecule-fleet-2")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--stream-max-tokens", type=int, default=None, help="max_tokens of streams (load)")
    parser.add_argument("--max-requests", type=int, default=600)
    parser.add_argument("--max-seconds", type=float, default=300)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--after-down", type=float, default=4.0)
    parser.add_argument("--rejoin-timeout", type=float, default=120.0)
    parser.add_argument("--out")
    parser.add_argument("--stop-file")
    args = parser.parse_args()
    args.victim_container = args.victim
    loopback_target(args.url)
    if args.drill == "load":
        facts = drill_load(args)
    elif args.drill == "slots":
        facts = drill_slots(args)
    elif args.drill == "drain":
        facts = drill_drain(args)
    else:
        facts = fault_drill(args, "KILL" if args.drill == "kill9" else "STOP")
    print(json.dumps(facts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
