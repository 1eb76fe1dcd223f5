#!/usr/bin/env python3
"""Soak the service: thousands of short requests, with its memory, file descriptors and threads sampled over time.

By default it starts ``innova-smollm serve`` itself (loopback, a free port, the embedded model, SMOLLM_MAX_TOKENS=8)
and sends a mix of short requests: native and OpenAI chats and completions, streamed and not, bad requests, health,
info and metrics, each on a new connection. Every ``--sample-every`` requests it reads the service process's VmRSS
and RssAnon (``/proc/PID/status``), its open descriptors (``/proc/PID/fd``) and its threads. After the warm-up it fits
a line through the samples and prints the slope in KB per 100 requests, and how far descriptors and threads moved.

    .venv/bin/python scripts/soak.py                      # 3000 requests, about 10-20 minutes on 2 cores
    .venv/bin/python scripts/soak.py --requests 500 --warmup 100
    .venv/bin/python scripts/soak.py --url http://127.0.0.1:8000 --pid 1234   # a service already running

Exit status: 0 when every request got an expected answer and, after warm-up, descriptors and threads stayed flat and
RssAnon grew by less than ``--max-anon-growth-kb``; 1 otherwise. tests/test_soak.py runs a short version of it.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = REPO_ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
API = "/innova/api/smollm"

#: RssAnon may grow this much after warm-up in the default run (allocator arenas and caches settling, not a leak).
DEFAULT_MAX_ANON_GROWTH_KB = 16 * 1024


@dataclass(frozen=True)
class Call:
    """One kind of request in the mix and the statuses it may get (a 503 with Retry-After is always accepted)."""

    name: str
    method: str
    path: str
    body: Mapping[str, Any] | None = None
    stream: bool = False
    ok: frozenset[int] = frozenset({200})


def _chat(text: str, **extra: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": text}], "max_tokens": 4, "temperature": 0, **extra}


MIX: tuple[Call, ...] = (
    Call("chat", "POST", f"{API}/chat", _chat("Say hi.")),
    Call("health", "GET", f"{API}/health"),
    Call("chat-stream", "POST", f"{API}/chat", _chat("Name a colour.", stream=True), stream=True),
    Call("generate", "POST", f"{API}/generate", {"prompt": "1, 2, 3,", "max_tokens": 4, "seed": 7}),
    Call("bad-request", "POST", f"{API}/chat", {"messages": []}, ok=frozenset({400})),
    Call("v1-chat", "POST", "/v1/chat/completions", _chat("Bonjour !")),
    Call("info", "GET", f"{API}/info"),
    Call("chatlaya-stream", "POST", "/innova/api/chatlaya/message", _chat("Hello"), stream=True),
    Call("v1-completion-stream", "POST", "/v1/completions", {"prompt": "Once", "max_tokens": 3, "stream": True}),
    Call("over-cap", "POST", f"{API}/generate", {"prompt": "x", "max_tokens": 100_000}, ok=frozenset({400})),
    Call("metrics", "GET", "/metrics"),
    Call("not-found", "GET", "/nowhere", ok=frozenset({404})),
)


@dataclass(frozen=True)
class Sample:
    done: int  # requests completed when the sample was taken
    elapsed_s: float
    rss_kb: int
    anon_kb: int
    fds: int
    threads: int


def sample(pid: int, done: int, started: float) -> Sample:
    fields: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in {"VmRSS", "RssAnon", "Threads"}:
            fields[key] = int(value.split()[0])
    return Sample(
        done=done,
        elapsed_s=time.monotonic() - started,
        rss_kb=fields["VmRSS"],
        anon_kb=fields["RssAnon"],
        fds=sum(1 for _ in Path(f"/proc/{pid}/fd").iterdir()),
        threads=fields["Threads"],
    )


def slope(points: Sequence[tuple[float, float]]) -> float:
    """Least-squares slope of y over x."""
    if len(points) < 2:
        return 0.0
    mean_x = sum(x for x, _ in points) / len(points)
    mean_y = sum(y for _, y in points) / len(points)
    var = sum((x - mean_x) ** 2 for x, _ in points)
    return sum((x - mean_x) * (y - mean_y) for x, y in points) / var if var else 0.0


@dataclass
class SoakResult:
    total: int
    warmup: int
    concurrency: int
    samples: list[Sample] = field(default_factory=list)
    statuses: collections.Counter[str] = field(default_factory=collections.Counter)
    errors: list[str] = field(default_factory=list)
    duration_s: float = 0.0
    slowest_s: float = 0.0

    @property
    def measured(self) -> list[Sample]:
        """The samples after warm-up."""
        return [s for s in self.samples if s.done >= self.warmup]

    def slope_per_100(self, attribute: str) -> float:
        return 100 * slope([(s.done, getattr(s, attribute)) for s in self.measured])

    def growth(self, attribute: str) -> int:
        measured = self.measured
        return int(getattr(measured[-1], attribute) - getattr(measured[0], attribute)) if measured else 0

    def spread(self, attribute: str) -> int:
        values = [getattr(s, attribute) for s in self.measured]
        return max(values) - min(values) if values else 0

    def summary(self) -> str:
        first, last = self.samples[0], self.samples[-1]
        measured = self.measured
        lines = [
            f"soak: {self.total} requests, concurrency {self.concurrency}, {self.duration_s:.0f}s "
            f"({self.total / max(self.duration_s, 1e-9):.1f} req/s), slowest {self.slowest_s:.2f}s; "
            f"{len(self.samples)} samples, warm-up {self.warmup} requests",
            "statuses: " + ", ".join(f"{key} x{n}" for key, n in sorted(self.statuses.items())),
            f"errors: {len(self.errors)}" + (f" (first: {self.errors[0]})" if self.errors else ""),
            "",
            "| metric | start | after warm-up | end | slope after warm-up (per 100 requests) |",
            "|---|---|---|---|---|",
        ]
        for attribute, label, unit in (
            ("rss_kb", "VmRSS", "KB"),
            ("anon_kb", "RssAnon", "KB"),
            ("fds", "open fds", ""),
            ("threads", "threads", ""),
        ):
            warm = getattr(measured[0], attribute) if measured else "-"
            lines.append(
                f"| {label} | {getattr(first, attribute)} {unit} | {warm} {unit} | {getattr(last, attribute)} {unit} "
                f"| {self.slope_per_100(attribute):+.1f} {unit} |".replace("  ", " ")
            )
        return "\n".join(lines)


def _one(base_url: str, call: Call, timeout_s: float) -> str | None:
    """Send one request on a new connection and read the whole answer; an error message, or None when fine."""
    with requests.request(
        call.method, base_url + call.path, json=call.body, stream=call.stream, timeout=timeout_s
    ) as reply:
        body = reply.content  # reads a stream to its end
        status = reply.status_code
        if status in call.ok:
            if call.stream and status == 200 and (b"event: error" in body or b'data: {"error"' in body):
                return f"{call.name}: the stream ended with an error: {body[-300:]!r}"
            return None
        if status == 503 and reply.headers.get("Retry-After"):
            return None
        return f"{call.name}: {status} {body[:300]!r}"


def soak(
    base_url: str,
    pid: int,
    *,
    total: int,
    concurrency: int = 2,
    warmup: int = 0,
    sample_every: int = 25,
    timeout_s: float = 120.0,
    mix: Sequence[Call] = MIX,
    progress: bool = False,
) -> SoakResult:
    """Send ``total`` requests from ``concurrency`` threads; sample the process every ``sample_every`` answers."""
    result = SoakResult(total=total, warmup=warmup, concurrency=concurrency)
    lock = threading.Lock()
    next_index = 0
    done = 0
    started = time.monotonic()
    result.samples.append(sample(pid, 0, started))

    def worker() -> None:
        nonlocal next_index, done
        while True:
            with lock:
                if next_index >= total:
                    return
                index, next_index = next_index, next_index + 1
            call = mix[index % len(mix)]
            began = time.monotonic()
            try:
                error = _one(base_url, call, timeout_s)
                status = "ok" if error is None else "unexpected"
            except requests.RequestException as exc:
                error, status = f"{call.name}: {exc!r}", "exception"
            took = time.monotonic() - began
            with lock:
                done += 1
                result.statuses[f"{call.name} {status}"] += 1
                result.slowest_s = max(result.slowest_s, took)
                if error is not None:
                    result.errors.append(error)
                if done % sample_every == 0 or done == total:
                    result.samples.append(sample(pid, done, started))
                    if progress:
                        last = result.samples[-1]
                        print(
                            f"  {done:>6} requests  rss {last.rss_kb} KB  anon {last.anon_kb} KB  "
                            f"fds {last.fds}  threads {last.threads}",
                            flush=True,
                        )

    threads = [threading.Thread(target=worker, name=f"soak-{n}", daemon=True) for n in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    result.duration_s = time.monotonic() - started
    return result


def check(result: SoakResult, *, max_anon_growth_kb: int, fd_slack: int, thread_slack: int) -> list[str]:
    """What a soak must show; the list of what did not hold."""
    problems = [f"{len(result.errors)} requests failed, e.g. {result.errors[0]}"] if result.errors else []
    if len(result.measured) < 3:
        problems.append("too few samples after warm-up to judge: raise --requests or lower --warmup")
        return problems
    if result.growth("anon_kb") > max_anon_growth_kb:
        problems.append(f"RssAnon grew {result.growth('anon_kb')} KB after warm-up (bound {max_anon_growth_kb} KB)")
    if result.spread("fds") > fd_slack:
        problems.append(f"open fds moved by {result.spread('fds')} after warm-up (slack {fd_slack})")
    if result.spread("threads") > thread_slack:
        problems.append(f"threads moved by {result.spread('threads')} after warm-up (slack {thread_slack})")
    return problems


# --- running a service for the soak --------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def service(env: Mapping[str, str], model: Path = DEFAULT_MODEL) -> Iterator[tuple[str, int]]:
    """``innova-smollm serve`` on a free loopback port; yields (base URL, pid) once health says ok."""
    port = free_port()
    full_env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("SMOLLM_", "ENABLE_SMOLLM", "PROVIDER"))},
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "SMOLLM_MODEL_PATH": str(model),
        "SMOLLM_N_CTX": "1024",
        "SMOLLM_MAX_TOKENS": "8",
        "SMOLLM_LOG_LEVEL": "WARNING",
        **env,
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "innova_smollm", "serve"],
        env=full_env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=REPO_ROOT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the service exited with {process.returncode} before it was ready")
            with contextlib.suppress(requests.RequestException), requests.get(f"{url}{API}/health", timeout=5) as reply:
                if reply.status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError("the service was not ready within 120s")
            time.sleep(0.2)
        yield url, process.pid
    finally:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=3000, help="requests to send (default 3000)")
    parser.add_argument("--warmup", type=int, default=None, help="requests before measuring (default: a fifth)")
    parser.add_argument("--concurrency", type=int, default=2, help="client threads (default 2)")
    parser.add_argument("--sample-every", type=int, default=50, help="requests between samples (default 50)")
    parser.add_argument("--max-anon-growth-kb", type=int, default=DEFAULT_MAX_ANON_GROWTH_KB)
    parser.add_argument("--url", help="soak a service already running here (needs --pid)")
    parser.add_argument("--pid", type=int, help="the process id of the service at --url")
    args = parser.parse_args(argv)
    warmup = args.requests // 5 if args.warmup is None else args.warmup

    def run(url: str, pid: int) -> SoakResult:
        print(f"soaking {url} (pid {pid}) with {args.requests} requests...", flush=True)
        return soak(
            url,
            pid,
            total=args.requests,
            concurrency=args.concurrency,
            warmup=warmup,
            sample_every=args.sample_every,
            progress=True,
        )

    if args.url:
        if args.pid is None:
            parser.error("--url needs --pid")
        result = run(args.url.rstrip("/"), args.pid)
    else:
        with service({}) as (url, pid):
            result = run(url, pid)
    print()
    print(result.summary())
    problems = check(
        result,
        max_anon_growth_kb=args.max_anon_growth_kb,
        fd_slack=args.concurrency + 2,
        thread_slack=2,
    )
    for problem in problems:
        print(f"FAILED: {problem}")
    if not problems:
        print("OK: every request answered; fds and threads flat; RssAnon growth within bounds after warm-up")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
