"""The native HTTP API against the real model through real uvicorn."""

from __future__ import annotations

import json

import pytest
import requests

from tests.servers import API, LONG_PROMPT, LiveServer, forget_cached_prompt, parse_sse

SEED_PAYLOAD = {
    "messages": [{"role": "user", "content": "Bonjour, que peux-tu faire pour KORYXA ?"}],
    "max_tokens": 512,
    "temperature": 0.7,
}


def test_chat_answers_the_seed_payload_with_model_text(live: LiveServer) -> None:
    reply = live.post(f"{API}/chat", json={**SEED_PAYLOAD, "max_tokens": 48})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["response"].strip()
    assert body["finish_reason"] in {"stop", "length"}
    info = body["model_info"]
    assert info["model_name"] == "SmolLM2-135M-Instruct.Q4_1"
    assert info["provider"] == "local"
    assert info["device"] == "cpu"
    assert info["quantization"] == "Q4_1"
    # The real count read from llama.cpp (shared/ENVIRONMENT.md gives it for this file), not a constant.
    assert info["parameters"] == 134_515_008
    usage = body["usage"]
    assert usage["prompt_tokens"] > 10
    assert 1 <= usage["completion_tokens"] <= 48
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert body["timings"]["total_ms"] > 0


def test_greedy_chat_is_repeatable_and_max_tokens_is_honoured(live: LiveServer) -> None:
    payload = {"messages": [{"role": "user", "content": "Name a fruit."}], "max_tokens": 5, "temperature": 0}
    answers = []
    for _ in range(2):
        forget_cached_prompt(live)
        answers.append(live.post(f"{API}/chat", json=payload).json())
    first, second = answers
    assert first["response"] == second["response"]
    assert first["usage"]["completion_tokens"] <= 5


def test_seeded_sampling_is_repeatable(live: LiveServer) -> None:
    payload = {"messages": [{"role": "user", "content": "Tell me a word."}], "max_tokens": 12, "seed": 42}
    answers = set()
    for _ in range(2):
        forget_cached_prompt(live)
        answers.add(live.post(f"{API}/chat", json=payload).json()["response"])
    assert len(answers) == 1


def test_generate_continues_raw_text(live: LiveServer) -> None:
    reply = live.post(f"{API}/generate", json={"prompt": LONG_PROMPT, "max_tokens": 12, "temperature": 0})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["text"].strip().startswith("5")
    assert body["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 12


def test_stop_strings_end_the_answer_and_are_not_included(live: LiveServer) -> None:
    reply = live.post(
        f"{API}/generate", json={"prompt": LONG_PROMPT, "max_tokens": 40, "temperature": 0, "stop": ["8"]}
    )
    body = reply.json()
    assert body["finish_reason"] == "stop"
    assert "8" not in body["text"]
    assert "7" in body["text"]


@pytest.mark.parametrize(
    ("path", "payload"),
    [
        (f"{API}/chat", {"messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 16, "stream": True}),
        (f"{API}/generate", {"prompt": LONG_PROMPT, "max_tokens": 16, "stream": True}),
        ("/innova/api/chatlaya/message", {"messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 16}),
    ],
)
def test_streams_send_token_events_then_done(live: LiveServer, path: str, payload: dict[str, object]) -> None:
    reply = live.post(path, json={**payload, "temperature": 0})
    assert reply.status_code == 200
    assert reply.headers["content-type"].startswith("text/event-stream")
    events = parse_sse(reply.text)
    names = [name for name, _ in events]
    assert names.count("done") == 1 and names[-1] == "done"
    tokens = [json.loads(data)["text"] for name, data in events if name == "token"]
    assert len(tokens) >= 3
    done = json.loads(events[-1][1])
    assert done["finish_reason"] in {"stop", "length"}
    assert done["usage"]["completion_tokens"] >= len(tokens) - 1
    assert done["model_info"]["model_name"] == "SmolLM2-135M-Instruct.Q4_1"


def test_stream_text_equals_the_plain_answer(live: LiveServer) -> None:
    payload = {"messages": [{"role": "user", "content": "What is 2 + 2?"}], "max_tokens": 20, "temperature": 0}
    forget_cached_prompt(live)
    plain = live.post(f"{API}/chat", json=payload).json()["response"]
    forget_cached_prompt(live)
    events = parse_sse(live.post(f"{API}/chat", json={**payload, "stream": True}).text)
    streamed = "".join(json.loads(data)["text"] for name, data in events if name == "token")
    assert streamed == plain


def test_health_answers_ok_on_get_and_post(live: LiveServer) -> None:
    for reply in (live.get(f"{API}/health"), live.post(f"{API}/health")):
        assert reply.status_code == 200
        assert reply.json() == {"status": "ok"}


def test_info_describes_the_model(live: LiveServer) -> None:
    info = live.get(f"{API}/info").json()
    assert info["state"] == "ok"
    assert info["architecture"] == "llama"
    assert info["parameters"] == 134_515_008
    assert info["file_size_bytes"] == 98_362_432
    assert info["quantization"] == "Q4_1"
    assert info["n_ctx"] == 1024
    assert info["n_threads"] == 2
    # SMOLLM_PARALLEL's default, and the layout ``auto`` picks for this small model's four 1024-token windows.
    assert info["parallel"] == 4
    assert info["kv_layout"] == "per_sequence"
    assert info["step_tokens"] == 512  # a model under 1B parameters (engine/step_size.py)
    assert info["has_chat_template"] is True
    assert info["llama_cpp_python_version"]
    assert info["load_time_s"] >= 0


def test_context_overflow_is_a_400_with_the_counts(live: LiveServer) -> None:
    long_text = "word " * 1500
    reply = live.post(f"{API}/chat", json={"messages": [{"role": "user", "content": long_text}], "max_tokens": 10})
    assert reply.status_code == 400
    error = reply.json()["error"]
    assert error["type"] == "context_length_exceeded"
    assert error["details"]["n_ctx"] == 1024
    assert error["details"]["prompt_tokens"] > 1024
    assert "1024" in error["message"]


def test_max_tokens_that_does_not_fit_after_the_prompt_is_a_400(live: LiveServer) -> None:
    reply = live.post(f"{API}/generate", json={"prompt": "word " * 700, "max_tokens": 500})
    assert reply.status_code == 400
    error = reply.json()["error"]
    assert error["type"] == "context_length_exceeded"
    assert error["field"] == "max_tokens"
    assert error["details"]["max_tokens_that_fit"] == 1024 - error["details"]["prompt_tokens"]


def test_openapi_schema_is_served_and_documents_fields(live: LiveServer) -> None:
    schema = live.get("/schema/openapi.json").json()
    paths = schema["paths"]
    for path in ("chat", "generate", "info", "health"):
        assert f"{API}/{path}" in paths
    assert "/innova/api/chatlaya/message" in paths
    assert "200" in paths[f"{API}/health"]["post"]["responses"]  # as served, not Litestar's POST default of 201
    chat_request = schema["components"]["schemas"]["ChatRequest"]
    assert chat_request["properties"]["max_tokens"]["oneOf"] or chat_request["properties"]["max_tokens"]
    assert "description" in json.dumps(chat_request)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role"),
        ({"messages": [{"role": "user"}]}, "messages[0]"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, "max_tokens"),
        ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": "ten"}, "max_tokens"),
        ({"messages": [{"role": "user", "content": "hi"}], "temperature": 9}, "temperature"),
        ({"messages": [{"role": "user", "content": "hi"}], "top_p": 0}, "top_p"),
        ({"messages": [{"role": "user", "content": "hi"}], "max_token": 5}, "max_token"),
        ({"messages": [{"role": "user", "content": "hi"}], "stop": [""]}, "stop"),
        ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100000}, "max_tokens"),
        ({"prompt_typo": "x"}, None),
    ],
)
def test_bad_chat_bodies_are_4xx_naming_the_field(live: LiveServer, body: dict[str, object], field: str | None) -> None:
    reply = live.post(f"{API}/chat", json=body)
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["type"] == "invalid_request"
    assert error["message"]
    if field is not None:
        assert field in (error.get("field") or "") + error["message"]
    assert "Traceback" not in reply.text


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"messages": [{"role": "user", "content": "hi"}], "max_token": 5}, "max_token"),
        ({"messages": [{"role": "user", "content": "hi", "nmae": "x"}]}, "messages[0].nmae"),
    ],
)
def test_an_unknown_field_is_named_as_the_field_not_the_body(
    live: LiveServer, body: dict[str, object], field: str
) -> None:
    reply = live.post(f"{API}/chat", json=body)
    assert reply.status_code == 400
    assert reply.json()["error"]["field"] == field


