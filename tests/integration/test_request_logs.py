"""One JSON line per request: id, route, status, tokens, timings, finish_reason; no text unless asked for."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from innova_smollm.engine.scheduler import GGUFEngine
from innova_smollm.logs import JsonFormatter
from tests.servers import API, LiveServer, make_settings, parse_sse, run_service, serve_in_thread, wait_until

SECRET_PROMPT = "The password of the zanzibar vault is tangerine-42."


def request_lines(caplog: pytest.LogCaptureFixture, request_id: str) -> list[dict[str, Any]]:
    """The request log lines of one request, as the JSON formatter writes them."""
    formatter = JsonFormatter()
    return [
        json.loads(formatter.format(record))
        for record in caplog.records
        if record.name == "innova_smollm.requests" and getattr(record, "request_id", None) == request_id
    ]


def logged(caplog: pytest.LogCaptureFixture, request_id: str) -> dict[str, Any]:
    # The line is written when the response is complete, which can be a moment after the client has read it.
    assert wait_until(lambda: len(request_lines(caplog, request_id)) == 1, timeout=10)
    return request_lines(caplog, request_id)[0]


@pytest.fixture(autouse=True)
def capture_request_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="innova_smollm.requests")


def test_chat_request_line_has_ids_tokens_timings_and_no_text(
    live: LiveServer, caplog: pytest.LogCaptureFixture
) -> None:
    reply = live.post(
        f"{API}/chat",
        json={"messages": [{"role": "user", "content": SECRET_PROMPT}], "max_tokens": 8},
        headers={"X-Request-ID": "backend-7f3a.1"},
    )
    assert reply.status_code == 200
    assert reply.headers["X-Request-ID"] == "backend-7f3a.1"
    line = logged(caplog, "backend-7f3a.1")
    body = reply.json()
    assert line["event"] == "request"
    assert line["method"] == "POST"
    assert line["route"] == f"{API}/chat"
    assert line["status"] == 200
    assert line["duration_ms"] > 0
    assert line["prompt_tokens"] == body["usage"]["prompt_tokens"]
    assert line["completion_tokens"] == body["usage"]["completion_tokens"]
    assert line["finish_reason"] == body["finish_reason"]
    assert line["source"] == "local"
    for timing in ("queue_ms", "first_token_ms", "generation_ms"):
        assert line[timing] >= 0
    text = json.dumps(line)
    assert "zanzibar" not in text
    assert "messages" not in line and "answer" not in line


def test_missing_or_unsafe_request_ids_are_replaced(live: LiveServer, caplog: pytest.LogCaptureFixture) -> None:
    for headers in ({}, {"X-Request-ID": "spaces are not allowed"}, {"X-Request-ID": "x" * 200}):
        reply = live.get(f"{API}/health", headers=headers)
        generated = reply.headers["X-Request-ID"]
        assert re.fullmatch(r"[0-9a-f]{32}", generated), generated
        line = logged(caplog, generated)
        assert line["route"] == f"{API}/health"
        assert line["status"] == 200


def test_streamed_answer_is_logged_with_its_outcome(live: LiveServer, caplog: pytest.LogCaptureFixture) -> None:
    reply = live.post(
        "/v1/chat/completions",
        json={"messages": [{"role": "user", "content": SECRET_PROMPT}], "max_tokens": 6, "stream": True},
        headers={"X-Request-ID": "stream-1"},
    )
    chunks = [json.loads(data) for _, data in parse_sse(reply.text) if data != "[DONE]"]
    line = logged(caplog, "stream-1")
    assert line["route"] == "/v1/chat/completions"
    assert line["status"] == 200
    assert line["completion_tokens"] >= 1
    assert line["finish_reason"] == next(
        c["choices"][0]["finish_reason"] for c in chunks if c["choices"][0]["finish_reason"]
    )
    assert "zanzibar" not in json.dumps(line)


def test_errors_are_logged_with_their_type(live: LiveServer, caplog: pytest.LogCaptureFixture) -> None:
    live.post(f"{API}/chat", json={"messages": [], "max_tokens": 4}, headers={"X-Request-ID": "bad-1"})
    live.get("/no/such/page", headers={"X-Request-ID": "missing-1"})
    bad, missing = logged(caplog, "bad-1"), logged(caplog, "missing-1")
    assert (bad["status"], bad["error_type"]) == (400, "invalid_request")
    assert (missing["status"], missing["error_type"], missing["route"]) == (404, "not_found", None)


@pytest.fixture
def content_logging(engine: GGUFEngine, model_path: Path) -> Iterator[LiveServer]:
    with serve_in_thread(make_settings(model_path, log_content=True), engine=engine) as server:
        yield server


def test_text_is_logged_only_when_asked(content_logging: LiveServer, caplog: pytest.LogCaptureFixture) -> None:
    reply = content_logging.post(
        f"{API}/chat",
        json={"messages": [{"role": "user", "content": SECRET_PROMPT}], "max_tokens": 6},
        headers={"X-Request-ID": "with-content"},
    )
    line = logged(caplog, "with-content")
    assert line["messages"] == [{"role": "user", "content": SECRET_PROMPT}]
    assert line["answer"] == reply.json()["response"]


def test_the_service_writes_json_request_lines_to_its_output() -> None:
    with run_service({"SMOLLM_LOG_LEVEL": "INFO"}) as service:
        assert wait_until(lambda: requests.get(service.url + f"{API}/health", timeout=5).status_code == 200, timeout=60)
        reply = requests.post(
            service.url + f"{API}/generate",
            json={"prompt": SECRET_PROMPT, "max_tokens": 3},
            headers={"X-Request-ID": "from-the-backend"},
            timeout=60,
        )
        assert reply.status_code == 200
        output = service.output()
    lines = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    mine = [line for line in lines if line.get("request_id") == "from-the-backend"]
    assert len(mine) == 1, output
    assert mine[0]["event"] == "request"
    assert mine[0]["route"] == f"{API}/generate"
    assert mine[0]["completion_tokens"] == reply.json()["usage"]["completion_tokens"]
    assert "zanzibar" not in output


def test_log_levels_keep_errors_for_faults() -> None:
    from innova_smollm.http.requestlog import _level_of

    assert _level_of(503, "/innova/api/smollm/health") == logging.INFO
    assert _level_of(503, "/innova/api/smollm/chat") == logging.WARNING
    assert _level_of(500, "/innova/api/smollm/chat") == logging.ERROR
    assert _level_of(200, "/innova/api/smollm/chat") == logging.INFO
    assert _level_of(400, "/v1/chat/completions") == logging.INFO
