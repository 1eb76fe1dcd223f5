"""LangChain's ``ChatOpenAI`` against the real service and model, unchanged: ``with_structured_output`` (its default
method, ``json_schema``, and ``function_calling``), ``bind_tools`` with each ``tool_choice``, streamed tool calls and
a tool's result sent back."""

from __future__ import annotations

from typing import Any, Literal

import jsonschema
import pydantic
import pytest
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, HumanMessage, ToolMessage
from langchain_openai import ChatOpenAI

from tests.servers import EXAMPLE_TOOLS, LiveServer

MODEL = "SmolLM2-135M-Instruct.Q4_1"


class Person(pydantic.BaseModel):
    """A person."""

    name: str = pydantic.Field(max_length=10)
    age: int
    colour: Literal["red", "green", "blue"]


TOOLS = EXAMPLE_TOOLS
SCHEMAS = {tool["function"]["name"]: tool["function"]["parameters"] for tool in TOOLS}
QUESTION = "What is the weather in Paris?"


@pytest.fixture
def chat(live: LiveServer) -> ChatOpenAI:
    return ChatOpenAI(
        base_url=live.url + "/v1",
        api_key=pydantic.SecretStr("not-needed"),
        model=MODEL,
        temperature=0,
        max_completion_tokens=60,
        max_retries=0,
        timeout=120,
    )


def the_call(message: BaseMessage) -> dict[str, Any]:
    assert isinstance(message, AIMessage), message
    assert not message.invalid_tool_calls, message.invalid_tool_calls
    (call,) = message.tool_calls
    assert call["id"] and call["id"].startswith("call_")
    jsonschema.validate(call["args"], SCHEMAS[call["name"]])
    return dict(call)


def test_structured_output_by_its_default_method_json_schema(chat: ChatOpenAI) -> None:
    structured = chat.with_structured_output(Person, include_raw=True)
    result: Any = structured.invoke("Invent a person.")
    assert result["parsing_error"] is None
    assert isinstance(result["parsed"], Person)
    # The default asks for response_format json_schema: the answer is the JSON itself, not a tool call.
    raw = result["raw"]
    assert isinstance(raw, AIMessage) and not raw.tool_calls
    assert Person.model_validate_json(str(raw.content)) == result["parsed"]


def test_structured_output_by_function_calling(chat: ChatOpenAI) -> None:
    structured = chat.with_structured_output(Person, method="function_calling", include_raw=True)
    result: Any = structured.invoke("Invent a person.")
    assert result["parsing_error"] is None
    assert isinstance(result["parsed"], Person)
    # It binds the model as a tool and names it in tool_choice: the answer is a forced call of it.
    (call,) = result["raw"].tool_calls
    assert call["name"] == "Person" and Person.model_validate(call["args"]) == result["parsed"]


def test_bind_tools_with_required_gives_a_parsed_call(chat: ChatOpenAI) -> None:
    for seed in range(3):
        message = chat.bind_tools(TOOLS, tool_choice="required").invoke(QUESTION, temperature=0.8, seed=seed)
        assert the_call(message)["name"] in SCHEMAS


def test_bind_tools_with_a_named_tool_calls_that_one(chat: ChatOpenAI) -> None:
    # LangChain's short form (a tool's name) and OpenAI's dict are both sent as the named function.
    for choice in ("send_email", {"type": "function", "function": {"name": "send_email"}}):
        message = chat.bind_tools(TOOLS, tool_choice=choice).invoke(QUESTION)
        assert the_call(message)["name"] == "send_email"


def test_bind_tools_with_auto_answers_with_a_call_or_text(chat: ChatOpenAI) -> None:
    message = chat.bind_tools(TOOLS, tool_choice="auto").invoke(QUESTION)
    assert isinstance(message, AIMessage)
    if message.tool_calls:
        the_call(message)
    else:
        assert isinstance(message.content, str) and message.content


def test_a_streamed_tool_call_adds_up_to_the_same_call(chat: ChatOpenAI) -> None:
    bound = chat.bind_tools(TOOLS, tool_choice="required")
    whole = the_call(bound.invoke(QUESTION))
    chunks = list(bound.stream(QUESTION))
    assert all(isinstance(chunk, AIMessageChunk) for chunk in chunks)
    merged: Any = chunks[0]
    for chunk in chunks[1:]:
        merged = merged + chunk
    streamed = the_call(merged)
    assert (streamed["name"], streamed["args"]) == (whole["name"], whole["args"])
    assert merged.response_metadata.get("finish_reason") == "tool_calls"


def test_a_tools_result_goes_back_and_the_model_answers(chat: ChatOpenAI) -> None:
    bound = chat.bind_tools(TOOLS, tool_choice="required")
    question = HumanMessage(QUESTION)
    asked = bound.invoke([question])
    call = the_call(asked)
    result = ToolMessage(content="18 degrees and sunny", tool_call_id=call["id"])
    answer = chat.bind_tools(TOOLS, tool_choice="none").invoke([question, asked, result], max_completion_tokens=24)
    assert isinstance(answer, AIMessage) and not answer.tool_calls
    assert isinstance(answer.content, str) and answer.content
