"""Constrained output through the real openai SDK, real uvicorn and the real model: every answer that finishes with
``stop`` parses and validates; answers cut by max_tokens say ``length``; what cannot be enforced is a 400."""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

import jsonschema
import openai
import pydantic
import pytest

from tests.servers import API, LiveServer, parse_sse

MODEL = "SmolLM2-135M-Instruct.Q4_1"

#: Small enough for SmolLM2-135M to finish in a few dozen tokens: an object, an enum, a bounded string, a number,
#: a boolean, and a short array of nested objects with a bounded integer.
PLAN_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "need": {"type": "string", "maxLength": 24},
        "priority": {"enum": ["low", "medium", "high"]},
        "budget": {"type": "integer"},
        "urgent": {"type": "boolean"},
        "actions": {
            "type": "array",
            "maxItems": 2,
            "items": {
                "type": "object",
                "properties": {
                    "verb": {"enum": ["call", "email", "visit"]},
                    "days": {"type": "integer", "minimum": 1, "maximum": 30},
                },
                "required": ["verb", "days"],
                "additionalProperties": False,
            },
        },
    },
    "required": ["need", "priority", "budget", "urgent", "actions"],
    "additionalProperties": False,
}

#: The 50-answer test's schema: nested, with enums, an integer, a boolean and an array of objects, kept to about
#: 40 tokens so that 50 answers fit the test tier's time on a busy 2-core host.
STEPS_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "priority": {"enum": ["low", "medium", "high"]},
        "urgent": {"type": "boolean"},
        "actions": {
            "type": "array",
            "minItems": 1,
            "maxItems": 1,
            "items": PLAN_SCHEMA["properties"]["actions"]["items"],
        },
    },
    "required": ["priority", "urgent", "actions"],
    "additionalProperties": False,
}

PLAN_PROMPT = [
    {"role": "system", "content": "You plan actions for a small business. Answer in JSON."},
    {"role": "user", "content": "A bakery needs a new oven before the holidays. Propose a plan."},
]


class Person(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=10)
    age: int = pydantic.Field(ge=0, le=120)
    colour: Literal["red", "green", "blue"]
    nickname: str | None = pydantic.Field(max_length=8)


@pytest.fixture
def client(live: LiveServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=live.url + "/v1", api_key="not-needed", max_retries=0, timeout=120) as sdk:
        yield sdk


def _schema_format(schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "plan", "schema": schema, "strict": True}}


def _sample(client: openai.OpenAI, count: int, **request: Any) -> list[tuple[str, str]]:
    """``count`` answers (text, finish_reason), four at a time, so constrained sequences share batches."""

    def one(index: int) -> tuple[str, str]:
        completion = client.chat.completions.create(model=MODEL, seed=index, **request)
        choice = completion.choices[0]
        return choice.message.content or "", choice.finish_reason

    with ThreadPoolExecutor(max_workers=4) as pool:
        return list(pool.map(one, range(count)))


def _check_all(answers: list[tuple[str, str]], schema: dict[str, Any]) -> None:
    finished = [text for text, reason in answers if reason == "stop"]
    assert len(finished) >= len(answers) * 0.8, answers  # the schema fits max_tokens: nearly all finish
    for text, reason in answers:
        assert reason in {"stop", "length"}
        if reason == "stop":
            jsonschema.validate(json.loads(text), schema)


def test_fifty_sampled_answers_validate_against_a_nested_schema(client: openai.OpenAI) -> None:
    answers = _sample(
        client, 50, messages=PLAN_PROMPT, temperature=0.8, max_tokens=80, response_format=_schema_format(STEPS_SCHEMA)
    )
    _check_all(answers, STEPS_SCHEMA)


def test_fifty_sampled_answers_validate_against_a_pydantic_schema(client: openai.OpenAI) -> None:
    schema = Person.model_json_schema()
    answers = _sample(
        client,
        50,
        messages=[{"role": "user", "content": "Invent a person: name, age, favourite colour, nickname."}],
        temperature=0.8,
        max_tokens=60,
        response_format=_schema_format(schema),
    )
    _check_all(answers, schema)
    for text, reason in answers:
        if reason == "stop":
            Person.model_validate_json(text)


