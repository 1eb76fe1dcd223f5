#!/usr/bin/env python3
"""Decode speed of llama.cpp's attention variants, side by side in one process: flash attention on or off, one KV
cache shared by all sequences (``kv_unified``, what GGUFEngine uses) or one per sequence.

Each configuration gets its own context; the configurations take turns for ``--rounds`` rounds and the table shows
medians. Every step decodes one token for each of ``--sequences`` sequences whose prompts hold ``--context``
tokens, so the attention product is what changes between rows. It informed ``SMOLLM_FLASH_ATTN=auto``: on for the
shared cache of several sequences, off for one sequence on the CPU.

    .venv/bin/python scripts/bench_attention.py --context 40 --context 800 --sequences 1 --sequences 4
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

import llama_cpp

REPO = Path(__file__).resolve().parents[1]
PREFILL_CHUNK = 400


def _ignore_log(level: int, text: bytes, user_data: Any) -> None:
    """llama.cpp's context logs would bury the table."""


#: Kept at module level so ctypes never frees the callback while llama.cpp holds it.
_quiet: Any = llama_cpp.llama_log_callback(_ignore_log)


def _context(model: Any, *, unified: bool, flash: bool, sequences: int, window: int, threads: int) -> Any:
    params = llama_cpp.llama_context_default_params()
    # The same memory either way: one pool of window x sequences cells, or one window per sequence.
    params.n_ctx = window * sequences
    params.n_batch = params.n_ubatch = 512
    params.n_seq_max = params.n_outputs_max = sequences
    params.n_threads = params.n_threads_batch = threads
    params.kv_unified = unified
    params.no_perf = True
    params.flash_attn_type = (
        llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
    )
    return llama_cpp.llama_init_from_model(model, params)


def _put(batch: Any, index: int, token: int, position: int, seq_id: int, logits: bool) -> None:
    batch.token[index], batch.pos[index], batch.n_seq_id[index] = token, position, 1
    batch.seq_id[index][0], batch.logits[index] = seq_id, int(logits)


def _decode_rate(ctx: Any, batch: Any, *, sequences: int, context: int, steps: int) -> float:
    llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
    for seq_id in range(sequences):
        for start in range(0, context, PREFILL_CHUNK):
            count = min(context, start + PREFILL_CHUNK) - start
            for offset in range(count):
                _put(batch, offset, 100 + (start + offset) % 50, start + offset, seq_id, offset == count - 1)
            batch.n_tokens = count
            if llama_cpp.llama_decode(ctx, batch) != 0:
                raise RuntimeError("prefill failed")
    started = time.perf_counter()
    for step in range(steps):
        for seq_id in range(sequences):
            _put(batch, seq_id, 200, context + step, seq_id, True)
        batch.n_tokens = sequences
        if llama_cpp.llama_decode(ctx, batch) != 0:
            raise RuntimeError("decode failed")
    return sequences * steps / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=REPO / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--context", type=int, action="append", help="prompt tokens per sequence (repeatable)")
    parser.add_argument("--sequences", type=int, action="append", help="sequences per step (repeatable)")
    parser.add_argument("--steps", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    llama_cpp.llama_backend_init()
    llama_cpp.llama_log_set(_quiet, None)
    model = llama_cpp.llama_model_load_from_file(str(args.model).encode(), llama_cpp.llama_model_default_params())
    if not model:
        raise SystemExit(f"cannot load {args.model}")
    batch = llama_cpp.llama_batch_init(512, 0, 1)
    print(f"{args.model.name}, {args.threads} threads, {args.steps} steps, median of {args.rounds} rounds (tok/s)")
    columns = ("unified, flash on", "unified, flash off", "per sequence, flash on", "per sequence, flash off")
    print("| sequences | context | " + " | ".join(columns) + " |")
    print("|---|---|---|---|---|---|")
    for sequences in args.sequences or [1, 4]:
        for context in args.context or [40, 800]:
            window = -(-(context + args.steps + 1) // 256) * 256
            variants = [(unified, flash) for unified in (True, False) for flash in (True, False)]
            contexts = [
                _context(model, unified=u, flash=f, sequences=sequences, window=window, threads=args.threads)
                for u, f in variants
            ]
            rates: list[list[float]] = [[] for _ in variants]
            for _ in range(args.rounds):
                for index, ctx in enumerate(contexts):
                    rates[index].append(
                        _decode_rate(ctx, batch, sequences=sequences, context=context, steps=args.steps)
                    )
            for ctx in contexts:
                llama_cpp.llama_free(ctx)
            cells_text = " | ".join(f"{statistics.median(r):.1f}" for r in rates)
            print(f"| {sequences} | {context} | {cells_text} |", flush=True)
    llama_cpp.llama_batch_free(batch)
    llama_cpp.llama_model_free(model)


if __name__ == "__main__":
    main()
