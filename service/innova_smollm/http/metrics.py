"""Prometheus metrics for one app: what the service did, what it refused, and what the process weighs.

Each app owns its own ``CollectorRegistry`` (never prometheus-client's global one), so several apps in one process,
as in the tests, keep separate counts. Litestar's Prometheus plugin is not used for that reason: its middleware keeps
its metrics in class-level state on the global registry.

The figures come from three hooks: the service reports each outcome and cancellation (:class:`Metrics` is its
``Observer``); :class:`~innova_smollm.http.requestlog.RequestLog` reports each finished HTTP request with its route,
status and error type; gauges read the service's state and the process's memory (core/process_memory.py) when
scraped.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Any

from litestar import Response, get
from litestar.di import NamedDependency
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from innova_smollm.core.process_memory import read_memory
from innova_smollm.core.service import ModelService, Outcome, State

#: Error types (as in error bodies) that count as a refusal, by the rejection reason they are counted under.
REJECTION_REASONS = {
    "queue_full": "queue_full",
    "context_length_exceeded": "context_length",
    "invalid_request": "bad_input",
    "request_too_large": "bad_input",
    "unsupported_media_type": "bad_input",
    "not_ready": "not_ready",
    "timeout": "timeout",
    "authentication_error": "unauthorized",
}

# Seconds. A small model answers in milliseconds per token; a 3B one on a busy CPU can queue for minutes.
_WAIT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_FIRST_TOKEN_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_PER_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2)
_TOTAL_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)

#: Litestar adds "; charset=utf-8" to a text media type itself, so naming it here sent it twice.
CONTENT_TYPE = "text/plain; version=0.0.4"


class Metrics:
    """The app's registry and instruments; implements the service's ``Observer``."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        registry = self.registry
        self.requests = Counter(
            "smollm_http_requests",
            "HTTP requests by route template, method and status.",
            ["route", "method", "status"],
            registry=registry,
        )
        self.rejections = Counter(
            "smollm_rejections", "Requests refused without an answer, by reason.", ["reason"], registry=registry
        )
        self.cancellations = Counter(
            "smollm_cancellations",
            "Requests whose client went away before the answer was complete.",
            registry=registry,
        )
        self.finished = Counter(
            "smollm_answers",
            "Answers by finish reason and source (local, echo, echo-fallback).",
            ["finish_reason", "source"],
            registry=registry,
        )
        self.prompt_tokens = Counter("smollm_prompt_tokens", "Prompt tokens of answered requests.", registry=registry)
        self.completion_tokens = Counter("smollm_completion_tokens", "Tokens generated.", registry=registry)
        self.queue_wait = Histogram(
            "smollm_queue_wait_seconds",
            "Time from admission until the engine started the request.",
            buckets=_WAIT_BUCKETS,
            registry=registry,
        )
        self.first_token = Histogram(
            "smollm_time_to_first_token_seconds",
            "Time from arrival to the first answer text (queue + prompt).",
            buckets=_FIRST_TOKEN_BUCKETS,
            registry=registry,
        )
        self.per_token = Histogram(
            "smollm_time_per_output_token_seconds",
            "Decode time per generated token after the first.",
            buckets=_PER_TOKEN_BUCKETS,
            registry=registry,
        )
        self.total = Histogram(
            "smollm_request_duration_seconds",
            "Time from arrival to the last token of an answered request.",
            buckets=_TOTAL_BUCKETS,
            registry=registry,
        )
        ProcessCollector(registry=registry)
        registry.register(_MemoryCollector())

    def track(self, service: ModelService) -> None:
        """Gauges read from the service at scrape time, so they are never stale."""
        loaded = Gauge("smollm_model_loaded", "1 when the model is loaded and serving, else 0.", registry=self.registry)
        loaded.set_function(lambda: 1.0 if service.state is State.OK and service.engine is not None else 0.0)
        load_time = Gauge(
            "smollm_model_load_seconds", "How long loading the model took (NaN until loaded).", registry=self.registry
        )
        load_time.set_function(lambda: _load_seconds(service))
        in_flight = Gauge(
            "smollm_requests_in_flight",
            "Requests admitted and not finished (running or waiting).",
            registry=self.registry,
        )
        in_flight.set_function(lambda: float(service.in_flight))
        self.registry.register(_DecodeThreadsCollector(service))
        self.registry.register(_PromptCacheCollector(service))

    # --- the service's Observer --------------------------------------------------------------------------------

    def on_outcome(self, outcome: Outcome) -> None:
        self.finished.labels(outcome.finish_reason.value, outcome.source.value).inc()
        self.prompt_tokens.inc(outcome.prompt_tokens)
        self.completion_tokens.inc(outcome.completion_tokens)
        self.queue_wait.observe(outcome.queue_s)
        self.total.observe(outcome.total_s)
        if outcome.first_token_s is not None:
            self.first_token.observe(outcome.first_token_s)
            if outcome.decoded_tokens >= 2:
                # Per sequence: the choices of an answer with n > 1 decode side by side, a token each per step.
                decode_s = outcome.total_s - outcome.first_token_s
                self.per_token.observe(max(0.0, decode_s) / (outcome.decoded_tokens - 1))

    def on_cancelled(self) -> None:
        self.cancellations.inc()

    # --- RequestLog's per-request report -----------------------------------------------------------------------

    def on_request(self, record: Mapping[str, Any]) -> None:
        # Unmatched paths share one label, so scanners cannot blow up the series count.
        route = record.get("route") or "unmatched"
        self.requests.labels(route, record.get("method", ""), str(record.get("status", 0))).inc()
        reason = REJECTION_REASONS.get(record.get("error_type") or "")
        if reason is not None:
            self.rejections.labels(reason).inc()

    def exposition(self) -> bytes:
        return bytes(generate_latest(self.registry))


