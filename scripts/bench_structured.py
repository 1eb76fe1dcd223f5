#!/usr/bin/env python3
"""Constrained against free decode speed on our engine, in-process (no HTTP): the cost of the grammar sampler.

Each round runs the same chat prompt with ``clients`` concurrent requests, once constrained by a nested JSON schema
(objects, an array, enums, required fields, numbers, a bounded string) and once free, alternating which goes first.
Decode tok/s is each answer's own (tokens after the first over the time after the first token), median over all
answers; ``valid`` counts constrained answers that finished with ``stop`` and validate against the schema.

    PYTHONPATH=service python scripts/bench_structured.py --rounds 10 --clients 1,4

This is not the side-by-side benchmark: ``scripts/bench.py`` compares peers over HTTP.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from innova_smollm.core.schema import json_schema_constraint
from innova_smollm.core.service import ModelService, Outcome, RequestOptions
from innova_smollm.core.types import ChatMessage, FinishReason
from innova_smollm.engine.scheduler import GGUFEngine
from innova_smollm.settings import Settings

DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"

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
PROMPT = [
    ChatMessage(role="system", content="You plan actions for a small business. Answer in JSON."),
    ChatMessage(role="user", content="A bakery needs a new oven before the holidays. Propose a plan."),
]


def valid(outcome: Outcome) -> bool:
    if outcome.finish_reason is not FinishReason.STOP:
        return False
    try:
        import jsonschema  # type: ignore[import-untyped]  # the dev extra

        jsonschema.validate(json.loads(outcome.text), PLAN_SCHEMA)
    except (ValueError, jsonschema.ValidationError):
        return False
    return True


def run(service: ModelService, clients: int, constrained: bool, args: argparse.Namespace, seed: int) -> list[Outcome]:
    def one(index: int) -> Outcome:
        options = RequestOptions(
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            seed=seed * 100 + index,
            constraint=json_schema_constraint(PLAN_SCHEMA, field="schema") if constrained else None,
        )
        return service.run_blocking(service.prepare_chat(PROMPT, options))

    with ThreadPoolExecutor(max_workers=clients) as pool:
        return list(pool.map(one, range(clients)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--parallel", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--clients", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4])
    parser.add_argument("--max-tokens", type=int, default=160)
    parser.add_argument("--temperature", type=float, default=0.8)
    args = parser.parse_args()
    settings = Settings.from_env(
        {
            "SMOLLM_MODEL_PATH": str(args.model),
            "SMOLLM_N_THREADS": str(args.threads),
            "SMOLLM_PARALLEL": str(args.parallel),
            "SMOLLM_N_CTX": "1024",
        }
    )
    engine = GGUFEngine(settings)
    service = ModelService(settings, engine=engine)
    try:
        run(service, 1, True, args, 0)  # warm-up
        print(f"T={args.temperature}, {args.rounds} alternating rounds, median decode tok/s per answer")
        print("| clients | free tok/s | constrained tok/s | ratio | valid / all constrained |")
        print("|---|---|---|---|---|")
        for clients in args.clients:
            speeds: dict[bool, list[float]] = {True: [], False: []}
            finished = good = 0
            for round_index in range(args.rounds):
                order = (True, False) if round_index % 2 == 0 else (False, True)
                for constrained in order:
                    for outcome in run(service, clients, constrained, args, round_index):
                        if outcome.tokens_per_second is not None:
                            speeds[constrained].append(outcome.tokens_per_second)
                        if constrained:
                            finished += 1
                            good += valid(outcome)
            free, bound = statistics.median(speeds[False]), statistics.median(speeds[True])
            print(f"| {clients} | {free:.1f} | {bound:.1f} | {bound / free:.3f} | {good}/{finished} |")
            sys.stdout.flush()
    finally:
        engine.close()


if __name__ == "__main__":
    main()
