"""The OpenAI-compatible API, driven by the real ``openai`` SDK against the real model through real uvicorn."""

from __future__ import annotations

import http.client
import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import requests

from innova_smollm.engine.scheduler import GGUFEngine
from innova_smollm.settings import KVLayout
from tests.servers import (
    API,
    LONG_PROMPT,
    NEVER_ENDS,
    LiveServer,
    forget_cached_prompt,
    make_settings,
    parse_sse,
    serve_in_thread,
    wait_until,
)

MODEL = "SmolLM2-135M-Instruct.Q4_1"


@pytest.fixture
def client(live: LiveServer) -> Iterator[openai.OpenAI]:
    # No retries: a 503 must show up as an error here, not be retried away by the SDK.
    with openai.OpenAI(base_url=live.url + "/v1", api_key="not-needed", max_retries=0, timeout=120) as sdk:
        yield sdk


def test_chat_completion_with_the_sdk(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model="whatever-the-tool-sends",
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hello."}],
        max_tokens=16,
        temperature=0,
    )
    assert completion.object == "chat.completion"
    assert completion.id.startswith("chatcmpl-")
    assert completion.created > 1_700_000_000
    assert completion.model == MODEL
    choice = completion.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content and choice.message.content.strip()
    assert choice.finish_reason in {"stop", "length"}
    assert completion.usage is not None
    assert completion.usage.prompt_tokens > 5
    assert 1 <= completion.usage.completion_tokens <= 16
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + completion.usage.completion_tokens


def test_openai_and_native_chat_give_the_same_greedy_answer(client: openai.OpenAI, live: LiveServer) -> None:
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    native = live.post(f"{API}/chat", json={"messages": messages, "max_tokens": 20, "temperature": 0}).json()
    completion = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20, temperature=0)
    assert completion.choices[0].message.content == native["response"]
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == native["usage"]["prompt_tokens"]


def test_streaming_chat_with_usage(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "Count to five."}]
    plain = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=24, temperature=0)
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=messages,
            max_tokens=24,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert all(chunk.object == "chat.completion.chunk" for chunk in chunks)
    assert len({chunk.id for chunk in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert text == plain.choices[0].message.content
    finishes = [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices and chunk.choices[0].finish_reason]
    assert finishes == [plain.choices[0].finish_reason]
    # include_usage: one last chunk with no choices and the usage, exactly as OpenAI sends it.
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    assert all(chunk.usage is None for chunk in chunks[:-1])


def test_stream_is_sse_data_lines_ending_with_done(live: LiveServer) -> None:
    reply = live.post(
        "/v1/chat/completions",
        json={"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8, "stream": True},
    )
    assert reply.status_code == 200
    assert reply.headers["content-type"].startswith("text/event-stream")
    events = parse_sse(reply.text)
    assert all(name == "message" for name, _ in events)  # no `event:` lines: plain OpenAI framing
    assert events[-1][1] == "[DONE]"
    assert "usage" not in json.loads(events[-2][1]) or json.loads(events[-2][1])["usage"] is None


def test_text_completion_with_the_sdk(client: openai.OpenAI) -> None:
    completion = client.completions.create(model=MODEL, prompt=LONG_PROMPT, max_tokens=12, temperature=0)
    assert completion.object == "text_completion"
    assert completion.id.startswith("cmpl-")
    assert completion.choices[0].text.strip().startswith("5")
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage is not None and completion.usage.completion_tokens == 12
    streamed = client.completions.create(
        model=MODEL,
        prompt=[LONG_PROMPT],
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(streamed)
    assert "".join(chunk.choices[0].text for chunk in chunks if chunk.choices) == completion.choices[0].text
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 12


def test_models_list(client: openai.OpenAI) -> None:
    models = client.models.list().data
    assert [model.id for model in models] == [MODEL]
    assert models[0].object == "model"
    assert models[0].owned_by == "innova-smollm"


def test_over_long_prompt_is_bad_request_with_context_length_exceeded(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "word " * 1500}], max_tokens=10
        )
    error = caught.value
    assert error.status_code == 400
    assert error.code == "context_length_exceeded"
    assert error.type == "invalid_request_error"
    assert "maximum context length is 1024 tokens" in error.message


def test_metadata_sampling_fields_and_content_parts_are_accepted(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model=MODEL,
        messages=[
            {"role": "developer", "content": "Answer in one word."},
            {"role": "user", "content": [{"type": "text", "text": "Name a "}, {"type": "text", "text": "colour."}]},
        ],
        max_completion_tokens=6,
        temperature=0.5,
        top_p=0.9,
        seed=7,
        stop=["\n\n"],
        n=1,
        user="someone",
        metadata={"team": "koryxa"},
        store=False,
        service_tier="auto",
        frequency_penalty=0.5,
        presence_penalty=0.5,
        logit_bias={"0": -100},
        logprobs=False,
        modalities=["text"],
        tool_choice="none",
        extra_body={"top_k": 5, "min_p": 0.1, "repeat_penalty": 1.1},
    )
    assert completion.choices[0].message.content
    assert completion.usage is not None and completion.usage.completion_tokens <= 6


def test_unknown_fields_are_400s_naming_them(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "hi"}],
            extra_body={"an_unknown_field": {"nested": True}},
        )
    assert caught.value.param == "an_unknown_field"
    assert "an_unknown_field" in caught.value.message