def test_json_object_answers_are_json_objects(client: openai.OpenAI) -> None:
    answers = _sample(
        client,
        4,
        messages=[{"role": "user", "content": "Give me a JSON object describing a cat."}],
        temperature=0.8,
        max_tokens=80,
        response_format={"type": "json_object"},
    )
    for text, reason in answers:
        if reason == "stop":
            assert isinstance(json.loads(text), dict)


def test_the_sdk_parse_helper_returns_the_pydantic_model(client: openai.OpenAI) -> None:
    completion = client.chat.completions.parse(
        model=MODEL,
        messages=[{"role": "user", "content": "Invent a person."}],
        response_format=Person,
        temperature=0,
        max_tokens=60,
    )
    message = completion.choices[0].message
    assert completion.choices[0].finish_reason == "stop"
    assert isinstance(message.parsed, Person)
    beta = client.beta.chat.completions.parse(
        model=MODEL,
        messages=[{"role": "user", "content": "Invent a person."}],
        response_format=Person,
        temperature=0,
        max_tokens=60,
    )
    assert beta.choices[0].message.parsed == message.parsed


def test_streamed_constrained_answer_validates(client: openai.OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=PLAN_PROMPT,
            temperature=0,
            max_tokens=120,
            response_format=_schema_format(PLAN_SCHEMA),  # type: ignore[arg-type]
            stream=True,
        )
    )
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert chunks[-1].choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(text), PLAN_SCHEMA)


def test_an_answer_cut_by_max_tokens_says_length(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model=MODEL,
        messages=PLAN_PROMPT,
        temperature=0,
        max_tokens=5,
        response_format=_schema_format(PLAN_SCHEMA),  # type: ignore[arg-type]
    )
    assert completion.choices[0].finish_reason == "length"
    assert (completion.choices[0].message.content or "").startswith("{")


#: A value the grammar forces whole once its first token is chosen: its tokens are appended without sampling.
FORCED = "the quarterly report mentions revenue, costs and the new office in town"


def test_forced_tokens_are_delivered_counted_and_bounded_by_max_tokens(client: openai.OpenAI) -> None:
    schema = {"type": "object", "properties": {"note": {"const": FORCED}}, "required": ["note"]}
    whole = client.chat.completions.create(
        model=MODEL, messages=PLAN_PROMPT, temperature=0.8, max_tokens=60, response_format=_schema_format(schema)
    )
    assert whole.choices[0].finish_reason == "stop"
    assert whole.choices[0].message.content == json.dumps({"note": FORCED})
    assert whole.usage is not None
    tokens = whole.usage.completion_tokens
    assert tokens > 10  # every forced token counts as an answer token

    streamed = client.chat.completions.create(
        model=MODEL,
        messages=PLAN_PROMPT,
        temperature=0,
        max_tokens=60,
        response_format=_schema_format(schema),  # type: ignore[arg-type]
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(streamed)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == json.dumps({"note": FORCED})
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == tokens

    cut = client.chat.completions.create(
        model=MODEL, messages=PLAN_PROMPT, temperature=0, max_tokens=7, response_format=_schema_format(schema)
    )
    assert cut.choices[0].finish_reason == "length"
    assert cut.usage is not None and cut.usage.completion_tokens == 7
    assert json.dumps({"note": FORCED}).startswith(cut.choices[0].message.content or "-")

    # Forced tokens have no logits of their own: with logprobs every token is sampled, and each has its figure.
    scored = client.chat.completions.create(
        model=MODEL,
        messages=PLAN_PROMPT,
        temperature=0,
        max_tokens=60,
        response_format=_schema_format(schema),
        logprobs=True,
    )
    assert scored.choices[0].message.content == json.dumps({"note": FORCED})
    assert scored.choices[0].logprobs is not None and scored.choices[0].logprobs.content is not None
    assert scored.usage is not None and len(scored.choices[0].logprobs.content) == scored.usage.completion_tokens


def test_text_completions_take_response_format(client: openai.OpenAI) -> None:
    schema = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}}, "required": ["answer"]}
    completion = client.completions.create(
        model=MODEL,
        prompt="Is the sky blue? Answer in JSON: ",
        temperature=0,
        max_tokens=20,
        extra_body={"response_format": _schema_format(schema)},
    )
    assert completion.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(completion.choices[0].text), schema)


