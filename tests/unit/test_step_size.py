"""The step size rule: large models take short steps (a smaller compute buffer, prefill as fast), small ones long."""

from __future__ import annotations

from innova_smollm.engine.step_size import (
    LARGE_MODEL_PARAMETERS,
    LARGE_MODEL_STEP_TOKENS,
    SMALL_MODEL_STEP_TOKENS,
    step_tokens,
)


def test_the_production_3b_model_takes_short_steps() -> None:
    assert step_tokens(3_212_749_824, 4096) == LARGE_MODEL_STEP_TOKENS == 128


def test_the_embedded_135m_model_takes_long_steps() -> None:
    assert step_tokens(134_515_008, 2048) == SMALL_MODEL_STEP_TOKENS == 512


def test_the_boundary_and_a_window_shorter_than_a_step() -> None:
    assert step_tokens(LARGE_MODEL_PARAMETERS - 1, 4096) == SMALL_MODEL_STEP_TOKENS
    assert step_tokens(LARGE_MODEL_PARAMETERS, 4096) == LARGE_MODEL_STEP_TOKENS
    assert step_tokens(134_515_008, 256) == 256
