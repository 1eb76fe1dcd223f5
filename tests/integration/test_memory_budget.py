"""``innova-smollm memory-budget`` on the embedded model: the engine's own KV figures, the layout it would choose."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from innova_smollm.engine.scheduler import GGUFEngine
from tests.servers import REPO_ROOT


def memory_budget(path: Path, *args: str) -> dict[str, object]:
    done = subprocess.run(
        [sys.executable, "-m", "innova_smollm", "memory-budget", str(path), *args],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        check=False,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    shown: dict[str, object] = json.loads(done.stdout)
    return shown


def test_the_budget_is_the_file_and_the_engines_kv_cache_and_the_margin(model_path: Path, engine: GGUFEngine) -> None:
    shown = memory_budget(model_path, "--n-ctx", "2048", "--parallel", "4")
    per_cell = engine._model.kv_bytes_per_cell()
    # SmolLM2-135M at 2048 tokens: three more windows cost 135 MiB, under auto's bar, so one window per sequence.
    assert shown["kv_layout"] == "per_sequence"
    assert shown["kv_bytes_per_cell"] == per_cell
    assert shown["kv_cells"] == 2048 * 4
    assert shown["model_file_bytes"] == model_path.stat().st_size
    # The prompt cache's saved states at their default limit, 256 MiB.
    assert shown["saved_states_bytes"] == 256 * 2**20
    assert shown["budget_bytes"] == model_path.stat().st_size + 2048 * 4 * per_cell + 256 * 2**20 + 150_000_000
    assert shown["memory_max"] == f"{-(-int(str(shown['budget_bytes'])) // 2**20)}M"


def test_an_explicit_layout_and_the_environment_are_honoured(model_path: Path) -> None:
    shown = memory_budget(model_path, "--n-ctx", "2048", "--parallel", "4", "--kv-layout", "shared")
    assert shown["kv_layout"] == "shared"
    assert shown["kv_cells"] == 2048
    assert memory_budget(model_path, "--prompt-cache-mb", "64")["saved_states_bytes"] == 64 * 2**20


def test_a_missing_model_is_an_error_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "nothing.gguf"
    done = subprocess.run(
        [sys.executable, "-m", "innova_smollm", "memory-budget", str(missing)],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        check=False,
        timeout=60,
    )
    assert done.returncode == 2
    assert str(missing) in done.stderr