@pytest.mark.parametrize(
    ("data", "headers"),
    [
        (b"{not json", {"content-type": "application/json"}),
        (b"\xff\xfe\xfa", {"content-type": "application/json"}),
        (b"[1, 2, 3]", {"content-type": "application/json"}),
        (b"", {"content-type": "application/json"}),
        (b"messages=hello", {"content-type": "application/x-www-form-urlencoded"}),
    ],
)
def test_malformed_bodies_are_400(live: LiveServer, data: bytes, headers: dict[str, str]) -> None:
    reply = live.post(f"{API}/chat", data=data, headers=headers)
    assert 400 <= reply.status_code < 500, reply.text
    assert reply.json()["error"]["message"]


def test_too_large_body_is_413(live: LiveServer) -> None:
    huge = {"messages": [{"role": "user", "content": "x" * 150_000}] * 10}
    reply = live.post(f"{API}/chat", json=huge)
    assert reply.status_code == 413
    assert reply.json()["error"]["type"] == "request_too_large"


def test_unknown_route_and_wrong_method_have_json_errors(live: LiveServer) -> None:
    missing = live.get(f"{API}/nope")
    assert missing.status_code == 404
    assert missing.json()["error"]["type"] == "not_found"
    wrong = live.get(f"{API}/chat")
    assert wrong.status_code == 405
    assert wrong.json()["error"]["type"] == "method_not_allowed"


def test_the_server_still_serves_after_bad_input(live: LiveServer) -> None:
    live.post(f"{API}/chat", data=b"\x00" * 100, headers={"content-type": "application/json"})
    assert live.get(f"{API}/health").status_code == 200
    reply = live.post(f"{API}/chat", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
    assert reply.status_code == 200


def test_requests_library_errors_are_not_raised_for_sse(live: LiveServer) -> None:
    # A streamed answer is readable incrementally, which is what the backend's UI does.
    with requests.post(
        live.url + "/innova/api/chatlaya/message",
        json={"messages": [{"role": "user", "content": "Count to five."}], "max_tokens": 24},
        stream=True,
        timeout=60,
    ) as reply:
        lines = [line for line in reply.iter_lines(decode_unicode=True) if line.startswith("event:")]
    assert lines[-1] == "event: done"