@pytest.mark.parametrize(
    ("overrides", "param"),
    [
        ({"temperature": 9}, "temperature"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 100_000}, "max_tokens"),
        ({"n": 5}, "n"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].tool_call_id"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x"}}]}]},
            "messages[0].content[0]",
        ),
    ],
)
def test_invalid_requests_are_openai_shaped_400s(live: LiveServer, overrides: dict[str, object], param: str) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **overrides}
    reply = live.post("/v1/chat/completions", json=body)
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert param in (error["param"] or "") + error["message"]
    assert "Traceback" not in reply.text


def test_malformed_json_on_v1_is_an_openai_shaped_400(live: LiveServer) -> None:
    reply = live.post("/v1/chat/completions", data=b"{nope", headers={"content-type": "application/json"})
    assert reply.status_code == 400
    assert reply.json()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize(("method", "path", "status"), [("GET", "/v1/nope", 404), ("GET", "/v1/chat/completions", 405)])
def test_unknown_v1_paths_and_methods_answer_in_openais_shape(
    live: LiveServer, method: str, path: str, status: int
) -> None:
    reply = requests.request(method, live.url + path, timeout=60)
    assert reply.status_code == status
    error = reply.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["code"] == {404: "not_found", 405: "method_not_allowed"}[status]
    assert error["message"]


def test_native_routes_keep_their_error_shape(live: LiveServer) -> None:
    reply = live.post(f"{API}/chat", json={"messages": [{"role": "user", "content": "hi"}], "temperature": 9})
    error = reply.json()["error"]
    assert error["type"] == "invalid_request"
    assert "code" not in error


def test_openai_routes_are_in_the_schema(live: LiveServer) -> None:
    paths = live.get("/schema/openapi.json").json()["paths"]
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/models", "/metrics"):
        assert path in paths


def in_flight(server: LiveServer) -> int:
    return int(server.get(f"{API}/info").json()["in_flight"])


#: Enough room that a counting answer is still running when a test acts, however fast the machine is that day.
RUNWAY_TOKENS = 6000


@pytest.fixture(scope="module")
def runway_engine(model_path: Path) -> Iterator[GGUFEngine]:
    """A model with a context long enough for minutes of generation."""
    engine = GGUFEngine(make_settings(model_path, n_ctx=RUNWAY_TOKENS + 256))
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def runway(runway_engine: GGUFEngine, model_path: Path) -> Iterator[LiveServer]:
    settings = make_settings(model_path, n_ctx=RUNWAY_TOKENS + 256, max_tokens=RUNWAY_TOKENS)
    with serve_in_thread(settings, engine=runway_engine) as server:
        yield server


def test_a_stream_whose_client_leaves_stops_and_frees_its_place(runway: LiveServer) -> None:
    payload = {"prompt": LONG_PROMPT, "max_tokens": RUNWAY_TOKENS, "temperature": 0, "stream": True}
    with requests.post(runway.url + "/v1/completions", json=payload, stream=True, timeout=60) as reply:
        assert reply.status_code == 200
        # Keep the line iterator referenced: dropping it closes the connection, i.e. leaves early.
        lines = reply.iter_lines()
        assert next(lines).startswith(b"data: ")
        assert in_flight(runway) == 1
    assert wait_until(lambda: in_flight(runway) == 0, timeout=10)
    assert wait_until(lambda: "smollm_cancellations_total 1.0" in runway.get("/metrics").text, timeout=10)


