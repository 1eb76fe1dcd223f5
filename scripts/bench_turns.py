#!/usr/bin/env python3
"""Time to first token, turn by turn, of one long conversation: this service against llama.cpp's llama-server.

What the KORYXA backend sends: a system prompt, a long history and a new question, then the next turn of the same
conversation, and so on. Each peer serves the same conversation (``--turns`` turns; the history is ``--history``
words of earlier turns), over ``POST /v1/chat/completions`` with ``stream=true``, greedy, ``--max-tokens`` tokens per
answer, each answer appended to the history before the next question. For every turn it records the time to the
first answer token and the prompt tokens the server decoded for it (ours: ``/metrics``; llama-server: the
``timings.prompt_n`` of its last chunk). Then, on the same server, a fresh prompt of as many tokens as the last turn
decoded, sent alone (``/v1/completions``, one token): what decoding "the new turn alone" costs, the bar the last
turn is held to.

Peers: ``b`` this service (its defaults, ``SMOLLM_PARALLEL`` sequences), ``bw`` the same with the conversation's
system prompt as a warm prompt (``SMOLLM_WARM_PROMPTS``), ``d`` llama-server with its defaults (``cache_prompt`` on,
``--cache-ram`` 8 GiB), ``--parallel`` slots of ``--n-ctx`` tokens each. Rounds alternate the order of the peers.
With the production-shaped model (``scripts/fetch_model.py llama32-3b-shape``) answers are noise, which changes
nothing here: only the prompt's cost is measured.

    .venv/bin/python scripts/bench_turns.py --model models/Llama-3.2-3B-Instruct-shape.Q4_K_M.gguf --rounds 2

Output: a table on stdout and, with ``--results DIR``, ``turns.json`` and ``turns.md`` in DIR.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # scripts/ is not a package

SYSTEM = (
    "You are the KORYXA assistant. A small business describes a need; you analyse it and propose up to three concrete "
    "actions, each with a reason, a rough cost and who should do it. Keep to what the business told you, never "
    "invent figures, say when you need more information, and answer in the language of the question. "
) * 3
QUESTIONS = (
    "We bake bread and want more customers in the morning. What should we do first?",
    "And if our budget is only a few hundred euros?",
    "Who in a team of four should take care of it?",
    "How do we know after a month whether it worked?",
    "What would you do differently in winter?",
    "Summarise the plan in three lines.",
)
HISTORY_TOPICS = ("opening hours", "suppliers", "prices", "the shop window", "a loyalty card", "the website")


@dataclass
class Turn:
    ttft_s: float
    decoded: int


@dataclass
class Conversation:
    peer: str
    turns: list[Turn] = field(default_factory=list)
    alone_ttft_s: float = float("nan")


def history(words: int) -> list[dict[str, str]]:
    """Earlier turns of the conversation, about ``words`` words in all."""
    messages: list[dict[str, str]] = []
    count = index = 0
    while count < words:
        topic = HISTORY_TOPICS[index % len(HISTORY_TOPICS)]
        question = f"Earlier question {index}: what do you think about {topic} for our bakery?"
        answer = (
            f"About {topic}: compare what the three nearest bakeries do, write down what customers ask for, and "
            f"change one thing at a time so that you can tell what worked. Note {index}. "
        ) * 3
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        count += len(question.split()) + len(answer.split())
        index += 1
    return messages


def post(port: int, path: str, body: dict[str, Any], timeout_s: float) -> tuple[float, str, dict[str, Any]]:
    """Stream one request; returns the time to the first content, the text, and the last chunk."""
    started = time.perf_counter()
    first = float("nan")
    text: list[str] = []
    last: dict[str, Any] = {}
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout_s)
    try:
        connection.request("POST", path, json.dumps({**body, "stream": True}), {"Content-Type": "application/json"})
        response = connection.getresponse()
        if response.status != 200:
            raise RuntimeError(f"{path}: HTTP {response.status}: {response.read(300)!r}")
        for chunk in bench.sse_chunks(response):
            last = chunk
            for choice in chunk.get("choices", ()):
                piece = choice.get("delta", {}).get("content") or choice.get("text") or ""
                if piece:
                    if not text:
                        first = time.perf_counter() - started
                    text.append(piece)
    finally:
        connection.close()
    return first, "".join(text), last


def prompt_tokens_decoded(port: int) -> int:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("GET", "/metrics")
        for line in connection.getresponse().read().decode().splitlines():
            if line.startswith('smollm_prompt_cache_tokens_total{kind="decoded"}'):
                return int(float(line.split()[-1]))
    finally:
        connection.close()
    raise RuntimeError("no smollm_prompt_cache_tokens_total in /metrics")


def converse(peer: str, port: int, args: argparse.Namespace) -> Conversation:
    result = Conversation(peer)
    messages = [{"role": "system", "content": SYSTEM}, *history(args.history)]
    for turn in range(args.turns):
        messages.append({"role": "user", "content": QUESTIONS[turn % len(QUESTIONS)]})
        before = prompt_tokens_decoded(port) if peer != "d" else 0
        body = {"model": "bench", "messages": messages, "max_tokens": args.max_tokens, "temperature": 0}
        ttft, answer, last = post(port, "/v1/chat/completions", body, args.timeout)
        if peer == "d":
            decoded = int(last.get("timings", {}).get("prompt_n", -1))
        else:
            decoded = prompt_tokens_decoded(port) - before
        result.turns.append(Turn(ttft, decoded))
        print(f"  {peer} turn {turn + 1}: first token {ttft:.2f} s, {decoded} prompt tokens decoded", flush=True)
        messages.append({"role": "assistant", "content": answer})
    # The bar: a prompt of as many tokens as the last turn decoded, alone (" hello" is one token in these vocabularies;
    # the server adds the BOS token). Each conversation has a server of its own, so nothing cached can serve it.
    words = max(result.turns[-1].decoded - 1, 1)
    alone = "hello" + " hello" * (words - 1)
    body = {"model": "bench", "prompt": alone, "max_tokens": 1, "temperature": 0}
    result.alone_ttft_s, _, _ = post(port, "/v1/completions", body, args.timeout)
    print(f"  {peer} the new turn alone: first token {result.alone_ttft_s:.2f} s", flush=True)
    return result


@contextlib.contextmanager
def peer_server(peer: str, args: argparse.Namespace, workdir: Path) -> Iterator[int]:
    port = bench.free_port()
    log = workdir / f"server-{peer}.log"
    if peer == "d":
        binary = bench.find_llama_server(args.llama_server)
        if binary is None:
            raise SystemExit("llama-server not found: scripts/build_llama_server.sh, or pass --llama-server")
        argv = [
            binary, "-m", str(args.model), "-t", str(args.threads), "-c", str(args.n_ctx * args.parallel),
            "-np", str(args.parallel), "--host", "127.0.0.1", "--port", str(port), "--no-webui",
        ]  # fmt: skip
        with bench.server(argv, dict(os.environ), log, "/health", port):
            yield port
        return
    env = {
        **os.environ,
        "SMOLLM_MODEL_PATH": str(args.model),
        "PORT": str(port),
        "SMOLLM_PARALLEL": str(args.parallel),
        "SMOLLM_N_THREADS": str(args.threads),
        "SMOLLM_N_CTX": str(args.n_ctx),
        "SMOLLM_LOG_LEVEL": "WARNING",
        "PYTHONPATH": str(bench.REPO / "service") + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }
    if peer == "bw":
        warm = workdir / "warm.json"
        warm.write_text(json.dumps([{"system": SYSTEM}]), encoding="utf-8")
        env["SMOLLM_WARM_PROMPTS"] = str(warm)
    argv = [sys.executable, "-m", "innova_smollm", "serve"]
    with bench.server(argv, env, log, "/innova/api/smollm/health", port):
        yield port


def report(conversations: list[Conversation], args: argparse.Namespace) -> str:
    lines = [
        f"Model {args.model.name}, {args.threads} threads, {args.parallel} sequences/slots of {args.n_ctx} tokens; "
        f"history {args.history} words, {args.turns} turns, {args.max_tokens} tokens per answer; "
        f"{args.rounds} rounds (medians; range in brackets).",
        "",
        "| peer | turn 1 first token (s) | turn 1 decoded | last turn first token (s) | last turn decoded "
        "| the new turn alone (s) | last turn / alone |",
        "|---|---|---|---|---|---|---|",
    ]
    for peer in args.peers:
        mine = [c for c in conversations if c.peer == peer]
        if not mine:
            continue

        def cell(values: list[float], digits: int = 2) -> str:
            median = statistics.median(values)
            return f"{median:.{digits}f}" + (
                f" [{min(values):.{digits}f}-{max(values):.{digits}f}]" if len(values) > 1 else ""
            )

        first = [c.turns[0].ttft_s for c in mine]
        last = [c.turns[-1].ttft_s for c in mine]
        alone = [c.alone_ttft_s for c in mine]
        lines.append(
            f"| {peer} | {cell(first)} | {mine[0].turns[0].decoded} | {cell(last)} | {mine[0].turns[-1].decoded} "
            f"| {cell(alone)} | {cell([a / b for a, b in zip(last, alone, strict=True)])} |"
        )
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=bench.DEFAULT_MODEL)
    parser.add_argument("--peers", default="b,d", help="comma-separated: b, bw, d")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--parallel", type=int, default=4)
    parser.add_argument("--n-ctx", type=int, default=4096)
    parser.add_argument("--history", type=int, default=1100, help="words of earlier turns (about 1,500 tokens)")
    parser.add_argument("--turns", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=1800.0)
    parser.add_argument("--llama-server", default=None)
    parser.add_argument("--results", type=Path, default=None, help="write turns.json and turns.md here")
    args = parser.parse_args()
    args.peers = [peer.strip() for peer in args.peers.split(",") if peer.strip()]
    unknown = set(args.peers) - {"b", "bw", "d"}
    if unknown:
        parser.error(f"unknown peers: {', '.join(sorted(unknown))}")
    return args


def main() -> int:
    args = parse_args()
    conversations: list[Conversation] = []
    with tempfile.TemporaryDirectory(prefix="bench-turns-") as tmp:
        workdir = Path(tmp)
        for round_index in range(args.rounds):
            shift = round_index % len(args.peers)
            for peer in args.peers[shift:] + args.peers[:shift]:
                print(f"round {round_index + 1}: {peer}", flush=True)
                # A fresh server per conversation: every turn 1 starts from an empty cache.
                with peer_server(peer, args, workdir) as port:
                    conversations.append(converse(peer, port, args))
    text = report(conversations, args)
    print(text)
    if args.results is not None:
        args.results.mkdir(parents=True, exist_ok=True)
        (args.results / "turns.json").write_text(
            json.dumps([asdict(c) for c in conversations], indent=1), encoding="utf-8"
        )
        (args.results / "turns.md").write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
