"""Tool calls through the real openai SDK against the real model: required, named, auto, streamed, and a
conversation that carries a call and its result."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import jsonschema
import openai
import pytest

from tests.servers import EXAMPLE_TOOLS, LiveServer

MODEL = "SmolLM2-135M-Instruct.Q4_1"

TOOLS: list[Any] = EXAMPLE_TOOLS
QUESTION: list[Any] = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture
def client(live: LiveServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=live.url + "/v1", api_key="not-needed", max_retries=0, timeout=120) as sdk:
        yield sdk


def test_required_always_gives_a_call_whose_arguments_validate(client: openai.OpenAI) -> None:
    for seed in range(6):
        completion = client.chat.completions.create(
            model=MODEL,
            messages=QUESTION,
            tools=TOOLS,
            tool_choice="required",
            max_tokens=60,
            temperature=0.8,
            seed=seed,
        )
        choice = completion.choices[0]
        assert choice.finish_reason == "tool_calls", choice
        assert choice.message.content is None
        (call,) = choice.message.tool_calls or []
        assert call.type == "function" and call.id.startswith("call_")
        assert call.function.name in {"get_weather", "send_email"}
        arguments = json.loads(call.function.arguments)
        schema = next(t["function"]["parameters"] for t in TOOLS if t["function"]["name"] == call.function.name)
        jsonschema.validate(arguments, schema)


def test_a_named_function_is_the_one_called(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model=MODEL,
        messages=QUESTION,
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "send_email"}},
        max_tokens=60,
        temperature=0,
    )
    (call,) = completion.choices[0].message.tool_calls or []
    assert call.function.name == "send_email"
    assert isinstance(json.loads(call.function.arguments)["to"], str)


def test_auto_and_none_may_answer_in_text(client: openai.OpenAI) -> None:
    for choice in ("auto", "none"):
        completion = client.chat.completions.create(
            model=MODEL, messages=QUESTION, tools=TOOLS, tool_choice=choice, max_tokens=24, temperature=0
        )
        answer = completion.choices[0]
        if answer.finish_reason == "tool_calls":
            assert choice == "auto"
            assert answer.message.tool_calls
        else:
            assert answer.message.content and not answer.message.tool_calls


def test_streamed_tool_call_arrives_as_openai_deltas(client: openai.OpenAI) -> None:
    plain = client.chat.completions.create(
        model=MODEL, messages=QUESTION, tools=TOOLS, tool_choice="required", max_tokens=60, temperature=0
    )
    with client.chat.completions.stream(
        model=MODEL, messages=QUESTION, tools=TOOLS, tool_choice="required", max_tokens=60, temperature=0
    ) as stream:
        for _ in stream:
            pass
        final = stream.get_final_completion()
    (streamed,) = final.choices[0].message.tool_calls or []
    (whole,) = plain.choices[0].message.tool_calls or []
    assert final.choices[0].finish_reason == "tool_calls"
    assert (streamed.function.name, streamed.function.arguments) == (whole.function.name, whole.function.arguments)


def test_a_call_and_its_result_in_the_history(client: openai.OpenAI) -> None:
    first = client.chat.completions.create(
        model=MODEL, messages=QUESTION, tools=TOOLS, tool_choice="required", max_tokens=60, temperature=0
    )
    message = first.choices[0].message
    (call,) = message.tool_calls or []
    history = [
        *QUESTION,
        message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "18 degrees and sunny"},
    ]
    second = client.chat.completions.create(
        model=MODEL, messages=history, tools=TOOLS, tool_choice="none", max_tokens=24, temperature=0
    )
    assert second.choices[0].message.content
