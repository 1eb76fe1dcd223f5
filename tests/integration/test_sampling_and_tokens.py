"""Sampling controls, refused fields and the token endpoints, through real HTTP against the real model."""

from __future__ import annotations

import json
from collections.abc import Iterator

import openai
import pytest

from tests.servers import API, LiveServer, parse_sse

MODEL = "SmolLM2-135M-Instruct.Q4_1"
QUESTION = [{"role": "user", "content": "List three fruits."}]


@pytest.fixture
def client(live: LiveServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=live.url + "/v1", api_key="not-needed", max_retries=0, timeout=120) as sdk:
        yield sdk


def _greedy(client: openai.OpenAI, max_tokens: int = 24, **extra: object) -> str:
    completion = client.chat.completions.create(
        model=MODEL,
        messages=QUESTION,  # type: ignore[arg-type]
        max_tokens=max_tokens,
        temperature=0,
        **extra,  # type: ignore[arg-type]
    )
    return completion.choices[0].message.content or ""


def test_logit_bias_bans_the_token_greedy_decoding_would_pick(client: openai.OpenAI, live: LiveServer) -> None:
    plain = _greedy(client)
    first = live.post("/tokenize", json={"content": plain}).json()["tokens"][0]
    biased = _greedy(client, logit_bias={str(first): -100})
    assert live.post("/tokenize", json={"content": biased}).json()["tokens"][0] != first


def test_penalties_change_a_greedy_answer(client: openai.OpenAI) -> None:
    plain = _greedy(client)
    assert _greedy(client, frequency_penalty=2.0) != plain or _greedy(client, presence_penalty=2.0) != plain
    assert _greedy(client, extra_body={"repeat_penalty": 1.8}) != plain


def test_a_seed_repeats_a_sampled_answer_with_top_k_and_min_p(client: openai.OpenAI) -> None:
    extra = {"top_k": 20, "min_p": 0.02}
    answers = {
        client.chat.completions.create(
            model=MODEL, messages=QUESTION, max_tokens=16, temperature=1.0, seed=11, extra_body=extra
        )
        .choices[0]
        .message.content
        for _ in range(2)
    }
    assert len(answers) == 1
    # top_k=1 is greedy whatever the temperature.
    top1 = client.chat.completions.create(
        model=MODEL, messages=QUESTION, max_tokens=16, temperature=1.5, extra_body={"top_k": 1}
    )
    assert top1.choices[0].message.content == _greedy(client, max_tokens=16)


def test_native_api_takes_the_same_sampling_fields(live: LiveServer) -> None:
    body = {
        "messages": QUESTION,
        "max_tokens": 8,
        "temperature": 0.5,
        "top_k": 10,
        "min_p": 0.1,
        "repeat_penalty": 1.1,
        "frequency_penalty": 0.2,
        "presence_penalty": 0.2,
        "logit_bias": {"0": -100},
        "seed": 3,
    }
    reply = live.post(f"{API}/chat", json=body)
    assert reply.status_code == 200, reply.text
    bad = live.post(f"{API}/chat", json={**body, "logit_bias": {"99999999": 1}})
    assert bad.status_code == 400
    assert bad.json()["error"]["field"] == "logit_bias.99999999"


