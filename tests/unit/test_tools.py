"""Tool calls without a model: planning, the forced call's schema, the generic prompt, the model's own template
(Llama 3.2's) and reading answers back.

``data/llama-3.2-3b-instruct.jinja`` is Llama-3.2-3B-Instruct's chat template as its GGUF carries it: llama.cpp's
``models/templates/meta-llama-Llama-3.2-3B-Instruct.jinja`` (vendored in llama-cpp-python's sdist), the file
``scripts/production_shape.py`` writes into the production-shaped model; the ``production_shape`` tier checks that the
two are the same text. It is rendered here as llama-cpp-python's ``Jinja2ChatFormatter`` renders it (same Jinja
environment and ``tojson``), which the unit tier cannot import.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2.ext
import jinja2.sandbox
import msgspec
import pytest

from innova_smollm.core.schema import ConstraintKind
from innova_smollm.errors import InvalidRequestError
from innova_smollm.http.openai.protocol import ChatCompletionRequest
from innova_smollm.http.openai.serving import messages_of, options_of, tool_plan_of
from innova_smollm.http.openai.tools import TemplateTools, may_be_a_call, parse_call, template_tools

LLAMA_3_2_TEMPLATE = (Path(__file__).parent / "data" / "llama-3.2-3b-instruct.jinja").read_text(encoding="utf-8")
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

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


# --- the model's own template ----------------------------------------------------------------------------------


def render(template: str, data: ChatCompletionRequest) -> str:
    """The request rendered as the service renders it: planned, messages and tools through the template, as
    llama-cpp-python's Jinja2ChatFormatter renders a chat template (its environment, its tojson, its variables)."""
    knows = template_tools(template)
    plan = tool_plan_of(data, knows)
    messages = messages_of(data, plan, knows)
    environment = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    environment.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)

    def raise_exception(message: str) -> None:
        raise ValueError(message)

    return environment.from_string(template).render(
        messages=[m.template_form() for m in messages],
        tools=plan.template_tools() if plan is not None else None,
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
        add_generation_prompt=True,
        raise_exception=raise_exception,
        strftime_now=lambda f: datetime.now().strftime(f),
    )


CONVERSATION: list[Any] = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}
        ],
    },
    {"role": "tool", "tool_call_id": "c1", "content": '{"celsius": 18}'},
]


def test_llama_3_2s_template_knows_tools_and_asks_for_parameters() -> None:
    assert template_tools(LLAMA_3_2_TEMPLATE) == TemplateTools(arguments_key="parameters")
    assert template_tools(CHATML) is None
    assert template_tools(None) is None
    # A template that reads tools but names the key otherwise asks for OpenAI's; one that wraps calls in tags
    # (Qwen 2.5's <tool_call>) is not one whose calls this server reads: the generic prompt it is.
    asks_arguments = '{% for t in tools %}{{ t | tojson }}{% endfor %}Call as {"name": ..., "arguments": ...}'
    assert template_tools(asks_arguments) == TemplateTools(arguments_key="arguments")
    assert template_tools("{% if tools %}<tool_call>{{ tools | tojson }}</tool_call>{% endif %}") is None


def test_llama_3_2s_template_renders_the_tools_the_call_and_its_result_its_own_way() -> None:
    prompt = render(LLAMA_3_2_TEMPLATE, request(messages=CONVERSATION, tool_choice="auto"))
    system, user, assistant, ipython, answer = prompt.split("<|start_header_id|>")[1:]
    assert system.startswith("system<|end_header_id|>\n\nEnvironment: ipython\n") and "Be brief." in system
    # The tools and the template's instructions are in the first user message, before the question.
    assert user.startswith("user<|end_header_id|>\n\nGiven the following functions")
    assert '{"name": function name, "parameters": dictionary of argument name and its value}' in user
    assert '"name": "get_weather"' in user and '"name": "send_email"' in user
    assert user.endswith("Weather in Paris?<|eot_id|>")
    assert (
        assistant == 'assistant<|end_header_id|>\n\n{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>'
    )
    assert ipython == 'ipython<|end_header_id|>\n\n{"celsius": 18}<|eot_id|>'
    assert answer == "assistant<|end_header_id|>\n\n"
    assert "You can call these tools" not in prompt  # no generic prompt beside the template's


def test_llama_3_2s_template_without_tools_offered_still_renders_the_history_as_it_expects() -> None:
    for fields in ({"tool_choice": "none"}, {"tools": None}):
        prompt = render(LLAMA_3_2_TEMPLATE, request(messages=CONVERSATION, **fields))
        assert "Given the following functions" not in prompt and "Environment: ipython" not in prompt
        assert '{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>' in prompt
        assert '<|start_header_id|>ipython<|end_header_id|>\n\n{"celsius": 18}<|eot_id|>' in prompt


def test_a_tool_result_that_is_not_json_is_passed_as_the_string_it_is() -> None:
    history = [*CONVERSATION[:3], {"role": "tool", "tool_call_id": "c1", "content": "18 C"}]
    data = request(messages=history)
    tool = messages_of(data, tool_plan_of(data), TemplateTools(arguments_key="parameters"))[3]
    assert tool.template_form() == {"role": "tool", "content": "18 C", "tool_call_id": "c1"}


def test_what_llama_3_2s_template_refuses_is_refused() -> None:
    two_calls = dict(CONVERSATION[2])
    two_calls["tool_calls"] = [CONVERSATION[2]["tool_calls"][0]] * 2
    with pytest.raises(ValueError, match="single tool-calls"):
        render(LLAMA_3_2_TEMPLATE, request(messages=[*CONVERSATION[:2], two_calls]))


def test_a_forced_call_takes_the_shape_the_templates_prompt_asks_for() -> None:
    knows = template_tools(LLAMA_3_2_TEMPLATE)
    data = request(tool_choice={"type": "function", "function": {"name": "get_weather"}})
    constraint = options_of(data, tool_plan_of(data, knows)).constraint
    assert constraint is not None and constraint.schema is not None
    assert constraint.schema["required"] == ["name", "parameters"]
    assert constraint.schema["properties"]["parameters"]["required"] == ["city"]
    # Without a template that knows tools, the generic prompt's shape.
    generic = options_of(data, tool_plan_of(data, template_tools(CHATML))).constraint
    assert generic is not None and generic.schema is not None
    assert generic.schema["required"] == ["name", "arguments"]


def test_both_shapes_are_read_back_as_calls() -> None:
    plan = tool_plan_of(request(), template_tools(LLAMA_3_2_TEMPLATE))
    assert plan is not None
    for key in ("parameters", "arguments"):
        call = parse_call(json.dumps({"name": "get_weather", key: {"city": "Oslo"}}), plan)
        assert call is not None and json.loads(call.arguments) == {"city": "Oslo"}
