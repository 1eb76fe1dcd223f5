#!/usr/bin/env python3
"""Side-by-side benchmark: this service against llama-cpp-python and llama.cpp's llama-server, on one GGUF.

Runs in one go, on the same model file and thread count:
  (a) llama-cpp-python in process (a child process, so its memory is measured alone);
  (b) this service over HTTP, ``SMOLLM_PARALLEL`` sequences batched (b1: the same with SMOLLM_PARALLEL=1);
  (c) llama-cpp-python's own server (``pip install 'llama-cpp-python[server]'``);
  (d) llama.cpp's llama-server (``scripts/build_llama_server.sh``; skipped with a message when not found);
  (dh) the same with ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``, the huge pages (b) gets from its unit's environment.

Every HTTP server is driven through ``POST /v1/chat/completions`` with ``stream=true`` by the same client, on
loopback, with a bounded number of requests. Figures: decode tok/s and time to first token for one client, prefill
tok/s (a long prompt, one new token), aggregate tok/s and p50/p95 request latency at 1, 2, 4 and 8 concurrent
clients, resident memory after load, and streams cut short (no finish_reason, or an HTTP error).

Why the peers take turns: these machines are noisy (shared cores, neighbours that come and go), and a run that
measured each peer in its own block of minutes once put the same build at 0.80x and 1.14x of llama-cpp-python in
two runs ten minutes apart. So every peer is started first and stays up (idle servers cost no CPU), and then each
measurement goes round the peers, one after another, in an order that rotates every round. Each round gives one
sample per peer taken seconds apart, the ratios against (b) are computed round by round, and the report quotes
their medians with the range.

Output: a table on stdout; the run's summary in ``docs/results/bench-<stamp>.md``, dated, to commit (the current
table in docs/performance.md is taken from such a run); and in the git-ignored ``bench-results/`` the raw samples
(``bench-<stamp>.json``, what ``scripts/bench_pool.py`` pools), a copy of the summary as ``latest.md``, the servers'
logs and a PNG chart (``latest.png``, when matplotlib is installed). With ``--out DIR`` and no ``--results``,
everything goes to DIR, so a trial run leaves docs/ alone. It is a benchmark, not a test: nothing in the test suite
asserts a timing.

    .venv/bin/python scripts/bench.py --threads 2 --parallel 4
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import functools
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
from collections.abc import Callable, Generator, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, cast

# What the role's unit puts in GLIBC_TUNABLES (core/process_memory.py says why); the module imports nothing heavy.
from innova_smollm.core.process_memory import HUGE_PAGES_TUNABLE

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = REPO / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
#: Where a run's dated summary goes by default (committed), and where its raw samples, logs and chart go (ignored).
RESULTS_DIR = REPO / "docs" / "results"
RAW_DIR = REPO / "bench-results"
DEFAULT_LLAMA_SERVER_GLOBS = ("/work/peers/*/build-server/bin/llama-server", "/work/peers/**/bin/llama-server")
BASE = "b"

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
#: The service's own budget for memory after load, from issue 6: model file + KV cache + this much.
MEMORY_OVERHEAD_BUDGET_MB = 150


@dataclass
class StreamResult:
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
    latencies_s: list[float]
    cut_short: int


@dataclass
class PeerFigures:
    """Every sample taken of one peer; the report reduces them to medians."""

    key: str
    name: str
    available: bool = True
    note: str = ""
    rss_mb: float = float("nan")
    #: How many windows of KV cache the peer holds: its SMOLLM_PARALLEL with one stream per sequence, else 1.
    kv_caches: int = 1
    single: list[StreamResult] = field(default_factory=list)
    prefill_tok_s: list[float] = field(default_factory=list)
    levels: dict[int, list[LevelResult]] = field(default_factory=dict)
    #: One-client streams while busy processes hold every core.
    contended: list[StreamResult] = field(default_factory=list)

    def decode_tok_s(self) -> float:
        return _median([r.decode_tok_s for r in self.single if r.ok])

    def ttft_ms(self) -> float:
        return _median([r.ttft_s * 1000 for r in self.single if r.ok])

    def contended_tok_s(self) -> float:
        """Tokens delivered per second of the whole stream (a collapsed stream is cut at the limit)."""
        return _median([r.tokens / r.total_s for r in self.contended if r.total_s == r.total_s and r.total_s > 0])

    def aggregate_tok_s(self, concurrency: int) -> float:
        return _median([level.aggregate_tok_s for level in self.levels.get(concurrency, [])])

    def latency_percentile(self, concurrency: int, pct: float) -> float:
        pooled = sorted(x for level in self.levels.get(concurrency, []) for x in level.latencies_s)
        return _percentile(pooled, pct)

    def cut_short(self) -> tuple[int, int]:
        """Streams that ended without a finish_reason, out of all streams measured (one client and levels)."""
        runs = [level for rounds in self.levels.values() for level in rounds]
        cut = sum(level.cut_short for level in runs) + sum(not r.ok for r in self.single)
        return cut, sum(level.requests for level in runs) + len(self.single)


def load_samples(path: Path) -> list[PeerFigures]:
    """The peers of one run as ``main`` wrote them to ``bench-<stamp>.json`` (every sample, not the medians)."""
    peers = []
    for raw in json.loads(path.read_text()):
        peers.append(
            PeerFigures(
                **{key: raw[key] for key in ("key", "name", "available", "note", "rss_mb", "kv_caches")},
                single=[StreamResult(**sample) for sample in raw["single"]],
                prefill_tok_s=raw["prefill_tok_s"],
                # JSON object keys are strings; the concurrency levels are ints everywhere else.
                levels={int(c): [LevelResult(**level) for level in rounds] for c, rounds in raw["levels"].items()},
                contended=[StreamResult(**sample) for sample in raw["contended"]],
            )
        )
    return peers


def _median(values: list[float]) -> float:
    clean = [v for v in values if v == v]  # drops NaN
    return statistics.median(clean) if clean else float("nan")


def _percentile(values: list[float], pct: float) -> float:
    if not values:
        return float("nan")
    rank = min(len(values) - 1, max(0, round(pct / 100 * (len(values) - 1))))
    return values[rank]


# --- the peers ----------------------------------------------------------------------------------------------


class Streamer(Protocol):
    def stream(self, prompt: str, max_tokens: int, limit_s: float | None = None) -> StreamResult: ...


class Peer(Streamer, Protocol):
    key: str
    name: str
    #: Whether it serves several clients at once (the in-process library does not: it is one Python call).
    concurrent: bool
    kv_caches: int

    def prefill(self, attempt: int) -> float: ...

    def rss_mb(self) -> float: ...


class HttpPeer:
    concurrent = True

    def __init__(self, key: str, name: str, port: int, pid: int, timeout_s: float, *, kv_caches: int = 1) -> None:
        self.key, self.name, self.port, self.pid, self.timeout_s = key, name, port, pid, timeout_s
        self.kv_caches = kv_caches

    def stream(self, prompt: str, max_tokens: int, limit_s: float | None = None) -> StreamResult:
        return stream_chat(self.port, prompt, max_tokens, limit_s or self.timeout_s)

    def prefill(self, attempt: int) -> float:
        return prefill_rate(self.port, attempt, self.timeout_s)

    def rss_mb(self) -> float:
        return rss_mb(self.pid)


def sse_chunks(response: http.client.HTTPResponse) -> Iterator[dict[str, Any]]:
    """The JSON chunks of an OpenAI-style server-sent event stream, up to ``data: [DONE]``."""
    for raw in response:
        line = raw.strip()
        if not line.startswith(b"data:"):
            continue
        payload = line[5:].strip()
        if payload == b"[DONE]":
            return
        chunk: dict[str, Any] = json.loads(payload)
        yield chunk


def stream_chat(port: int, prompt: str, max_tokens: int, timeout_s: float) -> StreamResult:
    """One streamed chat completion, given up after ``timeout_s`` in all; each content chunk is counted as one token
    (all three servers send one token per chunk when no stop string holds text back)."""
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
            return StreamResult(ok=False, error=f"HTTP {response.status}: {response.read(300)!r}")
        for chunk in sse_chunks(response):
            for choice in chunk.get("choices", ()):
                if choice.get("delta", {}).get("content"):
                    now = time.perf_counter()
                    first = first if first is not None else now
                    last = now
                    tokens += 1
                if choice.get("finish_reason"):
                    finish = choice["finish_reason"]
            if time.perf_counter() - started > timeout_s:
                break
    except (OSError, http.client.HTTPException, json.JSONDecodeError) as exc:
        return StreamResult(ok=False, tokens=tokens, error=repr(exc))
    finally:
        connection.close()
    return stream_result(started, first, last, tokens, finish)


def stream_result(
    started: float, first: float | None, last: float | None, tokens: int, finish: str | None
) -> StreamResult:
    ok = finish in ("stop", "length")
    result = StreamResult(ok=ok, tokens=tokens, total_s=time.perf_counter() - started, finish_reason=finish)
    if first is not None and last is not None:
        result.ttft_s = first - started
        if tokens > 1 and last > first:
            result.decode_tok_s = (tokens - 1) / (last - first)
    if not ok:
        result.error = f"stream ended without finish_reason after {tokens} tokens"
    return result


def prefill_rate(port: int, attempt: int, timeout_s: float) -> float:
    """Prompt tokens per second: a long prompt answered with a single token, not streamed."""
    body = json.dumps(
        {
            "model": "bench",
            # A different first word every attempt, so no server answers from a prompt cache.
            "messages": [{"role": "user", "content": f"({attempt}) {LONG_PROMPT}"}],
            "max_tokens": 1,
            "temperature": 0,
        }
    )
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout_s)
    started = time.perf_counter()
    try:
        connection.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
        payload = json.loads(connection.getresponse().read())
    except (OSError, http.client.HTTPException, json.JSONDecodeError):
        return float("nan")
    finally:
        connection.close()
    prompt_tokens = int(payload.get("usage", {}).get("prompt_tokens", 0))
    return prompt_tokens / (time.perf_counter() - started) if prompt_tokens else float("nan")


class InProcessPeer:
    """llama-cpp-python's ``Llama`` in a child process that takes one command per line on stdin."""

    concurrent = False
    kv_caches = 1

    def __init__(self, process: subprocess.Popen[str]) -> None:
        self.key, self.name = "a", "llama-cpp-python in process"
        self._process = process

    def _call(self, **command: Any) -> dict[str, Any]:
        assert self._process.stdin is not None and self._process.stdout is not None
        self._process.stdin.write(json.dumps(command) + "\n")
        self._process.stdin.flush()
        line = self._process.stdout.readline()
        if not line:
            raise RuntimeError(f"the in-process worker exited with {self._process.wait()}")
        reply: dict[str, Any] = json.loads(line)
        return reply

    def stream(self, prompt: str, max_tokens: int, limit_s: float | None = None) -> StreamResult:
        return StreamResult(**self._call(op="stream", prompt=prompt, max_tokens=max_tokens, limit_s=limit_s))

    def prefill(self, attempt: int) -> float:
        return float(self._call(op="prefill", attempt=attempt)["rate"])

    def rss_mb(self) -> float:
        return float(self._call(op="rss")["rss_mb"])


