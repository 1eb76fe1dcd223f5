"""Tool calls without a model: planning, the forced call's schema, the generic prompt and reading answers back."""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest

from innova_smollm.core.schema import ConstraintKind
from innova_smollm.errors import InvalidRequestError
from innova_smollm.http.openai.protocol import ChatCompletionRequest
from innova_smollm.http.openai.serving import messages_of, options_of, tool_plan_of
from innova_smollm.http.openai.tools import may_be_a_call, parse_call

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
            "required": ["city"],
        },
    },
}
EMAIL = {"type": "function", "function": {"name": "send_email"}}


def request(**fields: Any) -> ChatCompletionRequest:
    body = {"messages": [{"role": "user", "content": "Weather in Paris?"}], "tools": [WEATHER, EMAIL], **fields}
    return msgspec.convert(body, ChatCompletionRequest)


def test_required_forces_a_call_of_any_tool_with_its_arguments_schema() -> None:
    data = request(tool_choice="required")
    plan = tool_plan_of(data)
    constraint = options_of(data, plan).constraint
    assert constraint is not None and constraint.kind is ConstraintKind.JSON_SCHEMA
    assert constraint.schema is not None
    names = [alt["properties"]["name"] for alt in constraint.schema["anyOf"]]
    assert names == [{"const": "get_weather"}, {"const": "send_email"}]


def test_a_named_function_forces_that_one() -> None:
    data = request(tool_choice={"type": "function", "function": {"name": "get_weather"}})
    constraint = options_of(data, tool_plan_of(data)).constraint
    assert constraint is not None and constraint.schema is not None
    assert constraint.schema["properties"]["name"] == {"const": "get_weather"}
    assert constraint.schema["properties"]["arguments"]["required"] == ["city"]


def test_auto_and_none_leave_the_answer_free() -> None:
    for choice in ("auto", "none", None):
        data = request(tool_choice=choice)
        assert options_of(data, tool_plan_of(data)).constraint is None


def test_the_generic_prompt_lists_the_tools_and_history_is_written_out() -> None:
    data = request(
        messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Weather in Paris?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "c1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "c1", "content": "18 C"},
        ]
    )
    messages = messages_of(data, tool_plan_of(data))
    assert [m.role for m in messages] == ["system", "user", "assistant", "user"]
    assert messages[0].content.startswith("Be brief.\n\nYou can call these tools:")
    assert '"name": "get_weather"' in messages[0].content
    assert json.loads(messages[2].content) == {"name": "get_weather", "arguments": {"city": "Paris"}}
    assert messages[3].content == "Result of get_weather: 18 C"
    none = request(tool_choice="none")
    assert "tools" not in messages_of(none, tool_plan_of(none))[0].content


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tools": None, "tool_choice": "required"}, "tool_choice"),
        ({"tools": [WEATHER, WEATHER]}, "tools[1].function.name"),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "not": {}}}}]},
            "tools[0].function.parameters",
        ),
        ({"tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].tool_call_id"),
    ],
)
def test_tool_requests_that_cannot_be_honoured_are_refused_by_name(fields: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        data = request(**fields)
        plan = tool_plan_of(data)
        messages_of(data, plan)
        options_of(data, plan)
    assert caught.value.field == param


def test_answers_are_read_back_as_calls_or_text() -> None:
    plan = tool_plan_of(request())
    assert plan is not None
    call = parse_call('  {"name": "get_weather", "arguments": {"city": "Oslo"}} ', plan)
    assert call is not None and call.name == "get_weather" and json.loads(call.arguments) == {"city": "Oslo"}
    assert call.id.startswith("call_")
    fenced = parse_call('```json\n{"name": "send_email", "parameters": {}}\n```', plan)
    assert fenced is not None and fenced.arguments == "{}"
    for text in ("It is sunny.", '{"name": "other", "arguments": {}}', '{"name": "get_weather"', "{}"):
        assert parse_call(text, plan) is None
    assert may_be_a_call("  {") and may_be_a_call("") and may_be_a_call("`")
    assert not may_be_a_call("The")
