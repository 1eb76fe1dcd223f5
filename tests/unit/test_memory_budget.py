"""The memory budget's arithmetic (core/memory_budget.py): file + KV cache in the engine's layout + 150 MB."""

from __future__ import annotations

import dataclasses

from innova_smollm.core.memory_budget import MARGIN_BYTES, MemoryBudget
from innova_smollm.settings import KVLayout

#: The production-shaped Llama-3.2-3B Q4_K_M: its file's size and one KV cell (28 layers x 8 KV heads x 256 x f16).
SHAPE_FILE_BYTES = 2_019_377_184
SHAPE_KV_BYTES_PER_CELL = 114_688


def budget(layout: KVLayout, *, n_ctx: int = 4096, parallel: int = 4) -> MemoryBudget:
    return MemoryBudget(
        model_file_bytes=SHAPE_FILE_BYTES,
        kv_layout=layout,
        n_ctx=n_ctx,
        parallel=parallel,
        kv_bytes_per_cell=SHAPE_KV_BYTES_PER_CELL,
    )


def test_the_shared_cache_is_one_window_for_all_sequences() -> None:
    shared = budget(KVLayout.SHARED)
    assert shared.kv_cells == 4096
    assert shared.kv_bytes == 448 * 2**20
    assert shared.total_bytes == SHAPE_FILE_BYTES + 448 * 2**20 + 150_000_000 == 2_639_139_232
    # 2,516.9 MiB: systemd gets whole MiB, rounded up so the budget is never cut.
    assert shared.systemd_memory_max() == "2517M"


def test_per_sequence_allocates_one_window_per_sequence() -> None:
    per_sequence = budget(KVLayout.PER_SEQUENCE, n_ctx=2048, parallel=3)
    assert per_sequence.kv_cells == 2048 * 3
    assert per_sequence.total_bytes == SHAPE_FILE_BYTES + 2048 * 3 * SHAPE_KV_BYTES_PER_CELL + MARGIN_BYTES


def test_memory_max_rounds_up_to_whole_mib_only_when_needed() -> None:
    exact = MemoryBudget(
        model_file_bytes=2**20 * 10 - MARGIN_BYTES,
        kv_layout=KVLayout.SHARED,
        n_ctx=1,
        parallel=1,
        kv_bytes_per_cell=0,
    )
    assert exact.total_bytes == 10 * 2**20
    assert exact.systemd_memory_max() == "10M"
    one_more = MemoryBudget(
        model_file_bytes=exact.model_file_bytes + 1,
        kv_layout=KVLayout.SHARED,
        n_ctx=1,
        parallel=1,
        kv_bytes_per_cell=0,
    )
    assert one_more.systemd_memory_max() == "11M"


def test_the_json_names_every_part() -> None:
    shown = budget(KVLayout.SHARED).as_dict()
    assert shown == {
        "model_file_bytes": SHAPE_FILE_BYTES,
        "n_ctx": 4096,
        "parallel": 4,
        "kv_layout": "shared",
        "kv_bytes_per_cell": SHAPE_KV_BYTES_PER_CELL,
        "kv_cells": 4096,
        "kv_bytes": 469_762_048,
        "saved_states_bytes": 0,
        "margin_bytes": 150_000_000,
        "budget_bytes": 2_639_139_232,
        "memory_max": "2517M",
    }


def test_the_prompt_caches_saved_states_count_at_their_limit() -> None:
    cached = dataclasses.replace(budget(KVLayout.SHARED), saved_states_bytes=256 * 2**20)
    assert cached.total_bytes == budget(KVLayout.SHARED).total_bytes + 256 * 2**20
    assert cached.systemd_memory_max() == "2773M"
