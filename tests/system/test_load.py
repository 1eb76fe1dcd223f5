"""A bounded load run at twice the service's capacity, on loopback, with the real model.

Twice as many clients as the service admits (SMOLLM_PARALLEL + SMOLLM_MAX_QUEUE) each send a fixed number of short
requests back to back, through every generating route, streamed and not. What must hold: every request gets an
answer or a 503 with Retry-After (a JSON queue_full error), none outlives its client timeout, and /health answers
promptly throughout, because health never touches the engine. Counts are printed (run with -s to see them).
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from innova_smollm.engine.scheduler import GGUFEngine
from tests.servers import API, LiveServer, make_settings, serve_in_thread

#: Bounded inside by RUN_BOUND_S; this only keeps pytest-timeout's default (300 s) from firing first.
pytestmark = [pytest.mark.system, pytest.mark.timeout(900)]


PARALLEL = 1
MAX_QUEUE = 4
CLIENTS = 2 * (PARALLEL + MAX_QUEUE)
REQUESTS_PER_CLIENT = 4
#: Every request's own timeout: a request still unanswered by then has hung.
CLIENT_TIMEOUT_S = 120.0
#: The whole run's bound; it normally takes well under a minute.
RUN_BOUND_S = 300.0
#: Health never waits for the engine, so even on two busy shared cores it answers well within this.
HEALTH_BOUND_S = 1.0


def calls() -> list[tuple[str, dict[str, Any]]]:
    chat = {"messages": [{"role": "user", "content": "Say something about load."}], "max_tokens": 8}
    prompt = {"prompt": "Count: 1, 2, 3,", "max_tokens": 8}
    return [
        (f"{API}/chat", chat),
        (f"{API}/generate", {**prompt, "stream": True}),
        ("/v1/chat/completions", {**chat, "stream": True}),
        ("/innova/api/chatlaya/message", chat),
        ("/v1/completions", prompt),
        (f"{API}/chat", {**chat, "stream": True}),
    ]


@pytest.fixture(scope="module")
def loaded_server(engine: GGUFEngine, model_path: Path) -> Iterator[LiveServer]:
    settings = make_settings(model_path, parallel=PARALLEL, max_queue=MAX_QUEUE, max_tokens=64)
    with serve_in_thread(settings, engine=engine) as server:
        yield server


class Tally:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.outcomes: collections.Counter[str] = collections.Counter()
        self.problems: list[str] = []
        self.slowest_s = 0.0

    def add(self, outcome: str, took: float, problem: str | None = None) -> None:
        with self.lock:
            self.outcomes[outcome] += 1
            self.slowest_s = max(self.slowest_s, took)
            if problem:
                self.problems.append(problem)


def one_request(url: str, path: str, body: dict[str, Any], tally: Tally) -> None:
    started = time.monotonic()
    streamed = bool(body.get("stream")) or path.endswith("/message")
    try:
        with requests.post(url + path, json=body, stream=streamed, timeout=CLIENT_TIMEOUT_S) as reply:
            content = reply.content
            took = time.monotonic() - started
            if reply.status_code == 200:
                finished = b"event: done" in content or b"data: [DONE]" in content or not streamed
                failed = b"event: error" in content or b'data: {"error"' in content
                if finished and not failed:
                    tally.add("200", took)
                else:
                    tally.add("200-broken", took, f"{path}: a 200 that did not finish well: {content[-300:]!r}")
            elif reply.status_code == 503:
                error = reply.json()["error"]
                kind = error.get("code") or error.get("type")
                if reply.headers.get("Retry-After", "").isdigit() and kind == "queue_full":
                    tally.add("503", took)
                else:
                    tally.add("503-bad", took, f"{path}: 503 without Retry-After or not queue_full: {reply.text}")
            else:
                tally.add(str(reply.status_code), took, f"{path}: {reply.status_code} {reply.text[:300]}")
    except requests.RequestException as exc:
        tally.add("no-answer", time.monotonic() - started, f"{path}: {exc!r}")


def test_twice_the_capacity_gets_answers_or_503s_and_health_stays_prompt(loaded_server: LiveServer) -> None:
    tally = Tally()
    plan = calls()
    barrier = threading.Barrier(CLIENTS)

    def client(index: int) -> None:
        barrier.wait()
        for n in range(REQUESTS_PER_CLIENT):
            path, body = plan[(index + n) % len(plan)]
            one_request(loaded_server.url, path, body, tally)

    health_latencies: list[float] = []
    health_problems: list[str] = []
    stop = threading.Event()

    def probe() -> None:
        with requests.Session() as session:
            while not stop.is_set():
                started = time.monotonic()
                try:
                    with session.get(f"{loaded_server.url}{API}/health", timeout=10) as reply:
                        if reply.status_code != 200:
                            health_problems.append(f"{reply.status_code} {reply.text}")
                except requests.RequestException as exc:
                    health_problems.append(repr(exc))
                health_latencies.append(time.monotonic() - started)
                stop.wait(0.1)

    prober = threading.Thread(target=probe, daemon=True)
    clients = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(CLIENTS)]
    started = time.monotonic()
    prober.start()
    for thread in clients:
        thread.start()
    deadline = started + RUN_BOUND_S
    for thread in clients:
        thread.join(timeout=max(0.0, deadline - time.monotonic()))
    duration = time.monotonic() - started
    stop.set()
    prober.join(timeout=30)

    assert not any(thread.is_alive() for thread in clients), f"clients still running after {RUN_BOUND_S}s"
    total = sum(tally.outcomes.values())
    ordered = sorted(health_latencies)
    p50 = ordered[len(ordered) // 2] if ordered else float("nan")
    print(
        f"\nload: {CLIENTS} clients x {REQUESTS_PER_CLIENT} requests against capacity {PARALLEL + MAX_QUEUE} "
        f"in {duration:.1f}s: {dict(sorted(tally.outcomes.items()))}; slowest answer {tally.slowest_s:.2f}s; "
        f"health {len(ordered)} checks, median {p50 * 1000:.0f} ms, worst {max(ordered, default=0) * 1000:.0f} ms"
    )
    assert total == CLIENTS * REQUESTS_PER_CLIENT
    assert not tally.problems, tally.problems[:5]
    assert tally.outcomes["200"] >= PARALLEL + MAX_QUEUE, "too few requests were answered"
    assert tally.outcomes["503"] > 0, "twice the capacity never filled the queue"
    assert tally.slowest_s < CLIENT_TIMEOUT_S
    assert not health_problems, health_problems[:5]
    assert len(ordered) >= 5
    assert max(ordered) < HEALTH_BOUND_S, f"health took {max(ordered):.2f}s under load"

    # Nothing is left in the system, and the service still serves.
    with requests.get(f"{loaded_server.url}{API}/info", timeout=30) as info:
        assert info.json()["in_flight"] == 0
    with requests.post(f"{loaded_server.url}{API}/chat", json=calls()[0][1], timeout=CLIENT_TIMEOUT_S) as reply:
        assert reply.status_code == 200, reply.text
