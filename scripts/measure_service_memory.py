#!/usr/bin/env python3
"""The service's memory against its budget (model file + KV cache + 150 MB), its load time and decode speed.

Each run starts ``innova-smollm serve`` (real uvicorn) as its own process from one source tree, at the production
inventory's settings by default (SMOLLM_N_CTX=4096, SMOLLM_PARALLEL=4, SMOLLM_KV_LAYOUT=auto, weights read, not
mapped), waits for /health, sends ``--clients`` concurrent chat requests of ``--max-tokens`` tokens each (end tokens
forbidden by logit_bias, so every answer is that long), and then reads:
- ``/proc/<pid>/status``: VmRSS, RssAnon, RssFile, VmHWM (the peak), VmSwap;
- ``/metrics``: ``smollm_process_memory_bytes`` (which must agree with /proc) and the mean time per output token,
  from which the decode speed is given: per request 1 / TPOT, in all ``clients`` / TPOT (the clients decode together);
- the load time: from the process start to /health answering 200.

The services run on ``--python`` (default: this interpreter). Measure the production path with a venv made the
way the role makes it, from the wheelhouse (scripts/build-wheelhouse.sh) and nothing else::

    python3 -m venv ~/.cache/innova-smollm/server-venv
    ~/.cache/innova-smollm/server-venv/bin/pip install --no-index --find-links ~/.cache/innova-smollm/wheelhouse \
        'innova-smollm[server]'

The development venv also holds the tests' packages (pydantic for the openai SDK, websockets, attrs), which Litestar
and uvicorn import when they find them: about 9 MiB a production host does not hold. Each tree's ``service/`` comes
first on PYTHONPATH, so the tree's code runs, not the wheel's.

The budget comes from ``innova-smollm memory-budget`` (core/memory_budget.py) of the first tree. Trees alternate in a
rotated order for ``--rounds`` rounds; the table gives each figure's median and range. Several source trees compare
code versions, e.g. main before and after a change (``git archive <commit> service | tar -x -C /tmp/before``)::

    .venv/bin/python scripts/measure_service_memory.py --rounds 3 \\
        --tree before=/tmp/before --tree after=. --out docs/results/<date>-production-memory/runs.json
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import requests

from innova_smollm.core.process_memory import HUGE_PAGES_TUNABLE

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = REPO_ROOT / "models" / "Llama-3.2-3B-Instruct-shape.Q4_K_M.gguf"
API = "/innova/api/smollm"
MIB = 2**20
STATUS_KEYS = ("VmRSS", "RssAnon", "RssFile", "VmHWM", "VmSwap")
METRIC_KINDS = {"VmRSS": "rss", "RssAnon": "rss_anon", "RssFile": "rss_file", "VmSwap": "swap"}
PROMPTS = (
    "Tell the story of a lighthouse keeper who finds a message in a bottle.",
    "Explain how a bicycle stays upright, step by step.",
    "Write a letter to a friend about a trip to the mountains.",
    "Describe a busy market in a port city at dawn.",
)
#: A system prompt of about 150 tokens: four of them fill a 512-token prefill step, which touches all of llama.cpp's
#: compute buffer (reserved for n_ubatch tokens but resident only once a step that large ran): the worst case.
SYSTEM = (
    "You are the assistant of a regional cooperative that sells farm produce, tools and seeds. Answer in plain "
    "English, in short paragraphs, and never invent prices, dates or stock levels: when you do not know, say so "
    "and suggest who to ask. Members ask about orders, deliveries, invoices, the opening hours of the depots, "
    "the rules of the loyalty programme and the workshops the cooperative runs each season. Be polite and brief, "
    "use the member's words, and end each answer with one question that helps the member go on. If a question is "
    "about health, law or money beyond the cooperative's own services, say that you cannot advise and point to a "
    "professional. Keep every answer under two hundred words unless the member asks for more detail."
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def proc_status(pid: int) -> dict[str, int]:
    values: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in STATUS_KEYS:
            values[name] = int(rest.split()[0]) * 1024
    return values


def scrape(url: str) -> dict[str, float]:
    samples: dict[str, float] = {}
    for line in requests.get(f"{url}/metrics", timeout=30).text.splitlines():
        if line.startswith("smollm_process_memory_bytes{") or line.startswith("smollm_time_per_output_token_seconds_"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


def end_token_bias(model: Path, tree: Path) -> dict[str, int]:
    """logit_bias forbidding every end-of-generation token of the model (noise answers may end at once otherwise)."""
    code = (
        "import sys, llama_cpp\n"
        "from pathlib import Path\n"
        "from innova_smollm.engine.model import LlamaModel\n"
        "m = LlamaModel.load(Path(sys.argv[1]), n_gpu_layers=0, use_mmap=False, shape_only=True)\n"
        "print(' '.join(str(t) for t in range(m.n_vocab()) if llama_cpp.llama_vocab_is_eog(m.vocab, t)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(model)], env=tree_env(tree), capture_output=True, text=True, check=True
    ).stdout
    return dict.fromkeys(out.split(), -100)


def tree_env(tree: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SMOLLM_", "ENABLE_SMOLLM", "PROVIDER"))}
    env["PYTHONPATH"] = f"{tree / 'service'}:{tree}"
    env.update(extra or {})
    return env


def memory_budget(model: Path, tree: Path, args: argparse.Namespace) -> dict[str, Any]:
    argv = [sys.executable, "-m", "innova_smollm", "memory-budget", str(model), "--n-ctx", str(args.n_ctx)]
    argv += ["--parallel", str(args.parallel), "--kv-layout", args.kv_layout]
    out = subprocess.run(argv, env=tree_env(tree), capture_output=True, text=True, check=True).stdout
    budget: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return budget


def one_run(name: str, tree: Path, args: argparse.Namespace, bias: dict[str, int]) -> dict[str, Any]:
    port = free_port()
    env = tree_env(
        tree,
        {
            "PORT": str(port),
            "SMOLLM_MODEL_PATH": str(args.model),
            "SMOLLM_N_CTX": str(args.n_ctx),
            "SMOLLM_PARALLEL": str(args.parallel),
            "SMOLLM_KV_LAYOUT": args.kv_layout,
            "SMOLLM_USE_MMAP": "false",
            "SMOLLM_MAX_QUEUE": "8",
            "SMOLLM_LOG_LEVEL": "WARNING",
            # As the role's unit starts it (innova_backend_huge_pages).
            "GLIBC_TUNABLES": HUGE_PAGES_TUNABLE,
            **args.tree_env.get(name, {}),
        },
    )
    url = f"http://127.0.0.1:{port}"
    log_path = REPO_ROOT / "build" / f"measure_service_memory.{name}.{port}.log"
    log_path.parent.mkdir(exist_ok=True)
    log = log_path.open("w")
    started = time.perf_counter()
    process = subprocess.Popen([str(args.python), "-m", "innova_smollm", "serve"], env=env, stdout=log, stderr=log)
    try:
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"{name}: the service exited {process.returncode}; see {log_path}")
            try:
                if requests.get(f"{url}{API}/health", timeout=5).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if time.perf_counter() - started > 600:
                raise RuntimeError(f"{name}: not ready after 600 s")
            time.sleep(0.2)
        load_s = time.perf_counter() - started
        idle = proc_status(process.pid)
        before = scrape(url)
        answers: list[int] = []
        failures: list[str] = []

        def ask(prompt: str) -> None:
            body = {
                "model": "x",
                "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}],
                "max_tokens": args.max_tokens,
                "temperature": 0.7,
                "logit_bias": bias,
            }
            reply = requests.post(f"{url}/v1/chat/completions", json=body, timeout=1800)
            if reply.status_code != 200:
                failures.append(f"{reply.status_code} {reply.text[:200]}")
                return
            answers.append(int(reply.json()["usage"]["completion_tokens"]))

        threads = [threading.Thread(target=ask, args=(PROMPTS[i % len(PROMPTS)],)) for i in range(args.clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if failures:
            raise RuntimeError(f"{name}: failed requests: {failures}")
        after_metrics = scrape(url)
        status = proc_status(process.pid)
        tpot_sum = after_metrics["smollm_time_per_output_token_seconds_sum"] - before.get(
            "smollm_time_per_output_token_seconds_sum", 0.0
        )
        tpot_count = after_metrics["smollm_time_per_output_token_seconds_count"] - before.get(
            "smollm_time_per_output_token_seconds_count", 0.0
        )
        tpot = tpot_sum / tpot_count
        exported = {
            key: after_metrics.get(f'smollm_process_memory_bytes{{kind="{kind}"}}', -1.0)
            for key, kind in METRIC_KINDS.items()
        }
        return {
            "tree": name,
            "load_s": round(load_s, 2),
            "idle": idle,
            "after_requests": status,
            "metrics_memory": exported,
            "completion_tokens": answers,
            "decode_tok_s_per_request": round(1 / tpot, 3),
            "decode_tok_s_all": round(args.clients / tpot, 3),
        }
    finally:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def summary(runs: list[dict[str, Any]], budget: dict[str, Any]) -> str:
    def spread(values: list[float], scale: float = 1.0, digits: int = 0) -> str:
        scaled = [v / scale for v in values]
        return f"{statistics.median(scaled):,.{digits}f} ({min(scaled):,.{digits}f}-{max(scaled):,.{digits}f})"

    budget_mib = budget["budget_bytes"] / MIB
    lines = [
        f"budget: file {budget['model_file_bytes'] / MIB:,.0f} MiB + KV {budget['kv_bytes'] / MIB:,.0f} MiB "
        f"({budget['kv_layout']}, {budget['kv_cells']} cells x {budget['kv_bytes_per_cell']} B) + margin "
        f"{budget['margin_bytes'] / MIB:,.0f} MiB = {budget_mib:,.0f} MiB (MemoryMax {budget['memory_max']})",
        "| tree | runs | VmRSS MiB | RssAnon MiB | RssFile MiB | VmHWM MiB | under budget by MiB | load s | "
        "decode tok/s per request | decode tok/s all |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in dict.fromkeys(run["tree"] for run in runs):
        mine = [run for run in runs if run["tree"] == name]
        after = [run["after_requests"] for run in mine]
        lines.append(
            f"| {name} | {len(mine)} | {spread([a['VmRSS'] for a in after], MIB)} | "
            f"{spread([a['RssAnon'] for a in after], MIB)} | {spread([a['RssFile'] for a in after], MIB)} | "
            f"{spread([a['VmHWM'] for a in after], MIB)} | "
            f"{spread([budget['budget_bytes'] - a['VmRSS'] for a in after], MIB)} | "
            f"{spread([run['load_s'] for run in mine], digits=1)} | "
            f"{spread([run['decode_tok_s_per_request'] for run in mine], digits=2)} | "
            f"{spread([run['decode_tok_s_all'] for run in mine], digits=2)} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--tree", action="append", default=[], help="NAME=PATH of a source tree (default: this one)")
    parser.add_argument(
        "--tree-env",
        action="append",
        default=[],
        help="NAME:VAR=VALUE, the environment of one tree's service (e.g. 'before:GLIBC_TUNABLES=' for no huge pages)",
    )
    parser.add_argument(
        "--python",
        type=Path,
        default=Path(sys.executable),
        help="the interpreter that runs the services: a venv holding only innova-smollm[server] is the production path",
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--n-ctx", type=int, default=4096)
    parser.add_argument("--parallel", type=int, default=4)
    parser.add_argument("--kv-layout", default="auto")
    parser.add_argument("--out", type=Path, default=None, help="write every run and the budget as JSON here")
    args = parser.parse_args()
    tree_env_specs: dict[str, dict[str, str]] = {}
    for spec in args.tree_env:
        name, _, assignment = spec.partition(":")
        variable, _, value = assignment.partition("=")
        tree_env_specs.setdefault(name, {})[variable] = value
    args.tree_env = tree_env_specs
    trees = [(spec.partition("=")[0], Path(spec.partition("=")[2]).resolve()) for spec in args.tree] or [
        ("this", REPO_ROOT)
    ]
    budget = memory_budget(args.model, REPO_ROOT, args)
    bias = end_token_bias(args.model, REPO_ROOT)
    runs: list[dict[str, Any]] = []
    for round_index in range(args.rounds):
        order = trees[round_index % len(trees) :] + trees[: round_index % len(trees)]
        for name, tree in order:
            run = one_run(name, tree, args, bias)
            run["round"] = round_index
            runs.append(run)
            print(json.dumps(run), flush=True)
    table = summary(runs, budget)
    print(table)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        settings = {k: v for k, v in vars(args).items() if k not in ("out", "tree")}
        settings["python"] = str(args.python)
        settings["trees"] = {name: str(tree) for name, tree in trees}
        settings["model"] = str(args.model)
        document = {"budget": budget, "settings": settings, "runs": runs, "table": table}
        args.out.write_text(json.dumps(document, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
