#!/usr/bin/python3
"""Fault drills on the real innovaplus-backend.service, run inside the Molecule container by verify.yml.

    drill.py kill9   --port N   # kill -9 during a streaming generation: systemd restarts it, health recovers
    drill.py sigterm --port N   # systemctl stop during a generation: refused at once, the answer finishes, clean exit
    drill.py model   --port N   # model file removed / truncated, then restarts: 503 "error" naming the path; restore

Each drill measures and prints one JSON object (facts, timings and a one-line ``summary``) as its last line;
verify.yml asserts on the facts and prints the summary. Only the standard library: it runs on the system python3.
Every drill leaves the service as it found it (active, health 200), even when it fails halfway.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

UNIT = "innovaplus-backend.service"
HEALTHCHECK = "/opt/innovaplus/venv/bin/innova-smollm-healthcheck"
MODEL_LINK = "/opt/innovaplus/models/current.gguf"
PREFIX = "/innova/api/smollm"
# A generation long enough to be interrupted: greedy, 900 tokens, streamed.
LONG = {"prompt": "Count from 1 to 1000: 1, 2, 3, 4,", "max_tokens": 900, "temperature": 0, "stream": True}


# --- systemd and journal ------------------------------------------------------------------------------------


def show(*props: str) -> dict[str, str]:
    out = subprocess.run(
        ["systemctl", "show", UNIT, "--property", ",".join(props)], capture_output=True, text=True, check=True
    ).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def systemctl(*args: str) -> None:
    subprocess.run(["systemctl", *args, UNIT], check=True, capture_output=True, text=True)


def reset_start_limit() -> None:
    # The unit allows 5 starts in 120 s (StartLimitBurst): the drills restart it often on purpose, and one drill's
    # restarts must not push the next one into start-limit-hit. reset-failed clears that counter only.
    systemctl("reset-failed")


def journal(since: float) -> list[dict[str, Any]]:
    """The unit's journal entries (systemd's own included) logged at or after ``since`` (epoch seconds)."""
    out = subprocess.run(
        ["journalctl", "-u", UNIT, "--since", f"@{int(since) - 1}", "-o", "json", "--no-pager"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    entries = [json.loads(line) for line in out.splitlines() if line.strip()]
    return [e for e in entries if int(e.get("__REALTIME_TIMESTAMP", 0)) >= since * 1e6]


def message(entry: dict[str, Any]) -> str:
    text = entry.get("MESSAGE", "")
    return text if isinstance(text, str) else bytes(text).decode("utf-8", "replace")


def error_lines(entries: list[dict[str, Any]]) -> list[str]:
    """Entries at syslog priority err or worse, service JSON lines at level error/critical, and tracebacks."""
    found = []
    for entry in entries:
        text = message(entry)
        level = ""
        if text.startswith("{"):
            try:
                level = str(json.loads(text).get("level", ""))
            except ValueError:
                level = ""
        if int(entry.get("PRIORITY", 6)) <= 3 or level in ("error", "critical") or "Traceback" in text:
            found.append(text[:300])
    return found


# --- HTTP -----------------------------------------------------------------------------------------------------


def probe(port: int, timeout: float = 3.0) -> tuple[str, dict[str, Any]]:
    """GET /health on a new connection: ("200" | "503" | "refused" | "timeout" | "error: ...", body)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", PREFIX + "/health")
        resp = conn.getresponse()
        raw = resp.read()
        try:
            body = json.loads(raw)
        except ValueError:
            body = {"raw": raw[:200].decode("utf-8", "replace")}
        return str(resp.status), body
    except ConnectionRefusedError:
        return "refused", {}
    except TimeoutError:
        return "timeout", {}
    except OSError as exc:
        return f"error: {exc.__class__.__name__}", {}
    finally:
        conn.close()


def wait_health(port: int, done: Any, bound_s: float, interval: float = 0.25) -> tuple[float | None, str, dict]:
    """Poll health until ``done(status, body)``; (seconds it took or None, last status, last body)."""
    start = time.monotonic()
    status, body = "none", {}
    while time.monotonic() - start < bound_s:
        status, body = probe(port)
        if done(status, body):
            return round(time.monotonic() - start, 2), status, body
        time.sleep(interval)
    return None, status, body


