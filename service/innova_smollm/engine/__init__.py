"""The engine: the only package that imports llama_cpp.

- ``scheduler``: :class:`GGUFEngine`, one thread and one llama context decoding up to ``SMOLLM_PARALLEL`` requests
  in one batch per step (continuous batching); ``SMOLLM_PARALLEL=1`` is the same engine with one sequence.
- ``model``: the GGUF file, its tokens and chat template; ``sampling``: sampler chains and in-place greedy decoding;
  ``sequences``: the state of each admitted job (and of the ``n`` choices of one).
- Pure policy, testable without llama_cpp: ``kv_cache`` (layout, which sequence a job takes), ``step_size`` (tokens
  per llama_decode call), ``saved_states`` (the prompt cache in host memory), ``detokenize`` (UTF-8 and stop
  strings), ``threads`` (the decode-thread governor).
"""

from __future__ import annotations

import logging
from pathlib import Path

from innova_smollm.core.process_memory import (
    huge_pages_advice,
    read_memory,
    release_free_heap,
    transparent_huge_pages_mode,
)
from innova_smollm.core.types import Engine
from innova_smollm.settings import Settings

log = logging.getLogger(__name__)


def load_engine(settings: Settings) -> Engine:
    """Load the model named by the settings (blocking). Raises ModelLoadError with an operator-readable message."""
    from innova_smollm.engine.scheduler import GGUFEngine

    engine = GGUFEngine(settings)
    released = release_free_heap()  # what loading freed, now that the warm prompts are in too (start-up is over)
    if released is not None:
        mb = released // 2**20
        log.info("start-up heap trimmed: %d MiB released", mb, extra={"event": "heap_trimmed", "mb": mb})
    report_huge_pages()
    return engine


def report_huge_pages() -> None:
    """Log how much of the process sits in huge pages once the weights are in, and what to change when none do
    though they could (core/process_memory.py says why it matters)."""
    mode = transparent_huge_pages_mode()
    huge_mb = round(read_memory().get("anon_huge_pages", 0.0) / 2**20)
    log.info("huge pages: %d MiB (kernel THP mode %s)", huge_mb, mode, extra={"event": "huge_pages", "mb": huge_mb})
    advice = huge_pages_advice(mode)
    if advice is not None:
        log.warning(advice, extra={"event": "huge_pages_off"})


def check_model_file(path: object) -> None:
    """Cheap pre-flight check of a model path (exists, readable, GGUF magic), without loading it."""
    from innova_smollm.engine.model import check_model_file as check

    check(Path(str(path)))
