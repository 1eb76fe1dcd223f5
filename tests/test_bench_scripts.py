"""The benchmark scripts run end to end on the real model (tiny sizes: this checks they work, not how fast)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO_ROOT


def test_attention_bench_prints_one_row_per_case(model_path: Path) -> None:
    argv = [sys.executable, "scripts/bench_attention.py", "--model", str(model_path), "--steps", "4", "--rounds", "1"]
    argv += ["--context", "8", "--context", "300", "--sequences", "2"]
    result = subprocess.run(argv, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| 2 |")]
    assert [row.split("|")[2].strip() for row in rows] == ["8", "300"]
    for row in rows:
        rates = [float(cell) for cell in row.strip("|").split("|")[2:]]
        assert len(rates) == 4 and all(rate > 0 for rate in rates)


def test_side_by_side_bench_writes_its_table(model_path: Path, tmp_path: Path) -> None:
    argv = [sys.executable, "scripts/bench.py", "--model", str(model_path), "--peers", "a,b", "--max-tokens", "8"]
    argv += ["--concurrency", "1,2", "--single-repeats", "1", "--requests-per-client", "1", "--min-requests", "2"]
    argv += ["--level-rounds", "2", "--contention", "1", "--contention-rounds", "1", "--contention-tokens", "8"]
    argv += ["--out", str(tmp_path)]
    result = subprocess.run(argv, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    table = (tmp_path / "latest.md").read_text()
    assert "| (a) llama-cpp-python in process |" in table
    # SMOLLM_KV_LAYOUT=auto gives this small model one stream per sequence; the name says so, from /info.
    assert "| (b) innova-smollm (SMOLLM_PARALLEL=4; KV per_sequence) |" in table
    assert "KV cache of 4 x n_ctx 2048" in result.stdout
    # Every request of both levels, in both rounds, ended with a finish_reason.
    assert result.stdout.count("cut short 0/2") == 4
    # The peers took turns: each round's ratio is in the table, and the contention phase ran for both peers.
    assert "| (b)/(a) decode, one client |" in table
    assert "1 client tok/s, cores busy" in table
    samples = json.loads(next(tmp_path.glob("bench-*.json")).read_text())
    assert [len(peer["contended"]) for peer in samples] == [1, 1]
    assert all(peer["contended"][0]["tokens"] > 0 for peer in samples)


def _first_level_steps_by_size(stdout: str) -> dict[int, int]:
    """bench_steps.py's first table: how many steps decoded each batch size."""
    rows = stdout.split("\n\n")[1].splitlines()[2:]
    return {int(row.split("|")[1]): int(row.split("|")[2]) for row in rows}


def test_step_profile_counts_every_decode_of_the_service(model_path: Path) -> None:
    argv = [sys.executable, "scripts/bench_steps.py", "--model", str(model_path), "--max-tokens", "8"]
    argv += ["--concurrency", "1,2", "--requests-per-client", "1", "--parallel", "2"]
    result = subprocess.run(argv, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    summaries = [line for line in result.stdout.splitlines() if " client(s): " in line]
    assert [line.split(" ")[0] for line in summaries] == ["1", "2"]
    assert all("cut short 0/" in line and "inside llama_decode" in line for line in summaries)
    # One client decodes one token a step, after the step that carried its prompt.
    steps_by_size = _first_level_steps_by_size(result.stdout)
    assert steps_by_size.get(1, 0) >= 1 and max(steps_by_size) > 2


def test_step_profile_drives_the_engine_directly_with_a_service_variable(model_path: Path) -> None:
    argv = [sys.executable, "scripts/bench_steps.py", "--model", str(model_path), "--max-tokens", "8", "--direct"]
    argv += ["--concurrency", "2", "--requests-per-client", "2", "--parallel", "2"]
    argv += ["--env", "SMOLLM_KV_LAYOUT=per_sequence", "--env", "SMOLLM_PROMPT_CACHE=false"]
    result = subprocess.run(argv, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    summary = next(line for line in result.stdout.splitlines() if " client(s): " in line)
    assert summary.startswith("2 client(s): ") and "cut short 0/4" in summary
    # Four jobs of 8 tokens, two at a time: the steps that decode both sequences are most of the run.
    steps_by_size = _first_level_steps_by_size(result.stdout)
    assert steps_by_size.get(2, 0) >= 8, steps_by_size


def test_step_profile_refuses_a_malformed_variable(model_path: Path) -> None:
    argv = [sys.executable, "scripts/bench_steps.py", "--model", str(model_path), "--direct", "--env", "KV"]
    result = subprocess.run(argv, cwd=REPO_ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2
    assert "'KV': expected NAME=VALUE" in result.stderr
