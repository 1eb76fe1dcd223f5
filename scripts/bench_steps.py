#!/usr/bin/env python3
"""Where the service's decode time goes under load: every ``llama_decode`` of the running service, timed.

Starts this service in this process (real uvicorn on loopback, its one engine), wraps llama-cpp-python's
``llama_decode`` with a timer before the engine loads, then drives it with ``scripts/bench.py``'s client at each
concurrency. For each level it prints the aggregate tok/s, how much of the wall time was spent inside
``llama_decode``, the median time between two decodes (the engine's own Python per step, plus this timer's
wrapper), and the steps by batch size (how many, median and total time). A batch larger than
``--parallel`` carries a prompt chunk.

What it answers: whether the batches are full (steps of ``--parallel`` tokens), and whether the time goes into
llama.cpp or into our path around it. It is what showed that under 4 clients almost all steps decode 4 sequences
and 95-98 % of the wall time is inside ``llama_decode`` (docs/performance.md).

``--direct`` drives the engine itself, without HTTP (each client thread submits jobs and reads their tokens), to
tell the engine's share from the HTTP path's. ``--env NAME=VALUE`` sets a service variable, e.g. to compare
``SMOLLM_KV_LAYOUT=per_sequence`` run for run with the default.

    .venv/bin/python scripts/bench_steps.py --concurrency 1,4
    .venv/bin/python scripts/bench_steps.py --direct --concurrency 4 --env SMOLLM_KV_LAYOUT=per_sequence
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import llama_cpp

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench  # scripts/ is not a package


class DecodeTimer:
    """Replaces ``llama_cpp.llama_decode`` (the engine calls it through the module) with a timed call."""

    def __init__(self) -> None:
        self._real: Callable[[Any, Any], int] = llama_cpp.llama_decode
        self._lock = threading.Lock()
        #: (tokens in the batch, seconds inside llama_decode), one per call.
        self.steps: list[tuple[int, float]] = []
        #: Seconds from the end of one llama_decode to the start of the next: the engine's own work per step.
        self.gaps: list[float] = []
        self._last_end: float | None = None
        llama_cpp.llama_decode = self._timed

    def _timed(self, ctx: Any, batch: Any) -> int:
        started = time.perf_counter()
        status = self._real(ctx, batch)
        ended = time.perf_counter()
        with self._lock:
            self.steps.append((int(batch.n_tokens), ended - started))
            if self._last_end is not None:
                self.gaps.append(started - self._last_end)
            self._last_end = ended
        return status

    def take(self) -> tuple[list[tuple[int, float]], list[float]]:
        with self._lock:
            steps, self.steps = self.steps, []
            gaps, self.gaps = self.gaps, []
            self._last_end = None
        return steps, gaps


def service_settings(args: argparse.Namespace, port: int) -> Any:
    from innova_smollm.settings import Settings

    return Settings.from_env(
        {
            "SMOLLM_MODEL_PATH": str(args.model),
            "SMOLLM_N_THREADS": str(args.threads),
            "SMOLLM_N_CTX": str(args.n_ctx),
            "SMOLLM_PARALLEL": str(args.parallel),
            "SMOLLM_MAX_QUEUE": str(max(args.concurrency) * 2),
            "SMOLLM_LOG_LEVEL": "WARNING",
            "PORT": str(port),
            **dict(args.env),
        }
    )


class DirectPeer:
    """Streams straight from the engine, without HTTP: the tokens a client thread reads from its job's sink."""

    def __init__(self, engine: Any, timeout_s: float) -> None:
        self._engine, self._timeout_s = engine, timeout_s

    def stream(self, prompt: str, max_tokens: int, limit_s: float | None = None) -> bench.StreamResult:
        from innova_smollm.core.sinks import BlockingSink, Failed, Finished, Text
        from innova_smollm.core.types import ChatMessage, GenerationJob, SamplingParams

        timeout_s = limit_s or self._timeout_s
        started = time.perf_counter()
        prompt_tokens = self._engine.tokenize_chat([ChatMessage(role="user", content=prompt)])
        job = GenerationJob(
            prompt_tokens=tuple(prompt_tokens),
            max_tokens=max_tokens,
            sampling=SamplingParams(temperature=0.0),
            deadline=time.monotonic() + timeout_s,
        )
        sink = BlockingSink()
        self._engine.submit(job, sink)
        first = last = None
        tokens = 0
        while True:
            event = sink.get(timeout=timeout_s)
            if isinstance(event, Text):
                last = time.perf_counter()
                first = first if first is not None else last
                tokens += 1  # like the HTTP client: one chunk, one token
            elif isinstance(event, Finished):
                return bench.stream_result(started, first, last, tokens, str(event.reason))
            elif isinstance(event, Failed):
                return bench.StreamResult(ok=False, tokens=tokens, error=repr(event.error))


