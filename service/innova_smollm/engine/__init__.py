"""The engine: the only package that imports llama_cpp.

- ``scheduler``: :class:`GGUFEngine`, one thread and one llama context decoding up to ``SMOLLM_PARALLEL`` requests
  in one batch per step (continuous batching); ``SMOLLM_PARALLEL=1`` is the same engine with one sequence.
- ``model``: the GGUF file, its tokens and chat template; ``sampling``: sampler chains and in-place greedy decoding.
- Pure policy, testable without llama_cpp: ``kv_cache`` (layout, which sequence a job takes), ``saved_states`` (the
  prompt cache in host memory), ``detokenize`` (UTF-8 and stop strings), ``threads`` (the decode-thread governor).
"""

from __future__ import annotations

from pathlib import Path

from innova_smollm.core.types import Engine
from innova_smollm.settings import Settings


def load_engine(settings: Settings) -> Engine:
    """Load the model named by the settings (blocking). Raises ModelLoadError with an operator-readable message."""
    from innova_smollm.engine.scheduler import GGUFEngine

    return GGUFEngine(settings)


def check_model_file(path: object) -> None:
    """Cheap pre-flight check of a model path (exists, readable, GGUF magic), without loading it."""
    from innova_smollm.engine.model import check_model_file as check

    check(Path(str(path)))
