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
        return int(self.row(batch_index).argmax())

    def row(self, batch_index: int) -> np.ndarray[Any, np.dtype[np.float32]]:
        """Row ``batch_index`` of the last decode's logits, as an array over llama.cpp's buffer (no copy)."""
        address = _logits_address(self._ctx, batch_index)
        row = self._rows.get(address or 0)
        if row is None:
            if not address:
                raise GenerationError(f"llama.cpp has no logits for batch row {batch_index}")
            if len(self._rows) >= self.MAX_KEPT_ROWS:
                self._rows.clear()
            row = self._rows[address] = np.frombuffer(memoryview(self._row_type.from_address(address)), np.float32)
        return row


def new_sampler(sampling: SamplingParams, n_vocab: int) -> Any | None:
    """A request's llama.cpp sampler chain, or None for greedy decoding without penalties or biases (see LogitRows).

    The order is llama.cpp's (common_sampler): logit biases, penalties, then top-k, top-p, min-p, temperature and
    the draw; greedy ends with the argmax instead.
    """
    if sampling.plain_greedy:
        return None
    chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
    if sampling.logit_bias:
        biases = (llama_cpp.llama_logit_bias * len(sampling.logit_bias))(
            *(llama_cpp.llama_logit_bias(token, bias) for token, bias in sampling.logit_bias)
        )
        # llama.cpp copies the biases into the sampler: the array may go once it is made.
        llama_cpp.llama_sampler_chain_add(
            chain, llama_cpp.llama_sampler_init_logit_bias(n_vocab, len(sampling.logit_bias), biases)
        )
    if sampling.penalised:
        llama_cpp.llama_sampler_chain_add(
            chain,
            llama_cpp.llama_sampler_init_penalties(
                n_vocab,
                PENALTY_LAST_N,
                sampling.repeat_penalty,
                sampling.frequency_penalty,
                sampling.presence_penalty,
            ),
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


def new_grammar(vocab: Any, grammar: str) -> Any | None:
    """llama.cpp's grammar sampler for a GBNF text with root rule ``root``; None when llama.cpp cannot parse it.

    Used only to check a caller's GBNF with the parser whose syntax the API promises (llama.cpp's); answers are
    constrained by llguidance (see :mod:`innova_smollm.engine.grammar`)."""
    sampler = llama_cpp.llama_sampler_init_grammar(vocab, grammar.encode("utf-8"), b"root")
    return sampler or None


def grammar_error(vocab: Any, grammar: str) -> str | None:
    """None when llama.cpp accepts the grammar, else a message saying so (llama.cpp logs the details)."""
    if not grammar.strip():
        return "the grammar is empty"
    sampler = new_grammar(vocab, grammar)
    if sampler is None:
        return (
            "llama.cpp could not parse this GBNF grammar: check its syntax, that every rule it uses is defined, that "
            "the start rule is named `root`, and that no rule is left-recursive"
        )
    llama_cpp.llama_sampler_free(sampler)
    return None


#: One llama_token_data as numpy sees it (int32 id, float logit, float p; 12 bytes, as in C).
TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])


class Candidates:
    """Constrained sampling: a row of logits, a grammar's token mask, and the sequence's chain.

    The mask (one bit per token, computed by llguidance into this engine's one buffer) is checked lazily, as
    llama.cpp's common_sampler checks its grammar: the chain picks from the whole row, and only when its pick is not
    allowed are the disallowed tokens set to -inf and the chain asked again. The second draw is from the chain's
    distribution renormalised over the allowed tokens, so both draws together pick each allowed token with that same
    renormalised probability. The candidate array is built once per engine and refilled per use.
    """

    def __init__(self, ctx: Any, n_vocab: int, rows: LogitRows) -> None:
        self._ctx = ctx
        self._n_vocab = n_vocab
        self._rows = rows
        self._ids = np.arange(n_vocab, dtype=np.int32)
        self._data = np.zeros(n_vocab, dtype=TOKEN_DATA)
        self._data_p = self._data.ctypes.data_as(llama_cpp.llama_token_data_p)
        self._array = llama_cpp.llama_token_data_array(data=self._data_p, size=n_vocab, selected=-1, sorted=False)
        self._array_p = ctypes.pointer(self._array)
        self._mask = np.zeros((n_vocab + 31) // 32, dtype=np.int32)
        self._mask_address = self._mask.ctypes.data
        self._mask_bytes = self._mask.nbytes

    def _fill(self, row: np.ndarray[Any, np.dtype[np.float32]]) -> None:
        self._data["id"] = self._ids
        self._data["logit"] = row
        self._data["p"] = 0.0
        # A sampler may point the array at a buffer of its own: point it back at ours.
        self._array.data = self._data_p  # type: ignore[assignment]
        self._array.size = self._n_vocab
        self._array.selected = -1
        self._array.sorted = False

    def _pick(self, chain: Any) -> int:
        llama_cpp.llama_sampler_apply(chain, self._array_p)
        selected = int(self._array.selected)
        return int(self._array.data[selected].id)

    def _allowed(self, token: int) -> bool:
        return bool((int(self._mask[token >> 5]) >> (token & 31)) & 1)

    def _disallowed(self) -> np.ndarray[Any, np.dtype[np.bool_]]:
        bits = np.unpackbits(self._mask.view(np.uint8), bitorder="little")[: self._n_vocab]
        return np.asarray(bits == 0)

    def sample(self, batch_index: int, chain: Any | None, matcher: Any) -> int:
        """The next token of a constrained sequence, accepted into its chain (the caller consumes it into the
        matcher); -1 when the grammar allows no token at all (the matcher is in error)."""
        matcher.unsafe_compute_mask_ptr(self._mask_address, self._mask_bytes)
        if matcher.is_error():
            return -1
        row = self._rows.row(batch_index)
        if chain is None:
            token = int(row.argmax())
            if not self._allowed(token):
                token = int(np.where(self._disallowed(), np.float32(-np.inf), row).argmax())
        else:
            self._fill(row)
            token = self._pick(chain)
            if not self._allowed(token):
                self._fill(row)
                self._data["logit"][self._disallowed()] = -np.inf
                token = self._pick(chain)
            llama_cpp.llama_sampler_accept(chain, token)
        if not self._allowed(token):
            return -1
        return token