def start_service(args: argparse.Namespace) -> tuple[Any, int]:
    import uvicorn

    from innova_smollm.http.app import create_app
    from innova_smollm.http.server import uvicorn_config

    port = bench.free_port()
    settings = service_settings(args, port)
    server = uvicorn.Server(uvicorn_config(create_app(settings), host="127.0.0.1", port=port, settings=settings))
    threading.Thread(target=server.run, name="uvicorn", daemon=True).start()
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if bench.stream_chat(port, "Hi", 1, 30).ok:
            return server, port
        time.sleep(0.5)
    raise SystemExit("the service did not answer within 300 s")


def report(
    concurrency: int, level: bench.LevelResult, steps: list[tuple[int, float]], gaps: list[float], wall_s: float
) -> str:
    in_decode = sum(seconds for _, seconds in steps)
    # The median leaves out the few long gaps where the engine waited for a client's next request.
    between = f"{statistics.median(gaps) * 1e6:.0f} us" if gaps else "n/a"
    lines = [
        f"{concurrency} client(s): {level.aggregate_tok_s:.1f} tok/s, cut short {level.cut_short}/{level.requests}, "
        f"{len(steps)} steps, {in_decode:.2f} s of {wall_s:.2f} s inside llama_decode ({in_decode / wall_s:.0%}), "
        f"median {between} between two decodes",
        "",
        "| tokens in the batch | steps | median ms | total s |",
        "|---|---|---|---|",
    ]
    by_size: dict[int, list[float]] = {}
    for tokens, seconds in steps:
        by_size.setdefault(tokens, []).append(seconds)
    for tokens in sorted(by_size):
        times = by_size[tokens]
        lines.append(f"| {tokens} | {len(times)} | {statistics.median(times) * 1000:.1f} | {sum(times):.2f} |")
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=bench.DEFAULT_MODEL)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--n-ctx", type=int, default=2048)
    parser.add_argument("--parallel", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--concurrency", type=lambda text: [int(part) for part in text.split(",")], default=[1, 4])
    parser.add_argument("--requests-per-client", type=int, default=4)
    parser.add_argument("--request-timeout", type=float, default=300.0)
    parser.add_argument("--direct", action="store_true", help="drive the engine itself instead of the HTTP service")
    parser.add_argument(
        "--env",
        type=_assignment,
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a service variable for this run, e.g. SMOLLM_KV_LAYOUT=per_sequence (repeatable)",
    )
    return parser.parse_args()


def _assignment(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not name or not sep:
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME=VALUE")
    return name, value


def main() -> int:
    args = parse_args()
    timer = DecodeTimer()  # before the engine loads, so every decode of the service goes through it
    peer: bench.Streamer
    if args.direct:
        from innova_smollm.engine import load_engine

        engine = load_engine(service_settings(args, bench.free_port()))  # the port goes unused
        peer = DirectPeer(engine, args.request_timeout)
        stop: Callable[[], None] = engine.close
    else:
        server, port = start_service(args)
        peer = bench.HttpPeer("b", "innova-smollm in this process", port, os.getpid(), args.request_timeout)

        def stop() -> None:
            server.should_exit = True

    try:
        for concurrency in args.concurrency:
            timer.take()
            started = time.perf_counter()
            level = bench.run_level(peer, concurrency, concurrency * args.requests_per_client, args.max_tokens)
            wall_s = time.perf_counter() - started
            print(report(concurrency, level, *timer.take(), wall_s), end="\n\n", flush=True)
    finally:
        stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