def test_a_plain_request_whose_client_leaves_stops_and_frees_its_place(runway: LiveServer) -> None:
    payload = {"model": MODEL, "prompt": LONG_PROMPT, "max_tokens": RUNWAY_TOKENS, "temperature": 0}
    with pytest.raises(requests.exceptions.ReadTimeout):
        requests.post(runway.url + "/v1/completions", json=payload, timeout=(5, 0.5))
    assert wait_until(lambda: in_flight(runway) == 0, timeout=10)
    assert wait_until(lambda: "smollm_cancellations_total 2.0" in runway.get("/metrics").text, timeout=10)


def test_a_generation_cut_by_the_server_deadline_finishes_with_length(
    runway_engine: GGUFEngine, model_path: Path
) -> None:
    settings = make_settings(model_path, n_ctx=RUNWAY_TOKENS + 256, max_tokens=RUNWAY_TOKENS, request_timeout_s=2.0)
    with (
        serve_in_thread(settings, engine=runway_engine) as server,
        openai.OpenAI(base_url=server.url + "/v1", api_key="-", max_retries=0) as sdk,
    ):
        completion = sdk.completions.create(model=MODEL, prompt=LONG_PROMPT, max_tokens=RUNWAY_TOKENS, temperature=0)
        metrics = server.get("/metrics").text
    # The native finish_reason is `timeout` (SMOLLM_REQUEST_TIMEOUT_S ran out); OpenAI clients get `length`.
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage is not None and completion.usage.completion_tokens < RUNWAY_TOKENS
    assert 'smollm_answers_total{finish_reason="timeout",source="local"} 1.0' in metrics


def streamed_completion_text(events: list[tuple[str, str]]) -> str:
    assert events[-1][1] == "[DONE]"
    return "".join(json.loads(data)["choices"][0]["text"] for _, data in events[:-1] if json.loads(data)["choices"])


def test_a_stream_matches_the_plain_answer(live: LiveServer) -> None:
    payload = {"model": MODEL, "prompt": LONG_PROMPT, "max_tokens": 24, "temperature": 0}
    forget_cached_prompt(live)
    plain = live.post("/v1/completions", json=payload).json()["choices"][0]["text"]
    forget_cached_prompt(live)
    reply = live.post("/v1/completions", json={**payload, "stream": True})
    assert streamed_completion_text(parse_sse(reply.text)) == plain


@pytest.fixture(scope="module")
def small_send_buffer(engine: GGUFEngine, model_path: Path) -> Iterator[LiveServer]:
    with serve_in_thread(make_settings(model_path, max_tokens=1000), engine=engine, send_buffer=4096) as server:
        yield server


def test_a_client_reading_slower_than_the_model_gets_the_whole_stream_in_fewer_larger_chunks(
    small_send_buffer: LiveServer, engine: GGUFEngine
) -> None:
    live = small_send_buffer
    # Long enough to fill what the sockets and uvicorn's write buffer (64 KiB before it pauses) hold between them.
    payload = {"model": MODEL, "prompt": LONG_PROMPT, "max_tokens": 960, "temperature": 0}
    forget_cached_prompt(live)
    plain = live.post("/v1/completions", json=payload).json()["choices"][0]["text"]
    forget_cached_prompt(live)
    # A small receive window, and nothing read until the model has finished: the server's socket fills up, the
    # stream waits in ASGI send, and the text made meanwhile must go out when it resumes, joined, in order.
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)
    sock.connect(live.address)
    connection = http.client.HTTPConnection(*live.address, timeout=120)
    connection.sock = sock
    request = {**payload, "stream": True, "stream_options": {"include_usage": True}}
    before = engine.last_finish
    try:
        connection.request("POST", "/v1/completions", json.dumps(request), {"Content-Type": "application/json"})
        reply = connection.getresponse()
        assert reply.status == 200
        assert wait_until(lambda: engine.last_finish is not before, timeout=120), "the model did not finish"
        body = reply.read().decode()
    finally:
        connection.close()
    events = parse_sse(body)
    assert streamed_completion_text(events) == plain
    chunks = [json.loads(data) for _, data in events[:-1]]
    usage = chunks[-1]["usage"]
    text_chunks = [chunk for chunk in chunks if chunk["choices"] and chunk["choices"][0]["text"]]
    assert usage["completion_tokens"] == 960
    assert len(text_chunks) < usage["completion_tokens"] * 3 // 4, (len(text_chunks), usage)


# --- n choices ------------------------------------------------------------------------------------------------

#: Sampled, seeded, and never ending early: every choice runs to max_tokens, so the counts are known.
CHOICES = {"temperature": 1.0, "seed": 21, "max_tokens": 10, "logit_bias": NEVER_ENDS}
COLOURS = [{"role": "user", "content": "Name a colour and say why you like it."}]