@pytest.mark.parametrize(
    ("path", "fields", "param"),
    [
        ("/v1/chat/completions", {"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
        ("/v1/chat/completions", {"modalities": ["text", "audio"]}, "modalities"),
        ("/v1/chat/completions", {"prediction": {"type": "content", "content": "x"}}, "prediction"),
        ("/v1/chat/completions", {"response_format": {"type": "yaml"}}, "response_format.type"),
        ("/v1/chat/completions", {"top_logprobs": 2}, "top_logprobs"),
        ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ("/v1/chat/completions", {"n": 5}, "n"),
        ("/v1/completions", {"n": 5}, "n"),
        ("/v1/chat/completions", {"n": 2, "tools": [{"type": "function", "function": {"name": "f"}}]}, "n"),
        ("/v1/chat/completions", {"tool_choice": "required"}, "tool_choice"),
        ("/v1/chat/completions", {"frobnicate": True}, "frobnicate"),
        ("/v1/chat/completions", {"logit_bias": {"x": 1}}, "logit_bias.x"),
        ("/v1/completions", {"echo": True}, "echo"),
        ("/v1/completions", {"suffix": "x"}, "suffix"),
        ("/v1/completions", {"best_of": 2}, "best_of"),
        ("/v1/completions", {"frobnicate": True}, "frobnicate"),
    ],
)
def test_what_is_not_done_is_a_400_naming_the_field(
    live: LiveServer, path: str, fields: dict[str, object], param: str
) -> None:
    body = {"model": MODEL, "max_tokens": 4, **fields}
    body.update({"messages": QUESTION} if "chat" in path else {"prompt": "Hello"})
    reply = live.post(path, json=body)
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert param.split(".")[0] in error["message"]


def test_tokenize_and_detokenize_in_llama_cpp_shapes(live: LiveServer) -> None:
    text = "Hello, world! ça va?"
    for base in ("", API):
        tokens = live.post(f"{base}/tokenize", json={"content": text}).json()["tokens"]
        assert tokens and all(isinstance(token, int) for token in tokens)
        assert live.post(f"{base}/detokenize", json={"tokens": tokens}).json() == {"content": text}
        pieces = live.post(f"{base}/tokenize", json={"content": text, "with_pieces": True}).json()["tokens"]
        assert [piece["id"] for piece in pieces] == tokens
        # A piece that is not whole UTF-8 (half of "ç") comes as its bytes, as llama.cpp sends it.
        raw = b"".join(p["piece"].encode() if isinstance(p["piece"], str) else bytes(p["piece"]) for p in pieces)
        assert raw.decode() == text
    special = live.post("/tokenize", json={"content": "<|im_start|>user"}).json()["tokens"]
    literal = live.post("/tokenize", json={"content": "<|im_start|>user", "parse_special": False}).json()["tokens"]
    assert len(special) < len(literal)
    assert live.post("/detokenize", json={"tokens": special}).json()["content"] == "<|im_start|>user"


def test_token_endpoints_refuse_bad_input_by_name(live: LiveServer) -> None:
    reply = live.post("/detokenize", json={"tokens": [1, 10_000_000]})
    assert reply.status_code == 400
    assert reply.json()["error"]["field"] == "tokens[1]"
    reply = live.post(f"{API}/tokenize", json={"content": "x", "add_bos": True})
    assert reply.status_code == 400
    assert reply.json()["error"]["field"] == "add_bos"


def test_chat_logprobs_in_openai_shape_whole_and_streamed(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model=MODEL, messages=QUESTION, max_tokens=12, temperature=0, logprobs=True, top_logprobs=3
    )
    choice = completion.choices[0]
    assert choice.logprobs is not None and choice.logprobs.content is not None
    entries = choice.logprobs.content
    assert completion.usage is not None and len(entries) == completion.usage.completion_tokens
    assert "".join(entry.token for entry in entries) == choice.message.content
    for entry in entries:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        # Greedy picks the most likely token of the raw distribution: the first of the top ones.
        assert entry.top_logprobs[0].token == entry.token
        assert abs(entry.top_logprobs[0].logprob - entry.logprob) < 1e-4
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob >= entry.top_logprobs[2].logprob
    plain = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=4, temperature=0)
    assert plain.choices[0].logprobs is None


def test_completion_logprobs_in_openai_shape(client: openai.OpenAI) -> None:
    completion = client.completions.create(model=MODEL, prompt="One, two,", max_tokens=6, temperature=0, logprobs=2)
    logprobs = completion.choices[0].logprobs
    assert logprobs is not None and logprobs.tokens is not None and logprobs.token_logprobs is not None
    assert "".join(logprobs.tokens) == completion.choices[0].text
    assert logprobs.text_offset is not None and logprobs.text_offset[0] == 0
    assert logprobs.top_logprobs is not None and all(len(top) <= 2 for top in logprobs.top_logprobs)
    assert all(value <= 0 for value in logprobs.token_logprobs)


def test_native_logprobs(live: LiveServer) -> None:
    body = {"messages": QUESTION, "max_tokens": 5, "temperature": 0, "logprobs": 2}
    answer = live.post(f"{API}/chat", json=body).json()
    assert len(answer["logprobs"]) == answer["usage"]["completion_tokens"]
    assert "".join(entry["token"] for entry in answer["logprobs"]) == answer["response"]
    assert all(len(entry["top_logprobs"]) == 2 for entry in answer["logprobs"])
    assert live.post(f"{API}/chat", json={**body, "logprobs": None}).json()["logprobs"] is None


def test_streamed_chat_logprobs_ride_with_the_text_of_their_tokens(client: openai.OpenAI) -> None:
    asked = {"model": MODEL, "max_tokens": 40, "temperature": 0, "logprobs": True, "top_logprobs": 2}
    whole = client.chat.completions.create(messages=QUESTION, **asked)  # type: ignore[call-overload]
    chunks = list(client.chat.completions.create(messages=QUESTION, stream=True, **asked))  # type: ignore[call-overload]
    carrying = 0
    text, entries = "", []
    for chunk in chunks:
        for choice in chunk.choices:
            content = choice.delta.content or ""
            tokens = choice.logprobs.content if choice.logprobs and choice.logprobs.content else []
            if content:
                # Each chunk carries exactly the log probabilities of the tokens whose text it carries.
                assert b"".join(bytes(entry.bytes or []) for entry in tokens) == content.encode()
                carrying += 1
            text += content
            entries += tokens
    assert carrying > 10, "the stream carried its log probabilities chunk by chunk, not all at the end"
    assert text == whole.choices[0].message.content
    assert b"".join(bytes(entry.bytes or []) for entry in entries) == text.encode()
    assert whole.choices[0].logprobs is not None and whole.choices[0].logprobs.content is not None
    assert [entry.token for entry in entries] == [entry.token for entry in whole.choices[0].logprobs.content]


def test_streamed_completion_logprobs_ride_with_the_text_of_their_tokens(client: openai.OpenAI) -> None:
    asked = {"model": MODEL, "prompt": "One, two,", "max_tokens": 16, "temperature": 0, "logprobs": 1}
    whole = client.completions.create(**asked)  # type: ignore[call-overload]
    text, offsets = "", []
    for chunk in client.completions.create(stream=True, **asked):  # type: ignore[call-overload]
        for choice in chunk.choices:
            if choice.text:
                assert choice.logprobs is not None and choice.logprobs.tokens is not None
                assert "".join(choice.logprobs.tokens) == choice.text
                offsets += choice.logprobs.text_offset or []
            text += choice.text
    assert text == whole.choices[0].text
    assert whole.choices[0].logprobs is not None and offsets == whole.choices[0].logprobs.text_offset


def test_a_token_cut_by_a_stop_string_comes_with_the_last_chunk(client: openai.OpenAI) -> None:
    plain = _greedy(client, max_tokens=16)
    stop = plain.split()[2]
    asked = {"model": MODEL, "messages": QUESTION, "max_tokens": 16, "temperature": 0, "logprobs": True}
    whole = client.chat.completions.create(stop=stop, **asked)  # type: ignore[call-overload]
    chunks = list(client.chat.completions.create(stop=stop, stream=True, **asked))  # type: ignore[call-overload]
    streamed = [e.token for c in chunks for ch in c.choices if ch.logprobs for e in ch.logprobs.content or []]
    assert whole.choices[0].logprobs is not None and whole.choices[0].logprobs.content is not None
    assert streamed == [entry.token for entry in whole.choices[0].logprobs.content]
    last = chunks[-1].choices[0]
    assert last.finish_reason == "stop" and last.logprobs is not None
    # The tokens that made the stop string never had their text sent: they ride on the last chunk.
    assert stop in "".join(entry.token for entry in last.logprobs.content or [])


def test_native_stream_carries_logprobs_per_token_event(live: LiveServer) -> None:
    body = {"messages": QUESTION, "max_tokens": 12, "temperature": 0, "logprobs": 1, "stream": True}
    events = parse_sse(live.post(f"{API}/chat", json=body).text)
    tokens = [json.loads(data) for name, data in events if name == "token"]
    assert tokens and all("".join(e["token"] for e in token["logprobs"]) == token["text"] for token in tokens)
    done = json.loads(events[-1][1])
    assert [e["token"] for token in tokens for e in token["logprobs"]] == [e["token"] for e in done["logprobs"]]