def healthcheck_cli(port: int, *extra: str) -> dict[str, Any]:
    """The cron health check, as cron runs it (one line, Nagios exit code)."""
    start = time.monotonic()
    proc = subprocess.run(
        [HEALTHCHECK, "--url", f"http://127.0.0.1:{port}", *extra], capture_output=True, text=True, check=False
    )
    return {
        "rc": proc.returncode,
        "line": (proc.stdout or proc.stderr).strip()[:400],
        "took_s": round(time.monotonic() - start, 2),
    }


class Stream(threading.Thread):
    """One streamed /generate request in the background: counts token events and notes how the stream ended."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.tokens = 0
        self.done = False
        self.finish_reason: str | None = None
        self.error_event: str | None = None
        self.ended = "running"
        self.started_at = time.monotonic()
        self.ended_at: float | None = None
        self.status: int | None = None

    def run(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=300)
        event = None
        try:
            conn.request("POST", PREFIX + "/generate", json.dumps(LONG), {"Content-Type": "application/json"})
            resp = conn.getresponse()
            self.status = resp.status
            for raw in resp:
                line = raw.decode("utf-8", "replace").rstrip("\r\n")
                if line.startswith("event:"):
                    event = line[6:].strip()
                    if event == "token":
                        self.tokens += 1
                elif line.startswith("data:") and event == "done":
                    self.done = True
                    self.finish_reason = json.loads(line[5:]).get("finish_reason")
                elif line.startswith("data:") and event == "error":
                    self.error_event = line[5:].strip()[:200]
            self.ended = (
                "done event" if self.done else "error event" if self.error_event else "cut (EOF, no done event)"
            )
        except (OSError, http.client.HTTPException) as exc:
            self.ended = f"cut ({exc.__class__.__name__})"
        finally:
            self.ended_at = time.monotonic()
            conn.close()

    def wait_tokens(self, count: int, bound_s: float) -> None:
        start = time.monotonic()
        while self.tokens < count and self.is_alive() and time.monotonic() - start < bound_s:
            time.sleep(0.05)
        if self.tokens < count:
            raise SystemExit(f"the generation did not start: {self.tokens} tokens, stream {self.ended}")


def ready(status: str, body: dict) -> bool:
    return status == "200"


def settled(status: str, body: dict) -> bool:
    """The service has decided: serving, or up and saying why not (anything but refused/loading)."""
    return status == "200" or (status == "503" and body.get("status") in ("error", "disabled"))


def restore_service(port: int) -> None:
    if show("ActiveState")["ActiveState"] != "active":
        reset_start_limit()
        systemctl("start")
    wait_health(port, ready, 180)


# --- the drills ---------------------------------------------------------------------------------------------


def drill_kill9(port: int) -> dict[str, Any]:
    reset_start_limit()
    before = show("MainPID", "NRestarts", "RestartUSec")
    stream = Stream(port)
    stream.start()
    stream.wait_tokens(10, 180)
    tokens_at_kill = stream.tokens
    wall, t0 = time.time(), time.monotonic()
    os.kill(int(before["MainPID"]), signal.SIGKILL)
    time.sleep(0.3)
    outage = healthcheck_cli(port, "--max-time", "2", "--connect-timeout", "1")
    stream.join(60)
    listening_s, _, _ = wait_health(port, lambda s, b: s not in ("refused", "timeout"), 180, 0.1)
    listening_at = round(time.monotonic() - t0, 2) if listening_s is not None else None
    _, status, body = wait_health(port, ready, 180, 0.1)
    recovered_at = round(time.monotonic() - t0, 2) if status == "200" else None
    recovery = healthcheck_cli(port, "--deep", "--deadline", "30")
    after = show("MainPID", "NRestarts", "ActiveState", "SubState")
    systemd_lines = [
        message(e) for e in journal(wall) if "SYSLOG_IDENTIFIER" in e and e["SYSLOG_IDENTIFIER"] == "systemd"
    ]
    facts = {
        "pid_before": before["MainPID"],
        "pid_after": after["MainPID"],
        "restarts_before": int(before["NRestarts"]),
        "restarts_after": int(after["NRestarts"]),
        "active_after": after["ActiveState"],
        "restart_sec": before["RestartUSec"],
        "tokens_at_kill": tokens_at_kill,
        "stream_ended": stream.ended,
        "stream_tokens": stream.tokens,
        "cli_outage": outage,
        "cli_recovery": recovery,
        "listening_after_s": listening_at,
        "health_200_after_s": recovered_at,
        "health_final": [status, body],
        "systemd_lines": systemd_lines[:8],
    }
    facts["summary"] = (
        f"kill -9 of PID {facts['pid_before']} after {tokens_at_kill} streamed tokens: the stream was "
        f"{stream.ended}; health CLI during the outage exit {outage['rc']} ({outage['line'][:120]}); systemd restarted "
        f"it (NRestarts {facts['restarts_before']}->{facts['restarts_after']}, PID {facts['pid_before']}->"
        f"{facts['pid_after']}, RestartSec {before['RestartUSec']}); port answering {listening_at} s and health 200 "
        f"{recovered_at} s after the kill; health CLI --deep after recovery exit {recovery['rc']} "
        f"({recovery['line'][:120]})"
    )
    return facts


def drill_sigterm(port: int, drain_s: float) -> dict[str, Any]:
    reset_start_limit()
    pid = show("MainPID")["MainPID"]
    stream = Stream(port)
    stream.start()
    stream.wait_tokens(10, 180)
    tokens_at_stop = stream.tokens
    wall, t0 = time.time(), time.monotonic()
    subprocess.run(["systemctl", "stop", "--no-block", UNIT], check=True)
    probes: list[tuple[float, str]] = []
    while stream.is_alive() and time.monotonic() - t0 < drain_s + 30:
        status, _ = probe(port, timeout=2)
        probes.append((round(time.monotonic() - t0, 2), status))
        time.sleep(0.2)
    stream.join(5)
    stream_end_s = round(stream.ended_at - t0, 2) if stream.ended_at else None
    while show("ActiveState")["ActiveState"] not in ("inactive", "failed") and time.monotonic() - t0 < drain_s + 60:
        time.sleep(0.2)
    exit_s = round(time.monotonic() - t0, 2)
    final = show("ActiveState", "Result", "ExecMainCode", "ExecMainStatus", "NRestarts")
    entries = journal(wall)
    errors = error_lines(entries)
    # Proof that the journal window holds the stop (so "no error line" is not vacuous).
    markers = [m for m in map(message, entries) if "Finished server process" in m or "Deactivated successfully" in m]
    err_priority = (
        subprocess.run(
            ["journalctl", "-u", UNIT, "-p", "err", "--since", f"@{int(wall)}", "-o", "cat", "--no-pager"],
            capture_output=True,
            text=True,
            check=True,
        )
        .stdout.strip()
        .splitlines()
    )
    first_not_ok = next((t for t, s in probes if s != "200"), None)
    # systemctl stop --no-block returns before systemd sends SIGTERM, so the very first probes may still get 200.
    ok_after_not_ready = [t for t, s in probes if s == "200" and first_not_ok is not None and t > first_not_ok]
    restart_start = time.monotonic()
    reset_start_limit()
    systemctl("start")
    back_s, back_status, _ = wait_health(port, ready, 180)
    facts = {
        "pid": pid,
        "tokens_at_stop": tokens_at_stop,
        "stream_ended": stream.ended,
        "stream_done": stream.done,
        "finish_reason": stream.finish_reason,
        "stream_tokens": stream.tokens,
        "stream_end_s": stream_end_s,
        "drain_deadline_s": drain_s,
        "exit_s": exit_s,
        "probes": dict(Counter(s for _, s in probes)),
        "first_not_ready_s": first_not_ok,
        "ok_after_not_ready": ok_after_not_ready[:5],
        "unit": final,
        "journal_errors": errors,
        "journal_err_priority": err_priority,
        "journal_lines": len(entries),
        "journal_stop_markers": len(markers),
        "restart_to_200_s": back_s if back_status == "200" else None,
        "restart_took_s": round(time.monotonic() - restart_start, 2),
    }
    facts["summary"] = (
        f"systemctl stop after {tokens_at_stop} streamed tokens: new connections {dict(Counter(s for _, s in probes))} "
        f"(first not-ready probe {first_not_ok} s after the stop); the in-flight stream ended with {stream.ended} "
        f"(finish_reason {stream.finish_reason}, {stream.tokens} tokens) {stream_end_s} s after the stop "
        f"(deadline {drain_s:g} s); unit inactive after {exit_s} s, Result={final['Result']} "
        f"(the main process ended by its own re-raised SIGTERM, code {final['ExecMainCode']}/status "
        f"{final['ExecMainStatus']}, which systemd counts as clean); error lines in the journal for the stop: "
        f"{len(errors) + len(err_priority)} of {len(entries)}; start again -> health 200 in {back_s} s"
    )
    return facts


def drill_model(port: int) -> dict[str, Any]:
    target = Path(MODEL_LINK).resolve()
    aside = Path("/root/faults-drill-model.aside")
    stat = target.stat()
    pid = show("MainPID")["MainPID"]
    phases: dict[str, Any] = {}
    try:
        # 1. Removed under the running service: it keeps serving from the file it has open.
        target.rename(aside)
        status, _ = probe(port)
        phases["removed_running"] = {"health": status, "same_pid": show("MainPID")["MainPID"] == pid}
        phases["removed_restart"] = restart_and_settle(port)
        # 2. Truncated (keeps the GGUF magic, loses the tensors).
        with aside.open("rb") as src:
            target.write_bytes(src.read(16 * 1024 * 1024))
        os.chown(target, stat.st_uid, stat.st_gid)
        target.chmod(stat.st_mode & 0o7777)
        phases["truncated_restart"] = restart_and_settle(port)
    finally:
        if aside.exists():
            aside.replace(target)
    # 3. Put back: restart recovers.
    phases["restored_restart"] = restart_and_settle(port)
    phases["restored_restart"]["cli"] = healthcheck_cli(port)
    facts = {"model": str(target), "phases": phases}
    running, parts = phases["removed_running"], []
    for label, key in (("removed", "removed_restart"), ("truncated to 16 MiB", "truncated_restart")):
        ph = phases[key]
        parts.append(
            f"{label}, restart -> {ph['active']}, {ph['status']} {ph['health'].get('status')} "
            f"({str(ph['health'].get('detail'))[:90]}) after {ph['settled_s']} s, CLI exit {ph['cli']['rc']}"
        )
    back = phases["restored_restart"]
    facts["summary"] = (
        f"model file removed under the running service: health still {running['health']}, same PID "
        f"{running['same_pid']}; {'; '.join(parts)}; file put back, restart -> {back['status']} after "
        f"{back['settled_s']} s, CLI exit {back['cli']['rc']}"
    )
    return facts


def restart_and_settle(port: int) -> dict[str, Any]:
    reset_start_limit()
    systemctl("restart")
    took, status, body = wait_health(port, settled, 180)
    state = show("ActiveState", "SubState", "MainPID", "NRestarts")
    return {
        "status": status,
        "health": body,
        "settled_s": took,
        "active": state["ActiveState"],
        "sub": state["SubState"],
        "pid": state["MainPID"],
        "restarts": state["NRestarts"],
        "cli": healthcheck_cli(port, "--max-time", "3"),
    }


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("drill", choices=["kill9", "sigterm", "model"])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--drain", type=float, default=30.0, help="SMOLLM_DRAIN_TIMEOUT_S of the service")
    args = parser.parse_args()
    try:
        if args.drill == "kill9":
            facts = drill_kill9(args.port)
        elif args.drill == "sigterm":
            facts = drill_sigterm(args.port, args.drain)
        else:
            facts = drill_model(args.port)
    finally:
        restore_service(args.port)
    print(json.dumps(facts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
