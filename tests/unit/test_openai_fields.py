"""The OpenAI requests' fields: honoured, ignored as metadata, or refused by name (no model needed)."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from innova_smollm.core.schema import ConstraintKind
from innova_smollm.errors import InvalidRequestError
from innova_smollm.http.openai.protocol import ChatCompletionRequest, CompletionRequest
from innova_smollm.http.openai.serving import messages_of, options_of, tool_plan_of

HI = [{"role": "user", "content": "hi"}]


def chat(**fields: Any) -> ChatCompletionRequest:
    return msgspec.convert({"messages": HI, **fields}, ChatCompletionRequest)


def test_sampling_fields_reach_the_options() -> None:
    options = options_of(
        chat(
            top_k=5,
            min_p=0.2,
            repeat_penalty=1.3,
            frequency_penalty=0.4,
            presence_penalty=-0.5,
            logit_bias={"42": -100},
            seed=2**33 + 1,
            response_format={"type": "json_object"},
        )
    )
    assert (options.top_k, options.min_p, options.repeat_penalty) == (5, 0.2, 1.3)
    assert (options.frequency_penalty, options.presence_penalty) == (0.4, -0.5)
    assert options.logit_bias == ((42, -100.0),)
    assert options.seed == 1
    assert options.constraint is not None and options.constraint.kind is ConstraintKind.JSON_OBJECT


def test_metadata_and_harmless_values_are_accepted() -> None:
    options_of(
        chat(
            model="x",
            user="u",
            metadata={"a": "b"},
            store=True,
            service_tier="auto",
            prompt_cache_key="k",
            safety_identifier="s",
            parallel_tool_calls=True,
            n=1,
            logprobs=False,
            modalities=["text"],
            tools=[],
            tool_choice="none",
        )
    )
    options_of(msgspec.convert({"prompt": "x", "echo": False, "best_of": 1, "suffix": ""}, CompletionRequest))


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"top_logprobs": 3}, "top_logprobs"),
        ({"functions": [{"name": "f"}]}, "functions"),
        ({"function_call": "auto"}, "function_call"),
        ({"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
        ({"modalities": ["text", "audio"]}, "modalities"),
        ({"prediction": {"type": "content", "content": "x"}}, "prediction"),
        ({"reasoning_effort": "low"}, "reasoning_effort"),
        ({"verbosity": "low"}, "verbosity"),
        ({"web_search_options": {}}, "web_search_options"),
        ({"response_format": {"type": "yaml"}}, "response_format.type"),
        ({"messages": [{"role": "assistant", "content": "x", "refusal": "no"}]}, "messages[0].refusal"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, None),
    ],
)
def test_fields_that_ask_for_what_is_not_done_are_refused_by_name(fields: dict[str, Any], param: str | None) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        request = chat(**fields)
        options_of(request)
        messages_of(request)
    assert caught.value.field == (param or "messages[0].content[0]")
    assert (param or "image_url") in caught.value.message


@pytest.mark.parametrize(
    ("fields", "param"),
    [({"echo": True}, "echo"), ({"best_of": 3}, "best_of"), ({"suffix": "end"}, "suffix")],
)
def test_completion_fields_that_ask_for_what_is_not_done_are_refused(fields: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        options_of(msgspec.convert({"prompt": "x", **fields}, CompletionRequest))
    assert caught.value.field == param


def test_unknown_fields_do_not_decode() -> None:
    with pytest.raises(msgspec.ValidationError, match="unknown field `frobnicate`"):
        chat(frobnicate=1)
    with pytest.raises(msgspec.ValidationError, match="unknown field `colour`"):
        chat(messages=[{"role": "user", "content": "x", "colour": "red"}])


def test_n_choices_are_passed_on_and_refused_with_tools() -> None:
    assert options_of(chat(n=3)).n == 3
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    request = chat(n=2, tools=tools)
    with pytest.raises(InvalidRequestError) as caught:
        options_of(request, tool_plan_of(request))
    assert caught.value.field == "n" and "tools" in caught.value.message
    assert options_of(msgspec.convert({"prompt": "x", "n": 2}, CompletionRequest)).n == 2