def inprocess_worker(args: argparse.Namespace) -> None:
    """The child of :class:`InProcessPeer`: load, say ready, then answer commands until stdin closes."""
    import llama_cpp

    llama = llama_cpp.Llama(
        model_path=str(args.model), n_ctx=args.n_ctx, n_threads=args.threads, n_threads_batch=args.threads,
        verbose=False,
    )  # fmt: skip

    def stream(prompt: str, max_tokens: int, limit_s: float | None) -> StreamResult:
        started = time.perf_counter()
        first = last = None
        tokens = 0
        finish = None
        # With stream=True the library returns a generator of OpenAI-shaped dicts; its annotations say less.
        chunks = cast(
            Generator[dict[str, Any], None, None],
            llama.create_chat_completion(
                messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, temperature=0, stream=True
            ),
        )
        for chunk in chunks:
            choice = chunk["choices"][0]
            if choice["delta"].get("content"):
                now = time.perf_counter()
                first = first if first is not None else now
                last, tokens = now, tokens + 1
            finish = choice.get("finish_reason") or finish
            if limit_s is not None and time.perf_counter() - started > limit_s:
                chunks.close()
                break
        return stream_result(started, first, last, tokens, finish)

    def prefill(attempt: int) -> float:
        started = time.perf_counter()
        answer = cast(
            dict[str, Any],
            llama.create_chat_completion(
                messages=[{"role": "user", "content": f"({attempt}) {LONG_PROMPT}"}], max_tokens=1, temperature=0
            ),
        )
        return float(answer["usage"]["prompt_tokens"]) / (time.perf_counter() - started)

    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        command = json.loads(line)
        if command["op"] == "stream":
            reply: dict[str, Any] = asdict(stream(command["prompt"], command["max_tokens"], command.get("limit_s")))
        elif command["op"] == "prefill":
            reply = {"rate": prefill(command["attempt"])}
        else:
            reply = {"rss_mb": rss_mb(os.getpid())}
        print(json.dumps(reply), flush=True)


