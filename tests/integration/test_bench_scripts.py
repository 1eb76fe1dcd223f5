"""The benchmark scripts run end to end on the real model (tiny sizes: this checks they work, not how fast)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from tests.servers import REPO_ROOT


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
    run = next(tmp_path.glob("bench-*.json"))
    samples = json.loads(run.read_text())
    assert [len(peer["contended"]) for peer in samples] == [1, 1]
    assert all(peer["contended"][0]["tokens"] > 0 for peer in samples)
    # The run's rounds read back and pooled (here with themselves): every ratio row, each round counted twice.
    pooled = _pool([run, run])
    assert pooled.returncode == 0, pooled.stderr[-2000:]
    rows = _pooled_rows(pooled.stdout)
    # (a) runs in process: it has no concurrency levels, so no aggregate rows.
    assert set(rows) == {"(b)/(a) decode, one client", "(b)/(a) one client, cores busy"}
    assert rows["(b)/(a) decode, one client"][-2:] == ["2", "2"]


def _pool(runs: list[Path]) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "scripts/bench_pool.py", *map(str, runs)]
    return subprocess.run(argv, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, check=False)


def _pooled_rows(stdout: str) -> dict[str, list[str]]:
    """bench_pool.py's table: each ratio's label and its other cells."""
    cells = [line.strip("|").split("|") for line in stdout.splitlines() if line.startswith("| (b)/")]
    return {row[0].strip(): [cell.strip() for cell in row[1:]] for row in cells}


def _run_file(path: Path, one_client: list[tuple[float, float]], four_clients: list[tuple[float, float]]) -> Path:
    """A bench.py JSON file with peers (b) and (d) and the given (b, d) tok/s per round."""

    def peer(key: str, index: int) -> dict[str, object]:
        single = [{"ok": True, "tokens": 128, "ttft_s": 0.05, "total_s": 1.0, "decode_tok_s": pair[index],
                   "finish_reason": "length", "error": None} for pair in one_client]  # fmt: skip
        levels = {"4": [{"concurrency": 4, "requests": 8, "aggregate_tok_s": pair[index], "latencies_s": [4.0],
                         "cut_short": 0} for pair in four_clients]}  # fmt: skip
        return {"key": key, "name": key, "available": True, "note": "", "rss_mb": 300.0, "kv_caches": 1,
                "single": single, "prefill_tok_s": [200.0], "levels": levels, "contended": []}  # fmt: skip

    path.write_text(json.dumps([peer("b", 0), peer("d", 1)]))
    return path


def test_pooled_rounds_give_one_median_over_every_run(tmp_path: Path) -> None:
    first = _run_file(tmp_path / "first.json", [(90, 100), (100, 100), (110, 100)], [(120, 100)])
    second = _run_file(tmp_path / "second.json", [(80, 100), (95, 100)], [(150, 100), (90, 100)])
    result = _pool([first, second])
    assert result.returncode == 0, result.stderr
    rows = _pooled_rows(result.stdout)
    # One client: ratios 0.9, 1.0, 1.1, 0.8 and 0.95 pooled; (b) ahead in 1 of 5 rounds.
    median, interval, ahead, rounds, runs = rows["(b)/(d) decode, one client"]
    assert (median, ahead, rounds, runs) == ("0.950", "20%", "5", "2")
    low, high = (float(bound) for bound in interval.split(" to "))
    assert 0.8 <= low <= 0.95 <= high <= 1.1
    assert rows["(b)/(d) aggregate, 4 clients"][0] == "1.200"  # 1.2, 1.5 and 0.9
    assert "rounds pooled over 2 run(s)" in result.stdout


def test_pooling_names_a_missing_run_file(tmp_path: Path) -> None:
    result = _pool([tmp_path / "nowhere.json"])
    assert result.returncode == 2
    assert "no such file:" in result.stderr and "nowhere.json" in result.stderr


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
    assert all(re.search(r"median \d+ us between two decodes$", line) for line in summaries), summaries
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


def test_structured_bench_prints_constrained_against_free(model_path: Path, tmp_path: Path) -> None:
    argv = [sys.executable, "scripts/bench_structured.py", "--model", str(model_path), "--rounds", "1"]
    argv += ["--clients", "1", "--temperatures", "0.8", "--max-tokens", "12", "--peers", "b", "--out", str(tmp_path)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=240, check=False, cwd=REPO_ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith("| innova-smollm")]
    assert len(rows) == 1, done.stdout
    assert rows[0].split(" | ")[1:3] == ["0.8", "1"], rows[0]
    # Every answer is kept: one constrained and one free (12 tokens cut the JSON: none is valid, all are counted).
    assert rows[0].rstrip(" |").endswith("0/1"), rows[0]
    (raw,) = tmp_path.glob("structured-*.json")
    assert sorted(answer["constrained"] for answer in json.loads(raw.read_text())) == [False, True]
