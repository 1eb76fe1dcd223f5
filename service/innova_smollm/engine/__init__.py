"""Model engines. Everything that imports llama_cpp lives in this package, and nowhere else."""

from __future__ import annotations

from innova_smollm.generation import Engine
from innova_smollm.settings import Settings


def load_engine(settings: Settings) -> Engine:
    """Load the model named by the settings (blocking). Raises ModelLoadError with an operator-readable message."""
    if settings.parallel > 1:
        # Continuous batching: up to `parallel` requests decode together in one llama.cpp batch.
        from innova_smollm.engine.batched import BatchedLlamaEngine

        return BatchedLlamaEngine(settings)
    from innova_smollm.engine.llama import LlamaEngine

    return LlamaEngine(settings)


def check_model_file(path: object) -> None:
    """Cheap pre-flight check of a model path (exists, readable, GGUF magic), without loading it."""
    from pathlib import Path

    from innova_smollm.engine.llama import check_model_file as check

    check(Path(str(path)))
