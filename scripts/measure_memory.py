#!/usr/bin/env python3
"""Resident memory, load time and decode speed of a GGUF under llama.cpp's ways of loading weights.

Each measurement runs in a fresh process (resident memory is per process), through llama-cpp-python's low-level
API as an engine does: ``llama_model_load_from_file`` with a load mode, ``llama_init_from_model`` with a context,
a short prompt, then ``--tokens`` greedy decode steps of one sequence. ``/proc/self/status`` (VmRSS, RssAnon,
RssFile, VmHWM) is read after the load and after the generation. The settings alternate in a rotated order,
``--rounds`` times, and the table gives each figure's median and range (the machines are noisy).

Load modes (llama.cpp's ``llama_model_params.load_mode``; ``Llama(use_mmap=, use_mlock=)`` maps onto the first
four, and ``direct-io`` is reachable only through the low-level API):
- ``mmap``: map the file; the CPU backend repacks Q4_K into an anonymous copy for its AVX2 kernels, and the mapped
  pages it read stay resident as page cache too (RssFile).
- ``no-mmap``: read the file into anonymous buffers (the repacked tensors are read straight into their copy).
- ``mmap-mlock`` / ``mlock``: as above, and mlock() the weights.
- ``direct-io``: read with O_DIRECT, bypassing the page cache.
``-norepack`` adds ``use_extra_bufts = false``: no repacked copy, the kernels read the Q4_K tensors in place.
``/4seq`` adds ``n_seq_max = 4, kv_unified = true`` (the batched engine's context; still one decoding sequence).

Decode speed needs a quiet machine: when more threads are runnable than there are cores, OpenMP's spinning
workers make llama.cpp's decode 5-10x slower (0.3 instead of 1.9 tok/s for this shape at a load average of 8 on
2 cores). ``OMP_WAIT_POLICY=PASSIVE`` in the environment (the children inherit it) compares the settings more
fairly then; the memory figures do not depend on it.

``--cold`` adds rounds where the model's pages are first dropped from the page cache (posix_fadvise DONTNEED on the
file: only this file, and only pages no other process maps; the host's disk cache may still be warm: "cold-ish").

Example (the production shape, ``scripts/fetch_model.py llama32-3b-shape``)::

    .venv/bin/python scripts/measure_memory.py --rounds 5 --cold \\
        --settings mmap,no-mmap,mmap-norepack,direct-io,mmap-mlock,mmap/4seq,no-mmap/4seq
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = REPO_ROOT / "models" / "Llama-3.2-3B-Instruct-shape.Q4_K_M.gguf"
PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."
STATUS_KEYS = ("VmRSS", "RssAnon", "RssFile", "RssShmem", "VmHWM", "VmLck")
MIB = 1 << 20
#: The issue's target: resident <= the model file + the KV cache + this margin.
MARGIN_BYTES = 150 * 1000 * 1000
KV_BYTES_PER_CELL_F16 = 2  # bytes per K or V value at llama.cpp's default cache type


@dataclass(frozen=True)
class Setting:
    name: str
    load_mode: str  # a key of LOAD_MODES
    repack: bool = True
    n_seq_max: int = 1
    kv_unified: bool = False


LOAD_MODES = {"none": 0, "mmap": 1, "mlock": 2, "mmap-mlock": 3, "direct-io": 4}


def parse_setting(name: str) -> Setting:
    base, _, suffix = name.partition("/")
    if suffix not in ("", "4seq"):
        raise ValueError(f"unknown suffix /{suffix} in {name!r} (only /4seq)")
    repack = not base.endswith("-norepack")
    mode = base.removesuffix("-norepack")
    mode = "none" if mode == "no-mmap" else mode
    if mode not in LOAD_MODES:
        raise ValueError(f"unknown load mode in {name!r}; known: mmap, no-mmap, mlock, mmap-mlock, direct-io")
    four = suffix == "4seq"
    return Setting(name, mode, repack, n_seq_max=4 if four else 1, kv_unified=four)


def read_status() -> dict[str, int]:
    """The memory lines of /proc/self/status, in bytes."""
    values = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in STATUS_KEYS:
            values[key] = int(rest.split()[0]) * 1024
    return values


def drop_from_page_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def page_cache_share(path: Path) -> float | None:
    """Share of the file in the page cache, by util-linux's fincore (None when it is missing)."""
    try:
        out = subprocess.run(
            ["fincore", "--bytes", "--noheadings", "--output", "RES,SIZE", str(path)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        return None
    return int(out[0]) / max(int(out[1]), 1)


def measure(model_path: Path, setting: Setting, *, n_ctx: int, threads: int, tokens: int, cold: bool) -> dict[str, Any]:
    """One measurement, in this process (the parent runs each in a fresh one)."""
    import llama_cpp
    import numpy as np

    llama_cpp.llama_backend_init()
    if cold:
        drop_from_page_cache(model_path)
    cached = page_cache_share(model_path)
    baseline = read_status()
    started = time.perf_counter()
    model_params = llama_cpp.llama_model_default_params()
    model_params.load_mode = LOAD_MODES[setting.load_mode]
    model_params.use_extra_bufts = setting.repack
    model = llama_cpp.llama_model_load_from_file(str(model_path).encode(), model_params)
    if not model:
        raise SystemExit(f"{setting.name}: the model did not load")
    context_params = llama_cpp.llama_context_default_params()
    context_params.n_ctx = n_ctx
    context_params.n_batch = context_params.n_ubatch = 512
    context_params.n_seq_max = setting.n_seq_max
    context_params.kv_unified = setting.kv_unified
    context_params.n_threads = context_params.n_threads_batch = threads
    ctx = llama_cpp.llama_init_from_model(model, context_params)
    if not ctx:
        raise SystemExit(f"{setting.name}: no context")
    load_s = time.perf_counter() - started
    after_load = read_status()

    vocab = llama_cpp.llama_model_get_vocab(model)
    n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
    text = PROMPT.encode()
    buffer = (llama_cpp.llama_token * (len(text) + 8))()
    n_prompt = llama_cpp.llama_tokenize(vocab, text, len(text), buffer, len(buffer), True, False)

    batch = llama_cpp.llama_batch_init(max(n_prompt, 1), 0, 1)
    position = 0

    def decode(batch_tokens: list[int]) -> int:
        # As the batched engine fills its batch: explicit positions, sequence 0, logits for the last row only.
        nonlocal position
        for i, token in enumerate(batch_tokens):
            batch.token[i] = token
            batch.pos[i] = position + i
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = i == len(batch_tokens) - 1
        batch.n_tokens = len(batch_tokens)
        if llama_cpp.llama_decode(ctx, batch) != 0:
            raise SystemExit(f"{setting.name}: llama_decode failed")
        position += len(batch_tokens)
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, len(batch_tokens) - 1), shape=(n_vocab,))
        return int(logits.argmax())  # greedy; random weights: the tokens are noise, their cost is not

    prefill_started = time.perf_counter()
    token = decode(list(buffer[:n_prompt]))
    prefill_s = time.perf_counter() - prefill_started
    cpu_started = time.process_time()
    decode_started = time.perf_counter()
    for _ in range(tokens):
        token = decode([token])
    decode_s = time.perf_counter() - decode_started
    # CPU time of all threads: with OMP_WAIT_POLICY=PASSIVE (no spinning) the work per token, which a busy machine
    # stretches far less than it stretches the wall time.
    decode_cpu_ms = (time.process_time() - cpu_started) * 1000 / tokens
    after_gen = read_status()
    # A short generation touches a few KV cells only, and untouched pages of the KV buffer are not resident yet.
    # Clearing the cache with data=true writes every byte of it: the resident size of a full context.
    llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
    after_kv_clear = read_status()
    n_layer = llama_cpp.llama_model_n_layer(model)
    head_dim = llama_cpp.llama_model_n_embd(model) // llama_cpp.llama_model_n_head(model)
    kv_bytes = n_ctx * n_layer * llama_cpp.llama_model_n_head_kv(model) * 2 * head_dim * KV_BYTES_PER_CELL_F16
    llama_cpp.llama_batch_free(batch)
    llama_cpp.llama_free(ctx)
    llama_cpp.llama_model_free(model)
    return {
        "setting": setting.name,
        "cold": cold,
        "page_cache_before": cached,
        "load_s": load_s,
        "prefill_tokens": n_prompt,
        "prefill_tok_s": n_prompt / prefill_s,
        "decode_tok_s": tokens / decode_s,
        "decode_cpu_ms_per_token": decode_cpu_ms,
        "baseline": baseline,
        "after_load": after_load,
        "after_gen": after_gen,
        "after_kv_clear": after_kv_clear,
        "file_bytes": model_path.stat().st_size,
        "kv_bytes": kv_bytes,
        "loadavg_1m": os.getloadavg()[0],
        "system_info": llama_cpp.llama_print_system_info().decode(errors="replace").strip(),
        "llama_cpp_python": llama_cpp.__version__,
    }


