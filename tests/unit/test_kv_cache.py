"""The KV cache's pure policy: which layout ``auto`` picks, and which idle sequence a new job takes."""

from __future__ import annotations

import pytest

from innova_smollm.engine.kv_cache import choose_sequence, consecutive_runs, resolve_kv_layout
from innova_smollm.settings import KVLayout


@pytest.mark.parametrize(
    ("requested", "parallel", "window_mib", "expected"),
    [
        (KVLayout.AUTO, 4, 45, KVLayout.PER_SEQUENCE),  # SmolLM2 at 2048 tokens: 135 MiB more
        (KVLayout.AUTO, 4, 448, KVLayout.SHARED),  # a 3B model at 4096 tokens: 1.3 GiB more
        (KVLayout.AUTO, 2, 512, KVLayout.PER_SEQUENCE),  # exactly the budget
        (KVLayout.AUTO, 3, 257, KVLayout.SHARED),
        (KVLayout.SHARED, 4, 1, KVLayout.SHARED),
        (KVLayout.PER_SEQUENCE, 4, 448, KVLayout.PER_SEQUENCE),
    ],
)
def test_auto_layout_spends_at_most_the_budget_on_streams_per_sequence(
    requested: KVLayout, parallel: int, window_mib: int, expected: KVLayout
) -> None:
    assert resolve_kv_layout(requested, parallel=parallel, window_bytes=window_mib * 2**20) is expected


CACHED_PROMPT = [1, 2, 3, 4, 5]


def test_a_new_job_takes_the_sequence_with_the_longest_cached_prefix() -> None:
    idle = {0: [], 2: [9, 9], 3: CACHED_PROMPT}
    assert choose_sequence(idle, [1], (*CACHED_PROMPT, 6), per_sequence=False) == (3, 5)


def test_among_equals_an_empty_sequence_then_the_least_recently_used_is_taken() -> None:
    assert choose_sequence({2: [9], 0: [], 1: []}, [], (1, 2), per_sequence=False) == (0, 0)
    assert choose_sequence({2: [9], 1: [8]}, [], (1, 2), per_sequence=False) == (2, 0)


def test_the_prompts_last_token_is_always_decoded_again() -> None:
    assert choose_sequence({0: CACHED_PROMPT}, [], tuple(CACHED_PROMPT), per_sequence=False) == (0, 4)


def test_per_sequence_keeps_the_running_ids_consecutive_before_reusing_a_prefix() -> None:
    # 1 is running: 3 holds the prompt, but taking it would split every step into two ubatches ({1} and {3}).
    idle = {3: CACHED_PROMPT, 0: [], 2: []}
    assert choose_sequence(idle, [1], (*CACHED_PROMPT, 6), per_sequence=True) == (0, 0)


def test_per_sequence_reuses_a_prefix_when_its_id_is_next_to_the_running_ones() -> None:
    idle = {0: [], 1: [], 3: CACHED_PROMPT}
    assert choose_sequence(idle, [2], (*CACHED_PROMPT, 6), per_sequence=True) == (3, 5)
    # Nothing running: every id is a run of its own, so the prefix decides.
    assert choose_sequence({0: [], 3: CACHED_PROMPT}, [], (*CACHED_PROMPT, 6), per_sequence=True) == (3, 5)


def test_consecutive_runs_count_the_ubatches_of_a_per_sequence_step() -> None:
    assert consecutive_runs([]) == 0
    assert consecutive_runs([0, 1, 2, 3]) == 1
    assert consecutive_runs([0, 2, 3]) == 2
    assert consecutive_runs([0, 2, 4]) == 3
