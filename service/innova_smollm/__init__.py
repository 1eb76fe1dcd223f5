"""innova-smollm: a local GGUF chat model served for the KORYXA backend.

Importing the package is cheap (no llama_cpp, no litestar), so the client and the health check stay light.
``get_smollm_model()`` loads the model in this process on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"

if TYPE_CHECKING:
    from innova_smollm.inprocess import SmolLMModel

__all__ = ["__version__", "get_smollm_model"]


def get_smollm_model() -> SmolLMModel:
    """The process-wide model, loaded once (thread-safe) from the environment's settings."""
    from innova_smollm.inprocess import get_smollm_model as get

    return get()
