#!/usr/bin/env python3
"""Four concurrent requests to innovaplus-backend.service, its memory sampled meanwhile; prints one JSON report.

Runs inside the test container (standard library only). Memory comes from the unit's main process
(/proc/<pid>/status: VmRSS, RssAnon, RssFile, VmSwap, VmHWM) and from its cgroup, v2 (memory.max, memory.peak,
memory.current, memory.events, memory.swap.*) or v1 (memory.limit_in_bytes, memory.max_usage_in_bytes,
memory.usage_in_bytes, memory.oom_control, memory.stat). verify.yml asserts on the report.

Usage: memory_drill.py BASE_URL MAX_TOKENS END_TOKENS(comma-separated) UNIT
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

BASE, MAX_TOKENS, END_TOKENS, UNIT = sys.argv[1], int(sys.argv[2]), sys.argv[3].split(","), sys.argv[4]
STATUS_KEYS = ("VmRSS", "RssAnon", "RssFile", "VmSwap", "VmHWM")
METRIC_KINDS = {
    "VmRSS": "rss",
    "RssAnon": "rss_anon",
    "RssFile": "rss_file",
    "VmSwap": "swap",
    "AnonHugePages": "anon_huge_pages",
}
# About 150 tokens: four of them fill one 512-token prefill step, which touches llama.cpp's whole compute buffer.
SYSTEM = (
    "You are the assistant of a regional cooperative that sells farm produce, tools and seeds. Answer in plain "
    "English, in short paragraphs, and never invent prices, dates or stock levels: when you do not know, say so "
    "and suggest who to ask. Members ask about orders, deliveries, invoices, the opening hours of the depots, "
    "the rules of the loyalty programme and the workshops the cooperative runs each season. Be polite and brief, "
    "use the member's words, and end each answer with one question that helps the member go on. If a question is "
    "about health, law or money beyond the cooperative's own services, say that you cannot advise and point to a "
    "professional. Keep every answer under two hundred words unless the member asks for more detail."
)
QUESTIONS = (
    "Tell the story of a lighthouse keeper who finds a message in a bottle.",
    "Explain how a bicycle stays upright, step by step.",
    "Write a letter to a friend about a trip to the mountains.",
    "Describe a busy market in a port city at dawn.",
)


def unit_properties() -> dict[str, str]:
    out = subprocess.run(
        ["systemctl", "show", UNIT, "-p", "MainPID,NRestarts,ActiveState,MemoryMax,ControlGroup"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def proc_status(pid: str) -> dict[str, int]:
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in STATUS_KEYS:
            values[name] = int(rest.split()[0]) * 1024
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("AnonHugePages:"):  # the weights in transparent huge pages (innova_backend_huge_pages)
            values["AnonHugePages"] = int(line.split()[1]) * 1024
    return values


def thp_mode() -> str:
    text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    return text[text.index("[") + 1 : text.index("]")]


def read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return None if text == "max" else int(text)


def keyed(path: Path) -> dict[str, int]:
    try:
        return {k: int(v) for k, v in (line.split() for line in path.read_text().splitlines())}
    except OSError:
        return {}


class CGroup:
    def __init__(self, control_group: str) -> None:
        v2 = Path("/sys/fs/cgroup") / control_group.lstrip("/")
        if (v2 / "memory.max").exists():
            self.version, self.dir = 2, v2
        else:
            self.version, self.dir = 1, Path("/sys/fs/cgroup/memory") / control_group.lstrip("/")
        if not self.dir.is_dir():
            raise SystemExit(f"no memory cgroup for {UNIT} at {v2} or {self.dir}: MemoryMax is not enforced here")

    def current(self) -> int | None:
        return read_int(self.dir / ("memory.current" if self.version == 2 else "memory.usage_in_bytes"))

    def report(self) -> dict[str, object]:
        d = self.dir
        if self.version == 2:
            events = keyed(d / "memory.events")
            return {
                "cgroup": 2,
                "limit": read_int(d / "memory.max"),
                "peak": read_int(d / "memory.peak"),
                "current": read_int(d / "memory.current"),
                "oom": events.get("oom", 0),
                "oom_kill": events.get("oom_kill", 0),
                "swap_current": read_int(d / "memory.swap.current") or 0,
                "swap_peak": read_int(d / "memory.swap.peak") or 0,
                "anon": keyed(d / "memory.stat").get("anon"),
            }
        stat = keyed(d / "memory.stat")
        oom = keyed(d / "memory.oom_control")
        return {
            "cgroup": 1,
            "limit": read_int(d / "memory.limit_in_bytes"),
            "peak": read_int(d / "memory.max_usage_in_bytes"),
            "current": read_int(d / "memory.usage_in_bytes"),
            "oom": oom.get("under_oom", 0),
            "oom_kill": oom.get("oom_kill", 0),
            "swap_current": stat.get("swap", 0),
            "swap_peak": max(
                0,
                (read_int(d / "memory.memsw.max_usage_in_bytes") or 0)
                - (read_int(d / "memory.max_usage_in_bytes") or 0),
            ),
            "anon": stat.get("rss"),
            "failcnt": read_int(d / "memory.failcnt"),
        }


def ask(index: int, results: list[dict[str, object]]) -> None:
    body = {
        "model": "production-shape",
        "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTIONS[index]}],
        "max_tokens": MAX_TOKENS,
        "temperature": 0.7,
        "logit_bias": dict.fromkeys(END_TOKENS, -100),
    }
    request = urllib.request.Request(
        f"{BASE}/v1/chat/completions", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    started = time.monotonic()
    try:
        with urllib.request.urlopen(request, timeout=900) as reply:
            usage = json.load(reply)["usage"]
        results.append(
            {
                "status": 200,
                "completion_tokens": usage["completion_tokens"],
                "prompt_tokens": usage["prompt_tokens"],
                "s": round(time.monotonic() - started, 1),
            }
        )
    except Exception as exc:  # reported, and verify.yml fails on it
        results.append({"status": getattr(exc, "code", -1), "error": str(exc)[:300]})


def scrape_memory() -> dict[str, float]:
    with urllib.request.urlopen(f"{BASE}/metrics", timeout=60) as reply:
        text = reply.read().decode()
    exported = {}
    for line in text.splitlines():
        if line.startswith("smollm_process_memory_bytes{"):
            labels, _, value = line.rpartition(" ")
            exported[labels.split('kind="')[1].split('"')[0]] = float(value)
    return exported


def main() -> int:
    before = unit_properties()
    pid = before["MainPID"]
    cgroup = CGroup(before["ControlGroup"])
    peaks = {"VmRSS": 0, "RssAnon": 0, "cgroup_current": 0}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            status = proc_status(pid)
            peaks["VmRSS"] = max(peaks["VmRSS"], status["VmRSS"])
            peaks["RssAnon"] = max(peaks["RssAnon"], status["RssAnon"])
            peaks["cgroup_current"] = max(peaks["cgroup_current"], cgroup.current() or 0)
            done.wait(0.25)

    sampler = threading.Thread(target=sample)
    sampler.start()
    results: list[dict[str, object]] = []
    started = time.monotonic()
    clients = [threading.Thread(target=ask, args=(i, results)) for i in range(4)]
    for client in clients:
        client.start()
    for client in clients:
        client.join()
    elapsed = time.monotonic() - started
    done.set()
    sampler.join()

    status_before = proc_status(pid)
    exported = scrape_memory()
    status_after = proc_status(pid)
    metrics_vs_proc = {
        kind: {"metrics": exported.get(kind), "proc_before": status_before[key], "proc_after": status_after[key]}
        for key, kind in METRIC_KINDS.items()
    }
    after = unit_properties()
    journal = subprocess.run(
        ["journalctl", "--no-pager", "-o", "cat", "-u", UNIT], capture_output=True, text=True, check=False
    ).stdout
    report = {
        "unit_before": before,
        "unit_after": after,
        "requests": results,
        "requests_s": round(elapsed, 1),
        "proc_after": status_after,
        "thp_mode": thp_mode(),
        "sampled_peaks": peaks,
        "cgroup_memory": cgroup.report(),
        "metrics_vs_proc": metrics_vs_proc,
        "journal_oom_lines": [
            line for line in journal.splitlines() if "oom" in line.lower() or "out of memory" in line.lower()
        ],
    }
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
