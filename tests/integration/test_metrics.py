"""``GET /metrics`` after real traffic: every figure the issue lists has to move, and by the right amount."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from innova_smollm.core.process_memory import HUGE_PAGES_TUNABLE, transparent_huge_pages_mode
from innova_smollm.engine.scheduler import GGUFEngine
from innova_smollm.settings import Settings
from tests.servers import API, LONG_PROMPT, LiveServer, make_settings, run_service, serve_in_thread, wait_until

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(server: LiveServer) -> Samples:
    reply = server.get("/metrics")
    assert reply.status_code == 200
    # Prometheus' text format, with its charset named once (Litestar adds it to a text media type itself).
    assert reply.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(reply.text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def moved(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def test_answers_move_request_token_and_latency_figures(live: LiveServer) -> None:
    before = scrape(live)
    native = live.post(f"{API}/chat", json={"messages": [{"role": "user", "content": "Hi!"}], "max_tokens": 6})
    compat = live.post(
        "/v1/chat/completions", json={"model": "x", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 6}
    )
    assert native.status_code == compat.status_code == 200
    after = scrape(live)

    route = {"method": "POST", "status": "200"}
    assert moved(before, after, "smollm_http_requests_total", route=f"{API}/chat", **route) == 1
    assert moved(before, after, "smollm_http_requests_total", route="/v1/chat/completions", **route) == 1
    usages = [native.json()["usage"], compat.json()["usage"]]
    assert moved(before, after, "smollm_prompt_tokens_total") == sum(u["prompt_tokens"] for u in usages)
    assert moved(before, after, "smollm_completion_tokens_total") == sum(u["completion_tokens"] for u in usages)
    for histogram in (
        "smollm_queue_wait_seconds",
        "smollm_time_to_first_token_seconds",
        "smollm_time_per_output_token_seconds",
        "smollm_request_duration_seconds",
    ):
        assert moved(before, after, f"{histogram}_count") == 2, histogram
        assert moved(before, after, f"{histogram}_sum") > 0, histogram
    answered = sum(
        moved(before, after, "smollm_answers_total", finish_reason=reason, source="local")
        for reason in ("stop", "length")
    )
    assert answered == 2


def test_model_state_and_process_memory(live: LiveServer) -> None:
    samples = scrape(live)
    assert value(samples, "smollm_model_loaded") == 1
    assert value(samples, "smollm_model_load_seconds") >= 0
    assert value(samples, "smollm_requests_in_flight") == 0
    # The model file is ~98 MB and mapped into the process: resident memory is well above that.
    assert value(samples, "smollm_process_memory_bytes", kind="rss") > 100_000_000
    assert value(samples, "smollm_process_memory_bytes", kind="rss_anon") > 10_000_000
    assert value(samples, "process_resident_memory_bytes") > 100_000_000


@pytest.mark.parametrize(
    ("path", "body", "reason"),
    [
        (f"{API}/chat", {"messages": [{"role": "user", "content": "word " * 1500}], "max_tokens": 8}, "context_length"),
        ("/v1/completions", {"prompt": "word " * 1500, "max_tokens": 8}, "context_length"),
        (f"{API}/chat", {"messages": [{"role": "user", "content": "hi"}], "temperature": 9}, "bad_input"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "n": 5}, "bad_input"),
        (f"{API}/generate", {"prompt": ""}, "bad_input"),
    ],
)
def test_refusals_are_counted_by_reason(live: LiveServer, path: str, body: dict[str, object], reason: str) -> None:
    before = scrape(live)
    assert live.post(path, json=body).status_code == 400
    after = scrape(live)
    assert moved(before, after, "smollm_rejections_total", reason=reason) == 1
    assert moved(before, after, "smollm_http_requests_total", route=path, method="POST", status="400") == 1


def test_unmatched_paths_share_one_route_label(live: LiveServer) -> None:
    before = scrape(live)
    for suffix in ("a", "b", "c"):
        assert live.get(f"/scanner/{suffix}").status_code == 404
    after = scrape(live)
    assert moved(before, after, "smollm_http_requests_total", route="unmatched", method="GET", status="404") == 3


@pytest.fixture
def single_slot(model_path: Path) -> Iterator[LiveServer]:
    """One request at a time, no waiting line, and room for a long answer: a second request is refused meanwhile."""
    settings = make_settings(model_path, n_ctx=4096, max_tokens=4000, max_queue=0, parallel=1)
    engine = GGUFEngine(settings)
    try:
        with serve_in_thread(settings, engine=engine) as server:
            yield server
    finally:
        engine.close()


def test_queue_full_and_cancellation_are_counted(single_slot: LiveServer) -> None:
    before = scrape(single_slot)
    payload = {"prompt": LONG_PROMPT, "max_tokens": 4000, "temperature": 0, "stream": True}
    with requests.post(single_slot.url + f"{API}/generate", json=payload, stream=True, timeout=60) as running:
        assert running.status_code == 200
        lines = running.iter_lines()
        assert any(line.startswith(b"event: token") for line in lines)
        busy = single_slot.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2})
        assert busy.status_code == 503
        assert busy.json()["error"]["code"] == "queue_full"
        assert int(busy.headers["Retry-After"]) >= 1
    # The client went away mid-answer: the generation stops, its place is freed, and it counts as a cancellation.
    assert wait_until(lambda: value(scrape(single_slot), "smollm_cancellations_total") == 1)
    assert wait_until(lambda: value(scrape(single_slot), "smollm_requests_in_flight") == 0)
    after = scrape(single_slot)
    assert moved(before, after, "smollm_rejections_total", reason="queue_full") == 1
    assert moved(before, after, "smollm_completion_tokens_total") == 0  # a cancelled answer has no outcome


def test_not_ready_and_model_load_figures(model_path: Path) -> None:
    gate = threading.Event()

    def slow_loader(settings: Settings) -> GGUFEngine:
        gate.wait(60)
        return GGUFEngine(settings)

    with serve_in_thread(make_settings(model_path), loader=slow_loader) as server:
        loading = scrape(server)
        assert value(loading, "smollm_model_loaded") == 0
        reply = server.post(f"{API}/chat", json={"messages": [{"role": "user", "content": "hi"}]})
        assert reply.status_code == 503
        assert moved(loading, scrape(server), "smollm_rejections_total", reason="not_ready") == 1
        gate.set()
        assert wait_until(lambda: value(scrape(server), "smollm_model_loaded") == 1, timeout=60)
        assert value(scrape(server), "smollm_model_load_seconds") > 0


def test_prompt_cache_figures_count_reused_tokens_and_saved_states(model_path: Path) -> None:
    settings = make_settings(model_path, parallel=2, max_tokens=64)
    engine = GGUFEngine(settings)
    try:
        with serve_in_thread(settings, engine=engine) as server:

            def ask(content: str) -> dict[str, int]:
                body = {"messages": [{"role": "user", "content": content}], "max_tokens": 16, "temperature": 0}
                reply = server.post(f"{API}/chat", json=body)
                assert reply.status_code == 200
                usage: dict[str, int] = reply.json()["usage"]
                return usage

            before = scrape(server)
            first = ask("Name three rivers.")
            ask("Name three rivers.")  # the idle sequence still holds it: all but the last token reused
            # Two requests side by side take both sequence ids, so the first prompt's cells are cut and saved.
            with ThreadPoolExecutor(2) as pool:
                list(pool.map(ask, ["Name two oceans.", "Name four mountains."]))
            again = ask("Name three rivers.")  # restored from host memory
            after = scrape(server)
    finally:
        engine.close()
    reused = moved(before, after, "smollm_prompt_cache_tokens_total", kind="reused")
    decoded = moved(before, after, "smollm_prompt_cache_tokens_total", kind="decoded")
    assert reused >= 2 * (first["prompt_tokens"] - 1)
    assert reused + decoded == moved(before, after, "smollm_prompt_tokens_total")
    assert again["prompt_tokens"] == first["prompt_tokens"]
    assert moved(before, after, "smollm_prompt_states_total", event="saved") >= 1
    assert moved(before, after, "smollm_prompt_states_total", event="restored") >= 1
    assert value(after, "smollm_prompt_states_bytes") > 0


def _proc_memory(pid: int) -> dict[str, float]:
    fields = {"VmRSS": "rss", "RssAnon": "rss_anon", "RssFile": "rss_file", "VmSwap": "swap"}
    memory: dict[str, float] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in fields:
            memory[fields[name]] = float(rest.split()[0]) * 1024  # the kernel writes kB meaning KiB
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("AnonHugePages:"):
            memory["anon_huge_pages"] = float(line.split()[1]) * 1024
    return memory


def test_process_memory_is_the_serving_process_own_proc_status(model_path: Path) -> None:
    """The figures are those of the service's process (its own /proc/<pid>/status and smaps_rollup), in bytes, per
    field; started as the role's unit starts it, the weights sit in huge pages wherever the kernel allows them."""
    environment = {"SMOLLM_MODEL_PATH": str(model_path), "GLIBC_TUNABLES": HUGE_PAGES_TUNABLE}
    with run_service(environment) as service:
        assert wait_until(lambda: requests.get(f"{service.url}{API}/health", timeout=5).status_code == 200, timeout=60)
        reply = requests.post(
            f"{service.url}{API}/chat",
            json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8},
            timeout=120,
        )
        assert reply.status_code == 200
        pid = service.process.pid
        before = _proc_memory(pid)
        metrics = requests.get(f"{service.url}/metrics", timeout=30)
        after = _proc_memory(pid)
        start_up = [json.loads(line) for line in service.output().splitlines() if line.startswith("{")]
    # Start-up ends by handing what loading freed back to the kernel (core/process_memory.release_free_heap).
    trimmed = [record for record in start_up if record.get("event") == "heap_trimmed"]
    assert len(trimmed) == 1 and trimmed[0]["mb"] >= 0, trimmed
    samples = {
        sample.labels["kind"]: sample.value
        for family in text_string_to_metric_families(metrics.text)
        for sample in family.samples
        if sample.name == "smollm_process_memory_bytes"
    }
    assert set(samples) == {"rss", "rss_anon", "rss_file", "swap", "anon_huge_pages"}
    # RSS moves a little while the scrape is answered: the exported figure lies between the readings around it,
    # give or take 4 MiB. A wrong unit (x1000), field or process would be off by tens to hundreds of MiB.
    slack = 4 * 2**20
    for kind, exported in samples.items():
        low, high = sorted((before[kind], after[kind]))
        assert low - slack <= exported <= high + slack, (kind, exported, before[kind], after[kind])
    assert samples["rss"] > samples["rss_file"] > 0
    assert abs(samples["rss"] - samples["rss_anon"] - samples["rss_file"]) <= slack  # RssShmem is all that is left
    if transparent_huge_pages_mode() in ("always", "madvise"):
        # The embedded model's 98 MB of weights (and its KV cache) are allocated in a few large buffers.
        assert samples["anon_huge_pages"] >= 32 * 2**20, samples