@contextlib.contextmanager
def inprocess_peer(args: argparse.Namespace) -> Iterator[InProcessPeer]:
    argv = [sys.executable, __file__, "--inprocess-worker", "--model", str(args.model), "--threads", str(args.threads),
            "--n-ctx", str(args.n_ctx)]  # fmt: skip
    # A session of its own, like every server here: Linux's autogroup scheduler shares the CPU between sessions
    # first, so each peer meets background load the way a systemd service does.
    process = subprocess.Popen(
        argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1, start_new_session=True
    )
    try:
        assert process.stdout is not None
        if not process.stdout.readline():
            raise RuntimeError(f"the in-process worker exited with {process.wait()} before it was ready")
        yield InProcessPeer(process)
    finally:
        if process.stdin is not None:
            process.stdin.close()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


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
def server(argv: list[str], env: dict[str, str], log_path: Path, ready_path: str, port: int) -> Iterator[int]:
    with log_path.open("wb") as log:
        process = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + 180
            while True:
                if process.poll() is not None:
                    raise RuntimeError(f"{argv[0]} exited with {process.returncode}; see {log_path}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{argv[0]} did not become ready in 180 s; see {log_path}")
                with contextlib.suppress(OSError, http.client.HTTPException):
                    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                    connection.request("GET", ready_path)
                    if connection.getresponse().status == 200:
                        break
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