def streamed_choices(chunks: list[Any]) -> tuple[dict[int, str], dict[int, str], Any]:
    """Each choice's text and finish_reason from a stream's chunks, and the usage chunk's usage."""
    texts: dict[int, str] = {}
    reasons: dict[int, str] = {}
    usage = None
    for chunk in chunks:
        usage = chunk.usage or usage
        for choice in chunk.choices:
            delta = choice.delta.content if hasattr(choice, "delta") else choice.text
            texts[choice.index] = texts.get(choice.index, "") + (delta or "")
            if choice.finish_reason:
                assert choice.index not in reasons, "one finish_reason per choice"
                reasons[choice.index] = choice.finish_reason
    return texts, reasons, usage


def test_n_chat_choices_whole_and_streamed(client: openai.OpenAI, live: LiveServer, engine: GGUFEngine) -> None:
    forget_cached_prompt(live)
    one = client.chat.completions.create(model=MODEL, messages=COLOURS, **CHOICES)  # type: ignore[arg-type]
    assert one.usage is not None
    forget_cached_prompt(live)
    decoded = engine.prompt_tokens_reused + engine.prompt_tokens_prefilled
    whole = client.chat.completions.create(model=MODEL, messages=COLOURS, n=2, **CHOICES)  # type: ignore[arg-type]
    # The prompt was decoded once for both choices (reused from the cache or prefilled, never twice).
    assert engine.prompt_tokens_reused + engine.prompt_tokens_prefilled - decoded == one.usage.prompt_tokens
    assert [choice.index for choice in whole.choices] == [0, 1]
    assert [choice.finish_reason for choice in whole.choices] == ["length", "length"]
    texts = [choice.message.content for choice in whole.choices]
    assert all(texts) and texts[0] != texts[1], "seeded choices draw on their own (seed + index)"
    assert whole.usage is not None
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (one.usage.prompt_tokens, 2 * 10)
    assert whole.usage.total_tokens == one.usage.prompt_tokens + 20

    forget_cached_prompt(live)
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=COLOURS,  # type: ignore[arg-type]
            n=2,
            stream=True,
            stream_options={"include_usage": True},
            **CHOICES,  # type: ignore[arg-type]
        )
    )
    roles = [(choice.index, choice.delta.role) for chunk in chunks for choice in chunk.choices if choice.delta.role]
    assert roles == [(0, "assistant"), (1, "assistant")]
    streamed, reasons, usage = streamed_choices(chunks)
    # The same seed gives the same choices, streamed or not.
    assert streamed == {0: texts[0], 1: texts[1]}
    assert reasons == {0: "length", 1: "length"}
    assert usage is not None and (usage.prompt_tokens, usage.completion_tokens) == (one.usage.prompt_tokens, 20)


