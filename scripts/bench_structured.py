#!/usr/bin/env python3
"""Structured output side by side: constrained against free decode, on this service and on llama-server, over HTTP.

The structured workload of the structured-output issue, kept beside ``scripts/bench.py`` rather than inside it:
bench.py measures free text at fixed lengths and its report shape (one row per peer and concurrency level) has no
place for a constrained/free pair with a validity count. This script starts the same peers the same way (bench.py's
``our_service`` and ``llama_server``), on one GGUF, and sends every peer the same chat prompt through
``POST /v1/chat/completions`` (streamed, ``stream_options.include_usage``):

- constrained: ``response_format: {"type": "json_schema", ...}`` with a nested plan schema (objects, an array of
  objects, enums, required fields, numbers, a bounded string);
- free: the same prompt without it, its end tokens forbidden by ``logit_bias``, so each free answer runs to
  ``--free-tokens`` (about as long as a constrained answer) and measures plain decoding at a similar context length.

At each temperature and client count, rounds alternate which peer and which kind go first. Decode tok/s is each
answer's own: tokens after those of its first content chunk (counted by the peer's ``/tokenize``) over the time from
the first chunk to the last. ``valid`` counts constrained answers that finished with ``stop`` and validate against
the schema with ``jsonschema``, out of all constrained answers. Medians with their ranges; the ratio is constrained
over free, per peer. A loaded machine moves every figure: repeat, and compare within a run.

    .venv/bin/python scripts/bench_structured.py --rounds 6 --clients 1,4 --temperatures 0,0.8 --peers b,d
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import signal
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench  # scripts/ is not a package

PLAN_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "need": {"type": "string", "maxLength": 40},
        "priority": {"enum": ["low", "medium", "high"]},
        "budget": {"type": "number"},
        "urgent": {"type": "boolean"},
        "actions": {
            "type": "array",
            "minItems": 1,
            "maxItems": 3,
            "items": {
                "type": "object",
                "properties": {"verb": {"enum": ["call", "email", "visit"]}, "days": {"type": "integer"}},
                "required": ["verb", "days"],
                "additionalProperties": False,
            },
        },
    },
    "required": ["need", "priority", "budget", "urgent", "actions"],
    "additionalProperties": False,
}
MESSAGES = [
    {"role": "system", "content": "You plan actions for a small business. Answer in JSON."},
    {"role": "user", "content": "A bakery needs a new oven before the holidays. Propose a plan."},
]
#: SmolLM2's end tokens (<|endoftext|>, <|im_end|>), forbidden in free answers so they run to max_tokens.
FREE_LOGIT_BIAS = {"0": -100, "2": -100}


@dataclass
class Answer:
    ok: bool
    text: str = ""
    tokens: int = 0
    decode_tok_s: float = float("nan")
    finish_reason: str | None = None
    error: str | None = None


def post_json(port: int, path: str, body: dict[str, Any], timeout_s: float) -> Any:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout_s)
    try:
        connection.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        return json.loads(connection.getresponse().read())
    finally:
        connection.close()


def ask(port: int, *, constrained: bool, temperature: float, max_tokens: int, seed: int, timeout_s: float) -> Answer:
    """One streamed answer, timed from its first content chunk to its last."""
    body: dict[str, Any] = {
        "model": "bench",
        "messages": MESSAGES,
        "max_tokens": max_tokens,
        "temperature": temperature,
        "seed": seed,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if constrained:
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": "plan", "schema": PLAN_SCHEMA}}
    else:
        body["logit_bias"] = FREE_LOGIT_BIAS
    first_text = ""
    parts: list[str] = []
    first = last = None
    chunks = 0
    usage_tokens: int | None = None
    finish: str | None = None
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout_s)
    try:
        connection.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
        response = connection.getresponse()
        if response.status != 200:
            return Answer(ok=False, error=f"HTTP {response.status}: {response.read(300)!r}")
        for chunk in bench.sse_chunks(response):
            if chunk.get("usage"):
                usage_tokens = int(chunk["usage"]["completion_tokens"])
            for choice in chunk.get("choices", ()):
                content = choice.get("delta", {}).get("content")
                if content:
                    now = time.perf_counter()
                    if first is None:
                        first, first_text = now, content
                    last = now
                    chunks += 1
                    parts.append(content)
                if choice.get("finish_reason"):
                    finish = choice["finish_reason"]
    except (OSError, http.client.HTTPException, json.JSONDecodeError) as exc:
        return Answer(ok=False, error=repr(exc))
    finally:
        connection.close()
    tokens = usage_tokens if usage_tokens is not None else chunks
    answer = Answer(ok=finish in ("stop", "length"), text="".join(parts), tokens=tokens, finish_reason=finish)
    if first is not None and last is not None and last > first:
        # Tokens of the first chunk arrived before the clock started: count them (the peer's own tokenizer).
        in_first = len(post_json(port, "/tokenize", {"content": first_text}, timeout_s).get("tokens", [])) or 1
        if tokens > in_first:
            answer.decode_tok_s = (tokens - in_first) / (last - first)
    return answer


def schema_valid(answer: Answer) -> bool:
    import jsonschema  # type: ignore[import-untyped]  # the dev extra

    if answer.finish_reason != "stop":
        return False
    try:
        jsonschema.validate(json.loads(answer.text), PLAN_SCHEMA)
    except (ValueError, jsonschema.ValidationError):
        return False
    return True


@dataclass
class Cell:
    """Every answer of one peer, kind, temperature and client count."""

    answers: list[Answer]

    def speeds(self) -> list[float]:
        return [a.decode_tok_s for a in self.answers if a.ok and a.decode_tok_s == a.decode_tok_s]


def run_round(
    peer: bench.HttpPeer, clients: int, constrained: bool, temperature: float, args: argparse.Namespace, seed: int
) -> list[Answer]:
    def one(index: int) -> Answer:
        return ask(
            peer.port,
            constrained=constrained,
            temperature=temperature,
            max_tokens=args.max_tokens if constrained else args.free_tokens,
            seed=seed * 100 + index,
            timeout_s=args.request_timeout,
        )

    with ThreadPoolExecutor(max_workers=clients) as pool:
        return list(pool.map(one, range(clients)))


def spread(values: list[float]) -> str:
    if not values:
        return "n/a"
    return f"{statistics.median(values):.1f} ({min(values):.1f} to {max(values):.1f})"


def ratio_of_medians(bound: list[float], free: list[float]) -> str:
    """Constrained over free: the ratio of the medians."""
    if not bound or not free:
        return "n/a"
    return f"{statistics.median(bound) / statistics.median(free):.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=bench.DEFAULT_MODEL)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--parallel", type=int, default=4)
    parser.add_argument("--n-ctx", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--clients", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4])
    parser.add_argument("--temperatures", type=lambda s: [float(x) for x in s.split(",")], default=[0.0, 0.8])
    parser.add_argument("--max-tokens", type=int, default=256, help="constrained answers' limit (room to finish)")
    parser.add_argument("--free-tokens", type=int, default=96, help="length of every free answer")
    parser.add_argument("--peers", type=lambda s: s.split(","), default=["b", "d"], help="b: ours, d: llama-server")
    parser.add_argument("--llama-server", help="path of the llama-server binary (default: search)")
    parser.add_argument("--request-timeout", type=float, default=300.0)
    parser.add_argument("--out", type=Path, default=bench.RAW_DIR, help="servers' logs and the raw answers")
    args = parser.parse_args()
    # A terminated run still stops the servers it started (the ExitStack's exits run on SystemExit).
    signal.signal(signal.SIGTERM, lambda _signum, _frame: sys.exit(143))
    args.concurrency = args.clients
    args.llama_server_arg = []
    args.out.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        peers: list[bench.HttpPeer] = []
        for key in args.peers:
            if key == "b":
                peers.append(stack.enter_context(bench.our_service("b", args.parallel, args)))
            elif key == "d":
                peers.append(stack.enter_context(bench.llama_server(args)))
            else:
                parser.error(f"unknown peer {key!r} (b or d)")
        for peer in peers:  # warm-up: first requests load caches and threads
            run_round(peer, 1, True, 0.0, args, 0)
            run_round(peer, 1, False, 0.0, args, 0)
        print(
            f"{args.model.name}, {args.threads} threads, {args.parallel} sequences/slots, max_tokens "
            f"{args.max_tokens} (free answers: {args.free_tokens} tokens), {args.rounds} alternating rounds; "
            "decode tok/s per answer: median (range)"
        )
        print("| peer | T | clients | free tok/s | constrained tok/s | constrained/free | valid / constrained |")
        print("|---|---|---|---|---|---|---|")
        raw: list[dict[str, Any]] = []
        for temperature in args.temperatures:
            for clients in args.clients:
                cells = {(p.key, c): Cell([]) for p in peers for c in (True, False)}
                for round_index in range(args.rounds):
                    shift = round_index % len(peers)  # each round starts one peer further along
                    order = peers[shift:] + peers[:shift]
                    kinds = (True, False) if round_index % 2 == 0 else (False, True)
                    for peer in order:
                        for constrained in kinds:
                            answers = run_round(peer, clients, constrained, temperature, args, round_index + 1)
                            cells[(peer.key, constrained)].answers.extend(answers)
                for peer in peers:
                    bound, free = cells[(peer.key, True)], cells[(peer.key, False)]
                    good = sum(schema_valid(a) for a in bound.answers)
                    print(f"| {peer.name} | {temperature} | {clients} | {spread(free.speeds())} | "
                          f"{spread(bound.speeds())} | {ratio_of_medians(bound.speeds(), free.speeds())} | "
                          f"{good}/{len(bound.answers)} |")  # fmt: skip
                    for constrained, cell in ((True, bound), (False, free)):
                        raw.extend(
                            {"peer": peer.key, "temperature": temperature, "clients": clients,
                             "constrained": constrained, **vars(a)}
                            for a in cell.answers
                        )  # fmt: skip
                sys.stdout.flush()
        stamp = time.strftime("%Y%m%d-%H%M%S")
        (args.out / f"structured-{stamp}.json").write_text(json.dumps(raw, indent=1))


if __name__ == "__main__":
    main()