@contextlib.contextmanager
def our_service(
    key: str, parallel: int, args: argparse.Namespace, extra_env: dict[str, str] | None = None
) -> Iterator[HttpPeer]:
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
        # As the role's unit starts it (innova_backend_huge_pages); a variant with GLIBC_TUNABLES= goes without.
        "GLIBC_TUNABLES": HUGE_PAGES_TUNABLE,
        **(extra_env or {}),
    }
    argv = [sys.executable, "-m", "innova_smollm", "serve"]
    # /v1/models answers while the model is still loading; the health route says 200 only once it serves.
    with server(argv, env, args.out / f"server-{key}.log", "/innova/api/smollm/health", port) as pid:
        settings = ", ".join([f"SMOLLM_PARALLEL={parallel}", *(f"{k}={v}" for k, v in (extra_env or {}).items())])
        # SMOLLM_KV_LAYOUT=auto is decided at load; /info says what it became.
        layout = kv_layout_of(port)
        kv_caches = parallel if layout == "per_sequence" and parallel > 1 else 1
        name = f"innova-smollm ({settings}; KV {layout})"
        yield HttpPeer(key, name, port, pid, args.request_timeout, kv_caches=kv_caches)


def kv_layout_of(port: int) -> str:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("GET", "/innova/api/smollm/info")
        info = json.loads(connection.getresponse().read())
    finally:
        connection.close()
    return str(info.get("kv_layout", "unknown"))


@contextlib.contextmanager
def llama_cpp_python_server(args: argparse.Namespace) -> Iterator[HttpPeer]:
    for module in ("fastapi", "sse_starlette", "starlette_context"):
        if not _importable(module):
            raise PeerUnavailableError("not installed: pip install 'llama-cpp-python[server]'")
    port = free_port()
    argv = [
        sys.executable, "-m", "llama_cpp.server", "--model", str(args.model), "--n_threads", str(args.threads),
        "--n_ctx", str(args.n_ctx), "--host", "127.0.0.1", "--port", str(port),
    ]  # fmt: skip
    with server(argv, dict(os.environ), args.out / "server-c.log", "/v1/models", port) as pid:
        yield HttpPeer("c", "llama-cpp-python server", port, pid, args.request_timeout)


@contextlib.contextmanager
def llama_server(args: argparse.Namespace, *, huge_pages: bool = False) -> Iterator[HttpPeer]:
    """(d) as its users run it; (dh) with the huge-pages tunable this service's unit sets, for a like-for-like row."""
    binary = find_llama_server(args.llama_server)
    if binary is None:
        raise PeerUnavailableError(
            "llama-server not found: build it with scripts/build_llama_server.sh or pass --llama-server"
        )
    port = free_port()
    # Each slot gets n_ctx tokens, like each of our sequences can use the whole window. Everything else is
    # llama-server's default, as its users run it.
    argv = [
        binary, "-m", str(args.model), "-t", str(args.threads), "-c", str(args.n_ctx * args.parallel),
        "-np", str(args.parallel), "--host", "127.0.0.1", "--port", str(port), "--no-webui",
        *args.llama_server_arg,
    ]  # fmt: skip
    key, env, name = "d", dict(os.environ), f"llama.cpp llama-server ({args.parallel} slots)"
    if huge_pages:
        env["GLIBC_TUNABLES"] = HUGE_PAGES_TUNABLE
        key, name = "dh", f"llama.cpp llama-server ({args.parallel} slots, GLIBC_TUNABLES={HUGE_PAGES_TUNABLE})"
    with server(argv, env, args.out / f"server-{key}.log", "/health", port) as pid:
        yield HttpPeer(key, name, port, pid, args.request_timeout)


class PeerUnavailableError(Exception):
    pass