def _load_seconds(service: ModelService) -> float:
    meta = service.metadata()
    return meta.load_time_s if meta is not None else math.nan


class _DecodeThreadsCollector(Collector):
    """The thread governor's state: a gauge that drops under CPU contention and how often it moved."""

    def __init__(self, service: ModelService) -> None:
        self._service = service

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        engine = self._service.engine
        threads = GaugeMetricFamily(
            "smollm_decode_threads", "Threads decoding now (fewer than configured under CPU contention)."
        )
        moves = CounterMetricFamily(
            "smollm_decode_thread_moves",
            "Times the engine moved to fewer or more decode threads because that measured faster.",
            labels=["direction"],
        )
        if engine is not None:
            threads.add_metric([], engine.threads.settled())
            for direction, count in engine.threads.moves().items():
                moves.add_metric([direction], count)
        yield threads
        yield moves


class _PromptCacheCollector(Collector):
    """Whether the prompt cache pays: prompt tokens it spared against those decoded, and its saved states."""

    def __init__(self, service: ModelService) -> None:
        self._service = service

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        engine = self._service.engine
        stats = engine.prompt_cache() if engine is not None else None
        if stats is None:
            return
        yield _counters(
            "smollm_prompt_cache_tokens",
            "Prompt tokens taken from the prompt cache (reused) and decoded.",
            "kind",
            {"reused": stats.tokens_reused, "decoded": stats.tokens_decoded},
        )
        yield _counters(
            "smollm_prompt_states",
            "KV states of sequences saved to host memory and restored from it (SMOLLM_PROMPT_CACHE_MB).",
            "event",
            {"saved": stats.states_saved, "restored": stats.states_restored},
        )
        held = GaugeMetricFamily("smollm_prompt_states_bytes", "Bytes of saved KV states held in host memory.")
        held.add_metric([], stats.saved_bytes)
        yield held


def _counters(name: str, documentation: str, label: str, counts: Mapping[str, int]) -> CounterMetricFamily:
    family = CounterMetricFamily(name, documentation, labels=[label])
    for label_value, count in counts.items():
        family.add_metric([label_value], count)
    return family


class _MemoryCollector(Collector):
    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "smollm_process_memory_bytes",
            "Process memory from /proc/self/status and smaps_rollup, by kind.",
            labels=["kind"],
        )
        for kind, value in read_memory().items():
            family.add_metric([kind], value)
        yield family


@get(
    "/metrics",
    summary="Prometheus metrics",
    description="Requests by route and status, rejections by reason, cancellations, token counts, latency "
    "histograms (queue wait, time to first token, time per output token, total), model state and process memory.",
    tags=["operations"],
    sync_to_thread=False,
)
def metrics_endpoint(metrics: NamedDependency[Metrics]) -> Response[bytes]:
    return Response(metrics.exposition(), media_type=CONTENT_TYPE)