def test_n_greedy_chat_choices_are_the_same_answer(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(model=MODEL, messages=COLOURS, n=3, max_tokens=12, temperature=0)
    assert len({choice.message.content for choice in completion.choices}) == 1


def test_n_text_completion_choices_whole_and_streamed(client: openai.OpenAI, live: LiveServer) -> None:
    forget_cached_prompt(live)
    whole = client.completions.create(model=MODEL, prompt="My favourite colour is", n=2, **CHOICES)  # type: ignore[arg-type]
    assert [choice.index for choice in whole.choices] == [0, 1]
    assert [choice.finish_reason for choice in whole.choices] == ["length", "length"]
    assert whole.usage is not None and whole.usage.completion_tokens == 20
    forget_cached_prompt(live)
    chunks = list(
        client.completions.create(
            model=MODEL,
            prompt="My favourite colour is",
            n=2,
            stream=True,
            stream_options={"include_usage": True},
            **CHOICES,  # type: ignore[arg-type]
        )
    )
    streamed, reasons, usage = streamed_choices(chunks)
    assert streamed == {0: whole.choices[0].text, 1: whole.choices[1].text}
    assert reasons == {0: "length", 1: "length"}
    assert usage is not None and usage.prompt_tokens == whole.usage.prompt_tokens and usage.completion_tokens == 20


def test_native_n_choices_whole_and_streamed(live: LiveServer) -> None:
    body = {"messages": COLOURS, "n": 2, **CHOICES}
    forget_cached_prompt(live)
    whole = live.post(f"{API}/chat", json=body).json()
    assert [choice["index"] for choice in whole["choices"]] == [0, 1]
    assert whole["response"] == whole["choices"][0]["text"]
    assert [choice["completion_tokens"] for choice in whole["choices"]] == [10, 10]
    assert whole["usage"]["completion_tokens"] == 20
    forget_cached_prompt(live)
    events = parse_sse(live.post(f"{API}/chat", json={**body, "stream": True}).text)
    texts: dict[int, str] = {}
    for name, data in events:
        if name == "token":
            token = json.loads(data)
            texts[token["index"]] = texts.get(token["index"], "") + token["text"]
    assert texts == {0: whole["choices"][0]["text"], 1: whole["choices"][1]["text"]}
    name, data = events[-1]
    done = json.loads(data)
    assert name == "done" and [c["finish_reason"] for c in done["choices"]] == ["length", "length"]
    assert done["usage"] == whole["usage"]
    # One choice: the answer keeps its shape (no `choices`), and stream events name choice 0.
    single = live.post(f"{API}/chat", json={**body, "n": 1}).json()
    assert "choices" not in single
    first = next(
        json.loads(d)
        for n, d in parse_sse(live.post(f"{API}/chat", json={**body, "n": 1, "stream": True}).text)
        if n == "token"
    )
    assert first["index"] == 0


@pytest.fixture(scope="module")
def two_places(engine: GGUFEngine, model_path: Path) -> Iterator[LiveServer]:
    """Two sequences' worth of admission and no waiting line, on the shared engine."""
    with serve_in_thread(make_settings(model_path, parallel=2, max_queue=0, max_tokens=512), engine=engine) as server:
        yield server


def test_a_request_with_n_choices_takes_n_places(two_places: LiveServer) -> None:
    endless = {"model": MODEL, "prompt": LONG_PROMPT, "max_tokens": 500, "logit_bias": NEVER_ENDS, "stream": True}
    with requests.post(two_places.url + "/v1/completions", json=endless, stream=True, timeout=60) as running:
        lines = running.iter_lines()
        assert next(lines).startswith(b"data: ")
        # One place is taken: two more choices do not fit, one does.
        busy = two_places.post("/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 2, "n": 2})
        assert busy.status_code == 503 and busy.json()["error"]["code"] == "queue_full"
        assert two_places.post("/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 2}).ok
    assert wait_until(lambda: in_flight(two_places) == 0, timeout=10)


def test_n_above_parallel_is_a_400_naming_n_and_the_setting(live: LiveServer) -> None:
    for path, body in (
        ("/v1/chat/completions", {"messages": COLOURS}),
        ("/v1/completions", {"prompt": "Hi"}),
        (f"{API}/chat", {"messages": COLOURS}),
        (f"{API}/generate", {"prompt": "Hi"}),
    ):
        reply = live.post(path, json={**body, "n": 5, "max_tokens": 2})
        assert reply.status_code == 400, reply.text
        error = reply.json()["error"]
        assert (error.get("param") or error.get("field")) == "n"
        assert "SMOLLM_PARALLEL=4" in error["message"]
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    reply = live.post("/v1/chat/completions", json={"messages": COLOURS, "n": 2, "tools": tools})
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "n"


@pytest.fixture(scope="module")
def shared_cache(model_path: Path) -> Iterator[LiveServer]:
    """A server whose engine keeps one KV cache of n_ctx cells for all sequences (SMOLLM_KV_LAYOUT=shared)."""
    settings = make_settings(model_path, kv_layout=KVLayout.SHARED, max_tokens=512)
    engine = GGUFEngine(settings)
    try:
        with serve_in_thread(settings, engine=engine) as server:
            yield server
    finally:
        engine.close()


def test_in_the_shared_kv_layout_the_choices_share_the_window(shared_cache: LiveServer) -> None:
    with openai.OpenAI(base_url=shared_cache.url + "/v1", api_key="-", max_retries=0, timeout=120) as sdk:
        completion = sdk.chat.completions.create(model=MODEL, messages=COLOURS, n=2, **CHOICES)  # type: ignore[arg-type]
        assert [choice.finish_reason for choice in completion.choices] == ["length", "length"]
        assert completion.usage is not None and completion.usage.completion_tokens == 20
        # 1024 cells: the prompt once and four answers of 300 tokens do not fit (each would, with a window each).
        with pytest.raises(openai.BadRequestError) as refused:
            sdk.chat.completions.create(model=MODEL, messages=COLOURS, n=4, max_tokens=300)
    assert refused.value.code == "context_length_exceeded"