def _importable(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


def find_llama_server(explicit: str | None) -> str | None:
    if explicit:
        return explicit if Path(explicit).is_file() else None
    on_path = shutil.which("llama-server")
    if on_path:
        return on_path
    for pattern in DEFAULT_LLAMA_SERVER_GLOBS:
        found = sorted(Path("/").glob(pattern.lstrip("/")))
        if found:
            return str(found[0])
    return None


def start_peers(args: argparse.Namespace, stack: contextlib.ExitStack) -> tuple[list[Peer], list[PeerFigures]]:
    starters: dict[str, Callable[[], contextlib.AbstractContextManager[Any]]] = {
        "a": lambda: inprocess_peer(args),
        "b": lambda: our_service("b", args.parallel, args),
        "b1": lambda: our_service("b1", 1, args),
        "c": lambda: llama_cpp_python_server(args),
        "d": lambda: llama_server(args),
        "dh": lambda: llama_server(args, huge_pages=True),
    }
    for key, extra_env in args.variant.items():
        starters[key] = functools.partial(our_service, key, args.parallel, args, extra_env)
    peers: list[Peer] = []
    skipped: list[PeerFigures] = []
    for key in args.peers:
        print(f"starting ({key})", flush=True)
        try:
            peer: Peer = stack.enter_context(starters[key]())
        except (PeerUnavailableError, RuntimeError) as exc:
            print(f"  ({key}) skipped: {exc}", flush=True)
            skipped.append(PeerFigures(key, key, available=False, note=str(exc)))
            continue
        peers.append(peer)
    return peers, skipped


# --- the measurements ---------------------------------------------------------------------------------------


def rotated(peers: list[Peer], round_index: int) -> list[Peer]:
    """The peers in turn, starting one further along each round, so none is always measured first or last."""
    if not peers:
        return []
    shift = round_index % len(peers)
    return peers[shift:] + peers[:shift]


def run_level(peer: Streamer, concurrency: int, requests: int, max_tokens: int) -> LevelResult:
    results: list[StreamResult] = []
    lock = threading.Lock()
    counter = iter(range(requests))

    def worker() -> None:
        while True:
            with lock:
                index = next(counter, None)
            if index is None:
                return
            result = peer.stream(STORY_PROMPTS[index % len(STORY_PROMPTS)], max_tokens)
            with lock:
                results.append(result)

    started = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    return LevelResult(
        concurrency=concurrency,
        requests=requests,
        aggregate_tok_s=sum(r.tokens for r in results) / wall,
        latencies_s=sorted(r.total_s for r in results if r.ok),
        cut_short=sum(not r.ok for r in results),
    )


def measure(peers: list[Peer], args: argparse.Namespace) -> dict[str, PeerFigures]:
    figures = {peer.key: PeerFigures(peer.key, peer.name) for peer in peers}
    for peer in peers:
        peer.stream("Say hello.", 8)  # warm-up: first allocations, template compilation
        figures[peer.key].rss_mb = peer.rss_mb()
        figures[peer.key].kv_caches = peer.kv_caches
    print(f"one client: {args.single_repeats} rounds", flush=True)
    for round_index in range(args.single_repeats):
        prompt = STORY_PROMPTS[round_index % len(STORY_PROMPTS)]
        for peer in rotated(peers, round_index):
            figures[peer.key].single.append(peer.stream(prompt, args.max_tokens))
    print("prefill: 3 rounds", flush=True)
    for attempt in range(3):
        for peer in rotated(peers, attempt):
            figures[peer.key].prefill_tok_s.append(peer.prefill(attempt))
    servers = [peer for peer in peers if peer.concurrent]
    for concurrency in args.concurrency:
        requests = max(args.min_requests, args.requests_per_client * concurrency)
        for round_index in range(args.level_rounds):
            for peer in rotated(servers, round_index):
                level = run_level(peer, concurrency, requests, args.max_tokens)
                figures[peer.key].levels.setdefault(concurrency, []).append(level)
                print(
                    f"  ({peer.key}) {_clients(concurrency)}, round {round_index + 1}: "
                    f"{level.aggregate_tok_s:.1f} tok/s, cut short {level.cut_short}/{requests}",
                    flush=True,
                )
    if args.contention:
        measure_contended(peers, figures, args)
    return figures


@contextlib.contextmanager
def busy_processes(count: int) -> Iterator[None]:
    """``count`` processes spinning on a core each, every one in a session of its own (another service's load)."""
    loops = [subprocess.Popen([sys.executable, "-c", "while True: pass"], start_new_session=True) for _ in range(count)]
    try:
        time.sleep(1)  # let the scheduler see them before anything is measured
        yield
    finally:
        for loop in loops:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(loop.pid, signal.SIGKILL)
            loop.wait()


def measure_contended(peers: list[Peer], figures: dict[str, PeerFigures], args: argparse.Namespace) -> None:
    print(
        f"one client beside {args.contention} busy processes: {args.contention_rounds} rounds, "
        f"{args.contention_tokens} tokens, each stream cut at {args.contention_limit:g} s",
        flush=True,
    )
    with busy_processes(args.contention):
        for round_index in range(args.contention_rounds):
            prompt = STORY_PROMPTS[round_index % len(STORY_PROMPTS)]
            for peer in rotated(peers, round_index):
                result = peer.stream(prompt, args.contention_tokens, limit_s=args.contention_limit)
                figures[peer.key].contended.append(result)
                print(f"  ({peer.key}) {result.tokens} tokens in {result.total_s:.1f} s", flush=True)


# --- report -------------------------------------------------------------------------------------------------


def _clients(count: int) -> str:
    return f"{count} client" if count == 1 else f"{count} clients"


def _fmt(value: float, digits: int = 1) -> str:
    return "—" if value != value else f"{value:.{digits}f}"


def _ratio(value: float, base: float) -> str:
    if value != value or base != base or base == 0:
        return ""
    return f" ({value / base:.2f}x)"


def table(results: list[PeerFigures], concurrency: list[int]) -> str:
    base = next((r for r in results if r.key == BASE and r.available), None)
    head = ["", "decode tok/s (1 client)", "TTFT ms", "prefill tok/s", "RSS MB"]
    head += [f"{_clients(c)} tok/s" for c in concurrency] + [f"p50/p95 s @{c}" for c in concurrency] + ["cut short"]
    contention = any(r.contended for r in results)
    if contention:
        head.append("1 client tok/s, cores busy")
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for result in results:
        if not result.available:
            rows.append(f"| ({result.key}) | skipped: {result.note} |" + " |" * (len(head) - 2))
            continue
        cells = [
            f"({result.key}) {result.name}",
            _fmt(result.decode_tok_s()) + (_ratio(result.decode_tok_s(), base.decode_tok_s()) if base else ""),
            _fmt(result.ttft_ms(), 0),
            _fmt(_median(result.prefill_tok_s), 0),
            _fmt(result.rss_mb, 0),
        ]
        for c in concurrency:
            value = result.aggregate_tok_s(c)
            cells.append(_fmt(value) + (_ratio(value, base.aggregate_tok_s(c)) if base else ""))
        for c in concurrency:
            p50, p95 = result.latency_percentile(c, 50), result.latency_percentile(c, 95)
            cells.append("—" if p50 != p50 else f"{_fmt(p50, 2)}/{_fmt(p95, 2)}")
        cut, total = result.cut_short()
        cells.append(f"{cut}/{total}" if total else "—")
        if contention:
            value = result.contended_tok_s()
            cells.append(_fmt(value) + (_ratio(value, base.contended_tok_s()) if base else ""))
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def paired_ratios(base: list[float], other: list[float]) -> list[float]:
    """(b)/(x) for each round in which both were measured."""
    return [b / o for b, o in zip(base, other, strict=False) if b == b and o == o and o > 0]


def ratio_rows(figures: dict[str, PeerFigures], concurrency: list[int]) -> list[tuple[str, list[float]]]:
    base = figures.get(BASE)
    if base is None:
        return []
    rows: list[tuple[str, list[float]]] = []
    for key, other in figures.items():
        if key == BASE:
            continue
        single = paired_ratios(
            [r.decode_tok_s if r.ok else float("nan") for r in base.single],
            [r.decode_tok_s if r.ok else float("nan") for r in other.single],
        )
        rows.append((f"({BASE})/({key}) decode, one client", single))
        for c in concurrency:
            if c in other.levels and c in base.levels:
                paired = paired_ratios(
                    [level.aggregate_tok_s for level in base.levels[c]],
                    [level.aggregate_tok_s for level in other.levels[c]],
                )
                rows.append((f"({BASE})/({key}) aggregate, {_clients(c)}", paired))
        contended = paired_ratios(
            [r.tokens / r.total_s if r.total_s > 0 else float("nan") for r in base.contended],
            [r.tokens / r.total_s if r.total_s > 0 else float("nan") for r in other.contended],
        )
        rows.append((f"({BASE})/({key}) one client, cores busy", contended))
    return rows


def ratio_table(figures: dict[str, PeerFigures], concurrency: list[int]) -> str:
    rows = ["| ratio | median | range | rounds |", "|---|---|---|---|"]
    for label, values in ratio_rows(figures, concurrency):
        if values:
            rows.append(f"| {label} | {_median(values):.2f} | {min(values):.2f} to {max(values):.2f} | {len(values)} |")
    return "\n".join(rows)


def kv_cache_mb(model: Path, n_ctx: int) -> float:
    """Size of an f16 KV cache of ``n_ctx`` cells for this model, from its metadata (no weights are loaded)."""
    import llama_cpp

    _silence_llama_cpp(llama_cpp)
    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    loaded = llama_cpp.llama_model_load_from_file(str(model).encode(), params)
    if not loaded:
        return float("nan")
    try:

        def meta(key: str) -> int | None:
            buffer = bytes(64)
            length = llama_cpp.llama_model_meta_val_str(loaded, key.encode(), buffer, len(buffer))
            return int(buffer[:length]) if length > 0 and buffer[:length].isdigit() else None

        buffer = bytes(64)
        length = llama_cpp.llama_model_meta_val_str(loaded, b"general.architecture", buffer, len(buffer))
        arch = buffer[: max(length, 0)].decode()
        # A vocab-only model has no per-layer hyperparameters loaded, so they come from the metadata keys.
        n_layer = meta(f"{arch}.block_count")
        n_head = meta(f"{arch}.attention.head_count")
        n_embd = meta(f"{arch}.embedding_length")
        if n_layer is None or n_head is None or n_embd is None:
            return float("nan")
        n_head_kv = meta(f"{arch}.attention.head_count_kv") or n_head
        head_dim = meta(f"{arch}.attention.key_length") or n_embd // n_head
    finally:
        llama_cpp.llama_model_free(loaded)
    return 2 * n_layer * n_ctx * n_head_kv * head_dim * 2 / 2**20  # K and V, 2 bytes each


#: ctypes callbacks handed to llama.cpp, kept alive here for as long as llama.cpp may call them.
_LOG_CALLBACKS: list[Any] = []


def _silence_llama_cpp(llama_cpp: Any) -> None:
    """llama.cpp's loader logs would bury the report."""
    callback = llama_cpp.llama_log_callback(lambda level, text, user_data: None)
    _LOG_CALLBACKS.append(callback)
    llama_cpp.llama_log_set(callback, None)


def target_lines(figures: dict[str, PeerFigures], args: argparse.Namespace) -> list[str]:
    """Issue 6's targets, each with the figure that meets it or not."""
    ratios = dict(ratio_rows(figures, args.concurrency))
    lines: list[str] = []

    def check(label: str, ratio_label: str, minimum: float) -> None:
        values = ratios.get(ratio_label)
        if values:
            verdict = "met" if _median(values) >= minimum else "NOT MET"
            lines.append(f"- {label}: median ratio {_median(values):.2f} (target ≥ {minimum:g}): {verdict}")

    check("one client, (b) against llama-cpp-python in process (a)", "(b)/(a) decode, one client", 0.97)
    check("one client, (b) against llama-server (d)", "(b)/(d) decode, one client", 1.0)
    check("4 clients, (b) against llama-server (d)", "(b)/(d) aggregate, 4 clients", 1.0)
    check("4 clients, (b) against llama-cpp-python's server (c)", "(b)/(c) aggregate, 4 clients", 3.0)
    base = figures.get(BASE)
    if base is not None:
        cut, total = base.cut_short()
        lines.append(f"- streams cut short by (b): {cut}/{total}: {'met' if cut == 0 else 'NOT MET'}")
        kv_mb = kv_cache_mb(args.model, args.n_ctx) * base.kv_caches
        budget = args.model.stat().st_size / 2**20 + kv_mb + MEMORY_OVERHEAD_BUDGET_MB
        verdict = "met" if base.rss_mb <= budget else "NOT MET"
        caches = f"{base.kv_caches} x " if base.kv_caches > 1 else ""
        lines.append(
            f"- memory of (b) after load: {base.rss_mb:.0f} MB, budget {budget:.0f} MB (model file + KV cache of "
            f"{caches}n_ctx {args.n_ctx} = {kv_mb:.0f} MiB + {MEMORY_OVERHEAD_BUDGET_MB} MB): {verdict}"
        )
    return lines


def chart(results: list[PeerFigures], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    available = [r for r in results if r.available]
    figure, (decode, ttft, aggregate) = plt.subplots(1, 3, figsize=(15, 4.5))
    labels = [f"({r.key})" for r in available]
    decode.bar(labels, [r.decode_tok_s() for r in available], color="tab:blue")
    decode.set_title("decode tok/s, one client (median)")
    ttft.bar(labels, [r.ttft_ms() for r in available], color="tab:orange")
    ttft.set_title("time to first token, ms (median)")
    for result in available:
        if result.levels:
            xs = sorted(result.levels)
            aggregate.plot(
                xs, [result.aggregate_tok_s(c) for c in xs], marker="o", label=f"({result.key}) {result.name}"
            )
    aggregate.set_title("aggregate tok/s by concurrent clients (median)")
    aggregate.set_xlabel("concurrent clients")
    aggregate.set_xscale("log", base=2)
    aggregate.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return True


def machine() -> str:
    cpu = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"{cpu}, {len(os.sched_getaffinity(0))} usable cores, {platform.system()} {platform.release()}"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--n-ctx", type=int, default=2048, help="context window per request (default 2048)")
    parser.add_argument("--parallel", type=int, default=4, help="our SMOLLM_PARALLEL and llama-server's slots")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 4, 8])
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--min-requests", type=int, default=4)
    parser.add_argument("--single-repeats", type=int, default=15, help="rounds of one-client streams (default 15)")
    parser.add_argument("--level-rounds", type=int, default=3, help="rounds of each concurrency level (default 3)")
    parser.add_argument("--request-timeout", type=float, default=300.0)
    parser.add_argument(
        "--contention",
        type=int,
        default=len(os.sched_getaffinity(0)),
        help="busy processes for the contention phase (default: one per usable core; 0 skips it)",
    )
    parser.add_argument("--contention-rounds", type=int, default=3)
    parser.add_argument("--contention-tokens", type=int, default=64)
    parser.add_argument("--contention-limit", type=float, default=30.0, help="seconds before a stream is cut")
    parser.add_argument("--peers", type=lambda s: s.split(","), default=["a", "b", "b1", "c", "d"],
                        help="which of a,b,b1,c,d,dh to run (default: a,b,b1,c,d)")  # fmt: skip
    parser.add_argument(
        "--variant",
        type=_variant,
        action="append",
        default=[],
        metavar="KEY:NAME=VALUE[,NAME=VALUE]",
        help="one more peer: this service (SMOLLM_PARALLEL=--parallel) with extra environment, e.g. "
        "'bfa:SMOLLM_FLASH_ATTN=on'; add KEY to --peers (repeatable)",
    )
    parser.add_argument("--llama-server", help="path of the llama-server binary (default: search)")
    parser.add_argument("--llama-server-arg", action="append", default=[], help="extra llama-server flag (repeatable)")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="raw samples (JSON), latest.md, server logs and chart (default: bench-results/, git-ignored)",
    )
    parser.add_argument(
        "--results",
        type=Path,
        default=None,
        help="the run's summary bench-<stamp>.md (default: docs/results/, or --out when --out is given)",
    )
    parser.add_argument("--inprocess-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.variant = dict(args.variant)
    if args.results is None:
        args.results = RESULTS_DIR if args.out is None else args.out
    if args.out is None:
        args.out = RAW_DIR
    return args


def _variant(text: str) -> tuple[str, dict[str, str]]:
    key, _, assignments = text.partition(":")
    pairs = [item.partition("=") for item in assignments.split(",") if item]
    if not key or not pairs or any(not name or not sep for name, sep, _ in pairs):
        raise argparse.ArgumentTypeError(f"{text!r}: expected KEY:NAME=VALUE[,NAME=VALUE]")
    return key, {name: value for name, _, value in pairs}


def main() -> int:
    args = parse_args()
    if args.inprocess_worker:
        inprocess_worker(args)
        return 0
    if not args.model.is_file():
        print(f"model {args.model} not found (scripts/fetch_model.py fetches it)", file=sys.stderr)
        return 2
    known = {"a", "b", "b1", "c", "d", "dh", *args.variant}
    unknown = set(args.peers) - known
    if unknown:
        print(f"unknown peers {sorted(unknown)}: choose from {', '.join(sorted(known))}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    args.results.mkdir(parents=True, exist_ok=True)
    # A SIGTERM (timeout, Ctrl-C's cousin) unwinds like an exception, so every server started is stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    started = dt.datetime.now()
    # A busy machine skews every figure; the report shows the load it ran under.
    load_before = f"{os.getloadavg()[0]:.2f}"
    with contextlib.ExitStack() as stack:
        peers, skipped = start_peers(args, stack)
        figures = measure(peers, args)
    results = sorted([*figures.values(), *skipped], key=lambda r: args.peers.index(r.key))

    stamp = started.strftime("%Y%m%d-%H%M%S")
    header = (
        f"Benchmark {started:%Y-%m-%d %H:%M}, {machine()}; model {args.model.name}, {args.threads} threads, "
        f"greedy, {args.max_tokens} new tokens per request, n_ctx {args.n_ctx}, parallel/slots {args.parallel}; "
        f"medians of {args.single_repeats} one-client rounds and {args.level_rounds} rounds per concurrency level, "
        f"the peers taking turns; load average {load_before} before, {os.getloadavg()[0]:.2f} after. "
        + (
            f"Cores busy: {args.contention} busy processes in sessions of their own, {args.contention_tokens}-token "
            f"streams cut at {args.contention_limit:g} s, tokens per second of the whole stream. "
            if args.contention
            else ""
        )
        + f"Command: `python scripts/bench.py {' '.join(sys.argv[1:])}`"
    )
    markdown = "\n\n".join(
        [
            header,
            table(results, args.concurrency),
            "Ratios of (b), round by round (each round measures every peer within seconds):",
            ratio_table(figures, args.concurrency),
            "Issue 6's targets:\n" + "\n".join(target_lines(figures, args)),
        ]
    )
    print("\n" + markdown)
    summary = args.results / f"bench-{stamp}.md"
    summary.write_text(markdown + "\n")
    (args.out / "latest.md").write_text(markdown + "\n")
    print(f"summary: {summary}")
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
