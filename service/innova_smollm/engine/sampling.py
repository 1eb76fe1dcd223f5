"""Sampling: each sequence's llama.cpp sampler chain, and greedy decoding read in place from the logits.

Sequences sample in C from their own chain, reading their own row of the batch's logits, so no logits reach Python;
greedy decoding without penalties skips the chain and takes the argmax of the row where llama.cpp wrote it.
"""

from __future__ import annotations

import ctypes
import random
from collections.abc import Callable
from typing import Any

import llama_cpp
import numpy as np

from innova_smollm.core.types import SamplingParams
from innova_smollm.errors import GenerationError

#: Tokens of history the repeat penalty looks at (llama-cpp-python's default ``last_n_tokens_size``).
PENALTY_LAST_N = 64


def _bind_logits_address() -> Callable[[Any, int], int | None]:
    """``llama_get_logits_ith`` answering the row's address as an int (None for no row) and keeping the GIL.

    llama_cpp's binding answers a float pointer, which takes three more objects to turn into an array, and releases
    and retakes the GIL around a call that only does pointer arithmetic. Between two decodes every object counts:
    the decode has just evicted the interpreter's data from the CPU caches (see LogitRows).
    """
    function = ctypes.cast(llama_cpp.llama_get_logits_ith, ctypes.c_void_p).value
    if function is None:
        raise ImportError("llama_cpp's library has no llama_get_logits_ith")
    bound: Callable[[Any, int], int | None] = ctypes.PYFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int32)(
        function
    )
    return bound


_logits_address = _bind_logits_address()


class LogitRows:
    """Greedy decoding without penalties: the token with the highest logit in a row of the batch, read in place.

    Why not llama.cpp's greedy sampler: it first copies the whole vocabulary into a candidate array, on every token,
    right after a decode has evicted it from the caches; numpy's argmax over the row where llama.cpp wrote it reads
    it once. Both take the first of equal highest logits, so they pick the same token.
    A row's array is kept by address: llama.cpp writes each step's logits into the same buffer, so after the
    first steps no object is made per token.
    """

    #: More distinct addresses than this (llama.cpp moved its output buffer) and the kept arrays start over.
    MAX_KEPT_ROWS = 64

    def __init__(self, ctx: Any, n_vocab: int) -> None:
        self._ctx = ctx
        self._row_type = ctypes.c_float * n_vocab
        self._rows: dict[int, np.ndarray[Any, np.dtype[np.float32]]] = {}

    def highest(self, batch_index: int) -> int:
        """The token with the highest logit in row ``batch_index`` of the last decode (the first of equals)."""
        address = _logits_address(self._ctx, batch_index)
        row = self._rows.get(address or 0)
        if row is None:
            if not address:
                raise GenerationError(f"llama.cpp has no logits for batch row {batch_index}")
            if len(self._rows) >= self.MAX_KEPT_ROWS:
                self._rows.clear()
            row = self._rows[address] = np.frombuffer(memoryview(self._row_type.from_address(address)), np.float32)
        return int(row.argmax())


def new_sampler(sampling: SamplingParams) -> Any | None:
    """A request's llama.cpp sampler chain, or None for greedy decoding without penalties (see LogitRows)."""
    if sampling.greedy and sampling.repeat_penalty == 1.0:
        return None
    chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
    if sampling.repeat_penalty != 1.0:
        llama_cpp.llama_sampler_chain_add(
            chain, llama_cpp.llama_sampler_init_penalties(PENALTY_LAST_N, sampling.repeat_penalty, 0.0, 0.0)
        )
    if sampling.greedy:
        llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_greedy())
        return chain
    # Same order as llama-cpp-python's Llama sampler, so a seeded request samples from the same distribution.
    seed = sampling.seed if sampling.seed is not None else random.randrange(2**31)
    llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_top_k(sampling.top_k))
    llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_top_p(sampling.top_p, 1))
    llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_min_p(sampling.min_p, 1))
    llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_temp(sampling.temperature))
    llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_dist(seed))
    return chain
