"""The memory the service may hold: the model file + its KV cache + a fixed margin (issue 21).

Why this rule: the weights are read, not mapped (``SMOLLM_USE_MMAP=false``), so they are resident once, about the
file's size (llama.cpp's CPU backend repacks Q4_K tensors for its AVX2 kernels as it reads them, in place of the
plain copy, not beside it). The KV cache is allocated whole when the engine starts: ``n_ctx`` cells shared by all
sequences, or ``n_ctx`` cells per sequence (``SMOLLM_KV_LAYOUT``, engine/kv_cache.py). The prompt cache's saved KV
states (``SMOLLM_PROMPT_CACHE_MB``, warm prompts included) grow up to their limit under load: a budget without them
would let a busy service be killed for a cache it was told to keep. Everything else (llama.cpp's compute buffers, the
Python interpreter, Litestar and uvicorn, requests in flight) must fit in the margin.

The role innova_backend sets the unit's ``MemoryMax`` to this budget (``innova-smollm memory-budget``), and
docs/performance.md gives the measured figures against it. No llama.cpp here: the engine supplies the KV bytes.
"""

from __future__ import annotations

import dataclasses

from innova_smollm.settings import KVLayout

#: What the process may hold besides the weights and the KV cache: 150 MB (decimal, as the issue states it).
MARGIN_BYTES = 150 * 1000 * 1000
MIB = 2**20


@dataclasses.dataclass(frozen=True)
class MemoryBudget:
    """One model at one setting: each part of the budget in bytes, and the whole."""

    model_file_bytes: int
    kv_layout: KVLayout
    n_ctx: int
    parallel: int
    kv_bytes_per_cell: int
    #: The prompt cache's limit for KV states saved in host memory (0 with the prompt cache off).
    saved_states_bytes: int = 0
    margin_bytes: int = MARGIN_BYTES

    @property
    def kv_cells(self) -> int:
        """Cells the engine allocates: one window shared by all sequences, or one window per sequence."""
        return self.n_ctx * (self.parallel if self.kv_layout is KVLayout.PER_SEQUENCE else 1)

    @property
    def kv_bytes(self) -> int:
        return self.kv_cells * self.kv_bytes_per_cell

    @property
    def total_bytes(self) -> int:
        return self.model_file_bytes + self.kv_bytes + self.saved_states_bytes + self.margin_bytes

    def systemd_memory_max(self) -> str:
        """The budget as a systemd ``MemoryMax=`` value: whole MiB, rounded up."""
        return f"{-(-self.total_bytes // MIB)}M"

    def as_dict(self) -> dict[str, int | str]:
        return {
            "model_file_bytes": self.model_file_bytes,
            "n_ctx": self.n_ctx,
            "parallel": self.parallel,
            "kv_layout": self.kv_layout.value,
            "kv_bytes_per_cell": self.kv_bytes_per_cell,
            "kv_cells": self.kv_cells,
            "kv_bytes": self.kv_bytes,
            "saved_states_bytes": self.saved_states_bytes,
            "margin_bytes": self.margin_bytes,
            "budget_bytes": self.total_bytes,
            "memory_max": self.systemd_memory_max(),
        }