def run_child(args: argparse.Namespace, setting: str, cold: bool) -> dict[str, Any]:
    argv = [sys.executable, __file__, "--child", setting, "--model", str(args.model), "--n-ctx", str(args.n_ctx)]
    argv += ["--threads", str(args.threads), "--tokens", str(args.tokens)] + (["--cold"] if cold else [])
    result = subprocess.run(argv, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SystemExit(f"{setting}{' (cold)' if cold else ''} failed:\n{result.stderr[-3000:]}")
    sample: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    return sample


def _median_range(values: list[float], fmt: str) -> str:
    if not values:
        return "-"
    middle = format(statistics.median(values), fmt)
    return middle if len(values) == 1 else f"{middle} ({format(min(values), fmt)}-{format(max(values), fmt)})"


def table(samples: list[dict[str, Any]], settings: list[str]) -> str:
    head = (
        "| setting | load s, warm | load s, cold-ish | after load: RSS / RssAnon / RssFile MiB "
        "| after gen: RSS / RssAnon / RssFile MiB | KV written: RSS MiB | decode tok/s | decode CPU ms/token "
        "| prefill tok/s "
        "| budget MiB | KV written: RSS - budget MiB |"
    )
    lines = [head, "|" + "---|" * 11]
    for name in settings:
        warm = [s for s in samples if s["setting"] == name and not s["cold"]]
        cold = [s for s in samples if s["setting"] == name and s["cold"]]
        both = warm + cold
        if not both:
            continue

        def mib(stage: str, key: str, group: list[dict[str, Any]] = both) -> list[float]:
            return [s[stage][key] / MIB for s in group]

        budget = (both[0]["file_bytes"] + both[0]["kv_bytes"] + MARGIN_BYTES) / MIB
        over = [rss - budget for rss in mib("after_kv_clear", "VmRSS")]
        memory = {
            stage: " / ".join(_median_range(mib(stage, key), ".0f") for key in ("VmRSS", "RssAnon", "RssFile"))
            for stage in ("after_load", "after_gen")
        }
        lines.append(
            f"| {name} | {_median_range([s['load_s'] for s in warm], '.2f')} "
            f"| {_median_range([s['load_s'] for s in cold], '.2f')} | {memory['after_load']} | {memory['after_gen']} "
            f"| {_median_range(mib('after_kv_clear', 'VmRSS'), '.0f')} "
            f"| {_median_range([s['decode_tok_s'] for s in warm], '.2f')} "
            f"| {_median_range([s['decode_cpu_ms_per_token'] for s in warm], '.0f')} "
            f"| {_median_range([s['prefill_tok_s'] for s in warm], '.1f')} | {budget:.0f} "
            f"| {_median_range(over, '+.0f')} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--settings", default="mmap,no-mmap", help="comma-separated (default: mmap,no-mmap)")
    parser.add_argument("--rounds", type=int, default=3, help="warm rounds per setting (default 3)")
    parser.add_argument("--cold", action="store_true", help="also as many cold-ish rounds (page cache dropped)")
    parser.add_argument("--n-ctx", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=32, help="greedy decode steps after the prompt (default 32)")
    parser.add_argument("--json", type=Path, default=None, help="also write every sample here")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        sample = measure(
            args.model.resolve(),
            parse_setting(args.child),
            n_ctx=args.n_ctx,
            threads=args.threads,
            tokens=args.tokens,
            cold=args.cold,
        )
        print(json.dumps(sample))
        return 0
    settings = [name.strip() for name in args.settings.split(",") if name.strip()]
    for name in settings:
        parse_setting(name)  # fail before the first minute is spent
    if not args.model.exists():
        parser.error(f"{args.model} is missing: run .venv/bin/python scripts/fetch_model.py llama32-3b-shape")
    samples: list[dict[str, Any]] = []
    plan = [(r, False) for r in range(args.rounds)] + ([(r, True) for r in range(args.rounds)] if args.cold else [])
    for round_index, cold in plan:
        order = settings[round_index % len(settings) :] + settings[: round_index % len(settings)]
        for name in order:
            sample = run_child(args, name, cold)
            samples.append(sample)
            after = sample["after_gen"]
            print(
                f"round {round_index + 1}{' cold-ish' if cold else ''} {name}: load {sample['load_s']:.2f} s, "
                f"RSS {after['VmRSS'] / MIB:.0f} MiB (anon {after['RssAnon'] / MIB:.0f}, file "
                f"{after['RssFile'] / MIB:.0f}), decode {sample['decode_tok_s']:.2f} tok/s "
                f"({sample['decode_cpu_ms_per_token']:.0f} CPU ms/token), "
                f"page cache before {sample['page_cache_before']}, load average {sample['loadavg_1m']:.1f}",
                flush=True,
            )
    if args.json:
        args.json.write_text(json.dumps(samples, indent=1))
    first = samples[0]
    print(
        f"\n{args.model.name}: {first['file_bytes']:,} bytes; n_ctx {args.n_ctx}: "
        f"KV {first['kv_bytes'] / MIB:.0f} MiB; "
        f"{args.threads} threads, {args.tokens} tokens; budget = file + KV + 150 MB; medians (ranges)\n"
    )
    print(f"llama-cpp-python {first['llama_cpp_python']}: {first['system_info']}\n")
    print(table(samples, settings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