def test_constrained_and_free_requests_share_batches(client: openai.OpenAI) -> None:
    free = {"messages": [{"role": "user", "content": "Tell me a story."}], "temperature": 0.8, "max_tokens": 40}
    constrained = {
        "messages": PLAN_PROMPT,
        "temperature": 0.8,
        "max_tokens": 80,
        "response_format": _schema_format(STEPS_SCHEMA),
    }
    with ThreadPoolExecutor(max_workers=4) as pool:
        jobs = [
            pool.submit(client.chat.completions.create, model=MODEL, **(free if i % 2 else constrained))
            for i in range(6)
        ]
        results = [job.result() for job in jobs]
    for i, completion in enumerate(results):
        choice = completion.choices[0]
        if i % 2:
            assert choice.message.content
        elif choice.finish_reason == "stop":
            jsonschema.validate(json.loads(choice.message.content or ""), STEPS_SCHEMA)


def test_native_chat_and_generate_take_response_format_and_grammar(live: LiveServer) -> None:
    chat = live.post(
        f"{API}/chat",
        json={
            "messages": PLAN_PROMPT,
            "temperature": 0,
            "max_tokens": 120,
            "response_format": _schema_format(PLAN_SCHEMA),
        },
    ).json()
    assert chat["finish_reason"] == "stop", chat
    jsonschema.validate(json.loads(chat["response"]), PLAN_SCHEMA)
    grammar = 'root ::= ("yes" | "no") "!"'
    generated = live.post(
        f"{API}/generate", json={"prompt": "Is water wet?", "grammar": grammar, "max_tokens": 8, "temperature": 0.8}
    ).json()
    assert generated["text"] in {"yes!", "no!"}, generated
    assert generated["finish_reason"] == "stop"
    streamed = live.post(
        f"{API}/chat",
        json={"messages": [{"role": "user", "content": "Hi"}], "grammar": grammar, "max_tokens": 8, "stream": True},
    )
    assert streamed.status_code == 200
    events = parse_sse(streamed.text)
    assert "".join(json.loads(data)["text"] for name, data in events if name == "token") in {"yes!", "no!"}
    assert json.loads(events[-1][1])["finish_reason"] == "stop"


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        (
            {"response_format": _schema_format({"type": "string", "pattern": "^a"})},
            "response_format.json_schema.schema",
        ),
        ({"response_format": _schema_format({"$ref": "https://x.test/s.json"})}, "response_format.json_schema.schema"),
        (
            {"response_format": _schema_format({"type": "string", "format": "email"})},
            "response_format.json_schema.schema",
        ),
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
        ({"response_format": {"type": "json_object"}, "stop": ["}"]}, "stop"),
    ],
)
def test_what_cannot_be_enforced_is_a_400(live: LiveServer, fields: dict[str, Any], param: str) -> None:
    reply = live.post("/v1/chat/completions", json={"model": MODEL, "messages": PLAN_PROMPT, **fields})
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["param"] == param


@pytest.mark.parametrize("grammar", ["root ::= foo", "root ::= (", 'start ::= "a"', 'root ::= root "a"'])
def test_an_invalid_grammar_is_a_400_naming_it(live: LiveServer, grammar: str) -> None:
    reply = live.post(f"{API}/generate", json={"prompt": "x", "grammar": grammar})
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["field"] == "grammar"


def test_each_of_n_choices_is_constrained_to_the_schema(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model=MODEL,
        messages=PLAN_PROMPT,  # type: ignore[arg-type]
        temperature=0.8,
        seed=3,
        max_tokens=200,
        n=3,
        response_format=_schema_format(PLAN_SCHEMA),  # type: ignore[arg-type]
    )
    assert [choice.index for choice in completion.choices] == [0, 1, 2]
    answers = [(choice.message.content or "", choice.finish_reason) for choice in completion.choices]
    assert len({text for text, _ in answers}) > 1, "each choice samples on its own"
    _check_all(answers, PLAN_SCHEMA)
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=PLAN_PROMPT,  # type: ignore[arg-type]
            temperature=0.8,
            seed=3,
            max_tokens=200,
            n=2,
            response_format=_schema_format(PLAN_SCHEMA),  # type: ignore[arg-type]
            stream=True,
        )
    )
    texts = {
        index: "".join(c.choices[0].delta.content or "" for c in chunks if c.choices and c.choices[0].index == index)
        for index in (0, 1)
    }
    reasons = {
        c.choices[0].index: c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    }
    _check_all([(texts[index], reasons[index]) for index in (0, 1)], PLAN_SCHEMA)
