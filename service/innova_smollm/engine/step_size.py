"""The step size: how many tokens one llama_decode call takes, a rule of the model's size."""

from __future__ import annotations

#: Largest number of tokens in one llama_decode call (llama.cpp's n_batch = n_ubatch). The compute
#: buffer llama.cpp allocates grows with it: on the production 3B model 76 MiB at 512 tokens, 19 MiB at 128, and
#: 128-token steps prefill it as fast as 512-token ones (measured with and without huge pages); on the 135M model
#: 128-token steps prefill about 5 % slower, its buffer is small, so small models keep 512
#: (docs/results/2026-12-06-production-memory/ubatch.md).
SMALL_MODEL_STEP_TOKENS = 512
LARGE_MODEL_STEP_TOKENS = 128
#: Models with at least this many parameters take LARGE_MODEL_STEP_TOKENS (and go without llguidance's slicer,
#: engine/grammar.py).
LARGE_MODEL_PARAMETERS = 1_000_000_000


def step_tokens(parameters: int, n_ctx: int) -> int:
    """Tokens per llama_decode call for a model of ``parameters`` weights (see LARGE_MODEL_STEP_TOKENS)."""
    step = LARGE_MODEL_STEP_TOKENS if parameters >= LARGE_MODEL_PARAMETERS else SMALL_MODEL_STEP_TOKENS
    return min(step, n_ctx)
